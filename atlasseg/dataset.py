"""Writing a ``data_manifest.yaml`` from a dataset on disk: a Decathlon / nnU-Net raw folder, a BIDS
dataset (:func:`from_bids`), or two folders.

Cases are paired by file name: the name without its extension (``.nii.gz``, ``.nrrd``, ...),
without an nnU-Net channel suffix on images (``case_0000``: channel 0) and without a
``_seg``/``_label``/``_labels``/``_segmentation`` suffix on label maps. Hidden files (the
``._name`` copies macOS leaves in the Decathlon archives) and files of other types are skipped.

atlasseg registers one scalar image per case: for multi-channel data one channel is used
(``channel``, 0 by default). nnU-Net keeps each channel in its own file (``case_0001`` ...);
the Decathlon keeps them in one 4D file, whose channel is then extracted into
``channel<N>/<folder>/`` beside the manifest (for 4D images in folders as well).

Whatever is written is validated first: the manifest as :func:`atlasseg.manifest.load_manifest`
would read it, and every file as :func:`atlasseg.pipeline.check_inputs` reads it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from . import layout
from .errors import ManifestError
from .imageio import read_geometry, write_image
from .manifest import Manifest, write_manifest

log = logging.getLogger("atlasseg")

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh")
_CHANNEL = re.compile(r"_(\d{4})$")
_LABEL_SUFFIX = re.compile(r"[_-](seg|segmentation|labels?|labelmap)$", re.IGNORECASE)
_NOT_ID = re.compile(r"[^A-Za-z0-9._-]+")
_SHOWN = 5  # unmatched files named in an error


@dataclass(frozen=True)
class Case:
    """One case found on disk: an image (one channel) and its label map when it has one."""

    id: str
    image: Path
    labels: Path | None = None


@dataclass(frozen=True)
class Imported:
    """What an import wrote: the validated manifest and a one-line account of the channels used."""

    manifest: Manifest
    channels: str


# --------------------------------------------------------------------------- file names


def _stem(path: Path, suffixes=IMAGE_SUFFIXES) -> str | None:
    """``path``'s name without its image extension; None for a hidden file or another file type.

    A folder of ``.dcm`` files (a DICOM series) is an image named by the folder.
    """
    name = path.name
    if name.startswith("."):
        return None
    if path.is_dir():
        return name if any(p.suffix.lower() == ".dcm" for p in path.iterdir()) else None
    return next((name[: -len(s)] for s in suffixes if name.lower().endswith(s.lower())), None)


def image_files(folder: Path, *, suffixes=IMAGE_SUFFIXES) -> dict[str, Path]:
    """Name without extension → path, for every image in ``folder`` (sorted by name)."""
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = _stem(path, suffixes)
        if stem is None:
            continue
        if stem in found:
            raise ManifestError(f"{folder}: {found[stem].name} and {path.name} are the same case twice; keep one")
        found[stem] = path
    if not found:
        raise ManifestError(f"{folder}: holds no images ({', '.join(suffixes)} files or DICOM folders)")
    return found


def _case_id(name: str) -> str:
    """A manifest id (letters, digits, '.', '_', '-') from a file name."""
    return _NOT_ID.sub("_", name).lstrip("._-") or "case"


def _listing(paths: list[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


def _pick_channel(case: str, per_channel: dict[int, Path], channel: int) -> Path:
    if channel not in per_channel:
        found = ", ".join(f"_{c:04d}" for c in sorted(per_channel))
        raise ManifestError(
            f"{per_channel[min(per_channel)].parent}: case {case!r} has no channel {channel} "
            f"image ({case}_{channel:04d}; found {found}); choose another --channel"
        )
    return per_channel[channel]


def pair_by_name(
    images: dict[str, Path],
    labels: dict[str, Path],
    *,
    channel: int = 0,
    channels: bool | None = None,
    require_labels: bool = True,
) -> tuple[list[Case], tuple[int, ...]]:
    """Pair image and label files (name without extension → path) by name; (cases sorted by id, the channel
    numbers found in image names: empty when they carry no channel suffix).

    An image ``case.nii.gz``, or ``case_0000.nii.gz`` for channel 0, pairs with a label map ``case.nii.gz``,
    ``case_seg.nii.gz``, ``case_label.nii.gz`` ... ``channels`` says whether image names end in a channel
    suffix (None: decided per image, by the label map it then matches). A label map without an image is an
    error naming it, and so is an image without one when ``require_labels``.
    """
    by_case: dict[str, Path] = {}
    for stem, path in labels.items():
        case = _LABEL_SUFFIX.sub("", stem)
        if case in by_case:
            raise ManifestError(f"{path.parent}: {by_case[case].name} and {path.name} are both labels of case {case!r}")
        by_case[case] = path
    plain: dict[str, Path] = {}
    per_channel: dict[str, dict[int, Path]] = {}
    lonely: list[Path] = []
    for stem, path in images.items():
        match = _CHANNEL.search(stem)
        if channels and not match:
            raise ManifestError(
                f"{path}: expected a channel suffix (as in case_0000{path.name[len(stem) :]}), "
                "like the dataset's other images"
            )
        if match and (channels or (channels is None and stem not in by_case and stem[: match.start()] in by_case)):
            per_channel.setdefault(stem[: match.start()], {})[int(match[1])] = path
        elif stem in by_case or not require_labels:
            plain[stem] = path
        else:
            lonely.append(path)
    if set(plain) & set(per_channel):
        case = min(set(plain) & set(per_channel))
        raise ManifestError(
            f"{plain[case].parent}: case {case!r} has an image without a channel suffix "
            f"({plain[case].name}) and per-channel images; keep one kind"
        )
    if plain and channel != 0:
        raise ManifestError(
            f"{next(iter(plain.values()))}: one channel per file and no channel suffix; there is no --channel {channel}"
        )
    chosen = {**plain, **{case: _pick_channel(case, found, channel) for case, found in per_channel.items()}}
    unmatched = [p for case, p in by_case.items() if case not in chosen]
    if lonely or unmatched:
        parts = [
            f"{len(files)} {what} in {files[0].parent}: {_listing(files)}"
            for files, what in ((lonely, "image(s) without a label map"), (unmatched, "label map(s) without an image"))
            if files
        ]
        raise ManifestError(
            "; ".join(parts) + " (files pair by name: case.nii.gz or case_0000.nii.gz with "
            "case.nii.gz or case_seg.nii.gz; unlabelled images go in --targets)"
        )
    cases = [Case(_case_id(case), chosen[case], by_case.get(case)) for case in sorted(chosen)]
    return cases, tuple(sorted({c for found in per_channel.values() for c in found}))


def _truth_folder(images: Path) -> Path | None:
    """``labelsTs`` beside ``imagesTs`` (any ``images*`` folder): the targets' ground truth, when it exists."""
    if not images.name.lower().startswith("images"):
        return None
    folder = images.parent / ("labels" + images.name[len("images") :])
    return folder if folder.is_dir() else None


