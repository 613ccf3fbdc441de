"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

AFFINE_ONLY = ["registration.nonrigid.enabled=false", "fusion.method=majority"]


def summarise(results) -> dict:
    dice = [r.mean_dice for r in results]
    return {"mean_dice": statistics.fmean(dice), "per_target": {r.target_id: r.mean_dice for r in results}}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": platform.platform(), "python": platform.python_version(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
