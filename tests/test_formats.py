"""Image formats (issue 7): every format keeps the physical geometry and the label values and type;
nibabel's RAS affines and SimpleITK's LPS geometry are converted in one place (atlasseg.nibabel_io)."""

import itertools
import locale

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from conftest import phantom, rigid, warp

from atlasseg.config import load_config
from atlasseg.errors import ImageError, ManifestError
from atlasseg.imageio import read_geometry, read_image, read_labels, read_voxels, same_grid, write_image
from atlasseg.manifest import load_manifest
from atlasseg.nibabel_io import affine_from_grid, from_nibabel, grid_from_affine, to_nibabel
from atlasseg.pipeline import check_inputs, run

FILES = ["nii.gz", "nii", "nrrd", "nhdr", "mha", "mhd", "mgz", "mgh"]
LABEL_TYPES = ["uint8", "int16", "uint16", "int32"]


def oblique_direction(handedness: int = 1) -> np.ndarray:
    """Rotated about three axes, with the index axes permuted (i → world z-ish, j → x-ish, k → y-ish)."""
    a, b, c = np.deg2rad([20.0, -35.0, 50.0])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    direction = rz @ ry @ rx @ np.eye(3)[:, [2, 0, 1]]
    direction[:, 1] *= handedness
    return direction


def oblique(array: np.ndarray, handedness: int = 1) -> sitk.Image:
    """``array`` (numpy order) on an oblique, permuted, anisotropic grid."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 1.3, 2.9))
    image.SetOrigin((10.5, -20.25, 33.0))
    image.SetDirection(oblique_direction(handedness).ravel().tolist())
    return image


def corners(image: sitk.Image) -> np.ndarray:
    """World coordinates (mm, LPS) of the corner voxels, in index order."""
    ends = [(0, n - 1) for n in image.GetSize()]
    return np.array([image.TransformIndexToPhysicalPoint(index) for index in itertools.product(*ends)])


def label_array(dtype: str, rng) -> np.ndarray:
    """Labels spanning ``dtype``'s range (its largest value included: a narrowing would show)."""
    values = np.array([0, 1, 2, 7, np.iinfo(dtype).max], dtype=dtype)
    return rng.choice(values, size=(5, 6, 7)).astype(dtype)


@pytest.mark.parametrize("handedness", [1, -1], ids=["right-handed", "left-handed"])
@pytest.mark.parametrize("ext", FILES)
def test_an_oblique_image_round_trips_with_its_geometry(tmp_path, ext, handedness):
    image = oblique(np.random.default_rng(0).random((5, 6, 7)).astype(np.float32), handedness)
    path = tmp_path / f"image.{ext}"
    write_image(image, path)
    back = read_image(path)
    np.testing.assert_allclose(corners(back), corners(image), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert same_grid(read_geometry(path), back)  # the header alone gives the same grid


@pytest.mark.parametrize("dtype", LABEL_TYPES)
@pytest.mark.parametrize("ext", FILES)
def test_a_label_map_keeps_its_values_and_type(tmp_path, ext, dtype):
    labels = oblique(label_array(dtype, np.random.default_rng(1)))
    path = tmp_path / f"labels.{ext}"
    write_image(labels, path)
    back = read_labels(path)
    assert back.GetPixelIDTypeAsString() == labels.GetPixelIDTypeAsString()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))


@pytest.mark.parametrize("kind, ext", [("Nifti1Image", "nii.gz"), ("MGHImage", "mgz")])
def test_a_file_nibabel_wrote_is_read_at_nibabels_world_coordinates(tmp_path, kind, ext):
    """nibabel's affine maps voxel (i, j, k) to RAS mm; atlasseg must put that voxel at the same point in LPS."""
    affine = np.eye(4)
    affine[:3, :3] = oblique_direction() @ np.diag([0.7, 1.3, 2.9])
    affine[:3, 3] = (-12.5, 40.0, 7.25)
    data = np.random.default_rng(2).integers(0, 1000, (7, 6, 5)).astype(np.int16)
    path = tmp_path / f"image.{ext}"
    nibabel.save(getattr(nibabel, kind)(data, affine), str(path))
    image = read_labels(path)
    for index in itertools.product(*[(0, n - 1) for n in data.shape]):
        ras = affine @ (*index, 1.0)
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), (-ras[0], -ras[1], ras[2]), atol=1e-4)
        assert image[index] == data[index]
    np.testing.assert_allclose(
        affine_from_grid(image.GetSpacing(), image.GetOrigin(), image.GetDirection()),
        nibabel.load(str(path)).affine,
        atol=1e-5,
    )
    assert same_grid(read_geometry(path), image)