def folder_targets(
    folder: Path, *, channel: int, channels: bool | None, truth: Path | None = None, suffixes=IMAGE_SUFFIXES
) -> list[Case]:
    """The images of ``folder`` as targets, with ground truth from ``truth`` (or a ``labels*`` folder beside
    an ``images*`` one) for those it holds."""
    truth = truth if truth is not None else _truth_folder(folder)
    labels = image_files(truth, suffixes=suffixes) if truth is not None else {}
    return pair_by_name(
        image_files(folder, suffixes=suffixes), labels, channel=channel, channels=channels, require_labels=False
    )[0]


# --------------------------------------------------------------------------- one channel per image


def _one_channel(case: Case, channel: int, *, out_dir: Path) -> tuple[Case, int]:
    """(``case`` with a scalar image, its channel count): channel ``channel`` of a 4D image is written to
    ``out_dir/channel<N>/<image's folder name>/``."""
    geometry = read_geometry(case.image)
    if geometry.dimension != 4:
        return case, 1
    if channel >= geometry.size[3]:
        raise ManifestError(f"{case.image}: has {geometry.size[3]} channel(s); there is no --channel {channel}")
    extracted = out_dir / f"channel{channel}" / case.image.parent.name / case.image.name
    write_image(sitk.ReadImage(str(case.image))[:, :, :, channel], extracted)
    return Case(case.id, extracted, case.labels), geometry.size[3]


