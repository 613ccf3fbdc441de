"""Per-target orchestration: affine → select → non-rigid → propagate → fuse → evaluate → write.

Only this module does file I/O and parallelism. Work units carry file paths, so
parallel workers read their own images and build their own filters.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from .cache import Cache, entry_key, file_digest, open_cache, settings
from .config import Config, RegistrationConfig, SelectionConfig
from .errors import AtlassegError, ImageError, RegistrationError
from .evaluation import evaluate, header, mean_score, rows
from .fusion import JointLabelFusion, make_fuser
from .imageio import (
    Geometry,
    atomic_write_text,
    check_intensities,
    check_label_values,
    check_scalar,
    check_same_grid,
    normalize_intensity,
    read_geometry,
    read_checked_image,
    read_image,
    read_labels,
    read_voxels,
    remove_temporaries,
    same_voxels,
    voxel_fingerprint,
    write_image,
)
from .layout import LAYOUTS
from .library import prescreen
from .manifest import Atlas, Manifest, Target
from .parallel import available_cores, log_above_bars, parallel_map, progress, session, thread_budget
from .propagation import propagate_intensities, propagate_labels
from .quality import Calibration, CandidateVotes, calibrate, target_features
from .registration import (
    Masks,
    RegistrationDiverged,
    affine_stage,
    jacobian_determinant,
    load_transform,
    nonrigid_stage,
    read_landmarks,
    register,
    save_displacement_field,
    save_transform,
)
from .registration.common import level_shrinks
from .report import Disagreement
from .selection import min_atlases, rank, score_atlas, select

log = logging.getLogger("atlasseg")


def check_inputs(manifest: Manifest, config: Config | None = None, *, leave_one_out: bool = False) -> None:
    """Every listed file read once, before any work: readable and complete, scalar, 2D/3D, one
    dimensionality across the manifest (the atlases' initial transforms too); intensities finite and
    not constant; label maps whole, non-negative numbers on their image's grid (floating-point noise is
    snapped, with a warning), an atlas's not empty; masks on their image's grid. Warns about declared
    labels an atlas lacks and labels the manifest does not declare. With ``config``: the targets' ids suit
    ``output.layout``, every entry has the landmarks its initialisation needs, ``selection.k`` is compared with
    the atlas count (larger: a warning, all atlases are used), every image is large enough for the registration
    pyramid (:func:`check_pyramid`), the run's memory is estimated (:func:`check_memory`: with the declared
    labels first, again with the labels the atlases hold once read), and joint label fusion's temporary files
    are checked against the free space (:func:`check_disk`).

    An atlas holding the same voxels as a target (the same file, or a copy in any format) would hand the
    target its own labels back: a warning, or with ``leave_one_out`` (cross-validation, where every atlas is a
    target) an error for any two atlases that are the same image."""
    entries = (*manifest.atlases, *manifest.targets)
    needs_landmarks = config is not None and config.registration.affine.initialization == "landmarks"
    dims: dict[int, str] = {}
    largest = None
    grids: list[tuple[Path, Geometry]] = []
    for entry in entries:  # headers only: cheap, and they size the run before any voxel is read
        if needs_landmarks and entry.landmarks is None:
            raise ImageError(f"{manifest.path}: {entry.id} has no 'landmarks' file, needed by "
                             "registration.affine.initialization: landmarks")
        with _naming(manifest, entry, "image"):
            geometry = read_geometry(entry.image)
            check_scalar(geometry, entry.image)
        grids.append((entry.image, geometry))
        dims.setdefault(geometry.dimension, str(entry.image))
        if largest is None or math.prod(geometry.size) > math.prod(largest.size):
            largest = geometry
        for key in ("labels", "mask"):
            if getattr(entry, key) is not None:
                with _naming(manifest, entry, key):
                    check_same_grid(geometry, read_geometry(getattr(entry, key)), image_path=entry.image,
                                    labels_path=getattr(entry, key))
    if len(dims) > 1:
        raise ImageError(f"{manifest.path}: mixes 2D images ({dims[2]}) with 3D images ({dims[3]}); use one dimensionality")
    for file in dict.fromkeys(file for atlas in manifest.atlases for _, file in atlas.transforms):
        dimension = load_transform(file).GetDimension()
        if dimension not in dims:
            raise RegistrationError(f"{file}: a {dimension}D transform, for {min(dims)}D images")
    if config is not None and config.output.format == "mgz" and 2 in dims:
        raise ImageError(f"{manifest.path}: output.format mgz holds 3D images only, these are 2D (use nii.gz)")
    if config is not None:
        LAYOUTS[config.output.layout].check([t.id for t in manifest.targets])
        for path, geometry in grids:
            check_pyramid(geometry, path, config)
        k = config.selection.k
        if k != "all" and k > len(manifest.atlases):  # the default k asks for no warning
            level = logging.INFO if k == SelectionConfig.k else logging.WARNING
            log.log(level, "selection.k is %d but %s lists %d atlases: all of them are used", k, manifest.path,
                    len(manifest.atlases))
        check_memory(largest, config, n_tasks=len(manifest.atlases), n_labels=len(manifest.label_names) + 1)
        check_disk(largest, config, n_tasks=len(manifest.atlases))
    labels = set(manifest.label_names)
    label_values = {}
    for entry in entries:  # then every voxel, once: the label maps first (an image is compared with them)
        if entry.labels is not None:
            with _naming(manifest, entry, "labels"):
                label_values[entry.labels] = present = _check_label_map(entry, manifest)
            if isinstance(entry, Atlas):  # the labels fusion votes on
                labels |= present
    fingerprints: dict[tuple, list[Atlas | Target]] = {}
    for entry in entries:
        with _naming(manifest, entry, "image"):
            voxels = read_voxels(entry.image)
            check_intensities(entry.image, voxels)
            _check_not_a_label_map(entry, voxels, label_values)
        fingerprints.setdefault(voxel_fingerprint(entry.image, voxels), []).append(entry)
        del voxels
        if entry.mask is not None:
            with _naming(manifest, entry, "mask"):
                check_label_values(entry.mask, read_voxels(entry.mask))
    groups = [group for alike in fingerprints.values() if len(alike) > 1 for group in _equal_images(alike)]
    _check_same_images(manifest, groups, leave_one_out=leave_one_out)
    if config is not None and len(labels) > len(manifest.label_names):
        check_memory(largest, config, n_tasks=len(manifest.atlases), n_labels=len(labels) + 1)


def _equal_images(entries: list[Atlas | Target]) -> list[list[Atlas | Target]]:
    """``entries`` (whose images share a fingerprint) split into groups of equal voxels."""
    groups: list[list[Atlas | Target]] = []
    for entry in entries:
        group = next((g for g in groups if same_voxels(g[0].image, entry.image)), None)
        if group is None:
            groups.append([entry])
        else:
            group.append(entry)
    return groups


def _check_same_images(manifest: Manifest, groups: list[list[Atlas | Target]], *, leave_one_out: bool) -> None:
    """Warn about an atlas that is one of the targets' images; with ``leave_one_out``, refuse two atlases that are
    the same image (each would be segmented by the other: its labels handed back)."""
    for group in groups:
        atlases = [e for e in group if isinstance(e, Atlas)]
        if leave_one_out and len(atlases) > 1:
            raise ImageError(f"{manifest.path}: atlases {_listing([a.id for a in atlases])} are the same image "
                             f"({atlases[0].image}, {atlases[1].image}): leave-one-out would score each on its own "
                             "labels; keep one of them")
        for target in (e for e in group if isinstance(e, Target)) if atlases else ():
            log.warning("%s: target %r is the same image as atlas %s (%s): that atlas hands the target its own "
                        "labels, which inflates its scores; leave it out of the atlases (or the target out of the "
                        "targets)", manifest.path, target.id, _listing([a.id for a in atlases]), target.image)


def _listing(values, limit: int = 10) -> str:
    """Up to ``limit`` values, comma-separated, and how many more (log lines stay readable)."""
    values = list(values)
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return ", ".join(map(str, values[:limit])) + more


@contextlib.contextmanager
def _naming(manifest: Manifest, entry: Atlas | Target, key: str):
    """An input error about one of ``entry``'s files names the manifest, the entry, the field and the paths as
    the manifest writes them (not as resolved through symlinks)."""
    try:
        yield
    except ImageError as err:
        message = str(err)
        own = str(getattr(entry, key))
        if message.startswith(own + ": "):
            message = message[len(own) + 2:]
        for name in ("image", "labels", "mask", "landmarks"):  # other files the message names
            if getattr(entry, name) is not None:
                message = message.replace(str(getattr(entry, name)), manifest.as_written(entry, name))
        kind = "atlas" if isinstance(entry, Atlas) else "target"
        raise ImageError(f"{manifest.path}: {kind} {entry.id!r}: {key} {manifest.as_written(entry, key)}: "
                         f"{message}") from None


# An image whose voxels hold at most this many distinct values, all whole numbers, is a label map given as an image.
_LABEL_LIKE_VALUES = 16
_LABEL_MAP_MOST_VALUES = 1024  # beyond: an image (compared with the label maps' values only below it)


def _check_not_a_label_map(entry: Atlas | Target, voxels, label_values: dict[Path, set]) -> None:
    """Refuse an image that is a label map: few distinct whole-number values, the values of one of the manifest's
    label maps, or the same voxels as the entry's own labels."""
    sample = np.unique(voxels.ravel()[:: max(1, voxels.size // 100_000)])  # most images stop here
    if sample.size > _LABEL_MAP_MOST_VALUES or not np.array_equal(sample, np.round(sample)):
        return
    distinct = np.unique(voxels)
    if distinct.size > _LABEL_MAP_MOST_VALUES or not np.array_equal(distinct, np.round(distinct)):
        return
    present = set(distinct.tolist()) - {0}
    same_values = next((path for path, values in label_values.items() if values == present), None)
    if entry.labels is not None and np.array_equal(voxels, read_voxels(entry.labels)):
        why = "the same voxels as its own labels file"
    elif same_values is not None:
        why = f"the label values of {same_values}"
    elif distinct.size <= _LABEL_LIKE_VALUES:
        why = f"an image has more than {_LABEL_LIKE_VALUES}"
    else:
        return
    raise ImageError(f"{entry.image}: looks like a label map, not an image: {distinct.size} distinct whole-number "
                     f"values ({why}); point 'image:' at the intensity image")


def _check_label_map(entry: Atlas | Target, manifest: Manifest) -> set[int]:
    """Check an entry's label map (see :func:`check_inputs`); returns the labels it holds, background aside."""
    path, declared = entry.labels, set(manifest.label_names)
    present = set(check_label_values(path, read_voxels(path)).tolist()) - {0}
    is_atlas = isinstance(entry, Atlas)
    if not present and is_atlas:
        raise ImageError(f"{path}: label map of atlas {entry.id!r} is empty (all background); fix it or leave the atlas out")
    if not present:
        log.warning("%s: ground truth of target %r is empty (all background): its scores are undefined", path, entry.id)
    if declared and present - declared:
        log.warning("%s: %s %r holds labels [%s] not declared in %s: segmented and scored without a name",
                    path, "atlas" if is_atlas else "target", entry.id, _listing(sorted(present - declared)),
                    manifest.path)
    if declared and is_atlas and present and declared - present:
        log.warning("%s: atlas %r lacks declared labels %s: it votes background there", path, entry.id,
                    _listing(f"{v} ({manifest.label_names[v]})" for v in sorted(declared - present)))
    return present


# ITK's recursive Gaussian, which smooths images in the affine pyramid and elsewhere, needs this many voxels
# along every axis it smooths.
_MIN_VOXELS = 4


def check_pyramid(geometry: Geometry, path: Path, config: Config) -> None:
    """Refuse, before any work, an image too thin for the registration: fewer than 4 voxels along an axis, or
    (non-rigid stage) fewer voxels along an axis than a level's shrink factor; the message says what to do."""
    size = ", ".join(map(str, geometry.size))
    for axis, count in enumerate(geometry.size):
        if count < _MIN_VOXELS:
            single = " (a single slice: save it as a 2D image)" if count == 1 and geometry.dimension == 3 else ""
            raise ImageError(f"{path}: {count} voxel(s) along axis {axis} (size {size}); registration smooths every "
                             f"axis and needs at least {_MIN_VOXELS} voxels along each{single}: resample the image "
                             "onto more voxels along that axis")
    nonrigid = config.registration.nonrigid
    if not nonrigid.enabled:
        return
    for level, factors in enumerate(level_shrinks(nonrigid, geometry.size, geometry.spacing)):
        for axis, (count, factor) in enumerate(zip(geometry.size, factors)):
            if count < factor:
                raise ImageError(f"{path}: {count} voxels along axis {axis} (size {size}), fewer than the shrink "
                                 f"factor {factor} of registration.nonrigid level {level}: lower "
                                 "registration.nonrigid.shrink_factors, or resample the image onto more voxels")


# Rough peak bytes per voxel of the largest image: one registration job (two float32 images, their
# normalised and smoothed copies, gradients, and the non-rigid stage's displacement fields: float64 per axis;
# `atlasseg register` with the default config peaked at 261 bytes per voxel on a 128^3 demo pair), and the
# fusion (a float32 vote per label, plus the weights and the intensities of one candidate; joint label
# fusion keeps its candidates on disk and reads them back in slabs of bounded size, and keeps the
# padded target and each voxel's label range, int64).
_JOB_BYTES_PER_VOXEL = {2: 160, 3: 256}
_FUSION_BYTES_PER_VOXEL_AND_LABEL = 4
_REPORT_BYTES_PER_VOXEL_AND_LABEL = 2  # the candidates' disagreement: a uint16 vote count per label
_JLF_BYTES_PER_VOXEL = 24
_JLF_BYTES_PER_VOXEL_AND_CANDIDATE = 6  # float32 intensities, labels of up to 2 bytes
MEMORY_LIMIT_ENV = "ATLASSEG_MEMORY_LIMIT"
_MANY_LABELS = 1000  # beyond this, merging labels is part of the advice


def available_memory() -> int:
    """Bytes this run may use: ``$ATLASSEG_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix) when set,
    else the memory the system reports available (MemAvailable; free pages elsewhere)."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if text:
        units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        scale = units.get(text[-1].upper(), 1)
        try:
            return int(float(text[:-1] if scale > 1 else text) * scale)
        except ValueError:
            raise AtlassegError(f"{MEMORY_LIMIT_ENV}={text!r}: expected a number of bytes, e.g. 8G") from None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def estimate_memory(geometry: Geometry, config: Config, *, n_tasks: int, n_labels: int) -> tuple[int, int, int]:
    """(total, per registration job, parallel jobs): a rough peak of segmenting on ``geometry``'s grid."""
    voxels = math.prod(geometry.size)
    jobs, _ = thread_budget(config.parallel, max(1, n_tasks))
    per_job = voxels * _JOB_BYTES_PER_VOXEL[geometry.dimension]
    fusion = voxels * _FUSION_BYTES_PER_VOXEL_AND_LABEL * (n_labels + 4)
    if config.output.report:
        fusion += voxels * _REPORT_BYTES_PER_VOXEL_AND_LABEL * n_labels
    if config.fusion.method == "jlf":
        candidates = _jlf_candidate_bytes(geometry, config, n_tasks=n_tasks)
        fusion += voxels * _JLF_BYTES_PER_VOXEL + min(candidates, JointLabelFusion._SLAB_BYTES)
    return jobs * per_job + fusion, per_job, jobs


def _jlf_candidate_bytes(geometry: Geometry, config: Config, *, n_tasks: int) -> int:
    """What joint label fusion's candidates take, in its temporary folder."""
    k = config.selection.k
    return math.prod(geometry.size) * _JLF_BYTES_PER_VOXEL_AND_CANDIDATE * (n_tasks if k == "all" else min(k, n_tasks))


def check_disk(geometry: Geometry | None, config: Config, *, n_tasks: int) -> None:
    """Refuse, before any work, a joint label fusion whose candidates are too many to keep in memory
    (see :class:`~atlasseg.fusion.JointLabelFusion`) and would not fit in ``TMPDIR`` either."""
    if geometry is None or config.fusion.method != "jlf":
        return
    need = _jlf_candidate_bytes(geometry, config, n_tasks=n_tasks)
    if need <= JointLabelFusion._SLAB_BYTES:
        return
    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ImageError(
            f"joint label fusion keeps its candidates in {folder}: about {_size(need)} for images of "
            f"{' x '.join(map(str, geometry.size))} voxels, but {_size(free)} are free there: set TMPDIR to a "
            "folder with room, or lower selection.k, or choose another fusion.method"
        )


def check_memory(geometry: Geometry | None, config: Config, *, n_tasks: int, n_labels: int) -> None:
    """Refuse, before any work, a run whose estimated peak memory exceeds :func:`available_memory`."""
    if geometry is None:
        return
    total, per_job, jobs = estimate_memory(geometry, config, n_tasks=n_tasks, n_labels=n_labels)
    available = available_memory()
    if total <= available:
        return
    fewer = f", lower parallel.n_jobs (each registration needs about {_size(per_job)})" if jobs > 1 else ""
    raise ImageError(
        f"images of {' x '.join(map(str, geometry.size))} voxels would need about {_size(total)} "
        f"({jobs} parallel registration(s) and fusion) but {_size(available)} are available (fusion keeps a vote "
        f"per voxel for each of {n_labels} labels, background included): crop or downsample the images{fewer}"
        f"{', merge labels' if n_labels > _MANY_LABELS else ''} (or set {MEMORY_LIMIT_ENV})"
    )


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- worker jobs

def _load_normalized(path: Path, method: str) -> sitk.Image:
    return normalize_intensity(read_image(path), method=method)


def _read_masks(fixed: tuple, moving: tuple) -> Masks | None:
    """Masks from (mask path or None, its image's path, that image if already read) for each side;
    each is checked against (and snapped onto) its image's grid. None when neither side has one."""
    if fixed[0] is None and moving[0] is None:
        return None
    return Masks(*(None if mask is None else read_labels(mask, like=read_geometry(path) if like is None else like,
                                                          like_path=path)
                   for mask, path, like in (fixed, moving)))


def _masks(target: Target, atlas: Atlas) -> Masks | None:
    return _read_masks((target.mask, target.image, None), (atlas.mask, atlas.image, None))


def _failure(err: RegistrationError) -> dict:
    """What run.json keeps of a failed registration: the reason, and the record when it ran to the end."""
    return {"reason": str(err), **({"record": err.record} if isinstance(err, RegistrationDiverged) else {})}


def _peak_mb() -> float | None:
    """This process's peak resident memory so far (MiB; None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


# What unreadable files raise in a worker (a file changed or lost since check_inputs): the atlas is dropped.
_READ_ERRORS = (AtlassegError, RuntimeError, OSError)


def _cache_key(stage: str, target: Target, atlas: Atlas, config: Config) -> str:
    """The cache key of one registration stage of ``atlas`` onto ``target``: the files it reads, its settings.
    The affine stage's entry holds the selection score too, so the settings that shape the score count."""
    reg = config.registration
    files = {"target": target.image, "target_mask": target.mask, "atlas": atlas.image, "atlas_mask": atlas.mask,
             "given_transform": atlas.transform_for(target.id)}
    if reg.affine.initialization == "landmarks":
        files.update(target_landmarks=target.landmarks, atlas_landmarks=atlas.landmarks)
    registration = settings(reg)
    if stage == "nonrigid":
        return entry_key(stage, files=files, settings=registration)
    del registration["nonrigid"]
    sel = config.selection
    if sel.roi != "none":
        files["atlas_labels"] = atlas.labels
    scoring = {"metric": sel.metric, "roi": sel.roi, "roi_margin": sel.roi_margin, "grid_spacing": sel.grid_spacing}
    return entry_key(stage, files=files, settings={"registration": registration, "scoring": scoring})


def _affine_job(target: Target, atlas: Atlas, config: Config, cache: Cache, key: str, threads: int):
    """Affine-register one atlas to the target (or take the manifest's transform for the pair) and score it
    for selection (runs in a worker): (atlas id,
    transform, record, score), or (atlas id, None, failure, None). The outcome goes into the cache."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    reg = config.registration
    try:
        fixed = _load_normalized(target.image, reg.normalization)
        moving = _load_normalized(atlas.image, reg.normalization)
        landmarks = None
        given = atlas.transform_for(target.id)
        if reg.affine.initialization == "landmarks" and given is None:
            landmarks = (read_landmarks(target.landmarks, image=fixed), read_landmarks(atlas.landmarks, image=moving))
        masks = _masks(target, atlas)
        initial = None if given is None else load_transform(given)
    except _READ_ERRORS as err:  # not cached: the file may be readable next time
        return atlas.id, None, {"reason": str(err)}, None
    try:
        transform, record = affine_stage(fixed, moving, config=reg, masks=masks, landmarks=landmarks, given=initial)
    except RegistrationError as err:
        cache.store("affine", key, None, {"failure": _failure(err)})
        return atlas.id, None, _failure(err), None
    if given is not None:
        record["transform_file"] = str(given)
    start = time.perf_counter()
    labels = read_labels(atlas.labels) if config.selection.roi != "none" else None
    mask = read_labels(target.mask) if target.mask is not None else None
    score = score_atlas(fixed, moving, transform, config=config.selection, labels=labels, mask=mask)
    record["selection_seconds"] = round(time.perf_counter() - start, 3)
    record["worker_peak_mb"] = _peak_mb()
    cache.store("affine", key, transform, {"record": record, "score": score})
    return atlas.id, transform, record, score


def _nonrigid_job(target: Target, atlas: Atlas, initial: sitk.Transform, reg: RegistrationConfig, cache: Cache,
                  key: str, threads: int):
    """Non-rigid registration of one selected atlas, starting from its affine (runs in a worker); the outcome
    goes into the cache."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        fixed = _load_normalized(target.image, reg.normalization)
        moving = _load_normalized(atlas.image, reg.normalization)
        masks = _masks(target, atlas)
    except _READ_ERRORS as err:
        return atlas.id, None, {"reason": str(err)}
    try:
        transform, record = nonrigid_stage(fixed, moving, initial=initial, config=reg, masks=masks)
    except RegistrationError as err:
        cache.store("nonrigid", key, None, {"failure": _failure(err)})
        return atlas.id, None, _failure(err)
    record["worker_peak_mb"] = _peak_mb()
    cache.store("nonrigid", key, transform, {"record": record})
    return atlas.id, transform, record


def _cached(cache: Cache, stage: str, key: str):
    """(transform or None, record or failure, score) of a cached outcome, else None."""
    hit = cache.load(stage, key)
    if hit is None:
        return None
    transform, outcome = hit
    if transform is None:
        return None, outcome["failure"], None
    return transform, {**outcome["record"], "cached": True}, outcome.get("score")


def _log_record(target_id: str, atlas_id: str, stage: str, record: dict) -> None:
    """Per-level details of one registration (``-v``)."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    levels = "; ".join(f"level {i}: {lv.get('iterations')} it, {lv.get('stop', '')}, {lv.get('seconds')} s"
                       for i, lv in enumerate(record.get("levels", []), 1))
    log.debug("target %s, atlas %s, %s%s: metric %s %s -> %s%s", target_id, atlas_id, stage,
              " (cached)" if record.get("cached") else "", record.get("metric"), record.get("metric_before"),
              record.get("metric_after"), f" ({levels})" if levels else "")


# --------------------------------------------------------------------------- one target

@dataclass
class TargetResult:
    """What segmenting one target produced."""

    target_id: str
    segmentation: Path | None  # None when the target failed
    scores: dict[int, dict[str, float]] | None  # label value → metric → value (with ground truth)
    record: dict = field(repr=False)
    error: str | None = None  # why the target could not be segmented

    @property
    def status(self) -> str:
        """``ok``, ``degraded`` (segmented, but it lost more than ``selection.max_dropped_share`` of its atlases)
        or ``failed``."""
        return "failed" if self.error is not None else self.record.get("status", "ok")

    @property
    def dice(self) -> dict[int, float] | None:
        return None if self.scores is None else {label: s["dice"] for label, s in self.scores.items()}

    @property
    def mean_dice(self) -> float | None:
        return None if self.scores is None else mean_score(self.dice)


@dataclass
class Ranking:
    """The affine stage and selection for one target (what ``atlasseg select`` prints).

    :func:`register_selected` adds to ``records`` and ``dropped``.
    """

    scores: dict[str, float]  # atlas id → selection score (higher is better), atlases whose affine stage succeeded
    ranked: list[str]  # those atlases, best first
    selected: list[str]  # the ones selection keeps, best first
    affine: dict[str, sitk.Transform]  # per ranked atlas
    records: dict[str, dict]  # registration records per ranked atlas: "affine", then "nonrigid"
    dropped: list[dict]  # failed registrations: atlas, stage, reason (and record)
    seconds: dict[str, float]

    def table(self, metric: str) -> list[dict]:
        """The full ranking as run.json keeps it: atlas and score, best first."""
        return [{"atlas": aid, metric: round(self.scores[aid], 6)} for aid in self.ranked]


def rank_atlases(target: Target, atlases: list[Atlas], config: Config, *, cache: Cache | None = None) -> Ranking:
    """Affine-register every atlas to ``target`` (in parallel; cached outcomes reused), score and rank them,
    and select. In a library larger than ``selection.prescreen``, only the atlases it keeps (see
    :mod:`atlasseg.library`)."""
    cache = cache or open_cache(config)
    clock = time.perf_counter()
    narrowed = prescreen(target, atlases, config, cache=cache)  # None: every atlas is ranked
    seconds = {} if narrowed is None else {"prescreen": time.perf_counter() - clock}
    atlases = atlases if narrowed is None else narrowed
    clock = time.perf_counter()
    keys = {a.id: _cache_key("affine", target, a, config) for a in atlases}
    outcomes = {a.id: hit for a in atlases if (hit := _cached(cache, "affine", keys[a.id])) is not None}
    tasks = [(target, a, config, cache, keys[a.id]) for a in atlases if a.id not in outcomes]
    for aid, *outcome in parallel_map(_affine_job, tasks, config.parallel, desc=f"{target.id}: affine"):
        outcomes[aid] = outcome
    seconds["affine_and_scoring"] = time.perf_counter() - clock
    clock = time.perf_counter()
    dropped, ok = [], {}
    for a in atlases:
        transform, record, score = outcomes[a.id]
        if transform is None:
            dropped.append({"atlas": a.id, "stage": "affine", **record})
        else:
            _log_record(target.id, a.id, "affine", record)
            ok[a.id] = (transform, record, score)
    scores = {aid: score for aid, (_, _, score) in ok.items()}
    ranked, selected = rank(scores), select(scores, config.selection)
    seconds["selection"] = time.perf_counter() - clock
    return Ranking(scores, ranked, selected, {aid: ok[aid][0] for aid in ranked},
                   {aid: {"affine": ok[aid][1]} for aid in ranked}, dropped, seconds)


def register_selected(
    target: Target, atlases: dict[str, Atlas], ranking: Ranking, config: Config, *, wanted: list[str], floor: int,
    cache: Cache | None = None,
) -> dict[str, sitk.Transform]:
    """Non-rigid registration (in parallel, from the affine; cached outcomes reused) of the ``wanted`` ranked atlases.

    A failed atlas is dropped (added to ``ranking.dropped``) and, while fewer than ``floor``
    have succeeded, the next-ranked atlases not yet tried are registered in its place.
    Returns the transforms of the atlases registered, best-ranked first (the affine ones,
    unchanged, when the non-rigid stage is off).
    """
    if not config.registration.nonrigid.enabled:
        return {aid: ranking.affine[aid] for aid in wanted}
    cache = cache or open_cache(config)
    done: dict[str, sitk.Transform] = {}
    untried = [aid for aid in ranking.ranked if aid not in wanted]
    batch = list(wanted)
    while batch:
        keys = {aid: _cache_key("nonrigid", target, atlases[aid], config) for aid in batch}
        outcomes = {aid: hit[:2] for aid in batch if (hit := _cached(cache, "nonrigid", keys[aid])) is not None}
        tasks = [(target, atlases[aid], ranking.affine[aid], config.registration, cache, keys[aid])
                 for aid in batch if aid not in outcomes]
        for aid, *outcome in parallel_map(_nonrigid_job, tasks, config.parallel, desc=f"{target.id}: non-rigid"):
            outcomes[aid] = outcome
        for aid in batch:
            transform, result = outcomes[aid]
            if transform is None:
                ranking.dropped.append({"atlas": aid, "stage": "nonrigid", **result})
            else:
                _log_record(target.id, aid, "non-rigid", result)
                done[aid] = transform
                ranking.records[aid]["nonrigid"] = result
        missing = max(0, floor - len(done))
        batch, untried = untried[:missing], untried[missing:]
    return {aid: done[aid] for aid in ranking.ranked if aid in done}


def propagate(atlas: Atlas, transform: sitk.Transform, reference: sitk.Image, config: Config, *, intensities: bool):
    """One candidate: the atlas's labels and (when ``intensities``) its normalised image on ``reference``'s grid."""
    labels = read_labels(atlas.labels, like=read_geometry(atlas.image), like_path=atlas.image)
    labels = propagate_labels(labels, transform, reference, interpolator=config.propagation.interpolator)
    warped = None
    if intensities:
        warped = propagate_intensities(_load_normalized(atlas.image, config.registration.normalization), transform, reference)
    return labels, warped


@dataclass
class Registered:
    """One target and its registered atlases: the per-target flow up to fusion, shared by ``run``
    (:func:`segment_target`) and cross-validation and the benchmarks (:func:`prepare_case`)."""

    target: Target
    image: sitk.Image  # the target as read
    truth: sitk.Image | None  # its labels on its grid (floating-point noise snapped), when it has them
    atlases: dict[str, Atlas]
    ranking: Ranking
    transforms: dict[str, sitk.Transform]  # the atlases registered, best-ranked first
    floor: int  # the fewest atlases it is segmented with (resolved ``selection.min_atlases``)
    seconds: dict[str, float]
    memory: dict[str, float | None]

    def reference(self, config: Config) -> sitk.Image:
        """The target with its intensities normalised like the atlases' (what fusion compares them with)."""
        return normalize_intensity(self.image, method=config.registration.normalization)

    def candidates(self, config: Config, *, intensities: bool):
        """Each registered atlas's candidate, best-ranked first, propagated one at a time: (atlas id, labels,
        warped intensities or None). The time spent adds to ``seconds['propagation']``."""
        self.seconds.setdefault("propagation", 0.0)
        for aid, transform in self.transforms.items():
            clock = time.perf_counter()
            labels, warped = propagate(self.atlases[aid], transform, self.image, config, intensities=intensities)
            self.seconds["propagation"] += time.perf_counter() - clock
            yield aid, labels, warped


def register_target(target: Target, atlases: list[Atlas], config: Config, *, cache: Cache | None = None,
                    count: int | str = "selected") -> Registered:
    """Read ``target`` (and its ground truth), rank every atlas (affine stage) and register non-rigidly
    ``count`` of them: ``"selected"`` (what selection keeps; failed ones replaced by the next-ranked while
    fewer than ``selection.min_atlases`` (see :func:`~atlasseg.selection.min_atlases`) succeeded), a number of
    best-ranked, or ``"all"`` (both with every failed one replaced). Each dropped atlas is logged with its reason."""
    image = read_image(target.image)
    truth = read_labels(target.labels, like=image, like_path=target.image) if target.labels is not None else None
    by_id = {a.id: a for a in atlases}
    ranking = rank_atlases(target, atlases, config, cache=cache)
    seconds = dict(ranking.seconds)
    memory = {"affine_and_scoring": _peak_mb()}
    if count == "selected":
        wanted, floor = ranking.selected, min_atlases(config.selection, len(atlases))
    else:
        wanted = ranking.ranked if count == "all" else ranking.ranked[:count]
        floor = len(wanted)
    clock = time.perf_counter()
    transforms = register_selected(target, by_id, ranking, config, wanted=wanted, floor=floor, cache=cache)
    if config.registration.nonrigid.enabled and wanted:
        seconds["nonrigid"] = time.perf_counter() - clock
        memory["nonrigid"] = _peak_mb()
    for item in ranking.dropped:
        log.warning("target %s: atlas %s dropped (%s: %s)", target.id, item["atlas"], item["stage"], item["reason"])
    return Registered(target, image, truth, by_id, ranking, transforms, floor, seconds, memory)


@dataclass
class Case:
    """One target with its registered atlases' candidates held in memory (cross-validation, benchmarks)."""

    target: Target
    reference: sitk.Image  # the target image, intensities normalised like the atlases'
    truth: sitk.Image | None  # the target's labels, when it has them
    ranking: Ranking
    candidates: list[tuple[str, sitk.Image, sitk.Image | None]]  # (atlas id, labels, intensities), best-ranked first
    seconds: dict[str, float]


def prepare_case(target: Target, atlases: list[Atlas], config: Config, *, count: int | None, intensities: bool,
                 cache: Cache | None = None) -> Case:
    """:func:`register_target` with the best ``count`` (None: all) and every candidate propagated once (with its
    warped intensities when ``intensities``): every fusion of them can then reuse the same registrations."""
    registered = register_target(target, atlases, config, cache=cache, count="all" if count is None else count)
    candidates = list(registered.candidates(config, intensities=intensities))
    return Case(target, registered.reference(config), registered.truth, registered.ranking, candidates,
                registered.seconds)


def segment_target(target: Target, atlases: list[Atlas], config: Config, *, out_dir: Path, label_names: dict[int, str],
                   cache: Cache | None = None, calibration: Calibration | None = None) -> TargetResult:
    """Segment one target with the given atlases; write ``<out>/<target>/segmentation.<output.format>`` and, last,
    ``<out>/<target>/target.json`` (the target's record: what a resumed run reuses). With ``calibration``
    (``quality.enabled``), the record holds each label's predicted Dice (:mod:`atlasseg.quality`)."""
    registered = register_target(target, atlases, config, cache=cache)
    ranking, transforms = registered.ranking, registered.transforms
    seconds, memory = registered.seconds, registered.memory
    floor, dropped, used = registered.floor, ranking.dropped, list(transforms)
    if len(used) < floor:
        reasons = "; ".join(f"{d['atlas']}: {d['reason']}" for d in dropped) or "none failed"
        raise RegistrationError(
            f"target {target.id}: only {len(used)} atlas registration(s) succeeded, "
            f"selection.min_atlases is {floor} ({reasons})"
        )
    degraded = _degraded(len(dropped), len(atlases), config.selection)
    if degraded is not None:
        log.warning("target %s: degraded: %s", target.id, degraded)
    tried = set(used) | {d["atlas"] for d in dropped if d["stage"] == "nonrigid"}
    records = {aid: ranking.records[aid] for aid in ranking.ranked if aid in tried}

    # Propagate and fuse, one candidate at a time.
    fuser = make_fuser(registered.reference(config), config=config.fusion)
    spread = Disagreement() if config.output.report else None  # the QC report's heat map
    votes = CandidateVotes() if calibration is not None else None
    seconds["propagation"] = seconds["fusion"] = 0.0
    # One step per candidate, and a last one for the fusion's own work (joint label fusion's weights, STAPLE's EM).
    with progress(total=len(used) + 1, desc=f"{target.id}: propagation and fusion", unit="step") as bar:
        for _, candidate, intensities in registered.candidates(config, intensities=fuser.needs_intensities):
            clock = time.perf_counter()
            fuser.add(candidate, intensities)
            if spread is not None:
                spread.add(candidate)
            if votes is not None:
                votes.add(candidate)
            seconds["fusion"] += time.perf_counter() - clock
            bar.update()
        clock = time.perf_counter()
        segmentation = fuser.result()
        probabilities = fuser.probabilities() if config.output.probability_maps else {}
        seconds["fusion"] += time.perf_counter() - clock
        bar.update()
    memory["propagation_and_fusion"] = _peak_mb()

    scores_out = None
    if registered.truth is not None:
        clock = time.perf_counter()
        labels = sorted(label_names) or None
        scores_out = evaluate(segmentation, registered.truth, labels=labels, metrics=evaluation_metrics(config))
        seconds["evaluation"] = time.perf_counter() - clock

    clock = time.perf_counter()
    target_dir = out_dir / target.id
    layout = LAYOUTS[config.output.layout]
    seg_path = layout.segmentation(out_dir, target.id, config.output.format)
    write_image(segmentation, seg_path)
    for value, probability in probabilities.items():
        if value:
            write_image(probability, layout.probability(out_dir, target.id, value, label_names, config.output.format))
    if spread is not None:
        write_image(spread.result(), target_dir / f"disagreement.{config.output.format}")
    if config.output.save_transforms:
        for aid in used:
            save_transform(transforms[aid], target_dir / "transforms" / f"{aid}.h5")
    seconds["output"] = time.perf_counter() - clock

    record = {
        "image": str(target.image),
        "status": "ok" if degraded is None else "degraded",
        **({} if degraded is None else {"degraded": degraded}),
        "segmentation": Path(os.path.relpath(seg_path, target_dir)).as_posix(),  # from the target's folder
        **({"disagreement": f"disagreement.{config.output.format}"} if spread is not None else {}),
        "ranking": ranking.table(config.selection.metric),
        "selected": used,
        "dropped": dropped,
        "registrations": records,
        "fusion": {**dataclasses.asdict(config.fusion), "candidates": fuser.n_candidates},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "peak_memory_mb": memory,
    }
    if scores_out is not None:
        record["scores"] = {str(k): s for k, s in scores_out.items()}
        record["mean_dice"] = mean_score({k: s["dice"] for k, s in scores_out.items()})
    if calibration is not None:
        clock = time.perf_counter()
        record["quality"] = calibration.assess(votes, segmentation, fuser, labels=sorted(label_names),
                                               target=target_features(records, used))
        record["seconds"]["quality"] = round(time.perf_counter() - clock, 3)
    write_json(target_dir / TARGET_RECORD, {"inputs": inputs_key(target, atlases, config),
                                            "files": input_digests(target, atlases), "record": record})
    return TargetResult(target.id, seg_path, scores_out, record)


def _degraded(n_dropped: int, n_atlases: int, config: SelectionConfig) -> str | None:
    """Why a target that lost ``n_dropped`` of its ``n_atlases`` atlases is degraded, or None when it is not."""
    if n_dropped <= config.max_dropped_share * n_atlases:
        return None
    return (f"{n_dropped} of its {n_atlases} atlases were dropped, more than selection.max_dropped_share "
            f"({config.max_dropped_share:g}); see their reasons under 'dropped'")


TARGET_RECORD = "target.json"


def _input_files(target: Target, atlases: list[Atlas]) -> dict[str, Path | None]:
    """Every file one target's outputs depend on, by ``target|atlas:<id>:<field>``."""
    files = {f"{kind}:{entry.id}:{name}": getattr(entry, name)
             for kind, entries in (("target", [target]), ("atlas", atlases)) for entry in entries
             for name in ("image", "labels", "mask", "landmarks")}
    files.update({f"atlas:{a.id}:transform": a.transform_for(target.id) for a in atlases})
    return files


def inputs_key(target: Target, atlases: list[Atlas], config: Config) -> str:
    """What one target's outputs depend on: its files, its atlases' files, the config (as run.json compares it)."""
    return entry_key("target", files=_input_files(target, atlases), settings=_comparable(config.to_dict()))


def input_digests(target: Target, atlases: list[Atlas]) -> dict[str, str]:
    """The contents (SHA-256) of the files one target's outputs depend on, for saying which of them changed."""
    return {name: file_digest(path) for name, path in _input_files(target, atlases).items() if path is not None}


def check_changed_inputs(out: Path, targets: list[Target], manifest: Manifest, config: Config, *,
                         force: bool = False) -> None:
    """Before any work: refuse (unless ``force``) to write over a target's outputs in ``out`` that were made from
    other inputs (another manifest, or files changed since), naming the targets and the files that differ."""
    changed = []
    for target in targets:
        try:
            document = json.loads((out / target.id / TARGET_RECORD).read_text())
            old_key, old_files = document["inputs"], document.get("files", {})
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not segmented there yet (or a record too damaged to be reused: segmented again)
        atlases = manifest.atlases_for(target)
        if old_key == inputs_key(target, atlases, config):
            continue
        new_files = input_digests(target, atlases)
        names = [name for name in dict.fromkeys([*old_files, *new_files]) if old_files.get(name) != new_files.get(name)]
        changed.append(f"{target.id} ({', '.join(names[:3]) + (', ...' if len(names) > 3 else '') or 'inputs'})")
    if not changed:
        return
    what = f"segmentations of {len(changed)} target(s) made from other inputs: {'; '.join(changed[:5])}"
    if not force:
        raise AtlassegError(f"{out}: holds {what}; choose another --out, or --force to write over them")
    log.warning("%s: holds %s; writing over them (--force)", out, what)


def finished_target(target: Target, atlases: list[Atlas], config: Config, out_dir: Path) -> TargetResult | None:
    """The result of a target an earlier run of the same inputs and config finished in ``out_dir``, else None."""
    folder = out_dir / target.id
    try:
        document = json.loads((folder / TARGET_RECORD).read_text())
        if document["inputs"] != inputs_key(target, atlases, config):
            return None
        record = document["record"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    segmentation = LAYOUTS[config.output.layout].segmentation(out_dir, target.id, config.output.format)
    if not segmentation.is_file():
        return None
    scores = None
    if "scores" in record:
        scores = {int(v): {m: math.nan if x is None else x for m, x in s.items()} for v, s in record["scores"].items()}
    return TargetResult(target.id, segmentation, scores, record)


def json_safe(value):
    """``value`` with NaN and infinities as ``None``: run.json stays strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, document) -> None:
    """Write ``document`` as strict, indented JSON (NaN and infinities as null), atomically."""
    atomic_write_text(path, json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------- one pair

REGISTER_OUTPUTS = ("warped.nii.gz", "transform.h5", "displacement.nii.gz", "jacobian.nii.gz", "record.json")


def register_files(
    fixed_path: Path,
    moving_path: Path,
    config: RegistrationConfig,
    *,
    out_dir: Path,
    labels_path: Path | None = None,
    fixed_mask: Path | None = None,
    moving_mask: Path | None = None,
    fixed_landmarks: Path | None = None,
    moving_landmarks: Path | None = None,
) -> dict:
    """Register one image pair from files; write the results into ``out_dir``.

    Writes ``warped.nii.gz`` (the moving image on the fixed grid), ``transform.h5``
    (fixed-space points → moving-space points, readable by ``SimpleITK.ReadTransform``
    and ANTs), ``displacement.nii.gz`` (the same mapping as a displacement field on
    the fixed grid), ``jacobian.nii.gz`` (its Jacobian determinant), ``record.json``
    and, given moving labels, ``warped_labels.nii.gz``. A registration that fails its
    checks writes only ``record.json`` (with the reason) and raises.
    """
    fixed, moving = read_checked_image(fixed_path), read_checked_image(moving_path)
    labels = read_labels(labels_path, like=moving, like_path=moving_path) if labels_path is not None else None
    masks = _read_masks((fixed_mask, fixed_path, fixed), (moving_mask, moving_path, moving))
    landmarks = None
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise ImageError("landmarks are needed for both images (--fixed-landmarks and --moving-landmarks)")
    if fixed_landmarks is not None:
        landmarks = (read_landmarks(fixed_landmarks, image=fixed), read_landmarks(moving_landmarks, image=moving))
        if config.affine.initialization != "landmarks":
            config = dataclasses.replace(config, affine=dataclasses.replace(config.affine, initialization="landmarks"))
    start = time.perf_counter()
    record = {"fixed": str(fixed_path), "moving": str(moving_path), "config": dataclasses.asdict(config)}
    try:
        transform, record["registration"] = register(
            normalize_intensity(fixed, method=config.normalization),
            normalize_intensity(moving, method=config.normalization),
            config=config, masks=masks, landmarks=landmarks,
        )
    except RegistrationDiverged as err:
        record.update(status=err.record.get("status", "diverged"), reason=str(err), registration=err.record)
        write_json(out_dir / "record.json", record)
        raise
    record["seconds"] = round(time.perf_counter() - start, 3)
    record["status"] = "ok"
    write_image(propagate_intensities(moving, transform, fixed), out_dir / "warped.nii.gz")
    save_transform(transform, out_dir / "transform.h5")
    save_displacement_field(transform, fixed, out_dir / "displacement.nii.gz")
    write_image(jacobian_determinant(transform, fixed), out_dir / "jacobian.nii.gz")
    if labels is not None:
        write_image(propagate_labels(labels, transform, fixed), out_dir / "warped_labels.nii.gz")
    write_json(out_dir / "record.json", record)
    return record


# --------------------------------------------------------------------------- a whole run

def versions() -> dict[str, str]:
    import joblib
    import numpy
    import scipy
    import yaml

    return {
        "atlasseg": __version__,
        "python": platform.python_version(),
        "SimpleITK": sitk.Version_VersionString(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "joblib": joblib.__version__,
        "pyyaml": yaml.__version__,
    }


def check_output_dir(out: Path, config: Config, manifest: Manifest, *, force: bool = False) -> None:
    """Before any work: ``out`` is a writable folder, and holds no outputs of another config.

    A folder with a ``run.json`` whose config differs (``output.dir`` and ``output.report`` aside), or with
    files but no ``run.json``, is refused unless ``force``: outputs of two configs are never silently mixed. A new
    folder gets a ``run.json`` at once (the config, status ``running``), so a stopped run is recognised.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".tmp-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise AtlassegError(f"{out}: output folder is not writable ({err.strerror or err}); choose another --out") from None
    record = out / "run.json"
    wanted = _comparable(config.to_dict())
    if record.exists():
        try:
            found = _comparable(json.loads(record.read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError):
            found = None
        if found == wanted:
            if removed := remove_temporaries(out):
                log.info("%s: removed %d temporary file(s) of a stopped run", out, removed)
            return
        what = "an unreadable run.json" if found is None else "outputs of a different config (" + ", ".join(
            f"{key}: {old!r} -> {new!r}" for key, old, new in _differences(found, wanted)[:3]) + ")"
    elif any(out.iterdir()):
        what = "files but no run.json"
    else:
        write_json(record, {"config": config.to_dict(), "manifest": str(manifest.path), "status": "running"})
        return
    if not force:
        raise AtlassegError(f"{out}: holds {what}; choose another --out, or --force to write over them")
    log.warning("%s: holds %s; writing over them (--force)", out, what)


def _comparable(config: dict) -> dict:
    """The config without what does not change the segmentations: where they go, the cache, the parallel
    backend, the report."""
    ignored = ("dir", "cache", "cache_dir", "cache_max_gb", "report")
    output = {k: v for k, v in config.get("output", {}).items() if k not in ignored}
    return {**{k: v for k, v in config.items() if k != "parallel"}, "output": output}


def _differences(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """(key path, old value, new value) of every leaf that differs between two nested mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in dict.fromkeys([*old, *new])
                for d in _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))]
    return [] if old == new else [(prefix, old, new)]


# What makes one target fail while the others go on: bad or vanished files, too few atlases left, ITK errors.
_TARGET_ERRORS = (AtlassegError, RuntimeError, OSError, MemoryError)


def run(config: Config, manifest: Manifest, *, out_dir: str | Path | None = None, target_ids=None,
        force: bool = False) -> list[TargetResult]:
    """Segment the manifest's targets (or those named) and write segmentations, metrics.csv, run.json
    and (``output.report``) the QC report (:func:`atlasseg.report.write_report`).

    Inputs and the output folder are checked first (:func:`check_inputs`, :func:`check_output_dir`).
    Registrations come from the cache when an earlier run made them, and targets an earlier run of the
    same config finished in ``out_dir`` are not segmented again (a stopped run resumes); ``force``
    recomputes everything and writes over another config's or other inputs' outputs. A target that fails is
    recorded (``error`` of its result, ``status: failed`` in run.json) and the others still run; one that lost
    more than ``selection.max_dropped_share`` of its atlases is ``degraded``. Interrupted (Ctrl-C), the run
    writes ``status: interrupted``, metrics.csv and the report of the targets finished, and re-raises.
    """
    out = Path(out_dir if out_dir is not None else config.output.dir)
    targets = [manifest.target(t) for t in target_ids] if target_ids else list(manifest.targets)
    if not targets:
        raise AtlassegError(f"{manifest.path}: no targets to segment")
    check_inputs(manifest, config)
    check_output_dir(out, config, manifest, force=force)
    check_changed_inputs(out, targets, manifest, config, force=force)
    cache = open_cache(config, force=force)
    start = time.perf_counter()
    results: list[TargetResult] = []
    run_record = {"versions": versions(), "config": config.to_dict(), "manifest": str(manifest.path),
                  "cache": str(cache.root) if cache.enabled else None, "status": "running", "targets": {}}
    try:
        with session(config.parallel), log_above_bars(), progress(targets, desc="targets", unit="target",
                                                                  leave=True) as bar:
            calibration = None
            if config.quality.enabled:
                clock = time.perf_counter()
                calibration = calibrate(manifest, config, cache=cache)
                run_record["quality"] = {**calibration.summary(), "seconds": round(time.perf_counter() - clock, 3)}
            for target in bar:
                results.append(_run_target(target, manifest, config, out=out, cache=cache, force=force,
                                           calibration=calibration))
                run_record["targets"][target.id] = results[-1].record
                write_json(out / "run.json", run_record)  # after every target: how far a long run has come
    except KeyboardInterrupt:
        _finish(out, run_record, results, manifest, config, start=start, interrupted=True)
        log.warning("interrupted after %d of %d target(s); run the same command again to resume (finished targets "
                    "and registrations are kept)", len(results), len(targets))
        raise
    _finish(out, run_record, results, manifest, config, start=start)
    return results


def _run_target(target: Target, manifest: Manifest, config: Config, *, out: Path, cache: Cache,
                force: bool, calibration: Calibration | None) -> TargetResult:
    """One target of a run: reused when an earlier run finished it, else segmented (a failure recorded, not raised);
    then the cache is brought under its cap."""
    began = time.time()
    atlases = manifest.atlases_for(target)
    result = None if force else finished_target(target, atlases, config, out)
    if result is not None:
        log.info("target %s: finished by an earlier run, reused", target.id)
    else:
        log.info("target %s: %d atlases", target.id, len(atlases))
        try:
            result = segment_target(target, atlases, config, out_dir=out, label_names=manifest.label_names,
                                    cache=cache, calibration=calibration)
        except _TARGET_ERRORS as err:
            log.error("target %s failed: %s", target.id, err)
            result = TargetResult(target.id, None, None, {"image": str(target.image), "status": "failed",
                                                          "error": str(err)}, error=str(err))
    if result.dice is not None:
        log.info("target %s: mean Dice %.3f", target.id, result.mean_dice)
    result.record["manifest_image"] = manifest.as_written(target, "image")  # what the report shows
    cache.evict(in_use_since=began)
    return result


def _finish(out: Path, run_record: dict, results: list[TargetResult], manifest: Manifest, config: Config, *,
            start: float, interrupted: bool = False) -> None:
    """metrics.csv, the final run.json (status ``complete``, ``degraded``, ``failed`` or ``interrupted``) and the
    report, of the targets finished."""
    write_metrics(out / "metrics.csv", results, manifest.label_names, evaluation_metrics(config))
    LAYOUTS[config.output.layout].finish(out, manifest.label_names)
    failed = [r.target_id for r in results if r.status == "failed"]
    degraded = [r.target_id for r in results if r.status == "degraded"]
    if degraded and not interrupted:
        log.warning("%d of %d target(s) degraded (%s): each lost more than selection.max_dropped_share of its "
                    "atlases; reasons in %s", len(degraded), len(results), ", ".join(degraded), out / "run.json")
    status = "interrupted" if interrupted else "failed" if failed else "degraded" if degraded else "complete"
    run_record.update(status=status, failed_targets=failed, degraded_targets=degraded,
                      seconds_total=round(time.perf_counter() - start, 3), peak_memory_mb=_peak_mb())
    write_json(out / "run.json", run_record)
    if config.output.report:
        from .report import write_report  # matplotlib is imported only for a report

        try:
            write_report(out, run_record, manifest)
        except _TARGET_ERRORS as err:  # the segmentations and run.json are written: a warning, not a failed run
            log.warning("%s: QC report not written (%s)", out / "index.html", err)


def evaluation_metrics(config: Config) -> tuple[str, ...]:
    """The configured metrics, Dice always first (the run's summary is the Dice table)."""
    return tuple(dict.fromkeys(("dice", *config.evaluation.metrics)))


def write_metrics(path: Path, results: list[TargetResult], label_names: dict[int, str], metrics) -> None:
    """``metrics.csv``: one row per target and label, plus the target's mean. With predicted Dice
    (``quality.enabled``) every segmented target has rows, its metrics empty without ground truth, and three
    more columns: ``predicted_dice``, ``predicted_dice_error`` and ``review`` (the mean row: any label's)."""
    if not any("quality" in r.record for r in results):
        table = [row for r in results if r.scores is not None for row in rows(r.target_id, r.scores, label_names, metrics)]
        write_table(path, header(metrics), table)
        return
    table = []
    for r in results:
        quality = {int(v): q for v, q in r.record.get("quality", {}).items()}
        if r.scores is None and not quality:
            continue
        scores = r.scores or {v: {m: math.nan for m in metrics} for v in quality}
        for row in rows(r.target_id, {**{v: {m: math.nan for m in metrics} for v in quality}, **scores},
                        label_names, metrics):
            if row[1] == "mean":
                flagged = [q["review"] for q in quality.values()]
                predicted = [q["predicted_dice"] for q in quality.values()]
                row += [mean_score(dict(enumerate(predicted))), math.nan, str(any(flagged)).lower() if flagged else ""]
            elif row[1] in quality:
                q = quality[row[1]]
                row += [float(q["predicted_dice"]), float(q["error"]), str(q["review"]).lower()]
            else:
                row += [math.nan, math.nan, ""]
            table.append(row)
    write_table(path, [*header(metrics), "predicted_dice", "predicted_dice_error", "review"], table)


def write_table(path: Path, head: list[str], table: list[list]) -> None:
    """Write a CSV atomically; floats with 6 decimals, NaN as an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(head)
    writer.writerows([[_csv_float(v) if isinstance(v, float) else v for v in row] for row in table])
    atomic_write_text(path, buffer.getvalue())


def _csv_float(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"
