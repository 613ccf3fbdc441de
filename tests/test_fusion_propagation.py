import numpy as np
import pytest
import SimpleITK as sitk
from conftest import phantom, rigid, warp
from scipy import ndimage

from atlasseg.config import FusionConfig, load_config
from atlasseg.errors import AtlassegError, ConfigError
from atlasseg.fusion import (
    FUSERS,
    METHODS,
    JointLabelFusion,
    WeightedVote,
    fill_holes,
    keep_largest_component,
    make_fuser,
    needs_intensities,
)
from atlasseg.fusion.jlf import _box, auto_radii, voxel_radii
from atlasseg.imageio import Geometry
from atlasseg.propagation import propagate_labels

MAJORITY = FusionConfig(method="majority")


def labels(array, dtype=np.uint8) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=dtype))
    image.SetOrigin((5.0, -3.0))
    image.SetSpacing((0.5, 2.0))
    return image


def test_majority_of_three_against_two():
    a, b = np.ones((4, 4)), np.full((4, 4), 2)
    fuser = WeightedVote(labels(a), config=MAJORITY)
    for candidate in (a, a, a, b, b):
        fuser.add(labels(candidate))
    result = fuser.result()
    assert (sitk.GetArrayFromImage(result) == 1).all()
    assert result.GetOrigin() == (5.0, -3.0) and result.GetSpacing() == (0.5, 2.0)
    assert result.GetPixelID() == sitk.sitkUInt8


def test_ties_go_to_the_smallest_label_whatever_the_order():
    a, b = np.full((3, 3), 7), np.full((3, 3), 3)
    for order in ((a, b), (b, a)):
        fuser = WeightedVote(labels(a), config=MAJORITY)
        for candidate in order:
            fuser.add(labels(candidate))
        assert (sitk.GetArrayFromImage(fuser.result()) == 3).all()


def test_large_label_values_and_types_survive():
    a = np.array([[0, 300], [1000, 65000]])
    fuser = WeightedVote(labels(a, np.uint16), config=MAJORITY)
    fuser.add(labels(a, np.uint16))
    fuser.add(labels(a, np.uint16))
    fuser.add(labels(np.zeros((2, 2)), np.uint8))
    out = fuser.result()
    assert out.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), a)


def test_fusion_refuses_candidates_off_the_target_grid():
    fuser = WeightedVote(labels(np.zeros((3, 3))), config=MAJORITY)
    with pytest.raises(AtlassegError, match="target grid"):
        fuser.add(sitk.GetImageFromArray(np.zeros((3, 3), np.uint8)))
    with pytest.raises(AtlassegError, match="no candidates"):
        fuser.result()


