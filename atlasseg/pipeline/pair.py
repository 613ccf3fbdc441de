"""One image pair from files (``atlasseg register``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import RegistrationConfig
from ..errors import ImageError
from ..imageio import normalize_intensity, read_checked_image, read_labels, write_image
from ..propagation import propagate_intensities, propagate_labels
from ..registration import (
    RegistrationDiverged,
    jacobian_determinant,
    read_landmarks,
    register,
    save_displacement_field,
    save_transform,
)
from .jobs import read_masks, timed
from .outputs import write_json

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
    masks = read_masks((fixed_mask, fixed_path, fixed), (moving_mask, moving_path, moving))
    landmarks = None
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise ImageError("landmarks are needed for both images (--fixed-landmarks and --moving-landmarks)")
    if fixed_landmarks is not None:
        landmarks = (read_landmarks(fixed_landmarks, image=fixed), read_landmarks(moving_landmarks, image=moving))
        if config.affine.initialization != "landmarks":
            config = dataclasses.replace(config, affine=dataclasses.replace(config.affine, initialization="landmarks"))
    record = {"fixed": str(fixed_path), "moving": str(moving_path), "config": dataclasses.asdict(config)}
    try:
        with timed(record, "seconds"):
            transform, record["registration"] = register(
                normalize_intensity(fixed, method=config.normalization),
                normalize_intensity(moving, method=config.normalization),
                config=config, masks=masks, landmarks=landmarks,
            )
    except RegistrationDiverged as err:
        record.update(status=err.record.get("status", "diverged"), reason=str(err), registration=err.record)
        write_json(out_dir / "record.json", record)
        raise
    record["seconds"] = round(record["seconds"], 3)
    record["status"] = "ok"
    write_image(propagate_intensities(moving, transform, fixed), out_dir / "warped.nii.gz")
    save_transform(transform, out_dir / "transform.h5")
    save_displacement_field(transform, fixed, out_dir / "displacement.nii.gz")
    write_image(jacobian_determinant(transform, fixed), out_dir / "jacobian.nii.gz")
    if labels is not None:
        write_image(propagate_labels(labels, transform, fixed), out_dir / "warped_labels.nii.gz")
    write_json(out_dir / "record.json", record)
    return record
