"""The command line: exit codes, one-line errors, and the commands a user runs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from atlasseg.cli import build_parser, main
from atlasseg.demo import make_demo_dataset


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("cli") / "data", dim=2, n_atlases=3, n_targets=1, seed=2)


def test_validate_ok(manifest, capsys):
    assert main(["validate", "demo", "--manifest", str(manifest)]) == 0
    assert "3 atlases, 1 targets" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["validate", "demo", "--set", "selection.k=0"], "selection.k"),
        (["validate", "nonexistent.yaml"], "nonexistent.yaml: config file not found"),
        (["validate", "demo", "--set", "registration.affine.sampling=0.1"], "registration.affine.sampling"),
        (["validate", "demo", "--manifest", "missing_manifest.yaml"], "missing_manifest.yaml: manifest not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(manifest, capsys, argv, needle):
    if "--manifest" not in argv:
        argv = argv + ["--manifest", str(manifest)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_the_traceback(manifest):
    with pytest.raises(Exception, match="selection.k"):
        main(["--debug", "validate", "demo", "--manifest", str(manifest), "--set", "selection.k=0"])


@pytest.mark.parametrize(
    "argv",
    [
        ["-q", "-v", "--debug", "--log-file", "x.log", "validate", "demo"],
        ["validate", "demo", "-q", "-v", "--debug", "--log-file", "x.log"],
        ["-q", "--log-file", "x.log", "validate", "demo", "-v", "--debug"],
        ["-q", "-v", "--debug", "--log-file", "x.log", "manifest", "from-msd", "d.json"],
        ["manifest", "from-msd", "d.json", "-q", "-v", "--debug", "--log-file", "x.log"],
    ],
)
def test_global_flags_before_or_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.verbose, args.debug, args.log_file) == (True, True, True, "x.log")


def test_global_flags_default_off_on_every_command():
    args = build_parser().parse_args(["validate", "demo"])
    assert (args.quiet, args.verbose, args.debug, args.log_file) == (False, False, False, None)


def test_debug_and_log_file_after_the_command(manifest, tmp_path, capsys):
    log_file = tmp_path / "run.log"
    argv = ["validate", "demo", "--manifest", str(manifest), "-q", "--log-file", str(log_file)]
    assert main(argv) == 0 and log_file.exists()
    with pytest.raises(Exception, match="selection.k"):
        main(["validate", "demo", "--manifest", str(manifest), "--set", "selection.k=0", "--debug"])


def test_run_writes_outputs_and_prints_table(manifest, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "run", "demo", "--manifest", str(manifest), "--out", str(out), "--set", "selection.k=2"]) == 0
    printed = capsys.readouterr().out
    assert "mean" in printed and "nodule" in printed
    assert (out / "case_004" / "segmentation.nii.gz").exists()
    assert json.loads((out / "run.json").read_text())["config"]["selection"]["k"] == 2


def test_evaluate_prints_exact_dice(tmp_path, capsys):
    a = np.zeros((10, 10), np.uint8)
    b = np.zeros((10, 10), np.uint8)
    a[:, :4] = 1
    b[:, 2:8] = 1
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(b), str(tmp_path / "b.nii.gz"))
    argv = [
        "evaluate",
        str(tmp_path / "a.nii.gz"),
        str(tmp_path / "b.nii.gz"),
        "--labels",
        "1=organ",
        "--out",
        str(tmp_path / "ev"),
    ]
    assert main(argv) == 0
    assert "organ  0.4000   0.2500" in capsys.readouterr().out  # Dice 40/100·2, Jaccard 20/80
    row = (tmp_path / "ev" / "metrics.csv").read_text().splitlines()[1].split(",")
    assert row[1:5] == ["1", "organ", "0.400000", "0.250000"]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["scores"]["1"]["dice"] == 0.4
    assert row[0] == "a"  # the prediction's name, not its file name


def test_evaluate_names_a_runs_segmentation_by_its_target_or_by_id(tmp_path, capsys):
    labels = sitk.GetImageFromArray(np.eye(8, dtype=np.uint8))
    (tmp_path / "new01").mkdir()
    sitk.WriteImage(labels, str(tmp_path / "new01" / "segmentation.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "truth.nii.gz"))
    base = ["evaluate", str(tmp_path / "new01" / "segmentation.nii.gz"), str(tmp_path / "truth.nii.gz")]
    for extra, expected in (([], "new01"), (["--id", "case7"], "case7")):
        assert main([*base, "--out", str(tmp_path / "ev"), *extra]) == 0
        rows = (tmp_path / "ev" / "metrics.csv").read_text().splitlines()[1:]
        assert {r.split(",")[0] for r in rows} == {expected}


def test_demo_command_and_module_entry_point(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "atlasseg", "-q", "demo", "--dim", "2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "demo (2D, 6 atlases, 2 targets) finished" in done.stdout
    assert (tmp_path / "data" / "data_manifest.yaml").exists()
    assert (tmp_path / "results" / "metrics.csv").exists()


def test_ci_runs_the_readme_test_command():
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    readme_commands = [
        line for line in (repo / "README.md").read_text().splitlines() if line.startswith("python3 -m venv")
    ]
    assert len(readme_commands) == 2 and readme_commands[0].endswith("atlasseg demo")
    assert readme_commands[1] in (repo / ".ci" / "run").read_text().splitlines()


def test_register_writes_a_transform_other_tools_read(manifest, tmp_path, capsys):
    data = manifest.parent
    fixed, moving = data / "images" / "case_004.nii.gz", data / "images" / "case_001.nii.gz"
    labels = data / "labels" / "case_001.nii.gz"
    argv = ["register", str(fixed), str(moving), "--labels", str(labels), "--config", "demo", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "Jacobian" in capsys.readouterr().out
    names = {
        "warped.nii.gz",
        "transform.h5",
        "displacement.nii.gz",
        "jacobian.nii.gz",
        "record.json",
        "warped_labels.nii.gz",
    }
    assert {p.name for p in tmp_path.iterdir()} == names
    transform = sitk.ReadTransform(str(tmp_path / "transform.h5"))
    target = sitk.ReadImage(str(fixed))
    expected = sitk.Resample(sitk.ReadImage(str(moving)), target, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "warped.nii.gz"))),
        sitk.GetArrayFromImage(expected),
        atol=1e-4,
    )
    warped_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "warped_labels.nii.gz")))
    assert set(np.unique(warped_labels)) <= set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))))
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "jacobian.nii.gz"))).min() > 0
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["status"] == "ok" and set(record["registration"]) == {"affine", "nonrigid"}


def test_register_that_diverges_says_why_and_writes_only_the_record(manifest, tmp_path, capsys):
    data = manifest.parent
    argv = [
        "register",
        str(data / "images" / "case_004.nii.gz"),
        str(data / "images" / "case_001.nii.gz"),
        "--set",
        "registration.affine.learning_rate=50",
        "--set",
        "registration.affine.metric=mse",
        "--set",
        "registration.affine.shrink_factors=[1]",
        "--set",
        "registration.affine.smoothing_sigmas=[0]",
        "--set",
        "registration.affine.translation_search=0",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2
    assert "affine registration diverged" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
    assert json.loads((tmp_path / "record.json").read_text())["status"] == "diverged"


def test_select_prints_the_ranking_without_the_nonrigid_stage(manifest, capsys, monkeypatch):
    from atlasseg.pipeline import jobs

    def no_nonrigid(*args, **kwargs):
        raise AssertionError("select ran the non-rigid stage")

    monkeypatch.setattr(jobs, "nonrigid_stage", no_nonrigid)  # in-process: parallel.n_jobs=1
    argv = [
        "-q",
        "select",
        "demo",
        "--manifest",
        str(manifest),
        "--target",
        "case_004",
        "--set",
        "selection.k=2",
        "--set",
        "parallel.n_jobs=1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert sorted(r[1] for r in rows) == ["case_001", "case_002", "case_003"]
    assert [r[3] for r in rows] == ["yes", "yes", "no"]
    scores = [float(r[2]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert "selected 2 of 3 (k=2" in printed


def test_select_ranks_an_atlas_against_the_others(manifest, capsys):
    argv = ["-q", "select", "demo", "--manifest", str(manifest), "--target", "case_001", "--set", "selection.metric=mi"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 atlases ranked by mi" in printed and "case_001  " not in printed
    assert main(["select", "demo", "--manifest", str(manifest), "--target", "nobody"]) == 2
    assert "no target or atlas with id 'nobody'" in capsys.readouterr().err


def test_crossval_prints_dice_per_method_and_k_and_writes_tables(manifest, tmp_path, capsys):
    argv = [
        "-q",
        "crossval",
        "demo",
        "--manifest",
        str(manifest),
        "--k",
        "1",
        "all",
        "--methods",
        "majority",
        "staple",
        "--set",
        "registration.nonrigid.enabled=false",
        "--set",
        "parallel.n_jobs=1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "leave-one-out over 3 atlases (3 scored)" in printed
    rows = [line.split() for line in printed.splitlines() if line.startswith(("majority", "staple"))]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("majority", "1", "1.0"),
        ("majority", "all", "2.0"),
        ("staple", "1", "1.0"),
        ("staple", "all", "2.0"),
    ]
    assert all(0.5 < float(r[-2]) <= 1.0 for r in rows)  # mean Dice
    assert rows[0][3:-1] == rows[2][3:-1]  # one atlas: every method gives its labels
    assert {p.name for p in tmp_path.iterdir()} == {"crossval.csv", "crossval.json"}
    assert main(["crossval", "demo", "--manifest", str(manifest), "--k", "0"]) == 2
    assert "--k '0': expected an integer >= 1 or 'all'" in capsys.readouterr().err
