"""R-Capsule evaluation helpers: plan fidelity, table and plot.

Run: python -m pytest -q tests/test_capsule_evaluate.py
"""

import pytest

from alignguard.capsule.evaluate import format_table, plan_fidelity, plot_accuracy_vs_tokens


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


ROWS = [
    {
        "split": "eval",
        "system": "capsule (lambda=1)",
        "n": 4,
        "accuracy": 0.5,
        "visible_tokens": 12.25,
        "latency_s": 0.0123,
        "plan_exact": 0.25,
        "plan_op_acc": 0.75,
    },
    {
        "split": "eval_long",
        "system": "no CoT",
        "n": 4,
        "accuracy": 0.0,
        "visible_tokens": 3.0,
        "latency_s": 0.002,
        "plan_exact": None,
        "plan_op_acc": None,
    },
]


def test_table_and_plot(tmp_path):
    table = format_table(ROWS).splitlines()
    assert table[0].startswith("| split | system | n | accuracy | visible_tokens | latency_s")
    assert table[2] == "| eval | capsule (lambda=1) | 4 | 0.500 | 12.2 | 12.3 ms | 0.250 | 0.750 |"
    assert table[3].endswith("| - | - |")
    png = plot_accuracy_vs_tokens(ROWS, tmp_path / "plots" / "acc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
