"""Leave-one-out cross-validation: each pair registered once, and the same Dice as a run."""

import csv
import dataclasses
import json

import pytest

import atlasseg.pipeline as pipeline
from atlasseg.config import load_config
from atlasseg.crossval import crossval, parse_ks
from atlasseg.demo import make_demo_dataset
from atlasseg.errors import ConfigError, RegistrationError
from atlasseg.manifest import as_target, load_manifest
from atlasseg.pipeline import jobs

ONE_THREAD = ["parallel.n_jobs=1", "parallel.itk_threads=1"]  # in-process (counted) and repeatable


def test_crossval_registers_each_pair_once_and_scores_like_a_run(tmp_path, monkeypatch):
    manifest = load_manifest(make_demo_dataset(tmp_path / "data", dim=2, n_atlases=4, n_targets=0, seed=4))
    calls = {"affine": [], "nonrigid": []}
    real_affine, real_nonrigid = jobs.affine_stage, jobs.nonrigid_stage

    def affine(fixed, moving, **kwargs):
        calls["affine"].append(moving.GetSize())
        return real_affine(fixed, moving, **kwargs)

    def nonrigid(fixed, moving, **kwargs):
        calls["nonrigid"].append(moving.GetSize())
        return real_nonrigid(fixed, moving, **kwargs)

    monkeypatch.setattr(jobs, "affine_stage", affine)
    monkeypatch.setattr(jobs, "nonrigid_stage", nonrigid)
    config = load_config("demo", overrides=ONE_THREAD)
    document = crossval(config, manifest, ks=[1, 2], methods=["majority", "jlf"], out_dir=tmp_path / "cv")
    assert not any(r["dropped"] for r in document["targets"].values())  # else replacements add registrations
    assert len(calls["affine"]) == 4 * 3  # every ordered (target, atlas) pair once
    assert len(calls["nonrigid"]) == 4 * 2  # the best max(k) = 2 of 3 per target, shared by every setting
    target = manifest.atlases[1].id
    record = document["targets"][target]
    assert record["registered"] == [r["atlas"] for r in record["ranking"][:2]]
    assert {m: list(by_k) for m, by_k in record["settings"].items()} == {"majority": ["1", "2"], "jlf": ["1", "2"]}
    assert record["settings"]["jlf"]["2"]["atlases"] == 2

    # The same target segmented by a run with k = 2 and jlf: the same Dice.
    single = dataclasses.replace(manifest, targets=(as_target(manifest.atlases[1]),))
    run_config = load_config("demo", overrides=ONE_THREAD + ["selection.k=2", "fusion.method=jlf"])
    (result,) = pipeline.run(run_config, single, out_dir=tmp_path / "run")
    assert result.dice == pytest.approx(record["settings"]["jlf"]["2"]["dice"], abs=1e-12)

    rows = list(csv.DictReader(open(tmp_path / "cv" / "crossval.csv")))
    means = [r for r in rows if r["target"] == "mean" and r["label"] == "mean"]
    assert [(r["method"], r["k"]) for r in means] == [("majority", "1"), ("majority", "2"), ("jlf", "1"), ("jlf", "2")]
    summary = document["summary"]["jlf"]["2"]
    assert float(means[-1]["dice"]) == pytest.approx(summary["mean_dice"], abs=1e-6)
    per_target = [s["settings"]["jlf"]["2"]["mean_dice"] for s in document["targets"].values()]
    assert summary["mean_dice"] == pytest.approx(sum(per_target) / 4)
    saved = json.loads((tmp_path / "cv" / "crossval.json").read_text(), parse_constant=pytest.fail)
    assert saved["summary"]["majority"]["1"]["atlases"] == 1.0


def test_k_values_are_checked():
    assert parse_ks(["3", "all", "3", "ALL", 10]) == [3, "all", 10]
    for bad in ("0", "-1", "some"):
        with pytest.raises(ConfigError, match=f"--k '{bad}'"):
            parse_ks([bad])


def test_crossval_snaps_ground_truth_a_float_rounding_off_its_image_grid_as_a_run_does(tmp_path, caplog):
    """One per-target flow: an atlas (here a cross-validation target) whose labels' origin differs from its
    image's by floating-point noise is snapped with a warning, as in a run, not refused as another grid."""
    import SimpleITK as sitk

    manifest = load_manifest(make_demo_dataset(tmp_path / "data", dim=2, n_atlases=3, n_targets=0, seed=5))
    path = manifest.atlases[0].labels
    labels = sitk.ReadImage(str(path))
    labels.SetOrigin([o + 1e-5 * s for o, s in zip(labels.GetOrigin(), labels.GetSpacing())])
    sitk.WriteImage(labels, str(path))
    config = load_config("demo", overrides=ONE_THREAD)
    document = crossval(config, manifest, ks=[1], methods=["majority"])
    assert "snapped" in caplog.text
    assert document["targets"][manifest.atlases[0].id]["settings"]["majority"]["1"]["mean_dice"] > 0.5


def test_crossval_prints_each_dropped_atlas_with_its_reason(tmp_path, monkeypatch, caplog):
    from atlasseg.registration import RegistrationDiverged

    manifest = load_manifest(make_demo_dataset(tmp_path / "data", dim=2, n_atlases=3, n_targets=0, seed=5))

    def rejected(fixed, moving, **kwargs):
        raise RegistrationDiverged("non-rigid registration rejected: too little overlap: only 49% (test)", {})

    monkeypatch.setattr(jobs, "nonrigid_stage", rejected)
    with pytest.raises(RegistrationError, match="no target had an atlas registered"):
        crossval(load_config("demo", overrides=ONE_THREAD), manifest, ks=[1], methods=["majority"])
    drops = [r.getMessage() for r in caplog.records if "dropped (nonrigid" in r.getMessage()]
    assert len(drops) == 3 * 2  # every (target, atlas) pair, on the console
    assert all("too little overlap: only 49%" in d for d in drops)
