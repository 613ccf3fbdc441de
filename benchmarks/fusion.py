"""Fusion methods and k on real data, beside ANTs joint label fusion and random atlas choice.

    python benchmarks/fusion.py [--datasets hippocampus cardiac abdomen] [--targets 3] [--atlases N]
        [--ks 3 5 10 20 all] [--draws 20] [--no-ants] [--set section.key=value ...]
        [--jlf-variant fusion.key=value[,fusion.key=value] ...]

Data: ../shared/data/msd_hippocampus, ../shared/data/mscmrseg19_bssfp (the cardiac stacks
downsampled in-plane to 128 × 128 voxels (slices kept; image linear, labels nearest; same
origin and direction), written to a temporary folder) and ../shared/data/chaos_mr_t2spir (abdomen,
as is: 7 cases, so 3 targets and 4 atlases by default).

Split (fixed, not leave-one-out): of a dataset's ids, sorted, the first --targets are the
targets and the next --atlases the atlases (default: hippocampus 24; cardiac 10, which keeps
ANTs' fusion of all of them under half a minute a target; --atlases 25 takes all the rest). A k that is not below the number of
atlases is skipped when `all` is asked for (it is the same setting).

Per target, the cross-validation machinery (atlasseg.pipeline.prepare_case, as in `atlasseg
crossval`) registers every atlas once with the `default` preset — affine, scored for selection
(`selection` section: by default NCC within 2 mm of the atlas's mapped labels), then non-rigid
(demons) — and propagates it once; every fusion method and every k then fuses the best k
of the same candidates (the top k of that ranking; an atlas whose non-rigid stage fails its
checks is left out).

Beside atlasseg's methods with the default fusion parameters (`jlf`: radii `auto`, i.e. patch 2 and
search 3 as ANTs' below for small structures, 3 and 5 for structures >= 20 voxels across; patch and search radii count voxels of the finest axis, about the same mm along thicker
ones) and, on cardiac, `jlf` with its probability maps smoothed by fusion.probability_sigma 3 mm
before the arg-max, on the same candidates:
- `ants_jlf` (when antspyx is installed): ants.joint_label_fusion(target, mask, warped atlas
  intensities, beta=2, rad=2, label_list=warped labels, rho=0.01, usecor=False, r_search=3,
  nonnegative=False), images converted with ants.from_numpy on the target's geometry, the
  target and atlases normalised as atlasseg normalises them. The mask is the union of the k
  candidates' non-zero labels grown by r_search voxels (outside it every candidate, even
  shifted by the search, shows background). The ANTs wrapper's `segmentation` takes the
  arg-max over the non-zero labels' posteriors only (it never gives background inside the
  mask), so the label map is taken from its posteriors with background's posterior being
  1 − their sum, as antsJointFusion's own label image does.
- `ants_jlf, mm radii`, where the voxels are anisotropic (cardiac: 8 mm slices): the same, with
  ANTs' patch and search radii given per axis as atlasseg's are (rad=[2, 2, 1], r_search=3x3x1
  on cardiac), so that ANTs is not held back by patches five slices deep. The summary compares
  atlasseg's best method with the better of the two ANTs rows.
- each `--jlf-variant`: `jlf` again with those fusion overrides (e.g. larger search or patch radii, or
  smoothed probabilities), on the same candidates.
- `random majority`: majority vote over k atlases drawn at random from the registered ones
  (mean Dice over --draws draws, seeds 0…; draw d of every target makes one draw of the
  experiment, whose spread over draws is reported), against majority vote over the best-ranked k.

Columns: mean Dice per label over targets; `s/target`: seconds to segment a target with that
k — affine stage for every atlas (wall) + non-rigid of the best k (the sum of their measured
times / parallel jobs) + propagation (k's share) + that fusion; `fusion s`: the fusion alone;
`peak MB`: peak of memory allocated during the fusion, by tracemalloc (numpy and Python: all
of atlasseg's fusion; JLF's candidates wait in temporary files) and, for ANTs, the rise of the process's peak resident memory
(/proc/self/clear_refs; tracemalloc does not see C++). Writes benchmarks/results/fusion.json.
The default run took 6.5 minutes on 2 cores (2026-11-29, numpy demons; 15 to 28 minutes with
ITK's demons).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml
from _common import write_json
from scipy import ndimage

from atlasseg.cli import format_rows
from atlasseg.config import load_config
from atlasseg.crossval import parse_ks, score_setting
from atlasseg.evaluation import evaluate, mean_score
from atlasseg.fusion import METHODS, fuse
from atlasseg.fusion.jlf import voxel_radii
from atlasseg.manifest import load_manifest
from atlasseg.parallel import available_cores, thread_budget
from atlasseg.pipeline import prepare_case
from atlasseg.pipeline.outputs import json_safe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    "hippocampus": {"folder": "msd_hippocampus", "labels": {1: "anterior", 2: "posterior"}, "atlases": 24},
    "cardiac": {
        "folder": "mscmrseg19_bssfp",
        "labels": {1: "LV myo", 2: "LV blood", 3: "RV blood"},
        "atlases": 10,
        "in_plane": 128,
        "smooth_mm": 3.0,
    },
    "abdomen": {
        "folder": "chaos_mr_t2spir",
        "labels": {1: "liver", 2: "R kidney", 3: "L kidney", 4: "spleen"},
        "atlases": 4,
    },
}
ANTS = {"beta": 2, "rad": 2, "rho": 0.01, "usecor": False, "r_search": 3, "nonnegative": False}


def downsample(image: sitk.Image, labels: sitk.Image, size: int) -> tuple[sitk.Image, sitk.Image]:
    """In-plane to ``size`` × ``size`` voxels, slices kept; image linear, labels nearest; same origin and direction."""
    old_size, old_spacing = image.GetSize(), image.GetSpacing()
    grid = sitk.Image([size, size, old_size[2]], sitk.sitkFloat32)
    grid.SetSpacing([old_spacing[0] * old_size[0] / size, old_spacing[1] * old_size[1] / size, old_spacing[2]])
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    identity = sitk.Transform(3, sitk.sitkIdentity)
    return (
        sitk.Resample(image, grid, identity, sitk.sitkLinear, 0.0, sitk.sitkFloat32),
        sitk.Resample(labels, grid, identity, sitk.sitkNearestNeighbor, 0, labels.GetPixelID()),
    )


def dataset_entries(folder: Path, spec: dict, count: int) -> list[dict]:
    """Manifest entries of the first ``count`` cases (sorted ids) of the dataset ``spec`` names, downsampled
    in-plane into ``folder`` where ``spec`` has ``in_plane``."""
    data = SHARED / spec["folder"]
    ids = sorted(p.name[: -len(".nii.gz")] for p in (data / "images").glob("*.nii.gz"))[:count]
    entries = []
    for i in ids:
        image, labels = data / "images" / f"{i}.nii.gz", data / "labels" / f"{i}.nii.gz"
        if "in_plane" in spec:
            small = downsample(
                sitk.ReadImage(str(image), sitk.sitkFloat32), sitk.ReadImage(str(labels)), spec["in_plane"]
            )
            image, labels = folder / f"{i}.nii.gz", folder / f"{i}_labels.nii.gz"
            sitk.WriteImage(small[0], str(image))
            sitk.WriteImage(small[1], str(labels))
        entries.append({"id": i, "image": str(image), "labels": str(labels)})
    return entries


def write_manifest(folder: Path, name: str, *, targets: int, atlases: int) -> Path:
    spec = DATASETS[name]
    entries = dataset_entries(folder, spec, targets + atlases)
    doc = {"labels": spec["labels"], "atlases": entries[targets:], "targets": entries[:targets]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Peak:
    """Peak memory of a block: tracemalloc's peak and the rise of the process's peak RSS (MB)."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
            self.rss = _vm("VmRSS")
        except OSError:
            self.rss = None
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        self.traced = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        self.resident = None if self.rss is None else max(0.0, _vm("VmHWM") - self.rss)


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(key)


