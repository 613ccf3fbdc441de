"""Hostile and malformed inputs (issue 18, classes 2-9): one line and exit 2 up front, a warning, or a correct run."""

import dataclasses
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import typing
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from atlasseg import config as config_module
from atlasseg.cli import main
from atlasseg.demo import make_demo_dataset
from atlasseg.manifest import RESERVED_IDS

TARGET = "images/case_003.nii.gz"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny 3D dataset: two atlases and a target with ground truth."""
    return make_demo_dataset(
        tmp_path_factory.mktemp("hostile") / "data", dim=3, n_atlases=2, n_targets=1, size=16, seed=5
    ).parent


def _retarget(data: Path, name: str) -> Path:
    """Point the manifest's target (image and labels) at ``images/<name>`` (its labels left out); returns that path."""
    manifest = data / "data_manifest.yaml"
    manifest.write_text(
        manifest.read_text().replace(f"image: {TARGET}, labels: labels/case_003.nii.gz", f"image: images/{name}")
    )
    return data / "images" / name


def _validate(data: Path, *extra: str) -> int:
    return main(["validate", "default", "--manifest", str(data / "data_manifest.yaml"), *extra])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("atlasseg: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- 2: geometry headers


def _nifti_pixdim(value):
    def make(image: sitk.Image, path: Path) -> None:
        sitk.WriteImage(image, str(path))  # uncompressed: pixdim[2] is the float32 at byte 84
        raw = bytearray(path.read_bytes())
        struct.pack_into("<f", raw, 84, value)
        path.write_bytes(bytes(raw))

    return make, "t.nii", "pixdim"


def _header_text(old: bytes, new: bytes, name: str, field: str):
    def make(image: sitk.Image, path: Path) -> None:
        sitk.WriteImage(image, str(path), useCompression=False)
        raw = path.read_bytes()
        assert old in raw
        path.write_bytes(raw.replace(old, new, 1))

    return make, name, field


def _mgh_delta(value):
    def make(image: sitk.Image, path: Path) -> None:
        from atlasseg.nibabel_io import to_nibabel

        nibabel.save(to_nibabel(image, nibabel.MGHImage), str(path))  # uncompressed: delta[1] at byte 34
        raw = bytearray(path.read_bytes())
        struct.pack_into(">f", raw, 34, value)
        path.write_bytes(bytes(raw))

    return make, "t.mgh", "delta"


HEADERS = {
    "NIfTI pixdim 0": _nifti_pixdim(0.0),
    "NIfTI pixdim NaN": _nifti_pixdim(float("nan")),
    "NIfTI pixdim negative": _nifti_pixdim(-1.0),
    "MHA spacing 0": _header_text(b"ElementSpacing = 1 1 1", b"ElementSpacing = 1 0 1", "t.mha", "ElementSpacing"),
    "MHA spacing negative": _header_text(
        b"ElementSpacing = 1 1 1", b"ElementSpacing = 1 -1 1", "t.mha", "ElementSpacing"
    ),
    "MHA spacing NaN": _header_text(b"ElementSpacing = 1 1 1", b"ElementSpacing = 1 nan 1", "t.mha", "ElementSpacing"),
    "MHA sheared": _header_text(
        b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0.4 0 0 1 0 0 0 1", "t.mha", "TransformMatrix"
    ),
    "NRRD spacing 0": _header_text(b"(0,1,0)", b"(0,0,0)", "t.nrrd", "space directions"),
    "NRRD sheared": _header_text(b"(0,1,0)", b"(0.5,1,0)", "t.nrrd", "space directions"),
    "MGZ delta negative": _mgh_delta(-1.0),
    "MGZ delta 0": _mgh_delta(0.0),
}


@pytest.mark.parametrize("case", HEADERS.values(), ids=HEADERS.keys())
def test_unphysical_geometry_header_is_one_line_naming_file_and_field(data, capsys, case):
    make, name, field = case
    image = sitk.ReadImage(str(data / TARGET))
    image.SetSpacing((1.0, 1.0, 1.0))
    image.SetOrigin((0.0, 0.0, 0.0))
    make(image, _retarget(data, name))
    assert _validate(data) == 2
    err = _one_line(capsys)
    assert f"images/{name}: header field {field}" in err


def test_run_refuses_a_zero_spacing_before_any_work(data, capsys, tmp_path):
    make, name, _ = HEADERS["NIfTI pixdim 0"]
    make(sitk.ReadImage(str(data / TARGET)), _retarget(data, name))
    out = tmp_path / "out"
    assert main(["run", "default", "--manifest", str(data / "data_manifest.yaml"), "--out", str(out)]) == 2
    assert "header field pixdim gives voxel spacing 0 along axis 1" in _one_line(capsys)
    assert not out.exists()


# --------------------------------------------------------------------------- 3: too thin for the pyramid


def test_a_single_slice_3d_image_is_refused_up_front_with_what_to_do(data, capsys):
    image = sitk.ReadImage(str(data / TARGET))
    sitk.WriteImage(image[:, :, 5:6], str(_retarget(data, "slice.nii.gz")))
    assert _validate(data) == 2
    err = _one_line(capsys)
    assert "slice.nii.gz: 1 voxel(s) along axis 2" in err and "save it as a 2D image" in err


def test_an_axis_shorter_than_a_nonrigid_shrink_factor_is_refused(data, capsys):
    image = sitk.ReadImage(str(data / TARGET))
    sitk.WriteImage(image[:, :, 2:8], str(_retarget(data, "slab.nii.gz")))
    assert _validate(data) == 0  # 6 voxels: enough for the default pyramid
    capsys.readouterr()
    assert _validate(data, "--set", "registration.nonrigid.shrink_factors=[8,1]") == 2
    assert "slab.nii.gz: 6 voxels along axis 2" in _one_line(capsys)


def test_the_pyramid_check_asks_the_shrink_factors_each_image_gets(data, capsys, monkeypatch):
    from atlasseg.pipeline import checks

    monkeypatch.setattr(checks, "level_shrinks", lambda stage, size, spacing: [(1, 1, 16)] * len(stage.shrink_factors))
    assert _validate(data) == 2
    assert "fewer than the shrink factor 16 of registration.nonrigid level 0" in _one_line(capsys)


# --------------------------------------------------------------------------- 4: YAML alias bombs


def _bomb(levels: int = 7) -> str:
    """A flow sequence whose aliases nest ``levels`` deep: 9**levels leaves once expanded, from a few lines."""
    parts = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    parts += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def test_alias_bomb_in_a_config_section_is_refused_quickly_in_one_short_line(data, tmp_path, capsys):
    config = tmp_path / "bomb.yaml"
    config.write_text(f"selection:\n  metric: {_bomb()}\n")
    start = time.perf_counter()
    assert main(["validate", str(config), "--manifest", str(data / "data_manifest.yaml")]) == 2
    assert time.perf_counter() - start < 5
    err = _one_line(capsys)
    assert "bomb.yaml: invalid YAML at line 2" in err and "alias" in err and len(err) < 400


def test_alias_bomb_in_the_manifest_label_names_is_refused(data, capsys):
    manifest = data / "data_manifest.yaml"
    manifest.write_text(manifest.read_text().replace("1: head", f"1: {_bomb()}"))
    assert _validate(data) == 2
    err = _one_line(capsys)
    assert "data_manifest.yaml: invalid YAML" in err and "alias" in err and len(err) < 400


def test_a_few_aliases_are_fine_and_long_values_are_cut_in_messages(data, tmp_path, capsys):
    config = tmp_path / "aliases.yaml"
    config.write_text(
        "registration:\n  affine: {smoothing_sigmas: &s [1.0, 0.0]}\n  nonrigid: {smoothing_sigmas: *s}\n"
    )
    assert config_module.load_config(config).registration.nonrigid.smoothing_sigmas == (1.0, 0.0)
    config.write_text(f"selection: {{metric: {list(range(5000))}}}\n")  # no alias, but a long wrong value
    assert main(["validate", str(config), "--manifest", str(data / "data_manifest.yaml")]) == 2
    assert "selection.metric: expected 'ncc' or 'mi' or 'mse' or 'nmse', got [0, 1, 2, 3, ...]" in _one_line(capsys)


@pytest.mark.parametrize(
    "text",
    ["a: &a [*a]", "a: " + "[" * 5000 + "]" * 5000, "a: " + "9" * 5000, "a: 2001-13-45"],
    ids=["recursive alias", "deep nesting", "5000 digits", "impossible date"],
)
def test_yaml_the_loader_cannot_build_is_an_error_not_a_traceback(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(config_module.ConfigError, match="c.yaml: invalid YAML"):
        config_module.load_config(path)


# --------------------------------------------------------------------------- 5: integer bounds


def _integer_keys():
    """(section class, key) of every integer config key, lists of integers included."""
    found, pending = [], [config_module.Config]
    while pending:  # every section, the nested ones (registration.affine, ...) too
        section = pending.pop()
        for name, tp in typing.get_type_hints(section).items():
            if dataclasses.is_dataclass(tp):
                pending.append(tp)
            elif int in _flattened(tp):
                found.append((section, name))
    return found


def _flattened(tp) -> set:
    return {tp} | {leaf for arg in typing.get_args(tp) for leaf in _flattened(arg)}


def test_every_integer_key_has_an_upper_bound():
    keys = _integer_keys()
    assert len(keys) >= 12
    missing = [f"{cls.__name__}.{name}" for cls, name in keys if name not in config_module.INT_LIMITS.get(cls, {})]
    assert not missing


@pytest.mark.parametrize(
    "key",
    [
        "registration.affine.iterations",
        "registration.nonrigid.iterations",
        "fusion.staple_iterations",
        "registration.seed",
        "selection.k",
    ],
)
def test_an_integer_of_20_digits_is_refused_in_validate(data, capsys, key):
    assert _validate(data, "--set", f"{key}=123456789012345678901") == 2
    err = _one_line(capsys)
    assert f"{key}: must be <=" in err and "got 123456789012345678901" in err


@pytest.mark.parametrize(
    "override, needle",
    [
        ("registration.seed=-1", "registration.seed: must be >= 1"),
        (
            "registration.nonrigid.field_sigma=.inf",
            "registration.nonrigid.field_sigma: must be a finite number, got inf",
        ),
        ("registration.affine.learning_rate=.nan", "learning_rate: must be a finite number"),
        (f"fusion.alpha={10**400}", "fusion.alpha: must be a finite number"),
    ],
)
def test_numbers_the_engine_cannot_take_are_refused_in_validate(data, capsys, override, needle):
    assert _validate(data, "--set", override) == 2
    assert needle in _one_line(capsys)


def test_a_list_entry_beyond_its_bound_names_the_key(data, capsys):
    assert _validate(data, "--set", "registration.nonrigid.iterations=[50, 99999999999]") == 2
    assert "registration.nonrigid.iterations: must be <= 100000" in _one_line(capsys)


# --------------------------------------------------------------------------- 6: ids the run's own files use


@pytest.mark.parametrize("ident", ["run.json", "metrics.csv", "index.html", "Metrics.CSV", "crossval.json"])
def test_an_id_taking_a_name_the_run_writes_is_refused(data, capsys, ident):
    manifest = data / "data_manifest.yaml"
    manifest.write_text(manifest.read_text().replace("id: case_003", f"id: {ident}"))
    assert _validate(data) == 2
    assert f"id '{ident}' is the name of a file runs write" in _one_line(capsys)


def test_reserved_ids_cover_everything_a_run_writes_beside_the_targets(data, tmp_path):
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                "demo",
                "--manifest",
                str(data / "data_manifest.yaml"),
                "--out",
                str(out),
                "--set",
                "registration.nonrigid.enabled=false",
                "--set",
                "parallel.n_jobs=1",
            ]
        )
        == 0
    )
    top = {p.name for p in out.iterdir()} - {"case_003"}
    assert top and top <= set(RESERVED_IDS)