def _describe_channels(channel: int, names: dict[int, str], found: tuple[int, ...], count: int) -> str:
    """Which channel the manifest uses, from the dataset's channel names, the channel suffixes found or the
    channels of 4D images (``count``)."""
    count = max(len(names), len(found), count)
    if count < 2:
        return "one channel per case"
    name = f" ({names[channel]})" if channel in names else ""
    listed = ", ".join(f"{c} {n}" for c, n in sorted(names.items())) or ", ".join(f"_{c:04d}" for c in found)
    return f"channel {channel}{name} of {count}" + (f" ({listed})" if listed else "") + "; --channel picks another"


# --------------------------------------------------------------------------- writing


def _relative(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder``; absolute when they share no folder but the root (or the drive differs)."""
    try:
        shared = Path(os.path.commonpath([path, folder]))
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path) if shared == Path(shared.anchor) else Path(os.path.relpath(path, folder)).as_posix()


def write_cases(
    out: str | Path,
    label_names: dict[int, str],
    atlases: list[Case],
    targets: list[Case],
    *,
    channel: int,
    channel_names: dict[int, str],
    found: tuple[int, ...],
    command: str,
    force: bool = False,
) -> Imported:
    """Validate and write the manifest (paths relative to its folder), headed by the ``command`` that wrote it:
    the manifest's keys, and every file read as ``atlasseg validate`` reads it (after the ``channel`` of 4D
    images is extracted). An existing ``out`` is replaced only with ``force``."""
    from .pipeline.checks import check_inputs

    out = Path(out).expanduser().absolute()
    scalar = [_one_channel(case, channel, out_dir=out.parent) for case in (*atlases, *targets)]
    atlases, targets = [c for c, _ in scalar[: len(atlases)]], [c for c, _ in scalar[len(atlases) :]]
    channels = _describe_channels(channel, channel_names, found, max((n for _, n in scalar), default=1))

    def entry(case: Case) -> dict:
        files = {"image": case.image, "labels": case.labels}
        return {"id": case.id, **{k: _relative(v.absolute(), out.parent) for k, v in files.items() if v is not None}}

    doc = {
        "labels": dict(sorted(label_names.items())),
        "atlases": [entry(c) for c in atlases],
        "targets": [entry(c) for c in targets],
    }
    comment = f"written by: {command} ({channels})"
    return Imported(write_manifest(out, doc, comment=comment, force=force, check=check_inputs), channels)


def from_folders(
    images: str | Path,
    labels: str | Path,
    *,
    out: str | Path = "data_manifest.yaml",
    targets: str | Path | None = None,
    target_labels: str | Path | None = None,
    channel: int = 0,
    label_names: dict[int, str] | None = None,
    force: bool = False,
) -> Imported:
    """Write a manifest whose atlases pair the files of ``images`` and ``labels`` by name, and whose targets
    are the images of ``targets`` (with ground truth from ``target_labels`` where it has them)."""
    images, labels = Path(images), Path(labels)
    atlases, found = pair_by_name(image_files(images), image_files(labels), channel=channel)
    chosen = (
        []
        if targets is None
        else folder_targets(
            Path(targets),
            channel=channel,
            channels=bool(found),
            truth=None if target_labels is None else Path(target_labels),
        )
    )
    options = "".join(
        f" --{key} {value}"
        for key, value in (("targets", targets), ("target-labels", target_labels))
        if value is not None
    )
    return write_cases(
        out,
        label_names or {},
        atlases,
        chosen,
        channel=channel,
        channel_names={},
        found=found,
        command=f"atlasseg manifest from-folders {images} {labels}{options}",
        force=force,
    )


# --------------------------------------------------------------------------- Decathlon / nnU-Net


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ManifestError(f"{path}: dataset.json not found")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read: {err}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: expected a JSON object with 'labels' and 'training' or 'file_ending'")
    return doc


def _label_names(doc: dict, path: Path) -> dict[int, str]:
    """Label value → name from ``labels``: ``{"1": "Anterior"}`` (Decathlon) or ``{"Anterior": 1}`` (nnU-Net v2;
    regions, lists of values, are left out)."""
    labels = doc.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ManifestError(f'{path}: has no \'labels\' mapping (e.g. {{"0": "background", "1": "tumour"}})')
    if all(isinstance(k, str) and k.strip().isdigit() for k in labels):  # Decathlon: value → name
        return {int(k): str(v) for k, v in labels.items() if int(k) > 0}
    names: dict[int, str] = {}
    for name, value in labels.items():  # nnU-Net v2: name → value
        if isinstance(value, list):
            log.warning(
                "%s: label %r is a region (values %s): left out, its values keep their own names", path, name, value
            )
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ManifestError(f"{path}: labels: {name!r}: {value!r} is not a label value (a whole number >= 0)")
        if name == "ignore":
            log.warning(
                "%s: label %d is nnU-Net's 'ignore' label; atlasseg segments it as any other label", path, value
            )
        if value > 0:
            names[value] = str(name)
    return names


def _channel_names(doc: dict, path: Path) -> dict[int, str]:
    channels = doc.get("channel_names", doc.get("modality")) or {}
    if not isinstance(channels, dict) or not all(str(k).strip().isdigit() for k in channels):
        raise ManifestError(
            f"{path}: 'channel_names'/'modality' must map channel numbers to names, e.g. {{\"0\": \"T2\"}}"
        )
    return {int(k): str(v) for k, v in channels.items()}


def _suffix_of(name: str) -> str:
    return next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), Path(name).suffix)


def _listed_file(folder: Path, value, *, where: str, path: Path, channel: int) -> tuple[Path, str, bool]:
    """A file named in dataset.json (relative to its folder): (path, case name, whether it is one channel's
    file: nnU-Net v1 lists ``case.nii.gz`` for the files ``case_0000.nii.gz``, ``case_0001.nii.gz``, ...)."""
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{path}: {where}: expected a file path, got {value!r}")
    file = folder / value
    suffix = _suffix_of(file.name)
    case = file.name[: -len(suffix)] if suffix else file.name
    if file.exists():
        return file, case, False
    per_channel = file.with_name(f"{case}_{channel:04d}{suffix}")
    if per_channel.exists():
        return per_channel, case, True
    raise ManifestError(f"{path}: {where}: file not found: {file}")


def _training_list(doc: dict, folder: Path, path: Path, channel: int) -> tuple[list[Case], bool]:
    training = doc["training"]
    if not isinstance(training, list) or not training:
        raise ManifestError(f'{path}: \'training\' must be a non-empty list of {{"image": ..., "label": ...}}')
    cases, used = [], False
    for i, item in enumerate(training):
        where = f"training[{i}]"
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise ManifestError(f'{path}: {where}: expected {{"image": ..., "label": ...}}, got {item!r}')
        image, case, suffixed = _listed_file(folder, item["image"], where=f"{where}.image", path=path, channel=channel)
        labels, _, _ = _listed_file(folder, item["label"], where=f"{where}.label", path=path, channel=channel)
        used |= suffixed
        cases.append(Case(_case_id(case), image, labels))
    return cases, used


def from_msd(
    dataset_json: str | Path,
    *,
    out: str | Path = "data_manifest.yaml",
    targets: str | Path | None = None,
    channel: int = 0,
    force: bool = False,
) -> Imported:
    """Write a manifest from a Decathlon or nnU-Net raw dataset: its training cases become atlases, its test
    images targets (the ``test`` list, or ``targets``, a folder relative to the dataset's, or ``imagesTs``),
    and its label names carry over.

    ``dataset_json`` (the file, or its folder) is read in either style: the Decathlon's (and nnU-Net v1's),
    ``"labels": {"1": "Anterior"}`` with a ``training`` list of ``{"image", "label"}`` paths; or nnU-Net v2's,
    ``"labels": {"Anterior": 1}`` with ``file_ending``, ``imagesTr/<case>_0000<file_ending>`` paired with
    ``labelsTr/<case><file_ending>``. Targets get ground truth from ``labelsTs`` beside ``imagesTs`` when it
    holds theirs.
    """
    path = Path(dataset_json).expanduser().absolute()
    if path.is_dir():
        path = path / "dataset.json"
    doc = _read_json(path)
    folder = path.parent
    label_names = _label_names(doc, path)
    channel_names = _channel_names(doc, path)
    if channel_names and channel not in channel_names:
        raise ManifestError(
            f"{path}: has channels {', '.join(f'{c} {n}' for c, n in sorted(channel_names.items()))}; "
            f"there is no --channel {channel}"
        )
    found: tuple[int, ...] = ()
    if "training" in doc:
        atlases, used = _training_list(doc, folder, path, channel)
        suffixes = IMAGE_SUFFIXES
    elif "file_ending" in doc:
        ending = doc["file_ending"]
        if not isinstance(ending, str) or not ending.startswith("."):
            raise ManifestError(f'{path}: file_ending must be a file extension such as ".nii.gz", got {ending!r}')
        suffixes = (ending,)
        for sub in ("imagesTr", "labelsTr"):
            if not (folder / sub).is_dir():
                raise ManifestError(
                    f"{path}: has no 'training' list and {folder / sub} is not a folder "
                    "(nnU-Net v2's 'dataset' key is not supported)"
                )
        atlases, found = pair_by_name(
            image_files(folder / "imagesTr", suffixes=suffixes),
            image_files(folder / "labelsTr", suffixes=suffixes),
            channel=channel,
            channels=True,
        )
        used = True
    else:
        raise ManifestError(
            f"{path}: has neither a 'training' list (Decathlon, nnU-Net v1) nor 'file_ending' (nnU-Net v2)"
        )
    if targets is not None:
        chosen = folder_targets(folder / targets, channel=channel, channels=used, suffixes=suffixes)
    elif isinstance(doc.get("test"), list) and doc["test"]:
        listed = [
            _listed_file(
                folder,
                item.get("image") if isinstance(item, dict) else item,
                where=f"test[{i}]",
                path=path,
                channel=channel,
            )
            for i, item in enumerate(doc["test"])
        ]
        chosen = [Case(_case_id(case), image) for image, case, _ in listed]
    elif (folder / "imagesTs").is_dir():
        chosen = folder_targets(folder / "imagesTs", channel=channel, channels=used, suffixes=suffixes)
    else:
        chosen = []
    return write_cases(
        out,
        label_names,
        atlases,
        chosen,
        channel=channel,
        channel_names=channel_names,
        found=found,
        command=f"atlasseg manifest from-msd {path}" + (f" --targets {targets}" if targets else ""),
        force=force,
    )


# --------------------------------------------------------------------------- BIDS

# Entities a derivative adds to its source's name (space, resolution, description, ...): not part of a case.
_DERIVATIVE_ENTITIES = ("space", "res", "den", "label", "desc", "seg")


def _bids_files(root: Path, suffix: str, datatype: str) -> dict[tuple, tuple[dict[str, str], Path]]:
    """(case entities as a tuple) → (entities, path) of the ``sub-*/[ses-*/]<datatype>/*_<suffix>.<ext>`` files of
    ``root`` (file names that are not BIDS names, or whose sub/ses disagree with their folders, are skipped)."""
    found: dict[tuple, tuple[dict[str, str], Path]] = {}
    for folder in sorted([*root.glob(f"sub-*/{datatype}"), *root.glob(f"sub-*/ses-*/{datatype}")]):
        for path in sorted(folder.iterdir()):
            stem = _stem(path)
            parsed = None if stem is None else layout.parse_name(stem)
            if parsed is None or parsed[1] != suffix:
                continue
            entities = parsed[0]
            session = folder.parent.name if folder.parent.name.startswith("ses-") else None
            if f"sub-{entities['sub']}" not in folder.parts or (session and entities.get("ses") != session[4:]):
                continue
            found[tuple(entities.items())] = (entities, path)
    return found