def intensities(array) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.SetOrigin((5.0, -3.0))
    image.SetSpacing((0.5, 2.0))
    return image


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """``array`` as an image on ``reference``'s grid."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def test_global_weights_let_one_good_atlas_outvote_two_poor_ones():
    rng = np.random.default_rng(0)
    target = rng.uniform(size=(8, 8))
    fuser = WeightedVote(intensities(target), config=FusionConfig(method="global_weighted"))
    fuser.add(labels(np.full((8, 8), 2)), intensities(target + 0.01))  # matches the target closely
    for _ in range(2):
        fuser.add(labels(np.ones((8, 8))), intensities(rng.uniform(size=(8, 8))))
    assert (sitk.GetArrayFromImage(fuser.result()) == 2).all()
    majority = WeightedVote(intensities(target), config=MAJORITY)
    for value in (2, 1, 1):
        majority.add(labels(np.full((8, 8), value)))
    assert (sitk.GetArrayFromImage(majority.result()) == 1).all()


@pytest.mark.parametrize("method", ["global_weighted", "local_weighted"])
def test_nmse_weights_see_through_a_linear_intensity_change_that_misleads_mse(method):
    """The atlas showing the target's pattern at another contrast (× 0.2 + 0.5) should win over a noisy
    copy at the target's contrast: it does with NMSE weights, not with MSE's."""
    rng = np.random.default_rng(4)
    target = rng.uniform(size=(16, 16))
    votes = {}
    for metric in ("mse", "nmse"):
        fuser = WeightedVote(intensities(target), config=FusionConfig(method=method, metric=metric, sigma=4.0))
        fuser.add(labels(np.full((16, 16), 2)), intensities(target * 0.2 + 0.5))
        fuser.add(labels(np.ones((16, 16))), intensities(target + rng.normal(0, 0.15, size=(16, 16))))
        votes[metric] = sitk.GetArrayFromImage(fuser.result())
    assert (votes["nmse"] == 2).all() and (votes["mse"] == 1).all()


def test_local_weights_choose_the_locally_matching_atlas():
    """Atlas A matches the target on the left half, atlas B on the right: each wins its half."""
    target = np.zeros((20, 40))
    target[:, 10:30] = 1.0
    left_good = target.copy()
    left_good[:, 20:] = 1.0 - left_good[:, 20:]
    right_good = target.copy()
    right_good[:, :20] = 1.0 - right_good[:, :20]
    fuser = WeightedVote(intensities(target), config=FusionConfig(method="local_weighted", sigma=2.0, gain=2.0))
    fuser.add(labels(np.full((20, 40), 3)), intensities(left_good))
    fuser.add(labels(np.full((20, 40), 4)), intensities(right_good))
    result = sitk.GetArrayFromImage(fuser.result())
    assert (result[:, :15] == 3).all() and (result[:, 25:] == 4).all()


@pytest.mark.parametrize("shape", [(24, 24), (10, 12, 14)])
def test_jlf_follows_the_atlas_identical_to_the_target(shape):
    """One atlas equals the target; three others have wrong labels and noisy intensities
    that outvote it in a majority vote: joint label fusion must reproduce the good atlas."""
    rng = np.random.default_rng(3)
    target = rng.uniform(size=shape).astype(np.float32)
    truth = rng.integers(0, 3, size=shape)

    def image(array, dtype):
        out = sitk.GetImageFromArray(np.asarray(array, dtype=dtype))
        return out

    fuser = make_fuser(image(target, np.float32), config=FusionConfig(method="jlf"))
    majority = make_fuser(image(target, np.float32), config=MAJORITY)
    wrong = (truth + 1) % 3
    candidates = [(truth, target)] + [(wrong, target + rng.normal(0, 0.3, size=shape)) for _ in range(3)]
    for labels_array, intensity in candidates:
        fuser.add(image(labels_array, np.uint8), image(intensity, np.float32))
        majority.add(image(labels_array, np.uint8))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fuser.result()), truth)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(majority.result()), wrong)


@pytest.mark.parametrize(
    "shape, spacing", [((32, 32), (1.0, 1.0)), ((12, 16, 16), (1.0, 1.0, 1.0)), ((12, 16, 16), (1.0, 1.0, 5.0))]
)
def test_jlf_search_finds_the_good_atlas_shifted_by_one_voxel(shape, spacing):
    """One atlas is the target shifted by one voxel (labels too); three others have wrong
    labels and noisy intensities. Without search, JLF follows the good atlas's shifted labels;
    with search_radius 1, its best patches are the unshifted ones: the target's own labels.
    With 5 mm slices the patch and search stay within a slice, and the shift is still found."""
    rng = np.random.default_rng(5)
    target = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    target = ((target - target.min()) / np.ptp(target)).astype(np.float32)
    truth = np.digitize(target, np.quantile(target, [0.4, 0.7])).astype(np.uint8)
    candidates = [(np.roll(truth, 1, axis=-1), np.roll(target, 1, axis=-1))]
    candidates += [((truth + 1) % 3, target + rng.normal(0, 0.2, shape).astype(np.float32)) for _ in range(3)]
    inner = (slice(1, -1),) * len(shape)  # np.roll wraps one border around
    accuracy = {}
    for radius in (0, 1):

        def spaced(array):
            out = sitk.GetImageFromArray(array)
            out.SetSpacing(spacing)
            return out

        fuser = make_fuser(spaced(target), config=FusionConfig(method="jlf", search_radius=radius))
        for labels_array, intensity in candidates:
            fuser.add(spaced(labels_array), spaced(intensity))
        accuracy[radius] = (sitk.GetArrayFromImage(fuser.result()) == truth)[inner].mean()
    assert accuracy[1] >= 0.97
    assert accuracy[0] < accuracy[1] - 0.2


def test_jlf_radii_count_voxels_of_the_finest_axis_and_the_search_goes_nearest_in_mm_first():
    thick = np.array([8.0, 2.5, 2.5])  # array order: 8 mm slices
    assert voxel_radii(2, thick).tolist() == [1, 2, 2]  # 5 mm in-plane; 1 slice (8 mm) is the nearest
    assert voxel_radii(1, thick).tolist() == [0, 1, 1]
    assert voxel_radii(3, np.array([1.0, 1.0])).tolist() == [3, 3]
    box = _box(np.array([1, 1, 1]), thick)
    assert len(box) == 27 and box[0].tolist() == [0, 0, 0]
    assert not box[1:9, 0].any() and box[9:, 0].all()  # the 8 in-plane neighbours before any other slice


def test_jlf_auto_radii_grow_with_the_smallest_structure_in_voxels_of_the_finest_axis():
    small, large = {"patch_radius": 2, "search_radius": 3}, {"patch_radius": 3, "search_radius": 5}

    def ball(r, n):
        return (np.linalg.norm(np.indices((n, n, n)) - n // 2, axis=0) <= r).astype(np.uint8)

    iso = np.array([1.0, 1.0, 1.0])
    assert auto_radii(ball(7, 40), iso) == small  # 15 voxels across (a hippocampus at 1 mm)
    assert auto_radii(ball(11, 40), iso) == large  # 23 across
    assert auto_radii(ball(11, 40), iso * 0.5) == large  # the same voxels, half the mm: still 23 voxels across
    two = ball(11, 40) + 2 * ball(5, 40).astype(np.uint8).transpose(1, 0, 2)  # a small second label decides
    two[two == 3] = 2
    assert auto_radii(two, iso) == small
    thick = np.array([8.0, 2.5, 2.5])  # a 25-voxel-wide (62 mm) structure over 8 slices of 8 mm
    heart = np.zeros((12, 40, 40), np.uint8)
    heart[2:10][:, np.linalg.norm(np.indices((40, 40)) - 20, axis=0) <= 12] = 1
    assert auto_radii(heart, thick) == large
    disc = (np.linalg.norm(np.indices((40, 40)) - 20, axis=0) <= 7).astype(np.uint8)  # 2D: the disc's diameter
    assert auto_radii(disc, np.array([1.0, 1.0])) == small
    assert (
        auto_radii(disc, np.array([0.5, 0.5])) == small
        and auto_radii(np.kron(disc, np.ones((2, 2), np.uint8)), np.array([0.5, 0.5])) == large
    )
    assert auto_radii(np.zeros((5, 5), np.uint8), np.array([1.0, 1.0])) == small


def test_jlf_records_the_radii_it_chose_and_an_explicit_radius_wins():
    rng = np.random.default_rng(3)
    truth = (np.linalg.norm(np.indices((30, 30, 30)) - 15, axis=0) <= 12).astype(np.uint8)  # 25 voxels across
    intensity = (truth + 0.1 * rng.normal(size=truth.shape)).astype(np.float32)
    target = sitk.GetImageFromArray(intensity)
    for config, expected in (
        (FusionConfig(method="jlf"), {"patch_radius": 3, "search_radius": 5}),
        (FusionConfig(method="jlf", search_radius=1), {"patch_radius": 3, "search_radius": 1}),
    ):
        fuser = make_fuser(target, config=config)
        assert fuser.chosen == {}
        for _ in range(2):
            fuser.add(sitk.GetImageFromArray(truth), target)
        assert fuser.chosen == expected
        assert (sitk.GetArrayFromImage(fuser.result()) == truth).all()


def test_jlf_patch_normalization_ignores_a_contrast_change():
    """The atlas with the right labels is the target in another contrast (gain and offset);
    two with wrong labels match the target's intensities up to noise. Normalised patches
    see the first as perfect; raw differences do not."""
    rng = np.random.default_rng(6)
    target = ndimage.gaussian_filter(rng.normal(size=(30, 30)), 1.5).astype(np.float32)
    truth = (target > 0).astype(np.uint8)
    candidates = [(truth, 2.0 * target + 0.3)] + [
        (1 - truth, target + rng.normal(0, 0.15, target.shape)) for _ in range(2)
    ]
    correct = {}
    for normalization in (True, False):
        config = FusionConfig(method="jlf", patch_normalization=normalization)
        fuser = make_fuser(sitk.GetImageFromArray(target), config=config)
        for labels_array, intensity in candidates:
            fuser.add(sitk.GetImageFromArray(labels_array), sitk.GetImageFromArray(intensity.astype(np.float32)))
        correct[normalization] = (sitk.GetArrayFromImage(fuser.result()) == truth).mean()
    assert correct[True] >= 0.97 and correct[False] <= 0.5, correct


@pytest.mark.parametrize("voting", [True, False])
def test_jlf_patch_voting_probabilities_cover_every_voxel_once(voting):
    """With or without voting over the patch, each voxel's label shares sum to 1 (votes divided
    by the patches covering the voxel, fewer at the image border) and the winner is the result."""
    rng = np.random.default_rng(7)
    target = rng.uniform(size=(9, 11, 10)).astype(np.float32)
    fuser = make_fuser(sitk.GetImageFromArray(target), config=FusionConfig(method="jlf", patch_voting=voting))
    for _ in range(4):
        fuser.add(
            sitk.GetImageFromArray(rng.integers(0, 3, size=target.shape).astype(np.uint8)),
            sitk.GetImageFromArray((target + rng.normal(0, 0.2, target.shape)).astype(np.float32)),
        )
    maps = fuser.probabilities()
    np.testing.assert_allclose(sum(sitk.GetArrayFromImage(m) for m in maps.values()), 1.0, rtol=1e-5)
    winner = np.asarray(sorted(maps))[np.argmax([sitk.GetArrayFromImage(maps[v]) for v in sorted(maps)], axis=0)]
    np.testing.assert_array_equal(winner, sitk.GetArrayFromImage(fuser.result()))


@pytest.mark.parametrize("method", ["majority", "staple"])
def test_probability_sigma_smooths_away_a_one_voxel_hole_but_not_the_square(method):
    """Two of three candidates have a one-voxel hole in a 12 × 12 square: the vote keeps the
    hole; smoothed probabilities (sigma 1.5 voxels) fill it and keep the square's sides (its
    four corner voxels are rounded off)."""
    square = np.zeros((24, 24), np.uint8)
    square[6:18, 6:18] = 1
    holed = square.copy()
    holed[12, 12] = 0
    image = sitk.GetImageFromArray  # 1 mm voxels
    found = {}
    for sigma in (0.0, 1.5):
        fuser = make_fuser(
            image(square.astype(np.float32)), config=FusionConfig(method=method, probability_sigma=sigma)
        )
        for candidate in (holed, holed, square):
            fuser.add(image(candidate))
        found[sigma] = sitk.GetArrayFromImage(fuser.result())
    np.testing.assert_array_equal(found[0.0], holed)
    corners = np.zeros_like(square, dtype=bool)
    corners[[6, 6, 17, 17], [6, 17, 6, 17]] = True
    np.testing.assert_array_equal(found[1.5], np.where(corners, 0, square))


@pytest.mark.parametrize("method", METHODS)
def test_a_fuser_does_what_its_class_declares_before_it_is_made(method):
    """What the pipeline asks a fuser's class (intensities, memory, temporary files) is what an instance does."""
    target = intensities(np.zeros((4, 4)))
    fuser = make_fuser(target, config=FusionConfig(method=method))
    assert fuser.needs_intensities == needs_intensities(method) == (method not in ("majority", "staple"))
    if not fuser.needs_intensities:  # labels alone are enough
        fuser.add(labels(np.eye(4)))
        assert sitk.GetArrayFromImage(fuser.result()).tolist() == np.eye(4).tolist()
    geometry = Geometry.of(target)
    memory, disk = FUSERS[method].estimate_bytes(geometry, 3), FUSERS[method].estimate_disk_bytes(geometry, 3)
    assert (memory > 0) == (method == "jlf") and disk == 0  # 3 small candidates stay in memory


