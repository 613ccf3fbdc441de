"""Property test: random config and manifest documents only ever raise the package's own errors."""

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlasseg.config import Config, config_from_dict, load_config
from atlasseg.errors import AtlassegError
from atlasseg.manifest import load_manifest

_CONFIG_KEYS = [
    "selection",
    "registration",
    "affine",
    "nonrigid",
    "fusion",
    "parallel",
    "output",
    "propagation",
    "evaluation",
    "k",
    "metric",
    "iterations",
    "stages",
    "shrink_factors",
    "smoothing_sigmas",
    "method",
    "n_jobs",
    "dir",
    "min_atlases",
    "enabled",
    "metrics",
    "sampling_percentage",
    "learning_rate",
]
_MANIFEST_KEYS = ["labels", "atlases", "targets", "id", "image", "mask", "landmarks"]
_PATHS = ["a.nii.gz", "a_seg.nii.gz", "missing.nii.gz", "../../x", ".", "", "/"]

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 300)
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["all", "ncc", "rigid", "affine", "demons", "majority", "loky"] + _PATHS)
)


def _documents(keys):
    key = st.sampled_from(keys) | st.text(max_size=6) | st.integers(-3, 300)
    return st.recursive(
        _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(key, inner, max_size=5), max_leaves=20
    )


def _shaped(template: dict):
    """Documents shaped like ``template`` (the real sections and keys), every value replaced at random."""
    value = _scalars | st.lists(_scalars, max_size=3)
    return st.fixed_dictionaries(
        {}, optional={key: _shaped(sub) if isinstance(sub, dict) else value for key, sub in template.items()}
    )


_CONFIGS = _shaped(Config().to_dict()) | _documents(_CONFIG_KEYS) | st.text(max_size=40)
_entry = st.fixed_dictionaries({}, optional={k: _scalars for k in _MANIFEST_KEYS[3:]})
_MANIFESTS = (
    st.fixed_dictionaries(
        {},
        optional={
            "labels": st.dictionaries(st.integers(0, 300) | _scalars, _scalars, max_size=3),
            "atlases": st.lists(_entry, max_size=3) | _scalars,
            "targets": st.lists(_entry, max_size=3) | _scalars,
        },
    )
    | _documents(_MANIFEST_KEYS)
    | st.text(max_size=40)
)


_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _write(folder: str, name: str, document) -> Path:
    path = Path(folder) / name
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return path


@_FUZZ
@given(_CONFIGS)
def test_random_configs_raise_only_package_errors(document):
    try:
        assert isinstance(config_from_dict(document, source="fuzz"), Config)
    except AtlassegError:
        pass
    with tempfile.TemporaryDirectory() as folder:
        try:
            assert isinstance(load_config(_write(folder, "c.yaml", document)), Config)
        except AtlassegError:
            pass


@_FUZZ
@given(_MANIFESTS)
def test_random_manifests_raise_only_package_errors(document):
    with tempfile.TemporaryDirectory() as folder:
        for name in ("a.nii.gz", "a_seg.nii.gz"):
            (Path(folder) / name).write_bytes(b"")
        try:
            load_manifest(_write(folder, "data_manifest.yaml", document))
        except AtlassegError:
            pass
