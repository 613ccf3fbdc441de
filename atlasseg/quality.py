"""Segmentation quality without ground truth: a predicted Dice per target and label.

What a run knows about a segmentation it cannot score: how well the candidates (the
registered atlases' labels) agree with the fused result and with each other, how sure the
fusion is at the result's boundary, how well the registered atlases' intensities match the
target's near the label. Per label these give :data:`FEATURES`. Their link to the true Dice is
learned per atlas set and config: a few atlases (``quality.calibration_atlases``, evenly over the atlases sorted by
id) are each segmented by the other atlases exactly as a target is (affine stage and
selection, the best ``selection.k`` registered non-rigidly, fused), which gives each of their
labels the same features and a true Dice; a ridge regression fitted on these samples
(its penalty chosen by leave-one-out) predicts the Dice of every target's labels, with the
leave-one-out root-mean-square error of the fit as the error bar. A label is flagged for
review when its prediction is below the ``quality.review_quantile`` quantile of the calibration
samples' held-out predictions (a threshold relative to what these atlases and this config
achieve), or below ``quality.review_below`` where the config sets one. The samples are cached
(:mod:`atlasseg.cache`, stage ``quality``), keyed by the atlases' files and the config of
the stages that make a segmentation, so a later run on the same atlases and config
calibrates for free; their registrations go through the registration cache.

Memory: besides the fusion's, each candidate's labelled voxels as flat indices (4 or 8 bytes
per labelled voxel and candidate), and one running sum of squared intensity differences (4 bytes
per voxel).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .cache import Cache, entry_key, settings
from .config import Config, QualityConfig
from .errors import ConfigError, RegistrationError
from .evaluation import evaluate
from .manifest import Manifest, as_target

if TYPE_CHECKING:
    from .pipeline.sources import Sources

log = logging.getLogger("atlasseg")

FEATURES = ("agreement", "consistency", "boundary_probability", "local_mse")
"""Per label: the candidates' mean Dice with the fused label; their mean Dice with each other (pooled over
pairs); the label's mean fusion probability on the fused label's boundary voxels; the mean squared difference
between the target's and the registered atlases' intensities (both normalised, as fusion compares them) over
the fused label and the voxels within ``NEAR_MM`` of it, averaged over the candidates: what misregistration
leaves near this label, where the other three see only how the candidates vote. (The spread, minimum and
maximum of the candidates' Dice, the share of voxels not every candidate gives the label per label voxel or per
boundary voxel, the fusion's entropy there, the volume, the fused label's size against the candidates', the
registrations' mean final metric over the whole image, the selection scores, the label's contrast, the target's
gradient on its boundary and the local correlation were tried as well: none improved the predictions on all
three datasets of benchmarks/quality.py; the size ratio and the final metric, in the model until 2026-12-06,
made the abdomen's worse.)"""
NEAR_MM = 3.0  # local_mse: the ring around the label (mm) where boundary misregistration shows

_PENALTIES = (1.0, 10.0, 100.0, 1000.0)  # ridge penalties tried (standardised features); leave-one-out picks one
BASELINE = "agreement"  # the regression predicts Dice minus this: with little to learn from, Dice ≈ the agreement


class CandidateVotes:
    """Each candidate's voxels per label value (flat indices), to compare with the fused result; with the target
    image (``reference``, normalised as the atlases' intensities are) and each candidate's intensities, the running
    sum of their squared differences."""

    def __init__(self, reference: sitk.Image | None = None):
        self._voxels: list[dict[int, np.ndarray]] = []
        self._reference = None if reference is None else sitk.GetArrayViewFromImage(reference).astype(np.float32)
        self._spacing = None if reference is None else np.asarray(reference.GetSpacing())[::-1]  # array order
        self._squares: np.ndarray | None = None
        self._compared = 0

    def add(self, candidate: sitk.Image, intensities: sitk.Image | None = None) -> None:
        array = sitk.GetArrayViewFromImage(candidate).ravel()
        index = np.flatnonzero(array)
        index = index.astype(np.min_scalar_type(max(array.size - 1, 0)))
        values = array[index]
        order = np.argsort(values, kind="stable")
        found, starts = np.unique(values[order], return_index=True)
        ends = [*starts[1:], order.size]
        self._voxels.append({int(v): index[order[s:e]] for v, s, e in zip(found, starts, ends)})
        if intensities is not None and self._reference is not None:
            squares = np.square(sitk.GetArrayViewFromImage(intensities) - self._reference, dtype=np.float32)
            self._squares = squares if self._squares is None else np.add(self._squares, squares, out=self._squares)
            self._compared += 1

    def values(self) -> set[int]:
        return {v for voxels in self._voxels for v in voxels}

    def features(
        self, segmentation: sitk.Image, probabilities: dict[int, sitk.Image], *, labels
    ) -> dict[int, dict[str, float]]:
        """:data:`FEATURES` of each of ``labels`` in ``segmentation`` (the fused result; ``probabilities``: the
        fusion's, per label value). A label neither the result nor any candidate has is left out; ``local_mse``
        is NaN without intensities."""
        n = len(self._voxels)
        fused = sitk.GetArrayViewFromImage(segmentation)
        out = {}
        for value in labels:
            mask = fused == value
            inside = int(mask.sum())
            voxels = [v.get(value, np.empty(0, np.int64)) for v in self._voxels]
            if not inside and not any(v.size for v in voxels):
                continue
            flat = mask.ravel()
            dice = [2.0 * np.count_nonzero(flat[v]) / (v.size + inside) for v in voxels]
            counts = np.unique(np.concatenate(voxels), return_counts=True)[1]
            pairs = (n - 1) * counts.sum()  # Σ_i |C_i| (n − 1): what Σ_{i≠j} |C_i ∩ C_j| is at full agreement
            boundary = mask & ~ndimage.binary_erosion(mask)
            probability = probabilities.get(value)
            out[value] = {
                "agreement": float(np.mean(dice)),
                "consistency": float((counts * (counts - 1)).sum() / pairs) if pairs else math.nan,
                "boundary_probability": (
                    float(sitk.GetArrayViewFromImage(probability)[boundary].mean())
                    if probability is not None and boundary.any()
                    else 0.0
                ),
                "local_mse": self._local_mse(mask if inside else _union(voxels, mask.shape)),
            }
        return out

    def _local_mse(self, mask: np.ndarray) -> float:
        """The candidates' mean squared intensity difference over ``mask`` (the fused label, or where the fusion
        dropped it the candidates' voxels of it) and the voxels within ``NEAR_MM`` of it (computed in the mask's
        bounding box grown by that much); NaN without intensities."""
        if self._squares is None:
            return math.nan
        reach = np.ceil(NEAR_MM / self._spacing).astype(int)
        found = np.argwhere(mask)
        box = tuple(slice(max(lo - r, 0), hi + r + 1) for lo, hi, r in zip(found.min(axis=0), found.max(axis=0), reach))
        near = ndimage.distance_transform_edt(~mask[box], sampling=self._spacing) <= NEAR_MM
        return float(self._squares[box][near].mean(dtype=np.float64) / self._compared)


def _union(voxels: list[np.ndarray], shape) -> np.ndarray:
    """The voxels (flat indices) of any candidate as a mask of ``shape``."""
    mask = np.zeros(shape, bool)
    for v in voxels:
        mask.reshape(-1)[v] = True
    return mask


@dataclass(frozen=True)
class Model:
    """A ridge regression of Dice minus the :data:`BASELINE` feature on standardised :data:`FEATURES`."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]  # the intercept first
    penalty: float
    error: float  # leave-one-out root-mean-square error over the calibration samples, Dice
    held_out: tuple[float, ...]  # each calibration sample's Dice as predicted by the fit without it

    def predict(self, features: dict[str, float]) -> float:
        x = _standardise(np.asarray([[features[f] for f in FEATURES]], float), self.mean, self.scale)
        base = features[BASELINE] if math.isfinite(features[BASELINE]) else self.mean[FEATURES.index(BASELINE)]
        return float(np.clip(base + self.weights[0] + x[0] @ np.asarray(self.weights[1:]), 0.0, 1.0))


def _standardise(x: np.ndarray, mean, scale) -> np.ndarray:
    x = np.where(np.isfinite(x), x, np.asarray(mean)[None, :])  # a missing feature counts as average
    return (x - np.asarray(mean)) / np.asarray(scale)


def fit(samples: list[dict]) -> Model:
    """The ridge regression of ``samples``' Dice (less their :data:`BASELINE` feature) on their features whose
    penalty (of :data:`_PENALTIES`) has the least leave-one-out error (computed exactly from the hat matrix)."""
    x = np.asarray([[s["features"][f] for f in FEATURES] for s in samples], float)
    base = np.asarray([s["features"][BASELINE] for s in samples], float)
    y = np.asarray([s["dice"] for s in samples], float) - base
    finite = np.isfinite(x)
    count = np.maximum(finite.sum(axis=0), 1)
    mean = np.where(finite, x, 0.0).sum(axis=0) / count  # over the finite values (0 where none is)
    scale = np.sqrt(np.where(finite, (x - mean) ** 2, 0.0).sum(axis=0) / count)
    scale[scale == 0] = 1.0
    design = np.hstack([np.ones((len(y), 1)), _standardise(x, mean, scale)])
    best = None
    for penalty in _PENALTIES:
        ridge = penalty * np.diag([0.0] + [1.0] * x.shape[1])  # the intercept is not penalised
        inverse = np.linalg.pinv(design.T @ design + ridge)
        weights = inverse @ design.T @ y
        hat = np.einsum("ij,jk,ik->i", design, inverse, design)
        residual = (y - design @ weights) / np.maximum(1.0 - hat, 1e-6)
        error = float(np.sqrt(np.mean(residual**2)))
        if best is None or error < best.error:
            held_out = np.clip(y - residual + base, 0.0, 1.0)
            best = Model(tuple(mean), tuple(scale), tuple(weights), penalty, error, tuple(held_out.tolist()))
    return best


@dataclass(frozen=True)
class Calibration:
    """The calibration samples of an atlas set and config, the model fitted on them, the review rule."""

    samples: list[dict]  # {"atlas", "label", "features", "dice"}
    model: Model
    review: dict  # {"rule", "below", ...}: see review_rule
    cached: bool = False

    def assess(
        self,
        votes: CandidateVotes,
        segmentation: sitk.Image,
        probabilities: dict[int, sitk.Image],
        *,
        labels,
    ) -> dict[str, dict]:
        """Per label (its value as a string, as in run.json): predicted Dice, its error, review, features
        (``probabilities``: the fusion's, per label value)."""
        found = votes.features(segmentation, probabilities, labels=labels or sorted(votes.values()))
        out = {}
        for value, features in found.items():
            predicted = self.model.predict(features)
            out[str(value)] = {
                "predicted_dice": round(predicted, 4),
                "error": round(self.model.error, 4),
                "review": predicted < self.review["below"],
                "features": {k: round(v, 6) for k, v in features.items()},
            }
        return out

    def summary(self) -> dict:
        """What run.json keeps of the calibration."""
        atlases = list(dict.fromkeys(s["atlas"] for s in self.samples))
        return {
            "atlases": atlases,
            "samples": self.samples,
            "error": round(self.model.error, 4),
            "penalty": self.model.penalty,
            "cached": self.cached,
            "review": self.review,
            "weights": dict(zip(("intercept", *FEATURES), (round(w, 6) for w in self.model.weights))),
        }


def review_rule(model: Model, config: QualityConfig) -> dict:
    """The threshold below which a predicted Dice gets ``review: true``, and how it was set: ``review_below``
    where the config sets one (``rule: absolute``), else the ``review_quantile`` quantile of the calibration
    samples' held-out predictions (``rule: quantile``): relative to what the atlas set and config achieve."""
    if config.review_below is not None:
        return {"rule": "absolute", "below": config.review_below}
    below = float(np.quantile(model.held_out, config.review_quantile))
    return {"rule": "quantile", "quantile": config.review_quantile, "below": round(below, 4)}


def calibration_atlases(manifest: Manifest, count: int) -> list:
    """At most ``count`` atlases, evenly over the manifest's atlases sorted by id."""
    atlases = sorted(manifest.atlases, key=lambda a: a.id)
    if len(atlases) <= count:
        return atlases
    return [atlases[i] for i in np.unique(np.round(np.linspace(0, len(atlases) - 1, count)).astype(int))]


def _key(manifest: Manifest, chosen: list, config: Config, labels) -> str:
    files = {
        f"{a.id}:{name}": getattr(a, name)
        for a in manifest.atlases
        for name in ("image", "labels", "mask", "landmarks")
    }
    files.update({f"{a.id}:transform:{c.id}": a.transform_for(c.id) for a in manifest.atlases for c in chosen})
    segmenting = {
        name: settings(getattr(config, name)) for name in ("selection", "registration", "propagation", "fusion")
    }
    return entry_key(
        "quality",
        files=files,
        settings={**segmenting, "calibration": [a.id for a in chosen], "labels": list(labels), "features": FEATURES},
    )


def calibrate(manifest: Manifest, config: Config, *, cache: Cache, sources: Sources | None = None) -> Calibration:
    """The calibration of ``manifest``'s atlases under ``config``: from the cache, else computed and cached.

    Each chosen atlas is segmented by the others (:func:`atlasseg.pipeline.register_target`, the best
    ``selection.k`` of them registered non-rigidly, then propagated and fused one at a time) and scored against its labels. ``sources``: where
    the atlases' images come from (default: their files; see :mod:`atlasseg.pipeline.sources`).
    """
    from .fusion.registry import make_fuser
    from .pipeline.sources import FILES
    from .pipeline.target import register_target

    if len(manifest.atlases) < 3:
        raise ConfigError(
            f"quality.enabled: the prediction is calibrated on atlases segmented by the others, "
            f"which needs at least 3 atlases; {manifest.path} lists {len(manifest.atlases)}"
        )
    labels = sorted(manifest.label_names)
    chosen = calibration_atlases(manifest, config.quality.calibration_atlases)
    key = _key(manifest, chosen, config, labels)
    hit = cache.load("quality", key)
    if hit is not None:
        samples = hit[1]["samples"]
        log.info("quality: calibration of %d samples from the cache", len(samples))
        model = fit(samples)
        return Calibration(samples, model, review_rule(model, config.quality), cached=True)
    k = config.selection.k
    samples = []
    for number, atlas in enumerate(chosen, 1):
        target = as_target(atlas)
        others = manifest.atlases_for(target)
        registered = register_target(
            target,
            others,
            config,
            count="all" if k == "all" else k,
            cache=cache,
            sources=sources or FILES,
        )
        if not registered.transforms:
            log.warning("quality: calibration atlas %s: no atlas registered; left out", atlas.id)
            continue
        reference = registered.reference(config)
        fuser = make_fuser(reference, config=config.fusion)
        votes = CandidateVotes(reference)
        # one candidate at a time, with its intensities (for the fusion where it needs them, and for local_mse)
        for _, candidate, intensities in registered.candidates(config, intensities=True):
            fuser.add(candidate, intensities if fuser.needs_intensities else None)
            votes.add(candidate, intensities)
        segmentation = fuser.result()
        found = votes.features(segmentation, fuser.probabilities(), labels=labels or sorted(votes.values()))
        dice = evaluate(segmentation, registered.truth, labels=sorted(found), metrics=("dice",))
        samples += [
            {"atlas": atlas.id, "label": value, "features": features, "dice": dice[value]["dice"]}
            for value, features in found.items()
            if math.isfinite(dice[value]["dice"])
        ]
        log.info("quality: calibration %d/%d (%s) done", number, len(chosen), atlas.id)
    if len(samples) < 3:
        raise RegistrationError(
            f"quality: only {len(samples)} calibration sample(s) from {manifest.path}'s atlases; "
            "the prediction needs at least 3"
        )
    cache.store("quality", key, None, {"samples": samples})
    model = fit(samples)
    return Calibration(samples, model, review_rule(model, config.quality))
