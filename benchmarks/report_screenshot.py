"""The QC report in a real browser: headless Chromium screenshots of index.html.

    python benchmarks/report_screenshot.py [OUT_DIR] [--demo {2,3}] [--hippocampus]
                                           [--name run] [--height 2000] [--open] [--work DIR]

OUT_DIR: a finished run's output folder (its report is rewritten from run.json when index.html is
missing). --demo DIM: run `atlasseg demo` (demo config) into --work. --hippocampus: one target and
four atlases of ../shared/data/msd_hippocampus (default config) into --work. Each page is shot at a
1280 px wide window of --height px; screenshots go to benchmarks/results/report_<name>.png (name:
--name, demo2d/demo3d, hippocampus), and the
seconds spent rewriting each run's report are printed. --open shoots a copy of the page (index_open.html)
with every collapsible section open.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS
from hippocampus import DATA, write_manifest

from atlasseg.config import load_config
from atlasseg.demo import make_demo_dataset
from atlasseg.manifest import load_manifest
from atlasseg.pipeline import run
from atlasseg.report import read_run, report_folder, write_report

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def finished_run(out: Path, manifest_path: Path, preset: str) -> tuple[Path, float]:
    """Run ``preset`` on the manifest into ``out`` (which writes the report), then time rewriting the report."""
    manifest = load_manifest(manifest_path)
    run(load_config(preset), manifest, out_dir=out, force=True)
    start = time.perf_counter()
    write_report(out, read_run(out), manifest)
    return out, time.perf_counter() - start


def screenshot(page: Path, png: Path, *, height: int) -> None:
    browser = next((b for b in map(shutil.which, CHROMIUM) if b), None)
    if browser is None:
        raise SystemExit(f"no Chromium found (tried {', '.join(CHROMIUM)})")
    png.parent.mkdir(parents=True, exist_ok=True)
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--screenshot={png}",
        f"--window-size=1280,{height}",
        page.resolve().as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    if not png.exists():
        raise SystemExit(f"{browser} wrote no screenshot {png}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, help="output folder of a finished run")
    parser.add_argument("--demo", type=int, choices=(2, 3), help="run the demo of this dimension first")
    parser.add_argument("--hippocampus", action="store_true", help="run 1 hippocampus target with 4 atlases first")
    parser.add_argument("--name", default="run", help="screenshot name of OUT_DIR's page (default: %(default)s)")
    parser.add_argument("--height", type=int, default=2000, help="window height, px (default: %(default)s)")
    parser.add_argument("--open", action="store_true", help="open every <details> section")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    if not (args.out or args.demo or args.hippocampus):
        parser.error("give OUT_DIR, --demo or --hippocampus")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        pages = {}
        if args.out:
            if not (args.out / "index.html").exists():
                report_folder(args.out)
            pages[args.name] = args.out / "index.html"
        if args.demo:
            out, seconds = finished_run(
                work / f"demo{args.demo}d" / "results",
                make_demo_dataset(work / f"demo{args.demo}d" / "data", dim=args.demo),
                "demo",
            )
            print(f"demo {args.demo}D: report written in {seconds:.2f} s")
            pages[f"demo{args.demo}d"] = out / "index.html"
        if args.hippocampus:
            if not DATA.is_dir():
                print(f"no data at {DATA}", file=sys.stderr)
                return 1
            (work / "hippocampus").mkdir(parents=True, exist_ok=True)
            manifest = write_manifest(work / "hippocampus", cases=5, targets=1, offset=0)
            out, seconds = finished_run(work / "hippocampus" / "results", manifest, "default")
            print(f"hippocampus: report written in {seconds:.2f} s")
            pages["hippocampus"] = out / "index.html"
        for name, page in pages.items():
            if args.open:
                opened = page.with_name("index_open.html")
                opened.write_text(
                    page.read_text(encoding="utf-8").replace("<details>", "<details open>"), encoding="utf-8"
                )
                page = opened
            png = RESULTS / f"report_{name}.png"
            screenshot(page, png, height=args.height)
            print(f"{page} -> {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
