"""FireANTs for benchmarks/registration.py, in a process of its own (FireANTs pins SimpleITK 2.2.1, atlasseg needs ≥ 2.3).

    FIREANTS_PYTHON/python fireants_worker.py THREADS SEED

Run under the Python of an environment with torch and fireants (not atlasseg). Writes one JSON line of versions
to stdout, then for each JSON request line on stdin ({"fixed", "moving", "labels", "out"}: NIfTI paths) registers
moving to fixed — FireANTs' quick start: AffineRegistration (scales 4, 2, 1; 200, 100, 50 iterations; Adam,
learning rate 3e-4, as 3e-3 diverges on small crops; CC kernel 5; from the images' centres aligned, as
atlasseg's ``geometry`` start: from the identity its small steps never crossed the centimetres between two
cardiac scans' positions, pair Dice 0.003–0.34) then GreedyRegistration (compositive;
200, 100, 25 iterations; Adam 0.5; CC kernel 5; gradient smoothing σ 1) initialised by the affine — warps the
labels with nearest neighbour onto the fixed grid, writes them to "out" and answers {"ok": true} or
{"error": "..."}. FireANTs' own prints go to stderr.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    threads, seed = int(sys.argv[1]), int(sys.argv[2])
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared machine
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the libraries print lands on stderr, never in the protocol

    from importlib.metadata import version

    import fireants.registration.greedy as greedy_module
    import SimpleITK as sitk
    import torch
    from fireants.io import BatchedImages, Image
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration

    torch.set_num_threads(threads)

    def answer(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    def register(request: dict) -> None:
        torch.manual_seed(seed)
        fixed_image = sitk.ReadImage(request["fixed"], sitk.sitkFloat32)
        fixed = BatchedImages([Image(fixed_image, device="cpu")])
        moving_image = sitk.ReadImage(request["moving"], sitk.sitkFloat32)
        moving = BatchedImages([Image(moving_image, device="cpu")])
        labels = BatchedImages([Image(sitk.ReadImage(request["labels"], sitk.sitkFloat32), device="cpu")])
        labels.interpolate_mode = "nearest"
        # GreedyRegistration sizes its warp max(size / scale, MIN_IMG_SIZE = 32) per axis, also at scale 1, where it
        # then compares a 32-voxel warped image with a shorter fixed axis and raises (fireants 1.5.0): the floor is
        # lowered to the shortest axis of the pair, which leaves it as it is for images of ≥ 32 voxels a side.
        greedy_module.MIN_IMG_SIZE = min(32, *fixed_image.GetSize(), *moving_image.GetSize())
        affine = AffineRegistration(
            [4, 2, 1],
            [200, 100, 50],
            fixed,
            moving,
            optimizer="Adam",
            optimizer_lr=3e-4,
            cc_kernel_size=5,
            init_rigid="cof",  # the images' centres aligned first, as atlasseg's geometry initialisation
            progress_bar=False,
        )
        affine.optimize()
        greedy = GreedyRegistration(
            scales=[4, 2, 1],
            iterations=[200, 100, 25],
            fixed_images=fixed,
            moving_images=moving,
            cc_kernel_size=5,
            deformation_type="compositive",
            smooth_grad_sigma=1,
            optimizer="adam",
            optimizer_lr=0.5,
            init_affine=affine.get_affine_matrix().detach(),
            progress_bar=False,
        )
        greedy.optimize()
        with torch.no_grad():
            warped = greedy.evaluate(fixed, labels)[0, 0].cpu().numpy()
        out = sitk.GetImageFromArray(warped.round().astype("int16"))
        out.CopyInformation(fixed_image)
        sitk.WriteImage(out, request["out"])

    answer({"fireants": version("fireants"), "torch": torch.__version__, "SimpleITK": sitk.Version_VersionString()})
    for line in sys.stdin:
        try:
            register(json.loads(line))
            answer({"ok": True})
        except Exception as err:  # noqa: BLE001 - reported to the benchmark, which scores it as a failure
            answer({"error": f"{type(err).__name__}: {err}".splitlines()[0][:200]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
