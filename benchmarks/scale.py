"""How a target's cost grows with the atlas library, with and without prescreening, and against ANTs.

    python benchmarks/scale.py [--dataset hippocampus|cardiac] [--targets 3] [--atlases 10 20 50 100 185]
                               [--ants 14] [--set section.key=value ...]

Per library size n (the first 2 × targets ids are the targets, the next n the library; n is capped at what
is left), in a fresh cache, with the default config (``selection.prescreen`` as configured):

1. ``first``: the first batch of targets, each a fresh ``atlasseg run`` process: the library's reference
   space is built here (by the first target);
2. ``warm``: a second batch of as many targets, on the warm cache (every atlas-side result reused): the
   per-target cost a user of a large library pays;
3. ``exhaustive``: the second batch again with ``selection.prescreen=all`` (every atlas registered onto every
   target and ranked there), for its Dice beside the prescreened one and the share of its selected atlases
   that prescreening selected too; skipped where the library is no larger than ``prescreen`` (the same run).
   It runs in the cache the first two batches filled (the prescreened atlases' pairwise affines and the
   non-rigid registrations of atlases both select are reused), so its time is not an exhaustive run's cost.

Seconds per target are medians over the batch of the per-stage seconds in run.json (their sum: ``s/target``);
``wall s/target`` is the command's wall time over the batch (start-up included). Peak memory is sampled every
50 ms over the process tree (the run and its workers). With ``--ants N``: ANTs on the first batch with the
first N atlases of the library, antsRegistrationSyNQuick[s] per atlas then ants.joint_label_fusion (the
parameters of benchmarks/fusion.py), in this process, timed per target; and atlasseg with the same N atlases
in a fresh cache, for the ratio. Prints the tables, writes benchmarks/results/scale_<dataset>.json. Data:
../shared/data/msd_hippocampus or ../shared/data/mscmrseg19_bssfp.
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

import numpy as np
import psutil
import SimpleITK as sitk
import yaml
from _common import write_json
from scipy import ndimage

from atlasseg.cli import format_rows
from atlasseg.evaluation import evaluate, mean_score
from atlasseg.imageio import normalize_intensity

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    "hippocampus": ("msd_hippocampus", {1: "anterior", 2: "posterior"}),
    "cardiac": ("mscmrseg19_bssfp", {1: "lv_myocardium", 2: "lv_blood_pool", 3: "rv_blood_pool"}),
}


def manifest(folder: Path, name: str, dataset: str, targets: list[str], atlases: list[str]) -> Path:
    data, labels = DATASETS[dataset]

    def entry(i):
        return {
            "id": i,
            "image": str(DATA / data / "images" / f"{i}.nii.gz"),
            "labels": str(DATA / data / "labels" / f"{i}.nii.gz"),
        }

    path = folder / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"labels": labels, "targets": [entry(i) for i in targets], "atlases": [entry(i) for i in atlases]},
            sort_keys=False,
        )
    )
    return path


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


def batch(manifest_path: Path, out: Path, cache: Path, overrides: list[str]) -> dict:
    """One ``atlasseg run`` over a manifest's targets: timings, memory, Dice, selections."""
    env = {**os.environ, "ATLASSEG_CACHE_DIR": str(cache)}
    command = [
        sys.executable,
        "-m",
        "atlasseg",
        "-q",
        "run",
        "default",
        "--manifest",
        str(manifest_path),
        "--out",
        str(out),
        *(a for o in overrides for a in ("--set", o)),
    ]
    wall, tree = measure(command, env)
    targets = json.loads((out / "run.json").read_text())["targets"]
    stages = sorted({s for t in targets.values() for s in t["seconds"]})
    return {
        "targets": len(targets),
        "wall_per_target": wall / len(targets),
        "tree_peak_mb": tree,
        "per_target": statistics.median(sum(t["seconds"].values()) for t in targets.values()),
        "stages": {s: statistics.median(t["seconds"].get(s, 0.0) for t in targets.values()) for s in stages},
        "mean_dice": statistics.mean(t["mean_dice"] for t in targets.values()),
        "selected": {tid: t["selected"] for tid, t in targets.items()},
    }


