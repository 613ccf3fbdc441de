"""Which atlas-ranking score predicts which atlases segment a target well, on real data.

    python benchmarks/selection.py [--datasets hippocampus cardiac] [--targets N] [--atlases N]
        [--ks 3 5 7 10] [--draws 20]

Data and split as in benchmarks/fusion.py (cardiac downsampled in-plane to 128 × 128): of a
dataset's ids, sorted, the first --targets are targets and the next --atlases the atlases
(default: hippocampus 18 targets × 24 atlases, cardiac 10 × 10). Each target's atlases are
registered once with the `default` preset (affine, then non-rigid for every atlas) and
propagated; an atlas's quality is the mean Dice over labels of its own propagated labels
against the target's truth.

Each ranking score is computed for every (target, atlas) pair from the same affine transforms
(atlasseg.selection.score_atlas with that SelectionConfig), plus one score after the
non-rigid stage: NCC of the warped atlas with the target within 2 mm of the warped labels
(what a second ranking of the registered atlases would see). Columns:
- `rho`: Spearman rank correlation between score and atlas Dice over a target's atlases,
  mean over targets (± its standard deviation over targets);
- `MV k`: mean Dice (over labels, then targets) of the majority vote of the k best-scored
  atlases; `random`: of k atlases drawn at random (mean over --draws draws; the spread is
  the standard deviation of the draws' means over targets); `oracle`: of the k atlases
  with the best Dice.
Writes benchmarks/results/selection.json. The default run took 5 minutes on 2 cores (15 with ITK's demons).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from _common import write_json
from fusion import DATASETS, SHARED, write_manifest
from scipy import ndimage, stats

from atlasseg.cli import format_rows
from atlasseg.config import FusionConfig, SelectionConfig, load_config
from atlasseg.evaluation import evaluate, mean_score
from atlasseg.fusion import fuse
from atlasseg.imageio import normalize_intensity, read_image, read_labels
from atlasseg.manifest import load_manifest
from atlasseg.parallel import available_cores
from atlasseg.pipeline import prepare_case
from atlasseg.pipeline.outputs import json_safe
from atlasseg.selection import score_atlas
from atlasseg.similarity import ncc

DEFAULT = SelectionConfig()
SCORES = {
    "ncc, whole image, 3 mm grid (old default)": SelectionConfig(roi="none", grid_spacing=3.0),
    "ncc, whole image, 1 mm": SelectionConfig(roi="none"),
    "mi, whole image, 1 mm": SelectionConfig(metric="mi", roi="none"),
    "ncc, labels' box + 10 mm, 3 mm": SelectionConfig(roi="labels", roi_margin=10.0, grid_spacing=3.0),
    "ncc, labels' box, 1 mm": SelectionConfig(roi="labels", roi_margin=0.0),
    "ncc, near labels 0 mm, 1 mm": SelectionConfig(roi_margin=0.0),
    "ncc, near labels 2 mm, 1 mm (default)": DEFAULT,
    "ncc, near labels 4 mm, 1 mm": SelectionConfig(roi_margin=4.0),
    "ncc, near labels 2 mm, 2 mm": SelectionConfig(grid_spacing=2.0),
    "mi, near labels 2 mm, 1 mm": SelectionConfig(metric="mi"),
    "mse, near labels 2 mm, 1 mm": SelectionConfig(metric="mse"),
}
AFTER = "after non-rigid: ncc near warped labels 2 mm"
MAJORITY = FusionConfig(method="majority")


def atlas_dice(labels: sitk.Image, truth: sitk.Image, values) -> float:
    return mean_score({v: s["dice"] for v, s in evaluate(labels, truth, labels=values, metrics=("dice",)).items()})


def after_nonrigid(case) -> list[float]:
    """NCC of each warped atlas with the target within 2 mm of that atlas's warped labels."""
    target = sitk.GetArrayViewFromImage(case.reference)
    spacing = np.asarray(case.reference.GetSpacing())[::-1]
    out = []
    for _, labels, warped in case.candidates:
        near = ndimage.distance_transform_edt(sitk.GetArrayViewFromImage(labels) == 0, sampling=spacing) <= 2.0
        out.append(ncc(target[near], sitk.GetArrayViewFromImage(warped)[near]))
    return out


def majority_dice(case, picks, values) -> float:
    return atlas_dice(
        fuse(case.reference, [case.candidates[i][1:] for i in picks], config=MAJORITY), case.truth, values
    )