# --------------------------------------------------------------------------- 7: label counts


def test_labels_beyond_memory_are_counted_and_refused_with_the_estimate(tmp_path, capsys, caplog, monkeypatch):
    rng = np.random.default_rng(0)
    side = 280  # 78 400 voxels, every one its own label
    folder = tmp_path / "many"
    folder.mkdir()
    for name in ("a", "t"):
        image = sitk.GetImageFromArray(rng.random((side, side)).astype(np.float32))
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    labels = sitk.GetImageFromArray(np.arange(1, side * side + 1, dtype=np.int32).reshape(side, side))
    sitk.WriteImage(labels, str(folder / "a_seg.nii.gz"))
    (folder / "m.yaml").write_text(
        "labels: {1: one}\natlases: [{id: a, image: a.nii.gz, labels: a_seg.nii.gz}]\n"
        "targets: [{id: t, image: t.nii.gz}]\n"
    )
    monkeypatch.setenv("ATLASSEG_MEMORY_LIMIT", "2G")
    with caplog.at_level(logging.WARNING, logger="atlasseg"):
        assert main(["validate", "default", "--manifest", str(folder / "m.yaml")]) == 2
    err = _one_line(capsys)
    assert "for each of 78401 labels" in err and "merge labels" in err and "2.0 GiB are available" in err
    assert "holds labels [2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 78389 more]" in caplog.text
    assert max(len(r.getMessage()) for r in caplog.records) < 1000