def test_jlf_estimates_its_spill_to_disk_beyond_its_memory_budget(monkeypatch):
    geometry = Geometry.of(intensities(np.zeros((10, 10))))
    in_memory = JointLabelFusion.estimate_bytes(geometry, 4)
    monkeypatch.setattr(JointLabelFusion, "_SLAB_BYTES", 1000)  # 4 candidates of 100 voxels: 2400 bytes
    assert JointLabelFusion.estimate_disk_bytes(geometry, 4) == 2400
    assert JointLabelFusion.estimate_bytes(geometry, 4) == in_memory - 2400 + 1000  # a slab's worth stays


def test_weighted_fusion_needs_intensities():
    fuser = WeightedVote(intensities(np.zeros((3, 3))), config=FusionConfig(method="local_weighted"))
    with pytest.raises(AtlassegError, match="needs the warped atlas intensities"):
        fuser.add(labels(np.zeros((3, 3))))


@pytest.mark.parametrize("sigma", [0.0, 1.0])
@pytest.mark.parametrize("method", ["majority", "global_weighted", "local_weighted", "jlf", "staple"])
def test_probabilities_sum_to_one(method, sigma):
    rng = np.random.default_rng(1)
    target = rng.uniform(size=(6, 6))
    fuser = make_fuser(intensities(target), config=FusionConfig(method=method, probability_sigma=sigma))
    for _ in range(5):
        fuser.add(labels(rng.integers(0, 4, size=(6, 6))), intensities(rng.uniform(size=(6, 6))))
    maps = fuser.probabilities()
    total = sum(sitk.GetArrayFromImage(m) for m in maps.values())
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
    winner = np.asarray(sorted(maps))[np.argmax([sitk.GetArrayFromImage(maps[v]) for v in sorted(maps)], axis=0)]
    np.testing.assert_array_equal(winner, sitk.GetArrayFromImage(fuser.result()))


def test_fusion_memory_does_not_grow_with_the_number_of_candidates():
    import tracemalloc

    def peak(n: int) -> int:
        rng = np.random.default_rng(2)
        target = intensities(rng.uniform(size=(64, 64)))
        tracemalloc.start()
        fuser = WeightedVote(target, config=FusionConfig(method="local_weighted"))
        for _ in range(n):
            fuser.add(labels(rng.integers(0, 3, size=(64, 64))), intensities(rng.uniform(size=(64, 64))))
        fuser.result()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    assert peak(40) < 1.2 * peak(4)


def _jlf_case(rng, n: int, shape=(18, 22, 20)):
    """A random target and ``n`` noisy candidates on an anisotropic grid."""

    def image(array):
        out = sitk.GetImageFromArray(array)
        out.SetSpacing((1.0, 1.3, 2.5)[: array.ndim])
        return out

    target = rng.uniform(size=shape).astype(np.float32)
    candidates = [
        (
            image(rng.integers(0, 3, size=shape).astype(np.uint8)),
            image((target + rng.normal(0, 0.3, size=shape)).astype(np.float32)),
        )
        for _ in range(n)
    ]
    return image(target), candidates