def _dseg_names(folder: Path, label_files: list[Path], desc: str | None) -> dict[int, str]:
    """Label names from a ``dseg.tsv`` (columns ``index``, ``name``): beside the first label map, else
    ``desc-<desc>_dseg.tsv`` or ``dseg.tsv`` at the derivative's root. None found: no names."""
    candidates = [label_files[0].with_name(_stem(label_files[0]) + ".tsv")] if label_files else []
    candidates += [folder / f"desc-{desc}_dseg.tsv"] if desc else []
    candidates.append(folder / "dseg.tsv")
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        return {}
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines(), delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ManifestError(f"{path}: cannot read: {err}") from None
    names = {}
    for line, row in enumerate(rows, 2):
        index, name = (row.get("index") or "").strip(), (row.get("name") or "").strip()
        if not index.isdigit() or not name:
            raise ManifestError(f"{path}: line {line}: expected a label value in 'index' and its 'name', got {row!r}")
        if int(index) > 0:
            names[int(index)] = name
    return names


def _labels_derivative(root: Path, labels: Path | None) -> Path:
    """The derivative holding the label maps: ``labels``, else the one folder under ``derivatives/`` with ``_dseg`` files."""
    if labels is not None:
        if not labels.is_dir():
            raise ManifestError(f"{labels}: not a folder (--labels names the derivative with the label maps)")
        return labels
    found = [d for d in sorted((root / "derivatives").glob("*")) if d.is_dir() and next(d.rglob("sub-*_dseg.*"), None)]
    if len(found) != 1:
        where = ", ".join(str(f) for f in found) if found else f"none under {root / 'derivatives'}"
        raise ManifestError(
            f"{root}: needs one derivative folder with _dseg label maps ({where}); name it with --labels"
        )
    return found[0]


