import math

import numpy as np
import pytest
import SimpleITK as sitk

from atlasseg.errors import ImageError
from atlasseg.evaluation import dice, dice_per_label, mean_score


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
