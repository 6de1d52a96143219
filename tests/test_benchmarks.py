"""Smoke tests of the benchmarks on a tiny Llama shape: benchmarks/growth.py (the size x tokens sweep: rows,
table, JSON) and benchmarks/overhead.py's subspace timing.

No timing is asserted, only that every measurement is made, is positive and reaches the table.
"""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

growth = pytest.importorskip("growth")
overhead = pytest.importorskip("overhead")

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    batch=1,
    seq=16,
    dtype="float32",
)
SPEC = dict(
    preset="tiny", tokens=[(1, 16), (2, 16)], steps=1, warmup=0, fisher_batches=1, repeats=1, dense=True, sketch_rank=8
)


def test_sweep_rows_and_table(tmp_path):
    import torch

    rows = growth.sweep({"tiny": SPEC}, torch.device("cpu"), presets={"tiny": TINY})
    assert [r["tokens"] for r in rows] == [16, 32]
    for row in rows:
        assert row["plain_step_s"] > 0 and row["alignguard_step_s"] > 0 and row["regulariser_s"] > 0
        assert len(row["step_ratio_per_pair"]) == SPEC["steps"]
        assert set(row["fisher"]) == {"dense", "sketch"}
        for fisher in row["fisher"].values():
            assert fisher["ratio"] > 0 and fisher["per_estimation_fixed_s"] >= 0
            assert len(fisher["ratio_per_repeat"]) == SPEC["repeats"]
        assert row["overhead_predicted"] == pytest.approx(row["regulariser_s"] / row["plain_step_s"])
    table = growth.format_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(rows)  # header, separator, one line per row
    assert all(line.count("|") == len(growth.COLUMNS) + 1 for line in lines)
    assert "1x16=16" in table and "2x16=32" in table
    assert f"{rows[1]['fisher']['dense']['ratio']:.2f}" in lines[3]
    # A size without dense factors shows n/a in that column.
    no_dense = dict(rows[0], fisher={"sketch": rows[0]["fisher"]["sketch"]})
    assert "| n/a |" in growth.format_table([no_dense], header=False)
    json.dumps(rows)  # the JSON the script writes holds exactly these rows


def test_fixed_cost_timers_are_removed_afterwards():
    before = [getattr(owner, attr) for owner, attr in growth.FIXED_COSTS if hasattr(owner, attr)]
    seconds = []
    with pytest.raises(RuntimeError), growth.timed_fixed_costs(seconds):
        raise RuntimeError("boom")
    assert [getattr(owner, attr) for owner, attr in growth.FIXED_COSTS if hasattr(owner, attr)] == before


def test_overhead_subspace_timing_uses_the_current_config_fields():
    # SubspaceConfig's `method` became `eigen_solver`; overhead.py still passed `method=` and raised TypeError.
    import torch

    from alignguard import FisherConfig
    from alignguard.fisher import estimate_fisher

    model = overhead.build(TINY, torch.device("cpu"))
    state = estimate_fisher(model, [overhead.batch_for(TINY, torch.device("cpu"))], FisherConfig(show_progress=False))
    out = overhead.bench_subspaces(state)
    assert set(out) == {"exact", "randomized"}
    assert all(v["seconds"] > 0 and v["mean_m"] >= 1 for v in out.values())


def test_generation_benchmark_loads_a_named_model_through_the_one_loader():
    # benchmarks/generation.py imported a second loader that no longer exists; it goes through alignguard.models.
    import argparse

    generation = pytest.importorskip("generation")
    args = argparse.Namespace(model="tiny-llama", dtype="float32", device="cpu")
    model, tok, name = generation.build_model(args)
    assert name == "tiny-llama" and tok is not None and sum(p.numel() for p in model.parameters()) > 0


def test_peer_steps_times_every_trainer_on_its_own_copy_and_runs_its_term(tmp_path):
    """benchmarks/peer_steps.py: one Trainer per compare method, each stepping its own LoRA copy through its own
    `training_step` (so AsFT's penalty, Lisa's proximal term and the surgery really run), steps interleaved."""
    import torch

    peer_steps = pytest.importorskip("peer_steps")
    device = torch.device("cpu")
    trainers = peer_steps.build_trainers(TINY, device, str(tmp_path), max_steps=3)
    assert list(trainers) == list(peer_steps.METHODS)
    params = {n: [p for p in t.model.parameters() if p.requires_grad] for n, t in trainers.items()}
    assert len({id(ps[0]) for ps in params.values()}) == len(trainers)  # no two share weights
    before = {n: [p.detach().clone() for p in ps] for n, ps in params.items()}
    times = peer_steps.time_trainer_steps(trainers, overhead.batch_for(TINY, device), device, steps=2, warmup=1)
    assert {n: len(t) for n, t in times.items()} == {n: 2 for n in peer_steps.METHODS}
    assert all(t > 0 for ts in times.values() for t in ts)
    for name, ps in params.items():  # every optimizer stepped its own copy
        assert any(not torch.equal(p, b) for p, b in zip(ps, before[name], strict=True)), name
    assert all(t.state.global_step == 3 for t in trainers.values())
    logged = {n: set(getattr(t, "_step_logged", {})) for n, t in trainers.items()}
    assert "asft_penalty" in logged["asft"] and "lisa_proximal" in logged["lisa"]
    assert "surgery_cosine" in logged["surgery"]