def ants_batch(dataset: str, targets: list[str], atlases: list[str]) -> dict:
    """ANTs SyNQuick[s] of every atlas onto each target, then ANTs joint label fusion; seconds and Dice."""
    import ants
    from fusion import ANTS

    data, names = DATASETS[dataset]

    def read(kind, i):
        return sitk.ReadImage(str(DATA / data / kind / f"{i}.nii.gz"), sitk.sitkFloat32)

    # Intensities on atlasseg's scale (ANTs JLF's weights on raw MR intensities segment far worse), and
    # SyNQuick's sampling seeded, as benchmarks/registration.py does (unseeded, it diverges now and then).
    def image(i):
        return ants.from_sitk(normalize_intensity(read("images", i)))

    ants.config._random_seed = 42
    seconds, dice = [], []
    for tid in targets:
        start = time.perf_counter()
        fixed = image(tid)
        warped, labels = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for aid in atlases:
                reg = ants.registration(
                    fixed, image(aid), type_of_transform="antsRegistrationSyNQuick[s]", outprefix=f"{tmp}/{aid}"
                )
                warped.append(reg["warpedmovout"])
                labels.append(
                    ants.apply_transforms(
                        fixed, ants.from_sitk(read("labels", aid)), reg["fwdtransforms"], interpolator="genericLabel"
                    )
                )
        union = np.any([lab.numpy() != 0 for lab in labels], axis=0)
        mask = fixed.new_image_like(ndimage.binary_dilation(union, iterations=ANTS["r_search"]).astype(np.float32))
        result = ants.joint_label_fusion(fixed, mask, warped, label_list=labels, verbose=False, **ANTS)
        # The most probable label, background being 1 − the others' sum (as in benchmarks/fusion.py).
        posteriors = np.stack([p.numpy() for p in result["probabilityimages"]])
        values = np.asarray([0] + list(result["segmentation_numbers"]))
        winner = values[np.argmax(np.concatenate([1.0 - posteriors.sum(axis=0, keepdims=True), posteriors]), axis=0)]
        winner[mask.numpy() == 0] = 0
        seconds.append(time.perf_counter() - start)
        truth = sitk.Cast(read("labels", tid), sitk.sitkUInt8)
        segmentation = sitk.GetImageFromArray(np.ascontiguousarray(winner.T).astype(np.uint8))  # x, y, z → z, y, x
        segmentation.CopyInformation(truth)
        scores = evaluate(segmentation, truth, labels=sorted(names), metrics=("dice",))
        dice.append(mean_score({v: s["dice"] for v, s in scores.items()}))
    return {"per_target": statistics.median(seconds), "mean_dice": statistics.mean(dice), "atlases": len(atlases)}