def ants_radii(spacing) -> dict:
    """ANTs' patch and search radii (x, y, z) spanning about the mm atlasseg's do on this grid."""
    patch = voxel_radii(ANTS["rad"], np.asarray(spacing)).tolist()
    search = voxel_radii(ANTS["r_search"], np.asarray(spacing)).tolist()
    return {"rad": patch, "r_search": "x".join(map(str, search))}


def ants_jlf(case, k, labels, params: dict):
    """ANTs joint label fusion on the best k candidates (``params``: ants.joint_label_fusion's
    keywords): Dice per label and seconds."""
    import ants

    chosen = case.candidates if k == "all" else case.candidates[: int(k)]
    reference = case.reference
    geometry = {
        "origin": reference.GetOrigin(),
        "spacing": reference.GetSpacing(),
        "direction": np.asarray(reference.GetDirection()).reshape(3, 3),
    }

    def to_ants(image):  # SimpleITK arrays are z, y, x; ANTs wants x, y, z
        return ants.from_numpy(np.ascontiguousarray(sitk.GetArrayFromImage(image).astype(np.float32).T), **geometry)

    start = time.perf_counter()
    stack = np.stack([sitk.GetArrayViewFromImage(lab) != 0 for _, lab, _ in chosen])
    mask = ndimage.binary_dilation(stack.any(axis=0), iterations=ANTS["r_search"])
    result = ants.joint_label_fusion(
        to_ants(reference),
        ants.from_numpy(np.ascontiguousarray(mask.T.astype(np.float32)), **geometry),
        [to_ants(img) for _, _, img in chosen],
        label_list=[to_ants(lab) for _, lab, _ in chosen],
        verbose=False,
        **params,
    )
    posteriors = np.stack([p.numpy().T for p in result["probabilityimages"]])  # back to z, y, x
    values = np.asarray([0] + list(result["segmentation_numbers"]))
    winner = values[np.argmax(np.concatenate([1.0 - posteriors.sum(axis=0, keepdims=True), posteriors]), axis=0)]
    winner[~mask] = 0
    seconds = time.perf_counter() - start
    segmentation = sitk.GetImageFromArray(winner.astype(np.uint8))
    segmentation.CopyInformation(case.truth)
    dice = {v: s["dice"] for v, s in evaluate(segmentation, case.truth, labels=labels).items()}
    return {"atlases": len(chosen), "dice": dice, "mean_dice": mean_score(dice), "seconds": seconds}