# --------------------------------------------------------------------------- 8: an atlas that is a target


def test_a_target_that_is_an_atlas_image_is_a_warning(data, caplog):
    shutil.copy(data / "images/case_001.nii.gz", data / "images/copy.nii.gz")  # the same file under another name
    _retarget(data, "copy.nii.gz")
    with caplog.at_level(logging.WARNING, logger="atlasseg"):
        assert _validate(data) == 0
    assert "target 'case_003' is the same image as atlas case_001" in caplog.text


def test_a_leave_one_out_manifest_whose_targets_are_its_atlases_is_no_warning(data, caplog):
    manifest = data / "data_manifest.yaml"  # each target is an atlas of its own id, which never segments it
    manifest.write_text(
        manifest.read_text()
        .replace("id: case_003, image: images/case_003.nii.gz", "id: case_001, image: images/case_001.nii.gz")
        .replace("labels: labels/case_003.nii.gz", "labels: labels/case_001.nii.gz")
    )
    with caplog.at_level(logging.WARNING, logger="atlasseg"):
        assert _validate(data) == 0
    assert "same image" not in caplog.text


def test_the_same_image_in_another_format_and_type_is_recognised(data, caplog):
    image = sitk.ReadImage(str(data / "images/case_002.nii.gz"))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat64), str(_retarget(data, "copy.mha")))
    with caplog.at_level(logging.WARNING, logger="atlasseg"):
        assert _validate(data) == 0
    assert "same image as atlas case_002" in caplog.text and "case_001" not in caplog.text