@pytest.mark.parametrize("shape", [(18, 22, 20), (30, 26)])
@pytest.mark.parametrize("voting", [True, False])
def test_jlf_gives_the_same_answer_whatever_its_slab_size(monkeypatch, voting, shape):
    """Slabs of one row (every patch and search window crossing slab borders) and one slab
    for the whole grid give identical labels, and probabilities equal up to float rounding."""
    config = FusionConfig(method="jlf", search_radius=2, patch_voting=voting)
    results = []
    for slab_bytes in (1, 1 << 30):
        monkeypatch.setattr(JointLabelFusion, "_SLAB_BYTES", slab_bytes)
        target, candidates = _jlf_case(np.random.default_rng(4), 5, shape=shape)
        fuser = make_fuser(target, config=config)
        for candidate in candidates:
            fuser.add(*candidate)
        maps = fuser.probabilities()
        results.append(
            (sitk.GetArrayFromImage(fuser.result()), [sitk.GetArrayFromImage(maps[v]) for v in sorted(maps)])
        )
    (labels_a, maps_a), (labels_b, maps_b) = results
    np.testing.assert_array_equal(labels_a, labels_b)
    np.testing.assert_allclose(np.stack(maps_a), np.stack(maps_b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("radii", [(2, 2, 2), (2, 1, 0), (1, 3)])
def test_jlf_window_sums_are_box_sums_at_every_voxel_far_enough_inside(radii):
    """Element q of the flat sums is the sum over the box whose first voxel is voxel q, wherever that box fits."""
    from atlasseg.fusion.jlf import _window_sums

    radii = np.asarray(radii)
    array = np.random.default_rng(2).uniform(size=(9, 11, 8)[: len(radii)]).astype(np.float32)
    original = array.copy()
    flat = _window_sums(array, radii)
    fits = tuple(n - 2 * r for n, r in zip(array.shape, radii.tolist()))
    sums = np.lib.stride_tricks.as_strided(flat, shape=fits, strides=array.strides)
    interior = tuple(slice(r, n - r) for r, n in zip(radii.tolist(), array.shape))
    expected = ndimage.uniform_filter(array.astype(np.float64), size=tuple(2 * radii + 1))[interior] * np.prod(
        2 * radii + 1
    )
    assert flat.dtype == np.float32 and flat.size == np.ravel_multi_index(tuple(n - 1 for n in fits), array.shape) + 1
    np.testing.assert_allclose(sums, expected, rtol=1e-5)
    np.testing.assert_array_equal(array, original)  # the input is left as it was


@pytest.mark.parametrize("voting", [True, False])
def test_jlf_on_the_disagreement_band_gives_the_labels_of_the_full_solve(monkeypatch, dim, voting):
    """Candidates that agree away from the structures' borders (the phantom, slightly moved): solving only
    where they disagree gives the labels (and probabilities) of solving at every voxel."""
    from atlasseg.fusion import jlf

    image, labels = phantom(dim=dim, size=24 if dim == 3 else 48)
    rng = np.random.default_rng(5)
    candidates = []
    for number in range(5):
        moved = rigid(dim, angle_deg=3.0 * (number - 2), shift=rng.uniform(-2.5, 2.5, size=3))
        noisy = sitk.GetArrayFromImage(warp(image, moved)) + rng.normal(0, 0.05, size=image.GetSize()[::-1])
        intensities = sitk.GetImageFromArray(noisy.astype(np.float32))
        intensities.CopyInformation(image)
        candidates.append((warp(labels, moved, labels=True), intensities))
    config = FusionConfig(method="jlf", search_radius=1, patch_voting=voting)
    band = []
    real = jlf._undecided

    def fused():
        fuser = make_fuser(image, config=config)
        for candidate in candidates:
            fuser.add(*candidate)
        maps = fuser.probabilities()
        return sitk.GetArrayFromImage(fuser.result()), np.stack([sitk.GetArrayFromImage(maps[v]) for v in sorted(maps)])

    monkeypatch.setattr(jlf, "_undecided", lambda low, high: band.append(real(low, high)) or band[-1])
    restricted = fused()
    monkeypatch.setattr(jlf, "_undecided", lambda low, high: np.ones(low.shape, dtype=bool))
    full = fused()
    assert 0.05 < band[0].mean() < 0.6  # a band, not the whole grid nor nothing
    np.testing.assert_array_equal(restricted[0], full[0])
    np.testing.assert_allclose(restricted[1], full[1], rtol=1e-5, atol=1e-6)


def _jlf_by_definition(target: sitk.Image, candidates: list, config: FusionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Joint label fusion voxel by voxel, as JointLabelFusion's docstring defines it (slow; tiny images):
    the labels and the probability maps (label values in increasing order)."""
    from atlasseg.similarity import floored

    spacing = np.asarray(target.GetSpacing())[::-1]
    search = _box(voxel_radii(config.search_radius, spacing), spacing)
    patch = _box(voxel_radii(config.patch_radius, spacing), spacing)
    pad = [(int(r), int(r)) for r in search.max(axis=0) + patch.max(axis=0)]
    fixed = sitk.GetArrayFromImage(target).astype(np.float64)
    shape = np.asarray(fixed.shape)
    moving = [sitk.GetArrayFromImage(i).astype(np.float64) for _, i in candidates]
    scale = np.mean([np.abs(a - fixed).mean() for a in moving])  # without normalisation, differences are scaled
    padded = [np.pad(a, pad, mode="edge") for a in [fixed, *moving]]
    label_maps = [np.pad(sitk.GetArrayFromImage(lab), pad, mode="edge") for lab, _ in candidates]
    first = np.asarray([p for p, _ in pad])

    def at(array, centre):
        return array[tuple((centre + patch + first).T)]

    def compared(values):
        if not config.patch_normalization:
            return values / scale
        centred = values - values.mean()
        return centred / np.sqrt(floored(np.mean(centred * centred)))

    values = sorted(set(np.unique(np.concatenate([m.ravel() for m in label_maps])).tolist()))
    votes, covered = np.zeros((len(values), *fixed.shape)), np.zeros(fixed.shape)
    for x in np.ndindex(*fixed.shape):
        t = compared(at(padded[0], x))

        def cost(a, o):
            if config.patch_normalization:
                return -np.mean(compared(at(a, x + o)) * t)
            return np.sum((at(a, x + o) - at(padded[0], x)) ** 2)

        best = [search[int(np.argmin([cost(a, o) for o in search]))] for a in padded[1:]]
        d = np.stack([np.abs(compared(at(a, x + o)) - t) for a, o in zip(padded[1:], best)])
        m = (d @ d.T / len(patch)) ** config.beta + config.alpha * np.eye(len(d))
        w = np.linalg.solve(m, np.ones(len(d)))
        w /= w.sum()
        for p in patch if config.patch_voting else patch[:1]:
            y = np.asarray(x) + p
            if np.any(y < 0) or np.any(y >= shape):
                continue
            for weight, lab, o in zip(w, label_maps, best):
                votes[(values.index(int(lab[tuple(np.asarray(x) + o + p + first)])), *y)] += weight
            covered[tuple(y)] += 1
    votes /= covered
    return np.asarray(values)[np.argmax(votes, axis=0)], votes


@pytest.mark.parametrize("shape", [(14, 16), (5, 8, 9)])
@pytest.mark.parametrize("voting, normalization", [(True, True), (False, True), (True, False)])
def test_jlf_gives_the_labels_of_its_definition_computed_voxel_by_voxel(shape, voting, normalization):
    """The vectorised search (box sums of shifted flat views), the solve restricted to where candidates
    disagree and the voting per patch offset give the labels, and the probabilities, of the definition
    computed voxel by voxel: candidates whose labels agree in places (decided voxels) and differ in others,
    on an anisotropic grid (the patch and search are flat along the coarse axis in 3D)."""
    rng = np.random.default_rng(11)
    target, _ = _jlf_case(rng, 0, shape=shape)
    smooth = ndimage.gaussian_filter(sitk.GetArrayFromImage(target), 2.0)
    candidates = []
    for number in range(4):
        moved = np.roll(smooth, number % 2 - 1 if number else 0, axis=-1)
        lab = sitk.GetImageFromArray(np.digitize(moved, np.quantile(smooth, [0.35, 0.7])).astype(np.uint8))
        noisy = sitk.GetImageFromArray(
            (sitk.GetArrayFromImage(target) + rng.normal(0, 0.2, size=shape)).astype(np.float32)
        )
        for image in (lab, noisy):
            image.CopyInformation(target)
        candidates.append((lab, noisy))
    config = FusionConfig(
        method="jlf", patch_radius=1, search_radius=1, patch_voting=voting, patch_normalization=normalization
    )
    fuser = make_fuser(target, config=config)
    for candidate in candidates:
        fuser.add(*candidate)
    maps = fuser.probabilities()
    expected_labels, expected_maps = _jlf_by_definition(target, candidates, config)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fuser.result()), expected_labels)
    np.testing.assert_allclose(
        np.stack([sitk.GetArrayFromImage(maps[v]) for v in sorted(maps)]), expected_maps, atol=1e-5
    )


def test_jlf_keeps_candidates_in_memory_while_they_fit_and_then_needs_room_on_disk(monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    target, candidates = _jlf_case(np.random.default_rng(1), 3)
    config = FusionConfig(method="jlf", patch_radius=2, search_radius=3)  # the padded sizes below
    fuser = make_fuser(target, config=config)
    for candidate in candidates:  # about 60 kB: no file written
        fuser.add(*candidate)
    assert fuser.result().GetSize() == target.GetSize()
    monkeypatch.setattr(JointLabelFusion, "_SLAB_BYTES", 100_000)
    fuser = make_fuser(target, config=config)
    fuser.add(*candidates[0])
    with pytest.raises(AtlassegError, match=f"cannot keep its candidates in {tmp_path / 'gone'} .*set TMPDIR"):
        fuser.add(*candidates[1])


def test_jlf_memory_does_not_grow_with_the_number_of_candidates(monkeypatch):
    """Candidates wait on disk and are read back in slabs (of about 2 MB here), and the
    weights are solved in chunks of bounded size (made small here, so that 4 candidates fill
    them too): 40 candidates (that disagree on an 8³ block of a 48³ grid) take no more memory
    than 4; held in memory they would take about 28 MB more."""
    import tracemalloc

    monkeypatch.setattr(JointLabelFusion, "_SLAB_BYTES", 2_000_000)
    monkeypatch.setattr(JointLabelFusion, "_CHUNK", 1 << 18)

    def peak(n: int) -> int:
        rng = np.random.default_rng(6)
        target, _ = _jlf_case(rng, 0, shape=(48, 48, 48))
        block = (slice(20, 28),) * 3
        tracemalloc.start()
        fuser = make_fuser(target, config=FusionConfig(method="jlf", search_radius=1))
        for _ in range(n):
            labels = np.ones((48, 48, 48), np.uint8)
            labels[block] = rng.integers(0, 3, size=(8, 8, 8))
            intensities = sitk.GetArrayFromImage(target) + rng.normal(0, 0.3, size=(48, 48, 48)).astype(np.float32)
            candidate = [sitk.GetImageFromArray(a) for a in (labels, intensities)]
            for image in candidate:
                image.CopyInformation(target)
            fuser.add(*candidate)
        fuser.result()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    assert peak(40) < 1.2 * peak(4)


def test_nearest_neighbour_propagation_never_invents_label_values(dim):
    image, lab = phantom(dim=dim, size=24)
    array = sitk.GetArrayFromImage(lab).astype(np.int32) * 97  # values 0, 97, 194, 291, 388
    lab = sitk.GetImageFromArray(array)
    lab.CopyInformation(image)
    reference = sitk.Image([17] * dim, sitk.sitkUInt8)  # another grid: coarser, shifted
    reference.SetSpacing([2.7] * dim)
    reference.SetOrigin([-20.0] * dim)
    out = propagate_labels(lab, rigid(dim, angle_deg=13.0), reference)
    values = set(np.unique(sitk.GetArrayFromImage(out)).tolist())
    assert values <= set(np.unique(array).tolist())
    assert len(values) == 5  # every structure survives
    assert out.GetPixelID() == lab.GetPixelID()
    assert out.GetSpacing() == reference.GetSpacing() and out.GetOrigin() == reference.GetOrigin()


# --------------------------------------------------------------------------- STAPLE

STAPLE = FusionConfig(method="staple")


def fuse(config: FusionConfig, candidates, reference=None):
    fuser = make_fuser(reference if reference is not None else candidates[0], config=config)
    for candidate in candidates:
        fuser.add(candidate)
    return fuser


def test_staple_recovers_the_truth_and_finds_the_rater_that_misses_half_a_structure(dim):
    """Three raters: two with a few small slips each, one that misses the body (label 1)
    on half of the image. STAPLE returns the truth and rates that one's sensitivity lower."""
    _, truth_image = phantom(dim=dim, size=24)
    truth = sitk.GetArrayFromImage(truth_image)
    good_1, good_2, bad = truth.copy(), truth.copy(), truth.copy()
    good_1[..., 4:6][good_1[..., 4:6] == 1] = 0  # a thin slab of the body missed
    good_2[truth == 4] = 1  # misses the small sphere
    bad[..., 12:][bad[..., 12:] == 1] = 0  # the body missed on the right half
    raters = [good_1, bad, good_2]
    fuser = fuse(STAPLE, [_like(r, truth_image) for r in raters])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fuser.result()), truth)
    one = list(fuser.label_values).index(1)
    sensitivity = fuser.confusion[:, one, one]
    assert sensitivity[1] < 0.8 < min(sensitivity[0], sensitivity[2])
    assert fuser.converged and fuser.iterations <= STAPLE.staple_iterations


def test_staple_trusts_reliable_raters_where_a_majority_of_poor_ones_is_wrong():
    """Two raters wrong on 1 % of voxels, three on 35 %: a majority vote follows the poor
    three wherever they happen to agree; STAPLE learns whom to trust."""
    rng = np.random.default_rng(0)
    truth = np.zeros((48, 48), np.uint8)
    truth[8:40, 8:40] = 1
    truth[16:28, 12:30] = 2

    def rater(error: float) -> sitk.Image:
        wrong = rng.uniform(size=truth.shape) < error
        return labels(np.where(wrong, (truth + rng.integers(1, 3, size=truth.shape)) % 3, truth))

    raters = [rater(0.01), rater(0.01), rater(0.35), rater(0.35), rater(0.35)]
    staple, majority = fuse(STAPLE, raters), fuse(MAJORITY, raters)
    staple_errors = (sitk.GetArrayFromImage(staple.result()) != truth).sum()
    majority_errors = (sitk.GetArrayFromImage(majority.result()) != truth).sum()
    assert 3 * staple_errors < majority_errors
    sensitivity = np.diagonal(staple.confusion, axis1=1, axis2=2)  # candidate × label
    assert sensitivity[:2].min() > 0.9 and sensitivity[2:].max() < 0.75


def test_staple_where_all_agree_gives_that_label_with_certainty():
    array = np.array([[0, 1000, 1000], [7, 7, 0]])
    fuser = fuse(STAPLE, [labels(array, np.uint16)] * 4)
    out = fuser.result()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), array)
    assert out.GetPixelID() == sitk.sitkUInt16
    maps = fuser.probabilities()
    assert sorted(maps) == [0, 7, 1000]
    for value, image in maps.items():
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), (array == value).astype(np.float32))


