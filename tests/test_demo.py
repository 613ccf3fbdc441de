"""Tests for the synthetic demo dataset (atlasseg.demo)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from atlasseg.demo import demo_label_names, make_demo_dataset

# Small datasets keep the suite fast; the field of view is fixed, so only the spacing changes.
SMALL = {2: {"size": 48, "n_atlases": 2, "n_targets": 1}, 3: {"size": 32, "n_atlases": 2, "n_targets": 1}}


def _make(tmp_path, dim, seed=0, name="data"):
    return make_demo_dataset(tmp_path / name, dim=dim, seed=seed, **SMALL[dim])


def _subjects(manifest_path):
    manifest = yaml.safe_load(manifest_path.read_text())
    root = manifest_path.parent
    for entry in manifest["atlases"] + manifest["targets"]:
        yield entry["id"], sitk.ReadImage(str(root / entry["image"])), sitk.ReadImage(str(root / entry["labels"]))


def _geometry(image):
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def dataset(request, tmp_path_factory):
    dim = request.param
    return dim, _make(tmp_path_factory.mktemp(f"demo{dim}d"), dim)


def test_manifest_loads_and_files_exist(dataset):
    dim, path = dataset
    assert path.name == "data_manifest.yaml"
    manifest = yaml.safe_load(path.read_text())
    assert list(manifest) == ["labels", "atlases", "targets"]
    assert manifest["labels"] == demo_label_names()
    assert all(isinstance(key, int) for key in manifest["labels"])
    ids = [entry["id"] for entry in manifest["atlases"] + manifest["targets"]]
    assert ids == ["case_001", "case_002", "case_003"]
    assert len(manifest["atlases"]) == 2 and len(manifest["targets"]) == 1
    for entry in manifest["atlases"] + manifest["targets"]:
        assert set(entry) == {"id", "image", "labels"}
        assert entry["image"] == f"images/{entry['id']}.nii.gz"
        assert entry["labels"] == f"labels/{entry['id']}.nii.gz"
        assert (path.parent / entry["image"]).is_file()
        assert (path.parent / entry["labels"]).is_file()
    # Atomic writes leave no temporary files behind.
    assert not list(path.parent.rglob(".tmp-*"))


def test_image_and_labels_share_grid_and_types(dataset):
    dim, path = dataset
    for _, image, labels in _subjects(path):
        assert image.GetDimension() == dim
        assert _geometry(image) == _geometry(labels)
        assert image.GetPixelID() == sitk.sitkFloat32
        assert labels.GetPixelID() == sitk.sitkUInt8
        assert np.allclose(image.GetDirection(), np.eye(dim).ravel())


def test_labels_present_with_distinct_intensities(dataset):
    _, path = dataset
    names = demo_label_names()
    for case_id, image, labels in _subjects(path):
        img = sitk.GetArrayFromImage(image)
        lab = sitk.GetArrayFromImage(labels)
        present = set(np.unique(lab).tolist()) - {0}
        assert len(present) >= 4, case_id
        assert present <= set(names), case_id
        means = sorted(float(img[lab == value].mean()) for value in present | {0})
        # Clean intensities differ by at least 0.1 (times a gain >= 0.7); partial volume at this
        # coarse test resolution, bias and noise narrow the gaps but do not close them.
        assert np.min(np.diff(means)) > 0.02, (case_id, means)


def test_origins_differ_between_subjects(dataset):
    _, path = dataset
    origins = [image.GetOrigin() for _, image, _ in _subjects(path)]
    assert len(set(origins)) == len(origins)


def test_anisotropic_spacing_on_a_3d_subject(tmp_path):
    path = _make(tmp_path, 3)
    spacings = {case_id: image.GetSpacing() for case_id, image, _ in _subjects(path)}
    assert np.allclose(spacings["case_001"], spacings["case_001"][0])
    aniso = spacings["case_003"]
    assert aniso[2] > 1.4 * aniso[0] and np.isclose(aniso[0], aniso[1])
    # Same field of view along the coarse axis (fewer slices).
    sizes = {case_id: image.GetSize() for case_id, image, _ in _subjects(path)}
    assert sizes["case_003"][2] < sizes["case_001"][2]
    fov = [n * s for n, s in zip(sizes["case_003"], aniso)]
    assert np.allclose(fov, fov[0], rtol=0.05)


@pytest.mark.parametrize("dim", [2, 3])
def test_same_seed_gives_identical_arrays(tmp_path, dim):
    first = list(_subjects(_make(tmp_path, dim, seed=7, name="a")))
    second = list(_subjects(_make(tmp_path, dim, seed=7, name="b")))
    for (id_a, img_a, lab_a), (id_b, img_b, lab_b) in zip(first, second, strict=True):
        assert id_a == id_b
        assert _geometry(img_a) == _geometry(img_b)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img_a), sitk.GetArrayFromImage(img_b))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(lab_a), sitk.GetArrayFromImage(lab_b))


@pytest.mark.parametrize("dim", [2, 3])
def test_different_seed_gives_different_arrays(tmp_path, dim):
    first = list(_subjects(_make(tmp_path, dim, seed=1, name="a")))
    second = list(_subjects(_make(tmp_path, dim, seed=2, name="b")))
    for (_, img_a, lab_a), (_, img_b, lab_b) in zip(first, second, strict=True):
        assert not np.array_equal(sitk.GetArrayFromImage(img_a), sitk.GetArrayFromImage(img_b))
        assert not np.array_equal(sitk.GetArrayFromImage(lab_a), sitk.GetArrayFromImage(lab_b))


def test_rewriting_replaces_files(tmp_path):
    path = _make(tmp_path, 2, seed=1)
    again = _make(tmp_path, 2, seed=2)
    assert again == path
    assert not list(path.parent.rglob(".tmp-*"))


@pytest.mark.parametrize(
    "kwargs",
    [{"dim": 4}, {"dim": 1}, {"n_atlases": 0}, {"n_targets": -1}, {"size": 4}],
)
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, **{"dim": 2, **kwargs})


def test_top_level_manifest_describes_the_demo_dataset(tmp_path):
    """The repo's data_manifest.yaml is what `atlasseg demo` writes, seen from the repo root."""
    repo = pathlib.Path(__file__).resolve().parent.parent
    shipped = yaml.safe_load((repo / "data_manifest.yaml").read_text())
    written = yaml.safe_load(make_demo_dataset(tmp_path, dim=3, size=16).read_text())
    for section in ("atlases", "targets"):
        for entry in written[section]:
            entry.update({k: f"atlasseg-demo/data/{entry[k]}" for k in ("image", "labels")})
    assert shipped == written
