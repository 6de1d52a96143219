"""R-Capsule evaluation helpers: plan fidelity, the Wilson interval, table, summary and plot.

Run: python -m pytest -q tests/test_capsule_evaluate.py
"""

import math
import struct

import pytest

from alignguard.capsule.evaluate import (
    format_table,
    plan_fidelity,
    plot_accuracy_vs_tokens,
    summarize,
    wilson_interval,
)


@pytest.mark.parametrize(
    "pred, ref, exact, ops",
    [
        ("add a to b; multiply by c", "add a to b; multiply by c", 1.0, 1.0),
        ("add  a to b;  multiply by c ", "add a to b; multiply by c", 1.0, 1.0),  # whitespace-insensitive
        ("add x; multiply by y", "add a to b; multiply by c", 0.0, 1.0),  # roles wrong, operators right
        ("add a; divide by c", "add a; multiply by c", 0.0, 0.5),
        ("add a", "add a; subtract b; multiply by c; divide by d", 0.0, 0.25),  # too short: over the longer list
        ("subtract a; add b", "add b; subtract a", 0.0, 0.0),  # order matters
        ("", "", 1.0, 1.0),
    ],
)
def test_plan_fidelity(pred, ref, exact, ops):
    assert plan_fidelity(pred, ref) == (exact, pytest.approx(ops))


def _row(split, system, mode, acc, tokens, n=4, ci=(0.1, 0.9), compared=False, plan=(0.25, 0.75)):
    return {
        "split": split,
        "system": system,
        "mode": mode,
        "compared": compared,
        "n": n,
        "accuracy": acc,
        "accuracy_ci_low": ci[0] if ci else None,
        "accuracy_ci_high": ci[1] if ci else None,
        "visible_tokens": tokens,
        "latency_s": 0.0123,
        "plan_exact": plan[0] if plan else None,
        "plan_op_acc": plan[1] if plan else None,
    }


ROWS = [
    _row("eval", "capsule (lambda=1)", "capsule", 0.5, 12.25, ci=(0.15, 0.85)),
    _row("eval", "full CoT", "full_cot", 0.75, 49.0),
    _row("eval", "capsule (lambda=0) [lambda0]", "capsule", 0.25, 10.0, compared=True),
    _row("eval_long", "no CoT", "no_cot", 0.0, 3.0, ci=None, plan=None),
]


@pytest.mark.parametrize("k, n", [(7, 10), (0, 20), (20, 20), (150, 300)])
def test_wilson_interval_matches_the_formula(k, n):
    # The textbook Wilson score interval, written out here to check how scipy is called.
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(centre - half, abs=1e-9) and high == pytest.approx(centre + half, abs=1e-9)
    assert 0.0 <= low <= p <= high <= 1.0
    assert wilson_interval(0, 0) == (None, None)


def test_table_summary_and_plot(tmp_path):
    table = format_table(ROWS).splitlines()
    assert table[0].startswith("| split | system | n | accuracy | 95% CI | visible_tokens | latency_s")
    assert table[2] == "| eval | capsule (lambda=1) | 4 | 0.500 | 0.150-0.850 | 12.2 | 12.3 ms | 0.250 | 0.750 |"
    assert table[5].endswith("| 0.000 | - | 3.0 | 12.3 ms | - | - |")
    summary = summarize(ROWS)
    # The trained capsule (not the compared lambda = 0 row) against full CoT.
    assert summary["eval"]["capsule_minus_full_cot_accuracy"] == pytest.approx(0.5 - 0.75)
    assert summary["eval"]["capsule_over_full_cot_tokens"] == pytest.approx(12.25 / 49.0)
    assert summary["eval_long"] == {"capsule_minus_full_cot_accuracy": None, "capsule_over_full_cot_tokens": None}
    one = plot_accuracy_vs_tokens(ROWS[:3], tmp_path / "plots" / "one.png")
    two = plot_accuracy_vs_tokens(ROWS, tmp_path / "plots" / "two.png")
    assert one.read_bytes()[:8] == two.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def width(png):
        return struct.unpack(">I", png.read_bytes()[16:20])[0]

    assert width(two) > width(one)  # one panel per split


def test_saved_row_key_follows_weights_problems_and_settings(tmp_path):
    from alignguard.capsule.config import CapsuleEvalConfig
    from alignguard.capsule.data import generate_problems
    from alignguard.capsule.evaluate import _row_key

    (tmp_path / "adapter").mkdir()
    (tmp_path / "capsule.safetensors").write_bytes(b"capsule-1")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"lora-1")
    exs = generate_problems(3, 2, 2, seed=0)
    cfg = CapsuleEvalConfig()

    def key(**kw):
        args = {"cfg": cfg, "weights_dir": tmp_path, "name": "capsule", "mode": "capsule", "examples": exs}
        return _row_key(**{**args, **kw}, max_length=64)

    base = key()
    assert key() == base
    assert key(cfg=CapsuleEvalConfig(compare_checkpoints=["other"], ood_gsm8k=True)) == base  # adding rows only
    assert key(cfg=CapsuleEvalConfig(max_new_tokens=7)) != base
    assert key(examples=exs[:2]) != base and key(mode="capsule_zeroed") != base
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"lora-2")  # retrained adapter
    assert key() != base
