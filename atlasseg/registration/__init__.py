"""Registration engine: affine stage, then non-rigid stage, each on a multi-resolution pyramid.

Every stage returns the transform mapping fixed-space points to moving-space points
and a record; :func:`affine_stage` and :func:`nonrigid_stage` also check the result
(metric, overlap, folding) and raise :class:`RegistrationDiverged` with the reason
when it cannot be trusted.
"""

from __future__ import annotations

from .affine import register_affine
from .bspline import register_bspline
from .checks import RegistrationDiverged
from .demons import register_demons
from .itk import Masks
from .landmarks import read_landmarks
from .stages import affine_stage, nonrigid_stage, register, register_nonrigid
from .transforms import compose, jacobian_determinant, load_transform, save_displacement_field, save_transform

__all__ = [
    "Masks",
    "RegistrationDiverged",
    "affine_stage",
    "compose",
    "jacobian_determinant",
    "load_transform",
    "nonrigid_stage",
    "read_landmarks",
    "register",
    "register_affine",
    "register_bspline",
    "register_demons",
    "register_nonrigid",
    "save_displacement_field",
    "save_transform",
]
