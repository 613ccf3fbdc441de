"""ANTs applies atlasseg's transforms: one real pair of MSD hippocampus cases (../shared/data/msd_hippocampus).

    python benchmarks/interop.py [--fixed hippocampus_001] [--moving hippocampus_003] [--set section.key=value ...]

`atlasseg register` (pipeline.register_files, the default config's registration: affine + demons, with
`--set` overrides) maps the moving case onto the fixed one and writes transform.h5 (one flat ITK composite:
affine + displacement field) and displacement.nii.gz (the same mapping sampled on the fixed grid). ANTs
(antspyx, `ants.apply_transforms`) then applies each file, as written, to the moving labels. Prints, per
label, the Dice between the ANTs-applied and the atlasseg-applied labels (ANTs nearestNeighbor against
atlasseg's nearest, ANTs genericLabel against atlasseg's linear: both interpolate each label's indicator
linearly and take the arg-max) and the voxels that differ; the Dice against the fixed case's own labels is
printed for scale. Writes benchmarks/results/interop.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from _common import write_json

from atlasseg.config import load_config
from atlasseg.errors import AtlassegError
from atlasseg.evaluation import dice_per_label
from atlasseg.imageio import read_image, read_labels
from atlasseg.pipeline import register_files
from atlasseg.propagation import propagate_labels

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd_hippocampus"
LABELS = (1, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed", default="hippocampus_001")
    parser.add_argument("--moving", default="hippocampus_003")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    try:
        import ants
    except ImportError:
        print("antspyx is not installed (pip install 'atlasseg[bench]')", file=sys.stderr)
        return 1
    fixed_path, moving_path = (DATA / "images" / f"{case}.nii.gz" for case in (args.fixed, args.moving))
    labels_path = DATA / "labels" / f"{args.moving}.nii.gz"
    if not fixed_path.is_file() or not moving_path.is_file():
        print(f"no data at {DATA}", file=sys.stderr)
        return 1
    config = load_config(overrides=args.overrides).registration
    fixed, moving_labels = read_image(fixed_path), read_labels(labels_path)
    truth = read_labels(DATA / "labels" / f"{args.fixed}.nii.gz")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        try:
            register_files(fixed_path, moving_path, config, out_dir=out, labels_path=labels_path)
        except AtlassegError as err:
            print(f"atlasseg register failed: {err}", file=sys.stderr)
            return 1
        composite = sitk.ReadTransform(str(out / "transform.h5"))
        parts = [composite.GetNthTransform(i).GetName() for i in range(composite.GetNumberOfTransforms())]
        ours = {
            "nearest": read_labels(out / "warped_labels.nii.gz"),
            "linear": propagate_labels(moving_labels, composite, fixed, interpolator="linear"),
        }
        ants_fixed, ants_labels = ants.image_read(str(fixed_path)), ants.image_read(str(labels_path))

        def by_ants(transform: str, interpolator: str) -> sitk.Image:
            warped = ants.apply_transforms(
                ants_fixed, ants_labels, transformlist=[str(out / transform)], interpolator=interpolator
            )
            image = sitk.GetImageFromArray(warped.numpy().T.astype(np.uint8))  # ANTs arrays are in index order
            image.CopyInformation(fixed)
            return image

        comparisons = [
            ("transform.h5", "nearestNeighbor", "nearest"),
            ("transform.h5", "genericLabel", "linear"),
            ("displacement.nii.gz", "nearestNeighbor", "nearest"),
        ]
        rows = []
        for transform, interpolator, mine in comparisons:
            theirs = by_ants(transform, interpolator)
            dice = dice_per_label(theirs, ours[mine], labels=list(LABELS))
            differ = int(np.count_nonzero(sitk.GetArrayViewFromImage(theirs) != sitk.GetArrayViewFromImage(ours[mine])))
            rows.append(
                {"file": transform, "ants": interpolator, "atlasseg": mine, "dice": dice, "voxels_differ": differ}
            )
    scale = dice_per_label(ours["nearest"], truth, labels=list(LABELS))
    print(
        f"{args.moving} -> {args.fixed}: transform.h5 holds {' + '.join(parts)}; "
        f"atlasseg's warped labels vs the fixed case's own: Dice {', '.join(f'{scale[v]:.3f}' for v in LABELS)}"
    )
    print(
        f"{'file':20} {'ANTs':16} {'atlasseg':9} "
        + " ".join(f"{'Dice ' + str(v):>8}" for v in LABELS)
        + "  voxels differ"
    )
    for row in rows:
        print(
            f"{row['file']:20} {row['ants']:16} {row['atlasseg']:9} "
            + " ".join(f"{row['dice'][v]:8.4f}" for v in LABELS)
            + f"  {row['voxels_differ']:>13}"
        )
    path = write_json(
        "interop",
        {
            "fixed": args.fixed,
            "moving": args.moving,
            "overrides": args.overrides,
            "transform_parts": parts,
            "dice_vs_truth": scale,
            "comparisons": rows,
        },
    )
    print(f"written {path}")
    return 0 if all(min(row["dice"].values()) >= 0.99 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