def random_majority(case, k, labels, draws, config):
    """Majority vote over k randomly chosen registered atlases, Dice averaged over ``draws`` seeds
    (``draws``: each draw's mean Dice over labels)."""
    n = len(case.candidates)
    chosen_k = n if k == "all" else min(int(k), n)
    majority = dataclasses.replace(config.fusion, method="majority")
    runs = []
    for seed in range(draws):
        pick = np.random.default_rng(seed).choice(n, size=chosen_k, replace=False)
        segmentation = fuse(case.reference, [case.candidates[i][1:] for i in sorted(pick)], config=majority)
        runs.append(
            {v: s["dice"] for v, s in evaluate(segmentation, case.truth, labels=labels, metrics=("dice",)).items()}
        )
    dice = {v: statistics.fmean(r[v] for r in runs) for v in runs[0]}
    return {
        "atlases": chosen_k,
        "dice": dice,
        "mean_dice": mean_score(dice),
        "seconds": math.nan,
        "draws": [mean_score(r) for r in runs],
    }


def registration_seconds(case, k, config) -> float:
    """Seconds to register a target's atlases for this k: affine for all (wall), non-rigid of the best k
    (their measured times over the parallel jobs), propagation (k's share)."""
    n = len(case.candidates)
    chosen = [aid for aid, _, _ in (case.candidates if k == "all" else case.candidates[: int(k)])]
    nonrigid = [case.ranking.records[aid].get("nonrigid", {}).get("seconds", 0.0) for aid in chosen]
    jobs, _ = thread_budget(config.parallel, max(1, len(chosen)))
    return (
        case.seconds["affine_and_scoring"]
        + sum(nonrigid) / jobs
        + case.seconds["propagation"] * len(chosen) / max(1, n)
    )


