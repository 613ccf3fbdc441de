"""Runs that scale: cached registrations, resuming a killed run, a Dask cluster, failure isolation, logs."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from atlasseg.cache import Cache
from atlasseg.cli import main
from atlasseg.config import load_config
from atlasseg.demo import make_demo_dataset
from atlasseg.manifest import load_manifest
from atlasseg.pipeline import jobs, run

RUN = importlib.import_module("atlasseg.pipeline.run")  # the module (the package's `run` is the function)

SERIAL = ["parallel.n_jobs=1", "parallel.itk_threads=1"]  # in this process: stages can be watched; bitwise repeatable


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("runs") / "data", dim=2, seed=3, n_atlases=4, n_targets=2)


def _config(*overrides):
    return load_config("demo", overrides=[*SERIAL, "selection.k=3", *overrides])


def _records(result):
    return [stage for record in result.record["registrations"].values() for stage in record.values()]


def _forbid(monkeypatch, *stages):
    def refuse(*args, **kwargs):
        raise AssertionError("registration ran although its result is cached")

    for stage in stages:
        monkeypatch.setattr(jobs, stage, refuse)


def _arrays(out, manifest, ids=None):
    return {
        t.id: sitk.GetArrayFromImage(sitk.ReadImage(str(out / t.id / "segmentation.nii.gz")))
        for t in manifest.targets
        if ids is None or t.id in ids
    }


def test_another_fusion_method_or_smaller_k_reuses_every_registration(data, tmp_path, monkeypatch):
    manifest = load_manifest(data)
    first = run(_config("fusion.method=majority"), manifest, out_dir=tmp_path / "a")
    assert not any(r.get("cached") for result in first for r in _records(result))
    _forbid(monkeypatch, "affine_stage", "nonrigid_stage")
    second = run(
        _config("fusion.method=staple", "selection.k=2", "evaluation.metrics=[dice]"), manifest, out_dir=tmp_path / "b"
    )
    assert all(r["cached"] for result in second for r in _records(result))
    assert [r.record["selected"] for r in second] == [r.record["selected"][:2] for r in first]


def test_a_changed_nonrigid_setting_recomputes_only_that_stage(data, tmp_path, monkeypatch):
    manifest = load_manifest(data)
    run(_config(), manifest, out_dir=tmp_path / "a")
    calls = []
    real = jobs.nonrigid_stage
    monkeypatch.setattr(jobs, "nonrigid_stage", lambda *a, **k: calls.append(1) or real(*a, **k))
    _forbid(monkeypatch, "affine_stage")
    (result, *_) = run(_config("registration.nonrigid.iterations=5"), manifest, out_dir=tmp_path / "b")
    assert len(calls) == 3 * len(manifest.targets)
    assert all("cached" not in r["nonrigid"] and r["affine"]["cached"] for r in result.record["registrations"].values())


def test_force_recomputes_and_a_changed_image_is_not_found_in_the_cache(data, tmp_path, monkeypatch):
    manifest = load_manifest(data)
    run(_config(), manifest, out_dir=tmp_path / "a")
    (first, *_) = run(_config(), manifest, out_dir=tmp_path / "a", force=True)
    assert not any(r.get("cached") for r in _records(first))

    target = manifest.targets[0]
    copy = tmp_path / "target.nii.gz"
    image = sitk.ReadImage(str(target.image))
    sitk.WriteImage(image + 0.01 * image, str(copy))  # other contents: other keys
    doc = {
        "atlases": [{"id": a.id, "image": str(a.image), "labels": str(a.labels)} for a in manifest.atlases],
        "targets": [{"id": target.id, "image": str(copy)}],
    }
    (tmp_path / "m.yaml").write_text(json.dumps(doc))
    (changed,) = run(_config(), load_manifest(tmp_path / "m.yaml"), out_dir=tmp_path / "c")
    assert not any(r.get("cached") for r in _records(changed))


def test_a_finished_target_is_not_segmented_again(data, tmp_path, monkeypatch):
    manifest = load_manifest(data)
    first = run(_config(), manifest, out_dir=tmp_path, target_ids=[manifest.targets[0].id])
    calls = []
    real = RUN.segment_target
    monkeypatch.setattr(RUN, "segment_target", lambda target, *a, **k: calls.append(target.id) or real(target, *a, **k))
    results = run(_config(), manifest, out_dir=tmp_path)
    assert calls == [t.id for t in manifest.targets[1:]]
    assert results[0].scores == first[0].scores and results[0].record == first[0].record
    assert set(json.loads((tmp_path / "run.json").read_text())["targets"]) == {t.id for t in manifest.targets}


def test_a_killed_run_resumes_and_ends_identical_to_an_uninterrupted_one(data, tmp_path):
    command = [
        sys.executable,
        "-m",
        "atlasseg",
        "-q",
        "run",
        "demo",
        "--manifest",
        str(data),
        "--set",
        "selection.k=3",
        *(arg for item in SERIAL for arg in ("--set", item)),
    ]
    env = {**os.environ, "ATLASSEG_CACHE_DIR": str(tmp_path / "cache")}
    reference = subprocess.run(
        [*command, "--out", str(tmp_path / "ref")],
        env={**env, "ATLASSEG_CACHE_DIR": str(tmp_path / "ref-cache")},
        capture_output=True,
        text=True,
    )
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "out"
    process = subprocess.Popen([*command, "--out", str(out)], env=env, start_new_session=True)
    entries = tmp_path / "cache" / "nonrigid"
    deadline = time.monotonic() + 120
    while not (entries.is_dir() and any(p.suffix == ".json" and p.name[0] != "." for p in entries.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    done_before = [p for p in entries.iterdir() if p.suffix == ".json" and p.name[0] != "."]

    resumed = subprocess.run([*command, "--out", str(out)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    manifest = load_manifest(data)
    for tid, array in _arrays(out, manifest).items():
        assert np.array_equal(array, _arrays(tmp_path / "ref", manifest)[tid])
    assert (out / "metrics.csv").read_text() == (tmp_path / "ref" / "metrics.csv").read_text()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    cached = sum(
        r["nonrigid"].get("cached", False) for t in record["targets"].values() for r in t["registrations"].values()
    )
    assert cached == len(done_before) >= 1
    assert not list(out.rglob(".tmp*"))


def test_a_dask_cluster_segments_exactly_like_loky(data, tmp_path):
    """On a real Dask cluster on the loopback interface (2 worker processes), started by the caller and named by
    its address, and on one the run starts itself."""
    distributed = pytest.importorskip("distributed")
    manifest = load_manifest(data)
    one = [manifest.targets[0].id]
    common = ["selection.k=3", "output.cache=false", "parallel.n_jobs=2", "parallel.itk_threads=1"]
    run(load_config("demo", overrides=common), manifest, out_dir=tmp_path / "loky", target_ids=one)
    loky = _arrays(tmp_path / "loky", manifest, one)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        run(
            load_config("demo", overrides=[*common, "parallel.backend=dask", f"parallel.scheduler={address}"]),
            manifest,
            out_dir=tmp_path / "cluster",
            target_ids=one,
        )
    run(
        load_config("demo", overrides=[*common, "parallel.backend=dask"]),
        manifest,
        out_dir=tmp_path / "local",
        target_ids=one,
    )
    for name in ("cluster", "local"):
        arrays = _arrays(tmp_path / name, manifest, one)
        assert all(np.array_equal(loky[t], arrays[t]) for t in loky), name


def test_an_unreachable_dask_scheduler_is_one_clear_error(data, tmp_path, capsys):
    pytest.importorskip("distributed")
    code = main(
        [
            "-q",
            "run",
            "demo",
            "--manifest",
            str(data),
            "--out",
            str(tmp_path),
            "--set",
            "parallel.backend=dask",
            "--set",
            "parallel.scheduler=tcp://127.0.0.1:9",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "parallel.scheduler: cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err


def test_a_target_that_cannot_be_segmented_fails_alone(data, tmp_path, capsys):
    manifest = load_manifest(data)
    far = tmp_path / "far.nii.gz"
    image = sitk.ReadImage(str(manifest.targets[0].image))
    image.SetOrigin(np.add(image.GetOrigin(), (500.0, 0.0)).tolist())  # no atlas overlaps it from an identity start
    sitk.WriteImage(image, str(far))
    doc = {
        "atlases": [{"id": a.id, "image": str(a.image), "labels": str(a.labels)} for a in manifest.atlases],
        "targets": [
            {"id": "far", "image": str(far)},
            {"id": "good", "image": str(manifest.targets[1].image), "labels": str(manifest.targets[1].labels)},
        ],
    }
    (tmp_path / "m.yaml").write_text(json.dumps(doc))
    code = main(
        [
            "-q",
            "run",
            "demo",
            "--manifest",
            str(tmp_path / "m.yaml"),
            "--out",
            str(tmp_path / "out"),
            "--set",
            "registration.affine.initialization=none",
            *(a for s in SERIAL for a in ("--set", s)),
        ]
    )
    assert code == 2
    assert "1 of 2 target(s) failed (far)" in capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["status"] == "failed" and record["failed_targets"] == ["far"]
    assert "only 0 atlas registration(s) succeeded" in record["targets"]["far"]["error"]
    assert record["targets"]["good"]["mean_dice"] > 0.8 and (tmp_path / "out" / "good" / "segmentation.nii.gz").exists()


def test_cache_info_and_clear(data, tmp_path, capsys):
    run(_config(), load_manifest(data), out_dir=tmp_path / "out")
    cache = Cache(os.environ["ATLASSEG_CACHE_DIR"])
    entries = cache.info()["stages"]
    assert entries["affine"]["entries"] == 2 * 4 and entries["nonrigid"]["entries"] == 2 * 3
    assert main(["cache", "info"]) == 0
    assert "affine" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "removed 14 cached registration(s)" in capsys.readouterr().out
    assert all(s["entries"] == 0 for s in cache.info()["stages"].values())


def test_verbose_log_file_holds_each_registrations_levels(data, tmp_path):
    log_file = tmp_path / "run.log"
    assert (
        main(
            [
                "-q",
                "-v",
                "--log-file",
                str(log_file),
                "run",
                "demo",
                "--manifest",
                str(data),
                "--out",
                str(tmp_path / "out"),
                *(a for s in SERIAL for a in ("--set", s)),
            ]
        )
        == 0
    )
    text = log_file.read_text()
    assert "non-rigid: metric" in text and "level 1:" in text and "mean Dice" in text


class _Terminal:
    """A stand-in for a terminal's stderr (tqdm measures its width through the file descriptor)."""

    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def fileno(self):
        return 2

    def isatty(self):
        return True


def test_progress_bars_show_fusion_and_still_draw_when_the_terminal_reports_no_width(data, tmp_path, monkeypatch):
    import atlasseg.parallel as parallel

    terminal = _Terminal()
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((0, 0)))
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(parallel, "progress_bars", True)
    manifest = load_manifest(data)
    run(_config(), manifest, out_dir=tmp_path, target_ids=[manifest.targets[0].id])
    bars = [line for line in terminal.text.replace("\r", "\n").splitlines() if "propagation and fusion:" in line]
    assert bars and all("/4 [" in line for line in bars)  # 3 candidates and the fusion itself
