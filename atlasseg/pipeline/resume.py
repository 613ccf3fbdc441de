"""What a resumed run reuses: the finished targets' records and the key and digests of their inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..cache import entry_key, file_digest
from ..config import Config
from ..layout import LAYOUTS
from ..manifest import Atlas, Target
from .outputs import write_json
from .target import TargetResult

TARGET_RECORD = "target.json"


def _input_files(target: Target, atlases: list[Atlas]) -> dict[str, Path | None]:
    """Every file one target's outputs depend on, by ``target|atlas:<id>:<field>``."""
    files = {
        f"{kind}:{entry.id}:{name}": getattr(entry, name)
        for kind, entries in (("target", [target]), ("atlas", atlases))
        for entry in entries
        for name in ("image", "labels", "mask", "landmarks")
    }
    files.update({f"atlas:{a.id}:transform": a.transform_for(target.id) for a in atlases})
    return files


def inputs_key(target: Target, atlases: list[Atlas], config: Config) -> str:
    """What one target's outputs depend on: its files, its atlases' files, the config (as run.json compares it)."""
    return entry_key("target", files=_input_files(target, atlases), settings=comparable(config.to_dict()))


def input_digests(target: Target, atlases: list[Atlas]) -> dict[str, str]:
    """The contents (SHA-256) of the files one target's outputs depend on, for saying which of them changed."""
    return {name: file_digest(path) for name, path in _input_files(target, atlases).items() if path is not None}


def comparable(config: dict) -> dict:
    """The config without what does not change the segmentations: where they go, the cache, the parallel
    backend, the report."""
    ignored = ("dir", "cache", "cache_dir", "cache_max_gb", "report")
    output = {k: v for k, v in config.get("output", {}).items() if k not in ignored}
    return {**{k: v for k, v in config.items() if k != "parallel"}, "output": output}


def finished_target(target: Target, atlases: list[Atlas], config: Config, out_dir: Path) -> TargetResult | None:
    """The result of a target an earlier run of the same inputs and config finished in ``out_dir``, else None."""
    folder = out_dir / target.id
    try:
        document = json.loads((folder / TARGET_RECORD).read_text())
        if document["inputs"] != inputs_key(target, atlases, config):
            return None
        record = document["record"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    segmentation = LAYOUTS[config.output.layout].segmentation(out_dir, target.id, config.output.format)
    if not segmentation.is_file():
        return None
    scores = None
    if "scores" in record:
        scores = {int(v): {m: math.nan if x is None else x for m, x in s.items()} for v, s in record["scores"].items()}
    return TargetResult(target.id, segmentation, scores, record)


def input_record(target: Target, atlases: list[Atlas], config: Config) -> dict:
    """What ``target.json`` keeps of one target's inputs: their key and the digests of their files."""
    return {"inputs": inputs_key(target, atlases, config), "files": input_digests(target, atlases)}


def write_target_record(out_dir: Path, result: TargetResult, inputs: dict) -> None:
    """``<out>/<target>/target.json``, written last for a segmented target: its inputs' key and digests
    (:func:`input_record`) and its record (what :func:`finished_target` reuses and
    :func:`~atlasseg.pipeline.checks.check_changed_inputs` compares)."""
    write_json(out_dir / result.target_id / TARGET_RECORD, {**inputs, "record": result.record})