def test_staple_tie_goes_to_the_smallest_label_whatever_the_order():
    """Two raters that swap labels 5 and 9 are indistinguishable: every voxel is a tie."""
    a = np.array([[5, 5, 9, 9]] * 3)
    b = np.where(a == 5, 9, 5)
    for order in ((a, b), (b, a)):
        fuser = fuse(STAPLE, [labels(x) for x in order])
        assert (sitk.GetArrayFromImage(fuser.result()) == 5).all()
        np.testing.assert_allclose(sitk.GetArrayFromImage(fuser.probabilities()[9]), 0.5)


def test_staple_keeps_large_label_values_and_many_labels():
    rng = np.random.default_rng(4)
    truth = rng.choice(np.arange(300) * 250, size=(20, 30)).astype(np.int32)  # 300 labels, values up to 74750
    raters = [truth.copy() for _ in range(3)]
    for rater in raters:
        wrong = rng.uniform(size=truth.shape) < 0.1
        rater[wrong] = 70000 + rng.integers(0, 3, size=wrong.sum())
    out = fuse(STAPLE, [labels(r, np.int32) for r in raters]).result()
    assert out.GetPixelID() == sitk.sitkInt32
    agree = sitk.GetArrayFromImage(out) == truth
    assert agree.mean() > 0.97


