"""Atlas selection: scores (higher is better), regions of interest, top k / threshold / floor."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import _with_geometry, phantom, rigid, texture, warp

from atlasseg.config import SelectionConfig
from atlasseg.selection import label_box, min_atlases, near_labels, rank, score_atlas, select
from atlasseg.similarity import SIMILARITIES, mutual_information, ncc, negative_mse, negative_nmse


@pytest.mark.parametrize("metric", ["ncc", "mi", "mse", "nmse"])
def test_an_identical_atlas_ranks_first_for_every_metric(dim, metric):
    target, _ = phantom(dim=dim, size=32)
    rng = np.random.default_rng(0)
    noisy = sitk.GetImageFromArray(
        sitk.GetArrayFromImage(target) + rng.normal(0, 0.3, target.GetSize()[::-1]).astype(np.float32)
    )
    noisy.CopyInformation(target)
    atlases = {
        "b_rotated": warp(target, rigid(dim, angle_deg=15.0, shift=(6.0, -4.0, 3.0))),
        "c_noisy": noisy,
        "a_same": target,
        "d_unrelated": texture(dim=dim, size=32, seed=1)[0],
    }
    config = SelectionConfig(metric=metric, grid_spacing=4.0, roi="none")
    scores = {
        name: score_atlas(target, image, sitk.Transform(dim, sitk.sitkIdentity), config=config)
        for name, image in atlases.items()
    }
    assert rank(scores)[0] == "a_same"
    assert all(scores["a_same"] > s for name, s in scores.items() if name != "a_same")
    assert scores["b_rotated"] > scores["d_unrelated"]


def test_similarities_are_scores_higher_for_alike():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=500)
    b = a + rng.normal(0, 0.1, size=500)
    c = rng.uniform(size=500)
    for name, measure in SIMILARITIES.items():
        assert measure(a, a) > measure(a, b) > measure(a, c), name
    assert negative_mse(a, a) == 0.0 and ncc(a, a) == pytest.approx(1.0)
    assert mutual_information(a, np.zeros(500)) == 0.0
    # MI of a variable with itself is its entropy: 32 equally filled bins give log 32.
    assert mutual_information(np.arange(3200.0), np.arange(3200.0)) == pytest.approx(math.log(32))


def test_nmse_is_blind_to_a_linear_intensity_change_of_either_image_and_mse_is_not():
    rng = np.random.default_rng(2)
    a = rng.uniform(size=400)
    b = a + rng.normal(0, 0.2, size=400)
    reference = negative_nmse(a, b)
    for x, y in ((3.0 * a + 7.0, b), (a, 0.01 * b - 2.0), (5.0 * a, 5.0 * b + 1.0)):
        assert negative_nmse(x, y) == pytest.approx(reference, rel=1e-12)
        assert abs(negative_mse(x, y) - negative_mse(a, b)) > 0.1
    assert negative_nmse(a, b) == pytest.approx(2 * ncc(a, b) - 2)  # standardised on the same samples
    assert negative_nmse(a, 2.0 * a + 1.0) == pytest.approx(0.0, abs=1e-12)
    assert negative_nmse(a, np.ones(400)) == pytest.approx(-1.0)  # a constant standardises to zeros


def test_label_box_is_the_mapped_labels_bounding_box_plus_the_margin_in_mm():
    array = np.zeros((40, 50), np.uint8)
    array[20:30, 10:15] = 3
    labels = _with_geometry(array, 1.0, (0.0, 0.0))
    labels.SetSpacing((1.0, 2.0))  # rows 2 mm apart
    shift = sitk.TranslationTransform(2, (5.0, 0.0))  # grid point x ↦ label point x + 5 mm
    box = label_box(labels, shift, labels, margin=4.0)
    rows, cols = np.nonzero(box)
    assert (rows.min(), rows.max()) == (18, 31)  # ±4 mm is ±2 rows of 2 mm
    assert (cols.min(), cols.max()) == (1, 13)  # columns 10–14 moved to 5–9, ±4 columns
    assert box.sum() == 14 * 13
    assert not label_box(labels, sitk.TranslationTransform(2, (500.0, 0.0)), labels, margin=4.0).any()


def test_near_labels_is_within_the_margin_in_mm_of_the_mapped_labels():
    array = np.zeros((40, 50), np.uint8)
    array[20, 10] = 3
    labels = _with_geometry(array, 1.0, (0.0, 0.0))
    labels.SetSpacing((1.0, 2.0))  # rows 2 mm apart
    shift = sitk.TranslationTransform(2, (5.0, 0.0))  # grid point x ↦ label point x + 5 mm
    region = near_labels(labels, shift, labels, margin=4.0)
    rows, cols = np.nonzero(region)
    distance = np.hypot((rows - 20) * 2.0, (cols - 5) * 1.0)  # mm from the voxel the label moved to
    assert distance.max() <= 4.0
    assert region.sum() == sum(1 for r in range(40) for c in range(50) if math.hypot((r - 20) * 2.0, c - 5) <= 4.0)
    assert np.argwhere(near_labels(labels, shift, labels, margin=0.0)).tolist() == [[20, 5]]
    assert not near_labels(labels, sitk.TranslationTransform(2, (500.0, 0.0)), labels, margin=4.0).any()


def test_near_labels_scores_where_the_labels_are_not_their_whole_box():
    """A thin diagonal structure: atlas ``near`` matches the target along it, atlas ``box``
    over the rest of its bounding box; only ``near_labels`` prefers the first."""
    target, _ = texture(dim=2, size=64, seed=3)
    t = sitk.GetArrayFromImage(target)
    other = sitk.GetArrayFromImage(texture(dim=2, size=64, seed=4)[0])
    rows, cols = np.indices(t.shape)
    line = (np.abs(rows - cols) <= 1) & (rows >= 12) & (rows < 52)
    close = np.abs(rows - cols) <= 4
    near = _with_geometry(np.where(close, t, other), 2.0, None)
    box = _with_geometry(np.where(close, other, t), 2.0, None)
    labels = _with_geometry(line.astype(np.uint8), 2.0, None)
    identity = sitk.Transform(2, sitk.sitkIdentity)
    for roi, best in (("near_labels", "near"), ("labels", "box")):
        config = SelectionConfig(grid_spacing=2.0, roi=roi, roi_margin=2.0)
        scores = {
            name: score_atlas(target, image, identity, config=config, labels=labels)
            for name, image in (("near", near), ("box", box))
        }
        assert rank(scores)[0] == best, roi


def _local_match_case():
    """A textured target with a labelled square in the middle; atlas ``near`` equals the target
    around the square only, atlas ``far`` everywhere but there."""
    target, _ = texture(dim=2, size=64, seed=3)
    t = sitk.GetArrayFromImage(target)
    other = sitk.GetArrayFromImage(texture(dim=2, size=64, seed=4)[0])
    inside = np.zeros(t.shape, bool)
    inside[22:42, 22:42] = True
    square = np.zeros(t.shape, np.uint8)
    square[26:38, 26:38] = 1
    near = _with_geometry(np.where(inside, t, other), 2.0, None)
    far = _with_geometry(np.where(inside, other, t), 2.0, None)
    return target, near, far, _with_geometry(square, 2.0, None), _with_geometry(inside.astype(np.uint8), 2.0, None)


@pytest.mark.parametrize("region", ["none", "labels", "near_labels", "mask"])
def test_a_region_of_interest_ranks_the_locally_matching_atlas_first(region):
    target, near, far, labels, mask = _local_match_case()
    config = SelectionConfig(grid_spacing=2.0, roi="none" if region == "mask" else region, roi_margin=8.0)
    identity = sitk.Transform(2, sitk.sitkIdentity)
    scores = {
        name: score_atlas(
            target, image, identity, config=config, labels=labels, mask=mask if region == "mask" else None
        )
        for name, image in (("near", near), ("far", far))
    }
    assert rank(scores)[0] == ("far" if region == "none" else "near")


@pytest.mark.parametrize("roi", ["labels", "near_labels"])
def test_an_atlas_whose_labels_miss_the_target_ranks_last(roi):
    target, near, _, labels, _ = _local_match_case()
    away = sitk.TranslationTransform(2, (1000.0, 0.0))
    score = score_atlas(target, near, away, config=SelectionConfig(roi=roi), labels=labels)
    assert score == -math.inf
    assert rank({"x": score, "y": -5.0}) == ["y", "x"]
    with pytest.raises(ValueError, match="label map"):
        score_atlas(target, near, away, config=SelectionConfig(roi=roi))


SCORES = {"a": 0.9, "b": 0.5, "c": 0.7, "d": 0.1}


@pytest.mark.parametrize(
    "settings, kept",
    [
        ({}, ["a", "c", "b", "d"]),
        ({"k": 2}, ["a", "c"]),
        ({"threshold": 0.6, "min_atlases": 1}, ["a", "c"]),
        ({"k": 1, "threshold": 0.6}, ["a"]),
        ({"threshold": 0.95, "min_atlases": 1}, ["a"]),  # none reach it: the floor of 1
        ({"threshold": 0.95, "min_atlases": 3}, ["a", "c", "b"]),
        ({"k": 3, "threshold": 0.6, "min_atlases": 3}, ["a", "c", "b"]),
        ({"threshold": 0.95}, ["a", "c", "b"]),  # auto: 3 of the 4 selected
        ({"k": 2, "threshold": 0.8}, ["a", "c"]),  # auto: never more than k
    ],
)
def test_select_keeps_the_best_k_above_the_threshold_but_never_fewer_than_the_floor(settings, kept):
    assert select(SCORES, SelectionConfig(**settings)) == kept


@pytest.mark.parametrize(
    "k, n_atlases, floor",
    [(10, 24, 5), (10, 10, 5), (10, 4, 3), (10, 2, 2), (3, 10, 3), (2, 10, 2), ("all", 24, 12), (20, 30, 10)],
)
def test_the_default_floor_is_half_of_the_selected_and_at_least_three(k, n_atlases, floor):
    assert min_atlases(SelectionConfig(k=k), n_atlases) == floor


def test_ranking_ties_go_by_id():
    assert rank({"y": 0.5, "x": 0.5, "z": 0.7}) == ["z", "x", "y"]