def run_dataset(name: str, args, tmp: Path, has_ants: bool) -> dict:
    spec = DATASETS[name]
    atlases = args.atlases if args.atlases is not None else spec["atlases"]
    manifest = load_manifest(write_manifest(tmp, name, targets=args.targets, atlases=atlases))
    overrides = list(args.overrides)
    config = load_config("default", overrides=overrides)
    labels = sorted(manifest.label_names)
    ks = parse_ks(args.ks)
    ks = [k for k in ks if k == "all" or k < len(manifest.atlases) or (k == len(manifest.atlases) and "all" not in ks)]
    variants = [("atlasseg " + m, m, config) for m in METHODS]
    if "smooth_mm" in spec:
        smooth = load_config("default", overrides=overrides + [f"fusion.probability_sigma={spec['smooth_mm']:g}"])
        variants.append((f"atlasseg jlf, smoothed {spec['smooth_mm']:g} mm", "jlf", smooth))
    for extra in args.jlf_variants:
        variants.append(
            (f"atlasseg jlf, {extra}", "jlf", load_config("default", overrides=overrides + extra.split(",")))
        )
    spacing = sitk.ReadImage(str(manifest.targets[0].image)).GetSpacing()
    ants_variants = {"ants_jlf": ANTS} if has_ants else {}
    if has_ants and ants_radii(spacing) != {
        "rad": [ANTS["rad"]] * 3,
        "r_search": "x".join([str(ANTS["r_search"])] * 3),
    }:
        ants_variants["ants_jlf, mm radii"] = {**ANTS, **ants_radii(spacing)}
    names = [v[0] for v in variants] + list(ants_variants) + ["random majority"]
    rows: dict[str, dict[str, list]] = {n: {str(k): [] for k in ks} for n in names}
    per_target = {}
    print(
        f"\n{name}: {len(manifest.targets)} targets, {len(manifest.atlases)} atlases; "
        f"registration: default preset{' with ' + ', '.join(overrides) if overrides else ''}",
        flush=True,
    )
    for target in manifest.targets:
        start = time.perf_counter()
        case = prepare_case(target, list(manifest.atlases), config, count=None, intensities=True)
        registered = time.perf_counter() - start
        print(
            f"  {target.id}: {len(case.candidates)} of {len(manifest.atlases)} atlases registered in "
            f"{registered:.0f} s ({len(case.ranking.dropped)} dropped)",
            flush=True,
        )
        per_target[target.id] = {
            "registered": [a for a, _, _ in case.candidates],
            "dropped": case.ranking.dropped,
            "ranking": case.ranking.table(config.selection.metric),
            "seconds": case.seconds,
            "settings": {},
        }
        if not case.candidates:
            continue
        for k in ks:
            base = registration_seconds(case, k, config)
            for variant, method, variant_config in variants:
                with Peak() as peak:
                    result = score_setting(case, method, k, variant_config, labels=labels)
                rows[variant][str(k)].append({**result, "peak_mb": peak.traced, "total": base + result["seconds"]})
            for variant, params in ants_variants.items():
                with Peak() as peak:
                    result = ants_jlf(case, k, labels, params)
                rows[variant][str(k)].append({**result, "peak_mb": peak.resident, "total": base + result["seconds"]})
            if k != "all":
                rows["random majority"][str(k)].append(
                    {**random_majority(case, k, labels, args.draws, config), "peak_mb": None, "total": math.nan}
                )
        per_target[target.id]["settings"] = {n: {k: v[-1] for k, v in by_k.items() if v} for n, by_k in rows.items()}
        del case
    return {
        "targets": per_target,
        "summary": print_tables(name, rows, labels, manifest.label_names),
        "overrides": overrides,
        "atlases": len(manifest.atlases),
    }


