from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import phantom, rigid, texture, warp
from scipy import ndimage

from atlasseg.config import AffineConfig, NonrigidConfig, RegistrationConfig
from atlasseg.errors import ImageError, RegistrationError
from atlasseg.evaluation import dice_per_label, mean_score
from atlasseg.imageio import normalize_intensity
from atlasseg.parallel import available_cores
from atlasseg.propagation import propagate_labels
from atlasseg.registration import (
    Masks,
    RegistrationDiverged,
    compose,
    jacobian_determinant,
    load_transform,
    read_landmarks,
    register,
    register_affine,
    save_displacement_field,
    save_transform,
)
from atlasseg.registration.affine import locally_normalized
from atlasseg.registration.demons import demons_forces
from atlasseg.registration.pyramid import (
    MIN_AXIS_VOXELS,
    derive_affine_shrink_factors,
    derive_shrink_factors,
    pyramid,
    run_levels,
)

AFFINE_ONLY = RegistrationConfig(nonrigid=NonrigidConfig(enabled=False))


def max_point_error(found: sitk.Transform, truth: sitk.Transform, dim: int, radius: float = 25.0) -> float:
    rng = np.random.default_rng(0)
    points = rng.uniform(-radius, radius, size=(50, dim))
    return max(
        np.linalg.norm(np.subtract(found.TransformPoint(p.tolist()), truth.TransformPoint(p.tolist()))) for p in points
    )


def known_affine(dim: int) -> sitk.AffineTransform:
    truth = sitk.AffineTransform(dim)
    matrix = np.asarray(rigid(dim, angle_deg=7.0).GetMatrix()).reshape(dim, dim) @ np.diag([1.08, 0.94, 1.03][:dim])
    truth.SetMatrix(matrix.ravel().tolist())
    truth.SetTranslation([3.0, -4.0, 2.5][:dim])
    return truth


@pytest.mark.parametrize("stages", [AffineConfig().stages, ("rigid", "affine")], ids=["default", "chained"])
def test_known_affine_is_recovered(dim, stages):
    fixed, _ = phantom(dim=dim, size=48, spacing=1.5)
    truth = known_affine(dim)
    moving = warp(fixed, truth.GetInverse())  # moving(truth(x)) == fixed(x)
    config = AffineConfig(stages=stages)
    found, record = register_affine(fixed, moving, config=config, seed=1)
    assert max_point_error(found, truth, dim) < 0.75  # half a voxel
    assert record["metric_after"] < record["metric_before"]
    assert [s["stage"] for s in record["stages"]] == list(config.stages)
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


def test_nmse_affine_ignores_a_linear_intensity_change_that_misleads_mse():
    """The moving image is the fixed one shifted, its intensities × 0.2 + 0.8 (a flatter, offset scanner):
    NMSE's value is that of the unchanged pair and it recovers the shift; MSE's value is not, and it does not."""
    fixed, _ = phantom(dim=2, size=48, spacing=1.5)
    truth = rigid(2, angle_deg=0.0, shift=(4.0, -3.0))
    moving = warp(fixed, truth.GetInverse())
    changed = moving * 0.2 + 0.8
    config = AffineConfig(stages=("translation",), metric="nmse")
    found, record = register_affine(fixed, changed, config=config, seed=1)
    _, same = register_affine(fixed, moving, config=config, seed=1)
    assert record["metric_before"] == pytest.approx(same["metric_before"], rel=1e-6)
    assert max_point_error(found, truth, 2, radius=20.0) < 0.2
    mse = replace(config, metric="mse")
    wrong, record = register_affine(fixed, changed, config=mse, seed=1)
    _, same = register_affine(fixed, moving, config=mse, seed=1)
    assert abs(record["metric_before"] - same["metric_before"]) > 0.01
    assert max_point_error(wrong, truth, 2, radius=20.0) > 1.0  # 1.3 mm: the pull of the intensity offset


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


@pytest.mark.parametrize("method", ["demons", "bspline"])
def test_affine_then_nonrigid_undoes_a_smooth_deformation(dim, method):
    """The whole engine (affine, then non-rigid) on a phantom: labels follow the deformation."""
    size = 64 if dim == 2 else 36
    fixed, fixed_labels = phantom(dim=dim, size=size, spacing=1.5 if dim == 2 else 2.0)
    deformation = smooth_deformation(fixed, amplitude=4.0)
    moving = warp(fixed, deformation)
    moving_labels = warp(fixed_labels, deformation, labels=True)
    affine, _ = register(fixed, moving, config=AFFINE_ONLY)
    full, record = register(fixed, moving, config=RegistrationConfig(nonrigid=NonrigidConfig(method=method)))

    def score(transform):
        return mean_score(dice_per_label(propagate_labels(moving_labels, transform, fixed), fixed_labels))

    assert score(full) > score(affine) + 0.02
    assert score(full) > 0.9
    nonrigid = record["nonrigid"]
    assert nonrigid["metric_after"] < nonrigid["metric_before"]
    assert nonrigid["folded_voxels"] == 0 and nonrigid["jacobian_min"] > 0
    if method == "bspline":
        coarse, fine = (level["mesh_size"] for level in nonrigid["levels"])
        assert fine == [2 * m for m in coarse]  # the control grid is refined between levels


def test_transform_maps_fixed_points_to_moving_points():
    """The composite applies the B-spline first, then the affine: check against a manual composition."""
    fixed, _ = phantom(dim=2, size=48)
    moving = warp(fixed, known_affine(2).GetInverse())
    found, _ = register(fixed, moving, config=RegistrationConfig())
    affine, bsplines = (
        found.GetNthTransform(0),
        [found.GetNthTransform(i) for i in range(1, found.GetNumberOfTransforms())],
    )
    point = (3.0, -7.0)
    manual = point
    for bspline in reversed(bsplines):
        manual = bspline.TransformPoint(manual)
    np.testing.assert_allclose(found.TransformPoint(point), affine.TransformPoint(manual))


