"""The Python API: segment, register and evaluate images held in memory or in files.

Every function takes each image as a file path, a ``SimpleITK.Image`` or a nibabel image
(``Nifti1Image``, ``MGHImage``, ...), and a config as a :class:`~atlasseg.config.Config`,
a preset name (``"default"``, ``"fast"``, ...), a YAML file path or a nested dict, with
optional ``overrides`` in the command line's ``section.key=value`` form.

These are thin layers over the command line's own machinery (:mod:`atlasseg.pipeline`), working on
the images in memory and returning their results; nothing is written unless ``out_dir`` asks. Only
:func:`segment`'s registrations read files, in worker processes: each image held in memory is written once
for them (losslessly, as MetaImage) into a temporary folder, removed once they are done. A nibabel image is
converted in memory (voxels as stored, geometry in LPS). Error messages name in-memory inputs by their role
(``atlas_0.labels``, ``target.image``).

Example::

    import atlasseg
    seg, record = atlasseg.segment("new.nii.gz", [("a1.nii.gz", "a1_seg.nii.gz"), ("a2.nii.gz", "a2_seg.nii.gz")],
                                   config="fast", overrides=["selection.k=1"])
    transform, warped, _, _ = atlasseg.register(fixed_image, moving_image)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Union

import SimpleITK as sitk

from .config import Config, config_from_dict, load_config
from .errors import ConfigError, ImageError

if TYPE_CHECKING:
    import nibabel

    ImageLike = Union[str, os.PathLike, sitk.Image, nibabel.spatialimages.SpatialImage]
else:
    ImageLike = Union[str, os.PathLike, sitk.Image, object]
ConfigLike = Union[Config, str, os.PathLike, Mapping, None]
AtlasesLike = Union[Sequence[tuple[ImageLike, ImageLike]], Mapping[str, tuple[ImageLike, ImageLike]]]

__all__ = ["Registration", "Segmentation", "evaluate", "register", "resolve_config", "segment"]


class Segmentation(NamedTuple):
    """What :func:`segment` returns."""

    labels: sitk.Image
    """The fused label map, on the target's grid (origin, spacing, direction of the target)."""
    record: dict
    """What ``run.json`` keeps for a target: the atlas ranking with scores, the atlases used and dropped
    (with reasons), every registration's record, fusion settings, seconds per stage, scores against
    ``truth``; plus ``config`` and ``versions``."""


class Registration(NamedTuple):
    """What :func:`register` returns."""

    transform: sitk.Transform
    """Maps fixed-space points to moving-space points (mm, LPS): ``sitk.Resample(moving, fixed, transform)``."""
    warped: sitk.Image
    """The moving image resampled onto the fixed grid (linear)."""
    warped_labels: sitk.Image | None
    """``labels`` resampled onto the fixed grid (nearest neighbour), when given."""
    record: dict
    """Metric before/after, iterations and stop condition per level, Jacobian range, seconds."""


def resolve_config(config: ConfigLike = None, overrides: Sequence[str] = ()) -> Config:
    """A validated :class:`Config` from a Config, a preset name, a YAML path or a nested dict (``None``: the
    defaults), with ``overrides`` such as ``"selection.k=5"`` applied."""
    if isinstance(config, Config):
        return config_from_dict(config.to_dict(), source="config", overrides=overrides) if overrides else config
    if isinstance(config, Mapping):
        return config_from_dict(dict(config), source="config", overrides=overrides)
    if config is None or isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides=overrides)
    raise ConfigError(
        f"config: expected a Config, a preset name, a YAML file path or a dict, got {type(config).__name__}"
    )


# --------------------------------------------------------------------------- inputs as files


def _is_nibabel(value) -> bool:
    import nibabel

    return isinstance(value, nibabel.spatialimages.SpatialImage)


def _image(value, name: str) -> sitk.Image:
    """An in-memory input as a SimpleITK image: as given, or a nibabel image's voxels and geometry."""
    if isinstance(value, sitk.Image):
        return value
    if _is_nibabel(value):
        from .nibabel_io import from_nibabel

        try:
            return from_nibabel(value)
        except ValueError as err:
            raise ImageError(f"{name}: {err}") from None
    raise ImageError(f"{name}: expected a file path, a SimpleITK.Image or a nibabel image, got {type(value).__name__}")


def _describe(value) -> str:
    """How a record names an input: its path, or its type."""
    return str(value) if isinstance(value, (str, os.PathLike)) else f"<{type(value).__module__}.{type(value).__name__}>"


