"""A whole run: every target, run.json, metrics.csv and the report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..cache import Cache, open_cache
from ..config import Config
from ..errors import AtlassegError
from ..layout import LAYOUTS
from ..manifest import Manifest, Target
from ..parallel import log_above_bars, progress, session
from ..quality import Calibration, calibrate
from .checks import check_changed_inputs, check_inputs, check_output_dir
from .jobs import peak_mb, timed
from .outputs import evaluation_metrics, versions, write_json, write_metrics
from .resume import finished_target, input_record, write_target_record
from .target import TargetResult, segment_target

log = logging.getLogger("atlasseg")


# What makes one target fail while the others go on: bad or vanished files, too few atlases left, ITK errors.
_TARGET_ERRORS = (AtlassegError, RuntimeError, OSError, MemoryError)


def run(
    config: Config, manifest: Manifest, *, out_dir: str | Path | None = None, target_ids=None, force: bool = False
) -> list[TargetResult]:
    """Segment the manifest's targets (or those named) and write segmentations, metrics.csv, run.json
    and (``output.report``) the QC report (:func:`atlasseg.report.write_report`).

    Inputs and the output folder are checked first (:func:`check_inputs`, :func:`check_output_dir`).
    Registrations come from the cache when an earlier run made them, and targets an earlier run of the
    same config finished in ``out_dir`` are not segmented again (a stopped run resumes); ``force``
    recomputes everything and writes over another config's or other inputs' outputs. A target that fails is
    recorded (``error`` of its result, ``status: failed`` in run.json) and the others still run; one that lost
    more than ``selection.max_dropped_share`` of its atlases is ``degraded``. Interrupted (Ctrl-C), the run
    writes ``status: interrupted``, metrics.csv and the report of the targets finished, and re-raises.
    """
    out = Path(out_dir if out_dir is not None else config.output.dir)
    targets = [manifest.target(t) for t in target_ids] if target_ids else list(manifest.targets)
    if not targets:
        raise AtlassegError(f"{manifest.path}: no targets to segment")
    check_inputs(manifest, config)
    check_output_dir(out, config, manifest, force=force)
    check_changed_inputs(out, targets, manifest, config, force=force)
    cache = open_cache(config, force=force)
    start = time.perf_counter()
    results: list[TargetResult] = []
    run_record = {
        "versions": versions(),
        "config": config.to_dict(),
        "manifest": str(manifest.path),
        "cache": str(cache.root) if cache.enabled else None,
        "status": "running",
        "targets": {},
    }
    try:
        with (
            session(config.parallel),
            log_above_bars(),
            progress(targets, desc="targets", unit="target", leave=True) as bar,
        ):
            calibration = None
            if config.quality.enabled:
                took: dict[str, float] = {}
                with timed(took, "quality"):
                    calibration = calibrate(manifest, config, cache=cache)
                run_record["quality"] = {**calibration.summary(), "seconds": round(took["quality"], 3)}
            for target in bar:
                results.append(
                    _run_target(target, manifest, config, out=out, cache=cache, force=force, calibration=calibration)
                )
                run_record["targets"][target.id] = results[-1].record
                write_json(out / "run.json", run_record)  # after every target: how far a long run has come
    except KeyboardInterrupt:
        _finish(out, run_record, results, manifest, config, start=start, interrupted=True)
        log.warning(
            "interrupted after %d of %d target(s); run the same command again to resume (finished targets "
            "and registrations are kept)",
            len(results),
            len(targets),
        )
        raise
    _finish(out, run_record, results, manifest, config, start=start)
    return results


def _run_target(
    target: Target,
    manifest: Manifest,
    config: Config,
    *,
    out: Path,
    cache: Cache,
    force: bool,
    calibration: Calibration | None,
) -> TargetResult:
    """One target of a run: reused when an earlier run finished it, else segmented and its ``target.json`` written
    (a failure recorded, not raised); then the cache is brought under its cap."""
    began = time.time()
    atlases = manifest.atlases_for(target)
    result = None if force else finished_target(target, atlases, config, out)
    if result is not None:
        log.info("target %s: finished by an earlier run, reused", target.id)
    else:
        log.info("target %s: %d atlases", target.id, len(atlases))
        try:
            result = segment_target(
                target,
                atlases,
                config,
                out_dir=out,
                label_names=manifest.label_names,
                cache=cache,
                calibration=calibration,
            )
            write_target_record(out, result, input_record(target, atlases, config))
        except _TARGET_ERRORS as err:
            log.error("target %s failed: %s", target.id, err)
            result = TargetResult(
                target.id,
                None,
                None,
                {"image": str(target.image), "status": "failed", "error": str(err)},
                error=str(err),
            )
    if result.dice is not None:
        log.info("target %s: mean Dice %.3f", target.id, result.mean_dice)
    result.record["manifest_image"] = manifest.as_written(target, "image")  # what the report shows
    cache.evict(in_use_since=began)
    return result


def _finish(
    out: Path,
    run_record: dict,
    results: list[TargetResult],
    manifest: Manifest,
    config: Config,
    *,
    start: float,
    interrupted: bool = False,
) -> None:
    """metrics.csv, the final run.json (status ``complete``, ``degraded``, ``failed`` or ``interrupted``) and the
    report, of the targets finished."""
    write_metrics(out / "metrics.csv", results, manifest.label_names, evaluation_metrics(config))
    LAYOUTS[config.output.layout].finish(out, manifest.label_names)
    failed = [r.target_id for r in results if r.status == "failed"]
    degraded = [r.target_id for r in results if r.status == "degraded"]
    if degraded and not interrupted:
        log.warning(
            "%d of %d target(s) degraded (%s): each lost more than selection.max_dropped_share of its "
            "atlases; reasons in %s",
            len(degraded),
            len(results),
            ", ".join(degraded),
            out / "run.json",
        )
    status = "interrupted" if interrupted else "failed" if failed else "degraded" if degraded else "complete"
    run_record.update(
        status=status,
        failed_targets=failed,
        degraded_targets=degraded,
        seconds_total=round(time.perf_counter() - start, 3),
        peak_memory_mb=peak_mb(),
    )
    write_json(out / "run.json", run_record)
    if config.output.report:
        from ..report import write_report  # matplotlib is imported only for a report

        try:
            write_report(out, run_record, manifest)
        except _TARGET_ERRORS as err:  # the segmentations and run.json are written: a warning, not a failed run
            log.warning("%s: QC report not written (%s)", out / "index.html", err)