@pytest.mark.parametrize("metric, threads", [("mattes", 1), ("ncc", 2)])
def test_registration_is_deterministic(metric, threads):
    """Bitwise-identical transforms for the same inputs, seed and thread count. ITK's Mattes
    metric adds its per-thread histogram derivatives in whatever order the threads finish,
    so it repeats bitwise only on one thread; the other metrics on any fixed count."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    fixed, _ = phantom(dim=3, size=32)
    moving = warp(fixed, known_affine(3).GetInverse())
    config = RegistrationConfig(affine=AffineConfig(metric=metric))
    first, _ = register(fixed, moving, config=config)
    second, _ = register(fixed, moving, config=config)
    for i in range(first.GetNumberOfTransforms()):
        assert first.GetNthTransform(i).GetParameters() == second.GetNthTransform(i).GetParameters()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(available_cores())


def test_dimension_mismatch_is_an_error():
    fixed, _ = phantom(dim=2, size=16)
    moving, _ = phantom(dim=3, size=16)
    with pytest.raises(RegistrationError, match="2D"):
        register_affine(fixed, moving, config=AffineConfig(), seed=42)


def test_bspline_kernel_matches_itk_on_an_oblique_anisotropic_grid():
    """The vectorised spline equals SimpleITK's BSplineTransform, and grid refinement is exact."""
    from atlasseg.registration.bspline import _ControlGrid, _refine, _tensor

    image, _ = phantom(dim=3, size=12)
    image.SetSpacing((2.0, 1.5, 3.0))
    image.SetDirection(sitk.VersorTransform((0.3, -0.2, 1.0), 0.5).GetMatrix())
    grid = _ControlGrid.over(image, [2, 3, 2])
    coefficients = np.random.default_rng(0).normal(size=(3,) + grid.size[::-1])
    field = _tensor(coefficients, grid.weights(image))
    bspline = grid.transform(coefficients)
    for index in [(0, 0, 0), (5, 7, 3), (11, 11, 11), (10, 2, 6)]:
        point = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(
            np.subtract(bspline.TransformPoint(point), point), field[(slice(None),) + index[::-1]]
        )
    finer = _ControlGrid.over(image, [4, 6, 4])
    refined = _tensor(_refine(coefficients, grid, finer, image), finer.weights(image))
    np.testing.assert_allclose(refined, field, atol=1e-9)


@pytest.mark.parametrize("optimizer", ["regular_step", "gradient_descent", "lbfgsb"])
def test_every_optimizer_recovers_a_known_affine(optimizer):
    fixed, _ = phantom(dim=2, size=48, spacing=1.5)
    truth = known_affine(2)
    moving = warp(fixed, truth.GetInverse())
    config = AffineConfig(optimizer=optimizer, iterations=200)
    found, record = register_affine(fixed, moving, config=config, seed=1)
    assert max_point_error(found, truth, 2) < 0.75
    assert record["optimizer"] == optimizer


def test_iterations_and_learning_rate_take_effect():
    fixed, _ = phantom(dim=2, size=48, spacing=1.5)
    moving = warp(fixed, known_affine(2).GetInverse())
    _, record = register_affine(fixed, moving, config=AffineConfig(iterations=3), seed=1)
    assert max(level["iterations"] for stage in record["stages"] for level in stage["levels"]) == 3
    tiny = AffineConfig(optimizer="gradient_descent", learning_rate=1e-9, stages=("rigid",), iterations=5)
    found, _ = register_affine(fixed, moving, config=tiny, seed=1)
    np.testing.assert_allclose(found.GetParameters(), sitk.Euler2DTransform().GetParameters(), atol=1e-6)


def test_nonrigid_iterations_per_level_take_effect():
    fixed, labels, deformation, _ = textured_pair(2)
    nonrigid = NonrigidConfig(iterations=(7, 2), shrink_factors=(2, 1), smoothing_sigmas=(0.0, 0.0))
    for method in ("demons", "bspline"):
        config = RegistrationConfig(affine=NO_AFFINE, nonrigid=replace(nonrigid, method=method))
        _, record = register(fixed, warp(fixed, deformation), config=config)
        assert [level["iterations"] <= cap for level, cap in zip(record["nonrigid"]["levels"], (7, 2))] == [True] * 2
        if method == "demons":  # demons runs every update it is given
            assert [level["iterations"] for level in record["nonrigid"]["levels"]] == [7, 2]


def test_demons_interpolation_matches_scipy_and_marks_points_off_the_grid():
    from scipy import ndimage

    from atlasseg.registration.demons import _Linear

    rng = np.random.default_rng(0)
    for shape in [(9, 7), (5, 6, 4), (1, 6, 5)]:  # a one-voxel axis too
        volume = rng.random(shape).astype(np.float32)
        coords = (rng.random((len(shape), 50)) * (np.array(shape)[:, None] + 2) - 1).astype(np.float32)
        coords[np.array(shape) == 1] = 0.0  # on the one-voxel axis's only voxel
        interpolate = _Linear(coords, shape)
        expected = ndimage.map_coordinates(volume, coords, order=1, mode="nearest")
        np.testing.assert_allclose(interpolate(volume), expected, atol=1e-5)
        np.testing.assert_allclose(interpolate(np.stack([volume, 2 * volume])), [expected, 2 * expected], atol=1e-5)
        off_grid = ((coords < 0) | (coords > np.array(shape)[:, None] - 1)).any(axis=0)
        assert (interpolate.outside == off_grid).all() and off_grid.any() and not off_grid.all()


def test_demons_on_thick_slices_neither_folds_nor_overshoots():
    """Steps of at most half the smallest voxel: on 2 × 2 × 8 mm voxels a step of half the mean
    voxel (as ITK's demons take) is a whole in-plane voxel, and folded voxels appeared."""
    fixed, labels = texture(dim=3, size=32)
    for image in (fixed, labels):
        image.SetSpacing((2.0, 2.0, 8.0))
    deformation = smooth_deformation(fixed, amplitude=4.0)
    moving = warp(fixed, deformation)
    points = [
        fixed.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]])
        for idx in (np.argwhere(np.ones((20, 20, 20))) + 6)[::13]
    ]
    found, record = register(fixed, moving, config=RegistrationConfig(affine=NO_AFFINE))
    assert record["nonrigid"]["folded_voxels"] == 0
    before = landmark_error(sitk.Transform(3, sitk.sitkIdentity), deformation, points)
    assert landmark_error(found, deformation, points) < 0.65 * before


def test_mutual_information_aligns_an_intensity_inverted_twin():
    fixed, _ = phantom(dim=2, size=64, spacing=1.5)
    truth = rigid(2, angle_deg=6.0, shift=(3.0, -2.0))
    moving = sitk.InvertIntensity(warp(fixed, truth.GetInverse()), 1.0)
    config = AffineConfig(metric="mattes", stages=("rigid",), sampling_strategy="regular", sampling_percentage=0.5)
    found, _ = register_affine(fixed, moving, config=config, seed=1)
    assert max_point_error(found, truth, 2) < 0.75


