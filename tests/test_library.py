"""Prescreening in a reference space (atlasseg.library): ranking, the per-atlas cache, killed writes."""

import dataclasses
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import phantom, rigid, warp

import atlasseg.library as library
from atlasseg.cache import Cache
from atlasseg.config import load_config
from atlasseg.manifest import Atlas, Target


def bent(image: sitk.Image, labels: sitk.Image, amplitude: float) -> tuple[sitk.Image, sitk.Image]:
    """``image`` and ``labels`` under a smooth non-affine deformation: each axis displaced by ``amplitude`` mm
    times a sine of the next axis (one period over the field of view), which no affine transform undoes."""
    dim = image.GetDimension()
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    points = np.meshgrid(*[np.arange(n) for n in image.GetSize()[::-1]], indexing="ij")[::-1]  # x, y, z indices
    field = np.stack(
        [
            amplitude * np.sin(2 * np.pi * points[(axis + 1) % dim] * image.GetSpacing()[0] / extent[0])
            for axis in range(dim)
        ],
        axis=-1,
    )
    displacement = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    displacement.CopyInformation(image)
    transform = sitk.DisplacementFieldTransform(displacement)
    return warp(image, transform), warp(labels, transform, labels=True)


def write(folder, name: str, image: sitk.Image, labels: sitk.Image | None = None):
    sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    if labels is not None:
        sitk.WriteImage(labels, str(folder / f"{name}_seg.nii.gz"))
    return folder / f"{name}.nii.gz", None if labels is None else folder / f"{name}_seg.nii.gz"


def library_of(folder, dim: int, amplitudes: dict[str, float]) -> tuple[Target, list[Atlas]]:
    """A target (the phantom, rigidly moved) and atlases: the phantom bent by each amplitude (mm), each
    under its own rigid motion, so only the reference space, not the grid, can tell them apart."""
    image, labels = phantom(dim=dim, size=32, spacing=2.0)
    target_image, _ = write(folder, "target", warp(image, rigid(dim, angle_deg=6.0, shift=(3.0, -2.0, 1.0))))
    atlases = []
    for number, (name, amplitude) in enumerate(amplitudes.items()):
        moved = rigid(dim, angle_deg=4.0 * (number - 1), shift=(2.0 * number - 3.0, 1.0, -1.5))
        bent_image, bent_labels = bent(warp(image, moved), warp(labels, moved, labels=True), amplitude)
        atlases.append(Atlas(name, *write(folder, name, bent_image, bent_labels)))
    return Target("target", target_image), atlases


def prescreen_config(count: int, **selection):
    config = load_config("default")
    return dataclasses.replace(
        config,
        selection=dataclasses.replace(config.selection, k=1, prescreen=count, grid_spacing=2.0, **selection),
        parallel=dataclasses.replace(config.parallel, n_jobs=1),
    )


@pytest.fixture(autouse=True)
def _fresh_memory(monkeypatch):
    monkeypatch.setattr(library, "_MEMO", {})


def test_the_reference_space_ranking_puts_the_least_deformed_copy_first(tmp_path, dim):
    # The reference (listed first) is itself bent: the ranking goes through it, not around it.
    amplitudes = {"reference": 3.0, "bent_5": 5.0, "bent_0": 0.0, "bent_2": 2.0, "bent_8": 8.0}
    target, atlases = library_of(tmp_path, dim, amplitudes)
    cache = Cache(tmp_path / "cache")
    assert [a.id for a in library.prescreen(target, atlases, prescreen_config(1), cache=cache)] == ["bent_0"]
    assert [a.id for a in library.prescreen(target, atlases, prescreen_config(2), cache=cache)] == ["bent_0", "bent_2"]
    # A library no larger than prescreen (or k), or prescreen "all": no narrowing.
    assert library.prescreen(target, atlases, prescreen_config(5), cache=cache) is None
    assert library.prescreen(target, atlases, prescreen_config("all"), cache=cache) is None


def test_a_changed_atlas_recomputes_only_its_own_entry(tmp_path, monkeypatch):
    target, atlases = library_of(tmp_path, 2, {"reference": 1.0, "a": 0.0, "b": 2.0, "c": 4.0})
    cache, config = Cache(tmp_path / "cache"), prescreen_config(2)
    library.prescreen(target, atlases, config, cache=cache)
    registered = []
    original = library._to_reference
    monkeypatch.setattr(
        library, "_to_reference", lambda ref, image, *rest: registered.append(image) or original(ref, image, *rest)
    )
    monkeypatch.setattr(library, "_MEMO", {})  # a new process: only the cache
    library.prescreen(target, atlases, config, cache=cache)
    assert registered == []  # atlases and target: all from the cache
    image = sitk.ReadImage(str(atlases[2].image))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32) * 1.01, str(atlases[2].image))  # atlas b changes
    library.prescreen(target, atlases, config, cache=cache)
    assert registered == [atlases[2].image]
    assert len(list((tmp_path / "cache" / "library").glob("*.json"))) == 6  # 4 atlases, the target, b again


def test_a_run_killed_mid_write_leaves_the_shared_library_cache_sound(tmp_path, monkeypatch):
    target, atlases = library_of(tmp_path, 2, {"reference": 1.0, "a": 0.0, "b": 2.0, "c": 4.0})
    config = prescreen_config(2)
    expected = [a.id for a in library.prescreen(target, atlases, config, cache=Cache(tmp_path / "clean"))]
    shared = tmp_path / "shared"
    monkeypatch.setattr(library, "_MEMO", {})
    real_replace, renames = os.replace, []

    def killed(source, destination):  # the first run dies renaming its 5th file: the second entry's transform
        renames.append(destination)
        if len(renames) == 5:
            raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        library.prescreen(target, atlases, config, cache=Cache(shared))
    monkeypatch.setattr(os, "replace", real_replace)
    folder = shared / "library"
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]  # no temporary left behind
    # The second run: the finished entry is reused, the half-written one (arrays and transform, no JSON) redone.
    monkeypatch.setattr(library, "_MEMO", {})
    assert [a.id for a in library.prescreen(target, atlases, config, cache=Cache(shared))] == expected
    assert len(list(folder.glob("*.json"))) == len(list(folder.glob("*.npz"))) == 5


def test_a_large_library_runs_end_to_end_with_prescreening(tmp_path):
    """Through the pipeline: only the prescreened atlases get the pairwise affine stage."""
    from atlasseg.pipeline import rank_atlases

    target, atlases = library_of(tmp_path, 2, {"reference": 1.0, "a": 0.0, "b": 2.0, "c": 4.0, "d": 6.0})
    ranking = rank_atlases(target, atlases, prescreen_config(2), cache=Cache(tmp_path / "cache"))
    assert sorted(ranking.ranked) == ["a", "reference"] and ranking.selected == [ranking.ranked[0]]
    assert "prescreen" in ranking.seconds
    exhaustive = rank_atlases(target, atlases, prescreen_config("all"), cache=Cache(tmp_path / "cache"))
    assert len(exhaustive.ranked) == 5 and "prescreen" not in exhaustive.seconds
