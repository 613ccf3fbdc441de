"""Quality without ground truth: features with known answers, the calibrated regression, a run's outputs."""

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from atlasseg.config import ConfigError, QualityConfig, load_config
from atlasseg.demo import make_demo_dataset
from atlasseg.manifest import load_manifest
from atlasseg.pipeline import run
from atlasseg.quality import FEATURES, CandidateVotes, fit, review_rule
from atlasseg.report import _page


def _image(array) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array))
    image.SetSpacing((2.0, 0.5))
    return image


def test_features_have_their_known_values():
    """Three candidates of a 4 × 4 square shifted by 0, 1 and 2 columns; the fused result is the middle one."""
    squares = []
    for shift in (0, 1, 2):
        array = np.zeros((8, 10), np.uint8)
        array[2:6, 2 + shift : 6 + shift] = 1
        squares.append(array)
    votes = CandidateVotes()
    for array in squares:
        votes.add(_image(array))
    fused = _image(squares[1])
    probability = _image(np.where(squares[1] == 1, 0.75, 0.0).astype(np.float32))
    found = votes.features(fused, {1: probability}, labels=[1, 2])
    assert list(found) == [1]  # label 2: in neither the result nor any candidate
    f = found[1]
    dice = [2 * 12 / 32, 1.0, 2 * 12 / 32]  # a one-column shift keeps 12 of 16 voxels
    assert f["agreement"] == pytest.approx(np.mean(dice))
    assert f["consistency"] == pytest.approx((3 * 2 * 8 + 2 * 1 * 8) / (2 * 48))  # the pairs' Dice 12/16, 12/16, 8/16
    assert f["boundary_probability"] == pytest.approx(0.75)
    assert math.isnan(f["local_mse"]) and set(f) == set(FEATURES)  # no intensities given


def test_local_mse_is_the_candidates_mean_squared_difference_near_the_label():
    """Voxels 2 mm wide (x) and 0.5 mm high (y). Within 3 mm of the fused label (by brute force over its voxels),
    one candidate differs from the target by 0.2, the other by 0.4; both by 10 farther away. A label the fusion
    dropped is measured round the candidates' voxels of it."""
    fused = np.zeros((24, 12), np.uint8)
    fused[9:13, 5:7] = 1
    y, x = np.indices(fused.shape) * np.array([0.5, 2.0])[:, None, None]
    near = np.zeros(fused.shape, bool)
    for r, c in np.argwhere(fused == 1):
        near |= np.hypot(y - 0.5 * r, x - 2.0 * c) <= 3.0
    assert 2 < near.sum() < near.size // 2  # a ring of a few voxels, not the box
    target = np.zeros(fused.shape, np.float32)
    votes = CandidateVotes(_image(target))
    for difference in (0.2, 0.4):
        votes.add(_image(fused * 2), _image(np.where(near, difference, 10.0).astype(np.float32)))  # they say 2
    found = votes.features(_image(fused), {}, labels=[1, 2])
    assert found[1]["local_mse"] == pytest.approx((0.2**2 + 0.4**2) / 2)
    assert found[2]["local_mse"] == pytest.approx((0.2**2 + 0.4**2) / 2)  # dropped: round the candidates' 2s


def test_a_label_every_candidate_misses_gets_zero_agreement():
    votes = CandidateVotes()
    votes.add(_image(np.zeros((6, 6), np.uint8)))
    fused = np.zeros((6, 6), np.uint8)
    fused[1:3, 1:3] = 4
    f = votes.features(_image(fused), {}, labels=[4])[4]
    assert f["agreement"] == 0.0 and math.isnan(f["consistency"]) and f["boundary_probability"] == 0.0


def _samples(rng, n, noise):
    out = []
    for i in range(n):
        features = {name: float(rng.normal()) for name in FEATURES}
        dice = 0.7 + 0.1 * features["agreement"] - 0.05 * features["consistency"] + rng.normal(0, noise)
        out.append({"atlas": str(i), "label": 1, "features": features, "dice": dice})
    return out


def test_fit_recovers_a_linear_relation_and_its_error_is_the_noise():
    rng = np.random.default_rng(0)
    model = fit(_samples(rng, 200, 0.02))
    test = _samples(rng, 200, 0.02)
    errors = [model.predict(s["features"]) - s["dice"] for s in test]
    assert np.sqrt(np.mean(np.square(errors))) < 0.025
    assert model.error == pytest.approx(0.02, rel=0.25)  # leave-one-out: an honest error bar
    features = dict(test[0]["features"], agreement=math.nan)  # a missing feature counts as average
    assert 0.0 <= model.predict(features) <= 1.0


def test_held_out_predictions_are_the_fits_without_each_sample():
    samples = _samples(np.random.default_rng(1), 30, 0.02)
    model = fit(samples)
    for i in (0, 17):  # close, not equal: the refit also standardises the features without the sample
        without = fit(samples[:i] + samples[i + 1 :])
        assert model.held_out[i] == pytest.approx(without.predict(samples[i]["features"]), abs=0.002)
        assert abs(model.held_out[i] - samples[i]["dice"]) > 1e-4  # not the fit's own, which has seen it
    rms = np.sqrt(np.mean(np.square(np.subtract(model.held_out, [s["dice"] for s in samples]))))
    assert 0.5 * model.error < rms <= model.error  # the error bar's residuals, a few clipped into [0, 1]


