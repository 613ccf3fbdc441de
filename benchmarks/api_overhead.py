"""The Python API's overhead over the machinery it wraps, on hippocampus images held in memory.

    python benchmarks/api_overhead.py [register|segment ...] [--runs N] [--cache-dir DIR]

``register``: ``atlasseg.register`` (default config) vs the in-memory core it wraps (normalise,
``registration.register``, warp image and labels), one pair (target hippocampus_011, atlas hippocampus_001).
``segment``: ``atlasseg.segment`` (fast preset, one job, no cache, ``selection.k`` 3) vs what ``atlasseg run``
does for that target from the same images as files (the input checks, then ``pipeline.segment_target``, which
writes the segmentation), target hippocampus_011 with the atlases hippocampus_001, _003, _004, _006.
With ``--cache-dir``, ``segment``'s registrations are cached there (``output.cache_dir``): after a first run of
each, unmeasured, both take them from the cache, and the overhead is compared with everything else.

Prints, per comparison, the median seconds of N alternating runs of each (default 7), their difference and ratio.
Data: ../shared/data/msd_hippocampus.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

import atlasseg
from atlasseg.api import resolve_config
from atlasseg.imageio import normalize_intensity
from atlasseg.manifest import manifest_from_dict
from atlasseg.pipeline import check_inputs, segment_target
from atlasseg.propagation import propagate_intensities, propagate_labels
from atlasseg.registration import register

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd_hippocampus"
TARGET, ATLASES = "hippocampus_011", ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006")
SEGMENT = ["parallel.n_jobs=1", "selection.k=3"]


def files(case: str) -> tuple[Path, Path]:
    return DATA / "images" / f"{case}.nii.gz", DATA / "labels" / f"{case}.nii.gz"


def register_calls() -> dict:
    image, labels = files(ATLASES[0])
    fixed = sitk.ReadImage(str(files(TARGET)[0]), sitk.sitkFloat32)
    moving, moving_labels = sitk.ReadImage(str(image), sitk.sitkFloat32), sitk.ReadImage(str(labels))
    config = resolve_config("default").registration

    def api():
        return atlasseg.register(fixed, moving, "default", labels=moving_labels)

    def core():
        transform, _ = register(
            normalize_intensity(fixed, method=config.normalization),
            normalize_intensity(moving, method=config.normalization),
            config=config,
        )
        return propagate_intensities(moving, transform, fixed), propagate_labels(moving_labels, transform, fixed)

    return {"api.register": api, "in-memory core": core}


def segment_calls(folder: Path, cache_dir: str | None) -> dict:
    cache = ["output.cache=false"] if cache_dir is None else [f"output.cache_dir={Path(cache_dir).absolute()}"]
    config = resolve_config("fast", [*SEGMENT, *cache])
    names = {1: "anterior", 2: "posterior"}

    def entry(case):
        image, labels = files(case)
        return {"id": case, "image": str(image), "labels": str(labels)}

    manifest = manifest_from_dict(
        {"labels": names, "atlases": [entry(a) for a in ATLASES], "targets": [entry(TARGET)]},
        folder / "data_manifest.yaml",
    )
    target = sitk.ReadImage(str(files(TARGET)[0]))
    atlases = {case: tuple(sitk.ReadImage(str(f)) for f in files(case)) for case in ATLASES}

    def api():
        return atlasseg.segment(target, atlases, config, label_names=names, target_id=TARGET)

    def file_pipeline():
        check_inputs(manifest, config)
        return segment_target(
            manifest.targets[0],
            list(manifest.atlases),
            config,
            out_dir=folder / "out",
            label_names=manifest.label_names,
        )

    if cache_dir is not None:  # fill the cache
        api(), file_pipeline()
    return {"api.segment": api, "file pipeline": file_pipeline}


def measure(calls: dict, runs: int) -> None:
    times = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    (api, api_s), (core, core_s) = ((name, statistics.median(t)) for name, t in times.items())
    for name, seconds in ((api, api_s), (core, core_s)):
        print(f"{name:16s} median {seconds:.3f} s of {runs}")
    print(f"overhead {api_s - core_s:.3f} s, ratio {api_s / core_s:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="*", choices=["register", "segment"], default=["register", "segment"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--cache-dir", help="cache segment's registrations there (a folder of its own)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="atlasseg-bench-") as tmp:
        for which in args.which:
            calls = register_calls() if which == "register" else segment_calls(Path(tmp), args.cache_dir)
            measure(calls, args.runs)


if __name__ == "__main__":
    main()