def run_dataset(name: str, args, tmp: Path) -> dict:
    targets = args.targets or {"hippocampus": 18, "cardiac": 10}[name]
    atlases = args.atlases or {"hippocampus": 24, "cardiac": 10}[name]
    manifest = load_manifest(write_manifest(tmp, name, targets=targets, atlases=atlases))
    config = load_config("default")
    values = sorted(manifest.label_names)
    ks = [k for k in args.ks if k < len(manifest.atlases)]  # k = all atlases: every ranking gives the same vote
    by_id = {a.id: a for a in manifest.atlases}
    print(f"\n{name}: {len(manifest.targets)} targets × {len(manifest.atlases)} atlases", flush=True)
    names = [*SCORES, AFTER]
    rho = {n: [] for n in names}
    mv = {n: {k: [] for k in ks} for n in [*names, "oracle"]}
    random = {k: [] for k in ks}  # per target: Dice per draw
    seconds = {n: 0.0 for n in SCORES}
    for target in manifest.targets:
        start = time.perf_counter()
        case = prepare_case(target, list(manifest.atlases), config, count=None, intensities=True)
        ids = [aid for aid, _, _ in case.candidates]
        quality = np.asarray([atlas_dice(labels, case.truth, values) for _, labels, _ in case.candidates])
        method = config.registration.normalization
        fixed = normalize_intensity(read_image(target.image), method=method)
        moving = {a: normalize_intensity(read_image(by_id[a].image), method=method) for a in ids}
        labels = {a: read_labels(by_id[a].labels) for a in ids}
        scores = {}
        for score, selection in SCORES.items():
            clock = time.perf_counter()
            scores[score] = [
                score_atlas(fixed, moving[a], case.ranking.affine[a], config=selection, labels=labels[a]) for a in ids
            ]
            seconds[score] += time.perf_counter() - clock
        scores[AFTER] = after_nonrigid(case)
        for score in names:
            rho[score].append(float(stats.spearmanr(scores[score], quality).statistic))
        orders = {n: np.argsort(-np.asarray(s), kind="stable") for n, s in scores.items()}
        orders["oracle"] = np.argsort(-quality, kind="stable")
        rng = np.random.default_rng(0)
        for k in ks:
            for n, order in orders.items():
                mv[n][k].append(majority_dice(case, order[:k], values))
            random[k].append(
                [
                    majority_dice(case, rng.choice(len(ids), size=min(k, len(ids)), replace=False), values)
                    for _ in range(args.draws)
                ]
            )
        print(
            f"  {target.id}: {len(ids)} atlases, {time.perf_counter() - start:.0f} s; rho old default "
            f"{rho[names[0]][-1]:+.2f}, default {rho['ncc, near labels 2 mm, 1 mm (default)'][-1]:+.2f}",
            flush=True,
        )
        del case
    pairs = len(manifest.targets) * len(manifest.atlases)
    return report(name, rho, mv, random, {n: s / pairs for n, s in seconds.items()}, ks, args.draws)


def report(name, rho, mv, random, seconds, ks, n_draws) -> dict:
    """Print the table; the summary for the JSON."""
    summary = {}
    rows = []
    n_targets = len(next(iter(rho.values())))
    draws = {k: np.mean(random[k], axis=0) for k in ks}  # per draw, mean over targets
    for n in [*rho, "oracle"]:
        entry = {"mv": {str(k): statistics.fmean(mv[n][k]) for k in ks}}
        if n in rho:
            entry.update(rho=statistics.fmean(rho[n]), rho_sd=statistics.pstdev(rho[n]))
        if n in seconds:
            entry["seconds_per_pair"] = seconds[n]
        summary[n] = entry
        rows.append(
            [
                n,
                f"{entry['rho']:+.3f} ± {entry['rho_sd']:.2f}" if n in rho else "-",
                *(f"{entry['mv'][str(k)]:.4f}" for k in ks),
                _ms(seconds.get(n)),
            ]
        )
    rows.append(
        ["random (mean ± sd over draws)", "-", *(f"{draws[k].mean():.4f} ± {draws[k].std():.4f}" for k in ks), "-"]
    )
    summary["random"] = {
        "mv": {str(k): float(draws[k].mean()) for k in ks},
        "sd_over_draws": {str(k): float(draws[k].std()) for k in ks},
        "draws": n_draws,
    }
    print(f"\n{name}: ranking score vs atlas Dice after non-rigid ({n_targets} targets; {available_cores()} cores)")
    print(format_rows(["score", "rho", *(f"MV {k}" for k in ks), "ms/pair"], rows, left=2))
    return summary


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--targets", type=int, help="targets per dataset (default: hippocampus 18, cardiac 10)")
    parser.add_argument("--atlases", type=int, help="atlases per dataset (default: hippocampus 24, cardiac 10)")
    parser.add_argument("--ks", nargs="+", type=int, default=[3, 5, 7, 10])
    parser.add_argument("--draws", type=int, default=20, help="random draws per k")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"no data at {SHARED}", file=sys.stderr)
        return 1
    payload = {
        "cores": available_cores(),
        "args": vars(args),
        "scores": {n: dataclasses.asdict(c) for n, c in SCORES.items()},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ATLASSEG_CACHE_DIR"] = str(Path(tmp) / "cache")  # every registration is timed, none reused
        for name in args.datasets:
            payload[name] = run_dataset(name, args, Path(tmp))
    payload["seconds_total"] = time.perf_counter() - start
    print(f"\n{payload['seconds_total']:.0f} s in all")
    print("written", write_json("selection", json_safe(payload)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(available_cores()))
    sys.exit(main())