def _input(value: ImageLike | None, name: str, held: dict, folder: Path | None = None) -> Path | None:
    """An input as the pipeline names it: a file path as given (absolute); an in-memory image goes into ``held``
    (:class:`~atlasseg.pipeline.sources.Sources`), under its name, or with ``folder`` (for worker processes, which
    read files) under the path of the file it is written to there."""
    from .pipeline.sources import Held

    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return Path(value).expanduser().absolute()
    image = _image(value, name)
    path = Path(name)
    if folder is not None:
        plain = sitk.Image(image)  # a copy: a NIfTI header's fields would only make MetaImage warn
        for key in plain.GetMetaDataKeys():
            plain.EraseMetaData(key)
        path = (folder / f"{name}.mha").resolve()
        sitk.WriteImage(plain, str(path))  # MetaImage: any pixel type, geometry in full precision
    held[path] = Held(name, image)
    return path


def _pair(item, where: str) -> tuple:
    if isinstance(item, (str, bytes, os.PathLike)) or not isinstance(item, Sequence) or len(item) != 2:
        raise ImageError(f"{where}: expected a pair (image, labels), got {type(item).__name__}")
    return tuple(item)


# --------------------------------------------------------------------------- segment, register, evaluate


def segment(
    target: ImageLike,
    atlases: AtlasesLike,
    config: ConfigLike = None,
    *,
    overrides: Sequence[str] = (),
    truth: ImageLike | None = None,
    label_names: Mapping[int, str] | None = None,
    target_id: str = "target",
    out_dir: str | os.PathLike | None = None,
) -> Segmentation:
    """Segment ``target`` with ``atlases``, as ``atlasseg run`` segments one target of a manifest.

    Parameters
    ----------
    target
        The image to segment.
    atlases
        ``(image, labels)`` pairs, named ``atlas_0``, ``atlas_1``, ... in the record; or a mapping
        id → ``(image, labels)``. Label maps lie on their images' grids.
    config
        A :class:`Config`, a preset name, a YAML file or a nested dict; ``None``: the defaults.
    overrides
        ``section.key=value`` strings applied to ``config``, e.g. ``["selection.k=5"]``.
    truth
        Ground truth of ``target``: the record then holds ``scores`` (label value, an int as in :func:`evaluate`
        → metric → value) and ``mean_dice``.
        With or without it, ``quality.enabled`` adds each label's predicted Dice (``record["quality"]``).
    label_names
        Label value → name (labels scored; warnings name them).
    target_id
        The target's name in the record and in ``out_dir``.
    out_dir
        When given, the pipeline's files are kept in ``out_dir/<target_id>/`` (``segmentation.nii.gz``,
        ``probability_<label>.nii.gz`` and ``transforms/`` as the config's ``output`` section asks); by
        default they are written to a temporary folder and removed.

    Returns
    -------
    Segmentation
        ``(labels, record)``: the label map as a ``SimpleITK.Image`` on the target's grid, and the record.

    Raises
    ------
    AtlassegError
        Bad input (unreadable, 4D, NaN, constant, labels off their image's grid, ...), a bad config, or too few
        atlas registrations succeeding (``selection.min_atlases``).
    """
    from .cache import open_cache
    from .manifest import manifest_from_dict
    from .pipeline.checks import check_inputs
    from .pipeline.outputs import versions, write_segmented
    from .pipeline.resume import input_record, write_target_record
    from .pipeline.sources import Sources
    from .pipeline.target import TargetResult, register_target, segment_registered
    from .quality import calibrate

    config = resolve_config(config, overrides)
    items = (
        list(atlases.items()) if isinstance(atlases, Mapping) else [(f"atlas_{i}", a) for i, a in enumerate(atlases)]
    )
    if not items:
        raise ImageError("atlases: none given")
    held: dict = {}
    # The registrations run in worker processes, which read files: the in-memory inputs are written there for them.
    with tempfile.TemporaryDirectory(prefix="atlasseg-") as tmp:
        folder = Path(tmp)
        entries = []
        for aid, item in items:
            image, labels = _pair(item, f"atlas {aid!r}")
            entries.append(
                {
                    "id": str(aid),
                    "image": str(_input(image, f"{aid}.image", held, folder)),
                    "labels": str(_input(labels, f"{aid}.labels", held, folder)),
                }
            )
        target_entry = {"id": target_id, "image": str(_input(target, "target.image", held, folder))}
        if truth is not None:
            target_entry["labels"] = str(_input(truth, "target.truth", held, folder))
        doc = {"labels": dict(label_names or {}), "atlases": entries, "targets": [target_entry]}
        manifest = manifest_from_dict(doc, name="segment()")
        sources = Sources(held)
        check_inputs(manifest, config, sources=sources)
        (target_,), atlases_ = manifest.targets, list(manifest.atlases)
        calibration = None
        if config.quality.enabled:
            calibration = calibrate(manifest, config, cache=open_cache(config), sources=sources)
        registered = register_target(target_, atlases_, config, sources=sources)
        inputs = input_record(target_, atlases_, config) if out_dir is not None else None  # the files' digests
    result = segment_registered(
        registered, len(atlases_), config, label_names=manifest.label_names, calibration=calibration
    )
    if out_dir is not None:
        path = write_segmented(result, Path(out_dir), config, label_names=manifest.label_names)
        write_target_record(Path(out_dir), TargetResult(target_id, path, result.scores, result.record), inputs)
    record = {
        **result.record,
        "image": _describe(target),
        **({"scores": result.scores} if result.scores is not None else {}),  # int label keys, as evaluate's
        "atlases": {aid: [_describe(part) for part in _pair(item, aid)] for aid, item in items},
        "config": config.to_dict(),
        "versions": versions(),
    }
    return Segmentation(result.segmentation, record)