def textured_pair(dim: int):
    """A texture, its smoothly deformed twin (moving(x) = fixed(D(x))), labels, and points inside."""
    size = 64 if dim == 2 else 32
    fixed, labels = texture(dim=dim, size=size, spacing=1.5 if dim == 2 else 2.0)
    deformation = smooth_deformation(fixed, amplitude=4.0)
    inner = np.argwhere(np.ones((size - 2 * (size // 5),) * dim)) + size // 5
    points = [fixed.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]]) for idx in inner[::13]]
    return fixed, labels, deformation, points


def landmark_error(transform: sitk.Transform, deformation: sitk.Transform, points) -> float:
    """Mean distance between each point and where the registration sends it back: |D(T(p)) − p|."""
    return float(
        np.mean(
            [np.linalg.norm(np.subtract(deformation.TransformPoint(transform.TransformPoint(p)), p)) for p in points]
        )
    )


BSPLINE = NonrigidConfig(method="bspline", iterations=50)
NO_AFFINE = AffineConfig(stages=())  # the pair shares its geometry: the non-rigid stage alone is tested


@pytest.mark.parametrize(
    "nonrigid, dims, reduction",
    [
        (BSPLINE, (2, 3), 0.8),
        (replace(BSPLINE, metric="ants_ncc"), (3,), 0.8),
        (replace(BSPLINE, metric="mse"), (2,), 0.5),
        (replace(BSPLINE, metric="nmse"), (2,), 0.5),
        (replace(BSPLINE, metric="mattes"), (2,), 0.5),
        (NonrigidConfig(method="demons"), (2, 3), 0.5),
        (NonrigidConfig(method="demons", demons_variant="symmetric"), (2,), 0.5),
    ],
    ids=[
        "bspline-ncc",
        "bspline-ants_ncc",
        "bspline-mse",
        "bspline-nmse",
        "bspline-mattes",
        "demons",
        "demons-symmetric",
    ],
)
def test_nonrigid_undoes_a_known_deformation(nonrigid, dims, reduction):
    for dim in dims:
        fixed, labels, deformation, points = textured_pair(dim)
        moving, moving_labels = warp(fixed, deformation), warp(labels, deformation, labels=True)
        found, record = register(fixed, moving, config=RegistrationConfig(affine=NO_AFFINE, nonrigid=nonrigid))
        before = landmark_error(sitk.Transform(dim, sitk.sitkIdentity), deformation, points)
        assert landmark_error(found, deformation, points) < (1 - reduction) * before, dim
        dice = dice_per_label(propagate_labels(moving_labels, found, fixed), labels)[1]
        assert dice > (0.95 if reduction >= 0.8 else 0.9), dim
        assert record["nonrigid"]["metric_after"] < record["nonrigid"]["metric_before"]
        assert record["nonrigid"]["status"] == "ok"  # folding within max_folded_fraction


@pytest.mark.parametrize("dim, floor", [(2, 0.97), (3, 0.87)])
def test_lncc_demons_see_through_an_intensity_bias_that_misleads_ssd(dim, floor):
    """A known smooth deformation of the phantom, the moving image then multiplied by a ramp from 0.4 to
    1.6 along x: the SSD forces chase the bias, the local correlation does not (measured, both with
    update_sigma 3.4 mm: mean Dice 0.893 SSD vs 0.981 LNCC in 2D, 0.817 vs 0.887 in 3D; 0.901 and
    0.843 before registration)."""
    fixed, labels = phantom(dim=dim, size=64 if dim == 2 else 32, spacing=2.0)
    deformation = smooth_deformation(fixed, amplitude=4.0)
    moving, moving_labels = warp(fixed, deformation), warp(labels, deformation, labels=True)
    array = sitk.GetArrayFromImage(moving)
    biased = sitk.GetImageFromArray((array * np.linspace(0.4, 1.6, array.shape[-1])).astype(np.float32))
    biased.CopyInformation(moving)
    dice = {}
    for force in ("ssd", "lncc"):
        nonrigid = NonrigidConfig(demons_force=force, update_sigma=3.4)
        found, record = register(fixed, biased, config=RegistrationConfig(affine=NO_AFFINE, nonrigid=nonrigid))
        dice[force] = mean_score(
            dice_per_label(propagate_labels(moving_labels, found, fixed), labels, labels=[1, 2, 3, 4])
        )
        assert record["nonrigid"]["folded_voxels"] == 0
    assert dice["lncc"] > floor
    assert dice["lncc"] > dice["ssd"] + 0.03


@pytest.mark.parametrize("dim", [2, 3])
def test_lncc_demons_converge_and_more_iterations_change_nothing(dim):
    """The LNCC step search stops every level on its own (``converged``, well inside a budget of 300 updates), with
    a budget three times larger gives the same field (a fixed step size kept
    moving the field round the optimum, and its Dice fell as the budget grew)."""
    fixed, labels = phantom(dim=dim, size=64 if dim == 2 else 32, spacing=2.0)
    deformation = smooth_deformation(fixed, amplitude=4.0)
    moving = warp(fixed, deformation)
    fields = []
    for budget in (300, 900):
        nonrigid = NonrigidConfig(demons_force="lncc", update_sigma=3.4, iterations=(budget, budget))
        found, record = register(fixed, moving, config=RegistrationConfig(affine=NO_AFFINE, nonrigid=nonrigid))
        levels = record["nonrigid"]["levels"]
        assert [level["stop_condition"] for level in levels] == ["converged"] * 2
        assert all(level["iterations"] < 150 for level in levels)
        fields.append(sitk.GetArrayFromImage(found.GetNthTransform(1).GetDisplacementField()))
    assert np.array_equal(fields[0], fields[1]) and np.abs(fields[0]).max() > 1.0


def test_auto_demons_force_is_lncc_only_at_coarse_levels_of_a_body_region_scan():
    """``demons_force: auto`` (the default) chooses per level from the field of view: a 200 mm scan gets the local
    correlation at its coarse levels and SSD at full resolution, a 60 mm crop SSD throughout; a list is taken as
    given; each level's record says which ran."""

    def image(size, spacing):
        blank = sitk.Image(size, sitk.sitkFloat32)
        blank.SetSpacing(spacing)
        return blank

    body, crop = image((100, 100, 25), (2.0, 2.0, 8.0)), image((60, 60, 60), (1.0, 1.0, 1.0))
    auto = NonrigidConfig()
    assert auto.demons_force == "auto"
    assert demons_forces(auto, body, [(4, 4, 1), (2, 2, 1), (1, 1, 1)]) == ["lncc", "lncc", "ssd"]
    assert demons_forces(auto, crop, [2, 1]) == ["ssd", "ssd"]
    assert demons_forces(NonrigidConfig(demons_force=("ssd", "lncc")), body, [2, 1]) == ["ssd", "lncc"]
    assert demons_forces(NonrigidConfig(demons_force="lncc"), crop, [2, 1]) == ["lncc", "lncc"]
    fixed, _ = phantom(dim=3, size=24, spacing=8.0)  # 192 mm across: a body region
    moving = warp(fixed, smooth_deformation(fixed, amplitude=8.0))
    _, record = register(fixed, moving, config=RegistrationConfig(affine=NO_AFFINE, nonrigid=auto))
    assert [level["force"] for level in record["nonrigid"]["levels"]] == ["lncc", "ssd"]


def test_landmarks_recover_a_rotation_intensities_alone_miss(tmp_path):
    fixed, _ = phantom(dim=3, size=32)
    truth = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.3, -0.2, np.deg2rad(120.0), (4.0, -2.0, 3.0))
    moving = warp(fixed, truth.GetInverse())
    fixed_points = np.array([[10.0, 0, 0], [0, 14.0, 0], [0, 0, 9.0], [-6.0, -8.0, 5.0]])
    moving_points = np.array([truth.TransformPoint(p.tolist()) for p in fixed_points])
    np.savetxt(tmp_path / "fixed.csv", fixed_points, delimiter=",", header="x,y,z", comments="")
    np.savetxt(tmp_path / "moving.csv", moving_points, delimiter=",")
    landmarks = (read_landmarks(tmp_path / "fixed.csv"), read_landmarks(tmp_path / "moving.csv"))
    alone, _ = register_affine(
        fixed, moving, config=AffineConfig(initialization="landmarks", stages=()), seed=1, landmarks=landmarks
    )
    assert max_point_error(alone, truth, 3, radius=15.0) < 1e-3
    refined, _ = register_affine(
        fixed, moving, config=AffineConfig(initialization="landmarks"), seed=1, landmarks=landmarks
    )
    assert max_point_error(refined, truth, 3, radius=15.0) < 1.0
    intensity_only, _ = register_affine(fixed, moving, config=AffineConfig(), seed=1)
    assert max_point_error(intensity_only, truth, 3, radius=15.0) > 5.0


