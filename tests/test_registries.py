"""Every config key that names a method lists exactly the names its registry knows: a name added to one and
not the other is either refused by the config though implemented, or accepted and then unknown at run time."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from atlasseg import config as cfg
from atlasseg.evaluation import METRICS as EVALUATION_METRICS
from atlasseg.fusion import FUSERS, INTENSITIES
from atlasseg.propagation import LABEL_INTERPOLATORS
from atlasseg.registration.affine import OPTIMIZERS
from atlasseg.registration.itk import METRICS as ITK_METRICS
from atlasseg.registration.stages import NONRIGID_METHODS
from atlasseg.similarity import SIMILARITIES


def literal_names(section, key: str) -> set[str]:
    """The string names a config field's annotation allows (inside Union, Optional or a tuple of them)."""
    hints = typing.get_type_hints(section)
    assert key in {f.name for f in dataclasses.fields(section)}, f"{section.__name__} has no field {key!r}"
    names: set[str] = set()
    pending = [hints[key]]
    while pending:
        hint = pending.pop()
        if typing.get_origin(hint) is typing.Literal:
            names.update(a for a in typing.get_args(hint) if isinstance(a, str))
        else:
            pending.extend(typing.get_args(hint))
    assert names, f"{section.__name__}.{key} names no Literal values"
    return names


@pytest.mark.parametrize(
    ("section", "key", "registry"),
    [
        (cfg.SelectionConfig, "metric", SIMILARITIES),
        (cfg.AffineConfig, "metric", ITK_METRICS),
        (cfg.AffineConfig, "optimizer", OPTIMIZERS),
        (cfg.NonrigidConfig, "method", NONRIGID_METHODS),
        (cfg.NonrigidConfig, "metric", ITK_METRICS),
        (cfg.PropagationConfig, "interpolator", LABEL_INTERPOLATORS),
        (cfg.FusionConfig, "method", FUSERS),
        (cfg.FusionConfig, "metric", INTENSITIES),
        (cfg.EvaluationConfig, "metrics", EVALUATION_METRICS),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else (v if isinstance(v, str) else ""),
)
def test_config_names_equal_registry_keys(section, key, registry):
    assert literal_names(section, key) == set(registry)


def test_literal_names_reads_through_unions_and_tuples():
    assert literal_names(cfg.SelectionConfig, "k") == {"all"}  # Union[int, Literal["all"]]
    assert "dice" in literal_names(cfg.EvaluationConfig, "metrics")  # tuple[Literal[...], ...]
