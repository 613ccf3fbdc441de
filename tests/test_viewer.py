"""The report's interactive view: the candidates' disagreement, and the page in a real headless browser."""

import os
import re

import numpy as np
import pytest
import SimpleITK as sitk
from browser import Browser, find_chromium, pixels

from atlasseg.config import load_config
from atlasseg.demo import make_demo_dataset
from atlasseg.manifest import load_manifest
from atlasseg.pipeline import run
from atlasseg.report import Disagreement

REQUIRE_BROWSER = "ATLASSEG_REQUIRE_BROWSER"  # set (CI): a missing Chromium fails instead of skipping


def _labels(array, spacing=(0.5, 2.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin((3.0, -1.0))
    return image


def test_disagreement_is_the_share_of_candidates_against_the_most_voted_label():
    spread = Disagreement()
    for row in ([0, 1, 2, 1], [0, 1, 2, 2], [0, 2, 0, 3]):  # columns: all agree, 2 of 3, 2 of 3, none
        spread.add(_labels([row]))
    result = spread.result()
    assert np.allclose(sitk.GetArrayFromImage(result)[0], [0, 1 / 3, 1 / 3, 2 / 3])
    assert result.GetSpacing() == (0.5, 2.0) and result.GetOrigin() == (3.0, -1.0)
    assert result.GetPixelID() == sitk.sitkFloat32


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def finished(request, tmp_path_factory):
    """The output folder of a baseline run (no registration: quick) of 3 atlases onto 1 target with ground truth."""
    folder = tmp_path_factory.mktemp(f"viewer{request.param}d")
    path = make_demo_dataset(
        folder / "data", dim=request.param, n_atlases=3, n_targets=1, size=24 if request.param == 3 else 48, seed=3
    )
    run(load_config("baseline"), load_manifest(path), out_dir=folder / "out")
    return folder / "out"


def test_run_writes_the_disagreement_and_a_self_contained_viewer(finished):
    target = next(p for p in finished.iterdir() if (p / "target.json").is_file())
    disagreement = sitk.ReadImage(str(target / "disagreement.nii.gz"))
    segmentation = sitk.ReadImage(str(target / "segmentation.nii.gz"))
    values = sitk.GetArrayFromImage(disagreement)
    assert disagreement.GetSize() == segmentation.GetSize() and disagreement.GetOrigin() == segmentation.GetOrigin()
    assert values.min() == 0 and 0 < values.max() <= 2 / 3 + 1e-6  # 3 candidates: at most 2 of 3 disagree
    assert (finished / "viewer" / "niivue.umd.js").is_file() and (finished / "viewer" / "LICENSE-niivue.txt").is_file()
    page = (finished / "index.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from the network
    assert (target / "viewer.js").read_text().startswith("atlassegViewer.add(")


@pytest.fixture(scope="module")
def chromium():
    found = find_chromium()
    if found is None:
        if os.environ.get(REQUIRE_BROWSER):
            pytest.fail(f"{REQUIRE_BROWSER} is set but no Chromium was found")
        pytest.skip("no Chromium: the interactive view is not tested in a browser")
    return found


def test_view_opens_offline_draws_and_hides_a_toggled_label(finished, chromium):
    with Browser(chromium) as browser:
        browser.open(finished / "index.html")
        browser.evaluate("document.querySelector('.viewer .open').click()")
        browser.wait_for("['ready', 'failed'].includes(document.querySelector('.viewer').dataset.state)")
        assert browser.evaluate("document.querySelector('.viewer').dataset.state") == "ready", browser.evaluate(
            "document.querySelector('.viewer .hint').textContent"
        )
        shown = pixels(browser.screenshot(".viewer .canvas"))
        for box in browser.evaluate("Array.from(document.querySelectorAll('.viewer input.label'), c => c.value)"):
            browser.evaluate(f"document.querySelector('.viewer input.label[value=\"{box}\"]').click()")
        hidden = pixels(browser.screenshot(".viewer .canvas"))
        browser.evaluate("document.querySelectorAll('.viewer input.label').forEach(c => c.click())")
        again = pixels(browser.screenshot(".viewer .canvas"))
        errors = browser.errors
    coloured = np.ptp(shown, axis=-1) > 0.2  # label colours over the grey image
    assert shown.max(axis=-1).mean() > 0.05 and len(np.unique(shown.reshape(-1, 3), axis=0)) > 20  # not blank
    assert coloured.mean() > 0.01
    assert (np.ptp(hidden, axis=-1) > 0.2).sum() < 0.05 * coloured.sum()  # every label hidden: grey remains
    assert np.abs(again - shown).max(axis=-1).mean() < 0.01  # shown again: the first picture
    assert errors == []
