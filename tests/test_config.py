from pathlib import Path

import pytest

from atlasseg.config import AffineConfig, Config, load_config, preset_path
from atlasseg.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_in_code_equal_default_yaml():
    assert load_config(REPO / "configs" / "default.yaml") == Config()
    assert load_config("default") == Config()


def test_presets_load_and_resolve_by_name():
    assert preset_path("demo").name == "demo.yaml"
    demo = load_config("demo")
    assert demo.selection.k == 5
    assert demo.registration.affine.stages == AffineConfig().stages  # untouched keys keep the defaults
    baseline = load_config("baseline")
    assert baseline.registration.affine.stages == () and not baseline.registration.nonrigid.enabled
    assert baseline.registration.affine.initialization == "none" and baseline.fusion.method == "majority"


@pytest.mark.parametrize(
    "text, key",
    [
        ("selection: {kk: 3}", "selection.kk"),
        ("registration: {affine: {iteratons: 3}}", "registration.affine.iteratons"),
        ("selektion: {k: 3}", "selektion"),
    ],
)
def test_unknown_key_names_key_path_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "text, key",
    [
        ("selection: {k: -1}", "selection.k"),
        ("selection: {k: some}", "selection.k"),
        ("selection: {k: true}", "selection.k"),
        ("selection: {metric: nmi}", "selection.metric"),
        ("selection: {roi: box}", "selection.roi"),
        ("selection: {roi_margin: -1}", "selection.roi_margin"),
        ("selection: {threshold: high}", "selection.threshold"),
        ("selection: {prescreen: 0}", "selection.prescreen"),
        ("selection: {prescreen: few}", "selection.prescreen"),
        ("registration: {affine: {iterations: 0}}", "registration.affine.iterations"),
        ("registration: {nonrigid: {iterations: 0}}", "registration.nonrigid.iterations"),
        ("registration: {nonrigid: {iterations: [30, 0]}}", "registration.nonrigid.iterations"),
        (
            "registration: {nonrigid: {shrink_factors: [2, 1], iterations: [30, 10, 5]}}",
            "registration.nonrigid.iterations",
        ),
        ("registration: {affine: {iterations: [30, 10]}}", "registration.affine.iterations"),
        (
            "registration: {nonrigid: {shrink_factors: [2, 1], demons_force: [lncc, ssd, ssd]}}",
            "registration.nonrigid.demons_force",
        ),
        ("registration: {nonrigid: {demons_force: []}}", "registration.nonrigid.demons_force"),
        ("registration: {nonrigid: {demons_force: [lncc, auto]}}", "registration.nonrigid.demons_force"),
        ("fusion: {staple_iterations: 0}", "fusion.staple_iterations"),
        ("registration: {affine: {stages: [affine, rigid]}}", "registration.affine.stages"),
        ("registration: {affine: {metric: nmi}}", "registration.affine.metric"),
        ("registration: {affine: {max_samples: -1}}", "registration.affine.max_samples"),
        ("registration: {seed: 0}", "registration.seed"),  # SimpleITK's "seed from the clock"
        ("registration: {nonrigid: {shrink_factors: [2, 1], smoothing_sigmas: [1]}}", "registration.nonrigid"),
        ("registration: {nonrigid: {enabled: 'yes'}}", "registration.nonrigid.enabled"),
        ("parallel: {n_jobs: 0}", "parallel.n_jobs"),
        ("fusion: {method: staple2}", "fusion.method"),
        ("fusion: {search_radius: -1}", "fusion.search_radius"),
        ("fusion: 3", "fusion"),
    ],
)
def test_bad_values_are_rejected_with_key_path(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert key in str(err.value)


def test_yaml_syntax_error_gives_line(tmp_path):
    with pytest.raises(ConfigError, match="line 2, column 6"):
        load_config(write(tmp_path, "selection:\n  k: : 3\n"))


def test_yaml_tags_are_not_constructed(tmp_path):
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, "selection: !!python/object/apply:os.system ['true']\n"))


def test_set_overrides_are_typed_and_validated(tmp_path):
    config = load_config("default", overrides=["selection.k=3", "registration.nonrigid.enabled=false"])
    assert config.selection.k == 3 and config.registration.nonrigid.enabled is False
    assert load_config(None, overrides=["registration.affine.stages=[translation]"]).registration.affine.stages == (
        "translation",
    )
    with pytest.raises(ConfigError, match="selection.k"):
        load_config("default", overrides=["selection.k=-2"])
    assert load_config(None, overrides=["selection.threshold=0.5"]).selection.threshold == 0.5
    assert load_config(None, overrides=["selection.threshold=null"]).selection.threshold is None
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config("default", overrides=["selection.k"])


def test_config_is_immutable():
    with pytest.raises(Exception):
        Config().selection.k = 2  # type: ignore[misc]


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