def test_staple_agrees_with_simpleitk_multilabel_staple(dim):
    """Same model, own implementation: on atlases with smooth random deformations of the
    phantom, the two agree on nearly every voxel where the atlases disagree."""
    rng = np.random.default_rng(1)
    _, truth_image = phantom(dim=dim, size=40 if dim == 2 else 24)
    truth = sitk.GetArrayFromImage(truth_image)
    raters = []
    for amplitude in (2.0, 2.0, 2.0, 2.0, 5.0, 5.0):  # voxels; the last two atlases are worse
        field = [ndimage.gaussian_filter(rng.normal(size=truth.shape), 4) for _ in range(dim)]
        coordinates = [axis + amplitude * f / np.abs(f).max() for axis, f in zip(np.indices(truth.shape), field)]
        raters.append(_like(ndimage.map_coordinates(truth, coordinates, order=0, mode="nearest"), truth_image))
    ours = sitk.GetArrayFromImage(fuse(FusionConfig(method="staple", staple_iterations=200), raters).result())
    theirs = sitk.GetArrayFromImage(sitk.MultiLabelSTAPLE(raters))
    arrays = [sitk.GetArrayFromImage(r) for r in raters]
    disagree = np.any([a != arrays[0] for a in arrays], axis=0)
    assert disagree.mean() > 0.05
    np.testing.assert_array_equal(ours[~disagree], arrays[0][~disagree])
    assert (ours == theirs)[disagree].mean() > 0.95


def test_staple_keeps_candidates_only_where_they_disagree():
    """40 candidates that differ from one another on a 10 × 10 patch of a 256 × 256 grid:
    memory is that of a few full-grid arrays, not one per candidate."""
    import tracemalloc

    rng = np.random.default_rng(5)
    base = np.zeros((256, 256), np.uint8)
    base[50:200, 60:180] = 1

    def peak(n: int) -> int:
        tracemalloc.start()
        fuser = make_fuser(labels(base), config=STAPLE)
        for _ in range(n):
            candidate = base.copy()
            candidate[100:110, 100:110] = rng.integers(0, 3, size=(10, 10))
            fuser.add(labels(candidate))
        fuser.result()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    assert peak(40) < 1.2 * peak(4)


def test_staple_config_is_validated():
    with pytest.raises(ConfigError, match="staple_iterations"):
        load_config(None, overrides=["fusion.staple_iterations=0"])
    with pytest.raises(ConfigError, match="staple_tolerance"):
        load_config(None, overrides=["fusion.staple_tolerance=-1.0"])
    assert load_config(None, overrides=["fusion.method=staple"]).fusion.method == "staple"


# --------------------------------------------------------------------------- post-processing


def grid(text: str) -> np.ndarray:
    """A 2D label array drawn as rows of digits ('.' is background)."""
    return np.array([[0 if c == "." else int(c) for c in row] for row in text.split()], dtype=np.uint8)


def test_keep_largest_component_sends_stray_pieces_to_background():
    before = grid("""
        11..1.
        11....
        ..1...
        ......
        22..22
        22..2.
    """)
    after = grid("""
        11....
        11....
        ..1...
        ......
        22....
        22....
    """)  # the diagonal neighbour of the 1 block is part of it (8-connected); equal 2 pieces: the first stays
    out = keep_largest_component(labels(before))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), after)
    assert out.GetOrigin() == (5.0, -3.0) and out.GetSpacing() == (0.5, 2.0) and out.GetPixelID() == sitk.sitkUInt8


def test_keep_largest_component_gives_cut_off_voxels_to_the_next_most_probable_label():
    before = grid("""
        111.3
        111.1
        111..
        .....
        2.1..
    """)
    shape = before.shape
    p = {0: np.full(shape, 0.2), 1: np.full(shape, 0.5), 2: np.zeros(shape), 3: np.zeros(shape)}
    p[3][1, 4] = 0.3  # the stray 1 beside the 3: 3 is next (0.3 > background's 0.2)
    p[1][4, 2] = 1.0  # the stray 1 at the bottom: no other label has a vote there
    p[0][4, 2] = 0.0
    out = keep_largest_component(labels(before), {v: intensities(m) for v, m in p.items()})
    after = before.copy()
    after[1, 4], after[4, 2] = 3, 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), after)


def test_keep_largest_component_3d_counts_corner_contact_as_connected():
    array = np.zeros((6, 6, 6), np.uint16)
    array[0:2, 0:2, 0:2] = 700
    array[2, 2, 2] = 700  # touches the block at a corner only: kept
    array[4, 4, 4] = 700  # apart: removed
    expected = array.copy()
    expected[4, 4, 4] = 0
    out = keep_largest_component(sitk.GetImageFromArray(array))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), expected)


