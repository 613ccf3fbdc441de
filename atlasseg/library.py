"""Prescreening a large atlas library in a reference space: a per-target ranking cost that does not grow with it.

Ranking every atlas by the affine stage registers every atlas onto every target. With ``selection.prescreen``
set to a number smaller than the library (and not below ``k``), instead:

1. the *reference* (the first atlas listed) is the common space; every atlas is affinely registered onto it
   once, and what its score needs is kept: its intensities (normalised, smoothed to the scoring grid, as
   :func:`atlasseg.selection.score_atlas` does) and its scoring region (``selection.roi`` around its mapped
   labels) on the reference's scoring grid, cropped to that region's bounding box;
2. each target is affinely registered onto the reference once, and its intensities resampled onto the same
   grid (its region: its field of view, and its manifest mask);
3. every atlas is scored there against the target (``selection.metric`` over the atlas's region, within the
   target's), a few array operations per atlas, and the best ``max(prescreen, k)`` go on to the pairwise affine
   stage and the usual ranking in target space.

The atlas side is done once per library: it is cached (stage ``library`` of :mod:`atlasseg.cache`, one entry
per atlas, keyed by the reference's and that atlas's files and the settings; a changed atlas recomputes only
itself, a changed reference all) and kept in memory for later targets of the same process. Each entry's
arrays are written before the JSON that makes the entry visible, so a run killed mid-write leaves nothing
that a later run trusts. An atlas (or target) whose registration onto the reference fails scores minus
infinity (the target: the exhaustive ranking runs instead).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import SimpleITK as sitk

from .cache import Cache, entry_key, settings
from .config import Config
from .errors import AtlassegError, RegistrationError
from .imageio import normalize_intensity, read_geometry, read_image, read_labels
from .manifest import Atlas, Target
from .parallel import parallel_map
from .registration import Masks, affine_stage, read_landmarks
from .registration.geometry import domain
from .selection import REGIONS, coarse_grid, indicator, rank, smoothed
from .similarity import SIMILARITIES

log = logging.getLogger("atlasseg")

STAGE = "library"
_READ_ERRORS = (AtlassegError, RuntimeError, OSError)  # a file changed or lost since the inputs were checked
_MEMO: dict[str, dict[str, np.ndarray] | None] = {}  # cache key → arrays (None: failed), this process's


def kept(config: Config, n_atlases: int) -> int | None:
    """How many atlases prescreening keeps of ``n_atlases`` (``prescreen``, never fewer than ``k``); None when it
    does not narrow the ranking (``prescreen`` or ``k`` is ``all``, or the library is no larger)."""
    sel = config.selection
    if sel.prescreen == "all" or sel.k == "all" or n_atlases <= max(sel.prescreen, sel.k):
        return None
    return max(sel.prescreen, sel.k)


def prescreen(target: Target, atlases: list[Atlas], config: Config, *, cache: Cache) -> list[Atlas] | None:
    """The atlases that go on to the pairwise affine stage: the best :func:`kept` in the reference space, in
    their given order; None when prescreening does not narrow the ranking (or the target's registration onto
    the reference failed)."""
    count = kept(config, len(atlases))
    if count is None:
        return None
    reference = atlases[0]
    entries = [(reference, a.image, a.labels, a.mask, a.landmarks) for a in atlases]
    found = _in_reference_space(entries, config, cache, desc="atlases → reference", remember=True)
    (moved,) = _in_reference_space(
        [(reference, target.image, None, target.mask, target.landmarks)],
        config,
        cache,
        desc=f"{target.id} → reference",
        remember=False,
    )
    if moved is None:
        log.warning(
            "target %s: its affine registration onto the reference %s failed; every atlas is ranked "
            "by its own affine stage instead",
            target.id,
            reference.id,
        )
        return None
    scores = {a.id: score(moved, arrays, config.selection.metric) for a, arrays in zip(atlases, found)}
    best = set(rank(scores)[:count])
    return [a for a in atlases if a.id in best]


def score(target: dict[str, np.ndarray], atlas: dict[str, np.ndarray] | None, metric: str) -> float:
    """``metric`` of an atlas against a target, both on the reference's scoring grid: over the atlas's region
    within the target's; minus infinity when that is empty or the atlas has no entry."""
    if atlas is None:
        return -math.inf
    box = tuple(slice(int(a), int(a) + n) for a, n in zip(atlas["start"], atlas["region"].shape))
    region = atlas["region"] & target["region"][box]
    if not region.any():
        return -math.inf
    return SIMILARITIES[metric](target["values"][box][region], atlas["values"][region])


