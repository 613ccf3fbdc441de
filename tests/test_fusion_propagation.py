import numpy as np
import pytest
import SimpleITK as sitk

from atlasseg.errors import AtlassegError
from atlasseg.fusion import MajorityVote, make_fuser
from atlasseg.propagation import propagate_labels
from conftest import phantom, rigid


def labels(array, dtype=np.uint8) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=dtype))
    image.SetOrigin((5.0, -3.0))
    image.SetSpacing((0.5, 2.0))
    return image


def test_majority_of_three_against_two():
    a, b = np.ones((4, 4)), np.full((4, 4), 2)
    fuser = make_fuser("majority", labels(a))
    for candidate in (a, a, a, b, b):
        fuser.add(labels(candidate))
    result = fuser.result()
    assert (sitk.GetArrayFromImage(result) == 1).all()
    assert result.GetOrigin() == (5.0, -3.0) and result.GetSpacing() == (0.5, 2.0)
    assert result.GetPixelID() == sitk.sitkUInt8


def test_ties_go_to_the_smallest_label_whatever_the_order():
    a, b = np.full((3, 3), 7), np.full((3, 3), 3)
    for order in ((a, b), (b, a)):
        fuser = MajorityVote(labels(a))
        for candidate in order:
            fuser.add(labels(candidate))
        assert (sitk.GetArrayFromImage(fuser.result()) == 3).all()


def test_large_label_values_and_types_survive():
    a = np.array([[0, 300], [1000, 65000]])
    fuser = MajorityVote(labels(a, np.uint16))
    fuser.add(labels(a, np.uint16))
    fuser.add(labels(a, np.uint16))
    fuser.add(labels(np.zeros((2, 2)), np.uint8))
    out = fuser.result()
    assert out.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), a)


def test_fusion_refuses_candidates_off_the_target_grid():
    fuser = MajorityVote(labels(np.zeros((3, 3))))
    with pytest.raises(AtlassegError, match="target grid"):
        fuser.add(sitk.GetImageFromArray(np.zeros((3, 3), np.uint8)))
    with pytest.raises(AtlassegError, match="no candidates"):
        fuser.result()


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
