"""The fusers by ``fusion.method``, and what runs one."""

from __future__ import annotations

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


def make_fuser(reference: sitk.Image, *, config: FusionConfig) -> Fuser:
    """A fresh accumulator for ``config.method`` on ``reference``'s grid (normalised target intensities)."""
    try:
        return FUSERS[config.method](reference, config=config)
    except KeyError:
        raise AtlassegError(f"unknown fusion method {config.method!r} (known: {', '.join(FUSERS)})") from None
