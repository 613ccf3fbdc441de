"""Per-target orchestration: affine → select → non-rigid → propagate → fuse → evaluate → write.

Only this module does file I/O and parallelism. Work units carry file paths, so
parallel workers read their own images and build their own filters.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk
from joblib import Parallel, delayed

from . import __version__
from .config import Config, ParallelConfig, RegistrationConfig, SelectionConfig
from .errors import AtlassegError, ImageError, RegistrationError
from .evaluation import evaluate, header, mean_score, rows
from .fusion import make_fuser
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
    write_image,
)
from .manifest import Atlas, Manifest, Target
from .propagation import propagate_intensities, propagate_labels
from .registration import (
    Masks,
    RegistrationDiverged,
    affine_stage,
    jacobian_determinant,
    nonrigid_stage,
    read_landmarks,
    register,
    save_displacement_field,
    save_transform,
)
from .selection import rank, score_atlas, select

log = logging.getLogger("atlasseg")


def available_cores() -> int:
    """Cores this process may use (respects CPU affinity / container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def thread_budget(parallel: ParallelConfig, n_tasks: int) -> tuple[int, int]:
    """(jobs, ITK threads per job) with jobs × threads ≤ cores."""
    cores = available_cores()
    jobs = cores if parallel.n_jobs == -1 else parallel.n_jobs
    jobs = max(1, min(jobs, n_tasks, cores))
    threads = parallel.itk_threads or max(1, cores // jobs)
    return jobs, min(threads, max(1, cores // jobs))


def check_inputs(manifest: Manifest, config: Config | None = None) -> None:
    """Every listed file read once, before any work: readable and complete, scalar, 2D/3D, one
    dimensionality across the manifest; intensities finite and not constant; label maps whole,
    non-negative numbers on their image's grid (floating-point noise is snapped, with a warning), an
    atlas's not empty; masks on their image's grid. Warns about declared labels an atlas lacks and
    labels the manifest does not declare. With ``config``: every entry has the landmarks its
    initialisation needs, ``selection.k`` is compared with the atlas count (larger: a warning, all
    atlases are used) and the run's memory is estimated (:func:`check_memory`)."""
    entries = (*manifest.atlases, *manifest.targets)
    needs_landmarks = config is not None and config.registration.affine.initialization == "landmarks"
    dims: dict[int, str] = {}
    largest = None
    for entry in entries:  # headers only: cheap, and they size the run before any voxel is read
        if needs_landmarks and entry.landmarks is None:
            raise ImageError(f"{manifest.path}: {entry.id} has no 'landmarks' file, needed by "
                             "registration.affine.initialization: landmarks")
        geometry = read_geometry(entry.image)
        check_scalar(geometry, entry.image)
        dims.setdefault(geometry.dimension, str(entry.image))
        if largest is None or math.prod(geometry.size) > math.prod(largest.size):
            largest = geometry
        for other in (entry.labels, entry.mask):
            if other is not None:
                check_same_grid(geometry, read_geometry(other), image_path=entry.image, labels_path=other)
    if len(dims) > 1:
        raise ImageError(f"{manifest.path}: mixes 2D images ({dims[2]}) with 3D images ({dims[3]}); use one dimensionality")
    if config is not None:
        k = config.selection.k
        if k != "all" and k > len(manifest.atlases):
            log.warning("selection.k is %d but %s lists %d atlases: all of them are used", k, manifest.path,
                        len(manifest.atlases))
        check_memory(largest, config, n_tasks=len(manifest.atlases), n_labels=len(manifest.label_names) + 1)
    for entry in entries:  # then every voxel, once
        check_intensities(entry.image, read_voxels(entry.image))
        if entry.labels is not None:
            _check_label_map(entry, manifest)
        if entry.mask is not None:
            check_label_values(entry.mask, read_voxels(entry.mask))


def _check_label_map(entry: Atlas | Target, manifest: Manifest) -> None:
    path, declared = entry.labels, set(manifest.label_names)
    present = set(check_label_values(path, read_voxels(path)).tolist()) - {0}
    is_atlas = isinstance(entry, Atlas)
    if not present and is_atlas:
        raise ImageError(f"{path}: label map of atlas {entry.id!r} is empty (all background); fix it or leave the atlas out")
    if not present:
        log.warning("%s: ground truth of target %r is empty (all background): its scores are undefined", path, entry.id)
    if declared and present - declared:
        log.warning("%s: %s %r holds labels %s not declared in %s: segmented and scored without a name",
                    path, "atlas" if is_atlas else "target", entry.id, sorted(present - declared), manifest.path)
    if declared and is_atlas and present and declared - present:
        log.warning("%s: atlas %r lacks declared labels %s: it votes background there", path, entry.id,
                    ", ".join(f"{v} ({manifest.label_names[v]})" for v in sorted(declared - present)))


# Rough peak bytes per voxel of the largest image: one registration job (two float32 images, their
# normalised and smoothed copies, gradients, and the non-rigid stage's displacement fields: float64 per axis;
# `atlasseg register` with the default config peaked at 261 bytes per voxel on a 128^3 demo pair), and the
# fusion (a float32 vote per label, plus the weights and the intensities of one candidate; joint label
# fusion also keeps every candidate: float32 intensities and labels of up to 2 bytes).
_JOB_BYTES_PER_VOXEL = {2: 160, 3: 256}
_FUSION_BYTES_PER_VOXEL_AND_LABEL = 4
_JLF_BYTES_PER_VOXEL_AND_CANDIDATE = 6
MEMORY_LIMIT_ENV = "ATLASSEG_MEMORY_LIMIT"


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
    if config.fusion.method == "jlf":
        k = config.selection.k
        fusion += voxels * _JLF_BYTES_PER_VOXEL_AND_CANDIDATE * (n_tasks if k == "all" else min(k, n_tasks))
    return jobs * per_job + fusion, per_job, jobs


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
        f"({jobs} parallel registration(s) and fusion) but {_size(available)} are available: "
        f"crop or downsample the images{fewer} (or set {MEMORY_LIMIT_ENV})"
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


def _affine_job(target: Target, atlas: Atlas, reg: RegistrationConfig, selection: SelectionConfig, threads: int):
    """Affine-register one atlas to the target and score it for selection (runs in a worker)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    fixed = _load_normalized(target.image, reg.normalization)
    moving = _load_normalized(atlas.image, reg.normalization)
    landmarks = None
    if reg.affine.initialization == "landmarks":
        landmarks = (read_landmarks(target.landmarks, image=fixed), read_landmarks(atlas.landmarks, image=moving))
    try:
        transform, record = affine_stage(fixed, moving, config=reg, masks=_masks(target, atlas), landmarks=landmarks)
    except RegistrationError as err:
        return atlas.id, None, None, _failure(err)
    start = time.perf_counter()
    labels = read_labels(atlas.labels) if selection.roi != "none" else None
    mask = read_labels(target.mask) if target.mask is not None else None
    score = score_atlas(fixed, moving, transform, config=selection, labels=labels, mask=mask)
    record["selection_seconds"] = round(time.perf_counter() - start, 3)
    return atlas.id, transform, {"affine": record}, score


def _nonrigid_job(target: Target, atlas: Atlas, initial: sitk.Transform, reg: RegistrationConfig, threads: int):
    """Non-rigid registration of one selected atlas, starting from its affine (runs in a worker)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    fixed = _load_normalized(target.image, reg.normalization)
    moving = _load_normalized(atlas.image, reg.normalization)
    try:
        transform, record = nonrigid_stage(fixed, moving, initial=initial, config=reg, masks=_masks(target, atlas))
    except RegistrationError as err:
        return atlas.id, None, _failure(err)
    return atlas.id, transform, record


def _parallel_map(function, tasks: list[tuple], parallel: ParallelConfig) -> list:
    jobs, threads = thread_budget(parallel, len(tasks))
    if jobs == 1:
        results = [function(*task, threads) for task in tasks]
    else:
        results = Parallel(n_jobs=jobs, backend=parallel.backend)(delayed(function)(*task, threads) for task in tasks)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(available_cores())
    return results


# --------------------------------------------------------------------------- one target

@dataclass
class TargetResult:
    """What segmenting one target produced."""

    target_id: str
    segmentation: Path
    scores: dict[int, dict[str, float]] | None  # label value → metric → value (with ground truth)
    record: dict = field(repr=False)

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


def rank_atlases(target: Target, atlases: list[Atlas], config: Config) -> Ranking:
    """Affine-register every atlas to ``target`` (in parallel), score and rank them, and select."""
    clock = time.perf_counter()
    tasks = [(target, a, config.registration, config.selection) for a in atlases]
    results = _parallel_map(_affine_job, tasks, config.parallel)
    seconds = {"affine_and_scoring": time.perf_counter() - clock}
    clock = time.perf_counter()
    dropped = [{"atlas": aid, "stage": "affine", **score} for aid, tx, _, score in results if tx is None]
    ok = {aid: (tx, rec, score) for aid, tx, rec, score in results if tx is not None}
    scores = {aid: score for aid, (_, _, score) in ok.items()}
    ranked, selected = rank(scores), select(scores, config.selection)
    seconds["selection"] = time.perf_counter() - clock
    return Ranking(scores, ranked, selected, {aid: ok[aid][0] for aid in ranked}, {aid: ok[aid][1] for aid in ranked},
                   dropped, seconds)


def register_selected(
    target: Target, atlases: dict[str, Atlas], ranking: Ranking, config: Config, *, wanted: list[str], floor: int
) -> dict[str, sitk.Transform]:
    """Non-rigid registration (in parallel, from the affine) of the ``wanted`` ranked atlases.

    A failed atlas is dropped (added to ``ranking.dropped``) and, while fewer than ``floor``
    have succeeded, the next-ranked atlases not yet tried are registered in its place.
    Returns the transforms of the atlases registered, best-ranked first (the affine ones,
    unchanged, when the non-rigid stage is off).
    """
    if not config.registration.nonrigid.enabled:
        return {aid: ranking.affine[aid] for aid in wanted}
    done: dict[str, sitk.Transform] = {}
    untried = [aid for aid in ranking.ranked if aid not in wanted]
    batch = list(wanted)
    while batch:
        tasks = [(target, atlases[aid], ranking.affine[aid], config.registration) for aid in batch]
        for aid, tx, result in _parallel_map(_nonrigid_job, tasks, config.parallel):
            if tx is None:
                ranking.dropped.append({"atlas": aid, "stage": "nonrigid", **result})
            else:
                done[aid] = tx
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
class Case:
    """One target with its registered atlases' candidates held in memory (cross-validation, benchmarks)."""

    target: Target
    reference: sitk.Image  # the target image, intensities normalised like the atlases'
    truth: sitk.Image | None  # the target's labels, when it has them
    ranking: Ranking
    candidates: list[tuple[str, sitk.Image, sitk.Image | None]]  # (atlas id, labels, intensities), best-ranked first
    seconds: dict[str, float]


def prepare_case(target: Target, atlases: list[Atlas], config: Config, *, count: int | None, intensities: bool) -> Case:
    """Rank every atlas, register the best ``count`` (None: all) non-rigidly — a failed one replaced
    by the next-ranked — and propagate each registered atlas once (with its warped intensities
    when ``intensities``): every fusion of them can then reuse the same registrations."""
    by_id = {a.id: a for a in atlases}
    ranking = rank_atlases(target, atlases, config)
    seconds = dict(ranking.seconds)
    clock = time.perf_counter()
    wanted = ranking.ranked if count is None else ranking.ranked[:count]
    transforms = register_selected(target, by_id, ranking, config, wanted=wanted, floor=len(wanted))
    seconds["nonrigid"] = time.perf_counter() - clock
    clock = time.perf_counter()
    reference = read_image(target.image)
    candidates = [(aid, *propagate(by_id[aid], tx, reference, config, intensities=intensities))
                  for aid, tx in transforms.items()]
    seconds["propagation"] = time.perf_counter() - clock
    truth = None
    if target.labels is not None:
        truth = read_labels(target.labels)
        check_same_grid(reference, truth, image_path=target.image, labels_path=target.labels)
    normalized = normalize_intensity(reference, method=config.registration.normalization)
    return Case(target, normalized, truth, ranking, candidates, seconds)


def segment_target(target: Target, atlases: list[Atlas], config: Config, *, out_dir: Path, label_names: dict[int, str]):
    """Segment one target with the given atlases; write ``<out>/<target>/segmentation.nii.gz``."""
    by_id = {a.id: a for a in atlases}
    reference = read_image(target.image)
    truth = read_labels(target.labels, like=reference, like_path=target.image) if target.labels is not None else None

    # Affine stage for every atlas, scored for selection.
    ranking = rank_atlases(target, atlases, config)
    seconds = dict(ranking.seconds)

    clock = time.perf_counter()
    floor = config.selection.min_atlases
    transforms = register_selected(target, by_id, ranking, config, wanted=ranking.selected, floor=floor)
    if config.registration.nonrigid.enabled and ranking.selected:
        seconds["nonrigid"] = time.perf_counter() - clock
    dropped = ranking.dropped
    for item in dropped:
        log.warning("target %s: atlas %s dropped (%s: %s)", target.id, item["atlas"], item["stage"], item["reason"])
    used = list(transforms)
    if len(used) < floor:
        reasons = "; ".join(f"{d['atlas']}: {d['reason']}" for d in dropped) or "none failed"
        raise RegistrationError(
            f"target {target.id}: only {len(used)} atlas registration(s) succeeded, "
            f"selection.min_atlases is {floor} ({reasons})"
        )
    tried = set(used) | {d["atlas"] for d in dropped if d["stage"] == "nonrigid"}
    records = {aid: ranking.records[aid] for aid in ranking.ranked if aid in tried}

    # Propagate and fuse, one candidate at a time.
    fuser = make_fuser(normalize_intensity(reference, method=config.registration.normalization), config=config.fusion)
    seconds["propagation"] = seconds["fusion"] = 0.0
    for aid in used:
        clock = time.perf_counter()
        candidate, intensities = propagate(by_id[aid], transforms[aid], reference, config,
                                           intensities=fuser.needs_intensities)
        seconds["propagation"] += time.perf_counter() - clock
        clock = time.perf_counter()
        fuser.add(candidate, intensities)
        seconds["fusion"] += time.perf_counter() - clock
    clock = time.perf_counter()
    segmentation = fuser.result()
    probabilities = fuser.probabilities() if config.output.probability_maps else {}
    seconds["fusion"] += time.perf_counter() - clock

    scores_out = None
    if truth is not None:
        clock = time.perf_counter()
        check_same_grid(reference, truth, image_path=target.image, labels_path=target.labels)
        labels = sorted(label_names) or None
        scores_out = evaluate(segmentation, truth, labels=labels, metrics=evaluation_metrics(config))
        seconds["evaluation"] = time.perf_counter() - clock

    clock = time.perf_counter()
    target_dir = out_dir / target.id
    seg_path = target_dir / "segmentation.nii.gz"
    write_image(segmentation, seg_path)
    for value, probability in probabilities.items():
        if value:
            write_image(probability, target_dir / f"probability_{value}.nii.gz")
    if config.output.save_transforms:
        for aid in used:
            save_transform(transforms[aid], target_dir / "transforms" / f"{aid}.h5")
    seconds["output"] = time.perf_counter() - clock

    record = {
        "image": str(target.image),
        "ranking": ranking.table(config.selection.metric),
        "selected": used,
        "dropped": dropped,
        "registrations": records,
        "fusion": {**dataclasses.asdict(config.fusion), "candidates": fuser.n_candidates},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    if scores_out is not None:
        record["scores"] = {str(k): s for k, s in scores_out.items()}
        record["mean_dice"] = mean_score({k: s["dice"] for k, s in scores_out.items()})
    return TargetResult(target.id, seg_path, scores_out, record)


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
        record.update(status="diverged", reason=str(err), registration=err.record)
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

    A folder with a ``run.json`` whose config differs (``output.dir`` aside), or with files but no
    ``run.json``, is refused unless ``force``: outputs of two configs are never silently mixed. A new
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
    return {**config, "output": {k: v for k, v in config.get("output", {}).items() if k != "dir"}}


def _differences(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """(key path, old value, new value) of every leaf that differs between two nested mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in dict.fromkeys([*old, *new])
                for d in _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))]
    return [] if old == new else [(prefix, old, new)]


def run(config: Config, manifest: Manifest, *, out_dir: str | Path | None = None, target_ids=None,
        force: bool = False) -> list[TargetResult]:
    """Segment the manifest's targets (or those named) and write segmentations, metrics.csv and run.json.

    Inputs and the output folder are checked first (:func:`check_inputs`, :func:`check_output_dir`;
    ``force`` writes over another config's outputs).
    """
    out = Path(out_dir if out_dir is not None else config.output.dir)
    targets = [manifest.target(t) for t in target_ids] if target_ids else list(manifest.targets)
    if not targets:
        raise AtlassegError(f"{manifest.path}: no targets to segment")
    check_inputs(manifest, config)
    check_output_dir(out, config, manifest, force=force)
    start = time.perf_counter()
    results = []
    for target in targets:
        atlases = manifest.atlases_for(target)
        log.info("target %s: %d atlases", target.id, len(atlases))
        result = segment_target(target, atlases, config, out_dir=out, label_names=manifest.label_names)
        results.append(result)
        if result.dice is not None:
            log.info("target %s: mean Dice %.3f", target.id, result.mean_dice)
    write_metrics(out / "metrics.csv", results, manifest.label_names, evaluation_metrics(config))
    run_record = {
        "versions": versions(),
        "config": config.to_dict(),
        "manifest": str(manifest.path),
        "status": "complete",
        "seconds_total": round(time.perf_counter() - start, 3),
        "targets": {r.target_id: r.record for r in results},
    }
    write_json(out / "run.json", run_record)
    return results


def evaluation_metrics(config: Config) -> tuple[str, ...]:
    """The configured metrics, Dice always first (the run's summary is the Dice table)."""
    return tuple(dict.fromkeys(("dice", *config.evaluation.metrics)))


def write_metrics(path: Path, results: list[TargetResult], label_names: dict[int, str], metrics) -> None:
    """``metrics.csv``: one row per target and label, plus the target's mean."""
    table = [row for r in results if r.scores is not None for row in rows(r.target_id, r.scores, label_names, metrics)]
    write_table(path, header(metrics), table)


def write_table(path: Path, head: list[str], table: list[list]) -> None:
    """Write a CSV atomically; floats with 6 decimals, NaN as an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(head)
    writer.writerows([[_csv_float(v) if isinstance(v, float) else v for v in row] for row in table])
    atomic_write_text(path, buffer.getvalue())


def _csv_float(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"
