"""Real data, pairwise: atlasseg presets vs ANTs SyN, Greedy, ConvexAdam and FireANTs — Dice of propagated labels
and seconds per pair.

    python benchmarks/registration.py [--datasets hippocampus cardiac abdomen] [--targets 3] [--atlases 5] [--offset 0]
        [--presets fast default accurate] [--peers ants greedy convexadam fireants] [--set section.key=value ...]

Data: ../shared/data/msd_hippocampus and ../shared/data/chaos_mr_t2spir (abdomen; both used as is) and
../shared/data/mscmrseg19_bssfp (downsampled in-plane to 128 × 128 voxels, i.e. 2.5 mm, slices kept: image
linear, labels nearest neighbour, origin and direction kept) — every method sees the same images. Of the ids
(sorted), `atlases + targets` starting at `offset` are used: the first `atlases` are atlases, the rest targets;
every atlas is registered to every target.

Methods: each atlasseg preset (default: those of fast, default, accurate that exist), with `--set` overrides;
per pair, timed: percentile normalisation of both images, `register`, `propagate_labels`. Peers, when importable
(the `bench` extra: antspyx, picsl-greedy), on the raw images, timed: registration and label warp —
ANTs `antsRegistrationSyNQuick[s]` (rigid + affine + SyN, MI), labels with genericLabel; Greedy affine
(`-a -dof 12 -m NCC 2x2x2 -n 100x50x10 -ia-image-centers`) then deformable (`-m NCC 2x2x2 -n 100x50x10`),
labels with NN (the Python API returns no image for `-ri LABEL`). Every tool gets all available cores; torch's
OpenMP threads are made passive (OMP_WAIT_POLICY=PASSIVE unless set): spinning, they ran ConvexAdam several times
slower on a busy machine.

The two PyTorch peers, on CPU (install torch first from the CPU wheel, `pip install torch==2.13.0`, so that no CUDA
build is pulled in):
- ConvexAdam (`pip install convexadam`): it needs both images on one grid and has no affine, so atlasseg's affine
  stage alone (the default config's, on normalised images) is run first and the raw atlas image resampled by it
  into the target grid (linear; its labels nearest neighbour); then `convex_adam_MIND.convex_adam_pt` with the
  library's defaults (MIND, float32 as it uses on a CPU) between the target and that image; its displacement
  (voxels, along the array axes: the moving array is sampled at index + displacement, as its apply_convex does)
  warps the affinely moved labels, nearest neighbour. Timed: affine + ConvexAdam + warp.
- FireANTs (`pip install fireants`; it pins SimpleITK 2.2.1, which atlasseg does not accept, so it lives in an
  environment of its own — `python -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 fireants` at
  the repository root — and runs in benchmarks/fireants_worker.py, a process of that environment's Python, or of
  $FIREANTS_PYTHON): its quick start, AffineRegistration (learning rate 3e-4: the quick start's 3e-3 diverges on
  small crops) then GreedyRegistration, on the raw images; labels nearest neighbour onto the target grid. Timed:
  handing the images to the worker as NIfTI files, registration, label warp, reading the labels back.
A peer that is not installed is skipped with a note.

Prints per dataset and method: mean pairwise Dice (mean over foreground labels, then over pairs), Dice of a
majority vote of each target's propagated atlases (mean over targets), median seconds per pair and its ratio
to each peer's, failures. A registration that raises scores Dice 0 and is left out of the vote.
Writes benchmarks/results/registration.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from _common import write_json

import atlasseg
from atlasseg.config import PRESETS, FusionConfig, load_config
from atlasseg.errors import ConfigError
from atlasseg.evaluation import dice_per_label, mean_score
from atlasseg.fusion import make_fuser
from atlasseg.imageio import normalize_intensity, read_image, read_labels
from atlasseg.propagation import propagate_labels
from atlasseg.registration import affine_stage, register

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_PRESETS = ("fast", "default", "accurate")
SEED = 42  # peers' random seed (atlasseg's is registration.seed)
PEERS = {  # key: (module, method name); FireANTs runs in its own environment (see fireants_python)
    "ants": ("ants", "ANTs SyNQuick[s]"),
    "greedy": ("picsl_greedy", "Greedy"),
    "convexadam": ("convexAdam", "ConvexAdam"),
    "fireants": ("fireants", "FireANTs"),
}


@dataclass(frozen=True)
class Dataset:
    folder: str
    labels: tuple[int, ...]
    inplane: int | None = None  # resample x and y to this many voxels (field of view kept)


DATASETS = {
    "hippocampus": Dataset("msd_hippocampus", (1, 2)),
    "cardiac": Dataset("mscmrseg19_bssfp", (1, 2, 3), inplane=128),
    "abdomen": Dataset("chaos_mr_t2spir", (1, 2, 3, 4)),
}


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _inplane(image: sitk.Image, voxels: int, interpolator: int) -> sitk.Image:
    size, spacing = image.GetSize(), image.GetSpacing()
    new_size = [voxels, voxels, *size[2:]]
    new_spacing = [spacing[i] * size[i] / new_size[i] for i in range(2)] + list(spacing[2:])
    return sitk.Resample(
        image,
        new_size,
        sitk.Transform(),
        interpolator,
        image.GetOrigin(),
        new_spacing,
        image.GetDirection(),
        0,
        image.GetPixelID(),
    )


def load_case(dataset: Dataset, case: str) -> tuple[sitk.Image, sitk.Image]:
    folder = DATA / dataset.folder
    image = read_image(folder / "images" / f"{case}.nii.gz")
    labels = read_labels(folder / "labels" / f"{case}.nii.gz")
    if dataset.inplane:
        image = _inplane(image, dataset.inplane, sitk.sitkLinear)
        labels = _inplane(labels, dataset.inplane, sitk.sitkNearestNeighbor)
    return image, labels


@contextlib.contextmanager
def quiet():
    """Silence a native library's own prints to stdout/stderr (Greedy ignores its `out` argument for some)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _on_grid(warped: sitk.Image, fixed: sitk.Image, labels: sitk.Image) -> sitk.Image:
    """A peer's warped label map as an integer image with exactly the target's header."""
    out = sitk.Cast(sitk.Round(sitk.Cast(warped, sitk.sitkFloat32)), labels.GetPixelID())
    out.CopyInformation(fixed)
    return out


