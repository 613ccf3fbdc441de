"""The fusers by ``fusion.method``, and what runs one."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from ..config import FusionConfig
from ..errors import AtlassegError
from .base import Fuser
from .jlf import JointLabelFusion
from .staple import Staple
from .votes import WeightedVote

FUSERS = {
    "majority": WeightedVote,
    "global_weighted": WeightedVote,
    "local_weighted": WeightedVote,
    "jlf": JointLabelFusion,
    "staple": Staple,
}
METHODS = tuple(FUSERS)


def needs_intensities(method: str) -> bool:
    """Whether fusion ``method`` weighs candidates by their warped intensities (all but majority and STAPLE)."""
    return FUSERS[method].uses_intensities(method)


def fuse(reference: sitk.Image, candidates, *, config: FusionConfig) -> sitk.Image:
    """The fused label map of ``candidates``, (labels, intensities or None) pairs, with a fresh fuser."""
    fuser = make_fuser(reference, config=config)
    for labels, intensities in candidates:
        fuser.add(labels, intensities if fuser.needs_intensities else None)
    return fuser.result()


def make_fuser(
    reference: sitk.Image, *, config: FusionConfig, threads: int | None = None, spill_folder: Path | None = None
) -> Fuser:
    """A fresh accumulator for ``config.method`` on ``reference``'s grid (normalised target intensities), lent
    ``threads`` and ``spill_folder`` (see :class:`~atlasseg.fusion.base.Fuser`)."""
    try:
        return FUSERS[config.method](reference, config=config, threads=threads, spill_folder=spill_folder)
    except KeyError:
        raise AtlassegError(f"unknown fusion method {config.method!r} (known: {', '.join(FUSERS)})") from None