def test_landmark_files_in_every_format_give_the_same_points(tmp_path):
    image, _ = phantom(dim=3, size=8)
    points = np.array([[1.5, -2.0, 3.25], [-4.0, 5.0, 0.5], [0.0, 0.0, -1.0]])
    (tmp_path / "a.csv").write_text(
        "name,x,y,z\n" + "".join(f"p{i},{x},{y},{z}\n" for i, (x, y, z) in enumerate(points))
    )
    ras = points * [-1, -1, 1]
    (tmp_path / "a.fcsv").write_text(
        "# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        + "".join(f"vtk{i},{x},{y},{z},0,0,0,1,1,1,0,F-{i},,\n" for i, (x, y, z) in enumerate(ras))
    )
    (tmp_path / "a.txt").write_text("point\n3\n" + "".join(f"{x} {y} {z}\n" for x, y, z in points))
    index = [image.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points]
    (tmp_path / "i.txt").write_text("index\n3\n" + "".join(" ".join(map(str, i)) + "\n" for i in index))
    for name in ("a.csv", "a.fcsv", "a.txt", "i.txt"):
        np.testing.assert_allclose(read_landmarks(tmp_path / name, image=image), points, atol=1e-9, err_msg=name)
    (tmp_path / "bad.txt").write_text("hello\n")
    with pytest.raises(ImageError, match="bad.txt"):
        read_landmarks(tmp_path / "bad.txt")


def test_a_fixed_mask_keeps_an_artefact_out_of_the_metric():
    fixed, _ = phantom(dim=2, size=64, spacing=1.5)
    truth = rigid(2, angle_deg=5.0, shift=(3.0, -2.0))
    moving = warp(fixed, truth.GetInverse())
    array = sitk.GetArrayFromImage(fixed)
    array[:, :20] = 1.0  # a bright band in the target only
    spoiled = sitk.GetImageFromArray(array)
    spoiled.CopyInformation(fixed)
    mask = sitk.Cast(spoiled < 0.99, sitk.sitkUInt8)
    config = AffineConfig(stages=("rigid",), metric="mse")
    with_mask, _ = register_affine(spoiled, moving, config=config, seed=1, masks=Masks(fixed=mask))
    without, _ = register_affine(spoiled, moving, config=config, seed=1)
    assert max_point_error(with_mask, truth, 2, radius=20.0) < 0.75 < max_point_error(without, truth, 2, radius=20.0)


def test_jacobian_of_the_identity_is_exactly_one(dim):
    image, _ = phantom(dim=dim, size=16)
    for identity in (
        sitk.Transform(dim, sitk.sitkIdentity),
        compose(sitk.AffineTransform(dim), sitk.BSplineTransform(dim)),
    ):
        assert np.all(sitk.GetArrayFromImage(jacobian_determinant(identity, image)) == 1.0)


def test_transforms_save_load_and_compose(tmp_path):
    fixed, _ = phantom(dim=3, size=24)
    moving = warp(fixed, known_affine(3).GetInverse())
    found, _ = register(fixed, moving, config=RegistrationConfig(nonrigid=NonrigidConfig(grid_spacing=12.0)))
    points = [fixed.TransformIndexToPhysicalPoint(i) for i in [(3, 4, 5), (12, 12, 12), (20, 7, 15)]]
    expected = np.array([found.TransformPoint(p) for p in points])
    save_transform(found, tmp_path / "t.h5")
    save_displacement_field(found, fixed, tmp_path / "field.nii.gz")
    loaded = sitk.ReadTransform(str(tmp_path / "t.h5"))  # what other ITK tools read
    np.testing.assert_allclose([loaded.TransformPoint(p) for p in points], expected, atol=1e-9)
    field = load_transform(tmp_path / "field.nii.gz")
    np.testing.assert_allclose([field.TransformPoint(p) for p in points], expected, atol=1e-4)  # float32 vectors
    affine = found.GetNthTransform(0)
    save_transform(affine, tmp_path / "a.tfm")
    again = compose(load_transform(tmp_path / "a.tfm"), found.GetNthTransform(1))
    np.testing.assert_allclose([again.TransformPoint(p) for p in points], expected, atol=1e-6)
    with pytest.raises(RegistrationError, match="unknown transform file type"):
        save_transform(found, tmp_path / "t.png")
    with pytest.raises(RegistrationError, match="not found"):
        load_transform(tmp_path / "missing.h5")


def test_a_divergent_registration_is_flagged_not_returned():
    fixed, _ = phantom(dim=2, size=48, spacing=1.5)
    moving = warp(fixed, rigid(2, angle_deg=5.0).GetInverse())
    wild = RegistrationConfig(
        affine=AffineConfig(learning_rate=50.0, metric="mse", translation_search=0.0),
        nonrigid=NonrigidConfig(enabled=False),
    )
    with pytest.raises(
        RegistrationDiverged, match="affine registration diverged: the metric cannot be evaluated"
    ) as caught:
        register(fixed, moving, config=wild)
    assert caught.value.record["status"] == "diverged"


