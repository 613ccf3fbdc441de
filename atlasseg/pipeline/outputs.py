"""Writers: strict JSON, metrics.csv and other CSV tables, the versions a run records."""

from __future__ import annotations

import csv
import io
import json
import math
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import SimpleITK as sitk

from .. import __version__
from ..config import Config
from ..evaluation import header, mean_score, rows
from ..imageio import atomic_write_text, write_image
from ..layout import LAYOUTS
from ..registration import save_transform
from .jobs import timed

if TYPE_CHECKING:
    from .target import Segmented, TargetResult


def write_segmented(segmented: Segmented, out_dir: Path, config: Config, *, label_names: dict[int, str]) -> Path:
    """Write one segmented target where ``output.layout`` puts it under ``out_dir`` (``segmentation.<format>``, and
    the probability maps, disagreement and transforms it holds); returns the segmentation's path. The seconds
    taken go into its record (``seconds['output']``)."""
    layout, target_id, fmt = LAYOUTS[config.output.layout], segmented.target_id, config.output.format
    seconds: dict[str, float] = {}
    with timed(seconds, "output"):
        path = layout.segmentation(out_dir, target_id, fmt)
        write_image(segmented.segmentation, path)
        for value, probability in segmented.probabilities.items():
            if value:
                write_image(probability, layout.probability(out_dir, target_id, value, label_names, fmt))
        if segmented.disagreement is not None:
            write_image(segmented.disagreement, out_dir / target_id / segmented.record["disagreement"])
        if config.output.save_transforms:
            for aid, transform in segmented.transforms.items():
                save_transform(transform, out_dir / target_id / "transforms" / f"{aid}.h5")
    segmented.record["seconds"]["output"] = round(seconds["output"], 3)
    return path


def versions() -> dict[str, str]:
    import joblib
    import numpy
    import scipy
    import yaml

    return {
        "atlasseg": __version__,
        "python": platform.python_version(),
        "SimpleITK": sitk.Version_VersionString(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "joblib": joblib.__version__,
        "pyyaml": yaml.__version__,
    }


def json_safe(value):
    """``value`` with NaN and infinities as ``None``: run.json stays strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, document) -> None:
    """Write ``document`` as strict, indented JSON (NaN and infinities as null), atomically."""
    atomic_write_text(path, json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n")


def evaluation_metrics(config: Config) -> tuple[str, ...]:
    """The configured metrics, Dice always first (the run's summary is the Dice table)."""
    return tuple(dict.fromkeys(("dice", *config.evaluation.metrics)))


def write_metrics(path: Path, results: list[TargetResult], label_names: dict[int, str], metrics) -> None:
    """``metrics.csv``: one row per target and label, plus the target's mean. With predicted Dice
    (``quality.enabled``) every segmented target has rows, its metrics empty without ground truth, and three
    more columns: ``predicted_dice``, ``predicted_dice_error`` and ``review`` (the mean row: any label's)."""
    if not any("quality" in r.record for r in results):
        table = [
            row for r in results if r.scores is not None for row in rows(r.target_id, r.scores, label_names, metrics)
        ]
        write_table(path, header(metrics), table)
        return
    table = []
    for r in results:
        quality = {int(v): q for v, q in r.record.get("quality", {}).items()}
        if r.scores is None and not quality:
            continue
        scores = r.scores or {v: {m: math.nan for m in metrics} for v in quality}
        for row in rows(
            r.target_id, {**{v: {m: math.nan for m in metrics} for v in quality}, **scores}, label_names, metrics
        ):
            if row[1] == "mean":
                flagged = [q["review"] for q in quality.values()]
                predicted = [q["predicted_dice"] for q in quality.values()]
                row += [mean_score(dict(enumerate(predicted))), math.nan, str(any(flagged)).lower() if flagged else ""]
            elif row[1] in quality:
                q = quality[row[1]]
                row += [float(q["predicted_dice"]), float(q["error"]), str(q["review"]).lower()]
            else:
                row += [math.nan, math.nan, ""]
            table.append(row)
    write_table(path, [*header(metrics), "predicted_dice", "predicted_dice_error", "review"], table)


def write_table(path: Path, head: list[str], table: list[list]) -> None:
    """Write a CSV atomically; floats with 6 decimals, NaN as an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(head)
    writer.writerows([[_csv_float(v) if isinstance(v, float) else v for v in row] for row in table])
    atomic_write_text(path, buffer.getvalue())


def _csv_float(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"
