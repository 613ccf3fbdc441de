"""Leave-one-out cross-validation over the atlas set: which fusion method and ``k`` suit the data.

Each atlas in turn is the target, with its own labels as ground truth, and the other
atlases are its atlases. Per target, every other atlas is registered affinely and scored
(as in a run, ``selection.metric`` and ``selection.roi``), the best ``max(k)`` by that
ranking are registered non-rigidly (a failed one replaced by the next-ranked), and each
registered atlas is propagated once. Every fusion method and every ``k`` then fuse the best
``k`` of these same candidates (all of them for ``all``; fewer where fewer registered), so
each (target, atlas) pair is registered once whatever the number of settings. Dice per
label is averaged over the targets. ``selection.k``, ``threshold`` and ``fusion.method`` of
the config are ignored (they are what is varied); the other fusion parameters apply to every
method.

Memory: one target at a time; its candidates (labels and warped float32 intensities of up to
``max(k)`` atlases) are held together while the settings are fused.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .cache import open_cache
from .config import Config
from .errors import AtlassegError, ConfigError, RegistrationError
from .evaluation import evaluate, mean_score
from .fusion.registry import METHODS, fuse, needs_intensities
from .manifest import Manifest, as_target
from .pipeline.checks import check_inputs
from .pipeline.outputs import versions, write_json, write_table
from .pipeline.target import Case, degraded_reason, prepare_case

log = logging.getLogger("atlasseg")

K = Union[int, str]
DEFAULT_KS: tuple[K, ...] = (3, 5, 10, "all")


def parse_ks(values: Sequence) -> list[K]:
    """``k`` values from the command line (integers >= 1 or ``all``), in the order given, without repeats."""
    out: list[K] = []
    for value in values:
        text = str(value).strip().lower()
        k: K = "all" if text == "all" else (int(text) if text.isdigit() else 0)
        if k == 0:
            raise ConfigError(f"--k {value!r}: expected an integer >= 1 or 'all'")
        if k not in out:
            out.append(k)
    return out


def settings_count(ks: Sequence[K]) -> int | None:
    """How many atlases to register for these ``k``: the largest, None (all) with ``all``."""
    return None if "all" in ks else max(int(k) for k in ks)


def score_setting(case: Case, method: str, k: K, config: Config, *, labels=None) -> dict:
    """Fuse the best ``k`` candidates of ``case`` with ``method``: Dice per label, atlases used, seconds."""
    chosen = case.candidates if k == "all" else case.candidates[: int(k)]
    start = time.perf_counter()
    fusion = dataclasses.replace(config.fusion, method=method)
    segmentation = fuse(case.reference, [(lab, img) for _, lab, img in chosen], config=fusion)
    seconds = time.perf_counter() - start
    dice = {v: s["dice"] for v, s in evaluate(segmentation, case.truth, labels=labels, metrics=("dice",)).items()}
    return {"atlases": len(chosen), "dice": dice, "mean_dice": mean_score(dice), "seconds": seconds}


def crossval(
    config: Config,
    manifest: Manifest,
    *,
    ks: Sequence[K] = DEFAULT_KS,
    methods: Sequence[str] = METHODS,
    out_dir: str | Path | None = None,
) -> dict:
    """Leave-one-out over ``manifest``'s atlases; returns (and, given ``out_dir``, writes as
    ``crossval.csv`` and ``crossval.json``) Dice per label per method and ``k``."""
    if len(manifest.atlases) < 2:
        raise AtlassegError(
            f"{manifest.path}: cross-validation needs at least 2 atlases, found {len(manifest.atlases)}"
        )
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown fusion method {unknown[0]!r} (known: {', '.join(METHODS)})")
    check_inputs(manifest, config, leave_one_out=True)
    labels = sorted(manifest.label_names) or None
    start = time.perf_counter()
    targets: dict[str, dict] = {}
    cache = open_cache(config)
    for number, atlas in enumerate(manifest.atlases, 1):
        began = time.time()
        target = as_target(atlas)
        atlases = manifest.atlases_for(target)
        case = prepare_case(
            target,
            atlases,
            config,
            count=settings_count(ks),
            intensities=any(needs_intensities(m) for m in methods),
            cache=cache,
        )
        cache.evict(in_use_since=began)  # this target's registrations are in hand
        record = {
            "ranking": case.ranking.table(config.selection.metric),
            "registered": [aid for aid, _, _ in case.candidates],
            "dropped": case.ranking.dropped,
            "seconds": {k: round(v, 3) for k, v in case.seconds.items()},
        }
        degraded = degraded_reason(len(case.ranking.dropped), len(atlases), config.selection)
        if degraded is not None:  # scored all the same, but its scores speak for fewer atlases than asked
            log.warning("target %s: degraded: %s", target.id, degraded)
            record["degraded"] = degraded
        if not case.candidates:
            log.warning(
                "target %s: no atlas registered; left out (%s)",
                target.id,
                "; ".join(f"{d['atlas']}: {d['reason']}" for d in case.ranking.dropped),
            )
            targets[target.id] = {**record, "failed": "no atlas registered"}
            continue
        record["settings"] = {
            m: {str(k): score_setting(case, m, k, config, labels=labels) for k in ks} for m in methods
        }
        targets[target.id] = record
        best = max(
            (
                (s["mean_dice"], m, k)
                for m, by_k in record["settings"].items()
                for k, s in by_k.items()
                if not math.isnan(s["mean_dice"])
            ),
            default=(math.nan, "-", "-"),
        )
        log.info(
            "target %d/%d %s: %d atlases registered; best mean Dice %.3f (%s, k=%s)",
            number,
            len(manifest.atlases),
            target.id,
            len(case.candidates),
            *best,
        )
        del case
    scored = {t: r for t, r in targets.items() if "settings" in r}
    if not scored:
        raise RegistrationError(f"{manifest.path}: cross-validation failed: no target had an atlas registered")
    document = {
        "versions": versions(),
        "config": config.to_dict(),
        "manifest": str(manifest.path),
        "ks": list(ks),
        "methods": list(methods),
        "label_names": {str(v): n for v, n in manifest.label_names.items()},
        "seconds_total": round(time.perf_counter() - start, 3),
        "summary": summarise(scored, methods, ks),
        "degraded_targets": [t for t, r in targets.items() if "degraded" in r],
        "targets": targets,
    }
    if out_dir is not None:
        write_outputs(Path(out_dir), document, manifest.label_names)
    return document


def summarise(targets: dict[str, dict], methods: Sequence[str], ks: Sequence[K]) -> dict:
    """Per method and k: mean Dice per label and overall (over targets; NaN left out), mean atlases and seconds."""
    out: dict = {}
    for method in methods:
        for k in ks:
            settings = [r["settings"][method][str(k)] for r in targets.values()]
            values = sorted({v for s in settings for v in s["dice"]})
            dice = {v: _nanmean([s["dice"].get(v, math.nan) for s in settings]) for v in values}
            out.setdefault(method, {})[str(k)] = {
                "dice": dice,
                "mean_dice": _nanmean([s["mean_dice"] for s in settings]),
                "atlases": float(np.mean([s["atlases"] for s in settings])),
                "seconds": float(np.mean([s["seconds"] for s in settings])),
            }
    return out


def _nanmean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def summary_table(document: dict, label_names: dict[int, str]) -> tuple[list[str], list[list]]:
    """(head, rows) of the summary: one row per method and k, mean Dice per label and overall."""
    summary = document["summary"]
    values = sorted({v for by_k in summary.values() for s in by_k.values() for v in s["dice"]})
    head = ["method", "k", "atlases"] + [label_names.get(v) or str(v) for v in values] + ["mean", "fusion s"]
    rows = []
    for method, by_k in summary.items():
        for k, s in by_k.items():
            rows.append(
                [
                    method,
                    k,
                    f"{s['atlases']:.1f}",
                    *(_cell(s["dice"].get(v, math.nan)) for v in values),
                    _cell(s["mean_dice"]),
                    f"{s['seconds']:.2f}",
                ]
            )
    return head, rows


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def write_outputs(out: Path, document: dict, label_names: dict[int, str]) -> None:
    """``crossval.csv`` (Dice per method, k, target and label, with the means over targets) and ``crossval.json``."""
    table = []
    for method in document["methods"]:
        for k in map(str, document["ks"]):
            for target, record in document["targets"].items():
                if "settings" in record:
                    s = record["settings"][method][k]
                    table += [
                        [method, k, target, s["atlases"], v, label_names.get(v, ""), d] for v, d in s["dice"].items()
                    ]
                    table.append([method, k, target, s["atlases"], "mean", "", s["mean_dice"]])
            s = document["summary"][method][k]
            table += [[method, k, "mean", s["atlases"], v, label_names.get(v, ""), d] for v, d in s["dice"].items()]
            table.append([method, k, "mean", s["atlases"], "mean", "", s["mean_dice"]])
    write_table(out / "crossval.csv", ["method", "k", "target", "atlases", "label", "name", "dice"], table)
    write_json(out / "crossval.json", document)