def test_images_that_barely_overlap_are_flagged():
    fixed, _ = phantom(dim=2, size=48, spacing=1.5)
    moving = sitk.Image(fixed)
    moving.SetOrigin(np.add(fixed.GetOrigin(), (60.0, 0.0)).tolist())  # overlaps a sliver of the target
    config = RegistrationConfig(
        affine=AffineConfig(initialization="none", stages=()), nonrigid=NonrigidConfig(enabled=False)
    )
    with pytest.raises(RegistrationDiverged, match="foreground maps inside the atlas"):
        register(fixed, moving, config=config)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({}, None),
        ({"metric_after": 0.5}, "metric worse than at the start"),
        ({"metric_after": float("nan")}, "cannot be evaluated"),
        ({"overlap": 0.3}, "30% of the target's foreground maps inside"),
        ({"folded_fraction": 0.05}, "5.0% of the target's foreground is folded"),
    ],
)
def test_result_checks_name_the_reason(change, reason):
    from atlasseg.registration.checks import check_result

    record = {"metric_before": 0.2, "metric_after": 0.1, "overlap": 1.0, "folded_fraction": 0.0, **change}
    if reason is None:
        check_result("non-rigid", record, min_overlap=0.5, max_folded_fraction=0.01)
        assert record["status"] == "ok"
    else:
        with pytest.raises(RegistrationDiverged, match=reason):
            check_result("non-rigid", record, min_overlap=0.5, max_folded_fraction=0.01)


def test_control_grid_never_outnumbers_thick_slices():
    """On 8 mm slices a 6 mm grid stays coarser than two slices along z, and the grids still nest."""
    from atlasseg.registration.bspline import _meshes

    image = sitk.Image([128, 128, 15], sitk.sitkFloat32)
    image.SetSpacing((2.5, 2.5, 8.0))
    meshes = _meshes(image, grid_spacing=6.0, levels=3)
    assert meshes[-1][:2] == [52, 52]  # about 6 mm in-plane
    assert all(m[2] <= 7 for m in meshes)  # spans of at least two 8 mm slices
    for coarse, fine in zip(meshes, meshes[1:]):
        assert all(f in (c, 2 * c) for c, f in zip(coarse, fine))


def test_jacobian_is_physical_on_an_oblique_flipped_grid():
    """An affine's Jacobian is its determinant whatever the grid's direction (LPS flips, oblique)."""
    image, _ = phantom(dim=3, size=12)
    image.SetSpacing((1.0, 1.5, 3.0))
    truth = known_affine(3)
    expected = np.linalg.det(np.asarray(truth.GetMatrix()).reshape(3, 3))
    for direction in [
        (1, 0, 0, 0, 1, 0, 0, 0, 1),
        (-1, 0, 0, 0, -1, 0, 0, 0, 1),
        sitk.VersorTransform((0.3, -0.2, 1.0), 0.5).GetMatrix(),
    ]:
        image.SetDirection(direction)
        np.testing.assert_allclose(sitk.GetArrayFromImage(jacobian_determinant(truth, image)), expected, rtol=1e-5)


def test_intensities_resample_linear_or_bspline_through_a_transform():
    from atlasseg.propagation import propagate_intensities

    image, _ = phantom(dim=2, size=48)  # 2 mm voxels
    array = sitk.GetArrayFromImage(image)
    whole = sitk.TranslationTransform(2, (4.0, 0.0))  # two voxels along x: both interpolators are exact
    half = sitk.TranslationTransform(2, (1.0, 0.0))
    results = {}
    for interpolator in ("linear", "bspline"):
        moved = sitk.GetArrayFromImage(propagate_intensities(image, whole, image, interpolator=interpolator))
        np.testing.assert_allclose(moved[:, :-2], array[:, 2:], atol=1e-5)
        results[interpolator] = sitk.GetArrayFromImage(
            propagate_intensities(image, half, image, interpolator=interpolator)
        )
    assert np.abs(results["linear"] - results["bspline"]).max() > 1e-3  # really another interpolator
    with pytest.raises(ImageError, match="unknown intensity interpolator 'nearest'"):
        propagate_intensities(image, half, image, interpolator="nearest")


@pytest.mark.parametrize(
    "change, status, reason",
    [
        ({"overlap": 0.49}, "rejected", "non-rigid registration rejected: too little overlap: only 49%"),
        ({"folded_fraction": 0.05}, "rejected", "non-rigid registration rejected: too much folding: 5.0%"),
        ({"metric_after": 0.5, "overlap": 0.49}, "diverged", "non-rigid registration diverged: metric worse"),
    ],
)
def test_diverged_is_said_only_of_a_real_divergence(change, status, reason):
    """A 49 % overlap against min_overlap 50 % is too little overlap, not a divergence."""
    from atlasseg.registration.checks import check_result

    record = {"metric_before": 0.2, "metric_after": 0.1, "overlap": 1.0, "folded_fraction": 0.0, **change}
    with pytest.raises(RegistrationDiverged) as caught:
        check_result("non-rigid", record, min_overlap=0.5, max_folded_fraction=0.01)
    assert str(caught.value).startswith(reason) and record["status"] == status
    assert ("diverged" in str(caught.value)) == (status == "diverged")


def test_per_level_affine_metrics_follow_the_convention_of_metric_before_and_after():
    """One convention in the record: ITK's per-level correlation (−NCC²) is reported as 1 − |NCC|, as the
    stage's metric_before/after are, so the last (full-resolution, unsmoothed) level ends near metric_after."""
    from atlasseg.registration.affine import register_affine

    fixed, _ = texture(dim=2, size=48, seed=1)
    moving = warp(fixed, rigid(2, angle_deg=4.0, shift=(3.0, -2.0)))
    config = AffineConfig(
        metric="ncc",
        stages=("rigid",),
        shrink_factors=(2, 1),
        smoothing_sigmas=(2.0, 0.0),
        sampling_strategy="none",
        sampling_percentage=1.0,
    )
    _, record = register_affine(fixed, moving, config=config, seed=42)
    levels = record["stages"][0]["levels"]
    assert all(0.0 <= level["metric"] <= 1.0 for level in levels)
    assert levels[-1]["metric"] == pytest.approx(record["metric_after"], abs=0.02)
    assert record["metric_after"] < record["metric_before"]


def _grid(size, spacing) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(list(spacing))
    return image


