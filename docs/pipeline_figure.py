"""Draw docs/pipeline.png, the README's picture of the pipeline, from the 2D demo data.

    python docs/pipeline_figure.py [--out docs/pipeline.png]

Three demo atlases are registered onto a demo target with atlasseg.register (their labels carried
across), then fused with atlasseg.segment; the picture shows each step.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

import atlasseg  # noqa: E402
from atlasseg.demo import make_demo_dataset  # noqa: E402
from atlasseg.manifest import load_manifest  # noqa: E402

COLOURS = ListedColormap(["none", "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2"])
SETTINGS = ["parallel.n_jobs=1", "selection.k=all"]


def show(ax, image: sitk.Image, labels: sitk.Image | None, title: str, *, outline: sitk.Image | None = None) -> None:
    """``image`` in grey with ``labels`` over it and ``outline``'s label borders in white, the demo's last axis up."""
    aspect = image.GetSpacing()[1] / image.GetSpacing()[0]  # square millimetres, whatever the voxels
    ax.imshow(sitk.GetArrayFromImage(image), cmap="gray", origin="lower", aspect=aspect)
    if labels is not None:
        ax.imshow(
            np.ma.masked_equal(sitk.GetArrayFromImage(labels), 0),
            cmap=COLOURS,
            vmin=0,
            vmax=5,
            alpha=0.55,
            origin="lower",
            interpolation="nearest",
            aspect=aspect,
        )
    if outline is not None:
        ax.contour(sitk.GetArrayFromImage(outline), levels=np.arange(0.5, 5.5), colors="white", linewidths=0.7)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("pipeline.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = load_manifest(make_demo_dataset(tmp, dim=2, n_atlases=3, n_targets=1, seed=4, size=96))
        target = manifest.targets[0]
        fixed, truth = sitk.ReadImage(str(target.image)), sitk.ReadImage(str(target.labels))
        atlases = [(sitk.ReadImage(str(a.image)), sitk.ReadImage(str(a.labels))) for a in manifest.atlases]
        carried = [
            atlasseg.register(fixed, image, "demo", labels=labels, overrides=SETTINGS).warped_labels
            for image, labels in atlases
        ]
        fused, record = atlasseg.segment(
            fixed, atlases, "demo", overrides=SETTINGS, truth=truth, label_names=manifest.label_names
        )
    fig, axes = plt.subplots(2, 4, figsize=(8.4, 4.6), constrained_layout=True)
    for i, (image, labels) in enumerate(atlases):
        show(axes[0, i], image, labels, f"atlas {i + 1}: image + labels")
    show(axes[0, 3], fixed, None, "target: unlabelled image")
    for i, labels in enumerate(carried):
        show(axes[1, i], fixed, labels, f"atlas {i + 1} registered,\nlabels carried onto the target")
    show(axes[1, 3], fixed, fused, f"fused (mean Dice {record['mean_dice']:.3f});\nwhite: ground truth", outline=truth)
    fig.suptitle(
        "register every atlas onto the target → carry its labels across → fuse them by a vote per voxel", fontsize=10
    )
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
