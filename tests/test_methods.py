"""Method names and the drift-reduction reference row (plain LoRA at the same poison ratio).

Run: python -m pytest -q tests/test_methods.py
"""

import json
from types import SimpleNamespace

import pytest

from alignguard.recipes.methods import is_plain_reference, method_spec, reference_method
from tests.test_report import _dc_results


def test_reference_is_plain_lora_at_the_same_poison_ratio():
    poison = {"plain_lora": 0.2, "plain_lora@poison_ratio=0": 0.0, "alignguard": 0.2, "alignguard@poison_ratio=0": 0.0}
    assert reference_method("alignguard", poison) == "plain_lora"
    assert reference_method("alignguard@poison_ratio=0", poison) == "plain_lora@poison_ratio=0"
    assert reference_method("plain_lora@poison_ratio=0", poison) == "plain_lora@poison_ratio=0"
    # No plain row at 0.1 in the run: no reference (n/a), never the poisoned plain LoRA.
    assert reference_method("alignguard@poison_ratio=0.1", {**poison, "alignguard@poison_ratio=0.1": 0.1}) is None
    # Rows written before the ratio was recorded: the old behaviour (plain_lora).
    assert reference_method("alignguard", {"plain_lora": None, "alignguard": None}) == "plain_lora"


def test_only_plain_lora_with_training_overrides_is_a_reference():
    assert is_plain_reference("plain_lora@poison_ratio=0")
    assert not is_plain_reference("alignguard@poison_ratio=0")
    assert not is_plain_reference("replay")
    with pytest.raises(ValueError, match="methods: 'plain_lora@poison_ratio=2'"):
        method_spec("plain_lora@poison_ratio=2")


def _write_row(root, name, refused, poison):
    d = _dc_results(0.5)
    d["per_prompt"] = [
        {"id": f"p{i}", "label": "unsafe", "category": "cyber", "refused": r, "extra": {}}
        for i, r in enumerate(refused)
    ]
    mdir = root / "seed0" / name if name != "base" else root / "base"
    (mdir / "driftcheck").mkdir(parents=True)
    (mdir / "driftcheck" / "results.json").write_text(json.dumps(d))
    if name == "base":
        (mdir / "task.json").write_text(json.dumps({"accuracy": 0.3}))
    else:
        result = {"task": {"accuracy": 0.6}, "mean_step_seconds": 1.0, "poison_ratio": poison}
        (mdir / "result.json").write_text(json.dumps(result))


def test_control_rows_drift_reduction_uses_the_poison_free_plain_lora(tmp_path):
    from alignguard.report.compare_table import aggregate

    _write_row(tmp_path, "base", [True] * 4, None)
    _write_row(tmp_path, "plain_lora", [False] * 4, 0.2)  # drift 1.0
    _write_row(tmp_path, "plain_lora@poison_ratio=0", [True, True, False, False], 0.0)  # drift 0.5
    _write_row(tmp_path, "alignguard@poison_ratio=0", [True, True, True, False], 0.0)  # drift 0.25
    methods = ["plain_lora", "plain_lora@poison_ratio=0", "alignguard@poison_ratio=0"]
    results = aggregate(SimpleNamespace(out=str(tmp_path), methods=methods, seeds=[0], model="m"))
    row = results["rows"]["alignguard@poison_ratio=0"]
    assert row["reference"] == "plain_lora@poison_ratio=0"
    assert row["seeds"][0]["drift_reduction"]["value"] == pytest.approx(0.5)  # 1 - 0.25 / 0.5, not 1 - 0.25 / 1.0
    assert results["rows"]["plain_lora"]["seeds"][0]["drift_reduction"]["value"] == pytest.approx(0.0)


def test_every_peer_config_has_a_setup_and_the_self_screen_fills_its_filter(tmp_path):
    from alignguard.recipes.method_rows import PEER_LOGS, PEER_SETUPS, prepare_peer
    from alignguard.recipes.methods import PEER_CONFIGS

    assert set(PEER_SETUPS) == set(PEER_CONFIGS) and set(PEER_LOGS) <= set(PEER_CONFIGS)
    cfg = SimpleNamespace(eval_batch_size=4, out=str(tmp_path))
    info, extra = prepare_peer(cfg, "self_screen", "self_screen", None, None, [], tmp_path)
    assert callable(extra["example_filter"])
    assert extra["method_settings"]["self_screen"] == info
    with pytest.raises(KeyError):
        prepare_peer(cfg, "self_screen", "not_a_peer", None, None, [], tmp_path)
