"""A run's status says what happened: degraded targets, an interrupted run, outputs of other inputs refused."""

import importlib
import json

import pytest
import SimpleITK as sitk
import yaml

from atlasseg.cli import EXIT_DEGRADED, EXIT_ERROR, EXIT_INTERRUPTED, main
from atlasseg.demo import make_demo_dataset
from atlasseg.pipeline import jobs
from atlasseg.registration import RegistrationDiverged

RUN = importlib.import_module("atlasseg.pipeline.run")  # the module (the package's `run` is the function)

SERIAL = ["--set", "parallel.n_jobs=1", "--set", "parallel.itk_threads=1"]  # in this process: stages can be faked


@pytest.fixture(scope="module")
def ten(tmp_path_factory):
    """A 2D demo manifest with 10 atlases and 2 targets."""
    return make_demo_dataset(tmp_path_factory.mktemp("status") / "data", dim=2, seed=7, n_atlases=10, n_targets=2)


@pytest.fixture
def nine_of_ten_fail(monkeypatch):
    """Every non-rigid registration but the first of each target diverges; the others keep their affine."""
    seen = {}

    def nonrigid(fixed, moving, *, initial, config, masks=None, region=None):
        key = fixed.GetOrigin(), fixed.GetSize(), float(sitk.GetArrayViewFromImage(fixed).sum())
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            raise RegistrationDiverged("non-rigid registration diverged: the metric got worse (test)", {})
        return initial, {"seconds": 0.0}

    monkeypatch.setattr(jobs, "nonrigid_stage", nonrigid)


def _run(manifest, out, *extra):
    return main(
        [
            "-q",
            "run",
            "demo",
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            "--set",
            "selection.k=10",
            *SERIAL,
            *extra,
        ]
    )


def test_nine_of_ten_atlases_failing_is_a_degraded_target_and_a_distinct_exit_code(
    ten, tmp_path, nine_of_ten_fail, capsys
):
    assert _run(ten, tmp_path / "a", "--set", "selection.min_atlases=1", "--target", "case_011") == EXIT_DEGRADED
    err = capsys.readouterr().err
    assert "1 of 1 target(s) degraded (case_011)" in err and "--allow-degraded" in err
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["status"] == "degraded" and record["degraded_targets"] == ["case_011"]
    target = record["targets"]["case_011"]
    assert target["status"] == "degraded" and target["degraded"].startswith("9 of its 10 atlases were dropped")
    assert (
        _run(ten, tmp_path / "a", "--set", "selection.min_atlases=1", "--target", "case_011", "--allow-degraded") == 0
    )


def test_with_the_default_floor_most_atlases_failing_fails_the_target(ten, tmp_path, nine_of_ten_fail, capsys):
    assert _run(ten, tmp_path / "a", "--target", "case_011") == EXIT_ERROR
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    error = record["targets"]["case_011"]["error"]
    assert "only 1 atlas registration(s) succeeded, selection.min_atlases is 5" in error


def test_crossval_marks_degraded_left_out_atlases_and_exits_3(ten, tmp_path, nine_of_ten_fail, capsys):
    args = [
        "-q",
        "crossval",
        "demo",
        "--manifest",
        str(ten),
        "--out",
        str(tmp_path),
        "--k",
        "3",
        "--methods",
        "majority",
        "--set",
        "selection.min_atlases=1",
        *SERIAL,
    ]
    assert main(args) == EXIT_DEGRADED
    assert "--allow-degraded" in capsys.readouterr().err
    document = json.loads((tmp_path / "crossval.json").read_text())
    assert len(document["degraded_targets"]) == 10  # each left-out atlas kept 1 of its 9 atlases
    target = document["targets"]["case_001"]
    assert target["degraded"].startswith("8 of its 9 atlases were dropped") and "settings" in target
    assert main([*args, "--allow-degraded"]) == 0


def test_the_report_lists_degraded_targets_first(ten, tmp_path, monkeypatch):
    real = jobs.nonrigid_stage
    calls = []

    def nonrigid(fixed, moving, **kwargs):  # the second target (case_012) loses 3 of its 10 atlases
        calls.append(1)
        if 10 < len(calls) <= 13:
            raise RegistrationDiverged("non-rigid registration diverged: test", {})
        return real(fixed, moving, **kwargs)

    monkeypatch.setattr(jobs, "nonrigid_stage", nonrigid)
    assert _run(ten, tmp_path, "--allow-degraded") == 0
    page = (tmp_path / "index.html").read_text()
    assert page.index('id="target-0"><h2>case_012') < page.index("<h2>case_011")


def test_an_interrupted_run_says_so_writes_its_report_and_resumes(ten, tmp_path, monkeypatch, capsys):
    real = RUN.segment_target

    def second_interrupted(target, *args, **kwargs):
        if target.id == "case_012":
            raise KeyboardInterrupt
        return real(target, *args, **kwargs)

    monkeypatch.setattr(RUN, "segment_target", second_interrupted)
    assert _run(ten, tmp_path, "--set", "selection.k=3") == EXIT_INTERRUPTED
    assert "run the same command again to resume" in capsys.readouterr().err
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "interrupted" and list(record["targets"]) == ["case_011"]
    assert "case_011" in (tmp_path / "index.html").read_text() and (tmp_path / "metrics.csv").is_file()
    monkeypatch.setattr(RUN, "segment_target", real)
    assert _run(ten, tmp_path, "--set", "selection.k=3") == 0
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "complete"


def test_another_manifest_into_the_same_out_is_refused_naming_the_changed_targets(ten, tmp_path, capsys):
    assert _run(ten, tmp_path / "out", "--set", "selection.k=3", "--target", "case_011") == 0
    doc = yaml.safe_load(ten.read_text())
    image = sitk.ReadImage(str(ten.parent / doc["targets"][0]["image"]))
    sitk.WriteImage(image * 1.01, str(tmp_path / "rescanned.nii.gz"))
    doc["targets"][0]["image"] = str(tmp_path / "rescanned.nii.gz")  # case_011 now names another scan
    other = ten.parent / "other.yaml"
    other.write_text(yaml.safe_dump(doc))
    assert _run(other, tmp_path / "out", "--set", "selection.k=3", "--target", "case_011") == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made from other inputs: case_011 (target:case_011:image)" in err
    assert "--force" in err
    assert _run(other, tmp_path / "out", "--set", "selection.k=3", "--target", "case_011", "--force") == 0