def test_the_review_threshold_is_a_quantile_of_the_held_out_predictions_unless_absolute():
    model = fit(_samples(np.random.default_rng(2), 40, 0.02))
    rule = review_rule(model, QualityConfig(review_quantile=0.25))
    assert rule["rule"] == "quantile" and rule["quantile"] == 0.25
    assert np.mean(np.asarray(model.held_out) < rule["below"]) == pytest.approx(0.25, abs=1 / 40)
    assert review_rule(model, QualityConfig(review_below=0.65)) == {"rule": "absolute", "below": 0.65}


def test_config_checks():
    with pytest.raises(ConfigError, match="calibration_atlases"):
        QualityConfig(calibration_atlases=2)
    with pytest.raises(ConfigError, match="review_below"):
        QualityConfig(review_below=1.5)
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match="review_quantile"):
            QualityConfig(review_quantile=bad)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The 2D demo (5 atlases) with three targets: two like the atlases (one without ground truth), and one
    turned by a quarter turn, which the affine stage, starting from the image centres, does not undo."""
    folder = tmp_path_factory.mktemp("quality")
    path = make_demo_dataset(folder / "data", dim=2, n_atlases=5, n_targets=2, seed=5)
    doc = yaml.safe_load(path.read_text())
    good = doc["targets"][0]
    for key in ("image", "labels"):
        image = sitk.ReadImage(str(path.parent / good[key]))
        turned = sitk.GetImageFromArray(np.rot90(sitk.GetArrayFromImage(image)).copy())
        turned.SetSpacing(image.GetSpacing()[::-1])
        turned.SetOrigin(image.GetOrigin())
        sitk.WriteImage(turned, str(path.parent / f"turned_{key}.nii.gz"))
    doc["targets"].append({"id": "turned", "image": "turned_image.nii.gz", "labels": "turned_labels.nii.gz"})
    del doc["targets"][1]["labels"]  # no ground truth: predicted only
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def outputs(dataset, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    config = load_config(
        "demo", overrides=["quality.enabled=true", "quality.review_below=0.9", f"output.cache_dir={cache}"]
    )
    out = tmp_path_factory.mktemp("run")
    results = run(config, load_manifest(dataset), out_dir=out)
    again = run(config, load_manifest(dataset), out_dir=tmp_path_factory.mktemp("again"))
    return out, results, again


def test_predicted_dice_in_run_json_metrics_csv_and_the_report(outputs):
    out, results, _ = outputs
    document = json.loads((out / "run.json").read_text())
    assert len(document["quality"]["samples"]) >= 3 and not document["quality"]["cached"]
    assert document["quality"]["review"] == {"rule": "absolute", "below": 0.9}
    targets = document["targets"]
    first, unscored, turned = (targets[r.target_id]["quality"] for r in results)
    for quality in (first, unscored, turned):
        assert set(quality) == {"1", "2", "3", "4", "5"}
        assert all(0 <= q["predicted_dice"] <= 1 and q["error"] > 0 for q in quality.values())
    # The turned target is segmented far worse, and predicted so: lower, and flagged.
    true = {r.target_id: r.mean_dice for r in results if r.scores is not None}
    assert true["turned"] < true[results[0].target_id] - 0.2
    mean = {
        name: np.mean([q["predicted_dice"] for q in quality.values()])
        for name, quality in (("first", first), ("turned", turned))
    }
    assert mean["turned"] < mean["first"] - 0.1
    assert any(q["review"] for q in turned.values()) and not any(q["review"] for q in first.values())
    with open(out / "metrics.csv") as fh:
        table = list(csv.DictReader(fh))
    unscored_rows = [row for row in table if row["target"] == results[1].target_id]
    assert len(unscored_rows) == 6 and all(row["dice"] == "" for row in unscored_rows)  # 5 labels and the mean
    row = next(row for row in table if row["target"] == "turned" and row["label"] == "1")
    assert float(row["predicted_dice"]) == turned["1"]["predicted_dice"] and row["review"] in ("true", "false")
    page = _page(document, {}, {})
    assert page.index('#target-0">turned') < page.index(f">{results[0].target_id}</a>")  # flagged first


def test_a_second_run_takes_the_calibration_from_the_cache(outputs):
    out, results, again = outputs
    first = json.loads((out / "run.json").read_text())
    second = json.loads((again[0].segmentation.parent.parent / "run.json").read_text())
    assert second["quality"]["cached"] and second["quality"]["samples"] == first["quality"]["samples"]
    assert [r.record["quality"] for r in again] == [r.record["quality"] for r in results]


def test_the_api_predicts_too(dataset, tmp_path):
    import atlasseg

    manifest = load_manifest(dataset)
    atlases = {a.id: (a.image, a.labels) for a in manifest.atlases[:4]}
    _, record = atlasseg.segment(
        manifest.targets[0].image,
        atlases,
        "demo",
        overrides=["quality.enabled=true", "quality.calibration_atlases=3", f"output.cache_dir={tmp_path}"],
    )
    assert set(record["quality"]) == {"1", "2", "3", "4", "5"}


def test_too_few_atlases_is_one_clear_error(dataset, tmp_path):
    doc = yaml.safe_load(dataset.read_text())
    doc["atlases"] = doc["atlases"][:2]
    small = dataset.parent / "two_atlases.yaml"
    small.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config("demo", overrides=["quality.enabled=true", f"output.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match="at least 3 atlases.*lists 2"):
        run(config, load_manifest(small), out_dir=tmp_path / "out")