def print_tables(name: str, rows, labels, label_names) -> dict:
    summary, table = {}, []
    for method, by_k in rows.items():
        for k, results in by_k.items():
            if not results:
                continue

            def mean(key):
                return statistics.fmean(r[key] for r in results)

            dice = {v: _nanmean(r["dice"][v] for r in results) for v in labels}
            peaks = [r["peak_mb"] for r in results if r["peak_mb"] is not None]
            entry = {
                "dice": dice,
                "mean_dice": _nanmean(r["mean_dice"] for r in results),
                "atlases": mean("atlases"),
                "seconds_per_target": mean("total"),
                "fusion_seconds": mean("seconds"),
                "peak_mb": max(peaks) if peaks else None,
            }
            if "draws" in results[0]:  # the spread of the random choice: each draw's mean over targets
                per_draw = np.nanmean([r["draws"] for r in results], axis=0)
                entry.update(
                    sd_over_draws=float(per_draw.std()), draw_range=[float(per_draw.min()), float(per_draw.max())]
                )
            summary.setdefault(method, {})[k] = entry
            table.append(
                [
                    method,
                    k,
                    f"{entry['atlases']:.0f}",
                    *(f"{dice[v]:.3f}" for v in labels),
                    f"{entry['mean_dice']:.3f}",
                    _number(entry["seconds_per_target"], 1),
                    _number(entry["fusion_seconds"], 2),
                    _number(entry["peak_mb"], 0),
                ]
            )
    head = ["method", "k", "atlases", *(label_names[v] for v in labels), "mean", "s/target", "fusion s", "peak MB"]
    print(f"\n{name}: mean Dice over targets ({available_cores()} cores)")
    print(format_rows(head, table, left=2))
    ks = [k for k in next(iter(rows.values()))]

    def best(k, prefix):
        return max(
            (
                (e["mean_dice"], m)
                for m, by_k in summary.items()
                if m.startswith(prefix)
                for kk, e in by_k.items()
                if kk == k
            ),
            default=None,
        )

    lines = []
    for k in ks:
        ours, theirs = best(k, "atlasseg"), best(k, "ants_jlf")
        line = [k, f"{ours[0]:.3f} ({ours[1][len('atlasseg ') :]})"]
        line.append("-" if theirs is None else f"{theirs[0]:.3f} ({theirs[1]})")
        line.append(f"{summary['atlasseg majority'][k]['mean_dice']:.3f}")
        random = summary.get("random majority", {}).get(k)
        line.append(
            "-"
            if random is None
            else f"{random['mean_dice']:.3f} ± {random['sd_over_draws']:.3f} "
            f"({random['draw_range'][0]:.3f}–{random['draw_range'][1]:.3f})"
        )
        lines.append(line)
    print(
        f"\n{name}: best atlasseg method vs best ANTs JLF; majority vote over the best-ranked k vs k random atlases "
        "(mean ± sd over draws of the draw's mean over targets, and its range)"
    )
    print(format_rows(["k", "best atlasseg", "best ANTs JLF", "majority (ranked k)", "majority (random k)"], lines))
    return summary


def _nanmean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else math.nan


def _number(value, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--targets", type=int, default=3)
    parser.add_argument(
        "--atlases", type=int, help="atlases per dataset (default: hippocampus 24, cardiac 10, abdomen 4)"
    )
    parser.add_argument("--ks", nargs="+", default=["3", "5", "10", "20", "all"])
    parser.add_argument("--draws", type=int, default=20, help="random draws per k for the random-atlas majority vote")
    parser.add_argument("--no-ants", action="store_true", help="leave ANTs joint label fusion out")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--jlf-variant",
        dest="jlf_variants",
        action="append",
        default=[],
        metavar="KEY=VALUE[,...]",
        help="one more jlf row, fused with these fusion overrides (e.g. fusion.search_radius=5)",
    )
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"no data at {SHARED}", file=sys.stderr)
        return 1
    has_ants = False
    if not args.no_ants:
        try:
            import ants  # noqa: F401

            has_ants = True
        except ImportError:
            print("antspyx is not installed: ANTs joint label fusion left out (pip install antspyx)")
    payload = {"cores": available_cores(), "args": vars(args), "ants": ANTS if has_ants else None}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ATLASSEG_CACHE_DIR"] = str(Path(tmp) / "cache")  # every registration is timed, none reused
        for name in args.datasets:
            payload[name] = run_dataset(name, args, Path(tmp), has_ants)
    payload["seconds_total"] = time.perf_counter() - start
    payload["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\n{time.perf_counter() - start:.0f} s in all on {available_cores()} cores; "
        f"process peak resident memory {payload['max_rss_mb']:.0f} MB"
    )
    print("written", write_json("fusion", json_safe(payload)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(available_cores()))
    sys.exit(main())
