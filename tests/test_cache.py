"""The registration cache is not trusted: checksums on every read, a private folder, a size cap with LRU eviction."""

import json
import logging
import os
import stat
import time
from collections import OrderedDict

import numpy as np
import pytest
import SimpleITK as sitk

import atlasseg.pipeline as pipeline
from atlasseg.cache import IN_USE_SECONDS, Cache
from atlasseg.cli import main
from atlasseg.config import load_config
from atlasseg.demo import make_demo_dataset
from atlasseg.imageio import normalize_intensity, read_image
from atlasseg.manifest import load_manifest
from atlasseg.pipeline import jobs

SERIAL = ["parallel.n_jobs=1", "parallel.itk_threads=1", "selection.k=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("cache-data") / "data", dim=2, seed=6, n_atlases=3, n_targets=1)


def _entries(root, stage, suffix):
    return sorted(p for p in (root / stage).iterdir() if p.suffix == suffix and not p.name.startswith("."))


def _cached_flags(result, stage):
    return [r[stage].get("cached", False) for r in result.record["registrations"].values()]


def _damage_then_rerun(data, tmp_path, damage, stage):
    """Run, damage every entry of ``stage`` with ``damage(json_path, h5_path)``, run again: (first, second) results."""
    manifest = load_manifest(data)
    config = load_config("demo", overrides=SERIAL)
    (first,) = pipeline.run(config, manifest, out_dir=tmp_path / "a")
    root = Cache(os.environ["ATLASSEG_CACHE_DIR"]).root
    for json_path in _entries(root, stage, ".json"):
        damage(json_path, json_path.with_suffix(".h5"))
    (second,) = pipeline.run(config, manifest, out_dir=tmp_path / "b")
    return first, second


def _garble(h5):
    """Bytes inside the HDF5 file changed (its structure left readable: the transform's numbers change)."""
    raw = bytearray(h5.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(64)
    h5.write_bytes(bytes(raw))


def test_garbled_bytes_inside_a_nonrigid_entry_are_detected_and_recomputed(data, tmp_path, caplog):
    first, second = _damage_then_rerun(data, tmp_path, lambda j, h5: _garble(h5), "nonrigid")
    assert "does not match its checksum" in caplog.text
    assert not any(_cached_flags(second, "nonrigid")) and all(_cached_flags(second, "affine"))
    assert second.scores == first.scores


def test_an_edited_affine_entry_is_detected_and_recomputed(data, tmp_path, caplog):
    def edit(json_path, h5):
        transform = sitk.ReadTransform(str(h5))
        parameters = list(transform.GetParameters())
        parameters[-1] += 5.0  # a shift of 5 mm: still a valid transform file
        transform.SetParameters(parameters)
        sitk.WriteTransform(transform, str(h5))

    first, second = _damage_then_rerun(data, tmp_path, edit, "affine")
    assert "does not match its checksum" in caplog.text
    assert not any(_cached_flags(second, "affine"))
    assert second.scores == first.scores


def test_an_edited_score_is_detected(data, tmp_path, caplog):
    def edit(json_path, h5):
        document = json.loads(json_path.read_text())
        document["outcome"]["score"] = 1.0
        json_path.write_text(json.dumps(document))

    first, second = _damage_then_rerun(data, tmp_path, edit, "affine")
    assert "record does not match its checksum" in caplog.text
    assert second.record["ranking"] == first.record["ranking"]


def test_a_truncated_entry_is_recomputed_without_hdf5_diagnostics(tmp_path, capfd, caplog):
    cache = Cache(tmp_path / "cache")
    transform = sitk.Euler2DTransform((0.0, 0.0), 0.1, (1.0, 2.0))
    cache.store("nonrigid", "k1", transform, {"record": {"metric": "ncc"}})
    h5 = cache.path("nonrigid", "k1").with_suffix(".h5")
    h5.write_bytes(h5.read_bytes()[:200])
    capfd.readouterr()
    assert cache.load("nonrigid", "k1") is None
    assert "HDF5" not in capfd.readouterr().err and "does not match its checksum" in caplog.text
    assert not h5.exists()  # removed: the next store writes it afresh
    cache.store("nonrigid", "k1", transform, {"record": {"metric": "ncc"}})
    loaded, outcome = cache.load("nonrigid", "k1")
    assert loaded.GetParameters() == transform.GetParameters() and outcome["record"] == {"metric": "ncc"}


def test_the_cache_folder_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        Cache(tmp_path / "new" / "cache").store("affine", "k", None, {"failure": {"reason": "x"}})
    finally:
        os.umask(old)
    for folder in (tmp_path / "new" / "cache", tmp_path / "new" / "cache" / "affine"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def _fill(cache, n, *, age):
    """``n`` entries of about 1 KiB, the i-th last used ``age - i`` seconds ago (entry 0 the least recently used)."""
    now = time.time()
    payload = "x" * 1000
    for i in range(n):
        cache.store("affine", f"k{i}", None, {"failure": {"reason": payload}})
        stamp = now - age + i
        os.utime(cache.path("affine", f"k{i}").with_suffix(".json"), (stamp, stamp))


def test_eviction_keeps_the_cache_under_its_cap_least_recently_used_first(tmp_path):
    cache = Cache(tmp_path / "cache", max_bytes=5000)
    _fill(cache, 10, age=2 * IN_USE_SECONDS)
    assert cache.size() > 10_000
    assert cache.load("affine", "k0") is not None  # used now: the most recently used, and in use
    removed, freed = cache.evict()
    assert cache.size() <= 5000 and removed >= 5 and freed > 0
    left = {p.stem for p in _entries(cache.root, "affine", ".json")}
    assert "k0" in left and "k9" in left and "k1" not in left  # k1..: the least recently used went first


def test_eviction_never_removes_an_entry_in_use(tmp_path, caplog):
    cache = Cache(tmp_path / "cache", max_bytes=1000)
    _fill(cache, 4, age=5)  # all used seconds ago: held by a run
    assert cache.evict() == (0, 0)
    assert len(_entries(cache.root, "affine", ".json")) == 4 and "in entries in use" in caplog.text


def test_a_run_evicts_down_to_output_cache_max_gb_after_each_target(data, tmp_path, monkeypatch):
    manifest = load_manifest(data)
    cache = Cache(os.environ["ATLASSEG_CACHE_DIR"])
    _fill(cache, 20, age=2 * IN_USE_SECONDS)  # stale entries of earlier runs, 20 KiB
    config = load_config("demo", overrides=[*SERIAL, "output.cache_max_gb=0.00001"])  # about 10 KiB
    pipeline.run(config, manifest, out_dir=tmp_path / "out")
    left = {p.stem for p in _entries(cache.root, "affine", ".json")}
    assert not any(f"k{i}" in left for i in range(20))  # the stale ones went
    assert len(left) == 3  # this run's own affine entries, in use, stayed


def test_cache_prune_and_info_cli(tmp_path, monkeypatch, capsys):
    cache = Cache(os.environ["ATLASSEG_CACHE_DIR"])
    _fill(cache, 6, age=2 * IN_USE_SECONDS)
    json_path = cache.path("affine", "k5").with_suffix(".json")
    json_path.write_text(json_path.read_text().replace("xxx", "yyy", 1))  # damaged: pruned whatever its age
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "cap 20 GiB" in out
    assert main(["cache", "prune", "--max-gb", "0.000003"]) == 0  # about 3 KiB
    out = capsys.readouterr().out
    assert "removed 1 damaged and 3 least recently used" in out
    assert {p.stem for p in _entries(cache.root, "affine", ".json")} == {"k3", "k4"}
    assert main(["cache", "prune", "--max-gb", "-1"]) == 2


def test_an_entry_of_an_older_format_is_not_used(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="atlasseg")
    cache = Cache(tmp_path / "cache")
    folder = cache.root / "affine"
    folder.mkdir(parents=True)
    (folder / "k.json").write_text(json.dumps({"ok": False, "failure": {"reason": "old"}}))
    assert cache.load("affine", "k") is None and "no checksums" in caplog.text
    assert cache.size() == 0  # removed


def test_an_entrys_arrays_are_checksummed_with_it(tmp_path, caplog):
    import numpy as np

    cache = Cache(tmp_path / "cache")
    arrays = {"values": np.arange(12, dtype=np.float32).reshape(3, 4), "region": np.eye(3, 4, dtype=bool)}
    cache.store("library", "k", sitk.Euler2DTransform(), {"record": {}}, arrays=arrays)
    assert cache.load("library", "k") is not None
    assert {n: a.tolist() for n, a in cache.load_arrays("library", "k").items()} == {
        n: a.tolist() for n, a in arrays.items()
    }
    npz = cache.path("library", "k").with_suffix(".npz")
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    assert cache.load("library", "k") is None and "arrays k.npz does not match its checksum" in caplog.text
    assert cache.size() == 0  # the whole entry removed: computed again


def test_a_process_reads_each_image_once_and_a_changed_one_again(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "_MEMO", OrderedDict())
    rng = np.random.default_rng(3)
    paths = {name: tmp_path / f"{name}.nii.gz" for name in "ab"}
    for path in paths.values():
        sitk.WriteImage(sitk.GetImageFromArray(rng.random((6, 7)).astype(np.float32)), str(path))
    reads = []
    monkeypatch.setattr(jobs, "read_image", lambda p: reads.append(p.name) or read_image(p))
    first = jobs.load_normalized(paths["a"], "percentile")
    first.SetOrigin((5.0, 5.0))  # a caller's change to its copy leaves the kept image alone
    again = jobs.load_normalized(paths["a"], "percentile")
    jobs.load_normalized(paths["b"], "percentile")
    assert reads == ["a.nii.gz", "b.nii.gz"] and again.GetOrigin() == (0.0, 0.0)
    assert np.array_equal(
        sitk.GetArrayViewFromImage(again),
        sitk.GetArrayViewFromImage(normalize_intensity(read_image(paths["a"]), method="percentile")),
    )

    sitk.WriteImage(sitk.GetImageFromArray(rng.random((6, 7)).astype(np.float32)), str(paths["a"]))
    stamp = paths["a"].stat().st_mtime_ns + 10**9
    os.utime(paths["a"], ns=(stamp, stamp))  # a new modification time even on a coarse clock
    changed = jobs.load_normalized(paths["a"], "percentile")
    jobs.load_normalized(paths["b"], "percentile")
    assert reads == ["a.nii.gz", "b.nii.gz", "a.nii.gz"]  # only the changed file is read again
    assert not np.array_equal(sitk.GetArrayViewFromImage(changed), sitk.GetArrayViewFromImage(again))