def register(
    fixed: ImageLike,
    moving: ImageLike,
    config: ConfigLike = None,
    *,
    overrides: Sequence[str] = (),
    labels: ImageLike | None = None,
    fixed_mask: ImageLike | None = None,
    moving_mask: ImageLike | None = None,
    fixed_landmarks: str | os.PathLike | None = None,
    moving_landmarks: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
) -> Registration:
    """Register ``moving`` onto ``fixed`` with the config's ``registration`` section, as ``atlasseg register`` does.

    Parameters
    ----------
    fixed, moving
        The images; the transform maps points of ``fixed`` to points of ``moving``.
    config, overrides
        As for :func:`segment`.
    labels
        Label map of ``moving``, also returned warped onto the fixed grid (nearest neighbour).
    fixed_mask, moving_mask
        Binary masks on their image's grid restricting the metric.
    fixed_landmarks, moving_landmarks
        Corresponding point files (CSV of LPS points, 3D Slicer ``.fcsv``, ITK/elastix points); the
        registration starts from the rigid fit of one to the other.
    out_dir
        When given, ``warped.nii.gz``, ``transform.h5``, ``displacement.nii.gz``, ``jacobian.nii.gz``,
        ``record.json`` (and ``warped_labels.nii.gz``) are written there; by default nothing is written (the
        results are computed and returned in memory).

    Returns
    -------
    Registration
        ``(transform, warped, warped_labels, record)``.

    Raises
    ------
    RegistrationError
        A stage's result fails its checks (metric worse than its start, too little overlap, folding); a
        :class:`~atlasseg.registration.RegistrationDiverged` carries the ``record``.
    AtlassegError
        Bad input or config.
    """
    from .pipeline.pair import read_pair, register_and_write, register_pair
    from .pipeline.sources import Sources

    config = resolve_config(config, overrides)
    held: dict = {}
    paths = {
        name: _input(value, name, held)
        for name, value in (
            ("fixed", fixed),
            ("moving", moving),
            ("moving_labels", labels),
            ("fixed_mask", fixed_mask),
            ("moving_mask", moving_mask),
        )
    }
    landmarks = {
        name: None if value is None else Path(value).expanduser().absolute()
        for name, value in (("fixed_landmarks", fixed_landmarks), ("moving_landmarks", moving_landmarks))
    }
    pair = read_pair(
        paths.pop("fixed"),
        paths.pop("moving"),
        config.registration,
        labels_path=paths.pop("moving_labels"),
        **paths,
        **landmarks,
        sources=Sources(held),
    )
    if out_dir is None:
        transform, warped, warped_labels, record = register_pair(pair)
    else:
        transform, warped, warped_labels, record = register_and_write(pair, Path(out_dir))
    record.update(fixed=_describe(fixed), moving=_describe(moving))
    return Registration(transform, warped, warped_labels, record)


def evaluate(
    prediction: ImageLike,
    truth: ImageLike,
    *,
    labels: Sequence[int] | None = None,
    metrics: Sequence[str] | None = None,
) -> dict[int, dict[str, float]]:
    """Score a segmentation against ground truth on the same grid: label value → metric → value.

    ``labels``: the label values scored (default: every non-zero value in either); ``metrics``: from
    ``dice``, ``jaccard``, ``hd95`` (mm), ``assd`` (mm), ``volume_difference`` (ml) (default: all).
    A label absent from both maps scores NaN.
    """
    from .config import EvaluationConfig
    from .evaluation import evaluate as score
    from .imageio import check_label_values
    from .pipeline.sources import Sources

    metrics = tuple(metrics) if metrics is not None else EvaluationConfig().metrics
    held: dict = {}
    paths = _input(prediction, "prediction", held), _input(truth, "truth", held)
    sources = Sources(held)
    for path in paths:  # complete files (NIfTI), whole non-negative values
        check_label_values(sources.name(path), sources.voxels(path))
    predicted = sources.labels(paths[0])
    expected = sources.labels(paths[1], like=predicted, like_path=paths[0])
    return score(predicted, expected, labels=list(labels) if labels else None, metrics=metrics)
