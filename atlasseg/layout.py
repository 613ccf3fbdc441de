"""Where a run writes each target's images (``output.layout``), and BIDS file names.

``default``: ``<out>/<target>/segmentation.<format>`` and ``probability_<value>.<format>``.

``bids``: the output folder is a BIDS derivatives dataset. A target whose id is a BIDS name
(``sub-<label>[_ses-<label>][_<entity>-<label>...]``, as ``atlasseg manifest from-bids`` writes them)
gets ``<out>/sub-<label>/[ses-<label>/]anat/<id>_desc-atlasseg_dseg.<format>`` and, with
``output.probability_maps``, ``<id>_label-<name>_desc-atlasseg_probseg.<format>`` beside it. The
folder also gets ``dataset_description.json`` (``DatasetType: derivative``, ``GeneratedBy``: atlasseg),
``dseg.tsv`` (index, name and QC colour of every declared label; it applies to every ``_dseg`` file
below it) and a ``.bidsignore`` naming atlasseg's own files (``run.json``, ``metrics.csv``, the QC
report, and per target ``<out>/<target>/target.json`` ...), which keep their default places.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import ManifestError
from .imageio import atomic_write_text
from .report import label_colour

_ENTITY = re.compile(r"^([A-Za-z0-9]+)-([A-Za-z0-9]+)$")
_NOT_ALPHANUMERIC = re.compile(r"[^A-Za-z0-9]+")
DESCRIPTION = "atlasseg"  # the desc- entity of what atlasseg writes
BIDS_VERSION = "1.10.0"


def parse_name(stem: str) -> tuple[dict[str, str], str] | None:
    """(entities in order, suffix) of a BIDS file name without extension (``sub-01_ses-A_T1w`` →
    ``({"sub": "01", "ses": "A"}, "T1w")``); None when it is not one (no ``sub-`` first, or a part that
    is not ``key-label``)."""
    *parts, suffix = stem.split("_")
    pairs = [_ENTITY.match(p) for p in parts]
    if not parts or not all(pairs) or pairs[0].group(1) != "sub" or not suffix.isalnum():
        return None
    entities = {m.group(1): m.group(2) for m in pairs}
    return (entities, suffix) if len(entities) == len(pairs) else None


def case_name(entities: dict[str, str]) -> str:
    """The manifest id of a case: its entities as a BIDS name (``sub-01_ses-A``)."""
    return "_".join(f"{key}-{label}" for key, label in entities.items())


def case_entities(case_id: str) -> dict[str, str] | None:
    """The entities of a manifest id written by :func:`case_name`; None when it is not one."""
    parsed = parse_name(f"{case_id}_x")
    return None if parsed is None else parsed[0]


def _bids_folder(out: Path, target_id: str) -> tuple[Path, dict[str, str]]:
    entities = case_entities(target_id)
    if entities is None:
        raise ManifestError(
            f"output.layout bids: target id {target_id!r} is not a BIDS name (sub-<label>[_ses-<label>]"
            "...); write the manifest with 'atlasseg manifest from-bids'"
        )
    folder = out / f"sub-{entities['sub']}"
    if "ses" in entities:
        folder = folder / f"ses-{entities['ses']}"
    return folder / "anat", entities


def _bids_segmentation(out: Path, target_id: str, fmt: str) -> Path:
    folder, _ = _bids_folder(out, target_id)
    return folder / f"{target_id}_desc-{DESCRIPTION}_dseg.{fmt}"


def _bids_probability(out: Path, target_id: str, value: int, names: dict[int, str], fmt: str) -> Path:
    folder, _ = _bids_folder(out, target_id)
    return folder / f"{target_id}_label-{_label_entity(value, names)}_desc-{DESCRIPTION}_probseg.{fmt}"


def _label_entity(value: int, names: dict[int, str]) -> str:
    """A label's BIDS ``label-`` value: its name, alphanumeric, when that names it alone; else its value."""
    entities = {v: _NOT_ALPHANUMERIC.sub("", n) for v, n in names.items()}
    mine = entities.get(value, "")
    return mine if mine and list(entities.values()).count(mine) == 1 and not mine.isdigit() else str(value)


_IGNORED = (
    "run.json",
    "metrics.csv",
    "index.html",
    "viewer/",
    "**/target.json",
    "**/qc.png",
    "**/viewer.js",
    "**/disagreement.*",
    "**/transforms/",
)


def _bids_finish(out: Path, names: dict[int, str]) -> None:
    description = {
        "Name": "atlasseg segmentations",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "atlasseg",
                "Version": __version__,
                "Description": "multi-atlas segmentation: registration, label propagation and fusion",
            }
        ],
    }
    atomic_write_text(out / "dataset_description.json", json.dumps(description, indent=2) + "\n")
    table = io.StringIO()
    writer = csv.writer(table, delimiter="\t", lineterminator="\n")
    writer.writerow(["index", "name", "color"])
    writer.writerows([value, name, label_colour(value)] for value, name in sorted(names.items()))
    atomic_write_text(out / "dseg.tsv", table.getvalue())
    atomic_write_text(out / ".bidsignore", "\n".join(_IGNORED) + "\n")


def _check_bids(target_ids: list[str]) -> None:
    for target_id in target_ids:
        _bids_folder(Path(), target_id)


@dataclass(frozen=True)
class Layout:
    """Where a layout puts a target's segmentation and probability maps, and what it adds to the folder."""

    check: Callable[[list[str]], None]  # target ids; raises before any work for one the layout cannot name
    segmentation: Callable[[Path, str, str], Path]  # (out, target id, format)
    probability: Callable[[Path, str, int, dict[int, str], str], Path]  # (out, target id, value, names, format)
    finish: Callable[[Path, dict[int, str]], None]  # (out, label names): after the run


LAYOUTS = {
    "default": Layout(
        check=lambda ids: None,
        segmentation=lambda out, tid, fmt: out / tid / f"segmentation.{fmt}",
        probability=lambda out, tid, value, names, fmt: out / tid / f"probability_{value}.{fmt}",
        finish=lambda out, names: None,
    ),
    "bids": Layout(
        check=_check_bids, segmentation=_bids_segmentation, probability=_bids_probability, finish=_bids_finish
    ),
}
