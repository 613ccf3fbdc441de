"""Command line: parse, call the library, print, exit code.

Exit codes (:data:`EXIT_CODES`): 0 success, 2 bad input or a failed stage or target (one line on
stderr; the traceback only with ``--debug``), 3 a run whose targets were all segmented but some
degraded (they lost more than ``selection.max_dropped_share`` of their atlases; 0 with
``--allow-degraded``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from . import __version__
from .config import PRESETS
from .errors import AtlassegError

log = logging.getLogger("atlasseg")

EXIT_OK, EXIT_ERROR, EXIT_DEGRADED, EXIT_INTERRUPTED = 0, 2, 3, 130
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "bad input, or a stage or target failed (one line on stderr)",
    EXIT_DEGRADED: "every target segmented, but some degraded: they lost more than selection.max_dropped_share "
    "of their atlases (run and crossval: --allow-degraded exits 0 instead)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); run the same command again to resume",
}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help=f"YAML config file, or a preset name ({', '.join(PRESETS)})")
    parser.add_argument("--manifest", default="data_manifest.yaml", help="data manifest (default: %(default)s)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set selection.k=5",
    )


def _add_manifest_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--channel",
        type=int,
        default=0,
        metavar="N",
        help="channel used of multi-channel images (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        default="data_manifest.yaml",
        help="manifest written; its paths are relative to its folder (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing manifest")


def _add_global_args(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """``--debug``, ``-q``, ``-v``, ``--log-file``: on the main parser with their defaults, on every
    (sub)command without (``SUPPRESS``), so a flag given after the command is kept and one given
    before it is not reset by the command's parser."""
    unset = {} if defaults else {"default": argparse.SUPPRESS}
    group = parser.add_argument_group("global options")
    group.add_argument("--debug", action="store_true", help="show tracebacks", **unset)
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars", **unset)
    group.add_argument(
        "-v", "--verbose", action="store_true", help="also each registration's per-level details", **unset
    )
    group.add_argument(
        "--log-file", metavar="PATH", help="also write the log (with -v's details and times) to PATH", **unset
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlasseg",
        description="Multi-atlas segmentation of medical images.",
        epilog="exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="version", version=f"atlasseg {__version__}")
    _add_global_args(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)  # the same flags after a (sub)command: git's and pip's habit
    _add_global_args(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", parents=[common], help="segment the manifest's targets")
    _add_config_args(p)
    p.add_argument("--out", help="output folder (default: output.dir of the config)")
    p.add_argument("--target", dest="targets", action="append", metavar="ID", help="only this target (repeatable)")
    p.add_argument(
        "--force",
        action="store_true",
        help="recompute everything (no cached registrations, no finished targets reused) and write over "
        "another config's outputs",
    )
    p.add_argument(
        "--allow-degraded",
        action="store_true",
        help="exit 0, not 3, when targets are degraded (lost more than selection.max_dropped_share of their atlases)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("cache", parents=[common], help="show, prune or clear the registration cache")
    p.add_argument(
        "action",
        choices=("info", "prune", "clear"),
        help="info: entries and size; prune: remove damaged entries, then the least recently used down to "
        "the size cap (never one used in the last 10 minutes); clear: remove every entry",
    )
    p.add_argument(
        "--config",
        help="config file or preset whose output.cache_dir and output.cache_max_gb to use "
        "(default: $ATLASSEG_CACHE_DIR, else ~/.cache/atlasseg, and the default cap)",
    )
    p.add_argument("--max-gb", type=float, metavar="GIB", help="prune down to this size instead of output.cache_max_gb")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("validate", parents=[common], help="check a config and a manifest; runs nothing")
    _add_config_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "select", parents=[common], help="rank the atlases for one target (affine stage and scores; no non-rigid stage)"
    )
    _add_config_args(p)
    p.add_argument(
        "--target",
        required=True,
        metavar="ID",
        help="a target of the manifest, or an atlas (ranked against the other atlases)",
    )
    p.set_defaults(func=cmd_select)

    p = sub.add_parser(
        "crossval", parents=[common], help="leave-one-out over the atlases: Dice per fusion method and k"
    )
    _add_config_args(p)
    p.add_argument(
        "--k",
        dest="ks",
        nargs="+",
        default=["3", "5", "10", "all"],
        metavar="K",
        help="numbers of best-ranked atlases to fuse, or all (default: 3 5 10 all)",
    )
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="fusion methods (default: every one)")
    p.add_argument("--out", help="folder for crossval.csv and crossval.json (default: output.dir of the config)")
    p.add_argument(
        "--allow-degraded",
        action="store_true",
        help="exit 0, not 3, when left-out atlases are degraded (lost more than "
        "selection.max_dropped_share of the other atlases)",
    )
    p.set_defaults(func=cmd_crossval)

    p = sub.add_parser(
        "report", parents=[common], help="(re)write the QC report (qc.png per target, index.html) of a finished run"
    )
    p.add_argument("out", metavar="OUT_DIR", help="the run's output folder (holding run.json)")
    p.add_argument("--manifest", help="data manifest for ground truth and label names (default: the run's)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", parents=[common], help="make a synthetic dataset and segment it")
    p.add_argument("--out", default="atlasseg-demo", help="folder for data/ and results/ (default: %(default)s)")
    p.add_argument("--dim", type=int, choices=(2, 3), default=3, help="image dimension (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="write over results of another config in --out")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one value of configs/demo.yaml (repeatable)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "register", parents=[common], help="register one image pair and write the warped image and transform"
    )
    p.add_argument("fixed", help="fixed image (the target space)")
    p.add_argument("moving", help="moving image, mapped onto the fixed one")
    p.add_argument("--labels", help="label map of the moving image, also warped (nearest neighbour)")
    p.add_argument(
        "--config",
        default="default",
        help="config file or preset; its registration section is used (default: %(default)s)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set registration.nonrigid.method=demons",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fixed-mask", help="binary mask on the fixed grid restricting the metric")
    p.add_argument("--moving-mask", help="binary mask on the moving grid restricting the metric")
    p.add_argument("--fixed-landmarks", help="landmark file of the fixed image (CSV, .fcsv or ITK points)")
    p.add_argument("--moving-landmarks", help="corresponding landmarks of the moving image; initialises from them")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("manifest", parents=[common], help="write a data_manifest.yaml from a dataset on disk")
    kinds = p.add_subparsers(dest="source", required=True, metavar="{from-msd,from-folders,from-bids}")
    q = kinds.add_parser(
        "from-msd",
        parents=[common],
        help="from a Decathlon / nnU-Net raw dataset: training cases become atlases, test images targets",
    )
    q.add_argument("dataset_json", metavar="DATASET_JSON", help="the dataset's dataset.json (or its folder)")
    q.add_argument(
        "--targets",
        metavar="DIR",
        help="folder of target images, relative to the dataset's "
        "(default: the 'test' list of dataset.json, else imagesTs/ when present)",
    )
    _add_manifest_args(q)
    q.set_defaults(func=cmd_manifest_msd)
    q = kinds.add_parser(
        "from-folders", parents=[common], help="pair the files of an image folder and a label folder by name"
    )
    q.add_argument("images", metavar="IMAGES", help="folder of atlas images")
    q.add_argument(
        "labels",
        metavar="LABELS",
        help="folder of their label maps (case.nii.gz or case_seg.nii.gz "
        "for the image case.nii.gz or case_0000.nii.gz)",
    )
    q.add_argument("--targets", metavar="DIR", help="folder of images to segment")
    q.add_argument("--target-labels", metavar="DIR", help="ground truth of some or all targets, paired by name")
    q.add_argument("--labels", dest="names", nargs="+", metavar="VALUE=NAME", help="label names, e.g. 1=anterior")
    _add_manifest_args(q)
    q.set_defaults(func=cmd_manifest_folders)
    q = kinds.add_parser(
        "from-bids",
        help="from a BIDS dataset: cases with a _dseg label map in a derivative become "
        "atlases, the others targets; ids are BIDS names (for output.layout: bids)",
    )
    q.add_argument("bids_dir", metavar="BIDS_DIR", help="the BIDS dataset's folder (holding dataset_description.json)")
    q.add_argument(
        "--labels",
        metavar="DIR",
        help="derivative folder of the label maps (default: the one folder under derivatives/ holding _dseg files)",
    )
    q.add_argument("--suffix", default="T1w", help="suffix of the images used (default: %(default)s)")
    q.add_argument("--datatype", default="anat", help="datatype folder of images and label maps (default: %(default)s)")
    q.add_argument("--desc", help="the desc- entity of the label maps used, where a case has several")
    q.add_argument(
        "--targets",
        nargs="+",
        default=[],
        metavar="ID",
        help="cases to segment although they have "
        "label maps (their ground truth): ids such as sub-01_ses-A, or sub-01 for all its sessions",
    )
    _add_manifest_args(q)
    q.set_defaults(func=cmd_manifest_bids)

    p = sub.add_parser("evaluate", parents=[common], help="score a segmentation against ground truth")
    p.add_argument("prediction", help="segmentation (label map)")
    p.add_argument("truth", help="ground-truth label map on the same grid")
    p.add_argument("--labels", nargs="+", metavar="VALUE[=NAME]", help="labels to score (default: all non-zero values)")
    p.add_argument("--out", help="also write metrics.csv and metrics.json into this folder")
    p.add_argument(
        "--id",
        dest="case_id",
        metavar="ID",
        help="the target column of metrics.csv (default: the "
        "prediction's file name without its extension; for atlasseg's <target>/segmentation.*, <target>)",
    )
    p.set_defaults(func=cmd_evaluate)
    return parser


def _label_args(items) -> dict[int, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        value, _, name = item.partition("=")
        try:
            out[int(value)] = name
        except ValueError:
            raise AtlassegError(f"--labels {item!r}: expected an integer label value, e.g. 1 or 1=anterior") from None
    return out


def format_rows(head: list[str], rows: list[list], *, left: int = 1) -> str:
    """A plain text table: the first ``left`` columns left-aligned, the others right-aligned, a rule under the head."""
    cells = [head] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(results, label_names: dict[int, str]) -> str:
    """Dice per target (rows) and label (columns), with the mean over labels and over targets."""
    scored = [r for r in results if r.dice is not None]
    if not scored:
        return "no target has ground truth: nothing to score"
    labels = sorted({label for r in scored for label in r.dice})
    heads = ["target"] + [label_names.get(v) or str(v) for v in labels] + ["mean"]
    rows = [[r.target_id] + [r.dice.get(v, math.nan) for v in labels] + [r.mean_dice] for r in scored]
    if len(rows) > 1:
        rows.append(["mean"] + [_nanmean([row[i] for row in rows]) for i in range(1, len(heads))])
    return format_rows(heads, [[row[0]] + [f"{v:.3f}" if not math.isnan(v) else "-" for v in row[1:]] for row in rows])


def _nanmean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _load(args):
    from .config import load_config
    from .manifest import load_manifest

    config = load_config(args.config, overrides=args.overrides)
    manifest = load_manifest(args.manifest)
    return config, manifest


def cmd_run(args) -> int:
    from .pipeline.run import run

    config, manifest = _load(args)
    out = Path(args.out or config.output.dir)
    start = time.perf_counter()
    results = run(config, manifest, out_dir=out, target_ids=args.targets, force=args.force)
    print(format_table(results, manifest.label_names))
    done = sum(r.error is None for r in results)
    print(f"\n{done} target(s) segmented in {time.perf_counter() - start:.1f} s; outputs in {out}/")
    return _exit_code(results, out, allow_degraded=args.allow_degraded)


def _exit_code(results, out: Path, *, allow_degraded: bool = False) -> int:
    """Exit code of a finished run: 2, with one line naming them, when some targets failed; else 3, with one
    line, when some are degraded (unless ``allow_degraded``)."""
    failed = [r.target_id for r in results if r.status == "failed"]
    degraded = [r.target_id for r in results if r.status == "degraded"]
    if failed:
        print(
            f"atlasseg: error: {len(failed)} of {len(results)} target(s) failed ({', '.join(failed)}); "
            f"reasons in {out / 'run.json'}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    if degraded and not allow_degraded:
        print(
            f"atlasseg: error: {len(degraded)} of {len(results)} target(s) degraded ({', '.join(degraded)}): they "
            f"lost more than selection.max_dropped_share of their atlases (reasons in {out / 'run.json'}); "
            "--allow-degraded accepts them",
            file=sys.stderr,
        )
        return EXIT_DEGRADED
    return EXIT_OK


def cmd_cache(args) -> int:
    from .cache import Cache, max_bytes, resolve_dir
    from .config import load_config

    config = load_config(args.config or "default")
    cache = Cache(resolve_dir(config.output.cache_dir if args.config else None), max_bytes=max_bytes(config))
    if args.action == "clear":
        print(f"removed {cache.clear()} cached registration(s) from {cache.root}")
        return 0
    if args.action == "prune":
        if args.max_gb is not None and not args.max_gb >= 0:
            raise AtlassegError(f"--max-gb {args.max_gb:g}: expected a size >= 0 (GiB)")
        damaged = cache.check()
        removed, freed = cache.evict(max_bytes=None if args.max_gb is None else int(args.max_gb * 2**30))
        print(
            f"removed {damaged} damaged and {removed} least recently used cached registration(s) "
            f"({freed / 2**20:.1f} MiB freed) from {cache.root}; {cache.size() / 2**20:.1f} MiB left"
        )
        return 0
    info = cache.info()
    cap = "no cap" if info["max_bytes"] is None else f"cap {info['max_bytes'] / 2**30:g} GiB (output.cache_max_gb)"
    print(f"registration cache: {info['dir']}")
    rows = [[stage, s["entries"], f"{s['bytes'] / 2**20:.1f}"] for stage, s in info["stages"].items()]
    rows.append(["total", sum(s["entries"] for s in info["stages"].values()), f"{info['bytes'] / 2**20:.1f}"])
    print(format_rows(["stage", "entries", "MiB"], rows))
    print(f"{cap}; least recently used entries are evicted after each target, or with `atlasseg cache prune`")
    return 0


def cmd_validate(args) -> int:
    from .pipeline.checks import check_inputs

    config, manifest = _load(args)
    check_inputs(manifest, config)
    print(
        f"ok: {args.config} and {manifest.path} ({len(manifest.atlases)} atlases, {len(manifest.targets)} targets, "
        f"k={config.selection.k}, fusion={config.fusion.method})"
    )
    return 0


def cmd_select(args) -> int:
    from .parallel import session
    from .pipeline.checks import check_inputs
    from .pipeline.jobs import rank_atlases
    from .selection import min_atlases

    config, manifest = _load(args)
    check_inputs(manifest, config)
    target = manifest.case(args.target)
    atlases = manifest.atlases_for(target)
    with session(config.parallel):
        ranking = rank_atlases(target, atlases, config)
    sel = config.selection
    region = {
        "none": "whole image",
        "near_labels": f"within {sel.roi_margin:g} mm of the atlas's labels",
        "labels": f"atlas labels' box + {sel.roi_margin:g} mm",
    }[sel.roi]
    if target.mask is not None:
        region += ", inside the target's mask"
    print(
        f"target {target.id}: {len(ranking.ranked)} atlases ranked by {sel.metric} on a {sel.grid_spacing:g} mm grid, "
        f"or the target's voxels where coarser ({region}; higher is better)"
    )
    rows = [
        [i, aid, f"{ranking.scores[aid]:.4f}", "yes" if aid in ranking.selected else "no"]
        for i, aid in enumerate(ranking.ranked, 1)
    ]
    print(format_rows(["rank", "atlas", sel.metric, "selected"], rows, left=2))
    threshold = "none" if sel.threshold is None else f"{sel.threshold:g}"
    print(
        f"\nselected {len(ranking.selected)} of {len(ranking.ranked)} (k={sel.k}, threshold {threshold}, "
        f"min_atlases {min_atlases(sel, len(atlases))}); "
        f"affine stage and scoring {ranking.seconds['affine_and_scoring']:.1f} s"
    )
    for item in ranking.dropped:
        print(f"dropped {item['atlas']} ({item['stage']}: {item['reason']})")
    return 0


def cmd_crossval(args) -> int:
    from .crossval import crossval, parse_ks, summary_table
    from .fusion.registry import METHODS
    from .parallel import session

    config, manifest = _load(args)
    out = Path(args.out or config.output.dir)
    with session(config.parallel):  # one Dask cluster (when configured) for every target
        document = crossval(config, manifest, ks=parse_ks(args.ks), methods=args.methods or METHODS, out_dir=out)
    head, rows = summary_table(document, manifest.label_names)
    scored = sum("settings" in r for r in document["targets"].values())
    print(f"leave-one-out over {len(manifest.atlases)} atlases ({scored} scored): mean Dice per label over the targets")
    print(format_rows(head, rows, left=2))
    print(
        f"\nfinished in {document['seconds_total']:.1f} s; {out / 'crossval.csv'} and {out / 'crossval.json'} written"
    )
    degraded = document["degraded_targets"]
    if degraded and not args.allow_degraded:
        print(
            f"atlasseg: error: {len(degraded)} of {len(document['targets'])} left-out atlas(es) degraded "
            f"({', '.join(degraded)}): they lost more than selection.max_dropped_share of the other atlases "
            f"(reasons in {out / 'crossval.json'}); --allow-degraded accepts them",
            file=sys.stderr,
        )
        return EXIT_DEGRADED
    return 0


def cmd_report(args) -> int:
    from .report import report_folder

    print(f"report written: {report_folder(args.out, args.manifest)}")
    return 0


def cmd_demo(args) -> int:
    from .config import load_config
    from .demo import make_demo_dataset
    from .manifest import load_manifest
    from .pipeline.run import run

    config = load_config("demo", overrides=args.overrides)
    out = Path(args.out)
    start = time.perf_counter()
    manifest_path = make_demo_dataset(out / "data", dim=args.dim, seed=args.seed)
    made = time.perf_counter()
    log.info("demo data (%dD) written to %s in %.1f s", args.dim, manifest_path.parent, made - start)
    manifest = load_manifest(manifest_path)
    results = run(config, manifest, out_dir=out / "results", force=args.force)
    print(format_table(results, manifest.label_names))
    print(
        f"\ndemo ({args.dim}D, {len(manifest.atlases)} atlases, {len(results)} targets) finished in "
        f"{time.perf_counter() - start:.1f} s; data in {manifest_path.parent}/, results in {out / 'results'}/"
    )
    return _exit_code(results, out / "results")


def cmd_register(args) -> int:
    from .api import register

    out = Path(args.out)
    record = register(
        args.fixed,
        args.moving,
        args.config,
        overrides=args.overrides,
        labels=args.labels,
        fixed_mask=args.fixed_mask,
        moving_mask=args.moving_mask,
        fixed_landmarks=args.fixed_landmarks,
        moving_landmarks=args.moving_landmarks,
        out_dir=out,
    ).record
    stages = record["registration"]
    for name, stage in stages.items():
        print(
            f"{name:9} metric {stage['metric']}: {stage['metric_before']:.4f} -> {stage['metric_after']:.4f}, "
            f"{stage['seconds']:.1f} s"
        )
    if "nonrigid" in stages:
        nonrigid = stages["nonrigid"]
        print(
            f"Jacobian in the target's foreground: {nonrigid['jacobian_min']:.3f} to {nonrigid['jacobian_max']:.3f}, "
            f"{nonrigid['folded_voxels']} folded voxel(s)"
        )
    print(f"registered in {record['seconds']:.1f} s; outputs in {out}/")
    return 0


def cmd_evaluate(args) -> int:
    from .api import evaluate
    from .config import EvaluationConfig
    from .evaluation import header, rows
    from .pipeline.outputs import write_json, write_table

    names = _label_args(args.labels) or {}
    metrics = EvaluationConfig().metrics
    scores = evaluate(args.prediction, args.truth, labels=sorted(names), metrics=metrics)
    head = header(metrics)[1:]
    table = [row[1:] for row in rows("", scores, names, metrics)]
    cells = [head] + [
        [str(c) if not isinstance(c, float) else ("-" if math.isnan(c) else f"{c:.4f}") for c in row] for row in table
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    for row in cells:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    if args.out:
        out = Path(args.out)
        case_id = args.case_id or _case_id(Path(args.prediction))
        write_table(out / "metrics.csv", header(metrics), rows(case_id, scores, names, metrics))
        document = {
            "id": case_id,
            "prediction": str(args.prediction),
            "truth": str(args.truth),
            "scores": {str(v): s for v, s in scores.items()},
        }
        write_json(out / "metrics.json", document)
        print(f"\nwritten {out / 'metrics.csv'} and {out / 'metrics.json'}")
    return 0


def _case_id(prediction: Path) -> str:
    """What names a scored segmentation: its file name without the image extension, or the folder of a run's
    ``<target>/segmentation.<format>``."""
    from .dataset import IMAGE_SUFFIXES

    name = prediction.name
    stem = next((name[: -len(s)] for s in IMAGE_SUFFIXES if name.lower().endswith(s)), prediction.stem)
    return prediction.resolve().parent.name if stem == "segmentation" else stem


def _set_up_logging(args) -> None:
    """Console: warnings (-q), progress (default) or per-registration details (-v); ``--log-file`` gets it all.
    Where logging is already set up (atlasseg called from a program that configured it), no console handler
    is added: records go to that program's handlers."""
    from . import parallel

    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    handlers = []
    if not logging.getLogger().handlers:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("atlasseg: %(message)s"))
        console.setLevel(level)
        handlers.append(console)
    if args.log_file:
        try:
            handler = logging.FileHandler(args.log_file, encoding="utf-8")
        except OSError as err:
            print(f"atlasseg: error: --log-file {args.log_file}: cannot write ({err.strerror or err})", file=sys.stderr)
            raise SystemExit(2) from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.DEBUG)
        handlers.append(handler)
    log.handlers[:] = handlers
    log.setLevel(logging.DEBUG if args.log_file else level)
    parallel.progress_bars = None if not args.quiet else False


def cmd_manifest_msd(args) -> int:
    from .dataset import from_msd

    return _imported(
        from_msd(args.dataset_json, out=args.out, targets=args.targets, channel=args.channel, force=args.force)
    )


def cmd_manifest_folders(args) -> int:
    from .dataset import from_folders

    return _imported(
        from_folders(
            args.images,
            args.labels,
            out=args.out,
            targets=args.targets,
            target_labels=args.target_labels,
            channel=args.channel,
            label_names=_label_args(args.names),
            force=args.force,
        )
    )


def cmd_manifest_bids(args) -> int:
    from .dataset import from_bids

    return _imported(
        from_bids(
            args.bids_dir,
            out=args.out,
            labels=args.labels,
            suffix=args.suffix,
            datatype=args.datatype,
            desc=args.desc,
            targets=tuple(args.targets),
            channel=args.channel,
            force=args.force,
        )
    )


def _imported(imported) -> int:
    manifest = imported.manifest
    truth = sum(t.labels is not None for t in manifest.targets)
    names = ", ".join(f"{v}={n}" for v, n in manifest.label_names.items()) or "none named"
    print(
        f"wrote {manifest.path}: {len(manifest.atlases)} atlases, {len(manifest.targets)} targets "
        f"({truth} with ground truth); labels {names}; {imported.channels}; every file checked"
    )
    print(f"next: atlasseg validate default --manifest {manifest.path}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _set_up_logging(args)
    try:
        return args.func(args)
    except AtlassegError as err:
        if args.debug:
            raise
        print(f"atlasseg: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("atlasseg: interrupted (run the same command again to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
