"""How well the label-free quality estimate (atlasseg.quality) predicts the true Dice, on real data.

    python benchmarks/quality.py [--datasets hippocampus cardiac abdomen] [--config fast]
        [--set section.key=value ...] [--cases N ...] [--folds F ...] [--cache-dir DIR]
    python benchmarks/quality.py --rescore benchmarks/results/quality.json [--set quality.key=value ...]

Data: ../shared/data/msd_hippocampus, ../shared/data/mscmrseg19_bssfp and
../shared/data/chaos_mr_t2spir (abdomen: liver, kidneys, spleen); the cardiac and abdominal
volumes downsampled in-plane to 128 × 128 voxels (slices kept; image linear, labels nearest),
written to a temporary folder.

Split: a dataset's first --cases ids, sorted, go round-robin into --folds folds (defaults:
hippocampus 40 cases in 2 folds, cardiac 20 in 2, abdomen all 7 in 7, i.e. leave-one-out).
Each fold's cases are the targets (their labels serve as ground truth only) and the other
cases the atlases: one `atlasseg.pipeline.run` per fold with `quality.enabled: true`, which
calibrates on `quality.calibration_atlases` of those atlases (each segmented by the others)
and predicts every target label's Dice. The registrations go through a cache of their own
(a temporary folder unless --cache-dir), so the calibration is computed, not read back.

Per dataset, over every (target, label): Pearson and Spearman correlation of predicted and
true Dice (pooled over labels, and the mean of the per-label Spearman); the mean absolute
error against the mean predicted error bar; and the flag: of the worst 10 % of true Dice
(at least one), the share with `review: true` as the run set it (`quality.review_quantile`,
or `quality.review_below` where given), with the share of the other labels flagged (false
alarms), and the share caught by the lowest predictions when as many of the others may be
flagged as 20 % (the best threshold that keeps false alarms at or below 20 %). In brackets:
95 % bootstrap intervals (percentiles over 2000 resamplings of the targets, each with all its
labels, which share its registrations). Writes benchmarks/results/quality.json.

--rescore segments nothing: it fits the current model (atlasseg.quality) on each fold's
calibration samples in an earlier run's quality.json, predicts and flags its rows again from
their recorded features and scores them (benchmarks/results/quality_rescored.json) — for a
change to the model or the review rule, which leaves the registrations and the features as
they were (each feature the model uses must be in the recorded ones).
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
from atlasseg.quality import fit, review_rule

DATASETS = {
    "hippocampus": {"folder": "msd_hippocampus", "labels": {1: "anterior", 2: "posterior"}, "cases": 40, "folds": 2},
    "cardiac": {
        "folder": "mscmrseg19_bssfp",
        "labels": {1: "LV myo", 2: "LV blood", 3: "RV blood"},
        "cases": 20,
        "folds": 2,
        "in_plane": 128,
    },
    "abdomen": {
        "folder": "chaos_mr_t2spir",
        "labels": {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"},
        "cases": 7,
        "folds": 7,
        "in_plane": 128,
    },
}
WORST = 0.10  # the worst decile of true Dice is what the flag should catch
FALSE_ALARMS = 0.20
BOOTSTRAP_DRAWS = 2000


def run_fold(folder: Path, name: str, entries: list[dict], fold: int, folds: int, config) -> tuple[list[dict], dict]:
    """Segment fold ``fold``'s targets with the other cases as atlases: one row per target and label, and
    the run's calibration record."""
    targets = entries[fold::folds]
    atlases = [e for e in entries if e not in targets]
    path = folder / f"fold{fold}.yaml"
    path.write_text(
        yaml.safe_dump({"labels": DATASETS[name]["labels"], "atlases": atlases, "targets": targets}, sort_keys=False)
    )
    out = folder / f"out{fold}"
    run(config, load_manifest(path), out_dir=out, force=True)
    document = json.loads((out / "run.json").read_text())
    rows = []
    for tid, record in document["targets"].items():
        for value, q in record.get("quality", {}).items():
            true = (record.get("scores") or {}).get(value, {}).get("dice")
            if true is not None:
                rows.append(
                    {
                        "target": tid,
                        "label": int(value),
                        "predicted": q["predicted_dice"],
                        "error": q["error"],
                        "review": q["review"],
                        "dice": true,
                        "features": q["features"],
                    }
                )
    return rows, document["quality"]


