from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import phantom

from atlasseg.errors import ManifestError
from atlasseg.manifest import load_manifest


@pytest.fixture
def data(tmp_path) -> Path:
    image, labels = phantom(dim=2, size=16)
    for name in ("a1", "a2", "t1"):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
        sitk.WriteImage(labels, str(tmp_path / f"{name}_seg.nii.gz"))
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "data_manifest.yaml"
    path.write_text(text)
    return path


GOOD = """
labels: {1: body, 2: left}
atlases:
  - {id: a1, image: a1.nii.gz, labels: a1_seg.nii.gz}
  - {id: a2, image: %s, labels: a2_seg.nii.gz}
targets:
  - {id: t1, image: t1.nii.gz, labels: t1_seg.nii.gz}
  - {id: t2, image: t1.nii.gz}
"""


def test_relative_and_absolute_paths_resolve(data):
    manifest = load_manifest(write(data, GOOD % (data / "a2.nii.gz")))
    assert [a.id for a in manifest.atlases] == ["a1", "a2"]
    assert manifest.atlases[0].image == (data / "a1.nii.gz").resolve()
    assert manifest.atlases[1].image == (data / "a2.nii.gz").resolve()
    assert manifest.targets[1].labels is None
    assert manifest.label_names == {1: "body", 2: "left"}


def test_paths_are_relative_to_the_manifest_not_the_working_directory(data, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert load_manifest(write(data, GOOD % "a2.nii.gz")).atlases[1].image.exists()


@pytest.mark.parametrize(
    "text, needle",
    [
        (GOOD.replace("a1_seg.nii.gz", "missing.nii.gz"), "atlas 'a1': labels file not found"),
        (GOOD.replace("id: a2", "id: a1"), "duplicate atlas id 'a1'"),
        (GOOD.replace(", labels: a1_seg.nii.gz", ""), "atlas 'a1' has no 'labels'"),
        (GOOD.replace("{id: t2,", "{id: t2, weight: x,"), "target 't2': unknown key 'weight'"),
        (GOOD.replace("{id: t2,", "{id: t2, mask: nowhere.nii.gz,"), "target 't2': mask file not found"),
        (GOOD + "extra: 1\n", "unknown key 'extra'"),
        (GOOD.replace("id: t2", "id: ../../x"), "may only hold letters"),
        (GOOD.replace("{1: body, 2: left}", "{0: bg}"), "not a positive integer"),
        ("atlases: []\n", "no atlases"),
        ("atlases: [1, 2\n", "invalid YAML at line"),
        (
            "atlases: !!python/object/apply:os.system ['exit 3']\n",
            "invalid YAML at line 1, column 10",
        ),  # never constructed
    ],
)
def test_invalid_manifests_name_entry_and_file(data, text, needle):
    path = write(data, text.replace("%s", "a2.nii.gz"))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "data_manifest.yaml")