def overlap(ours: dict, theirs: dict) -> float:
    """The share of the exhaustive run's selected atlases that the prescreened run selected too."""
    return statistics.mean(len(set(ours[t]) & set(theirs[t])) / max(1, len(theirs[t])) for t in theirs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="hippocampus")
    parser.add_argument("--targets", type=int, default=3, help="targets per batch (two batches)")
    parser.add_argument("--atlases", type=int, nargs="+", default=[10, 20, 50, 100, 185])
    parser.add_argument("--ants", type=int, default=0, metavar="N", help="also ANTs and atlasseg on N atlases")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    folder = DATA / DATASETS[args.dataset][0]
    if not folder.is_dir():
        print(f"no data at {folder}", file=sys.stderr)
        return 1
    from atlasseg.config import load_config

    prescreen = load_config("default", overrides=args.overrides).selection.prescreen
    ids = sorted(p.name[: -len(".nii.gz")] for p in (folder / "images").glob("*.nii.gz"))
    first, second, pool = ids[: args.targets], ids[args.targets : 2 * args.targets], ids[2 * args.targets :]
    rows, table = [], []
    head = [
        "atlases",
        "first s/target",
        "warm s/target",
        "wall s/target",
        "affine+scoring",
        "prescreen",
        "non-rigid",
        "fusion",
        "tree MiB",
        "Dice",
        "exhaustive Dice",
        "exhaustive s/target",
        "same selection",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in dict.fromkeys(min(n, len(pool)) for n in args.atlases):
            library = pool[:n]
            cache = tmp / f"cache_{n}"
            runs = {
                "first": batch(
                    manifest(tmp, f"first_{n}", args.dataset, first, library), tmp / f"first_{n}", cache, args.overrides
                ),
                "warm": batch(
                    manifest(tmp, f"second_{n}", args.dataset, second, library),
                    tmp / f"warm_{n}",
                    cache,
                    args.overrides,
                ),
            }
            if prescreen != "all" and n > prescreen:
                runs["exhaustive"] = batch(
                    tmp / f"second_{n}.yaml",
                    tmp / f"exhaustive_{n}",
                    cache,
                    [*args.overrides, "selection.prescreen=all"],
                )
            warm, exhaustive = runs["warm"], runs.get("exhaustive", runs["warm"])
            rows.append({"atlases": n, **runs})
            table.append(
                [
                    n,
                    f"{runs['first']['per_target']:.2f}",
                    f"{warm['per_target']:.2f}",
                    f"{warm['wall_per_target']:.2f}",
                    *(
                        f"{warm['stages'].get(s, 0.0):.2f}"
                        for s in ("affine_and_scoring", "prescreen", "nonrigid", "fusion")
                    ),
                    f"{max(r['tree_peak_mb'] for r in runs.values()):.0f}",
                    f"{warm['mean_dice']:.4f}",
                    f"{exhaustive['mean_dice']:.4f}",
                    f"{exhaustive['per_target']:.2f}",
                    f"{overlap(warm['selected'], exhaustive['selected']):.2f}",
                ]
            )
            print(format_rows(head, table[-1:]), flush=True)
        ants_row = None
        if args.ants:
            library = pool[: args.ants]
            ours = batch(
                manifest(tmp, "ants_ours", args.dataset, first, library),
                tmp / "ants_ours",
                tmp / "cache_ants",
                args.overrides,
            )
            theirs = ants_batch(args.dataset, first, library)
            ants_row = {"atlasseg": ours, "ants": theirs}
    print(
        f"\n{args.dataset}: {args.targets} + {args.targets} targets, default config (selection.prescreen "
        f"{prescreen}){', ' + ' '.join(args.overrides) if args.overrides else ''}"
    )
    print(format_rows(head, table))
    if len(rows) > 1:
        small = next((r for r in rows if r["atlases"] >= 20), rows[0])
        large = rows[-1]
        print(
            f"warm s/target, {large['atlases']} atlases / {small['atlases']}: "
            f"{large['warm']['per_target'] / small['warm']['per_target']:.2f}x; tree peak memory "
            f"{large['warm']['tree_peak_mb'] / small['warm']['tree_peak_mb']:.2f}x"
        )
    if ants_row:
        ours, theirs = ants_row["atlasseg"], ants_row["ants"]
        print(
            format_rows(
                ["method", "atlases", "s/target", "wall s/target", "Dice"],
                [
                    [
                        "atlasseg default",
                        args.ants,
                        f"{ours['per_target']:.2f}",
                        f"{ours['wall_per_target']:.2f}",
                        f"{ours['mean_dice']:.4f}",
                    ],
                    [
                        "ANTs SyNQuick[s] + JLF",
                        args.ants,
                        f"{theirs['per_target']:.2f}",
                        "",
                        f"{theirs['mean_dice']:.4f}",
                    ],
                ],
            )
        )
        print(
            f"atlasseg / ANTs time per target: {ours['per_target'] / theirs['per_target']:.3f} "
            f"(wall, start-up included: {ours['wall_per_target'] / theirs['per_target']:.3f})"
        )
    print("written", write_json(f"scale_{args.dataset}", {"args": vars(args), "rows": rows, "ants": ants_row}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
