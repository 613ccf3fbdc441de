"""BIDS: a manifest from a BIDS dataset, and a run that writes a BIDS derivatives folder."""

import csv
import json
import shutil

import pytest
import SimpleITK as sitk

from atlasseg.cli import main
from atlasseg.config import load_config
from atlasseg.dataset import from_bids
from atlasseg.demo import make_demo_dataset
from atlasseg.errors import ManifestError
from atlasseg.manifest import load_manifest
from atlasseg.pipeline import run

# case → (its entities' folder, whether the labels derivative holds its label map, derivative entities added)
CASES = {
    "sub-01": ("sub-01/anat", True, "_desc-manual"),
    "sub-02_ses-A": ("sub-02/ses-A/anat", True, "_space-orig_desc-manual"),
    "sub-02_ses-B": ("sub-02/ses-B/anat", False, ""),
    "sub-03": ("sub-03/anat", True, "_desc-manual"),
}


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    """A BIDS dataset of 3 subjects (one with two sessions, one of them unlabelled), T1w images, a T2w image to
    ignore, and a derivative 'manual' with _dseg label maps and a dseg.tsv; and the demo's label names."""
    folder = tmp_path_factory.mktemp("bids")
    demo = load_manifest(make_demo_dataset(folder / "demo", dim=3, n_atlases=3, n_targets=1, size=24, seed=3))
    root, labels = folder / "ds", folder / "ds" / "derivatives" / "manual"
    for (case, (sub, labelled, extra)), entry in zip(CASES.items(), [*demo.atlases, *demo.targets]):
        (root / sub).mkdir(parents=True)
        shutil.copy(entry.image, root / sub / f"{case}_T1w.nii.gz")
        if labelled:
            (labels / sub).mkdir(parents=True)
            shutil.copy(entry.labels, labels / sub / f"{case}{extra}_dseg.nii.gz")
    shutil.copy(demo.atlases[0].image, root / "sub-01/anat/sub-01_T2w.nii.gz")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.10.0"}))
    (labels / "dataset_description.json").write_text(json.dumps({"Name": "manual", "DatasetType": "derivative"}))
    (labels / "dseg.tsv").write_text("index\tname\n" + "".join(f"{v}\t{n}\n" for v, n in demo.label_names.items()))
    return root, demo.label_names


def test_from_bids_makes_labelled_cases_atlases_and_the_rest_targets(bids, tmp_path):
    root, names = bids
    manifest = from_bids(root, out=tmp_path / "m.yaml", targets=("sub-03",)).manifest
    assert [a.id for a in manifest.atlases] == ["sub-01", "sub-02_ses-A"]
    assert [t.id for t in manifest.targets] == ["sub-02_ses-B", "sub-03"]
    assert manifest.atlases[1].labels.name == "sub-02_ses-A_space-orig_desc-manual_dseg.nii.gz"
    assert manifest.targets[0].labels is None and manifest.targets[1].labels.name == "sub-03_desc-manual_dseg.nii.gz"
    assert all(e.image.name.endswith("_T1w.nii.gz") for e in (*manifest.atlases, *manifest.targets))
    assert manifest.label_names == names


def test_from_bids_refuses_what_it_cannot_pair_naming_it(bids, tmp_path):
    root, _ = bids
    with pytest.raises(ManifestError, match="not a BIDS dataset"):
        from_bids(root / "sub-01", out=tmp_path / "m.yaml")
    with pytest.raises(ManifestError, match="sub-09: no such case"):
        from_bids(root, out=tmp_path / "m.yaml", targets=("sub-09",))
    other = root / "derivatives" / "manual" / "sub-01" / "anat" / "sub-01_desc-auto_dseg.nii.gz"
    shutil.copy(other.with_name("sub-01_desc-manual_dseg.nii.gz"), other)
    try:
        with pytest.raises(ManifestError, match="sub-01 has 2 label maps.*--desc"):
            from_bids(root, out=tmp_path / "m.yaml")
        assert [a.id for a in from_bids(root, out=tmp_path / "m.yaml", desc="manual").manifest.atlases] == [
            "sub-01",
            "sub-02_ses-A",
            "sub-03",
        ]
    finally:
        other.unlink()


def test_bids_layout_writes_a_derivatives_dataset_and_resumes(bids, tmp_path):
    root, names = bids
    assert main(["manifest", "from-bids", str(root), "--targets", "sub-03", "--out", str(tmp_path / "m.yaml")]) == 0
    manifest = load_manifest(tmp_path / "m.yaml")
    config = load_config("baseline", overrides=["output.layout=bids", "output.probability_maps=true"])
    out = tmp_path / "out"
    first = run(config, manifest, out_dir=out)
    assert [r.error for r in first] == [None, None]
    anat = {"sub-02_ses-B": out / "sub-02/ses-B/anat", "sub-03": out / "sub-03/anat"}
    for target, folder in anat.items():
        dseg = folder / f"{target}_desc-atlasseg_dseg.nii.gz"
        source = sitk.ReadImage(str(manifest.target(target).image))
        assert sitk.ReadImage(str(dseg)).GetOrigin() == source.GetOrigin()
        for name in names.values():
            assert (folder / f"{target}_label-{name.replace('_', '')}_desc-atlasseg_probseg.nii.gz").is_file()
        assert not list((out / target).glob("segmentation*"))  # the default layout's name is not written
        assert (out / target / "qc.png").is_file()  # the report's files keep their places
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "atlasseg"
    with open(out / "dseg.tsv", newline="") as fh:
        table = list(csv.DictReader(fh, delimiter="\t"))
    assert {int(r["index"]): r["name"] for r in table} == names
    assert "**/target.json" in (out / ".bidsignore").read_text().splitlines()
    again = run(config, manifest, out_dir=out)
    assert [r.segmentation for r in again] == [r.segmentation for r in first]
    assert all(r.record.get("seconds") == f.record.get("seconds") for r, f in zip(again, first))  # reused


def test_bids_layout_refuses_ids_that_are_not_bids_names_before_any_work(tmp_path, capsys):
    path = make_demo_dataset(tmp_path / "data", dim=2, n_atlases=2, n_targets=1, size=32, seed=1)
    manifest = load_manifest(path)
    config = load_config("baseline", overrides=["output.layout=bids"])
    message = f"target id '{manifest.targets[0].id}' is not a BIDS name"
    with pytest.raises(ManifestError, match=message):
        run(config, manifest, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["validate", "baseline", "--manifest", str(path), "--set", "output.layout=bids"]) == 2
    assert message in capsys.readouterr().err
