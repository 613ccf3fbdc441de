"""The QC report: pictures that show the labels where they are, a page that holds the run, escaped."""

import json
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from atlasseg.cli import main
from atlasseg.config import load_config
from atlasseg.demo import make_demo_dataset
from atlasseg.manifest import load_manifest
from atlasseg.pipeline import run
from atlasseg.report import label_colour, qc_figure, write_report

HOSTILE = '<script>alert("x")</script> & $x^$'


def _manifest(folder: Path, *, dim: int) -> Path:
    """A demo dataset: 2 atlases, 2 targets (the second without ground truth; in 3D the first is
    anisotropic), a hostile label name and a declared label that no image holds."""
    path = make_demo_dataset(folder, dim=dim, n_atlases=2, n_targets=2, size=24 if dim == 3 else 48, seed=3)
    doc = yaml.safe_load(path.read_text())
    doc["labels"][1] = HOSTILE
    doc["labels"][9] = "ghost"
    del doc["targets"][1]["labels"]
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def finished(request, tmp_path_factory):
    """(output folder, manifest) of a baseline run (no registration: quick) with the report on."""
    folder = tmp_path_factory.mktemp(f"report{request.param}d")
    manifest = load_manifest(_manifest(folder / "data", dim=request.param))
    run(load_config("baseline"), manifest, out_dir=folder / "out")
    return folder / "out", manifest


def _panel_pixels(png: Path) -> np.ndarray:
    """RGB pixels of the picture's image rows (rows holding grey image pixels: not the title or legend)."""
    rgb = imread(png)[..., :3]
    grey = (np.ptp(rgb, axis=-1) < 0.01) & (rgb.min(axis=-1) < 0.95)
    return rgb[grey.sum(axis=1) > 50]


def _count(pixels: np.ndarray, colour: str) -> int:
    return int((np.abs(pixels - to_rgb(colour)).max(axis=-1) < 0.03).sum())


def test_pictures_show_each_label_in_its_colour_over_the_image(finished):
    out, manifest = finished
    scored, unscored = manifest.targets
    areas = {}
    for target in manifest.targets:
        png = out / target.id / "qc.png"
        height, width = imread(png).shape[:2]
        areas[target.id] = height * width
        assert 500 <= width <= 1200 and 250 <= height <= 1000
        pixels = _panel_pixels(png)
        assert len(np.unique(pixels[..., 0])) > 50  # the grey image is there, with its window
        present = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / target.id / "segmentation.nii.gz")))))
        assert present - {0}
        for value in present - {0}:
            assert _count(pixels, label_colour(value)) >= 10, (target.id, value)
        assert _count(pixels, label_colour(9)) == 0  # declared, in no image: not drawn
    assert areas[scored.id] > 1.6 * areas[unscored.id]  # a second row (3D) or panel (2D): the reference


def test_index_holds_every_target_metric_and_existing_picture(finished):
    out, manifest = finished
    page = (out / "index.html").read_text()
    record = json.loads((out / "run.json").read_text())
    for target in manifest.targets:
        assert f">{target.id}<" in page
        assert f'src="{target.id}/qc.png"' in page
        for entry in record["targets"][target.id]["ranking"]:
            assert f"<td>{entry['atlas']}</td>" in page
    scores = record["targets"][manifest.targets[0].id]["scores"]
    for score in (s for label, s in scores.items() if label != "9"):
        assert f">{score['dice']:.3f}<" in page and f">{score['hd95']:.3f}<" in page
    assert scores["9"]["dice"] is None and '<td class="n">9</td><td>ghost</td><td class="n">–</td>' in page
    links = re.findall(r'(?:src|href)="([^"#][^"]*)"', page)
    assert links and all((out / unquote(link)).is_file() for link in links)
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; $x^$" in page
    assert page.count("<details>") == page.count("</details>") and page.count("<table>") == page.count("</table>")


def test_report_command_rewrites_the_report(finished, capsys):
    out, manifest = finished
    for path in [out / "index.html", *out.glob("*/qc.png")]:
        path.unlink()
    assert main(["report", str(out)]) == 0
    assert "index.html" in capsys.readouterr().out
    assert (out / "index.html").exists() and all((out / t.id / "qc.png").exists() for t in manifest.targets)


def test_report_command_without_a_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run.json'}: not found" in err and err.count("\n") == 1