@pytest.mark.parametrize(
    "size, spacing, expected",
    [
        ((35, 50, 35), (1.0, 1.0, 1.0), [(2, 2, 2), (1, 1, 1)]),  # a hippocampus crop: today's [2, 1]
        ((256, 256, 31), (1.25, 1.25, 7.7), [(8, 8, 1), (4, 4, 1), (2, 2, 1), (1, 1, 1)]),  # abdomen, thick slices
        ((128, 96), (2.0, 2.0), [(4, 4), (2, 2), (1, 1)]),
    ],
    ids=["hippocampus", "abdomen", "2d"],
)
def test_derived_pyramid_follows_extent_and_spacing(size, spacing, expected):
    assert derive_shrink_factors(size, spacing) == expected


def test_derived_pyramid_never_bins_a_thick_axis_below_its_minimum():
    for size, spacing in [
        ((512, 512, 12), (0.5, 0.5, 5.0)),
        ((400, 400, 20), (0.4, 0.4, 10.0)),
        ((300, 9, 300), (1.0, 3.0, 1.0)),
    ]:
        levels = derive_shrink_factors(size, spacing)
        assert levels[-1] == (1, 1, 1) and len(levels) >= 4
        for shrink in levels:
            binned = np.asarray(size) // np.asarray(shrink)
            assert np.all((binned >= MIN_AXIS_VOXELS) | (np.asarray(shrink) == 1)), (size, shrink)
            # a thick axis is binned only once the level's voxels outgrow its own
            binned_mm = np.asarray(shrink) * np.asarray(spacing)
            assert np.all((np.asarray(shrink) == 1) | (binned_mm <= max(shrink) * min(spacing) + 1e-9)), (size, shrink)


@pytest.mark.parametrize(
    "size, spacing, expected",
    [
        ((35, 50, 35), (1.0, 1.0, 1.0), [(4, 4, 4), (2, 2, 2)]),  # a hippocampus crop: the [4, 2] it replaced
        ((128, 128, 13), (2.5, 2.5, 8.0), [(4, 4, 1), (2, 2, 1)]),  # a cardiac stack: all 13 slices kept
        ((256, 256, 34), (1.25, 1.25, 7.7), [(8, 8, 1), (4, 4, 1)]),  # abdomen: 64 voxels across at the finest
        ((512, 512, 200), (0.7, 0.7, 1.0), [(16, 16, 11), (8, 8, 5)]),  # a CT of the trunk
    ],
    ids=["hippocampus", "cardiac", "abdomen", "ct"],
)
def test_derived_affine_pyramid_stops_at_64_voxels_across_and_keeps_thick_slices(size, spacing, expected):
    """Never full resolution (the non-rigid stage refines), at least two levels, the finest the coarsest with
    64 voxels across the longest extent or more."""
    assert derive_affine_shrink_factors(size, spacing) == expected


def test_an_anisotropic_affine_pyramid_runs_level_by_level_and_recovers_a_known_affine():
    """On 4.5 mm slices of 1.5 mm pixels the derived affine pyramid bins the slices at no level, which one ITK
    ``Execute`` (one factor for every axis) cannot do: level by level the known affine is still recovered, and
    each level is recorded with its factors per axis."""
    image, _ = phantom(dim=3, size=48, spacing=1.5)
    grid = sitk.Image([48, 48, 16], sitk.sitkFloat32)
    grid.SetSpacing([1.5, 1.5, 4.5])
    grid.SetOrigin(image.GetOrigin())
    fixed = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    truth = known_affine(3)
    moving = sitk.Resample(image, grid, truth.GetInverse(), sitk.sitkLinear, 0.0)
    config = AffineConfig(sampling_strategy="none")  # every voxel: sampling noise moves the result by ~1 mm here
    found, record = register_affine(fixed, moving, config=config, seed=1)
    assert [level["shrink"] for level in record["stages"][0]["levels"]] == [[4, 4, 1], [2, 2, 1]]
    assert max_point_error(found, truth, 3, radius=20.0) < 1.0  # under a pixel ([4, 2], slices binned: 1.4 mm)
    assert record["metric_after"] < record["metric_before"]


def test_an_explicit_pyramid_wins_and_lists_fit_the_derived_levels():
    image = _grid((256, 256, 31), (1.25, 1.25, 7.7))
    shrinks, sigmas, iterations = pyramid(NonrigidConfig(shrink_factors="auto", iterations=(50, 10)), image)
    assert len(shrinks) == 4 and sigmas == [0.0] * 4 and iterations == [50, 50, 50, 10]
    shrinks, _, iterations = pyramid(NonrigidConfig(shrink_factors=(2, 1), smoothing_sigmas=(1.0, 0.0)), image)
    assert shrinks == [2, 1] and iterations == [50, 10]


def _organ_phantom() -> tuple[sitk.Image, sitk.Image]:
    """An ellipsoid body (1) with an off-centre organ (2) on a 96 × 96 × 12 grid of 1 × 1 × 4 mm voxels, both
    with a faint texture (smooth noise, 2 mm, 0.05 of the organ's intensity in spread) as organs in MRI have."""
    size, spacing = (96, 96, 12), (1.0, 1.0, 4.0)
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(size[::-1], spacing[::-1])], indexing="ij")
    labels = np.zeros(size[::-1], np.uint8)
    labels[(x / 42) ** 2 + (y / 36) ** 2 + (z / 30) ** 2 <= 1] = 1
    labels[((x + 12) / 14) ** 2 + ((y - 6) / 11) ** 2 + (z / 18) ** 2 <= 1] = 2
    texture = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=labels.shape), 2.0 / np.array(spacing[::-1]))
    texture *= 0.05 / texture.std()
    image = sitk.GetImageFromArray(np.array([0.0, 0.3, 1.0], np.float32)[labels])
    image.SetSpacing(spacing)
    image.SetOrigin([-(n - 1) * s / 2 for n, s in zip(size, spacing)])
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, 1.0))
    out = sitk.GetImageFromArray((smooth + np.where(labels > 0, texture, 0.0)).astype(np.float32))
    out.CopyInformation(image)
    return out, label_image


