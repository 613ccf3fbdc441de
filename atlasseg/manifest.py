"""The data manifest: which atlases and targets a run uses.

Shape (paths relative to the manifest's folder, or absolute)::

    labels: {1: anterior, 2: posterior}
    atlases:
      - {id: case_001, image: images/case_001.nii.gz, labels: labels/case_001.nii.gz}
    targets:
      - {id: case_004, image: images/case_004.nii.gz, labels: labels/case_004.nii.gz}  # labels optional

Every entry may also name a ``mask`` (binary image on the image's grid: the
registration metric is restricted to it) and ``landmarks`` (a point file, see
``atlasseg.registration.landmarks``, used by ``initialization: landmarks``).

Images, label maps and masks are NIfTI, NRRD, MetaImage, FreeSurfer MGH/MGZ files or DICOM series: a
folder holding one series, or ``FOLDER/<SeriesInstanceUID>`` for one of several in a folder.

An atlas registered elsewhere may carry its ``transform``: a file mapping target points to atlas
points (mm, LPS), an ITK transform (``.h5``, ``.mat``, ``.tfm``, ``.txt``) or a displacement field image.
ANTs writes one when the target is the fixed image and the atlas the moving one: ``0GenericAffine.mat``,
or for affine + SyN the composite ``.h5`` of ``antsRegistration --write-composite-transform 1``.
atlasseg then uses it in place of its own affine stage for that pair (selection scores the atlas
through it; the non-rigid stage starts from it). A transform belongs to one pair of spaces, so::

    transform: atlas_to_template.mat               # every target of the manifest (they share one space)
    transform: {case_004: a.h5, case_005: b.h5}    # per target id; targets not listed get the affine stage

An atlas taken as a target (cross-validation) gets the affine stage unless listed by its id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .config import load_yaml, read_yaml, short_repr
from .errors import ImageError, ManifestError
from .imageio import atomic_write_text, dicom_files, names_dicom_series

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
#: What runs write at the top of their output folder, beside one folder per target id: no id may take these names
#: (compared without case, as macOS and Windows file systems do).
RESERVED_IDS = (
    "run.json",
    "metrics.csv",
    "index.html",
    "viewer",
    "crossval.csv",
    "crossval.json",
    "dseg.tsv",
    "dataset_description.json",
    ".bidsignore",
)
_TOP_KEYS = ("labels", "atlases", "targets")
_FILE_KEYS = ("image", "labels", "mask", "landmarks")
_IMAGE_KEYS = ("image", "labels", "mask")  # may be DICOM series
_NAME_LENGTH = 200  # a label's name: it heads tables and report columns
_KEYS = {"atlases": ("id", *_FILE_KEYS, "transform"), "targets": ("id", *_FILE_KEYS)}


@dataclass(frozen=True)
class Atlas:
    """A labelled image used to segment targets."""

    id: str
    image: Path
    labels: Path
    mask: Path | None = None
    landmarks: Path | None = None
    transforms: tuple[tuple[str, Path], ...] = ()  # (target id, initial transform file: target → atlas points)

    def transform_for(self, target_id: str) -> Path | None:
        """The manifest's initial transform file for this atlas and that target, if any."""
        return dict(self.transforms).get(target_id)


@dataclass(frozen=True)
class Target:
    """An image to segment, with optional ground-truth labels for evaluation."""

    id: str
    image: Path
    labels: Path | None = None
    mask: Path | None = None
    landmarks: Path | None = None


