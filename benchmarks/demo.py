"""Demo data: atlasseg vs the no-registration baseline, 2D and 3D; wall time of `atlasseg demo`.

    python benchmarks/demo.py [--repeats 3]

Prints a table (mean Dice over targets, seconds) and writes benchmarks/results/demo.json.
Times are medians of --repeats runs in this process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import AFFINE_ONLY, summarise, write_json

from atlasseg.config import load_config
from atlasseg.demo import make_demo_dataset
from atlasseg.manifest import load_manifest
from atlasseg.pipeline import run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows, payload = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for dim in (3, 2):
            start = time.perf_counter()
            manifest = load_manifest(make_demo_dataset(Path(tmp) / f"data{dim}", dim=dim))
            generate = time.perf_counter() - start
            for name, preset, overrides in (
                ("atlasseg", "demo", []),
                ("affine only", "demo", AFFINE_ONLY),
                ("no registration", "baseline", []),
            ):
                config = load_config(preset, overrides=overrides)
                times = []
                for repeat in range(args.repeats):
                    start = time.perf_counter()
                    results = run(config, manifest, out_dir=Path(tmp) / f"out{dim}-{name}-{repeat}")
                    times.append(time.perf_counter() - start)
                summary = summarise(results)
                seconds = statistics.median(times)
                stages = {
                    k: statistics.fmean(r.record["seconds"].get(k, 0.0) for r in results)
                    for k in results[0].record["seconds"]
                }
                rows.append((f"{dim}D", name, summary["mean_dice"], seconds, generate + seconds))
                payload[f"{dim}D/{name}"] = {
                    **summary,
                    "seconds_median": seconds,
                    "seconds_runs": times,
                    "generate_seconds": generate,
                    "stage_seconds_per_target": stages,
                }
    print(f"{'dim':4} {'method':16} {'mean Dice':>9} {'run s':>7} {'demo s':>7}")
    for dim, name, dice, seconds, total in rows:
        print(f"{dim:4} {name:16} {dice:9.3f} {seconds:7.1f} {total:7.1f}")
    for dim in ("3D", "2D"):
        print(
            f"{dim} time per stage per target (s):",
            {k: round(v, 2) for k, v in payload[f"{dim}/atlasseg"]["stage_seconds_per_target"].items()},
        )
    print("written", write_json("demo", payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
