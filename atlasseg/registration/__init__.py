"""Registration engine: affine stage, then non-rigid stage, each on a multi-resolution pyramid."""

from __future__ import annotations

import SimpleITK as sitk

from ..config import RegistrationConfig
from .affine import register_affine
from .nonrigid import jacobian_determinant, register_bspline

__all__ = ["register", "register_affine", "register_bspline", "jacobian_determinant"]


def register(fixed: sitk.Image, moving: sitk.Image, *, config: RegistrationConfig) -> tuple[sitk.Transform, dict]:
    """Affine then (if enabled) non-rigid registration of ``moving`` onto ``fixed``.

    Images should already share an intensity scale (see ``imageio.normalize_intensity``).
    Returns the transform mapping fixed-space points to moving-space points and the record.
    """
    transform, affine_record = register_affine(fixed, moving, config=config.affine, seed=config.seed)
    record = {"affine": affine_record}
    if config.nonrigid.enabled:
        transform, record["nonrigid"] = register_bspline(
            fixed, moving, initial=transform, config=config.nonrigid, seed=config.seed
        )
    return transform, record