@dataclass(frozen=True)
class Manifest:
    """Validated manifest: label names, atlases and targets, with absolute paths."""

    path: Path
    label_names: dict[int, str]
    atlases: tuple[Atlas, ...]
    targets: tuple[Target, ...]
    written: dict[tuple[str, str, str], str] = field(default_factory=dict, compare=False, repr=False)
    # ("atlas" | "target", id, field) → the path as the manifest writes it (before symlinks are resolved)

    def as_written(self, entry: Atlas | Target, key: str) -> str:
        """``entry``'s ``key`` file as the manifest writes it (an atlas taken as a target: as its atlas entry)."""
        kinds = ("atlas",) if isinstance(entry, Atlas) else ("target", "atlas")
        found = (self.written.get((kind, entry.id, key)) for kind in kinds)
        return next((w for w in found if w is not None), str(getattr(entry, key)))

    def target(self, target_id: str) -> Target:
        for t in self.targets:
            if t.id == target_id:
                return t
        raise ManifestError(
            f"{self.path}: no target with id {target_id!r} (targets: {', '.join(t.id for t in self.targets)})"
        )

    def case(self, case_id: str) -> Target:
        """The target with this id, else the atlas with this id as a target (its labels the ground truth)."""
        if any(t.id == case_id for t in self.targets):
            return self.target(case_id)
        for a in self.atlases:
            if a.id == case_id:
                return as_target(a)
        known = ", ".join([t.id for t in self.targets] + [a.id for a in self.atlases])
        raise ManifestError(f"{self.path}: no target or atlas with id {case_id!r} (known: {known})")

    def atlases_for(self, target: Target) -> list[Atlas]:
        """The atlases that may segment ``target``: all but one with the target's id (never an image as its own atlas)."""
        return [a for a in self.atlases if a.id != target.id]


def as_target(atlas: Atlas) -> Target:
    """An atlas as a target, with its labels as ground truth (leave-one-out)."""
    return Target(atlas.id, atlas.image, atlas.labels, atlas.mask, atlas.landmarks)


def _load_yaml(path: Path):
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found")
    if path.is_dir():
        raise ManifestError(f"{path}: is a directory, expected a data_manifest.yaml file")
    return read_yaml(path, error=ManifestError, what="manifest")


def _file(path: Path, entry: str, key: str, value, *, required: bool) -> Path | None:
    if value is None:
        if required:
            raise ManifestError(f"{path}: {entry} has no '{key}'")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{path}: {entry}: '{key}' must be a file path, got {short_repr(value)}")
    file = Path(value).expanduser()
    if not file.is_absolute():
        file = path.parent / file
    if key in _IMAGE_KEYS and (file.is_dir() or names_dicom_series(file)):
        try:
            dicom_files(file)
        except ImageError as err:
            raise ManifestError(f"{path}: {entry}: {key}: {err}") from None
        return file.resolve()
    if not file.exists():
        raise ManifestError(f"{path}: {entry}: {key} file not found: {file}")
    if file.is_dir():
        raise ManifestError(f"{path}: {entry}: {key} is a directory, expected a file: {file}")
    return file.resolve()


def _transforms(path: Path, entry: str, value, target_ids: list[str]) -> tuple[tuple[str, Path], ...]:
    """An atlas's ``transform``: one file for every target, or a mapping target id → file."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        file = _file(path, entry, "transform", value, required=True)
        return tuple((t, file) for t in target_ids)
    return tuple(
        (str(t), _file(path, f"{entry}: transform for {short_repr(t)}", "transform", f, required=True))
        for t, f in value.items()
    )


def _entries(path: Path, doc: dict, section: str, *, labels_required: bool, target_ids=()) -> list[dict]:
    items = doc.get(section)
    if items is None:
        return []
    if not isinstance(items, list):
        raise ManifestError(f"{path}: '{section}' must be a list of entries")
    singular = {"atlases": "atlas", "targets": "target"}[section]
    keys = _KEYS[section]
    seen: set[str] = set()
    out = []
    for i, item in enumerate(items):
        entry = f"{section}[{i}]"
        if not isinstance(item, dict):
            raise ManifestError(f"{path}: {entry} must be a mapping with keys {', '.join(keys)}")
        ident = item.get("id")
        if ident is None:
            raise ManifestError(f"{path}: {entry} has no 'id'")
        if isinstance(ident, (dict, list)) or not _ID.match(ident := str(ident)):
            raise ManifestError(
                f"{path}: {entry}: id {short_repr(ident)} may only hold letters, digits, '.', '_' "
                "and '-', at most 200 (it names output files)"
            )
        if ident.lower() in RESERVED_IDS:
            raise ManifestError(
                f"{path}: {entry}: id {ident!r} is the name of a file runs write beside the targets' "
                f"folders ({', '.join(RESERVED_IDS)}); rename the entry"
            )
        entry = f"{singular} {ident!r}"
        for key in item:
            if key not in keys:
                raise ManifestError(f"{path}: {entry}: unknown key '{key}' (known: {', '.join(keys)})")
        if ident in seen:
            raise ManifestError(f"{path}: duplicate {singular} id {ident!r}")
        seen.add(ident)
        files = {
            key: _file(
                path, entry, key, item.get(key), required=key == "image" or (key == "labels" and labels_required)
            )
            for key in _FILE_KEYS
        }
        if "transform" in keys:
            files["transforms"] = _transforms(path, entry, item.get("transform"), list(target_ids))
        out.append({"id": ident, **files})
    return out


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate ``data_manifest.yaml``; every listed file must exist."""
    path = Path(path).expanduser().absolute()
    return manifest_from_dict(_load_yaml(path), path)


