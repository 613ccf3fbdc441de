import numpy as np
import pytest
import SimpleITK as sitk

from atlasseg.errors import AtlassegError
from atlasseg.config import FusionConfig
from atlasseg.fusion import WeightedVote, make_fuser
from atlasseg.propagation import propagate_labels
from conftest import phantom, rigid

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


def test_weighted_fusion_needs_intensities():
    fuser = WeightedVote(intensities(np.zeros((3, 3))), config=FusionConfig(method="local_weighted"))
    with pytest.raises(AtlassegError, match="needs the warped atlas intensities"):
        fuser.add(labels(np.zeros((3, 3))))


@pytest.mark.parametrize("method", ["majority", "global_weighted", "local_weighted", "jlf"])
def test_probabilities_sum_to_one(method):
    rng = np.random.default_rng(1)
    target = rng.uniform(size=(6, 6))
    fuser = make_fuser(intensities(target), config=FusionConfig(method=method))
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


def test_identity_propagation_keeps_labels_exactly(dim):
    _, lab = phantom(dim=dim, size=20)
    out = propagate_labels(lab, sitk.Transform(dim, sitk.sitkIdentity), lab)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(lab))
