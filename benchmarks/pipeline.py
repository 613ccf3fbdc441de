"""Real data, whole pipeline: atlasseg presets vs ANTs SyNQuick + joint label fusion and Greedy + majority vote.

    python benchmarks/pipeline.py [--datasets abdomen hippocampus cardiac] [--presets fast default]
        [--peers ants greedy] [--reuse-peers] [--set section.key=value ...]

Per dataset (the images of benchmarks/registration.py's DATASETS, written once to a temporary folder):
abdomen (CHAOS T2-SPIR, 7 cases) leave-one-out: each case (or the first `--targets`) segmented by the other 6; hippocampus: the first 14 ids
(sorted) are atlases, the next 10 targets; cardiac: 8 atlases, the next 7 targets (`--atlases`/`--targets`
override the last two). atlasseg runs `atlasseg.pipeline.run` per preset on a manifest of those files, with an
empty registration cache of its own, every target in one call (its time per target: that call's time / targets).
Peers register every (target, atlas) pair on the same images, all cores each: ANTs `antsRegistrationSyNQuick[s]`
(labels genericLabel, intensities linear) then `ants.joint_label_fusion` with `antsJointLabelFusion.sh`'s
defaults (patch radius 2, search radius 3, beta 2, alpha 0.1, Pearson-correlation patches, background a label)
inside the union of the warped labels dilated by 2 voxels; Greedy affine + deformable (as in
benchmarks/registration.py) then a majority vote. A peer's time per target: its registrations' and its fusion's
seconds.

Each peer pair is kept under benchmarks/results/peer_pairs/ keyed by the method, its registration settings, the SHA-256
of both images and the atlas labels; `--reuse-peers` reads them instead of registering again and the table
marks those rows "reused" (otherwise every number is from this invocation).

Prints per dataset and method: mean Dice per label and over labels (mean over targets), seconds per target,
atlasseg's peak memory (the run's largest per-stage and per-worker peak, MiB; the peers run inside this
process, whose peak includes every method before them, so theirs is not given), and how many atlasseg
registrations fold (any Jacobian <= 0 in the target's foreground). Writes
benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk
import yaml
from _common import RESULTS, write_json
from registration import DATA, DATASETS, SEED, ants_pair, available_cores, greedy_pair, load_case

from atlasseg.config import load_config
from atlasseg.evaluation import dice_per_label, mean_score
from atlasseg.manifest import load_manifest
from atlasseg.pipeline import run

SPLITS = {"hippocampus": (14, 10), "cardiac": (8, 7)}  # (atlases, targets); abdomen: leave-one-out
PEER_PAIRS = RESULTS / "peer_pairs"
JLF = {
    "rad": 2,
    "r_search": 3,
    "beta": 2,
    "rho": 0.1,
    "usecor": True,  # antsJointLabelFusion.sh: -p 2 -s 3 -b 2 -c 0.1
    "max_lab_plus_one": True,
}  # background votes as a label (ANTsPy otherwise gives every masked voxel a foreground label)


def _sha(image: sitk.Image) -> str:
    digest = hashlib.sha256(sitk.GetArrayViewFromImage(image).tobytes())
    digest.update(repr((image.GetOrigin(), image.GetSpacing(), image.GetDirection())).encode())
    return digest.hexdigest()


class PeerPairs:
    """A peer's registered pairs on disk: warped labels and image, and the seconds it took."""

    def __init__(self, method: str, settings: str, reuse: bool):
        self.method, self.settings, self.reuse = method, settings, reuse
        self.reused = 0

    def get(self, function, fixed, moving, labels):
        key = hashlib.sha256(f"{self.method}|{self.settings}|{_sha(fixed)}|{_sha(moving)}|{_sha(labels)}".encode())
        folder = PEER_PAIRS / key.hexdigest()[:24]
        if self.reuse and (folder / "pair.json").is_file():
            self.reused += 1
            seconds = json.loads((folder / "pair.json").read_text())["seconds"]
            return sitk.ReadImage(str(folder / "labels.nii.gz")), sitk.ReadImage(str(folder / "image.nii.gz")), seconds
        start = time.perf_counter()
        warped, image = function(fixed, moving, labels)
        seconds = time.perf_counter() - start
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(warped, str(folder / "labels.nii.gz"))
        sitk.WriteImage(image, str(folder / "image.nii.gz"))
        (folder / "pair.json").write_text(json.dumps({"method": self.method, "seconds": seconds}))
        return warped, image, seconds