def manifest_from_dict(doc, path: str | Path | None = None, *, name: str | None = None) -> Manifest:
    """Validate a manifest's content as if read from ``path`` (relative paths resolve against its folder); or, for
    one that is no file, as named ``name`` in messages (``segment()``; relative paths resolve against the current
    folder)."""
    if (path is None) == (name is None):
        raise TypeError("manifest_from_dict: give a path or a name")
    path = Path(name) if path is None else Path(path).expanduser().absolute()
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: expected a mapping with keys {', '.join(_TOP_KEYS)}")
    for key in doc:
        if key not in _TOP_KEYS:
            raise ManifestError(f"{path}: unknown key '{key}' (known: {', '.join(_TOP_KEYS)})")
    raw_names = doc.get("labels") or {}
    if not isinstance(raw_names, dict):
        raise ManifestError(f"{path}: 'labels' must map label values to names, e.g. {{1: anterior}}")
    names: dict[int, str] = {}
    for value, name in raw_names.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ManifestError(
                f"{path}: labels: {short_repr(value)} is not a positive integer label value (0 is background)"
            )
        if isinstance(name, (dict, list)) or len(name := str(name)) > _NAME_LENGTH:
            raise ManifestError(
                f"{path}: labels: the name of label {value} must be a text of at most {_NAME_LENGTH} "
                f"characters, got {short_repr(name)}"
            )
        names[value] = name
    targets = tuple(Target(**e) for e in _entries(path, doc, "targets", labels_required=False))
    atlases = tuple(
        Atlas(**e) for e in _entries(path, doc, "atlases", labels_required=True, target_ids=[t.id for t in targets])
    )
    if not atlases:
        raise ManifestError(f"{path}: no atlases listed")
    known = {t.id for t in targets} | {a.id for a in atlases}
    for atlas in atlases:
        unknown = [t for t, _ in atlas.transforms if t not in known]
        if unknown:
            raise ManifestError(
                f"{path}: atlas {atlas.id!r}: transform for {short_repr(unknown[0])}, which is no target or atlas id"
            )
    written = {
        (kind, str(item.get("id")), key): item[key]
        for section, kind in (("atlases", "atlas"), ("targets", "target"))
        for item in doc.get(section) or ()
        for key in _FILE_KEYS
        if isinstance(item.get(key), str)
    }
    return Manifest(
        path=path, label_names=dict(sorted(names.items())), atlases=atlases, targets=targets, written=written
    )


def write_manifest(
    path: str | Path,
    doc: dict,
    *,
    comment: str = "",
    force: bool = False,
    check: Callable[[Manifest], None] | None = None,
) -> Manifest:
    """Validate ``doc`` as the manifest at ``path`` (its paths relative to that folder), run ``check`` on it
    (e.g. :func:`atlasseg.pipeline.check_inputs`), then write it atomically as YAML headed by ``comment``.

    An existing file is replaced only with ``force``. Returns the validated manifest.
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not force:
        raise ManifestError(f"{path}: already exists; choose another --out, or --force to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # relative paths may climb out of it ("../images")
    except OSError as err:
        raise ManifestError(f"{path.parent}: cannot create the manifest's folder ({err.strerror or err})") from None
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, allow_unicode=True, width=1000)
    manifest = manifest_from_dict(load_yaml(text), path)  # exactly what is written
    if check is not None:
        check(manifest)
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    atomic_write_text(path, header + text)
    return manifest