def scores(rows: list[dict]) -> dict:
    """Correlations, errors and the flag's catch, over ``rows``."""
    predicted = np.array([r["predicted"] for r in rows])
    true = np.array([r["dice"] for r in rows])
    per_label = [
        stats.spearmanr(
            [r["predicted"] for r in rows if r["label"] == v], [r["dice"] for r in rows if r["label"] == v]
        ).statistic
        for v in sorted({r["label"] for r in rows})
    ]
    return {
        "n": len(rows),
        "pearson": float(stats.pearsonr(predicted, true).statistic),
        **flag_scores(predicted, true, np.array([r["review"] for r in rows])),
        "spearman_per_label": float(np.nanmean(per_label)),
        "mae": float(np.mean(np.abs(predicted - true))),
        "mean_error_bar": float(np.mean([r["error"] for r in rows])),
    }


def flag_scores(predicted: np.ndarray, true: np.ndarray, flagged: np.ndarray) -> dict:
    """Spearman, and the flag's catch of the worst decile of ``true`` with its false alarms, as flagged and at the
    best threshold on ``predicted`` that keeps false alarms at or below 20 %."""
    worst = true <= np.quantile(true, WORST)
    if not worst.any():
        worst[np.argmin(true)] = True
    others = ~worst
    best = 0.0  # flag the lowest predictions, one more at a time
    for threshold in np.unique(predicted):
        flag = predicted <= threshold
        if others.any() and flag[others].mean() > FALSE_ALARMS:
            break
        best = max(best, float(flag[worst].mean()))
    return {
        "spearman": float(stats.spearmanr(predicted, true).statistic),
        "worst": int(worst.sum()),
        "caught": float(flagged[worst].mean()),
        "false_alarms": float(flagged[others].mean()) if others.any() else math.nan,
        "caught_at_20": best,
    }