def test_an_image_differing_in_one_voxel_is_not_the_same_image(data, caplog):
    image = sitk.ReadImage(str(data / "images/case_001.nii.gz"))
    image[1, 0, 0] = image[1, 0, 0] + 0.5  # array index 1: not one of the fingerprint's 64 places
    sitk.WriteImage(image, str(_retarget(data, "near.nii.gz")))
    with caplog.at_level(logging.WARNING, logger="atlasseg"):
        assert _validate(data) == 0
    assert "same image" not in caplog.text


def test_crossval_refuses_two_atlases_that_are_the_same_image(data, capsys, tmp_path):
    manifest = data / "data_manifest.yaml"
    image = sitk.ReadImage(str(data / "images/case_001.nii.gz"))
    sitk.WriteImage(image, str(data / "images/dup.nrrd"))
    manifest.write_text(
        manifest.read_text().replace(
            "targets:", "- {id: dup, image: images/dup.nrrd, labels: labels/case_001.nii.gz}\ntargets:"
        )
    )
    out = tmp_path / "cv"
    assert main(["crossval", "demo", "--manifest", str(manifest), "--out", str(out)]) == 2
    assert "atlases case_001, dup are the same image" in _one_line(capsys)
    assert not out.exists()


# --------------------------------------------------------------------------- 9: orphan workers