def _bump(image: sitk.Image, *, amplitude: float, centre=(-12.0, 6.0, 0.0), width: float = 22.0) -> sitk.Transform:
    """A displacement of ``amplitude`` mm along x (0.6 of it along y) in a Gaussian bump round ``centre``."""
    points = [
        np.asarray(image.GetOrigin()[a]) + np.indices(image.GetSize()[::-1])[2 - a] * image.GetSpacing()[a]
        for a in range(3)
    ]
    bump = amplitude * np.exp(-sum((p - c) ** 2 for p, c in zip(points, centre)) / (2 * width**2))
    field = sitk.GetImageFromArray(np.stack([bump, 0.6 * bump, 0 * bump], axis=-1), isVector=True)
    field.CopyInformation(image)
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def test_derived_pyramid_recovers_a_large_deformation_on_thick_slices():
    """The organ moves by up to 17.5 mm, 18 % of the 96 mm field of view: the default config's derived pyramid
    (three levels in-plane, none across the 4 mm slices) brings it back; the old fixed [2, 1] pyramid cannot reach
    that far (measured: organ Dice 0.24 before, 0.95 derived, 0.77 with [2, 1]). The organ's texture matters: on
    flat intensities the forces act at its edges alone, which the default update smoothing (1.7 mm) spreads
    thin, and 50 updates a level reach only 0.86 derived (0.65 with [2, 1]; 0.91 without update smoothing)."""
    fixed, labels = _organ_phantom()
    deformation = _bump(fixed, amplitude=15.0)
    moving, moving_labels = warp(fixed, deformation), warp(labels, deformation, labels=True)
    dice = {}
    for name, shrink in [("auto", "auto"), ("old", (2, 1))]:
        nonrigid = NonrigidConfig(shrink_factors=shrink)  # the default but for the pyramid
        found, record = register(fixed, moving, config=RegistrationConfig(affine=NO_AFFINE, nonrigid=nonrigid))
        dice[name] = dice_per_label(propagate_labels(moving_labels, found, fixed), labels, labels=[2])[2]
        assert record["nonrigid"]["folded_voxels"] == 0
    assert [level["shrink"] for level in record["nonrigid"]["levels"]] == [2, 1]
    assert dice_per_label(moving_labels, labels, labels=[2])[2] < 0.3
    assert dice["auto"] >= 0.9 > dice["old"]


def _long_body() -> tuple[np.ndarray, np.ndarray]:
    """A trunk along z (1) with three organs (2, 3, 4) at different heights, 48 × 48 × 40 voxels of 3 × 3 × 6 mm."""
    size, spacing = (48, 48, 40), (3.0, 3.0, 6.0)
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(size[::-1], spacing[::-1])], indexing="ij")
    x, y = x - 70.5, y - 70.5
    labels = np.zeros(size[::-1], np.uint8)
    labels[(x / 60) ** 2 + (y / 45) ** 2 <= 1] = 1
    for value, (cx, cy, cz, r) in enumerate([(-25, 5, 70, 22), (20, -10, 130, 18), (-5, 15, 190, 20)], 2):
        labels[(x - cx) ** 2 + (y - cy) ** 2 + ((z - cz) * 0.8) ** 2 <= r * r] = value
    return np.array([0.0, 0.3, 1.0, 0.6, 0.8], np.float32)[labels], labels


def _slab(array: np.ndarray, first: int, *, labels: bool = False) -> sitk.Image:
    """Slices ``first`` to ``first + 27``, origin 0 (a header that says nothing of where the anatomy is)."""
    out = sitk.GetImageFromArray(array[first : first + 28])
    out.SetSpacing((3.0, 3.0, 6.0))
    return out if labels else sitk.SmoothingRecursiveGaussian(out, 2.0)


def test_translation_search_finds_anatomy_that_fields_of_view_put_far_from_the_centres():
    """Two scans of one body covering stretches 48 mm apart (29 % of their 168 mm along z): from the image
    centres the affine stops in a local optimum; the search's start (± 20 % of the extent) lets it reach the
    truth (measured: organ Dice 0.42 and 0.01 without the search, 1.0 with it), on the fixed ``[4, 2]`` pyramid
    that bins the 6 mm slices as the 3 mm voxels (the derived one, ``(4, 4, 2), (2, 2, 1)``, reaches it unaided)."""
    image, labels = _long_body()
    fixed, fixed_labels = _slab(image, 0), _slab(labels, 0, labels=True)
    moving, moving_labels = _slab(image, 8), _slab(labels, 8, labels=True)
    dice = {}
    for search in (0.0, 0.2):
        config = AffineConfig(translation_search=search, shrink_factors=(4, 2))
        found, record = register_affine(fixed, moving, config=config, seed=42)
        dice[search] = dice_per_label(propagate_labels(moving_labels, found, fixed), fixed_labels, labels=[2, 3])
    assert max(dice[0.0].values()) < 0.5
    assert min(dice[0.2].values()) > 0.95
    assert abs(record["translation_search"]["shift"][2]) > 20


def test_translation_map_peaks_at_the_shift_between_two_fields_of_view():
    """Two windows of one random field, 5 voxels apart along x and 3 along z (numpy's last and first axes): the
    masked NCC is 1 at exactly that shift, counts the overlap right, and a moving mask that hides the overlap's
    far part moves neither."""
    from scipy import ndimage

    from atlasseg.registration.affine import translation_map

    rng = np.random.default_rng(3)
    field = ndimage.gaussian_filter(rng.normal(size=(30, 40, 40)), 1.5)
    reach = (4, 6, 7)
    fixed = sitk.GetImageFromArray(field[8:20, 10:30, 12:28])
    shift = np.array((3, 0, -5))
    origin = np.array((8, 10, 12)) - shift - reach  # moving voxel x + shift (+ reach) is fixed voxel x
    moving_array = field[tuple(slice(o, o + n + 2 * r) for o, n, r in zip(origin, (12, 20, 16), reach))]
    moving = sitk.GetImageFromArray(moving_array)
    ncc, count = translation_map(fixed, moving, None, None, reach)
    peak = np.unravel_index(np.argmax(ncc), ncc.shape)
    assert tuple(np.asarray(peak) - reach) == tuple(shift) and ncc[peak] == pytest.approx(1.0, abs=1e-9)
    assert count[peak] == 12 * 20 * 16 and count[0, 0, 0] == 12 * 20 * 16  # the moving grid covers every shift
    mask = np.ones(moving_array.shape, np.uint8)
    mask[:, :, -14:] = 0
    masked, masked_count = translation_map(fixed, moving, None, sitk.GetImageFromArray(mask), reach)
    assert np.unravel_index(np.argmax(masked), masked.shape) == peak and masked_count[peak] < count[peak]


def test_translation_search_keeps_a_start_that_no_shift_brings_within_reach():
    """The start maps the atlas a metre away: no shift in reach overlaps it, so the search proposes none (it used
    to name the map's corner) and the start stays."""
    from atlasseg.registration.affine import _search_start

    image, _ = _long_body()
    far = sitk.TranslationTransform(3, (1000.0, 0.0, 0.0))
    found, record = _search_start(_slab(image, 0), _slab(image, 2), far, config=AffineConfig(), masks=None)
    assert record["shift"] is None and record["ncc"] is None
    assert found.GetParameters() == far.GetParameters()


