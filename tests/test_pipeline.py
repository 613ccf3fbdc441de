"""End to end on the synthetic demo data: accuracy, the no-registration baseline, outputs."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from atlasseg.config import ParallelConfig, load_config
from atlasseg.demo import make_demo_dataset
from atlasseg.errors import ImageError
from atlasseg.manifest import load_manifest
from atlasseg.parallel import thread_budget
from atlasseg.pipeline import check_inputs, run
from atlasseg.registration.checks import foreground
from atlasseg.selection import smoothed as smooth


@pytest.fixture(scope="module")
def demo2d(tmp_path_factory):
    return load_manifest(make_demo_dataset(tmp_path_factory.mktemp("demo2d") / "data", dim=2, seed=1))


def mean_dice(results) -> float:
    return float(np.mean([r.mean_dice for r in results]))


def test_pipeline_beats_no_registration_baseline(demo2d, tmp_path):
    results = run(load_config("demo"), demo2d, out_dir=tmp_path / "run")
    baseline = run(load_config("baseline"), demo2d, out_dir=tmp_path / "baseline")
    assert mean_dice(results) >= 0.80
    assert mean_dice(results) >= mean_dice(baseline) + 0.15


def test_outputs_keep_target_geometry_and_are_complete(demo2d, tmp_path):
    config = load_config("demo", overrides=["selection.k=3", "output.save_transforms=true"])
    results = run(config, demo2d, out_dir=tmp_path)
    for result, target in zip(results, demo2d.targets):
        seg = sitk.ReadImage(str(tmp_path / target.id / "segmentation.nii.gz"))
        ref = sitk.ReadImage(str(target.image))
        assert seg.GetSize() == ref.GetSize()
        np.testing.assert_allclose(seg.GetOrigin(), ref.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(seg.GetSpacing(), ref.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(seg.GetDirection(), ref.GetDirection(), atol=1e-6)
        assert seg.GetPixelID() == sitk.sitkUInt8
        assert len(list((tmp_path / target.id / "transforms").glob("*.h5"))) == 3
        transform = sitk.ReadTransform(str(next((tmp_path / target.id / "transforms").glob("*.h5"))))
        assert transform.GetDimension() == 2
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert {r["target"] for r in rows} == {t.id for t in demo2d.targets}
    assert {r["name"] for r in rows if r["label"] != "mean"} == set(demo2d.label_names.values())
    record = json.loads((tmp_path / "run.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert record["config"]["selection"]["k"] == 3
    assert "SimpleITK" in record["versions"]
    target = record["targets"][demo2d.targets[0].id]
    assert len(target["ranking"]) == len(demo2d.atlases) and len(target["selected"]) == 3
    assert target["selected"] == [r["atlas"] for r in target["ranking"][:3]]  # the best-ranked by NCC
    registration = target["registrations"][target["selected"][0]]
    assert registration["nonrigid"]["metric_after"] < registration["nonrigid"]["metric_before"]
    assert set(target["seconds"]) >= {"affine_and_scoring", "selection", "nonrigid", "propagation", "fusion"}
    assert not list(tmp_path.rglob(".tmp-*"))


def test_3d_end_to_end_with_anisotropic_subjects(tmp_path):
    manifest = load_manifest(make_demo_dataset(tmp_path / "data", dim=3, n_atlases=4, n_targets=1, size=40))
    assert any(len(set(sitk.ReadImage(str(a.image)).GetSpacing())) > 1 for a in manifest.atlases)
    (result,) = run(load_config("demo", overrides=["selection.k=3"]), manifest, out_dir=tmp_path / "out")
    assert result.mean_dice >= 0.80


def test_an_image_is_never_its_own_atlas(demo2d, tmp_path):
    """A target listed among the atlases (same id) is left out of its own atlas set."""
    text = demo2d.path.read_text().replace(
        "targets:", "targets:\n- {id: case_001, image: images/case_001.nii.gz, labels: labels/case_001.nii.gz}"
    )
    text = text.replace("5: band", "5: band, 9: ghost")  # declared but in no image: scores NaN
    path = demo2d.path.with_name("loo.yaml")
    path.write_text(text)
    manifest = load_manifest(path)
    (result,) = run(load_config("baseline"), manifest, out_dir=tmp_path, target_ids=["case_001"])
    assert "case_001" not in result.record["selected"]
    assert result.mean_dice < 0.99
    record = json.loads((tmp_path / "run.json").read_text(), parse_constant=pytest.fail)  # NaN written as null
    assert record["targets"]["case_001"]["scores"]["9"]["dice"] is None


def test_label_map_on_another_grid_is_refused_before_any_work(demo2d, tmp_path):
    atlas = demo2d.atlases[0]
    labels = sitk.ReadImage(str(atlas.labels))
    labels.SetOrigin((100.0, 0.0))
    bad = tmp_path / "bad.nii.gz"
    sitk.WriteImage(labels, str(bad))
    text = demo2d.path.read_text().replace("labels/case_001.nii.gz", str(bad))
    path = demo2d.path.with_name("bad.yaml")
    path.write_text(text)
    with pytest.raises(ImageError, match="differs from its image"):
        check_inputs(load_manifest(path))


@pytest.mark.parametrize("n_jobs, tasks", [(-1, 10), (1, 10), (8, 3), (2, 1)])
def test_thread_budget_never_oversubscribes(n_jobs, tasks, monkeypatch):
    monkeypatch.setattr("atlasseg.parallel.available_cores", lambda: 4)
    jobs, threads = thread_budget(ParallelConfig(n_jobs=n_jobs), tasks)
    assert 1 <= jobs <= min(tasks, 4) and jobs * threads <= 4
    assert jobs == (1 if n_jobs == 1 else min(4, tasks, 4 if n_jobs == -1 else n_jobs))


def test_a_diverging_atlas_is_dropped_and_min_atlases_enforced(demo2d, tmp_path):
    """An atlas moved far away cannot overlap the target after a centre-free start: dropped with the reason."""
    far = tmp_path / "far.nii.gz"
    image = sitk.ReadImage(str(demo2d.atlases[0].image))
    image.SetOrigin(np.add(image.GetOrigin(), (500.0, 0.0)).tolist())
    sitk.WriteImage(image, str(far))
    labels = sitk.ReadImage(str(demo2d.atlases[0].labels))
    labels.CopyInformation(image)
    sitk.WriteImage(labels, str(tmp_path / "far_labels.nii.gz"))
    manifest = tmp_path / "manifest.yaml"
    atlases = [{"id": "far", "image": str(far), "labels": str(tmp_path / "far_labels.nii.gz")}] + [
        {"id": a.id, "image": str(a.image), "labels": str(a.labels)} for a in demo2d.atlases[1:3]
    ]
    target = demo2d.targets[0]
    doc = {"atlases": atlases, "targets": [{"id": target.id, "image": str(target.image), "labels": str(target.labels)}]}
    manifest.write_text(json.dumps(doc))
    config = load_config("demo", overrides=["registration.affine.initialization=none", "selection.min_atlases=2"])
    (result,) = run(config, load_manifest(manifest), out_dir=tmp_path / "out")
    assert result.status == "degraded" and result.record["degraded"].startswith("1 of its 3 atlases were dropped")
    dropped = result.record["dropped"]
    assert [d["atlas"] for d in dropped] == ["far"]
    assert dropped[0]["reason"] == (
        "affine registration diverged: the metric cannot be evaluated (no overlap left); "
        "too little overlap: only 0% of the target's foreground maps inside the atlas "
        "(min_overlap 50%)"
    )
    assert dropped[0]["record"]["status"] == "diverged"
    assert sorted(result.record["selected"]) == [a["id"] for a in atlases[1:]]
    strict = load_config("demo", overrides=["registration.affine.initialization=none"])  # min_atlases auto: 3 of 3
    (failed,) = run(strict, load_manifest(manifest), out_dir=tmp_path / "strict")  # reported, not raised
    assert failed.segmentation is None and "selection.min_atlases is 3" in failed.error
    record = json.loads((tmp_path / "strict" / "run.json").read_text())
    assert record["status"] == "failed" and record["failed_targets"] == [target.id]
    assert record["targets"][target.id]["error"] == failed.error


def test_landmark_initialisation_needs_landmarks_for_every_entry(demo2d):
    config = load_config("demo", overrides=["registration.affine.initialization=landmarks"])
    with pytest.raises(ImageError, match="has no 'landmarks' file"):
        check_inputs(demo2d, config)


def test_a_failed_nonrigid_registration_is_replaced_by_the_next_ranked_atlas(demo2d, tmp_path, monkeypatch):
    """With min_atlases 2 of k 2, the best-ranked atlas failing brings in the third-ranked."""
    from atlasseg.pipeline import jobs
    from atlasseg.registration import RegistrationDiverged

    calls = []

    def fake_nonrigid(fixed, moving, *, initial, config, masks=None, region=None):  # in-process: parallel.n_jobs=1
        calls.append(moving)
        if len(calls) == 1:
            raise RegistrationDiverged("non-rigid registration diverged: test", {"metric_after": 1.0})
        return initial, {"seconds": 0.0}

    monkeypatch.setattr(jobs, "nonrigid_stage", fake_nonrigid)
    overrides = ["selection.k=2", "selection.min_atlases=2", "parallel.n_jobs=1", "registration.affine.stages=[]"]
    (result,) = run(
        load_config("demo", overrides=overrides), demo2d, out_dir=tmp_path, target_ids=[demo2d.targets[0].id]
    )
    order = [r["atlas"] for r in result.record["ranking"]]
    assert [d["atlas"] for d in result.record["dropped"]] == [order[0]]
    assert result.record["dropped"][0]["record"] == {"metric_after": 1.0}
    assert result.record["selected"] == order[1:3]
    assert set(result.record["registrations"]) == set(order[:3])
    assert len(calls) == 3


def test_register_selected_returns_a_new_ranking_and_leaves_the_given_one_alone(demo2d, monkeypatch):
    """The non-rigid records and the failures go into the returned ranking; the ranking passed in is unchanged."""
    from atlasseg.pipeline import jobs

    def fake_nonrigid(fixed, moving, *, initial, config, masks=None, region=None):  # the first atlas tried fails
        if not calls:
            calls.append(moving)
            raise jobs.RegistrationDiverged("non-rigid registration diverged: test", {"metric_after": 1.0})
        return initial, {"seconds": 0.0}

    calls = []
    monkeypatch.setattr(jobs, "nonrigid_stage", fake_nonrigid)
    config = load_config("demo", overrides=["selection.k=2", "parallel.n_jobs=1", "registration.affine.stages=[]"])
    target, atlases = demo2d.targets[0], {a.id: a for a in demo2d.atlases}
    ranking = jobs.rank_atlases(target, list(atlases.values()), config)
    before = json.dumps({"records": ranking.records, "dropped": ranking.dropped}, sort_keys=True)
    transforms, after = jobs.register_selected(target, atlases, ranking, config, wanted=ranking.selected, floor=2)
    assert json.dumps({"records": ranking.records, "dropped": ranking.dropped}, sort_keys=True) == before
    assert [d["atlas"] for d in after.dropped] == [ranking.selected[0]]
    assert list(transforms) == [ranking.selected[1], ranking.ranked[2]]
    assert all("nonrigid" in after.records[aid] for aid in transforms) and after.ranked == ranking.ranked


def test_a_process_finds_a_targets_foreground_and_smooths_each_image_once(demo2d, monkeypatch):
    """The registration checks' target foreground and selection's smoothed images are made once per process: one
    foreground per target for all its atlases and both stages, one smoothed image per target and per atlas; the
    scores are those of smoothing per pair."""
    from collections import OrderedDict

    from atlasseg.pipeline import jobs
    from atlasseg.selection import score_atlas

    monkeypatch.setattr(jobs, "_MEMO", OrderedDict())
    found, smoothed = [], []
    monkeypatch.setattr(jobs, "foreground", lambda fixed, masks: found.append(1) or foreground(fixed, masks))
    monkeypatch.setattr(jobs, "smoothed", lambda image, spacing: smoothed.append(1) or smooth(image, spacing))
    config = load_config("demo", overrides=["selection.k=2", "parallel.n_jobs=1"])
    atlases = {a.id: a for a in demo2d.atlases}
    for target in demo2d.targets[:2]:
        ranking = jobs.rank_atlases(target, list(atlases.values()), config)
        jobs.register_selected(target, atlases, ranking, config, wanted=ranking.selected, floor=1)
    assert len(found) == 2 and len(smoothed) == 2 + len(atlases)
    fixed = jobs.load_normalized(target.image, config.registration.normalization)
    for aid, transform in ranking.affine.items():
        labels = jobs.atlas_labels(atlases[aid], snapped=False)
        moving = jobs.load_normalized(atlases[aid].image, config.registration.normalization)
        assert ranking.scores[aid] == score_atlas(fixed, moving, transform, config=config.selection, labels=labels)