def atlasseg_method(config):
    def run(fixed, moving, labels):
        method = config.registration.normalization
        transform, _ = register(
            normalize_intensity(fixed, method=method),
            normalize_intensity(moving, method=method),
            config=config.registration,
        )
        return propagate_labels(labels, transform=transform, reference=fixed)

    return run


def ants_pair(seed: int):
    """ANTs SyNQuick[s] of one pair: (warped labels, warped image), both on the fixed grid."""
    import ants

    # A fixed seed for the metric sampling, as atlasseg has: unseeded, SyNQuick on these small images diverges
    # now and then (about 1 run in 10 on one hippocampus pair). ants.config.set_ants_deterministic would also
    # force one thread, so the attribute it sets is set directly.
    ants.config._random_seed = seed

    def run(fixed, moving, labels):
        f = ants.from_sitk(fixed)
        with tempfile.TemporaryDirectory() as tmp, quiet():
            reg = ants.registration(
                f, ants.from_sitk(moving), type_of_transform="antsRegistrationSyNQuick[s]", outprefix=f"{tmp}/"
            )
            warped = ants.apply_transforms(
                f,
                ants.from_sitk(sitk.Cast(labels, sitk.sitkFloat32)),
                reg["fwdtransforms"],
                interpolator="genericLabel",
            )
        image = ants.to_sitk(reg["warpedmovout"])
        image.CopyInformation(fixed)
        return _on_grid(ants.to_sitk(warped), fixed, labels), image

    return run


def greedy_pair(threads: int, seed: int):
    """Greedy affine then deformable, of one pair: (warped labels, warped image), both on the fixed grid."""
    from picsl_greedy import Greedy3D

    common = f"-V 0 -threads {threads} -seed {seed}"

    def run(fixed, moving, labels):
        g = Greedy3D()
        with quiet():
            g.execute(
                f"{common} -i fixed moving -a -dof 12 -m NCC 2x2x2 -n 100x50x10 -ia-image-centers -o affine",
                fixed=fixed,
                moving=moving,
                affine=None,
            )
            g.execute(f"{common} -i fixed moving -m NCC 2x2x2 -n 100x50x10 -it affine -o warp", warp=None)
            g.execute(
                f"{common} -rf fixed -ri NN -rm labels warped -ri LINEAR -rm moving image -r warp affine",
                labels=labels,
                warped=None,
                image=None,
            )
        image = sitk.Cast(g["image"], sitk.sitkFloat32)
        image.CopyInformation(fixed)
        return _on_grid(g["warped"], fixed, labels), image

    return run


