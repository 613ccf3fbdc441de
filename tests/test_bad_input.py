"""Bad input and faults (issue 6): every case ends done, done with a warning, or one line and exit 2."""

import gzip
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from atlasseg.cli import main
from atlasseg.demo import make_demo_dataset

IMAGE, LABELS = "images/case_001.nii.gz", "labels/case_001.nii.gz"
TARGET = "images/case_003.nii.gz"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_demo_dataset(
        tmp_path_factory.mktemp("bad") / "data", dim=2, n_atlases=2, n_targets=1, size=32, seed=3
    ).parent


def _edit(path: Path, change) -> None:
    """Rewrite an image file with ``change(array)`` applied to its voxels (geometry kept)."""
    image = sitk.ReadImage(str(path))
    out = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image)))
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))


def _point_manifest_at(data: Path, old: str, new: str) -> None:
    manifest = data / "data_manifest.yaml"
    manifest.write_text(manifest.read_text().replace(old, new))


def _truncate(data, name=IMAGE):
    raw = (data / name).read_bytes()
    (data / name).write_bytes(raw[: len(raw) // 2])


def _truncated_uncompressed(data):
    sitk.WriteImage(sitk.ReadImage(str(data / IMAGE)), str(data / "images/raw.nii"))
    _truncate(data, "images/raw.nii")
    _point_manifest_at(data, IMAGE, "images/raw.nii")


def _truncated_mask(data):
    shutil.copy(data / LABELS, data / "mask.nii.gz")
    _truncate(data, "mask.nii.gz")
    _point_manifest_at(data, f"labels: {LABELS}}}", f"labels: {LABELS}, mask: mask.nii.gz}}")


def _wrong_extension(data):
    os.replace(data / IMAGE, data / "images/case_001.png")
    _point_manifest_at(data, IMAGE, "images/case_001.png")


def _directory(data):
    (data / "images/folder.nii.gz").mkdir()
    _point_manifest_at(data, IMAGE, "images/folder.nii.gz")


def _four_d(data):
    volume = sitk.JoinSeries([sitk.ReadImage(str(data / IMAGE))] * 2)
    sitk.WriteImage(sitk.JoinSeries([volume] * 3), str(data / IMAGE))


def _vector(data):
    image = sitk.ReadImage(str(data / IMAGE))
    sitk.WriteImage(sitk.Compose(image, image, image), str(data / IMAGE))


def _mixed_dimensions(data):
    for name in (IMAGE, LABELS):
        image = sitk.ReadImage(str(data / name))
        sitk.WriteImage(sitk.JoinSeries([image] * 3), str(data / name))


def _set_voxel(value, name=IMAGE):
    def change(data):
        def put(array):
            array = array.astype(np.float32)
            array[5, 5] = value
            return array

        _edit(data / name, put)

    return change


def _nonfinite_mha(data):
    sitk.WriteImage(sitk.ReadImage(str(data / IMAGE)), str(data / "images/case_001.mha"))
    _set_voxel(np.inf, "images/case_001.mha")(data)  # not NIfTI: SimpleITK itself keeps the infinity
    _point_manifest_at(data, IMAGE, "images/case_001.mha")


def _shift_labels(offset):
    def change(data):
        labels = sitk.ReadImage(str(data / LABELS))
        labels.SetOrigin(tuple(o + offset for o in labels.GetOrigin()))
        sitk.WriteImage(labels, str(data / LABELS))

    return change


CASES = [
    ("missing file", lambda d: (d / IMAGE).unlink(), "case_001': image file not found"),
    ("truncated .nii.gz", _truncate, "case_001.nii.gz: truncated or corrupt NIfTI file"),
    ("truncated .nii", _truncated_uncompressed, "raw.nii: truncated or corrupt NIfTI file"),
    (
        "random bytes",
        lambda d: (d / IMAGE).write_bytes(np.random.default_rng(0).bytes(4000)),
        "case_001.nii.gz: cannot read image (no reader recognises it: damaged, not an image, or a wrong extension",
    ),
    (
        "random gzip",
        lambda d: (d / IMAGE).write_bytes(gzip.compress(np.random.default_rng(0).bytes(4000))),
        "case_001.nii.gz: cannot read image (no reader recognises it",
    ),
    ("wrong extension", _wrong_extension, "case_001.png: cannot read image (no reader recognises it"),
    ("truncated mask", _truncated_mask, "mask.nii.gz: truncated or corrupt NIfTI file"),
    ("empty file", lambda d: (d / IMAGE).write_bytes(b""), "case_001.nii.gz: file is empty"),
    ("directory", _directory, "folder.nii.gz: is a directory holding no DICOM series"),
    ("4D image", _four_d, "is 4D (size (32, 32, 2, 3)); 2D and 3D images are supported (extract one volume first)"),
    ("vector image", _vector, "has 3 components per voxel; a scalar image is needed (extract one channel first)"),
    ("2D with 3D", _mixed_dimensions, "mixes 2D images"),
    ("NaN in NIfTI", _set_voxel(np.nan), "case_001.nii.gz: holds 1 NaN or infinite intensities"),
    ("Inf in NIfTI", _set_voxel(-np.inf), "case_001.nii.gz: holds 1 NaN or infinite intensities"),
    ("Inf in MetaImage", _nonfinite_mha, "case_001.mha: holds 1 NaN or infinite intensities"),
    (
        "constant image",
        lambda d: _edit(d / TARGET, lambda a: np.full_like(a, 7.0)),
        "case_003.nii.gz: every voxel is 7 (a constant image has nothing to register)",
    ),
    ("labels on another grid", _shift_labels(0.5), "label map grid (size (32, 32), spacing (4.5, 4.5), origin"),
    ("float labels", lambda d: _edit(d / LABELS, lambda a: a.astype(np.float32) + 0.5), "holds non-integer values"),
    (
        "negative labels",
        lambda d: _edit(d / LABELS, lambda a: np.where(a == 4, -4, a.astype(np.int16))),
        "case_001.nii.gz: label map holds negative values (-4); labels must be >= 0",
    ),
    ("empty atlas labels", lambda d: _edit(d / LABELS, np.zeros_like), "label map of atlas 'case_001' is empty"),
]


@pytest.mark.parametrize("make, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_file_is_one_line_and_exit_2_before_any_work(data, capsys, make, needle):
    make(data)
    out = data / "out"
    argv = ["run", "demo", "--manifest", str(data / "data_manifest.yaml"), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("atlasseg: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert needle in err
    assert not out.exists()  # refused before any work: nothing written


def _noise(data):
    labels = sitk.ReadImage(str(data / LABELS))
    labels.SetOrigin(tuple(o + 1e-3 for o in labels.GetOrigin()))  # 0.02 % of a 4.5 mm voxel
    direction = np.array(labels.GetDirection())
    direction[1] += 1e-5
    labels.SetDirection(direction)
    sitk.WriteImage(labels, str(data / LABELS))


WARNINGS = [
    ("grid noise snapped", _noise, "labels/case_001.nii.gz: grid differs from its image"),
    (
        "declared label absent",
        lambda d: _point_manifest_at(d, "5: band", "5: band, 9: ghost"),
        "atlas 'case_001' lacks declared labels 9 (ghost)",
    ),
    ("undeclared label", lambda d: _point_manifest_at(d, ", 5: band", ""), "holds labels [5] not declared in"),
    (
        "empty ground truth",
        lambda d: _edit(d / "labels/case_003.nii.gz", np.zeros_like),
        "ground truth of target 'case_003' is empty",
    ),
    ("k above the atlas count", lambda d: None, "selection.k is 5 but"),
]


@pytest.mark.parametrize("make, needle", [c[1:] for c in WARNINGS], ids=[c[0] for c in WARNINGS])
def test_suspicious_input_is_validated_with_a_warning(data, caplog, make, needle):
    make(data)
    with caplog.at_level(logging.WARNING, logger="atlasseg"):
        assert main(["validate", "demo", "--manifest", str(data / "data_manifest.yaml")]) == 0
    assert needle in caplog.text


def test_the_default_k_above_the_atlas_count_is_no_warning(data, caplog):
    with caplog.at_level(logging.INFO, logger="atlasseg"):
        assert main(["validate", "default", "--manifest", str(data / "data_manifest.yaml")]) == 0
    said = [r for r in caplog.records if "selection.k is 10 but" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]


def test_grid_noise_is_snapped_and_the_run_completes(data, caplog, tmp_path):
    _noise(data)  # an atlas's labels, and the target's ground truth:
    truth = sitk.ReadImage(str(data / "labels/case_003.nii.gz"))
    truth.SetOrigin(tuple(o - 1e-3 for o in truth.GetOrigin()))
    sitk.WriteImage(truth, str(data / "labels/case_003.nii.gz"))
    argv = [
        "run",
        "baseline",
        "--manifest",
        str(data / "data_manifest.yaml"),
        "--out",
        str(tmp_path / "out"),
        "--set",
        "parallel.n_jobs=1",
    ]
    with caplog.at_level(logging.WARNING, logger="atlasseg"):
        assert main(argv) == 0
    assert caplog.text.count("snapped onto the image's grid") == 2
    assert json.loads((tmp_path / "out" / "run.json").read_text())["targets"]["case_003"]["mean_dice"] > 0.3
    segmentation = sitk.ReadImage(str(tmp_path / "out" / "case_003" / "segmentation.nii.gz"))
    assert segmentation.GetOrigin() == sitk.ReadImage(str(data / TARGET)).GetOrigin()


def test_a_run_that_would_exceed_memory_is_refused_with_the_estimate(data, capsys, monkeypatch):
    manifest = str(data / "data_manifest.yaml")
    monkeypatch.setattr("atlasseg.parallel.available_cores", lambda: 4)
    monkeypatch.setenv("ATLASSEG_MEMORY_LIMIT", "64K")
    _truncate(data, TARGET)  # the estimate comes from headers, before any voxel is read
    assert main(["validate", "demo", "--manifest", manifest, "--set", "parallel.n_jobs=2"]) == 2
    err = capsys.readouterr().err
    assert (
        "images of 32 x 32 voxels would need about 0.4 MiB (2 parallel registration(s) and fusion) but 0.1 MiB" in err
    )
    assert "crop or downsample the images, lower parallel.n_jobs" in err and err.count("\n") == 1
    monkeypatch.setenv("ATLASSEG_MEMORY_LIMIT", "1G")
    assert main(["validate", "demo", "--manifest", manifest, "--set", "parallel.n_jobs=2"]) == 2
    assert "case_003.nii.gz: truncated or corrupt NIfTI file" in capsys.readouterr().err


def test_jlf_without_room_for_its_candidates_is_refused_before_any_work(data, capsys, monkeypatch, tmp_path):
    import shutil
    import tempfile
    from types import SimpleNamespace

    from atlasseg.fusion import JointLabelFusion

    monkeypatch.setattr(JointLabelFusion, "_SLAB_BYTES", 1000)  # too many to keep in memory
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    assert main(["validate", "demo", "--manifest", str(data / "data_manifest.yaml"), "--set", "fusion.method=jlf"]) == 2
    err = capsys.readouterr().err
    assert f"joint label fusion keeps its candidates in {tmp_path}: about" in err and "set TMPDIR" in err
    assert err.count("\n") == 1
    assert (
        main(["validate", "demo", "--manifest", str(data / "data_manifest.yaml"), "--set", "fusion.method=majority"])
        == 0
    )
    monkeypatch.setattr(JointLabelFusion, "_SLAB_BYTES", 2**28)  # candidates that fit in memory need no disk
    assert main(["validate", "demo", "--manifest", str(data / "data_manifest.yaml"), "--set", "fusion.method=jlf"]) == 0


def test_memory_estimate_of_a_large_scan_exceeds_a_small_machine(monkeypatch):
    from atlasseg.config import load_config
    from atlasseg.imageio import Geometry
    from atlasseg.pipeline.checks import available_memory, estimate_memory

    scan = Geometry((512, 512, 400), (0.5, 0.5, 0.6), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    config = load_config("default", overrides=["parallel.n_jobs=1", "fusion.method=majority"])
    total, per_job, jobs = estimate_memory(scan, config, n_tasks=10, n_labels=5)
    assert jobs == 1 and 20 * 2**30 < per_job <= total < 30 * 2**30  # 25 GiB: more than most workstations
    # joint label fusion adds a few arrays of the grid and one slab of its candidates, whatever their number
    jlf = load_config("default", overrides=["parallel.n_jobs=1", "fusion.method=jlf"])
    extra = estimate_memory(scan, jlf, n_tasks=10, n_labels=5)[0] - total
    assert extra == 24 * 512 * 512 * 400 + 2**28
    assert (
        estimate_memory(scan, jlf, n_tasks=100, n_labels=5)[0]
        - estimate_memory(scan, config, n_tasks=100, n_labels=5)[0]
        == extra
    )
    monkeypatch.delenv("ATLASSEG_MEMORY_LIMIT", raising=False)
    assert 0 < available_memory()
    monkeypatch.setenv("ATLASSEG_MEMORY_LIMIT", "1.5T")
    assert available_memory() == int(1.5 * 2**40)


def _run(data, out, *extra):
    return main(
        [
            "-q",
            "run",
            "baseline",
            "--manifest",
            str(data / "data_manifest.yaml"),
            "--out",
            str(out),
            "--set",
            "parallel.n_jobs=1",
            *extra,
        ]
    )


def test_output_folder_that_cannot_be_written_is_refused_before_any_work(source, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert _run(source, tmp_path / "a_file" / "out") == 2
    err = capsys.readouterr().err
    assert "a_file/out: output folder is not writable (Not a directory); choose another --out" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("writer", ["image", "text"])
def test_disk_full_mid_write_fails_cleanly_and_keeps_previous_outputs(source, tmp_path, capsys, monkeypatch, writer):
    """The device fills up while a forced re-run writes: the exit code says so, and every file the first
    run wrote is still whole (an image write fails the target, reported in run.json; a text write fails
    run.json itself, which stops the run)."""
    import errno

    import atlasseg.imageio

    out = tmp_path / "out"
    assert _run(source, out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {p.name for p in before} == {
        "segmentation.nii.gz",
        "target.json",
        "metrics.csv",
        "run.json",
        "qc.png",
        "index.html",
        "disagreement.nii.gz",
        "viewer.js",
        "niivue.umd.js",
        "LICENSE-niivue.txt",
    }
    capsys.readouterr()

    def full(*args, **kwargs):
        if writer == "image":  # half a file reaches the disk, then the device is full
            Path(args[1]).write_bytes(b"\x1f\x8b partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if writer == "image":
        monkeypatch.setattr(atlasseg.imageio.sitk, "WriteImage", full)
    else:
        monkeypatch.setattr(atlasseg.imageio.os, "fsync", full)
    assert _run(source, out, "--force") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    if writer == "image":
        assert "1 of 1 target(s) failed (case_003); reasons in" in err
        reason = json.loads((out / "run.json").read_text())["targets"]["case_003"]["error"]
        assert "segmentation.nii.gz: cannot write image (No space left on device); free some space" in reason
        rewritten = ("metrics.csv", "run.json", "index.html")  # they report this run: its target failed
        after = {p: data for p, data in after.items() if p.name not in rewritten}
        before = {p: data for p, data in before.items() if p.name not in rewritten}
    else:
        assert "run.json: cannot write file (No space left on device); free some space" in err
    assert after == before  # intact, no temporary left


def test_output_folder_of_another_config_is_refused_unless_forced(source, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    assert _run(source, out) == 0
    assert _run(source, out, "--set", "output.dir=elsewhere") == 0  # output.dir is not part of the comparison
    capsys.readouterr()
    first = (out / "case_003" / "segmentation.nii.gz").read_bytes()
    assert _run(source, out, "--set", "fusion.method=staple") == 2
    err = capsys.readouterr().err
    assert f"{out}: holds outputs of a different config (fusion.method: 'majority' -> 'staple'); " in err
    assert "choose another --out, or --force" in err and err.count("\n") == 1
    assert (out / "case_003" / "segmentation.nii.gz").read_bytes() == first
    with caplog.at_level(logging.WARNING, logger="atlasseg"):
        assert _run(source, out, "--set", "fusion.method=staple", "--force") == 0
    assert "writing over them (--force)" in caplog.text
    assert json.loads((out / "run.json").read_text())["config"]["fusion"]["method"] == "staple"


def test_a_folder_holding_other_files_is_not_written_into(source, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert _run(source, tmp_path) == 2
    assert "holds files but no run.json" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _reoriented(image: sitk.Image, axes, flips) -> sitk.Image:
    """The same physical content stored with permuted and flipped array axes: new axis ``a`` runs along old
    axis ``axes[a]``, backwards where ``flips[a]``. Voxel centres coincide, so nearest neighbour copies exactly."""
    dim = image.GetDimension()
    turn = np.zeros((dim, dim))
    for new, (old, flip) in enumerate(zip(axes, flips)):
        turn[old, new] = -1.0 if flip else 1.0
    corner = [
        image.GetSize()[old] - 1 if flip else 0
        for old, flip in zip(range(dim), [flips[list(axes).index(o)] for o in range(dim)])
    ]
    grid = sitk.Image([image.GetSize()[old] for old in axes], image.GetPixelID())
    grid.SetSpacing([image.GetSpacing()[old] for old in axes])
    grid.SetDirection((np.array(image.GetDirection()).reshape(dim, dim) @ turn).ravel().tolist())
    grid.SetOrigin(image.TransformIndexToPhysicalPoint(corner))
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())


def _oblique(image: sitk.Image, degrees: float, *, labels: bool) -> sitk.Image:
    """``image`` resampled onto a grid turned by ``degrees`` about its centre (same spacing, a larger field)."""
    angle = np.deg2rad(degrees)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    size = [int(n * 1.4) for n in image.GetSize()]
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    grid = sitk.Image(size, image.GetPixelID())
    grid.SetSpacing(image.GetSpacing())
    grid.SetDirection((np.array(image.GetDirection()).reshape(2, 2) @ turn).ravel().tolist())
    grid.SetOrigin(
        (centre - np.array(grid.GetDirection()).reshape(2, 2) @ ((np.array(size) - 1) / 2 * grid.GetSpacing())).tolist()
    )
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, 0, image.GetPixelID())


def test_targets_stored_in_other_orientations_are_segmented_the_same(tmp_path):
    """RAS vs LPS (both in-plane axes flipped), permuted axes and an oblique grid: handled in physical space,
    not array order."""
    manifest = make_demo_dataset(tmp_path / "data", dim=2, n_atlases=3, n_targets=1, size=64, seed=4)
    data = manifest.parent
    variants = {"ras": ((0, 1), (True, True)), "permuted": ((1, 0), (False, True))}
    lines = []
    for name, (axes, flips) in variants.items():
        for folder in ("images", "labels"):
            original = sitk.ReadImage(str(data / folder / "case_004.nii.gz"))
            moved = _reoriented(original, axes, flips)
            assert not np.array_equal(sitk.GetArrayViewFromImage(moved), sitk.GetArrayViewFromImage(original))
            sitk.WriteImage(moved, str(data / folder / f"{name}.nii.gz"))
        lines.append(f"- {{id: {name}, image: images/{name}.nii.gz, labels: labels/{name}.nii.gz}}")
    for folder in ("images", "labels"):  # resampled, unlike the two above: a little blur and staircase
        original = sitk.ReadImage(str(data / folder / "case_004.nii.gz"))
        sitk.WriteImage(_oblique(original, 25.0, labels=folder == "labels"), str(data / folder / "oblique.nii.gz"))
    lines.append("- {id: oblique, image: images/oblique.nii.gz, labels: labels/oblique.nii.gz}")
    manifest.write_text(manifest.read_text() + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = [
        "-q",
        "run",
        "demo",
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--set",
        "selection.k=2",
        "--set",
        "parallel.n_jobs=1",
        "--set",
        "parallel.itk_threads=1",
    ]  # the same numbers on any machine
    assert main(argv) == 0
    reference = sitk.ReadImage(str(out / "case_004" / "segmentation.nii.gz"))
    expected = sitk.GetArrayFromImage(reference)
    for name in (*variants, "oblique"):
        result = sitk.ReadImage(str(out / name / "segmentation.nii.gz"))
        np.testing.assert_allclose(
            result.GetDirection(), sitk.ReadImage(str(data / "images" / f"{name}.nii.gz")).GetDirection()
        )
        back = sitk.GetArrayFromImage(sitk.Resample(result, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        dice = [
            2 * np.sum((back == v) & (expected == v)) / (np.sum(back == v) + np.sum(expected == v)) for v in range(1, 6)
        ]
        if name == "oblique":  # two nearest-neighbour resamplings cost the nodule and the 3-voxel band most
            assert min(dice[:3]) >= 0.9 and np.mean(dice) >= 0.85, (name, dice)  # 0.93 and 0.90 at writing
        else:
            assert np.mean(dice) >= 0.95 and min(dice) >= 0.9, (name, dice)  # 0.97 and 0.96 at writing


def test_label_values_above_255_and_150_labels_survive_propagation_and_fusion(tmp_path):
    values = 1000 + 7 * np.arange(150)  # 1000 ... 2043: needs 16 bits
    labels = np.zeros((64, 64), np.uint16)
    for i, value in enumerate(values):
        row, col = divmod(i, 12)
        labels[2 + 5 * row : 6 + 5 * row, 2 + 5 * col : 6 + 5 * col] = value
    image = sitk.GetImageFromArray((labels % 97).astype(np.float32) + (labels > 0))
    names = {int(v): f"structure_{i}" for i, v in enumerate(values)}
    entries = []
    for case in ("a1", "a2", "a3", "t1"):
        sitk.WriteImage(image, str(tmp_path / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / f"{case}_seg.nii.gz"))
        entries.append({"id": case, "image": f"{case}.nii.gz", "labels": f"{case}_seg.nii.gz"})
    doc = {"labels": names, "atlases": entries[:3], "targets": entries[3:]}
    (tmp_path / "data_manifest.yaml").write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    argv = [
        "-q",
        "run",
        "baseline",
        "--manifest",
        str(tmp_path / "data_manifest.yaml"),
        "--out",
        str(out),
        "--set",
        "parallel.n_jobs=1",
    ]
    assert main(argv) == 0
    segmentation = sitk.ReadImage(str(out / "t1" / "segmentation.nii.gz"))
    assert segmentation.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(segmentation), labels)
    scores = json.loads((out / "run.json").read_text())["targets"]["t1"]["scores"]
    assert len(scores) == 150 and all(s["dice"] == 1.0 for s in scores.values())


@pytest.mark.parametrize(
    "make, needle",
    [
        (_set_voxel(np.nan, TARGET), "case_003.nii.gz: holds 1 NaN"),
        (lambda d: _truncate(d, TARGET), "case_003.nii.gz: truncated or corrupt"),
    ],
    ids=["NaN", "truncated"],
)
def test_register_checks_its_two_images_first(data, tmp_path, capsys, make, needle):
    make(data)
    argv = ["register", str(data / TARGET), str(data / IMAGE), "--config", "demo", "--out", str(tmp_path / "pair")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "pair").exists()


def _moved_origin(offset):
    def change(path):
        labels = sitk.ReadImage(str(path))
        labels.SetOrigin(tuple(o + offset for o in labels.GetOrigin()))
        sitk.WriteImage(labels, str(path))

    return change


@pytest.mark.parametrize(
    "make, code, needle",
    [
        (lambda p: _truncate(p.parent, p.name), 2, "truth.nii.gz: truncated or corrupt NIfTI file"),
        (_moved_origin(0.5), 2, "truth.nii.gz: label map grid (size (32, 32), spacing (4.5, 4.5), origin"),
        (_moved_origin(1e-3), 0, ""),  # floating-point noise: snapped
    ],
    ids=["truncated", "another grid", "grid noise"],
)
def test_evaluate_checks_both_label_maps(data, capsys, make, code, needle):
    truth = data / "labels" / "truth.nii.gz"
    shutil.copy(data / LABELS, truth)
    make(truth)
    assert main(["evaluate", str(data / LABELS), str(truth)]) == code
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == (code == 2)


def test_outputs_get_the_usual_file_permissions(tmp_path):
    """Atomic writes go through a private (0600) temporary file; the file in place has the mode a new file gets."""
    from atlasseg.imageio import atomic_write_text, write_image

    atomic_write_text(tmp_path / "a.json", "{}")
    write_image(sitk.Image(4, 4, sitk.sitkUInt8), tmp_path / "a.nii.gz")
    with open(tmp_path / "plain", "w"):
        pass
    usual = (tmp_path / "plain").stat().st_mode & 0o777
    assert usual & 0o044  # the group and others may read (a umask of 022 or 002, as test machines have)
    assert {(tmp_path / name).stat().st_mode & 0o777 for name in ("a.json", "a.nii.gz")} == {usual}