@pytest.mark.parametrize("dim", [2, 3])
def test_nibabel_images_convert_both_ways(dim):
    shape = (4, 5, 6)[:dim]
    image = sitk.GetImageFromArray(np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
    image.SetSpacing((0.5, 2.0, 3.0)[:dim])
    image.SetOrigin((1.0, -2.0, 3.0)[:dim])
    image.SetDirection(oblique_direction()[:dim, :dim].ravel().tolist() if dim == 3 else (0.0, 1.0, -1.0, 0.0))
    as_nibabel = to_nibabel(image)
    assert as_nibabel.shape == image.GetSize()  # nibabel holds index order
    back = from_nibabel(as_nibabel)
    assert same_grid(back, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_a_sheared_affine_is_refused():
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[0, 1] = 0.3
    with pytest.raises(ValueError, match="shears the voxel axes"):
        grid_from_affine(affine)
    spacing, origin, direction = grid_from_affine(np.diag([-2.0, 3.0, 4.0, 1.0]))  # RAS → LPS flips x and y
    assert spacing == (2.0, 3.0, 4.0) and origin == (0.0, 0.0, 0.0) and direction == (1, 0, 0, 0, -1, 0, 0, 0, 1)


def test_mgh_is_3d_only_and_a_damaged_one_is_one_line(tmp_path):
    with pytest.raises(ImageError, match="MGH holds 3D images"):
        write_image(sitk.Image([4, 4], sitk.sitkUInt8), tmp_path / "x.mgz")
    image, labels = phantom(dim=2, size=16)
    write_image(image, tmp_path / "image.nii.gz")
    write_image(labels, tmp_path / "labels.nii.gz")
    entry = {"id": "a", "image": "image.nii.gz", "labels": "labels.nii.gz"}
    (tmp_path / "data_manifest.yaml").write_text(
        yaml.safe_dump({"atlases": [entry], "targets": [{**entry, "id": "t"}]})
    )
    with pytest.raises(ImageError, match="output.format mgz holds 3D images only, these are 2D"):  # before any work
        check_inputs(load_manifest(tmp_path / "data_manifest.yaml"), load_config(overrides=["output.format=mgz"]))
    write_image(oblique(np.zeros((8, 8, 8), np.float32)), tmp_path / "x.mgh")
    raw = (tmp_path / "x.mgh").read_bytes()
    (tmp_path / "x.mgh").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageError, match=r"x\.mgh: cannot read MGH image \(Expected 2048 bytes, got"):
        read_voxels(tmp_path / "x.mgh")


# --------------------------------------------------------------------------- DICOM series


def write_series(image: sitk.Image, folder, uid: str, description: str = "synthetic") -> None:
    """``image`` as a DICOM series: one file per slice with the tags a series reader orders and places them by
    (after SimpleITK's "Dicom Series From Array" example). GDCM's writer sets the C locale (Python's text
    files then default to ASCII); the locale is restored after."""
    saved = locale.setlocale(locale.LC_ALL, None)
    try:
        _write_slices(image, folder, uid, description)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(image: sitk.Image, folder, uid: str, description: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    shared = {
        "0020|000e": uid,
        "0008|103e": description,
        "0008|0060": "MR",
        "0008|0008": "DERIVED\\SECONDARY",
        "0020|0037": "\\".join(map(repr, (d[0], d[3], d[6], d[1], d[4], d[7]))),
    }  # image orientation
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in shared.items():
            piece.SetMetaData(tag, value)
        piece.SetMetaData("0020|0032", "\\".join(map(repr, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        piece.SetMetaData("0020|0013", str(k))
        writer.SetFileName(str(folder / f"{uid}.{k}.dcm"))
        writer.Execute(piece)


def test_a_dicom_series_round_trips_with_its_geometry(tmp_path):
    image = oblique(np.random.default_rng(3).integers(-500, 1500, (5, 6, 7)).astype(np.int16))
    write_series(image, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.1")
    back = read_image(tmp_path / "series")
    np.testing.assert_allclose(corners(back), corners(image), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    header = read_geometry(tmp_path / "series")  # first and last slices' headers only
    assert header.size == back.GetSize() and same_grid(header, back)


def test_a_left_handed_image_as_dicom_keeps_every_voxel_in_place(tmp_path):
    """DICOM grids are right-handed (slices along the normal): the slices come back in reverse order, each voxel
    at the same point in space."""
    image = oblique(np.random.default_rng(4).integers(0, 1000, (5, 6, 7)).astype(np.int16), handedness=-1)
    write_series(image, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.2")
    back = read_labels(tmp_path / "series")
    assert sorted(map(tuple, corners(back).round(4))) == sorted(map(tuple, corners(image).round(4)))
    resampled = sitk.Resample(back, image, sitk.Transform(), sitk.sitkNearestNeighbor, -1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(image))


@pytest.mark.parametrize("dtype", LABEL_TYPES)
def test_a_dicom_label_map_keeps_its_values_and_type(tmp_path, dtype):
    labels = oblique(label_array(dtype, np.random.default_rng(5)))
    write_series(labels, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.3")
    back = read_labels(tmp_path / "series")
    assert back.GetPixelIDTypeAsString() == labels.GetPixelIDTypeAsString()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))


def test_a_folder_of_several_series_needs_a_choice(tmp_path):
    first, second = "1.2.826.0.1.3680043.2.1125.10", "1.2.826.0.1.3680043.2.1125.11"
    image = oblique(np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7))
    write_series(image, tmp_path / "study", first, "T1 MPRAGE")
    write_series(image[:, :, :3], tmp_path / "study", second, "localizer")
    with pytest.raises(ImageError) as err:
        read_geometry(tmp_path / "study")
    assert str(err.value) == (
        f"{tmp_path / 'study'}: holds 2 DICOM series ({first} 'T1 MPRAGE', 5 files; {second} "
        f"'localizer', 3 files); name one as {tmp_path / 'study'}/<series UID>"
    )
    assert read_image(tmp_path / "study" / second).GetSize() == (7, 6, 3)
    assert read_geometry(tmp_path / "study" / first).size == (7, 6, 5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="empty: is a directory holding no DICOM series"):
        read_image(tmp_path / "empty")
    with pytest.raises(ImageError, match=r"1\.2\.3: file not found \(nor a DICOM series of"):
        read_image(tmp_path / "study" / "1.2.3")

    labels = tmp_path / "labels.nii.gz"
    write_image(sitk.Cast(image > 100, sitk.sitkUInt8), labels)
    manifest = tmp_path / "data_manifest.yaml"
    entry = {"id": "a1", "image": f"study/{first}", "labels": "labels.nii.gz"}
    manifest.write_text(yaml.safe_dump({"atlases": [entry]}))
    assert load_manifest(manifest).atlases[0].image == tmp_path / "study" / first
    manifest.write_text(yaml.safe_dump({"atlases": [{**entry, "image": "study"}]}))
    with pytest.raises(ManifestError, match="atlas 'a1': image: .*study: holds 2 DICOM series"):
        load_manifest(manifest)


# --------------------------------------------------------------------------- a run


def test_a_run_with_atlases_in_mixed_formats_writes_the_named_format(tmp_path):
    image, labels = phantom(size=32, spacing=2.0)
    entries = []
    for number, (ext, angle) in enumerate([("mha", 5.0), ("nrrd", -6.0), ("mgz", 8.0)]):
        move = rigid(3, angle_deg=angle, shift=(2.0 * number, -2.0, 1.0))
        write_image(warp(image, move), tmp_path / f"a{number}.{ext}")
        write_image(warp(labels, move, labels=True), tmp_path / f"a{number}_labels.{ext}")
        entries.append({"id": f"a{number}", "image": f"a{number}.{ext}", "labels": f"a{number}_labels.{ext}"})
    write_image(image, tmp_path / "target.nii.gz")
    write_image(labels, tmp_path / "target_labels.nii.gz")
    (tmp_path / "data_manifest.yaml").write_text(
        yaml.safe_dump(
            {"atlases": entries, "targets": [{"id": "t", "image": "target.nii.gz", "labels": "target_labels.nii.gz"}]}
        )
    )
    config = load_config(
        overrides=[
            "registration.nonrigid.enabled=false",
            "parallel.n_jobs=1",
            "output.format=mgz",
            "output.probability_maps=true",
            "fusion.method=majority",
        ]
    )
    (result,) = run(config, load_manifest(tmp_path / "data_manifest.yaml"), out_dir=tmp_path / "out")
    assert result.segmentation == tmp_path / "out" / "t" / "segmentation.mgz"
    segmentation = read_labels(result.segmentation)
    assert same_grid(segmentation, image, tolerance=1e-5)
    assert (tmp_path / "out" / "t" / "probability_1.mgz").exists()
    # every atlas, whatever its format, lands on the target (a misread geometry would not)
    assert all(entry["ncc"] > 0.99 for entry in result.record["ranking"])
    assert result.mean_dice >= 0.9
