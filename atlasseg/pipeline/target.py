"""The single per-target flow: register the atlases, propagate, fuse, evaluate, write the segmentation."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from ..cache import Cache
from ..config import Config, SelectionConfig
from ..errors import RegistrationError
from ..evaluation import evaluate, mean_score
from ..fusion.registry import make_fuser
from ..imageio import normalize_intensity
from ..layout import LAYOUTS
from ..manifest import Atlas, Target
from ..parallel import local_threads, progress
from ..propagation import propagate_intensities, propagate_labels
from ..quality import Calibration, CandidateVotes
from ..report import Disagreement
from ..selection import min_atlases
from .jobs import Ranking, peak_mb, rank_atlases, register_selected, timed
from .outputs import evaluation_metrics, write_segmented
from .sources import FILES, Sources

log = logging.getLogger("atlasseg")


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


def propagate(
    atlas: Atlas,
    transform: sitk.Transform,
    reference: sitk.Image,
    config: Config,
    *,
    intensities: bool,
    sources: Sources = FILES,
):
    """One candidate: the atlas's labels and (when ``intensities``) its normalised image on ``reference``'s grid."""
    labels = propagate_labels(
        sources.atlas_labels(atlas), transform, reference, interpolator=config.propagation.interpolator
    )
    warped = None
    if intensities:
        normalized = sources.atlas_normalized(atlas, config.registration.normalization)
        warped = propagate_intensities(normalized, transform, reference)
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
    sources: Sources = FILES  # where the target's and the atlases' images come from

    def reference(self, config: Config) -> sitk.Image:
        """The target with its intensities normalised like the atlases' (what fusion compares them with)."""
        return normalize_intensity(self.image, method=config.registration.normalization)

    def candidates(self, config: Config, *, intensities: bool):
        """Each registered atlas's candidate, best-ranked first, propagated one at a time: (atlas id, labels,
        warped intensities or None). The time spent adds to ``seconds['propagation']``."""
        self.seconds.setdefault("propagation", 0.0)
        for aid, transform in self.transforms.items():
            with timed(self.seconds, "propagation"):
                labels, warped = propagate(
                    self.atlases[aid], transform, self.image, config, intensities=intensities, sources=self.sources
                )
            yield aid, labels, warped


def register_target(
    target: Target,
    atlases: list[Atlas],
    config: Config,
    *,
    cache: Cache | None = None,
    count: int | str = "selected",
    sources: Sources = FILES,
) -> Registered:
    """Take ``target`` (and its ground truth) from ``sources``, rank every atlas (affine stage) and register
    non-rigidly ``count`` of them: ``"selected"`` (what selection keeps; failed ones replaced by the next-ranked
    while fewer than ``selection.min_atlases`` (see :func:`~atlasseg.selection.min_atlases`) succeeded), a number
    of best-ranked, or ``"all"`` (both with every failed one replaced). Each dropped atlas is logged with its
    reason. The registrations run in worker jobs, which read the entries' files."""
    image, truth = sources.target(target)
    by_id = {a.id: a for a in atlases}
    ranking = rank_atlases(target, atlases, config, cache=cache)
    seconds = dict(ranking.seconds)
    memory = {"affine_and_scoring": peak_mb()}
    if count == "selected":
        wanted, floor = ranking.selected, min_atlases(config.selection, len(atlases))
    else:
        wanted = ranking.ranked if count == "all" else ranking.ranked[:count]
        floor = len(wanted)
    nonrigid = config.registration.nonrigid.enabled and wanted
    with timed(seconds, "nonrigid") if nonrigid else contextlib.nullcontext():
        transforms, ranking = register_selected(target, by_id, ranking, config, wanted=wanted, floor=floor, cache=cache)
    if nonrigid:
        memory["nonrigid"] = peak_mb()
    for item in ranking.dropped:
        log.warning("target %s: atlas %s dropped (%s: %s)", target.id, item["atlas"], item["stage"], item["reason"])
    return Registered(target, image, truth, by_id, ranking, transforms, floor, seconds, memory, sources)


