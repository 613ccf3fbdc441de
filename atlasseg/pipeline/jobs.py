"""Worker jobs (one registration stage of one atlas pair, in a worker process), their cache keys, and the
fan-out that ranks the atlases and registers the selected ones."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..cache import Cache, entry_key, file_digest, open_cache, settings
from ..config import Config, RegistrationConfig
from ..errors import AtlassegError, RegistrationError
from ..imageio import normalize_intensity, read_geometry, read_image, read_labels
from ..library import prescreen
from ..manifest import Atlas, Target
from ..parallel import parallel_map
from ..registration import Masks, RegistrationDiverged, affine_stage, load_transform, nonrigid_stage, read_landmarks
from ..registration.checks import foreground
from ..selection import rank, score_atlas, select, smoothed

log = logging.getLogger("atlasseg")


@contextlib.contextmanager
def timed(seconds: dict[str, float], stage: str):
    """Add the seconds the block takes to ``seconds[stage]`` (from 0), when it finishes without an exception."""
    start = time.perf_counter()
    yield
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


MEMO_BYTES = 1 << 27  # per process: the images read (and normalised) that later targets and stages reuse
_MEMO: OrderedDict[tuple, tuple[sitk.Image, int]] = OrderedDict()


def remembered(key: tuple, paths: tuple, make) -> sitk.Image:
    """``make()``, kept in this process under ``key`` and the contents of the files at ``paths``: an atlas is read,
    checked and normalised once per process (a worker serves many targets and both registration stages), not
    once per target and stage; a changed file is read again. The least recently used images beyond
    :data:`MEMO_BYTES` are dropped. Returns a copy (SimpleITK copies on write: the kept image never changes)."""
    full = (*key, *(file_digest(path) for path in paths))
    if full in _MEMO:
        _MEMO.move_to_end(full)
        return sitk.Image(_MEMO[full][0])
    image = make()
    size = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    _MEMO[full] = (image, size)
    while sum(n for _, n in _MEMO.values()) > MEMO_BYTES and len(_MEMO) > 1:
        _MEMO.popitem(last=False)
    return sitk.Image(image)


def load_normalized(path: Path, method: str) -> sitk.Image:
    """The image at ``path`` as float32, normalised by ``method`` (see :func:`remembered`)."""
    return remembered(
        ("normalized", str(path), method), (path,), lambda: normalize_intensity(read_image(path), method=method)
    )


def load_smoothed(path: Path, method: str, spacing: float) -> sitk.Image:
    """:func:`load_normalized`, smoothed for selection's scoring grid of ``spacing`` mm (see :func:`remembered`):
    a target's is made once for all its atlases, an atlas's once for all targets."""
    return remembered(
        ("smoothed", str(path), method, spacing), (path,), lambda: smoothed(load_normalized(path, method), spacing)
    )


def target_foreground(target: Target, method: str, fixed: sitk.Image, masks: Masks | None) -> np.ndarray:
    """The foreground of ``target`` (its image ``fixed``, normalised by ``method``) that the registrations are checked
    on (:func:`~atlasseg.registration.checks.foreground`), found once for all its atlases (see :func:`remembered`)."""
    paths = (target.image,) if target.mask is None else (target.image, target.mask)
    region = remembered(
        ("foreground", str(target.image), str(target.mask), method),
        paths,
        lambda: sitk.GetImageFromArray(foreground(fixed, masks).astype(np.uint8)),
    )
    return sitk.GetArrayViewFromImage(region) > 0


def atlas_labels(atlas: Atlas, *, snapped: bool = True) -> sitk.Image:
    """``atlas``'s label map (``snapped``: its grid snapped onto its image's, see :func:`~atlasseg.imageio.read_labels`),
    see :func:`remembered`."""
    if not snapped:
        return remembered(("labels", str(atlas.labels)), (atlas.labels,), lambda: read_labels(atlas.labels))
    return remembered(
        ("labels", str(atlas.labels), str(atlas.image)),
        (atlas.labels, atlas.image),
        lambda: read_labels(atlas.labels, like=read_geometry(atlas.image), like_path=atlas.image),
    )


def read_masks(fixed: tuple, moving: tuple) -> Masks | None:
    """Masks from (mask path or None, its image's path, that image if already read) for each side;
    each is checked against (and snapped onto) its image's grid. None when neither side has one."""
    if fixed[0] is None and moving[0] is None:
        return None
    return Masks(
        *(
            None
            if mask is None
            else read_labels(mask, like=read_geometry(path) if like is None else like, like_path=path)
            for mask, path, like in (fixed, moving)
        )
    )


def _masks(target: Target, atlas: Atlas) -> Masks | None:
    return read_masks((target.mask, target.image, None), (atlas.mask, atlas.image, None))


def _failure(err: RegistrationError) -> dict:
    """What run.json keeps of a failed registration: the reason, and the record when it ran to the end."""
    return {"reason": str(err), **({"record": err.record} if isinstance(err, RegistrationDiverged) else {})}


def peak_mb() -> float | None:
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
    files = {
        "target": target.image,
        "target_mask": target.mask,
        "atlas": atlas.image,
        "atlas_mask": atlas.mask,
        "given_transform": atlas.transform_for(target.id),
    }
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
        fixed = load_normalized(target.image, reg.normalization)
        moving = load_normalized(atlas.image, reg.normalization)
        landmarks = None
        given = atlas.transform_for(target.id)
        if reg.affine.initialization == "landmarks" and given is None:
            landmarks = (read_landmarks(target.landmarks, image=fixed), read_landmarks(atlas.landmarks, image=moving))
        masks = _masks(target, atlas)
        initial = None if given is None else load_transform(given)
    except _READ_ERRORS as err:  # not cached: the file may be readable next time
        return atlas.id, None, {"reason": str(err)}, None
    try:
        region = target_foreground(target, reg.normalization, fixed, masks)
        transform, record = affine_stage(
            fixed, moving, config=reg, masks=masks, landmarks=landmarks, given=initial, region=region
        )
    except RegistrationError as err:
        cache.store("affine", key, None, {"failure": _failure(err)})
        return atlas.id, None, _failure(err), None
    if given is not None:
        record["transform_file"] = str(given)
    with timed(record, "selection_seconds"):
        labels = atlas_labels(atlas, snapped=False) if config.selection.roi != "none" else None
        mask = read_labels(target.mask) if target.mask is not None else None
        spacing = config.selection.grid_spacing
        score = score_atlas(
            load_smoothed(target.image, reg.normalization, spacing),
            load_smoothed(atlas.image, reg.normalization, spacing),
            transform,
            config=config.selection,
            labels=labels,
            mask=mask,
            smoothed_already=True,
        )
    record["selection_seconds"] = round(record["selection_seconds"], 3)
    record["worker_peak_mb"] = peak_mb()
    cache.store("affine", key, transform, {"record": record, "score": score})
    return atlas.id, transform, record, score


def _nonrigid_job(
    target: Target, atlas: Atlas, initial: sitk.Transform, reg: RegistrationConfig, cache: Cache, key: str, threads: int
):
    """Non-rigid registration of one selected atlas, starting from its affine (runs in a worker); the outcome
    goes into the cache."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        fixed = load_normalized(target.image, reg.normalization)
        moving = load_normalized(atlas.image, reg.normalization)
        masks = _masks(target, atlas)
    except _READ_ERRORS as err:
        return atlas.id, None, {"reason": str(err)}
    try:
        region = target_foreground(target, reg.normalization, fixed, masks)
        transform, record = nonrigid_stage(fixed, moving, initial=initial, config=reg, masks=masks, region=region)
    except RegistrationError as err:
        cache.store("nonrigid", key, None, {"failure": _failure(err)})
        return atlas.id, None, _failure(err)
    record["worker_peak_mb"] = peak_mb()
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
    levels = "; ".join(
        f"level {i}: {lv.get('iterations')} it, {lv.get('stop', '')}, {lv.get('seconds')} s"
        for i, lv in enumerate(record.get("levels", []), 1)
    )
    log.debug(
        "target %s, atlas %s, %s%s: metric %s %s -> %s%s",
        target_id,
        atlas_id,
        stage,
        " (cached)" if record.get("cached") else "",
        record.get("metric"),
        record.get("metric_before"),
        record.get("metric_after"),
        f" ({levels})" if levels else "",
    )


@dataclass
class Ranking:
    """The affine stage and selection for one target (what ``atlasseg select`` prints).

    :func:`register_selected` returns a copy with the non-rigid stage added to ``records`` and ``dropped``.
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
    seconds: dict[str, float] = {}
    with timed(seconds, "prescreen"):
        narrowed = prescreen(target, atlases, config, cache=cache)  # None: every atlas is ranked
    if narrowed is None:
        del seconds["prescreen"]
    atlases = atlases if narrowed is None else narrowed
    with timed(seconds, "affine_and_scoring"):
        keys = {a.id: _cache_key("affine", target, a, config) for a in atlases}
        outcomes = {a.id: hit for a in atlases if (hit := _cached(cache, "affine", keys[a.id])) is not None}
        tasks = [(target, a, config, cache, keys[a.id]) for a in atlases if a.id not in outcomes]
        for aid, *outcome in parallel_map(_affine_job, tasks, config.parallel, desc=f"{target.id}: affine"):
            outcomes[aid] = outcome
    with timed(seconds, "selection"):
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
    return Ranking(
        scores,
        ranked,
        selected,
        {aid: ok[aid][0] for aid in ranked},
        {aid: {"affine": ok[aid][1]} for aid in ranked},
        dropped,
        seconds,
    )


def register_selected(
    target: Target,
    atlases: dict[str, Atlas],
    ranking: Ranking,
    config: Config,
    *,
    wanted: list[str],
    floor: int,
    cache: Cache | None = None,
) -> tuple[dict[str, sitk.Transform], Ranking]:
    """Non-rigid registration (in parallel, from the affine; cached outcomes reused) of the ``wanted`` ranked atlases.

    A failed atlas is dropped and, while fewer than ``floor`` have succeeded, the next-ranked
    atlases not yet tried are registered in its place. Returns the transforms of the atlases
    registered, best-ranked first (the affine ones, unchanged, when the non-rigid stage is off),
    and ``ranking`` with each one's non-rigid record added to ``records`` and each failure to
    ``dropped`` (``ranking`` itself is left as it was).
    """
    if not config.registration.nonrigid.enabled:
        return {aid: ranking.affine[aid] for aid in wanted}, ranking
    cache = cache or open_cache(config)
    done: dict[str, sitk.Transform] = {}
    records = {aid: dict(record) for aid, record in ranking.records.items()}
    dropped = list(ranking.dropped)
    untried = [aid for aid in ranking.ranked if aid not in wanted]
    batch = list(wanted)
    while batch:
        keys = {aid: _cache_key("nonrigid", target, atlases[aid], config) for aid in batch}
        outcomes = {aid: hit[:2] for aid in batch if (hit := _cached(cache, "nonrigid", keys[aid])) is not None}
        tasks = [
            (target, atlases[aid], ranking.affine[aid], config.registration, cache, keys[aid])
            for aid in batch
            if aid not in outcomes
        ]
        for aid, *outcome in parallel_map(_nonrigid_job, tasks, config.parallel, desc=f"{target.id}: non-rigid"):
            outcomes[aid] = outcome
        for aid in batch:
            transform, result = outcomes[aid]
            if transform is None:
                dropped.append({"atlas": aid, "stage": "nonrigid", **result})
            else:
                _log_record(target.id, aid, "non-rigid", result)
                done[aid] = transform
                records[aid]["nonrigid"] = result
        missing = max(0, floor - len(done))
        batch, untried = untried[:missing], untried[missing:]
    return {aid: done[aid] for aid in ranking.ranked if aid in done}, replace(ranking, records=records, dropped=dropped)