_NAPPING_RUN = """
import os, sys, time
import atlasseg.parallel as parallel
from atlasseg.config import ParallelConfig
parallel.available_cores = lambda: 2

def nap(seconds, threads):
    time.sleep(seconds)

if __name__ == "__main__":
    print(os.getpid(), flush=True)
    parallel.parallel_map(nap, [(60,), (60,)], ParallelConfig(n_jobs=2, backend="loky"), desc="nap")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the processes through psutil's Linux view")
def test_loky_workers_and_resource_trackers_exit_when_the_run_is_killed(tmp_path):
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "napping_run.py"
    script.write_text(textwrap.dedent(_NAPPING_RUN))
    run = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    parent = psutil.Process(int(run.stdout.readline()))
    deadline = time.monotonic() + 60
    while len(parent.children()) < 4 and time.monotonic() < deadline:  # two workers, two resource trackers
        time.sleep(0.05)
    children = parent.children(recursive=True)
    assert len(children) >= 4
    time.sleep(1.0)  # the workers are asleep in their task
    os.kill(parent.pid, signal.SIGKILL)
    run.wait()

    def alive():
        living = []
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    living.append(child)
            except psutil.NoSuchProcess:
                pass
        return living

    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive()
    for child in left:
        child.kill()
    assert not left, [" ".join(c.cmdline())[-80:] for c in left]


# --------------------------------------------------------------------------- property: random header fields

_SPACINGS = st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e-3, 0.5, 1.0, 3.0])
_FLAWS = st.sampled_from(["none", "none", "shear", "scale", "nan", "tiny"])


@st.composite
def _headers(draw):
    dim = draw(st.sampled_from([2, 3]))
    size = draw(st.lists(st.integers(1, 7), min_size=dim, max_size=dim))
    spacing = draw(st.lists(_SPACINGS, min_size=dim, max_size=dim))
    rotation = sitk.Euler2DTransform() if dim == 2 else sitk.Euler3DTransform()
    rotation.SetParameters([draw(st.floats(-np.pi, np.pi)) for _ in range(1 if dim == 2 else 3)] + [0.0] * dim)
    direction = np.asarray(rotation.GetMatrix()).reshape(dim, dim)
    flaw = draw(_FLAWS)
    if flaw == "shear":
        direction[0, 1] += 0.3
    elif flaw == "scale":
        direction[:, 0] *= 1.5
    elif flaw == "nan":
        direction[1, 1] = np.nan
    elif flaw == "tiny":  # float32 round-off: still orthonormal
        direction = direction.astype(np.float32).astype(np.float64)
    return dim, size, spacing, direction


def _write_mha(path: Path, size, spacing, direction) -> None:
    """A MetaImage written by hand, header fields exactly as given (SimpleITK would refuse to set some)."""
    dim = len(size)
    values = np.random.default_rng(0).random(int(np.prod(size)), dtype=np.float32)
    header = (
        f"ObjectType = Image\nNDims = {dim}\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"TransformMatrix = {' '.join(repr(float(v)) for v in direction.T.ravel())}\n"
        f"Offset = {' '.join(['0'] * dim)}\nElementSpacing = {' '.join(repr(float(s)) for s in spacing)}\n"
        f"DimSize = {' '.join(map(str, size))}\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + values.astype("<f4").tobytes())


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[int, Path]:
    return {
        dim: make_demo_dataset(
            tmp_path_factory.mktemp(f"prop{dim}") / "data", dim=dim, n_atlases=1, n_targets=1, size=16, seed=6
        ).parent
        for dim in (2, 3)
    }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_headers())
def test_random_header_fields_give_one_line_and_exit_2_or_validate(sources, tmp_path_factory, capsys, header):
    dim, size, spacing, direction = header
    data = Path(shutil.copytree(sources[dim], tmp_path_factory.mktemp("h") / "data"))
    manifest = data / "data_manifest.yaml"
    manifest.write_text(
        manifest.read_text().replace(
            "image: images/case_002.nii.gz, labels: labels/case_002.nii.gz", "image: images/t.mha"
        )
    )
    _write_mha(data / "images/t.mha", size, spacing, direction)
    physical = (
        all(np.isfinite(s) and s > 0 for s in spacing)
        and np.isfinite(direction).all()
        and np.abs(direction.T @ direction - np.eye(dim)).max() < 1e-4
    )
    capsys.readouterr()
    code = main(["validate", "default", "--manifest", str(manifest)])
    event(f"exit {code}")
    if physical and min(size) >= 4:
        assert code == 0, capsys.readouterr().err
    else:
        assert code == 2
        err = _one_line(capsys)
        assert "images/t.mha: " in err