@dataclass
class Case:
    """One target with its registered atlases' candidates held in memory (cross-validation, benchmarks)."""

    target: Target
    reference: sitk.Image  # the target image, intensities normalised like the atlases'
    truth: sitk.Image | None  # the target's labels, when it has them
    ranking: Ranking
    candidates: list[tuple[str, sitk.Image, sitk.Image | None]]  # (atlas id, labels, intensities), best-ranked first
    seconds: dict[str, float]


def prepare_case(
    target: Target,
    atlases: list[Atlas],
    config: Config,
    *,
    count: int | None,
    intensities: bool,
    cache: Cache | None = None,
    sources: Sources = FILES,
) -> Case:
    """:func:`register_target` with the best ``count`` (None: all) and every candidate propagated once (with its
    warped intensities when ``intensities``): every fusion of them can then reuse the same registrations."""
    registered = register_target(
        target, atlases, config, cache=cache, count="all" if count is None else count, sources=sources
    )
    candidates = list(registered.candidates(config, intensities=intensities))
    return Case(
        target, registered.reference(config), registered.truth, registered.ranking, candidates, registered.seconds
    )


@dataclass
class Segmented:
    """One target segmented, in memory (:func:`segment_registered`); :func:`~atlasseg.pipeline.outputs.write_segmented`
    writes it."""

    target_id: str
    segmentation: sitk.Image  # on the target's grid
    probabilities: dict[int, sitk.Image]  # label value → share of the vote, when output.probability_maps asks
    disagreement: sitk.Image | None  # the QC report's heat map, when output.report asks
    transforms: dict[str, sitk.Transform]  # the atlases used, best-ranked first
    scores: dict[int, dict[str, float]] | None  # label value → metric → value (with ground truth)
    record: dict = field(repr=False)


def segment_target(
    target: Target,
    atlases: list[Atlas],
    config: Config,
    *,
    out_dir: Path,
    label_names: dict[int, str],
    cache: Cache | None = None,
    calibration: Calibration | None = None,
) -> TargetResult:
    """Segment one target with the given atlases (:func:`register_target`, :func:`segment_registered`); write
    ``<out>/<target>/segmentation.<output.format>`` (and the probability maps, disagreement and transforms the config
    asks for: :func:`~atlasseg.pipeline.outputs.write_segmented`) and return the result, whose record the caller
    keeps as ``<out>/<target>/target.json`` (:func:`~atlasseg.pipeline.resume.write_target_record`)."""
    registered = register_target(target, atlases, config, cache=cache)
    segmented = segment_registered(registered, len(atlases), config, label_names=label_names, calibration=calibration)
    path = write_segmented(segmented, out_dir, config, label_names=label_names)
    return TargetResult(target.id, path, segmented.scores, segmented.record)