def test_local_normalization_ignores_a_linear_intensity_change():
    image, _ = texture(dim=3, size=24)
    base = sitk.GetArrayFromImage(locally_normalized(image, 10.0))
    changed = sitk.GetArrayFromImage(locally_normalized(image * 3.0 + 7.0, 10.0))
    assert np.allclose(base, changed, atol=1e-4) and base.std() > 0.1


def test_a_crop_round_its_anatomy_gets_neither_the_search_nor_the_local_normalization():
    fixed, _ = phantom(dim=3, size=40, spacing=2.0)  # 80 mm: a crop, not a scan of a body region
    _, record = register_affine(fixed, warp(fixed, rigid(3, angle_deg=4.0)), config=AffineConfig(), seed=42)
    assert "translation_search" not in record and record["local_normalization"] == 0.0
    image, _ = _long_body()
    _, record = register_affine(_slab(image, 0), _slab(image, 2), config=AffineConfig(), seed=42)
    assert record["translation_search"]["reach_voxels"][2] > 0 and record["local_normalization"] == 20.0


def test_affine_samples_a_number_of_points_not_a_share_of_a_large_scan():
    """Each level samples sampling_percentage of its voxels, but never more than max_samples points: a
    256×256×40 scan gets 20 000 at its finest level (not 82 000); a 35×50×35 crop keeps its share."""
    from atlasseg.registration.affine import level_sampling
    from atlasseg.registration.pyramid import level_shrinks

    config = AffineConfig(shrink_factors=(4, 2), sampling_percentage=0.25, max_samples=20000)
    scan, crop = sitk.Image([256, 256, 40], sitk.sitkFloat32), sitk.Image([35, 50, 35], sitk.sitkFloat32)
    shares = level_sampling(scan, config, level_shrinks(config, scan.GetSize(), scan.GetSpacing()))
    assert [round(share * 256 * 256 * 40 / s**3) for share, s in zip(shares, (4, 2))] == [10240, 20000]
    assert level_sampling(crop, config, level_shrinks(config, crop.GetSize(), crop.GetSpacing())) == [0.25, 0.25]
    assert level_sampling(
        scan, replace(config, max_samples=0), level_shrinks(config, scan.GetSize(), scan.GetSpacing())
    ) == [0.25, 0.25]


def test_run_levels_owns_the_warm_start():
    """The driver starts the coarsest level, upsamples each result onto the next level and returns the last state."""
    calls = []

    def start(shrink, sigma):
        calls.append(("start", shrink, sigma))
        return [shrink]

    def upsample(state, level, shrink, sigma):
        calls.append(("upsample", level, tuple(state)))
        return [*state, shrink]

    def solve(level, shrink, sigma, state):
        calls.append(("solve", level, tuple(state)))
        return [*state, -level], {"iterations": level + 1}

    state, levels = run_levels([4, 2, 1], [2.0, 1.0, 0], start=start, upsample=upsample, solve=solve)
    assert state == [4, 0, 2, -1, 1, -2]
    assert calls == [
        ("start", 4, 2.0),
        ("solve", 0, (4,)),
        ("upsample", 1, (4, 0)),
        ("solve", 1, (4, 0, 2)),
        ("upsample", 2, (4, 0, 2, -1)),
        ("solve", 2, (4, 0, 2, -1, 1)),
    ]
    assert [(lv["level"], lv["shrink"], lv["sigma"], lv["iterations"]) for lv in levels] == [
        (0, 4, 2.0, 1),
        (1, 2, 1.0, 2),
        (2, 1, 0.0, 3),
    ]
    assert all(lv["seconds"] >= 0 for lv in levels)


@pytest.mark.parametrize("metric", ["ncc", "ants_ncc"])
def test_correlation_losses_have_their_exact_gradient_flat_windows_included(metric):
    """Central differences match the analytic gradient, also where a flat patch holds the local variance at
    its floor, and the loss stays finite there."""
    from atlasseg.registration.metrics import make_loss

    rng = np.random.default_rng(3)
    shape = (14, 16)
    f, g = rng.random(shape), rng.random(shape)
    f[:7, :8] = 0.5  # flat in both images: local variances at their floor
    g[:7, :8] = 0.25
    valid = np.ones(shape, bool)
    valid[-2:] = False
    f, g, valid = f.ravel(), g.ravel(), valid.ravel()
    loss = make_loss(metric, f, g, shape, ncc_radius=1)
    value, gradient = loss(f, g, valid)
    assert np.isfinite(value) and np.all(np.isfinite(gradient))
    for i in [0, 17, 40, 101, 150, 200, shape[0] * shape[1] - 1]:
        step = np.zeros_like(g)
        step[i] = 1e-6
        numeric = (loss(f, g + step, valid)[0] - loss(f, g - step, valid)[0]) / 2e-6
        assert numeric == pytest.approx(gradient[i], rel=1e-4, abs=1e-9), i


def test_lncc_forces_vanish_in_flat_windows():
    """Where both images are flat over the window the local correlation is undefined: no force, nothing infinite."""
    from atlasseg.registration.demons import _BoxMeans

    rng = np.random.default_rng(4)
    f, m = rng.random((20, 20)).astype(np.float32), rng.random((20, 20)).astype(np.float32)
    f[:10], m[:10] = 0.5, 0.2
    force, mean = _BoxMeans(f, 2).force(m, np.zeros(f.shape, bool))
    assert np.all(np.isfinite(force)) and 0 < mean <= 1
    assert np.abs(force[:7]).max() < 1e-3 * np.abs(force[13:]).max()


@pytest.mark.parametrize(
    "shape, sigma",
    [((3, 18, 25, 18), 1.7), ((3, 30, 70, 9), 1.25), ((2, 40, 33), 0.8), ((3, 1, 20, 20), 2.3)],
)
def test_demons_field_smoothing_is_ndimage_gaussian_filter(shape, sigma):
    """The demons' field smoothing (a matrix product along short axes, ndimage's loop along long ones: the
    second case has one of each) gives ndimage.gaussian_filter's values, bit for bit, on random fields."""
    from atlasseg.registration.demons import _MATRIX_AXIS, _smoother

    if 70 in shape:
        assert min(shape[1:]) <= _MATRIX_AXIS < 70  # both ways along one field
    rng = np.random.default_rng(3)
    field = (rng.normal(size=shape) * rng.uniform(0.01, 30.0, size=shape)).astype(np.float32)
    sigmas = np.full(len(shape) - 1, sigma)
    expected = ndimage.gaussian_filter(field, [0.0, *sigmas], mode="nearest", truncate=3.0)
    smoothed = _smoother(sigmas)(field)
    assert smoothed.dtype == np.float32 and smoothed.flags.c_contiguous
    np.testing.assert_array_equal(smoothed, expected)