def entry_key_for(reference: Atlas, image, labels, mask, landmarks, config: Config) -> str:
    """The cache key of one image's entry in the reference space: the files it is made of and the settings
    (the affine registration's and the score's)."""
    reg, sel = settings(config.registration), config.selection
    del reg["nonrigid"]
    files = {
        "reference": reference.image,
        "reference_mask": reference.mask,
        "image": image,
        "labels": labels,
        "mask": mask,
    }
    if config.registration.affine.initialization == "landmarks":
        files.update(reference_landmarks=reference.landmarks, landmarks=landmarks)
    scoring = {"roi": sel.roi, "roi_margin": sel.roi_margin, "grid_spacing": sel.grid_spacing}
    return entry_key(STAGE, files=files, settings={"registration": reg, "scoring": scoring})


def _in_reference_space(entries: list[tuple], config: Config, cache: Cache, *, desc: str, remember: bool) -> list:
    """Per entry (reference, image, labels, mask, landmarks): its arrays in the reference space (None where its
    registration failed or a file could not be read), from this process's memory, else the cache, else computed
    (in parallel); ``remember``: kept in this process's memory for later calls."""
    keys = [entry_key_for(*entry, config) for entry in entries]
    found = {key: _MEMO[key] for key in keys if key in _MEMO}
    for key in keys:
        if key not in found and (hit := _cached(cache, key)) is not None:
            found[key] = hit[0]
    todo = {key: entry for key, entry in zip(keys, entries) if key not in found}
    tasks = [(*entry, config, cache, key) for key, entry in todo.items()]
    for key, arrays in zip(todo, parallel_map(_to_reference, tasks, config.parallel, desc=desc)):
        found[key] = arrays
    if remember:  # not an unreadable file's False: it may be readable next time
        _MEMO.update({key: arrays for key, arrays in found.items() if arrays is not False})
    return [found[key] or None for key in keys]


def _cached(cache: Cache, key: str) -> tuple[dict | None] | None:
    """(arrays, or None for a failed registration) of a finished cache entry, else None."""
    hit = cache.load(STAGE, key)
    if hit is None:
        return None
    if hit[0] is None:
        return (None,)
    arrays = cache.load_arrays(STAGE, key)
    return None if arrays is None else (arrays,)


def _to_reference(
    reference: Atlas, image, labels, mask, landmarks, config: Config, cache: Cache, key: str, threads: int
):
    """Register one image onto the reference and resample what its score needs onto the reference's scoring
    grid (runs in a worker); the outcome goes into the cache. The arrays, None when the registration failed,
    False when a file could not be read."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    reg, sel = config.registration, config.selection
    try:
        fixed = normalize_intensity(read_image(reference.image), method=reg.normalization)
        moving = normalize_intensity(read_image(image), method=reg.normalization)
        masks = None
        if reference.mask is not None or mask is not None:
            masks = Masks(
                *(
                    None if m is None else read_labels(m, like=read_geometry(p), like_path=p)
                    for m, p in ((reference.mask, reference.image), (mask, image))
                )
            )
        points = None
        if reg.affine.initialization == "landmarks":
            points = (read_landmarks(reference.landmarks, image=fixed), read_landmarks(landmarks, image=moving))
        label_map = None if labels is None or sel.roi == "none" else read_labels(labels)
    except _READ_ERRORS as err:
        log.warning("%s: not prescreened (%s)", image, err)
        return False
    try:
        transform, record = affine_stage(fixed, moving, config=reg, masks=masks, landmarks=points)
    except RegistrationError as err:
        cache.store(STAGE, key, None, {"failure": {"reason": str(err)}})
        return None
    grid = coarse_grid(fixed, spacing=sel.grid_spacing)
    values = sitk.GetArrayFromImage(
        sitk.Resample(smoothed(moving, sel.grid_spacing), grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    )
    if labels is None:  # a target: its field of view, within its mask
        region = indicator(domain(moving), grid, transform) >= 0.5
        if mask is not None:
            region &= indicator(masks.moving, grid, transform) >= 0.5
    elif label_map is None:
        region = np.ones(values.shape, dtype=bool)
    else:
        region = REGIONS[sel.roi](label_map, transform, grid, margin=sel.roi_margin)
    arrays = _cropped(values, region) if labels is not None else {"values": values, "region": region}
    cache.store(STAGE, key, transform, {"record": record}, arrays=arrays)
    return arrays


def _cropped(values: np.ndarray, region: np.ndarray) -> dict[str, np.ndarray]:
    """An atlas's arrays cut to its region's bounding box (``start``: the box's first voxel): what it keeps
    does not grow with the reference's field of view."""
    found = np.nonzero(region)
    if not found[0].size:
        return {"start": np.zeros(region.ndim, dtype=np.int64), "values": values[:0], "region": region[:0]}
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in found)
    return {
        "start": np.array([b.start for b in box], dtype=np.int64),
        "values": values[box].astype(np.float32),
        "region": region[box],
    }
