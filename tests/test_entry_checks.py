"""Inputs that would give a silent wrong answer are refused up front, naming the manifest entry (issue 15.1, 15.6)."""

import os
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk

from atlasseg.cli import main
from atlasseg.demo import make_demo_dataset

ATLAS_IMAGE, ATLAS_LABELS = "images/case_001.nii.gz", "labels/case_001.nii.gz"
TARGET_IMAGE, TARGET_LABELS = "images/case_004.nii.gz", "labels/case_004.nii.gz"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_demo_dataset(
        tmp_path_factory.mktemp("entries") / "data", dim=2, n_atlases=3, n_targets=1, size=32, seed=8
    ).parent


def _point(data: Path, old: str, new: str) -> None:
    manifest = data / "data_manifest.yaml"
    text = manifest.read_text()
    assert old in text
    manifest.write_text(text.replace(old, new, 1))


def _one_line_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("atlasseg: error: "), err
    return err


def _validate(data, capsys) -> str:
    return _one_line_error(capsys, "-q", "validate", "demo", "--manifest", str(data / "data_manifest.yaml"))


def test_a_targets_labels_given_as_its_image_is_refused(data, capsys):
    _point(data, f"image: {TARGET_IMAGE}", f"image: {TARGET_LABELS}")
    err = _validate(data, capsys)
    assert f"target 'case_004': image {TARGET_LABELS}: looks like a label map" in err
    assert "the same voxels as its own labels file" in err
    err = _one_line_error(
        capsys, "-q", "run", "demo", "--manifest", str(data / "data_manifest.yaml"), "--out", str(data / "out")
    )
    assert "looks like a label map" in err and not (data / "out").exists()


def test_an_atlas_whose_image_is_its_label_map_is_refused(data, capsys):
    _point(data, f"image: {ATLAS_IMAGE}", f"image: {ATLAS_LABELS}")
    err = _validate(data, capsys)
    assert f"atlas 'case_001': image {ATLAS_LABELS}: looks like a label map" in err


def test_a_target_without_labels_given_a_label_map_is_refused(data, capsys):
    _point(data, f"image: {TARGET_IMAGE}, labels: {TARGET_LABELS}", f"image: {TARGET_LABELS}")
    err = _validate(data, capsys)
    assert "target 'case_004': image" in err and "the label values of" in err


def test_a_real_image_with_whole_number_intensities_is_accepted(data, capsys):
    path = data / ATLAS_IMAGE
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(sitk.Cast(image * 1000, sitk.sitkInt16), str(path))  # integer scanner units
    assert main(["-q", "validate", "demo", "--manifest", str(data / "data_manifest.yaml")]) == 0


def test_swapped_image_and_labels_name_the_entry_field_and_the_path_as_written(data, capsys):
    """Through a symlink: the error shows the manifest's path, not the file it resolves to."""
    store = data / "store"
    store.mkdir()
    for name in (ATLAS_IMAGE, ATLAS_LABELS):
        shutil.move(data / name, store / Path(name).name.replace(".nii", "_" + Path(name).parent.name + ".nii"))
        os.symlink(store / Path(name).name.replace(".nii", "_" + Path(name).parent.name + ".nii"), data / name)
    _point(data, f"image: {ATLAS_IMAGE}, labels: {ATLAS_LABELS}", f"image: {ATLAS_LABELS}, labels: {ATLAS_IMAGE}")
    err = _validate(data, capsys)
    assert f"data_manifest.yaml: atlas 'case_001': labels {ATLAS_IMAGE}: " in err
    assert "store" not in err


def test_the_report_shows_the_image_path_as_the_manifest_writes_it(data, capsys):
    store = data / "store"
    store.mkdir()
    shutil.move(data / TARGET_IMAGE, store / "scan.nii.gz")
    os.symlink(store / "scan.nii.gz", data / TARGET_IMAGE)
    out = data / "out"
    assert (
        main(
            [
                "-q",
                "run",
                "demo",
                "--manifest",
                str(data / "data_manifest.yaml"),
                "--out",
                str(out),
                "--set",
                "selection.k=3",
                "--set",
                "parallel.n_jobs=1",
            ]
        )
        == 0
    )
    page = (out / "index.html").read_text()
    assert TARGET_IMAGE in page and "scan.nii.gz" not in page
