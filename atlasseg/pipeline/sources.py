"""Where the input checks and the per-target flow take an entry's images: its files, or images held in memory.

:func:`atlasseg.segment` is given images in memory. The worker processes need files (work units carry paths, and
workers read their own images: see :mod:`atlasseg.parallel`; the registration cache is keyed by the files'
contents), so each such image is written once for them; everything else takes the image the caller holds, and
names it by the argument that held it (``atlas_0.labels``), not by that file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..imageio import (
    Geometry,
    as_intensities,
    as_labels,
    check_geometry,
    normalize_intensity,
    read_geometry,
    read_image,
    read_labels,
    read_voxels,
)
from ..manifest import Atlas, Target
from .jobs import atlas_labels, load_normalized


@dataclass(frozen=True)
class Held:
    """An input held in memory: the image, and how messages name it (the argument that held it)."""

    name: str
    image: sitk.Image


@dataclass(frozen=True)
class Sources:
    """The entries' images: those in ``held`` as held in memory (by the path the entry names them with: the file
    written for the worker processes, or, where no worker reads it, the argument's name), the others read from
    their files (the atlases' kept per process, see :func:`~atlasseg.pipeline.jobs.remembered`)."""

    held: Mapping[Path, Held] = field(default_factory=dict)

    def is_held(self, path: Path | None) -> bool:
        return path in self.held

    def name(self, path: Path):
        """How messages name the input at ``path``: its argument's name when held in memory, else the path."""
        return self.held[path].name if path in self.held else path

    def geometry(self, path: Path) -> Geometry:
        """The grid (checked: :func:`~atlasseg.imageio.check_geometry`), from the file's header alone."""
        if path not in self.held:
            return read_geometry(path)
        geometry = Geometry.of(self.held[path].image)
        check_geometry(geometry, self.name(path))
        return geometry

    def voxels(self, path: Path) -> np.ndarray:
        """The voxels as stored (see :func:`~atlasseg.imageio.read_voxels`)."""
        return sitk.GetArrayFromImage(self.held[path].image) if path in self.held else read_voxels(path)

    def intensities(self, path: Path) -> sitk.Image:
        """The image as float32 (:func:`~atlasseg.imageio.read_image`)."""
        return as_intensities(self.held[path].image, self.name(path)) if path in self.held else read_image(path)

    def labels(self, path: Path, *, like=None, like_path: Path | None = None) -> sitk.Image:
        """The label map as an integer image, snapped onto ``like``'s grid (:func:`~atlasseg.imageio.read_labels`)."""
        if path not in self.held:
            return read_labels(path, like=like, like_path=like_path)
        return as_labels(
            self.held[path].image,
            self.name(path),
            like=like,
            like_path=None if like_path is None else self.name(like_path),
        )

    def target(self, target: Target) -> tuple[sitk.Image, sitk.Image | None]:
        """``target``'s image and, when it has them, its labels on its grid."""
        image = self.intensities(target.image)
        truth = None if target.labels is None else self.labels(target.labels, like=image, like_path=target.image)
        return image, truth

    def atlas_labels(self, atlas: Atlas) -> sitk.Image:
        """``atlas``'s label map, snapped onto its image's grid."""
        if atlas.labels not in self.held and atlas.image not in self.held:
            return atlas_labels(atlas)
        return self.labels(atlas.labels, like=self.geometry(atlas.image), like_path=atlas.image)

    def atlas_normalized(self, atlas: Atlas, method: str) -> sitk.Image:
        """``atlas``'s image as float32, normalised by ``method``."""
        if atlas.image not in self.held:
            return load_normalized(atlas.image, method)
        return normalize_intensity(self.intensities(atlas.image), method=method)


FILES = Sources()  # every image read from its file