def ants_jlf(fixed: sitk.Image, warped: list[tuple[sitk.Image, sitk.Image]]) -> sitk.Image:
    import ants

    union = sitk.BinaryDilate(
        sitk.Cast(sum(sitk.Cast(labels > 0, sitk.sitkUInt8) for labels, _ in warped) > 0, sitk.sitkUInt8),
        [2] * fixed.GetDimension(),
    )
    f = ants.from_sitk(sitk.Cast(fixed, sitk.sitkFloat32))
    mask = ants.from_sitk(sitk.Cast(union, sitk.sitkFloat32))
    out = ants.joint_label_fusion(
        f,
        mask,
        atlas_list=[ants.from_sitk(sitk.Cast(i, sitk.sitkFloat32)) for _, i in warped],
        label_list=[ants.from_sitk(sitk.Cast(lab, sitk.sitkFloat32)) for lab, _ in warped],
        **JLF,
    )
    result = sitk.Cast(sitk.Round(ants.to_sitk(out["segmentation"])), sitk.sitkUInt8)
    result.CopyInformation(fixed)
    return result


def majority(fixed: sitk.Image, warped: list[tuple[sitk.Image, sitk.Image]]) -> sitk.Image:
    from atlasseg.config import FusionConfig
    from atlasseg.fusion import make_fuser

    fuser = make_fuser(fixed, config=FusionConfig(method="majority"))
    for labels, _ in warped:
        fuser.add(labels)
    return fuser.result()


def write_cases(folder: Path, name: str, ids: list[str]) -> dict[str, tuple[Path, Path]]:
    files = {}
    for case in ids:
        image, labels = load_case(DATASETS[name], case)
        files[case] = (folder / f"{case}.nii.gz", folder / f"{case}_labels.nii.gz")
        sitk.WriteImage(image, str(files[case][0]))
        sitk.WriteImage(labels, str(files[case][1]))
    return files


def split(name: str, ids: list[str], args) -> list[tuple[str, list[str]]]:
    """(target, its atlases) pairs."""
    if name == "abdomen":  # each of the first --targets cases (all by default) segmented by the other six
        return [(t, [a for a in ids if a != t]) for t in ids[: args.targets or len(ids)]]
    n_atlases, n_targets = SPLITS[name]
    n_atlases, n_targets = args.atlases or n_atlases, args.targets or n_targets
    atlases = ids[:n_atlases]
    return [(t, atlases) for t in ids[n_atlases : n_atlases + n_targets]]


def run_atlasseg(preset: str, name: str, files, tasks, tmp: Path, overrides) -> dict:
    labels = DATASETS[name].labels

    def entry(i):
        return {"id": i, "image": str(files[i][0]), "labels": str(files[i][1])}

    atlas_ids = sorted({atlas for _, atlases in tasks for atlas in atlases})
    doc = {
        "labels": {v: f"label{v}" for v in labels},
        "atlases": [entry(i) for i in atlas_ids],
        "targets": [entry(t) for t, _ in tasks],
    }
    stem = f"{name}-{Path(preset).stem}"  # a preset may be a config file's path
    manifest_path = tmp / f"{stem}.yaml"
    manifest_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(
        preset, overrides=[f"output.cache_dir={tmp / f'cache-{stem}'}", "output.report=false", *overrides]
    )
    start = time.perf_counter()
    results = run(config, load_manifest(manifest_path), out_dir=tmp / f"out-{stem}")
    seconds = time.perf_counter() - start
    dice = {r.target_id: (r.dice or {v: 0.0 for v in labels}) for r in results}
    peaks, folded, registrations = [], 0, 0
    for r in results:
        peaks += [v for v in r.record.get("peak_memory_mb", {}).values() if v]
        for rec in r.record.get("registrations", {}).values():
            peaks += [
                v
                for stage in rec.values()
                if isinstance(stage, dict)
                for k, v in stage.items()
                if k == "worker_peak_mb" and v
            ]
            if "nonrigid" in rec:
                registrations += 1
                folded += rec["nonrigid"].get("folded_voxels", 0) > 0
    return {
        "dice": dice,
        "seconds_per_target": seconds / len(tasks),
        "peak_mb": max(peaks, default=None),
        "folded_pairs": folded,
        "pairs": registrations,
        "failed_targets": sum(r.error is not None for r in results),
    }


PEERS = {  # key: (method name, pair registration given the cores, fusion, registration settings keying kept pairs)
    "ants": ("ANTs SyNQuick + JLF", lambda cores: ants_pair(SEED), ants_jlf, "antsRegistrationSyNQuick[s]"),
    "greedy": ("Greedy + majority", lambda cores: greedy_pair(cores, SEED), majority, "100x50x10"),
}


