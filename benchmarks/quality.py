"""How well the label-free quality estimate (atlasseg.quality) predicts the true Dice, on real data.

    python benchmarks/quality.py [--datasets hippocampus cardiac abdomen] [--config fast]
        [--set section.key=value ...] [--cases N ...] [--folds F ...] [--cache-dir DIR]

Data: ../shared/data/msd_hippocampus, ../shared/data/mscmrseg19_bssfp and
../shared/data/chaos_mr_t2spir (abdomen: liver, kidneys, spleen); the cardiac and abdominal
volumes downsampled in-plane to 128 × 128 voxels (slices kept; image linear, labels nearest),
written to a temporary folder.

Split: a dataset's first --cases ids, sorted, go round-robin into --folds folds (defaults:
hippocampus 24 cases in 3 folds, cardiac 20 in 2, abdomen all 7 in 7, i.e. leave-one-out).
Each fold's cases are the targets (their labels serve as ground truth only) and the other
cases the atlases: one `atlasseg.pipeline.run` per fold with `quality.enabled: true`, which
calibrates on `quality.calibration_atlases` of those atlases (each segmented by the others)
and predicts every target label's Dice. The registrations go through a cache of their own
(a temporary folder unless --cache-dir), so the calibration is computed, not read back.

Per dataset, over every (target, label): Pearson and Spearman correlation of predicted and
true Dice (pooled over labels, and the mean of the per-label Spearman); the mean absolute
error against the mean predicted error bar; and the flag: of the worst 10 % of true Dice
(at least one), the share with `review: true` at the configured `quality.review_below`,
with the share of the other labels flagged (false alarms), and the share caught by the
lowest predictions when as many of the others may be flagged as 20 % (the best threshold
that keeps false alarms at or below 20 %). Writes benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from _common import write_json
from fusion import dataset_entries
from scipy import stats

from atlasseg.cli import format_rows
from atlasseg.config import load_config
from atlasseg.manifest import load_manifest
from atlasseg.pipeline import run

DATASETS = {
    "hippocampus": {"folder": "msd_hippocampus", "labels": {1: "anterior", 2: "posterior"}, "cases": 24, "folds": 3},
    "cardiac": {"folder": "mscmrseg19_bssfp", "labels": {1: "LV myo", 2: "LV blood", 3: "RV blood"}, "cases": 20,
                "folds": 2, "in_plane": 128},
    "abdomen": {"folder": "chaos_mr_t2spir", "labels": {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"},
                "cases": 7, "folds": 7, "in_plane": 128},
}
WORST = 0.10  # the worst decile of true Dice is what the flag should catch
FALSE_ALARMS = 0.20


def run_fold(folder: Path, name: str, entries: list[dict], fold: int, folds: int, config) -> tuple[list[dict], dict]:
    """Segment fold ``fold``'s targets with the other cases as atlases: one row per target and label, and
    the run's calibration record."""
    targets = entries[fold::folds]
    atlases = [e for e in entries if e not in targets]
    path = folder / f"fold{fold}.yaml"
    path.write_text(yaml.safe_dump({"labels": DATASETS[name]["labels"], "atlases": atlases, "targets": targets},
                                   sort_keys=False))
    out = folder / f"out{fold}"
    run(config, load_manifest(path), out_dir=out, force=True)
    document = json.loads((out / "run.json").read_text())
    rows = []
    for tid, record in document["targets"].items():
        for value, q in record.get("quality", {}).items():
            true = (record.get("scores") or {}).get(value, {}).get("dice")
            if true is not None:
                rows.append({"target": tid, "label": int(value), "predicted": q["predicted_dice"], "error": q["error"],
                             "review": q["review"], "dice": true, "features": q["features"]})
    return rows, document["quality"]


def scores(rows: list[dict]) -> dict:
    """Correlations, errors and the flag's catch, over ``rows``."""
    predicted = np.array([r["predicted"] for r in rows])
    true = np.array([r["dice"] for r in rows])
    flagged = np.array([r["review"] for r in rows])
    worst = true <= np.quantile(true, WORST)
    if not worst.any():
        worst[np.argmin(true)] = True
    others = ~worst
    per_label = [stats.spearmanr([r["predicted"] for r in rows if r["label"] == v],
                                 [r["dice"] for r in rows if r["label"] == v]).statistic
                 for v in sorted({r["label"] for r in rows})]
    # The flag at its best threshold with false alarms <= 20 %: flag the lowest predictions, one more at a time.
    best = 0.0
    for threshold in np.unique(predicted):
        flag = predicted <= threshold
        if others.any() and flag[others].mean() > FALSE_ALARMS:
            break
        best = max(best, float(flag[worst].mean()))
    return {
        "n": len(rows), "pearson": float(stats.pearsonr(predicted, true).statistic),
        "spearman": float(stats.spearmanr(predicted, true).statistic),
        "spearman_per_label": float(np.nanmean(per_label)),
        "mae": float(np.mean(np.abs(predicted - true))), "mean_error_bar": float(np.mean([r["error"] for r in rows])),
        "worst": int(worst.sum()), "caught": float(flagged[worst].mean()),
        "false_alarms": float(flagged[others].mean()) if others.any() else math.nan,
        "caught_at_20": best,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--config", default="fast", help="preset or YAML (default: fast)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--cases", nargs="+", type=int, help="cases per dataset, in the order of --datasets")
    parser.add_argument("--folds", nargs="+", type=int, help="folds per dataset, in the order of --datasets")
    parser.add_argument("--cache-dir", help="registration cache (default: a temporary folder)")
    args = parser.parse_args(argv)
    config = load_config(args.config, overrides=["quality.enabled=true", "output.report=false", *args.overrides])
    results, table = {}, []
    with tempfile.TemporaryDirectory(prefix="atlasseg-quality-") as tmp:
        os.environ["ATLASSEG_CACHE_DIR"] = args.cache_dir or str(Path(tmp) / "cache")
        for number, name in enumerate(args.datasets):
            spec = DATASETS[name]
            count = args.cases[number] if args.cases else spec["cases"]
            folds = args.folds[number] if args.folds else spec["folds"]
            folder = Path(tmp) / name
            folder.mkdir()
            start = time.perf_counter()
            entries = dataset_entries(folder, spec, count)
            rows, calibrations = [], []
            for fold in range(folds):
                found, calibration = run_fold(folder, name, entries, fold, folds, config)
                rows += found
                calibrations.append(calibration)
            summary = {**scores(rows), "cases": len(entries), "folds": folds,
                       "seconds": round(time.perf_counter() - start, 1)}
            results[name] = {"summary": summary, "rows": rows, "calibrations": calibrations}
            table.append([name, summary["n"], f"{summary['pearson']:.2f}", f"{summary['spearman']:.2f}",
                          f"{summary['spearman_per_label']:.2f}", f"{summary['mae']:.3f}",
                          f"{summary['mean_error_bar']:.3f}", summary["worst"], f"{summary['caught']:.0%}",
                          f"{summary['false_alarms']:.0%}", f"{summary['caught_at_20']:.0%}", summary["seconds"]])
            print(f"{name}: {summary}", file=sys.stderr, flush=True)
            path = write_json("quality", {"config": config.to_dict(), "datasets": results})  # so far
    print(f"config {args.config} {' '.join(args.overrides)}; review_below {config.quality.review_below}, "
          f"calibration_atlases {config.quality.calibration_atlases}")
    print(format_rows(["dataset", "labels", "pearson", "spearman", "spearman/label", "MAE", "error bar", "worst",
                       "caught", "false alarms", "caught @20% FA", "s"], table))
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