def bootstrap(rows: list[dict], *, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict:
    """95 % percentile intervals of :func:`flag_scores` over ``draws`` resamplings of the targets (with
    replacement, each drawn target with all its labels: a target's labels share its registrations)."""
    targets = sorted({r["target"] for r in rows})
    by_target = [[r for r in rows if r["target"] == t] for t in targets]
    rng = np.random.default_rng(seed)
    found: dict[str, list[float]] = {}
    for _ in range(draws):
        drawn = [r for i in rng.integers(len(targets), size=len(targets)) for r in by_target[i]]
        result = flag_scores(
            np.array([r["predicted"] for r in drawn]),
            np.array([r["dice"] for r in drawn]),
            np.array([r["review"] for r in drawn]),
        )
        for name in ("spearman", "caught", "false_alarms", "caught_at_20"):
            found.setdefault(name, []).append(result[name])
    return {name: [float(v) for v in np.nanpercentile(values, [2.5, 97.5])] for name, values in found.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--config", default="fast", help="preset or YAML (default: fast)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--cases", nargs="+", type=int, help="cases per dataset, in the order of --datasets")
    parser.add_argument("--folds", nargs="+", type=int, help="folds per dataset, in the order of --datasets")
    parser.add_argument("--cache-dir", help="registration cache (default: a temporary folder)")
    parser.add_argument(
        "--rescore",
        metavar="JSON",
        help="segment nothing: refit the current quality model on the "
        "calibration samples of an earlier run's quality.json, predict its rows again and score them",
    )
    args = parser.parse_args(argv)
    config = load_config(args.config, overrides=["quality.enabled=true", "output.report=false", *args.overrides])
    results, table = {}, []
    if args.rescore:
        document = json.loads(Path(args.rescore).read_text())
        for name, data in document["datasets"].items():
            rows = rescore(data["rows"], data["calibrations"], config)
            results[name] = summarise(
                name,
                rows,
                data["calibrations"],
                table,
                cases=data["summary"]["cases"],
                folds=len(data["calibrations"]),
                seconds=math.nan,
            )
        path = write_json(
            "quality_rescored", {"config": config.to_dict(), "rescored": args.rescore, "datasets": results}
        )
    else:
        path = segment_and_score(args, config, results, table)
    rule = (
        f"review_below {config.quality.review_below}"
        if config.quality.review_below is not None
        else f"review_quantile {config.quality.review_quantile}"
    )
    print(
        f"config {args.config} {' '.join(args.overrides)}; {rule}, "
        f"calibration_atlases {config.quality.calibration_atlases}"
    )
    print(
        format_rows(
            [
                "dataset",
                "labels",
                "pearson",
                "spearman",
                "spearman/label",
                "MAE",
                "error bar",
                "worst",
                "caught",
                "false alarms",
                "caught @20% FA",
                "s",
            ],
            table,
        )
    )
    print(f"\nwritten {path}")
    return 0


def segment_and_score(args, config, results: dict, table: list) -> Path:
    """Each of ``args.datasets`` split into folds, segmented and scored into ``results`` and ``table``."""
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
            results[name] = summarise(
                name,
                rows,
                calibrations,
                table,
                cases=len(entries),
                folds=folds,
                seconds=round(time.perf_counter() - start, 1),
            )
            path = write_json("quality", {"config": config.to_dict(), "datasets": results})  # so far
    return path


def rescore(rows: list[dict], calibrations: list[dict], config) -> list[dict]:
    """``rows`` predicted and flagged again by the model :func:`atlasseg.quality.fit` gives each fold's
    calibration samples, under ``config``'s review rule. A row's fold is its target's place among the
    targets sorted by id, modulo the folds, as :func:`run_fold` splits them."""
    models = [fit(c["samples"]) for c in calibrations]
    rules = [review_rule(m, config.quality) for m in models]
    order = sorted({r["target"] for r in rows})
    out = []
    for r in rows:
        fold = order.index(r["target"]) % len(calibrations)
        predicted = models[fold].predict(r["features"])
        out.append(
            {**r, "predicted": predicted, "error": models[fold].error, "review": predicted < rules[fold]["below"]}
        )
    return out


def summarise(name: str, rows: list[dict], calibrations: list[dict], table: list, **extra) -> dict:
    """A dataset's scores (with their bootstrap intervals), rows and calibrations; its line added to ``table``."""
    summary = {**scores(rows), "ci95": bootstrap(rows), **extra}
    ci = summary["ci95"]
    table.append(
        [
            name,
            summary["n"],
            f"{summary['pearson']:.2f}",
            _with_ci(summary, ci, "spearman", "{:.2f}"),
            f"{summary['spearman_per_label']:.2f}",
            f"{summary['mae']:.3f}",
            f"{summary['mean_error_bar']:.3f}",
            summary["worst"],
            _with_ci(summary, ci, "caught", "{:.0%}"),
            _with_ci(summary, ci, "false_alarms", "{:.0%}"),
            _with_ci(summary, ci, "caught_at_20", "{:.0%}"),
            summary["seconds"],
        ]
    )
    print(f"{name}: {summary}", file=sys.stderr, flush=True)
    return {"summary": summary, "rows": rows, "calibrations": calibrations}


def _with_ci(summary: dict, ci: dict, name: str, form: str) -> str:
    low, high = ci[name]
    return f"{form.format(summary[name])} [{form.format(low)}, {form.format(high)}]"


if __name__ == "__main__":
    sys.exit(main())