def run_peer(key: str, name: str, tasks, cases, pairs: PeerPairs, cores: int) -> dict:
    labels = DATASETS[name].labels
    _, make, fuse, _ = PEERS[key]
    function = make(cores)
    dice, seconds = {}, []
    for target, atlases in tasks:
        fixed, truth = cases[target]
        warped, total = [], 0.0
        for atlas in atlases:
            moving, atlas_labels = cases[atlas]
            try:
                labels_out, image, pair_seconds = pairs.get(function, fixed, moving, atlas_labels)
            except Exception as err:  # noqa: BLE001 - a failed registration is a result here
                print(f"  {key} {target} <- {atlas} failed: {type(err).__name__}: {str(err)[:120]}", flush=True)
                continue
            total += pair_seconds
            warped.append((labels_out, image))
        start = time.perf_counter()
        fused = fuse(fixed, warped) if warped else None
        total += time.perf_counter() - start
        dice[target] = (
            dice_per_label(fused, truth, labels=list(labels)) if fused is not None else {v: 0.0 for v in labels}
        )
        seconds.append(total)
        print(f"  {key} {target}: {mean_score(dice[target]):.3f} {total:.0f}s", flush=True)
    return {
        "dice": dice,
        "seconds_per_target": statistics.fmean(seconds),
        "peak_mb": None,
        "folded_pairs": None,
        "pairs": sum(len(a) for _, a in tasks),
        "reused_pairs": pairs.reused,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=["abdomen", "hippocampus", "cardiac"])
    parser.add_argument("--presets", nargs="*", default=["fast", "default"])
    parser.add_argument("--peers", nargs="*", choices=list(PEERS), default=list(PEERS))
    parser.add_argument("--reuse-peers", action="store_true", help="read peer pairs kept by an earlier invocation")
    parser.add_argument("--atlases", type=int, default=None)
    parser.add_argument("--targets", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cores = available_cores()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(cores)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(cores)
    payload = {
        "presets": args.presets,
        "peers": args.peers,
        "reuse_peers": args.reuse_peers,
        "overrides": args.overrides,
        "cores": cores,
        "jlf": JLF,
        "datasets": {},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.datasets:
            ids = sorted(p.name[: -len(".nii.gz")] for p in (DATA / DATASETS[name].folder / "images").glob("*.nii.gz"))
            tasks = split(name, ids, args)
            used = sorted({target for target, _ in tasks} | {atlas for _, atlases in tasks for atlas in atlases})
            files = write_cases(tmp, name, used)
            cases = {c: (sitk.ReadImage(str(i)), sitk.ReadImage(str(lab))) for c, (i, lab) in files.items()}
            print(f"\n{name}: {len(tasks)} targets, {len(tasks[0][1])} atlases each", flush=True)
            methods = {}
            for preset in args.presets:
                methods[f"atlasseg {preset}"] = run_atlasseg(preset, name, files, tasks, tmp, args.overrides)
                print(
                    f"  atlasseg {preset}: {statistics.fmean(mean_score(d) for d in methods[f'atlasseg {preset}']['dice'].values()):.3f}",
                    flush=True,
                )
            for key in args.peers:
                label, _, _, settings = PEERS[key]
                methods[label] = run_peer(key, name, tasks, cases, PeerPairs(key, settings, args.reuse_peers), cores)
            for method, out in methods.items():
                per_label = {v: statistics.fmean(d[v] for d in out["dice"].values()) for v in DATASETS[name].labels}
                out["label_dice"] = per_label
                out["mean_dice"] = statistics.fmean(mean_score(d) for d in out["dice"].values())
                rows.append((name, method, out))
            payload["datasets"][name] = {"tasks": tasks, "methods": methods}
    print(
        f"\n{'dataset':12} {'method':22} {'mean Dice':>9}  {'per label':28} {'s/target':>8} {'peak MiB':>8} {'folded':>7}"
    )
    for name, method, out in rows:
        labels = " ".join(f"{v:.3f}" for v in out["label_dice"].values())
        peak = f"{out['peak_mb']:.0f}" if out["peak_mb"] else "-"
        folded = f"{out['folded_pairs']}/{out['pairs']}" if out["folded_pairs"] is not None else "-"
        note = f" (reused {out['reused_pairs']}/{out['pairs']} pairs)" if out.get("reused_pairs") else ""
        print(
            f"{name:12} {method:22} {out['mean_dice']:9.3f}  {labels:28} {out['seconds_per_target']:8.1f} "
            f"{peak:>8} {folded:>7}{note}"
        )
    print("written", write_json("pipeline", json.loads(json.dumps(payload, default=str))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