def test_hostile_ids_and_reasons_are_escaped(finished, tmp_path):
    out, manifest = finished
    record = json.loads((out / "run.json").read_text())
    evil = '"><img src=x onerror=alert(1)>'
    target = next(iter(record["targets"].values()))
    target["dropped"] = [{"atlas": evil, "stage": "affine", "reason": "<b>diverged</b>"}]
    record["targets"] = {evil: target}
    record["status"] = "<i>complete</i>"
    page = write_report(tmp_path, record, manifest).read_text()
    assert "<img src=x" not in page and "<b>" not in page and "<i>" not in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;b&gt;diverged&lt;/b&gt;" in page
    assert "No segmentation was written" in page  # none in tmp_path: no picture, and no link to one


def test_report_off_writes_none(tmp_path):
    manifest = load_manifest(make_demo_dataset(tmp_path / "data", dim=2, n_atlases=2, n_targets=1, size=32))
    run(load_config("baseline", overrides=["output.report=false"]), manifest, out_dir=tmp_path / "out")
    assert (tmp_path / "out" / "run.json").exists()
    assert not (tmp_path / "out" / "index.html").exists() and not list((tmp_path / "out").rglob("qc.png"))


def _volume(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> tuple[sitk.Image, sitk.Image]:
    """A 20 x 30 x 10 voxel image (1 x 1 x 4 mm) with a label blob at the patient's left, anterior,
    superior corner (LPS: low y, high x and z), stored with ``direction`` around the same physical box."""
    z, y, x = np.mgrid[:10, :30, :20]
    labels = ((x >= 13) & (x < 18) & (y >= 3) & (y < 10) & (z >= 6) & (z < 9)).astype(np.uint8)
    values = (np.sin(x / 3.0) + np.cos(y / 4.0) + z / 5.0 + 2 * labels).astype(np.float32)
    images = [sitk.GetImageFromArray(a) for a in (values, labels)]
    for image in images:
        image.SetSpacing((1.0, 1.0, 4.0))
    resampled = []
    for image in images:
        grid = sitk.Image(image)
        if direction != (1, 0, 0, 0, 1, 0, 0, 0, 1):  # the same box stored another way round
            matrix = np.array(direction, float).reshape(3, 3)
            size = np.abs(np.linalg.inv(matrix) @ np.array(image.GetSize(), float)).round().astype(int)
            spacing = np.abs(np.linalg.inv(matrix) @ np.array(image.GetSpacing())).tolist()
            corner_index = (np.sign(np.linalg.inv(matrix) @ np.ones(3)) < 0) * (size - 1)
            origin = -(matrix @ (corner_index * spacing))
            grid = sitk.Image([int(s) for s in size], image.GetPixelID())
            grid.SetSpacing(spacing)
            grid.SetOrigin(origin.tolist())
            grid.SetDirection(direction)
        resampled.append(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor))
    return resampled[0], resampled[1]


def _render(image, labels):
    figure = qc_figure(image, labels, title="t")
    figure.canvas.draw()
    return figure, np.asarray(figure.canvas.buffer_rgba())


def test_views_have_physical_proportions_and_a_fixed_orientation():
    figure, pixels = _render(*_volume())
    inches = figure.get_size_inches()
    boxes = [ax.get_position(original=False) for ax in figure.axes]
    ratios = [box.width * inches[0] / (box.height * inches[1]) for box in boxes]
    np.testing.assert_allclose(ratios, [20 / 30, 20 / 40, 30 / 40], rtol=0.03)  # mm, not voxels
    red = np.abs(pixels[..., :3] / 255.0 - to_rgb(label_colour(1))).max(axis=-1) < 0.03
    height = pixels.shape[0]
    for box, (right, up) in zip(boxes, [(True, True), (True, True), (False, True)]):
        # axial: left to the viewer's right, anterior up; coronal: left right, superior up; sagittal: anterior left, superior up
        x0, x1 = int(box.x0 * pixels.shape[1]), int(box.x1 * pixels.shape[1])
        y0, y1 = height - int(box.y1 * height), height - int(box.y0 * height)
        ys, xs = np.nonzero(red[y0:y1, x0:x1])
        assert xs.size > 0
        assert (xs.mean() > (x1 - x0) / 2) == right and (ys.mean() < (y1 - y0) / 2) == up
    for direction in [(-1, 0, 0, 0, -1, 0, 0, 0, 1), (0, 0, 1, 1, 0, 0, 0, -1, 0)]:  # radiological, and axes permuted
        _, other = _render(*_volume(direction))
        assert other.shape == pixels.shape and np.array_equal(other, pixels)
    assert figure.get_suptitle() == "t"
    image, labels = _volume()
    for item in (image, labels):
        item.SetDirection(sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, 0.3).GetMatrix())
    assert "oblique" in _render(image, labels)[0].get_suptitle()