def test_fill_holes_fills_background_enclosed_by_one_label():
    before = grid("""
        1111....1.1
        1..1.22.1.1
        1.31.22.111
        1111.......
        ...........
        3333...4...
        3..4..4.4..
        3333...4...
    """)
    after = grid("""
        1111....1.1
        1111.22.1.1
        1131.22.111
        1111.......
        ...........
        3333...4...
        3..4..444..
        3333...4...
    """)
    # Filled: the hole in the 1 ring (the 3 inside it stays) and the centre of the 4
    # diamond, closed only at corners (background is 4-connected). Not filled: the 1 U
    # open at the image border, and the pocket of 3 that a 4 closes (no one label encloses it).
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fill_holes(labels(before))), after)


@pytest.mark.parametrize("outer, inner", [(1, 2), (2, 1)])
def test_fill_holes_gives_nested_holes_to_the_innermost_label(outer, inner):
    drawing = grid("""
        1111111
        1.....1
        1.222.1
        1.2.2.1
        1.222.1
        1.....1
        1111111
    """)
    before = np.choose(drawing, [0, outer, inner]).astype(np.uint8)
    after = np.where(before == 0, outer, before)
    after[3, 3] = inner
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fill_holes(labels(before))), after)


def test_fill_holes_3d_hollow_ball():
    z, y, x = np.indices((15, 15, 15)) - 7
    r = np.sqrt(x * x + y * y + z * z)
    ball = np.where(r <= 6, 5, 0).astype(np.int32)
    shell = np.where(r <= 3, 0, ball)
    open_shell = shell.copy()
    open_shell[7, 7, 10:] = 0  # a channel from the cavity out of the ball
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fill_holes(sitk.GetImageFromArray(shell))), ball)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fill_holes(sitk.GetImageFromArray(open_shell))), open_shell)


@pytest.mark.parametrize("method", ["majority", "staple"])
def test_fusers_post_process_as_configured(method):
    """Three candidates that agree on a ring with a hole and a stray voxel: the result is
    cleaned only when asked; the probability maps stay those of the fusion."""
    ring = grid("""
        .......
        .111...
        .1.1...
        .111..1
    """)
    plain = fuse(FusionConfig(method=method), [labels(ring)] * 3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(plain.result()), ring)
    cleaned = fuse(FusionConfig(method=method, keep_largest_component=True, fill_holes=True), [labels(ring)] * 3)
    expected = ring.copy()
    expected[2, 2], expected[3, 6] = 1, 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(cleaned.result()), expected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(cleaned.probabilities()[1]), ring.astype(np.float32))


# --------------------------------------------------------------------------- smooth label propagation

INTERPOLATORS = ["nearest", "linear", "gaussian"]


@pytest.mark.parametrize("interpolator", ["nearest", "linear"])
def test_identity_propagation_keeps_labels_exactly(dim, interpolator):
    _, lab = phantom(dim=dim, size=20)
    out = propagate_labels(lab, sitk.Transform(dim, sitk.sitkIdentity), lab, interpolator=interpolator)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(lab))


def test_gaussian_propagation_smooths_even_without_motion(dim):
    """The Gaussian kernel (one voxel wide) rounds off corners and drops a lone voxel (in 3D
    even the phantom's small sphere, about two voxels across)."""
    _, lab = phantom(dim=dim, size=20)
    array = sitk.GetArrayFromImage(lab)
    array[(2,) * dim] = 9  # a lone voxel in the background
    out = sitk.GetArrayFromImage(
        propagate_labels(_like(array, lab), sitk.Transform(dim, sitk.sitkIdentity), lab, interpolator="gaussian")
    )
    assert out[(2,) * dim] == 0
    assert (out == array).mean() > 0.99
    assert {0, 1, 2, 3} <= set(np.unique(out).tolist()) <= {0, 1, 2, 3, 4}


@pytest.mark.parametrize("interpolator", INTERPOLATORS)
def test_translation_by_whole_voxels_shifts_the_labels(dim, interpolator):
    """Anisotropic voxels; a shift of (2, 1, 1) voxels: the map moves, values and type kept."""
    _, lab = phantom(dim=dim, size=20)
    lab = sitk.Cast(lab, sitk.sitkUInt16) * 300  # values 0, 300, …, 1200
    lab.SetSpacing([0.8, 1.7, 1.1][:dim])
    voxels = [2, 1, 1][:dim]
    shift = sitk.TranslationTransform(dim, [v * s for v, s in zip(voxels, lab.GetSpacing())])
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    still = sitk.GetArrayFromImage(propagate_labels(lab, identity, lab, interpolator=interpolator))
    out = propagate_labels(lab, shift, lab, interpolator=interpolator)
    assert out.GetPixelID() == sitk.sitkUInt16
    expected = np.zeros_like(still)  # output voxel i shows input voxel i + shift (array axes are z, y, x)
    expected[tuple(slice(0, -v) for v in voxels[::-1])] = still[tuple(slice(v, None) for v in voxels[::-1])]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), expected)


@pytest.mark.parametrize("interpolator", INTERPOLATORS)
@pytest.mark.parametrize("dtype", [np.uint32, np.int32, np.int64])
def test_large_label_values_survive_smooth_propagation(interpolator, dtype):
    array = np.zeros((24, 24), dtype)
    array[4:14, 4:20] = 1000
    array[14:20, 6:18] = 70000
    image = sitk.GetImageFromArray(array)
    motion = sitk.Euler2DTransform((12.0, 12.0), 0.2, (0.4, -0.3))
    out = propagate_labels(image, motion, image, interpolator=interpolator)
    assert out.GetPixelID() == image.GetPixelID()
    assert set(np.unique(sitk.GetArrayFromImage(out)).tolist()) == {0, 1000, 70000}


def test_linear_propagation_of_many_labels_breaks_ties_towards_the_smaller_value():
    """300 labels in 3 × 3 blocks, values growing rightwards and downwards, sampled half a
    voxel right and down: inside a block nothing changes, and on block edges the labels'
    indicators tie, so the smaller value, the block's own, wins. The last row and column
    sample outside the atlas: background."""
    values = (np.arange(300, dtype=np.int32) + 1) * 7
    array = np.kron(values.reshape(15, 20), np.ones((3, 3), np.int32))
    image = sitk.GetImageFromArray(array)
    out = sitk.GetArrayFromImage(
        propagate_labels(image, sitk.TranslationTransform(2, (0.5, 0.5)), image, interpolator="linear")
    )
    np.testing.assert_array_equal(out[:-1, :-1], array[:-1, :-1])
    assert (out[-1] == 0).all() and (out[:, -1] == 0).all()


def test_linear_propagation_tie_with_background_goes_to_background():
    image = sitk.GetImageFromArray(np.array([[0, 0, 5, 5, 5, 0]] * 2, np.uint8))
    out = propagate_labels(image, sitk.TranslationTransform(2, (0.5, 0.0)), image, interpolator="linear")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), [[0, 0, 5, 5, 0, 0]] * 2)