def from_bids(
    bids_dir: str | Path,
    *,
    out: str | Path = "data_manifest.yaml",
    labels: str | Path | None = None,
    suffix: str = "T1w",
    datatype: str = "anat",
    desc: str | None = None,
    targets: tuple[str, ...] = (),
    channel: int = 0,
    force: bool = False,
) -> Imported:
    """Write a manifest from a BIDS dataset: every ``sub-*/[ses-*/]<datatype>/*_<suffix>`` image is a case,
    named by its entities (``sub-01_ses-A``: the ids ``output.layout: bids`` writes by). A case whose
    label map (a ``_dseg`` file of the same entities, plus any of space, res, den, label, desc) is in the
    labels derivative (``labels``, else the one folder under ``derivatives/`` holding ``_dseg`` files) is an
    atlas, and the others are targets; ``targets`` (ids, or ``sub-<label>`` for all of a subject's
    sessions) makes cases with label maps targets too, their label maps the ground truth. ``desc`` picks
    among several label maps per case. Label names come from the derivative's ``dseg.tsv``.
    """
    root = Path(bids_dir).expanduser().absolute()
    if not (root / "dataset_description.json").is_file():
        raise ManifestError(f"{root}: not a BIDS dataset (no dataset_description.json)")
    images = _bids_files(root, suffix, datatype)
    if not images:
        raise ManifestError(f"{root}: holds no sub-*/[ses-*/]{datatype}/*_{suffix} images (--suffix, --datatype)")
    derivative = _labels_derivative(root, None if labels is None else Path(labels).expanduser().absolute())
    maps: dict[str, list[Path]] = {}
    for entities, path in _bids_files(derivative, "dseg", datatype).values():
        if desc is None or entities.get("desc") == desc:
            case = {k: v for k, v in entities.items() if k not in _DERIVATIVE_ENTITIES}
            maps.setdefault(layout.case_name(case), []).append(path)
    cases = {layout.case_name(entities): path for entities, path in images.values()}
    for case, found in maps.items():
        if len(found) > 1:
            raise ManifestError(
                f"{derivative}: {case} has {len(found)} label maps ({_listing(found)}); pick one with --desc"
            )
        if case not in cases:
            raise ManifestError(f"{found[0]}: a label map without a {suffix} image ({case}) in {root}")
    chosen = set()
    for name in targets:
        matched = {c for c in cases if c == name or c.startswith(name + "_")}
        if not matched:
            raise ManifestError(
                f"{root}: --targets {name}: no such case (cases: {', '.join(sorted(cases)[:_SHOWN])} ...)"
            )
        chosen |= matched
    atlases = [Case(c, path, maps[c][0]) for c, path in cases.items() if c in maps and c not in chosen]
    to_segment = [
        Case(c, path, maps[c][0] if c in maps else None) for c, path in cases.items() if c not in maps or c in chosen
    ]
    if not atlases:
        raise ManifestError(f"{derivative}: no {suffix} image of {root} has a _dseg label map there: no atlases")
    names = _dseg_names(derivative, [paths[0] for paths in maps.values()], desc)
    options = "".join(f" --{key} {value}" for key, value in (("labels", labels), ("desc", desc)) if value is not None)
    options += "".join(f" --targets {t}" for t in targets)
    return write_cases(
        out,
        names,
        atlases,
        to_segment,
        channel=channel,
        channel_names={},
        found=(),
        command=f"atlasseg manifest from-bids {root}{options}",
        force=force,
    )
