import math

import numpy as np
import pytest
import SimpleITK as sitk

from atlasseg.errors import ImageError
from atlasseg.evaluation import dice, dice_per_label, evaluate, mean_score


def image(array) -> sitk.Image:
    return sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))


def test_dice_of_known_overlap_is_exact():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :4] = True  # 40 voxels
    b[:, 2:8] = True  # 60 voxels, 20 shared
    assert dice(a, b) == 2 * 20 / 100
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0


def test_dice_per_label_and_missing_labels():
    truth = np.zeros((8, 8), np.uint8)
    pred = np.zeros((8, 8), np.uint8)
    truth[:4] = 1
    pred[:2] = 1  # label 1: 16 vs 32 voxels, 16 shared → 2/3
    truth[6:, :] = 2  # label 2 only in truth → 0
    scores = dice_per_label(image(pred), image(truth), labels=[1, 2, 3])
    assert scores[1] == pytest.approx(2 * 16 / 48)
    assert scores[2] == 0.0
    assert math.isnan(scores[3])  # absent from both: nothing to score
    assert mean_score(scores) == pytest.approx((2 * 16 / 48) / 2)
    assert sorted(dice_per_label(image(pred), image(truth))) == [1, 2]


def test_different_grids_are_refused():
    a = image(np.ones((4, 4)))
    b = image(np.ones((4, 4)))
    b.SetSpacing((2.0, 1.0))
    with pytest.raises(ImageError, match="different grids"):
        dice_per_label(a, b)


def ball(dim: int, size: int, centre, radius: float) -> np.ndarray:
    grid = np.indices((size,) * dim).astype(float)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


@pytest.mark.parametrize("dim", [2, 3])
def test_surface_distances_of_offset_balls_equal_the_offset(dim):
    """Two balls of equal radius shifted by 4 voxels along one axis (2.5 mm voxels there): HD95 ≈ 10 mm."""
    size, offset = 40, 4
    a = ball(dim, size, [20] * dim, 10)
    b = ball(dim, size, [20 + offset] + [20] * (dim - 1), 10)
    spacing = [2.5] + [1.0] * (dim - 1)  # numpy axis order: the shift is along the 2.5 mm axis
    pred = sitk.GetImageFromArray(a.astype(np.uint8))
    true = sitk.GetImageFromArray(b.astype(np.uint8))
    for image in (pred, true):
        image.SetSpacing(spacing[::-1])
    scores = evaluate(pred, true, metrics=("hd95", "assd", "jaccard", "volume_difference"))[1]
    assert abs(scores["hd95"] - offset * 2.5) <= 2.5  # within a voxel of the offset
    assert 0 < scores["assd"] < scores["hd95"]
    assert scores["jaccard"] == pytest.approx((a & b).sum() / (a | b).sum())
    assert scores["volume_difference"] == pytest.approx((a.sum() - b.sum()) * 2.5 / 1000)


def test_identical_masks_have_zero_distance_and_missing_labels_are_documented():
    a = np.zeros((12, 12), np.uint8)
    a[3:8, 3:8] = 1
    b = a.copy()
    b[10, 10] = 2  # label 2 only in the truth
    scores = evaluate(image(a), image(b), labels=[1, 2, 3], metrics=("dice", "hd95", "assd", "volume_difference"))
    assert scores[1] == {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "volume_difference": 0.0}
    assert scores[2]["dice"] == 0.0 and math.isnan(scores[2]["hd95"]) and math.isnan(scores[2]["assd"])
    assert all(math.isnan(v) for v in scores[3].values())
