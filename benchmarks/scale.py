"""How a run scales with the atlas count, and what the registration cache saves.

    python benchmarks/scale.py [--atlases 5 10 20 40] [--jobs 1 2] [--repeats 1] [--synthetic]

One target segmented with 5, 10, 20 and 40 atlases (k = all, default config), with joblib
(loky) at n_jobs 1 and 2. Each run is a fresh `atlasseg run` process with a fresh cache;
then a second run with another fusion method (majority) in the same cache: every
registration comes from the cache. Peak memory is sampled every 50 ms over the whole
process tree (the run and its workers), and read from run.json for the main process
(the one that fuses). Data: MSD hippocampus (../shared/data/msd_hippocampus; target the
first id, atlases the next ones), or with --synthetic the 3D demo generator. Prints a
table, writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml
from _common import write_json

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd_hippocampus"


def real_manifest(folder: Path, n_atlases: int) -> Path:
    ids = sorted(p.name[: -len(".nii.gz")] for p in (DATA / "images").glob("*.nii.gz"))[: n_atlases + 1]
    entry = lambda i: {"id": i, "image": str(DATA / "images" / f"{i}.nii.gz"), "labels": str(DATA / "labels" / f"{i}.nii.gz")}
    doc = {"labels": {1: "anterior", 2: "posterior"}, "targets": [entry(ids[0])], "atlases": [entry(i) for i in ids[1:]]}
    path = folder / f"manifest_{n_atlases}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def synthetic_manifest(folder: Path, n_atlases: int) -> Path:
    from atlasseg.demo import make_demo_dataset

    return make_demo_dataset(folder / f"synthetic_{n_atlases}", dim=3, n_atlases=n_atlases, n_targets=1, seed=0)


def measure(command: list[str], env: dict) -> tuple[float, float]:
    """(seconds, peak MiB of the process tree's summed resident memory) of one command."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = process.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err}")
    return seconds, peak / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atlases", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (medians are reported)")
    parser.add_argument("--synthetic", action="store_true", help="the 3D demo generator instead of real data")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if not args.synthetic and not DATA.is_dir():
        print(f"no data at {DATA} (or use --synthetic)", file=sys.stderr)
        return 1

    rows = []
    print(f"{'atlases':>7} {'jobs':>4} {'s':>7} {'s/atlas':>7} {'tree MiB':>8} {'main MiB':>8} {'cached s':>8} "
          f"{'speed-up':>8} {'Dice':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in args.atlases:
            manifest = synthetic_manifest(tmp, n) if args.synthetic else real_manifest(tmp, n)
            for jobs in args.jobs:
                runs = []
                for repeat in range(args.repeats):
                    folder = tmp / f"{n}_{jobs}_{repeat}"
                    env = {**os.environ, "ATLASSEG_CACHE_DIR": str(folder / "cache")}
                    base = [sys.executable, "-m", "atlasseg", "-q", "run", "default", "--manifest", str(manifest),
                            "--set", "selection.k=all", "--set", f"parallel.n_jobs={jobs}",
                            *(a for o in args.overrides for a in ("--set", o))]
                    seconds, tree = measure([*base, "--out", str(folder / "first")], env)
                    cached, _ = measure([*base, "--out", str(folder / "second"), "--set", "fusion.method=majority"], env)
                    record = json.loads((folder / "first" / "run.json").read_text())
                    target = next(iter(record["targets"].values()))
                    runs.append({"seconds": seconds, "tree_peak_mb": tree, "main_peak_mb": record["peak_memory_mb"],
                                 "cached_seconds": cached, "mean_dice": target.get("mean_dice"),
                                 "stage_seconds": target["seconds"]})
                row = {"atlases": n, "jobs": jobs, "runs": runs,
                       **{key: statistics.median(r[key] for r in runs)
                          for key in ("seconds", "tree_peak_mb", "main_peak_mb", "cached_seconds")}}
                row["speed_up"] = row["seconds"] / row["cached_seconds"]
                dice = runs[0]["mean_dice"]
                rows.append(row)
                print(f"{n:7d} {jobs:4d} {row['seconds']:7.1f} {row['seconds'] / n:7.2f} {row['tree_peak_mb']:8.0f} "
                      f"{row['main_peak_mb']:8.0f} {row['cached_seconds']:8.1f} {row['speed_up']:8.1f} "
                      f"{'-' if dice is None else f'{dice:.3f}':>6}", flush=True)
    for jobs in args.jobs:
        mine = [r for r in rows if r["jobs"] == jobs]
        if len(mine) > 1:
            first, last = mine[0], mine[-1]
            print(f"n_jobs {jobs}: {last['atlases'] / first['atlases']:.0f}x the atlases -> "
                  f"{last['seconds'] / first['seconds']:.1f}x the time, {last['tree_peak_mb'] / first['tree_peak_mb']:.2f}x "
                  f"the tree's peak memory, {last['main_peak_mb'] / first['main_peak_mb']:.2f}x the main process's")
    print("written", write_json("scale", {"data": "synthetic" if args.synthetic else "msd_hippocampus",
                                          "args": vars(args), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
