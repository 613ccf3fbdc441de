"""The Python API: atlasseg.segment / register / evaluate on paths, SimpleITK images and nibabel images."""

import logging
import subprocess
import sys

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import texture, warp

import atlasseg
from atlasseg.config import Config, load_config
from atlasseg.demo import make_demo_dataset
from atlasseg.manifest import load_manifest

FAST = ["parallel.n_jobs=1", "selection.k=2"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return load_manifest(
        make_demo_dataset(tmp_path_factory.mktemp("api"), dim=2, n_atlases=3, n_targets=1, seed=2, size=48)
    )


def as_array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def test_segment_gives_the_same_result_from_paths_sitk_and_nibabel_images(manifest):
    target = manifest.targets[0]
    by_path = atlasseg.segment(
        target.image,
        [(a.image, a.labels) for a in manifest.atlases],
        "demo",
        overrides=FAST,
        truth=target.labels,
        label_names=manifest.label_names,
    )
    read = sitk.ReadImage
    in_memory = atlasseg.segment(
        read(str(target.image)),
        {a.id: (read(str(a.image)), read(str(a.labels))) for a in manifest.atlases},
        "demo",
        overrides=FAST,
        truth=read(str(target.labels)),
    )
    load = nibabel.load
    nib = atlasseg.segment(
        load(target.image),
        [(load(a.image), load(a.labels)) for a in manifest.atlases],
        load_config("demo", overrides=FAST),
    )
    mixed = atlasseg.segment(
        target.image, [(read(str(a.image)), a.labels) for a in manifest.atlases], "demo", overrides=FAST
    )  # an atlas's labels on the grid of an image held in memory
    reference = read(str(target.image))
    for result in (by_path, in_memory, nib, mixed):
        labels = result.labels
        assert labels.GetSize() == reference.GetSize() and labels.GetOrigin() == reference.GetOrigin()
        assert labels.GetSpacing() == reference.GetSpacing() and labels.GetDirection() == reference.GetDirection()
        np.testing.assert_array_equal(as_array(labels), as_array(by_path.labels))
    record = by_path.record
    assert record["mean_dice"] > 0.8 and len(record["selected"]) == 2 and record["config"]["selection"]["k"] == 2
    assert record["image"] == str(target.image) and record["atlases"]["atlas_0"][1] == str(manifest.atlases[0].labels)
    assert in_memory.record["mean_dice"] == record["mean_dice"]
    assert in_memory.record["image"] == "<SimpleITK.SimpleITK.Image>" and set(in_memory.record["atlases"]) == {
        a.id for a in manifest.atlases
    }
    assert "scores" not in nib.record and nib.record["image"].endswith("Nifti1Image>")
    scored = atlasseg.evaluate(by_path.labels, target.labels)  # one kind of label key in both: the value, an int
    assert set(record["scores"]) == set(scored) and all(isinstance(v, int) for v in record["scores"])
    assert record["scores"][1]["dice"] == pytest.approx(scored[1]["dice"])


def test_segment_keeps_outputs_when_asked(manifest, tmp_path):
    target = manifest.targets[0]
    atlases = [(a.image, a.labels) for a in manifest.atlases]
    seg, _ = atlasseg.segment(
        target.image,
        atlases,
        {"parallel": {"n_jobs": 1}, "output": {"save_transforms": True}},
        overrides=["selection.k=1"],
        target_id="t7",
        out_dir=tmp_path,
    )
    np.testing.assert_array_equal(as_array(sitk.ReadImage(str(tmp_path / "t7" / "segmentation.nii.gz"))), as_array(seg))
    assert len(list((tmp_path / "t7" / "transforms").glob("*.h5"))) == 1


def test_segment_computes_in_memory_and_writes_nothing_without_out_dir(manifest, monkeypatch):
    """In-memory inputs are checked, fused and scored as held: the main process reads no file and writes no result
    (the registrations' jobs, here in this process, read the files written for worker processes)."""
    from atlasseg.pipeline import outputs, sources

    def no_io(*args, **kwargs):
        raise AssertionError("a file read or a result written")

    read = sitk.ReadImage
    target, truth = read(str(manifest.targets[0].image)), read(str(manifest.targets[0].labels))
    atlases = [(read(str(a.image)), read(str(a.labels))) for a in manifest.atlases]
    with monkeypatch.context() as patched:
        for module, names in (
            (sources, ("read_geometry", "read_voxels", "read_image", "read_labels", "atlas_labels", "load_normalized")),
            (outputs, ("write_image", "save_transform")),
        ):
            for name in names:
                patched.setattr(module, name, no_io)
        seg, record = atlasseg.segment(target, atlases, "demo", overrides=FAST, truth=truth)
    assert seg.GetOrigin() == target.GetOrigin() and record["mean_dice"] > 0.8
    nan = sitk.Image(target)
    nan[3, 4] = float("nan")
    with pytest.raises(atlasseg.ImageError, match=r"^target\.image: holds 1 NaN or infinite intensities"):
        atlasseg.segment(nan, atlases, "demo", overrides=FAST)


def test_register_recovers_a_known_translation():
    big, big_labels = texture(dim=2, size=64, spacing=2.0, seed=3)
    shift = (4.0, -2.0)  # whole voxels: nearest-neighbour labels do not hinge on a half-voxel tie
    crop = (slice(8, 56),) * 2  # both images cut from a larger one: no zero padding at their borders
    fixed, labels = big[crop], big_labels[crop]
    moving = warp(big, sitk.TranslationTransform(2, shift))[crop]  # moving(y) = fixed(y + shift)
    moving_labels = warp(big_labels, sitk.TranslationTransform(2, shift), labels=True)[crop]
    result = atlasseg.register(
        fixed,
        moving,
        "default",
        labels=moving_labels,
        overrides=["registration.affine.stages=[translation]", "registration.nonrigid.enabled=false"],
    )
    for point in [(0.0, 0.0), (10.0, -12.0), (-20.0, 6.0)]:  # fixed point x maps to x - shift
        np.testing.assert_allclose(np.subtract(result.transform.TransformPoint(point), point), [-4.0, 2.0], atol=0.05)
    inside = (slice(4, -4),) * 2
    np.testing.assert_allclose(as_array(result.warped)[inside], as_array(fixed)[inside], atol=0.05)
    agree = np.mean(as_array(result.warped_labels)[inside] == as_array(labels)[inside])
    assert agree > 0.98 and result.record["status"] == "ok" and set(result.record["registration"]) == {"affine"}


def test_register_returns_in_memory_what_it_writes_with_out_dir(tmp_path, monkeypatch):
    """Without ``out_dir`` no result is written (and none read back); with it the files hold what is returned."""
    from atlasseg.pipeline import pair

    fixed, labels = texture(dim=2, size=32, spacing=2.0, seed=4)
    moving = warp(fixed, sitk.TranslationTransform(2, (2.0, 0.0)))
    overrides = ["registration.affine.stages=[translation]", "registration.nonrigid.enabled=false"]

    def no_writing(*args, **kwargs):
        raise AssertionError("a result written")

    with monkeypatch.context() as patched:
        for writer in ("write_image", "write_json", "save_transform", "save_displacement_field"):
            patched.setattr(pair, writer, no_writing)
        memory = atlasseg.register(fixed, moving, "default", labels=labels, overrides=overrides)
    assert memory.warped.GetOrigin() == fixed.GetOrigin() and memory.warped.GetSpacing() == fixed.GetSpacing()
    kept = atlasseg.register(fixed, moving, "default", labels=labels, overrides=overrides, out_dir=tmp_path / "out")
    assert memory.transform.GetParameters() == kept.transform.GetParameters()
    np.testing.assert_array_equal(
        as_array(sitk.ReadImage(str(tmp_path / "out" / "warped.nii.gz"))), as_array(memory.warped)
    )
    np.testing.assert_array_equal(as_array(kept.warped_labels), as_array(memory.warped_labels))
    assert set(memory.record) == set(kept.record) and memory.record["status"] == kept.record["status"] == "ok"


def test_evaluate_in_memory_equals_from_files(manifest):
    truth = manifest.targets[0].labels
    shifted = sitk.ReadImage(str(truth))
    shifted = sitk.Resample(shifted, shifted, sitk.TranslationTransform(2, (3.0, 0.0)), sitk.sitkNearestNeighbor, 0)
    scores = atlasseg.evaluate(shifted, truth, labels=[1, 4], metrics=["dice", "hd95"])
    assert set(scores) == {1, 4} and set(scores[1]) == {"dice", "hd95"} and 0.5 < scores[1]["dice"] < 1.0
    assert atlasseg.evaluate(nibabel.load(truth), sitk.ReadImage(str(truth)))[1]["dice"] == 1.0


@pytest.mark.parametrize(
    "call, error, needle",
    [
        (lambda m: atlasseg.segment(m.targets[0].image, []), atlasseg.ImageError, "atlases: none given"),
        (
            lambda m: atlasseg.segment(m.targets[0].image, [m.atlases[0].image]),
            atlasseg.ImageError,
            "atlas 'atlas_0': expected a pair",
        ),
        (
            lambda m: atlasseg.segment(42, [(m.atlases[0].image, m.atlases[0].labels)]),
            atlasseg.ImageError,
            "target.image: expected a file path, a SimpleITK.Image or a nibabel image, got int",
        ),
        (
            lambda m: atlasseg.segment(m.targets[0].image, [("nowhere.nii.gz", m.atlases[0].labels)]),
            atlasseg.ManifestError,
            "segment(): atlas 'atlas_0': image file not found",
        ),
        (
            lambda m: atlasseg.segment(m.targets[0].image, {"a b": (m.atlases[0].image, m.atlases[0].labels)}),
            atlasseg.ManifestError,
            "id 'a b' may only hold",
        ),
        (
            lambda m: atlasseg.segment(
                m.targets[0].image,
                [(sitk.ReadImage(str(m.atlases[0].image)), sitk.ReadImage(str(m.atlases[1].labels)))],
            ),
            atlasseg.ImageError,
            "atlas_0.labels: label map grid (size",
        ),
        (
            lambda m: atlasseg.register(m.targets[0].image, m.atlases[0].image, 3.5),
            atlasseg.ConfigError,
            "config: expected a Config",
        ),
        (
            lambda m: atlasseg.register(m.targets[0].image, m.atlases[0].image, {"fusion": {"method": "best"}}),
            atlasseg.ConfigError,
            "config: fusion.method: expected",
        ),
        (
            lambda m: atlasseg.register(m.targets[0].image, sitk.Image([8, 8], sitk.sitkFloat32)),
            atlasseg.ImageError,
            "moving: every voxel is 0",
        ),
    ],
)
def test_bad_input_is_one_error_naming_the_input(manifest, call, error, needle):
    with pytest.raises(error) as caught:
        call(manifest)
    assert needle in str(caught.value) and "atlasseg-" not in str(caught.value)


def test_warnings_name_in_memory_inputs_by_role(manifest, caplog, capfd):
    images = [(sitk.ReadImage(str(a.image)), sitk.ReadImage(str(a.labels))) for a in manifest.atlases[:1]]
    with caplog.at_level(logging.WARNING, logger="atlasseg"):
        atlasseg.segment(
            sitk.ReadImage(str(manifest.targets[0].image)),
            images,
            "demo",
            overrides=["parallel.n_jobs=1", "selection.k=2"],
            label_names={1: "head"},
        )
    assert "selection.k is 2 but segment() lists 1 atlases" in caplog.text
    assert "atlas_0.labels: atlas 'atlas_0' holds labels [2, 3, 4, 5] not declared" in caplog.text
    assert "atlasseg-" not in caplog.text
    assert "WARNING" not in capfd.readouterr().err  # ITK's, for NIfTI header fields MetaImage cannot hold


def test_config_may_be_a_config_a_preset_a_path_or_a_dict(tmp_path):
    (tmp_path / "mine.yaml").write_text("fusion: {method: staple}\n")
    assert atlasseg.resolve_config() == Config()
    assert atlasseg.resolve_config("fast") == load_config("fast")
    assert atlasseg.resolve_config(tmp_path / "mine.yaml").fusion.method == "staple"
    given = {"fusion": {"method": "jlf"}}
    assert atlasseg.resolve_config(given, ["fusion.sigma=3"]).fusion.sigma == 3.0 and given == {
        "fusion": {"method": "jlf"}
    }
    assert atlasseg.resolve_config(Config(), ["selection.k=4"]).selection.k == 4


def test_import_atlasseg_is_cheap_and_the_api_is_typed_and_documented():
    code = "import sys, atlasseg; print('SimpleITK' in sys.modules, 'atlasseg.api' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == [
        "False",
        "False",
    ]
    for name in ("segment", "register", "evaluate", "resolve_config"):
        function = getattr(atlasseg, name)
        assert function.__doc__ and "return" in function.__annotations__ and name in dir(atlasseg)
