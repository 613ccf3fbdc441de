"""Real data: MSD Task04 hippocampus (../shared/data/msd_hippocampus), a dozen cases.

    python benchmarks/hippocampus.py [--cases 12] [--targets 4] [--offset 0] [--set section.key=value ...]

Of the ids (sorted), `cases` starting at `offset` are used: the first `cases - targets`
are atlases, the rest targets. Images differ
in intensity scale by orders of magnitude and some have another origin: the run
checks that atlasseg copes. Prints Dice per target for atlasseg with each fusion method,
affine only and no registration (majority vote), with seconds per target; writes benchmarks/results/hippocampus.json.
The registration cache starts empty for each invocation: the first fusion method's time includes
registering, the later methods reuse those registrations (as a user's second run would).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import AFFINE_ONLY, summarise, write_json

from atlasseg.config import load_config
from atlasseg.fusion import METHODS
from atlasseg.manifest import load_manifest
from atlasseg.pipeline import run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd_hippocampus"


def write_manifest(folder: Path, *, cases: int, targets: int, offset: int) -> Path:
    ids = sorted(p.name[: -len(".nii.gz")] for p in (DATA / "images").glob("*.nii.gz"))[offset : offset + cases]

    def entry(i):
        return {"id": i, "image": str(DATA / "images" / f"{i}.nii.gz"), "labels": str(DATA / "labels" / f"{i}.nii.gz")}

    doc = {
        "labels": {1: "anterior", 2: "posterior"},
        "atlases": [entry(i) for i in ids[: cases - targets]],
        "targets": [entry(i) for i in ids[cases - targets :]],
    }
    path = folder / "data_manifest.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"no data at {DATA}", file=sys.stderr)
        return 1
    payload = {"cases": args.cases, "targets": args.targets, "offset": args.offset, "overrides": args.overrides}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ATLASSEG_CACHE_DIR"] = str(Path(tmp) / "cache")
        manifest = load_manifest(write_manifest(Path(tmp), cases=args.cases, targets=args.targets, offset=args.offset))
        print(f"{len(manifest.atlases)} atlases, {len(manifest.targets)} targets")
        print(f"{'method':26} {'mean Dice':>9} {'anterior':>9} {'posterior':>9} {'s/target':>9}")
        methods = [(f"atlasseg {m}", "default", [f"fusion.method={m}"]) for m in METHODS]
        for name, preset, overrides in methods + [
            ("affine only", "default", AFFINE_ONLY),
            ("no registration", "baseline", []),
        ]:
            config = load_config(preset, overrides=overrides + args.overrides)
            start = time.perf_counter()
            results = run(config, manifest, out_dir=Path(tmp) / name.replace(" ", "_"))
            per_target = (time.perf_counter() - start) / len(results)
            label_means = [statistics.fmean(r.dice[v] for r in results) for v in (1, 2)]
            summary = summarise(results)
            print(
                f"{name:26} {summary['mean_dice']:9.3f} {label_means[0]:9.3f} {label_means[1]:9.3f} {per_target:9.1f}"
            )
            payload[name] = {
                **summary,
                "label_mean_dice": dict(zip(("anterior", "posterior"), label_means)),
                "seconds_per_target": per_target,
                "stage_seconds": {r.target_id: r.record["seconds"] for r in results},
            }
    print("written", write_json("hippocampus", payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