def segment_registered(
    registered: Registered,
    n_atlases: int,
    config: Config,
    *,
    label_names: dict[int, str],
    calibration: Calibration | None = None,
) -> Segmented:
    """Propagate and fuse ``registered``'s candidates (of ``n_atlases`` atlases ranked), and score the segmentation
    against the target's ground truth when it has one; nothing is written. The record says where
    :func:`~atlasseg.pipeline.outputs.write_segmented` puts the files (from the target's folder). With
    ``calibration`` (``quality.enabled``), the record holds each label's predicted Dice (:mod:`atlasseg.quality`)."""
    target = registered.target
    ranking, transforms = registered.ranking, registered.transforms
    seconds, memory = registered.seconds, registered.memory
    floor, dropped, used = registered.floor, ranking.dropped, list(transforms)
    if len(used) < floor:
        reasons = "; ".join(f"{d['atlas']}: {d['reason']}" for d in dropped) or "none failed"
        raise RegistrationError(
            f"target {target.id}: only {len(used)} atlas registration(s) succeeded, "
            f"selection.min_atlases is {floor} ({reasons})"
        )
    degraded = degraded_reason(len(dropped), n_atlases, config.selection)
    if degraded is not None:
        log.warning("target %s: degraded: %s", target.id, degraded)
    tried = set(used) | {d["atlas"] for d in dropped if d["stage"] == "nonrigid"}
    records = {aid: ranking.records[aid] for aid in ranking.ranked if aid in tried}

    # Propagate and fuse, one candidate at a time.
    reference = registered.reference(config)
    fuser = make_fuser(reference, config=config.fusion, threads=local_threads(config.parallel))
    spread = Disagreement() if config.output.report else None  # the QC report's heat map
    votes = CandidateVotes(reference) if calibration is not None else None
    seconds["propagation"] = seconds["fusion"] = 0.0
    # One step per candidate, and a last one for the fusion's own work (joint label fusion's weights, STAPLE's EM).
    with progress(total=len(used) + 1, desc=f"{target.id}: propagation and fusion", unit="step") as bar:
        # the quality features compare intensities too, whichever the fusion
        wanted = fuser.needs_intensities or votes is not None
        for _, candidate, intensities in registered.candidates(config, intensities=wanted):
            with timed(seconds, "fusion"):
                fuser.add(candidate, intensities if fuser.needs_intensities else None)
                if spread is not None:
                    spread.add(candidate)
                if votes is not None:
                    votes.add(candidate, intensities)
            bar.update()
        with timed(seconds, "fusion"):
            segmentation = fuser.result()
            # the fusion's probabilities, computed once: written, and read by the quality features
            probabilities = fuser.probabilities() if config.output.probability_maps or calibration is not None else {}
        bar.update()
    memory["propagation_and_fusion"] = peak_mb()

    scores_out = None
    if registered.truth is not None:
        with timed(seconds, "evaluation"):
            labels = sorted(label_names) or None
            scores_out = evaluate(segmentation, registered.truth, labels=labels, metrics=evaluation_metrics(config))
    quality = None
    if calibration is not None:
        with timed(seconds, "quality"):
            quality = calibration.assess(votes, segmentation, probabilities, labels=sorted(label_names))

    layout, here = LAYOUTS[config.output.layout], Path()  # where the files go, from the target's folder
    seg_path = layout.segmentation(here, target.id, config.output.format)
    record = {
        "image": str(target.image),
        "status": "ok" if degraded is None else "degraded",
        **({} if degraded is None else {"degraded": degraded}),
        "segmentation": Path(os.path.relpath(seg_path, here / target.id)).as_posix(),
        **({"disagreement": f"disagreement.{config.output.format}"} if spread is not None else {}),
        "ranking": ranking.table(config.selection.metric),
        "selected": used,
        "dropped": dropped,
        "registrations": records,
        "fusion": {**dataclasses.asdict(config.fusion), **fuser.chosen, "candidates": fuser.n_candidates},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "peak_memory_mb": memory,
    }
    if scores_out is not None:
        record["scores"] = {str(k): s for k, s in scores_out.items()}
        record["mean_dice"] = mean_score({k: s["dice"] for k, s in scores_out.items()})
    if calibration is not None:
        record["quality"] = quality
    kept = probabilities if config.output.probability_maps else {}
    return Segmented(
        target.id,
        segmentation,
        kept,
        None if spread is None else spread.result(),
        {aid: transforms[aid] for aid in used},
        scores_out,
        record,
    )


def degraded_reason(n_dropped: int, n_atlases: int, config: SelectionConfig) -> str | None:
    """Why a target that lost ``n_dropped`` of its ``n_atlases`` atlases is degraded, or None when it is not."""
    if n_dropped <= config.max_dropped_share * n_atlases:
        return None
    return (
        f"{n_dropped} of its {n_atlases} atlases were dropped, more than selection.max_dropped_share "
        f"({config.max_dropped_share:g}); see their reasons under 'dropped'"
    )
