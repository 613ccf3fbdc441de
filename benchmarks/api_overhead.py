"""The Python API's overhead: ``atlasseg.register`` on in-memory images vs the in-memory core it wraps
(normalise, ``registration.register``, warp image and labels), one hippocampus pair, default config.

    python benchmarks/api_overhead.py

Prints the median seconds of 7 alternating runs of each, their difference and ratio. Data:
../shared/data/msd_hippocampus (target hippocampus_011, atlas hippocampus_001).
"""

import statistics
import time
from pathlib import Path

import SimpleITK as sitk

import atlasseg
from atlasseg.api import resolve_config
from atlasseg.imageio import normalize_intensity
from atlasseg.propagation import propagate_intensities, propagate_labels
from atlasseg.registration import register

d = f"{Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'msd_hippocampus'}/"
fixed = sitk.ReadImage(d + "images/hippocampus_011.nii.gz", sitk.sitkFloat32)
moving = sitk.ReadImage(d + "images/hippocampus_001.nii.gz", sitk.sitkFloat32)
labels = sitk.ReadImage(d + "labels/hippocampus_001.nii.gz")
config = resolve_config("default").registration


def core():
    t, _ = register(normalize_intensity(fixed, method=config.normalization),
                    normalize_intensity(moving, method=config.normalization), config=config)
    return propagate_intensities(moving, t, fixed), propagate_labels(labels, t, fixed)


times = {"api.register": [], "in-memory core": []}
for _ in range(7):
    for name, call in (("api.register", lambda: atlasseg.register(fixed, moving, "default", labels=labels)),
                       ("in-memory core", core)):
        start = time.perf_counter()
        call()
        times[name].append(time.perf_counter() - start)
med = {k: statistics.median(v) for k, v in times.items()}
for k, v in med.items():
    print(f"{k:16s} median {v:.3f} s")
print(f"overhead {med['api.register'] - med['in-memory core']:.3f} s, ratio {med['api.register'] / med['in-memory core']:.2f}")
