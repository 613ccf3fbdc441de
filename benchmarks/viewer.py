"""What the QC report's interactive view costs, on the shared datasets.

    python benchmarks/viewer.py [--atlases 5] [--repeats 3] [--preset fast] [--screenshot PNG]

Per dataset (first case the target, the next --atlases the atlases, full resolution): the preset is run
once to fill a temporary registration cache, then --repeats times with ``output.report`` off and on,
alternately, each into a new folder (registrations from the cache). Printed: the medians of the target's
fusion + output seconds (the disagreement is counted during fusion and written with the outputs) off and
on, and their ratio; the seconds to write the report and the size of the target's ``viewer.js``; and, with
Chromium, the seconds from opening the view to its first picture. --screenshot saves the view of the
last dataset (disagreement and segmentation shown) as a PNG. Results: benchmarks/results/viewer.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import write_json  # noqa: E402
from browser import Browser, find_chromium  # noqa: E402
from fusion import SHARED  # noqa: E402

from atlasseg.config import load_config  # noqa: E402
from atlasseg.dataset import from_folders  # noqa: E402
from atlasseg.pipeline import run  # noqa: E402
from atlasseg.report import read_run, write_report  # noqa: E402

DATASETS = {
    "hippocampus": ("msd_hippocampus", {1: "anterior", 2: "posterior"}),
    "cardiac": ("mscmrseg19_bssfp", {1: "LV myo", 2: "LV blood", 3: "RV blood"}),
    "abdomen": ("chaos_mr_t2spir", {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}),
}


def manifest(folder: Path, name: str, atlases: int):
    data, names = DATASETS[name]
    cases = sorted(p.name for p in (SHARED / data / "images").glob("*.nii.gz"))[: atlases + 1]
    for sub in ("images", "labels", "targets", "truth"):
        (folder / sub).mkdir(parents=True)
    for i, case in enumerate(cases):
        kind = ("targets", "truth") if i == 0 else ("images", "labels")
        for where, source in zip(kind, ("images", "labels")):
            os.symlink(SHARED / data / source / case, folder / where / case)
    return from_folders(
        folder / "images",
        folder / "labels",
        out=folder / "m.yaml",
        targets=folder / "targets",
        target_labels=folder / "truth",
        label_names=names,
    ).manifest


def open_view(page: Path, screenshot: Path | None) -> float:
    with Browser(find_chromium(), height=900) as browser:
        browser.open(page)
        start = time.perf_counter()
        browser.evaluate("document.querySelector('.viewer .open').click()")
        browser.wait_for("document.querySelector('.viewer').dataset.state === 'ready'")
        browser.screenshot(".viewer .canvas")
        seconds = time.perf_counter() - start
        if screenshot is not None:
            browser.evaluate(
                "(() => { for (const [layer, value] of [['segmentation', 45], ['disagreement', 80]]) {"
                " const s = document.querySelector(`.viewer input.opacity[data-layer=${layer}]`);"
                " s.value = value; s.dispatchEvent(new Event('input')); } })()"
            )
            screenshot.write_bytes(browser.screenshot(".viewer"))
        if browser.errors:
            raise SystemExit(f"console errors: {browser.errors}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atlases", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--screenshot", type=Path, help="PNG of the last dataset's view")
    args = parser.parse_args()
    browser = find_chromium() is not None
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ATLASSEG_CACHE_DIR"] = str(Path(tmp) / "cache")
        for name in args.datasets:
            folder = Path(tmp) / name
            m = manifest(folder, name, args.atlases)
            target = m.targets[0].id
            run(load_config(args.preset, overrides=["output.report=false"]), m, out_dir=folder / "warm")
            seconds = {False: [], True: []}
            for i in range(args.repeats):
                for report in (False, True):
                    config = load_config(args.preset, overrides=[f"output.report={str(report).lower()}"])
                    record = run(config, m, out_dir=folder / f"run{i}{report}")[0].record
                    seconds[report].append(record["seconds"]["fusion"] + record["seconds"]["output"])
            out = folder / f"run{args.repeats - 1}True"
            start = time.perf_counter()
            write_report(out, read_run(out), m)
            report_s = time.perf_counter() - start
            off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
            rows[name] = {
                "fusion_output_s_off": off,
                "fusion_output_s_on": on,
                "ratio": on / off,
                "report_s": report_s,
                "viewer_js_mb": (out / target / "viewer.js").stat().st_size / 2**20,
                "open_view_s": open_view(out / "index.html", args.screenshot if name == args.datasets[-1] else None)
                if browser
                else None,
            }
    print(f"{args.preset}, {args.atlases} atlases, 1 target, medians of {args.repeats} (shared machine)")
    print(
        f"{'dataset':12} {'fusion+output s: off':>21} {'on':>6} {'ratio':>6} {'report s':>9} {'viewer.js MB':>13} "
        f"{'open view s':>12}"
    )
    for name, r in rows.items():
        view = "–" if r["open_view_s"] is None else f"{r['open_view_s']:.2f}"
        print(
            f"{name:12} {r['fusion_output_s_off']:21.3f} {r['fusion_output_s_on']:6.3f} {r['ratio']:6.2f} "
            f"{r['report_s']:9.2f} {r['viewer_js_mb']:13.2f} {view:>12}"
        )
    print(f"results: {write_json('viewer', {'preset': args.preset, 'atlases': args.atlases, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
