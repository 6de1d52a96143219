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


def _run_configs():
    from alignguard.recipes.align import AlignRunConfig
    from alignguard.recipes.compare import CompareConfig, HarnessConfig
    from alignguard.recipes.eval import EvalConfig
    from alignguard.recipes.fisher import FisherRunConfig
    from alignguard.recipes.scaling import ScalingConfig
    from alignguard.recipes.train import TrainRunConfig

    return [TrainRunConfig, AlignRunConfig, FisherRunConfig, EvalConfig, HarnessConfig, CompareConfig, ScalingConfig]


@pytest.mark.parametrize(
    "cls_name,kwargs,field",
    [
        ("TrainRunConfig", {"learning_rate": -0.1}, "learning_rate"),
        ("TrainRunConfig", {"learning_rate": 0}, "learning_rate"),
        ("TrainRunConfig", {"seed": -5}, "seed"),
        ("TrainRunConfig", {"lora_dropout": 1.5}, "lora_dropout"),
        ("TrainRunConfig", {"max_length": 0}, "max_length"),
        ("TrainRunConfig", {"lora_alpha": -16}, "lora_alpha"),
        ("TrainRunConfig", {"target_modules": []}, "target_modules"),
        ("AlignRunConfig", {"learning_rate": 0}, "learning_rate"),
        ("AlignRunConfig", {"lora_alpha": 0}, "lora_alpha"),
        ("AlignRunConfig", {"max_examples": 0}, "max_examples"),
        ("AlignRunConfig", {"seed": -1}, "seed"),
        ("FisherRunConfig", {"max_length": 0}, "max_length"),
        ("FisherRunConfig", {"max_new_tokens": 0}, "max_new_tokens"),
        ("FisherRunConfig", {"seed": -1}, "seed"),
        ("HarnessConfig", {"safe_lora_threshold": 1.5}, "safe_lora_threshold"),
        ("HarnessConfig", {"extra_judges": ["nosuchjudge"]}, "extra_judges"),
        ("CompareConfig", {"seeds": [0, -1]}, "seeds"),
        ("CompareConfig", {"methods": ["alignguard@lambda_a=abc"]}, "methods"),
        ("ScalingConfig", {"seed": -1}, "seed"),
        ("EvalConfig", {"model": "m", "out": "o", "judge": "nosuchjudge"}, "--judge"),
        ("EvalConfig", {"model": "m", "out": "o", "seed": -1}, "--seed"),
    ],
)
def test_run_config_errors(cls_name, kwargs, field):
    cls = {c.__name__: c for c in _run_configs()}[cls_name]
    if cls_name == "TrainRunConfig":
        kwargs = {"method": "lora", **kwargs}
    with pytest.raises(ValueError, match=f"^{field}:|^{field} must"):
        cls(**kwargs)


def test_every_run_config_field_has_help_text():
    from alignguard.recipes.demo import DemoConfig

    for cls in [*_run_configs(), DemoConfig]:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "3"])
def test_require_whole_number_refuses_what_is_not_a_count(value):
    from types import SimpleNamespace

    from alignguard.config_values import require_whole_number

    with pytest.raises(ValueError, match=r"n_things: must be a whole number >= 1"):
        require_whole_number(SimpleNamespace(ok=3, n_things=value), ("ok", "n_things"))
    require_whole_number(SimpleNamespace(n_things=0), ("n_things",), low=0)  # the bound is the caller's
