"""Config validation: every bad value raises ValueError naming the field.

Run: python -m pytest -q tests/test_config.py
"""

import dataclasses

import pytest

from alignguard import AlignGuardConfig, FisherConfig


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"lambda_a": -1}, "lambda_a"),
        ({"lambda_t": -0.1}, "lambda_t"),
        ({"alpha": 1.5}, "alpha"),
        ({"task_metric": "hessian"}, "task_metric"),
        ({"geo_metric": "x"}, "geo_metric"),
        ({"overlap": "x"}, "overlap"),
        ({"overlap_quantile": 1.0}, "overlap_quantile"),
        ({"mode": "clip"}, "mode"),
        ({"refresh_every": 0}, "refresh_every"),
    ],
)
def test_alignguard_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        AlignGuardConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"fisher_labels": "true"}, "fisher_labels"),
        ({"fisher_storage": "x"}, "fisher_storage"),
        ({"fisher_modules": []}, "fisher_modules"),
    ],
)
def test_fisher_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        FisherConfig(**kwargs)


def test_every_field_has_help_text():
    for cls in (AlignGuardConfig, FisherConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    assert FisherConfig(fisher_modules="q_proj").fisher_modules == ["q_proj"]
