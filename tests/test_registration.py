import numpy as np
import pytest
import SimpleITK as sitk

from atlasseg.config import AffineConfig, NonrigidConfig, RegistrationConfig
from atlasseg.errors import RegistrationError
from atlasseg.evaluation import dice_per_label, mean_score
from atlasseg.imageio import normalize_intensity
from atlasseg.pipeline import available_cores
from atlasseg.propagation import propagate_labels
from atlasseg.registration import register, register_affine
from conftest import phantom, rigid, warp

AFFINE_ONLY = RegistrationConfig(nonrigid=NonrigidConfig(enabled=False))


def max_point_error(found: sitk.Transform, truth: sitk.Transform, dim: int, radius: float = 25.0) -> float:
    rng = np.random.default_rng(0)
    points = rng.uniform(-radius, radius, size=(50, dim))
    return max(np.linalg.norm(np.subtract(found.TransformPoint(p.tolist()), truth.TransformPoint(p.tolist()))) for p in points)


def known_affine(dim: int) -> sitk.AffineTransform:
    truth = sitk.AffineTransform(dim)
    matrix = np.asarray(rigid(dim, angle_deg=7.0).GetMatrix()).reshape(dim, dim) @ np.diag([1.08, 0.94, 1.03][:dim])
    truth.SetMatrix(matrix.ravel().tolist())
    truth.SetTranslation([3.0, -4.0, 2.5][:dim])
    return truth


def test_known_affine_is_recovered(dim):
    fixed, _ = phantom(dim=dim, size=48, spacing=1.5)
    truth = known_affine(dim)
    moving = warp(fixed, truth.GetInverse())  # moving(truth(x)) == fixed(x)
    found, record = register_affine(fixed, moving, config=AffineConfig(), seed=1)
    assert max_point_error(found, truth, dim) < 0.75  # half a voxel
    assert record["metric_after"] < record["metric_before"]
    assert [s["stage"] for s in record["stages"]] == ["rigid", "affine"]
    assert all(level["iterations"] >= 1 for s in record["stages"] for level in s["levels"])


def test_different_origins_and_intensity_scales_are_handled():
    """Images in different places and on very different intensity scales still align through physical space."""
    fixed, _ = phantom(dim=3, size=40, spacing=2.0)
    truth = rigid(3, angle_deg=5.0, shift=(2.0, 1.0, -2.0))
    moving = warp(fixed, truth.GetInverse()) * 1.0e5
    shift = (60.0, -35.0, 120.0)
    moving.SetOrigin(np.add(moving.GetOrigin(), shift).tolist())
    moved_truth = sitk.CompositeTransform([sitk.TranslationTransform(3, shift), truth])
    found, _ = register_affine(normalize_intensity(fixed), normalize_intensity(moving), config=AffineConfig(), seed=1)
    assert max_point_error(found, moved_truth, 3, radius=20.0) < 1.0


def test_identical_images_give_identity():
    fixed, _ = phantom(dim=2, size=48)
    found, _ = register(fixed, fixed, config=RegistrationConfig())
    assert max_point_error(found, sitk.Transform(2, sitk.sitkIdentity), 2) < 0.2


def smooth_deformation(image: sitk.Image, *, amplitude: float, seed: int = 3) -> sitk.Transform:
    rng = np.random.default_rng(seed)
    dim = image.GetDimension()
    size = image.GetSize()[::-1]
    from scipy.ndimage import gaussian_filter

    components = []
    for _ in range(dim):
        field = gaussian_filter(rng.standard_normal(size), sigma=size[0] / 6)
        components.append(field / np.abs(field).max() * amplitude)
    field = sitk.GetImageFromArray(np.stack(components, axis=-1), isVector=True)
    field.CopyInformation(image)
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def test_nonrigid_undoes_a_smooth_deformation(dim):
    size = 64 if dim == 2 else 36
    fixed, fixed_labels = phantom(dim=dim, size=size, spacing=1.5 if dim == 2 else 2.0)
    deformation = smooth_deformation(fixed, amplitude=4.0)
    moving = warp(fixed, deformation)
    moving_labels = warp(fixed_labels, deformation, labels=True)
    affine, _ = register(fixed, moving, config=AFFINE_ONLY)
    full, record = register(fixed, moving, config=RegistrationConfig())

    def score(transform):
        return mean_score(dice_per_label(propagate_labels(moving_labels, transform, fixed), fixed_labels))

    assert score(full) > score(affine) + 0.02
    assert score(full) > 0.9
    nonrigid = record["nonrigid"]
    assert nonrigid["metric_after"] < nonrigid["metric_before"]
    assert nonrigid["folded_voxels"] == 0 and nonrigid["jacobian_min"] > 0
    coarse, fine = (level["mesh_size"] for level in nonrigid["levels"])
    assert fine == [2 * m for m in coarse]  # the control grid is refined between levels


def test_transform_maps_fixed_points_to_moving_points():
    """The composite applies the B-spline first, then the affine: check against a manual composition."""
    fixed, _ = phantom(dim=2, size=48)
    moving = warp(fixed, known_affine(2).GetInverse())
    found, _ = register(fixed, moving, config=RegistrationConfig())
    affine, bsplines = found.GetNthTransform(0), [found.GetNthTransform(i) for i in range(1, found.GetNumberOfTransforms())]
    point = (3.0, -7.0)
    manual = point
    for bspline in reversed(bsplines):
        manual = bspline.TransformPoint(manual)
    np.testing.assert_allclose(found.TransformPoint(point), affine.TransformPoint(manual))


def test_registration_is_deterministic():
    """Bitwise-identical transforms for the same inputs, seed and thread count (one thread:
    ITK's multi-threaded metric sums are not reproducible to the last bit)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    fixed, _ = phantom(dim=2, size=48)
    moving = warp(fixed, known_affine(2).GetInverse())
    first, _ = register(fixed, moving, config=RegistrationConfig())
    second, _ = register(fixed, moving, config=RegistrationConfig())
    for i in range(first.GetNumberOfTransforms()):
        assert first.GetNthTransform(i).GetParameters() == second.GetNthTransform(i).GetParameters()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(available_cores())


def test_dimension_mismatch_is_an_error():
    fixed, _ = phantom(dim=2, size=16)
    moving, _ = phantom(dim=3, size=16)
    with pytest.raises(RegistrationError, match="2D"):
        register_affine(fixed, moving, config=AffineConfig(), seed=0)


def test_bspline_kernel_matches_itk_on_an_oblique_anisotropic_grid():
    """The vectorised spline equals SimpleITK's BSplineTransform, and grid refinement is exact."""
    from atlasseg.registration.nonrigid import _ControlGrid, _refine, _tensor

    image, _ = phantom(dim=3, size=12)
    image.SetSpacing((2.0, 1.5, 3.0))
    image.SetDirection(sitk.VersorTransform((0.3, -0.2, 1.0), 0.5).GetMatrix())
    grid = _ControlGrid.over(image, [2, 3, 2])
    coefficients = np.random.default_rng(0).normal(size=(3,) + grid.size[::-1])
    field = _tensor(coefficients, grid.weights(image))
    bspline = grid.transform(coefficients)
    for index in [(0, 0, 0), (5, 7, 3), (11, 11, 11), (10, 2, 6)]:
        point = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(np.subtract(bspline.TransformPoint(point), point), field[(slice(None),) + index[::-1]])
    finer = _ControlGrid.over(image, [4, 6, 4])
    refined = _tensor(_refine(coefficients, grid, finer, image), finer.weights(image))
    np.testing.assert_allclose(refined, field, atol=1e-9)