def test_linear_one_hot_propagation_follows_a_rotated_disc_better_than_nearest():
    """A disc on a 1 mm grid, rotated by 7° about another point and resampled onto a 0.25 mm
    grid: nearest neighbour copies the 1 mm staircase, the interpolated indicators round it
    off. Dice is against the disc rotated analytically."""
    centre, radius = np.array([18.3, 13.7]), 6.2
    x = np.arange(32.0)
    atlas = sitk.GetImageFromArray((np.hypot(*np.meshgrid(x - centre[0], x - centre[1])) <= radius).astype(np.uint8))
    target = sitk.Image([128, 128], sitk.sitkUInt8)
    target.SetSpacing((0.25, 0.25))
    rotation = sitk.Euler2DTransform((15.5, 15.5), np.deg2rad(7.0), (0.0, 0.0))
    points = np.stack(np.meshgrid(np.arange(128) * 0.25, np.arange(128) * 0.25), axis=-1)  # x, y of each target voxel
    matrix, pivot = np.array(rotation.GetMatrix()).reshape(2, 2), np.array(rotation.GetCenter())
    mapped = (points - pivot) @ matrix.T + pivot  # where the transform takes each target point in the atlas
    truth = np.hypot(*(mapped - centre).transpose(2, 0, 1)) <= radius

    def dice(interpolator: str) -> float:
        out = sitk.GetArrayFromImage(propagate_labels(atlas, rotation, target, interpolator=interpolator)) == 1
        return 2 * (out & truth).sum() / (out.sum() + truth.sum())

    nearest = dice("nearest")
    assert dice("linear") > nearest + 0.005
    assert dice("gaussian") > nearest


def test_propagation_interpolator_is_a_checked_choice():
    assert load_config(None, overrides=["propagation.interpolator=linear"]).propagation.interpolator == "linear"
    with pytest.raises(ConfigError, match="propagation.interpolator"):
        load_config(None, overrides=["propagation.interpolator=bilinear"])
    _, lab = phantom(dim=2, size=8)
    with pytest.raises(AtlassegError, match="unknown label interpolator 'bilinear'"):
        propagate_labels(lab, sitk.Transform(2, sitk.sitkIdentity), lab, interpolator="bilinear")


def test_jlf_spills_into_the_folder_it_is_lent_and_uses_the_threads_it_is_lent(monkeypatch, tmp_path):
    """Candidates beyond the memory budget go to the given folder (removed after fusion), and one thread
    means no thread pool; neither changes the answer."""
    from atlasseg.fusion import jlf

    target, candidates = _jlf_case(np.random.default_rng(2), 4)
    config = FusionConfig(method="jlf")
    expected = make_fuser(target, config=config)
    for candidate in candidates:
        expected.add(*candidate)
    expected = sitk.GetArrayFromImage(expected.result())

    def no_pool(*args, **kwargs):
        raise AssertionError("a thread pool for one thread")

    monkeypatch.setattr(jlf, "ThreadPoolExecutor", no_pool)
    monkeypatch.setattr(JointLabelFusion, "_SLAB_BYTES", 100_000)
    fuser = make_fuser(target, config=config, threads=1, spill_folder=tmp_path)
    for candidate in candidates:
        fuser.add(*candidate)
    assert [p.name.startswith("atlasseg-jlf-") for p in tmp_path.iterdir()] == [True]
    assert len(list(next(tmp_path.iterdir()).glob("*.npy"))) == 2 * len(candidates)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fuser.result()), expected)
    assert not list(tmp_path.iterdir())


def test_jlf_solves_chunks_ahead_in_threads_and_votes_as_with_one(monkeypatch):
    """With threads the weights of later chunks are solved while one votes; the votes (added in chunk order)
    are bit-identical to one thread's."""
    from atlasseg.fusion import jlf

    target, candidates = _jlf_case(np.random.default_rng(3), 5)
    monkeypatch.setattr(JointLabelFusion, "_CHUNK", 1 << 12)  # a few hundred voxels a chunk: many chunks
    original, ahead = jlf._ahead, []

    def counting(pool, function, items, depth):
        ahead.append(len(items))
        return original(pool, function, items, depth)

    monkeypatch.setattr(jlf, "_ahead", counting)
    maps = []
    for threads in (1, 3):
        fuser = make_fuser(target, config=FusionConfig(method="jlf"), threads=threads)
        for candidate in candidates:
            fuser.add(*candidate)
        maps.append({v: sitk.GetArrayFromImage(m) for v, m in fuser.probabilities().items()})
    assert len(ahead) == 1 and ahead[0] > 10  # the threaded run only, in many chunks
    assert maps[0].keys() == maps[1].keys()
    for value in maps[0]:
        np.testing.assert_array_equal(maps[0][value], maps[1][value])


def test_fusion_threads_stay_inside_the_jobs_times_threads_budget():
    from atlasseg.config import ParallelConfig
    from atlasseg.parallel import available_cores, local_threads, thread_budget

    assert local_threads(ParallelConfig(n_jobs=1, itk_threads=1)) == 1
    assert local_threads(ParallelConfig(n_jobs=-1)) == available_cores()
    jobs, threads = thread_budget(ParallelConfig(n_jobs=2), available_cores())
    assert local_threads(ParallelConfig(n_jobs=2)) == jobs * threads <= available_cores()


@pytest.mark.parametrize("normalization", [True, False])
def test_jlf_searches_offsets_in_blocks_as_one_by_one(monkeypatch, normalization):
    """The search stacks a block of offsets' box sums at a time (as many as ``_SEARCH_BYTES`` holds): blocks of
    one offset, of a few (the last one shorter) and of all of them give bit-identical probabilities."""
    from atlasseg.fusion import jlf

    target, candidates = _jlf_case(np.random.default_rng(5), 4)
    config = FusionConfig(method="jlf", patch_radius=1, search_radius=2, patch_normalization=normalization)
    # the whole target (undecided) and the patch's margins: radius 1 is 0, 1 and 1 voxels of 2.5, 1.3 and 1 mm
    box = 18 * (22 + 2) * (20 + 2)
    original, blocks = jlf._window_sums, []

    def recording(array, radii):
        blocks.append(array.shape[0])  # the search's stack of box products
        return original(array, radii)

    monkeypatch.setattr(jlf, "_window_sums", recording)
    maps = []
    for block in (1, 7, 10**6):
        monkeypatch.setattr(JointLabelFusion, "_SEARCH_BYTES", 4 * box * block)
        blocks.clear()
        fuser = make_fuser(target, config=config, threads=1)
        for candidate in candidates:
            fuser.add(*candidate)
        maps.append({v: sitk.GetArrayFromImage(m) for v, m in fuser.probabilities().items()})
        offsets = 3 * 5 * 5  # search radius 2: 1, 2 and 2 voxels
        assert max(blocks) == min(block, offsets) and sum(blocks) == 4 * offsets  # per candidate, in blocks
    for other in maps[1:]:
        assert other.keys() == maps[0].keys()
        for value in maps[0]:
            np.testing.assert_array_equal(other[value], maps[0][value])