def affine_moved(config, fixed: sitk.Image, moving: sitk.Image, labels: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """atlasseg's affine stage alone (``config``'s, on normalised images); the raw moving image (linear) and its
    labels (nearest neighbour) resampled by it onto the fixed grid."""
    method = config.normalization
    transform, _ = affine_stage(
        normalize_intensity(fixed, method=method), normalize_intensity(moving, method=method), config=config
    )
    image = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return image, sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def convexadam_method(threads: int, seed: int, *, affine_config):
    """atlasseg's affine, then ConvexAdam (MIND, library defaults) between the fixed image and the affinely moved one;
    the affinely moved labels warped by its displacement (nearest neighbour)."""
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt
    from scipy.ndimage import map_coordinates

    torch.set_num_threads(threads)
    torch.manual_seed(seed)

    def run(fixed, moving, labels):
        image, moved = affine_moved(affine_config, fixed, moving, labels)
        target = sitk.Cast(fixed, sitk.sitkFloat32)
        grid = _convexadam_grid(fixed)
        if grid is not fixed:  # thick slices: all three on an isotropic grid over the fixed field of view, and back
            target, image, moved = (
                sitk.Resample(a, grid, sitk.Transform(), k)
                for a, k in ((target, sitk.sitkLinear), (image, sitk.sitkLinear), (moved, sitk.sitkNearestNeighbor))
            )
        f = sitk.GetArrayFromImage(target)
        # Displacement in voxels, channel i along array axis i (z, y, x here): the package's apply_convex samples
        # the moving array at index + displacement. float32 is what the library itself falls back to on a CPU.
        disp = convex_adam_pt(f, sitk.GetArrayFromImage(image), dtype=torch.float32, device=torch.device("cpu"))
        coordinates = np.indices(f.shape, dtype=np.float64) + np.moveaxis(disp, -1, 0)
        warped = map_coordinates(sitk.GetArrayFromImage(moved), coordinates, order=0, mode="constant", cval=0)
        out = sitk.GetImageFromArray(warped)
        out.CopyInformation(grid)
        return out if grid is fixed else sitk.Resample(out, fixed, sitk.Transform(), sitk.sitkNearestNeighbor)

    return run


CONVEXADAM_MIN_VOXELS = 24  # its MIND features at grid spacing 6 then span at least 4 voxels (3 is its kernel)


def _convexadam_grid(fixed: sitk.Image) -> sitk.Image:
    """``fixed`` itself, or where an axis is shorter than CONVEXADAM_MIN_VOXELS (cardiac stacks of 13 slices: the
    library fails), an isotropic grid at its finest spacing over the same field of view: ConvexAdam assumes
    roughly isotropic voxels and has no notion of spacing."""
    size, spacing = np.asarray(fixed.GetSize()), np.asarray(fixed.GetSpacing())
    if size.min() >= CONVEXADAM_MIN_VOXELS:
        return fixed
    dim, step = fixed.GetDimension(), spacing.min()
    grid = sitk.Image([int(round(n)) for n in size * spacing / step], sitk.sitkFloat32)
    grid.SetSpacing([float(step)] * dim)
    grid.SetDirection(fixed.GetDirection())
    corner = fixed.TransformContinuousIndexToPhysicalPoint([-0.5] * dim)  # the field of view's
    grid.SetOrigin(np.asarray(corner) + np.asarray(fixed.GetDirection()).reshape(dim, dim) @ np.full(dim, step / 2))
    return grid


def fireants_python() -> str:
    """The Python that runs FireANTs: $FIREANTS_PYTHON, else the repository's .venv-torch if there is one, else ours."""
    default = Path(__file__).resolve().parents[1] / ".venv-torch" / "bin" / "python"
    return os.environ.get("FIREANTS_PYTHON") or (str(default) if default.exists() else sys.executable)


class FireantsWorker:
    """benchmarks/fireants_worker.py in its own process (FireANTs pins an older SimpleITK than atlasseg's); images
    and labels go to it, and the warped labels come back, as NIfTI files in a temporary folder."""

    def __init__(self, threads: int, seed: int):
        import subprocess

        self.process = subprocess.Popen(
            [fireants_python(), str(Path(__file__).with_name("fireants_worker.py")), str(threads), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.versions = self._reply()  # raises when fireants does not import there
        self.folder = tempfile.TemporaryDirectory()

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the FireANTs worker ({fireants_python()}) exited with {self.process.wait()}")
        return json.loads(line)

    def __call__(self, fixed: sitk.Image, moving: sitk.Image, labels: sitk.Image) -> sitk.Image:
        paths = {key: f"{self.folder.name}/{key}.nii.gz" for key in ("fixed", "moving", "labels", "out")}
        for key, image in (("fixed", fixed), ("moving", moving), ("labels", labels)):
            sitk.WriteImage(image, paths[key])
        self.process.stdin.write(json.dumps(paths) + "\n")
        self.process.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        out = sitk.Cast(sitk.ReadImage(paths["out"]), labels.GetPixelID())
        out.CopyInformation(fixed)
        return out


def ants_method(threads: int, seed: int):
    pair = ants_pair(seed)
    return lambda fixed, moving, labels: pair(fixed, moving, labels)[0]


def greedy_method(threads: int, seed: int):
    pair = greedy_pair(threads, seed)
    return lambda fixed, moving, labels: pair(fixed, moving, labels)[0]


def score(prediction: sitk.Image, truth: sitk.Image, labels) -> dict[int, float]:
    return dice_per_label(prediction, truth, labels=list(labels))


def majority(reference: sitk.Image, candidates: list[sitk.Image]) -> sitk.Image | None:
    if not candidates:
        return None
    fuser = make_fuser(reference, config=FusionConfig(method="majority"))
    for candidate in candidates:
        fuser.add(candidate)
    return fuser.result()


def run_dataset(name: str, dataset: Dataset, methods: dict, args) -> dict:
    ids = sorted(p.name[: -len(".nii.gz")] for p in (DATA / dataset.folder / "images").glob("*.nii.gz"))
    chosen = ids[args.offset : args.offset + args.atlases + args.targets]
    atlases, targets = chosen[: args.atlases], chosen[args.atlases :]
    cases = {case: load_case(dataset, case) for case in chosen}
    print(
        f"\n{name}: {len(atlases)} atlases {atlases[0]}..{atlases[-1]}, {len(targets)} targets {', '.join(targets)}"
        f"; grid {cases[targets[0]][0].GetSize()}, spacing {tuple(round(s, 3) for s in cases[targets[0]][0].GetSpacing())}"
    )
    pairs = {m: [] for m in methods}
    votes = {m: {} for m in methods}
    for target in targets:
        fixed, truth = cases[target]
        warped = {m: [] for m in methods}
        for atlas in atlases:
            moving, labels = cases[atlas]
            line = []
            for method, function in methods.items():  # interleaved, so background load hits every method alike
                start = time.perf_counter()
                try:
                    out, error = function(fixed, moving, labels), None
                except Exception as err:  # noqa: BLE001 - a failed registration is a result here
                    out, error = (
                        None,
                        f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}",
                    )
                seconds = time.perf_counter() - start
                dice = score(out, truth, dataset.labels) if out is not None else {v: 0.0 for v in dataset.labels}
                if out is not None:
                    warped[method].append(out)
                pairs[method].append(
                    {
                        "target": target,
                        "atlas": atlas,
                        "dice": dice,
                        "mean_dice": mean_score(dice),
                        "seconds": seconds,
                        "error": error,
                    }
                )
                line.append(f"{method} {mean_score(dice):.3f}/{seconds:.1f}s" + (f" FAILED ({error})" if error else ""))
            print(f"  {target} <- {atlas}: " + ", ".join(line), flush=True)
        for method in methods:
            fused = majority(fixed, warped[method])
            dice = score(fused, truth, dataset.labels) if fused is not None else {v: 0.0 for v in dataset.labels}
            votes[method][target] = {"dice": dice, "mean_dice": mean_score(dice), "n_atlases": len(warped[method])}
    out = {"atlases": atlases, "targets": targets, "methods": {}}
    for method in methods:
        rows = pairs[method]
        out["methods"][method] = {
            "mean_pair_dice": statistics.fmean(r["mean_dice"] for r in rows),
            "label_mean_pair_dice": {v: statistics.fmean(r["dice"][v] for r in rows) for v in dataset.labels},
            "majority_dice": statistics.fmean(v["mean_dice"] for v in votes[method].values()),
            "seconds_per_pair_median": statistics.median(r["seconds"] for r in rows),
            "seconds_total": sum(r["seconds"] for r in rows),
            "failures": sum(r["error"] is not None for r in rows),
            "pairs": rows,
            "majority_per_target": votes[method],
        }
    for peer in (name for _, name in PEERS.values() if name in methods):
        base = out["methods"][peer]["seconds_per_pair_median"]
        for summary in out["methods"].values():
            summary[f"time_ratio_vs_{peer.split()[0]}"] = summary["seconds_per_pair_median"] / base
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=["hippocampus", "cardiac"])
    parser.add_argument("--targets", type=int, default=3)
    parser.add_argument("--atlases", type=int, default=5)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument(
        "--presets", nargs="+", default=None, help="atlasseg presets (default: fast default accurate, those that exist)"
    )
    parser.add_argument("--peers", nargs="*", choices=list(PEERS), default=list(PEERS))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    missing = [d for d in args.datasets if not (DATA / DATASETS[d].folder / "images").is_dir()]
    if missing:
        print(f"no data for {', '.join(missing)} under {DATA}", file=sys.stderr)
        return 1

    # One thread budget for every tool: all cores this process may use. The ITK copies inside ANTs and Greedy
    # read the variable when they first start threads, so it is set before they are imported.
    cores = available_cores()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(cores)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(cores)

    configs = {}
    for preset in args.presets or DEFAULT_PRESETS:
        try:
            if args.presets is None and preset not in PRESETS:
                raise ConfigError(f"preset {preset!r} is not in atlasseg.config.PRESETS")
            configs[f"atlasseg {preset}"] = load_config(preset, overrides=args.overrides)
        except ConfigError as err:
            if args.presets is not None:  # asked for by name: an error
                print(err, file=sys.stderr)
                return 2
            print(f"note: skipped: {err}")
    presets = [name.removeprefix("atlasseg ") for name in configs]
    methods = {name: atlasseg_method(config) for name, config in configs.items()}
    versions = {"atlasseg": atlasseg.__version__, "SimpleITK": sitk.Version_VersionString()}
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's OpenMP threads spin, and crawl, on a shared machine
    factories = {
        "ants": ants_method,
        "greedy": greedy_method,
        "convexadam": functools.partial(convexadam_method, affine_config=load_config("default").registration),
    }
    for key in args.peers:
        module, name = PEERS[key]
        if key == "fireants":
            try:
                methods[name] = FireantsWorker(cores, SEED)
            except (OSError, RuntimeError, ValueError) as err:
                print(f"note: no FireANTs under {fireants_python()} (set FIREANTS_PYTHON; {err}); {name} skipped")
                continue
            versions.update({f"{k} (FireANTs)": v for k, v in methods[name].versions.items()})
            continue
        if importlib.util.find_spec(module) is None:
            print(f"note: {module} is not installed (pip install atlasseg[bench]); {name} skipped")
            continue
        methods[name] = factories[key](cores, SEED)
        versions[module] = _version(module)
        if key == "convexadam":
            versions["torch"] = _version("torch")

    payload = {
        "datasets": args.datasets,
        "targets": args.targets,
        "atlases": args.atlases,
        "offset": args.offset,
        "presets": presets,
        "overrides": args.overrides,
        "peers": [m for m in methods if not m.startswith("atlasseg")],
        "cpu_count": os.cpu_count(),
        "cores_available": cores,
        "threads_per_tool": cores,
        "peer_seed": SEED,
        "versions": versions,
        "configs": {name: config.to_dict() for name, config in configs.items()},
        "cardiac_inplane_voxels": DATASETS["cardiac"].inplane,
    }
    print(f"{cores} cores (os.cpu_count() {os.cpu_count()}); methods: {', '.join(methods)}")
    for name in args.datasets:
        payload[name] = run_dataset(name, DATASETS[name], methods, args)

    peers = [name.split()[0] for _, name in PEERS.values() if name in methods]
    print(
        f"\n{'dataset':12} {'method':20} {'pair Dice':>9} {'MV Dice':>8} {'s/pair':>7} "
        + "".join(f"{'×' + peer:>12}" for peer in peers)
        + f" {'fails':>5}"
    )
    for name in args.datasets:
        for method, s in payload[name]["methods"].items():
            print(
                f"{name:12} {method:20} {s['mean_pair_dice']:9.3f} {s['majority_dice']:8.3f} "
                f"{s['seconds_per_pair_median']:7.2f}"
                + "".join(f"{s[f'time_ratio_vs_{peer}']:12.2f}" for peer in peers)
                + f" {s['failures']:5d}"
            )
    print("written", write_json("registration", _finite(payload)))
    return 0


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dists = {
        "ants": ("antspyx",),
        "picsl_greedy": ("picsl-greedy", "picsl_greedy"),
        "convexAdam": ("convexAdam",),
        "torch": ("torch",),
    }
    for dist in dists[module]:
        with contextlib.suppress(PackageNotFoundError):
            return version(dist)
    return "unknown"


def _finite(value):
    """JSON-safe: NaN becomes null; label keys become strings (json does that anyway)."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


if __name__ == "__main__":
    sys.exit(main())
