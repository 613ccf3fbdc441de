"""atlasseg manifest from-msd / from-folders: Decathlon and nnU-Net folders, and two folders paired by name."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import phantom

from atlasseg.cli import main
from atlasseg.dataset import from_folders, from_msd
from atlasseg.errors import AtlassegError, ManifestError
from atlasseg.manifest import load_manifest

IMAGE, LABELS = phantom(dim=2, size=12)


def write(path: Path, image: sitk.Image = IMAGE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def msd(root: Path, cases=("hip_001", "hip_002"), tests=("hip_003",), **extra) -> Path:
    """A Decathlon-style dataset: 3D-style listed paths, label names keyed by value, macOS '._' junk."""
    for case in cases:
        write(root / "imagesTr" / f"{case}.nii.gz")
        write(root / "labelsTr" / f"{case}.nii.gz", LABELS)
        (root / "imagesTr" / f"._{case}.nii.gz").write_bytes(b"\0\5\26\7")
    for case in tests:
        write(root / "imagesTs" / f"{case}.nii.gz")
    doc = {
        "name": "Hippocampus",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": len(cases),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        "test": [f"./imagesTs/{c}.nii.gz" for c in tests],
        **extra,
    }
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


def nnunet_v2(root: Path) -> Path:
    """An nnU-Net v2 raw dataset: two channels per case in their own files, names keyed to values."""
    scaled = {0: IMAGE, 1: sitk.RescaleIntensity(IMAGE, 0, 7)}
    for folder, cases in (("Tr", ("c1", "c2")), ("Ts", ("t1", "t2"))):
        for case in cases:
            for channel, image in scaled.items():
                write(root / f"images{folder}" / f"{case}_{channel:04d}.nii.gz", image)
    for case in ("c1", "c2", "t2"):  # labelsTs holds one target's ground truth
        write(root / ("labelsTr" if case.startswith("c") else "labelsTs") / f"{case}.nii.gz", LABELS)
    doc = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


def test_decathlon_training_pairs_become_atlases_and_test_images_targets(tmp_path):
    dataset = msd(tmp_path / "Task04_Hippocampus")
    out = tmp_path / "project" / "data_manifest.yaml"
    imported = from_msd(dataset, out=out)
    manifest = load_manifest(out)
    assert manifest == imported.manifest
    assert [a.id for a in manifest.atlases] == ["hip_001", "hip_002"] and [t.id for t in manifest.targets] == [
        "hip_003"
    ]
    assert manifest.label_names == {1: "Anterior", 2: "Posterior"}
    assert manifest.atlases[1].labels == (tmp_path / "Task04_Hippocampus" / "labelsTr" / "hip_002.nii.gz").resolve()
    assert manifest.targets[0].labels is None
    text = out.read_text()
    assert "image: ../Task04_Hippocampus/imagesTr/hip_001.nii.gz" in text and str(tmp_path) in text.splitlines()[0]
    assert imported.channels == "one channel per case"


def test_targets_from_a_folder_with_ground_truth_beside_it(tmp_path):
    dataset = msd(tmp_path, tests=())
    write(tmp_path / "imagesVal" / "v1.nii.gz")
    write(tmp_path / "imagesVal" / "v2.nii.gz")
    write(tmp_path / "labelsVal" / "v2.nii.gz", LABELS)
    manifest = from_msd(dataset, out=tmp_path / "m.yaml", targets="imagesVal").manifest
    assert [(t.id, t.labels is not None) for t in manifest.targets] == [("v1", False), ("v2", True)]
    assert from_msd(dataset, out=tmp_path / "none.yaml").manifest.targets == ()


def test_nnunet_v2_pairs_by_name_and_picks_a_channel(tmp_path, caplog):
    dataset = nnunet_v2(tmp_path / "Dataset001")
    with caplog.at_level(logging.INFO):
        imported = from_msd(dataset.parent, out=tmp_path / "m0.yaml")
    manifest = imported.manifest
    assert [a.image.name for a in manifest.atlases] == ["c1_0000.nii.gz", "c2_0000.nii.gz"]
    assert [(t.id, t.image.name, t.labels is not None) for t in manifest.targets] == [
        ("t1", "t1_0000.nii.gz", False),
        ("t2", "t2_0000.nii.gz", True),
    ]
    assert manifest.label_names == {1: "Anterior", 2: "Posterior"}
    assert imported.channels.startswith("channel 0 (T1) of 2 (0 T1, 1 T2)")
    second = from_msd(dataset, out=tmp_path / "m1.yaml", channel=1).manifest
    assert [a.image.name for a in second.atlases] == ["c1_0001.nii.gz", "c2_0001.nii.gz"]
    with pytest.raises(ManifestError, match="there is no --channel 2"):
        from_msd(dataset, out=tmp_path / "m2.yaml", channel=2)


def test_nnunet_v1_lists_names_without_the_channel_suffix(tmp_path):
    dataset = msd(tmp_path)
    for folder in ("imagesTr", "imagesTs"):
        for path in (tmp_path / folder).glob("hip_*.nii.gz"):
            path.rename(path.with_name(path.name.replace(".nii.gz", "_0000.nii.gz")))
    manifest = from_msd(dataset, out=tmp_path / "m.yaml").manifest
    assert [a.id for a in manifest.atlases] == ["hip_001", "hip_002"]
    assert manifest.atlases[0].image.name == "hip_001_0000.nii.gz" and manifest.targets[0].id == "hip_003"


def test_a_4d_decathlon_image_gives_its_channel_with_its_geometry(tmp_path):
    labels = sitk.Image([6, 7, 5], sitk.sitkUInt8)
    labels[2, 3, 2] = 1
    labels.SetSpacing((1.0, 2.0, 3.0))
    labels.SetOrigin((5.0, -4.0, 2.0))
    labels.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    volumes = np.random.default_rng(0).random((2, 5, 7, 6)).astype(np.float32)
    image = sitk.JoinSeries([sitk.GetImageFromArray(v) for v in volumes])
    image.SetSpacing((1.0, 2.0, 3.0, 1.0))
    image.SetOrigin((5.0, -4.0, 2.0, 0.0))
    direction = np.eye(4)
    direction[:3, :3] = np.reshape(labels.GetDirection(), (3, 3))
    image.SetDirection(direction.ravel())
    write(tmp_path / "d" / "imagesTr" / "b_1.nii.gz", image)
    write(tmp_path / "d" / "labelsTr" / "b_1.nii.gz", labels)
    doc = {
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "tumour"},
        "training": [{"image": "./imagesTr/b_1.nii.gz", "label": "./labelsTr/b_1.nii.gz"}],
        "test": [],
    }
    (tmp_path / "d" / "dataset.json").write_text(json.dumps(doc))
    imported = from_msd(tmp_path / "d" / "dataset.json", out=tmp_path / "out" / "m.yaml", channel=1)
    atlas = imported.manifest.atlases[0]
    assert atlas.image == (tmp_path / "out" / "channel1" / "imagesTr" / "b_1.nii.gz").resolve()
    extracted = sitk.ReadImage(str(atlas.image))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(extracted), volumes[1])
    assert extracted.GetDirection() == labels.GetDirection() and extracted.GetOrigin() == labels.GetOrigin()
    assert "channel 1 (T1w) of 2" in imported.channels
    folders = from_folders(tmp_path / "d" / "imagesTr", tmp_path / "d" / "labelsTr", out=tmp_path / "f" / "m.yaml")
    first = folders.manifest.atlases[0].image
    assert first == (tmp_path / "f" / "channel0" / "imagesTr" / "b_1.nii.gz").resolve()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(first))), volumes[0])
    assert folders.channels == "channel 0 of 2; --channel picks another"


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda d: d.pop("labels"), "has no 'labels' mapping"),
        (lambda d: d.pop("training"), "neither a 'training' list"),
        (
            lambda d: d["training"].append({"image": "./imagesTr/gone.nii.gz", "label": "./labelsTr/hip_001.nii.gz"}),
            "training[2].image: file not found",
        ),
        (lambda d: d["training"].append({"image": "./imagesTr/hip_001.nii.gz"}), "training[2]: expected"),
        (lambda d: d.update(labels={"background": 0, "A": "one"}), "'A': 'one' is not a label value"),
        (lambda d: d.update(test=["./imagesTs/nothere.nii.gz"]), "test[0]: file not found"),
        (lambda d: d.update(modality={"0": "MRI"}), "there is no --channel 1"),
    ],
)
def test_bad_dataset_json_names_the_key(tmp_path, change, needle):
    dataset = msd(tmp_path)
    doc = json.loads(dataset.read_text())
    change(doc)
    dataset.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        from_msd(dataset, out=tmp_path / "m.yaml", channel=1 if "channel" in needle else 0)
    assert not (tmp_path / "m.yaml").exists()


def test_unreadable_or_missing_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text('{"labels": {"0": "bg",}}')
    with pytest.raises(ManifestError, match="invalid JSON at line 1"):
        from_msd(tmp_path, out=tmp_path / "m.yaml")
    with pytest.raises(ManifestError, match="dataset.json not found"):
        from_msd(tmp_path / "elsewhere", out=tmp_path / "m.yaml")


def test_nnunet_regions_are_left_out_with_a_warning(tmp_path, caplog):
    dataset = nnunet_v2(tmp_path)
    doc = json.loads(dataset.read_text())
    doc["labels"]["both"] = [1, 2]
    dataset.write_text(json.dumps(doc))
    manifest = from_msd(dataset, out=tmp_path / "m.yaml").manifest
    assert manifest.label_names == {1: "Anterior", 2: "Posterior"} and "region" in caplog.text


def test_folders_pair_by_name_across_suffixes(tmp_path):
    for case in ("a", "b", "c"):
        write(tmp_path / "img" / f"{case}_0000.nii.gz")
        write(tmp_path / "img" / f"{case}_0001.nii.gz")
    write(tmp_path / "lab" / "a_seg.nii.gz", LABELS)
    write(tmp_path / "lab" / "b_labels.nrrd", LABELS)
    write(tmp_path / "lab" / "c.nii.gz", LABELS)
    (tmp_path / "lab" / "README.txt").write_text("not an image")
    write(tmp_path / "new" / "d_0000.nii.gz")
    write(tmp_path / "new" / "d_0001.nii.gz")
    imported = from_folders(
        tmp_path / "img", tmp_path / "lab", targets=tmp_path / "new", out=tmp_path / "m.yaml", label_names={1: "body"}
    )
    manifest = imported.manifest
    assert [(a.id, a.image.name, a.labels.name) for a in manifest.atlases] == [
        ("a", "a_0000.nii.gz", "a_seg.nii.gz"),
        ("b", "b_0000.nii.gz", "b_labels.nrrd"),
        ("c", "c_0000.nii.gz", "c.nii.gz"),
    ]
    assert [(t.id, t.image.name) for t in manifest.targets] == [("d", "d_0000.nii.gz")]
    assert manifest.label_names == {1: "body"} and "channel 0 of 2 (_0000, _0001)" in imported.channels
    assert "image: img/a_0000.nii.gz" in (tmp_path / "m.yaml").read_text()


@pytest.mark.parametrize(
    "layout, needle",
    [
        ({"img": ["a", "b"], "lab": ["a"]}, r"1 image\(s\) without a label map in .*img: b.nii.gz"),
        ({"img": ["a"], "lab": ["a", "z_seg"]}, r"1 label map\(s\) without an image in .*lab: z_seg.nii.gz"),
        ({"img": ["a"], "lab": ["a_seg", "a_label"]}, "are both labels of case 'a'"),
        ({"img": ["a", "a_0000"], "lab": ["a"]}, "image without a channel suffix"),
        ({"img": ["a_0001"], "lab": ["a"]}, r"case 'a' has no channel 0 image \(a_0000; found _0001\)"),
        ({"img": [], "lab": ["a"]}, "holds no images"),
    ],
)
def test_folders_that_do_not_pair_name_the_files(tmp_path, layout, needle):
    for folder, names in layout.items():
        (tmp_path / folder).mkdir()
        for name in names:
            write(tmp_path / folder / f"{name}.nii.gz", LABELS if folder == "lab" else IMAGE)
    with pytest.raises(ManifestError, match=needle):
        from_folders(tmp_path / "img", tmp_path / "lab", out=tmp_path / "m.yaml")


def test_what_is_written_is_validated_and_nothing_overwritten_without_force(tmp_path, capsys):
    write(tmp_path / "img" / "a.nii.gz")
    write(tmp_path / "lab" / "a.nii.gz", LABELS)
    out = tmp_path / "data_manifest.yaml"
    argv = ["manifest", "from-folders", str(tmp_path / "img"), str(tmp_path / "lab"), "--out", str(out)]
    assert main(argv + ["--labels", "1=body"]) == 0
    assert "1 atlases, 0 targets" in capsys.readouterr().out
    before = out.read_text()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert out.read_text() == before
    shifted = sitk.Image(LABELS)
    shifted.SetOrigin((50.0, 0.0))
    write(tmp_path / "lab" / "a.nii.gz", shifted)
    assert main(argv + ["--force"]) == 2
    assert "label map grid" in capsys.readouterr().err and out.read_text() == before
    empty = sitk.Image(LABELS.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(LABELS)
    write(tmp_path / "lab" / "a.nii.gz", empty)
    with pytest.raises(AtlassegError, match="all background"):
        from_folders(tmp_path / "img", tmp_path / "lab", out=out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_manifest.yaml", "img", "lab"]  # no temporaries


def test_cli_from_msd(tmp_path, capsys):
    dataset = msd(tmp_path / "Task04")
    assert main(["manifest", "from-msd", str(dataset), "--out", str(tmp_path / "m.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "2 atlases, 1 targets (0 with ground truth); labels 1=Anterior, 2=Posterior" in printed
    assert main(["validate", "demo", "--manifest", str(tmp_path / "m.yaml")]) == 0
