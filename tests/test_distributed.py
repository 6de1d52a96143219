"""Multi-process Fisher and DDP training on 2 CPU processes (gloo), sharding, and the sketch at larger d.

Run: python -m pytest -q tests/test_distributed.py
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignguard import estimate_fisher
from alignguard.distributed import rank_info, shard_batches
from alignguard.sketch import NystromSketch
from tests import dist_worker

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, *worker_args: str, accelerate_config: str | None = None) -> None:
    """Run tests/dist_worker.py on WORLD CPU processes (gloo), offline, and fail with its output if it fails.

    With `accelerate_config` (a file in configs/accelerate/), launch through `accelerate launch` instead.
    """
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # 2 processes on a 2-core CI box
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    if accelerate_config is None:
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--nnodes=1"]
        launcher += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    else:
        config = ROOT / "configs" / "accelerate" / accelerate_config
        # The shipped configs say bf16 (for GPUs); the comparison with one fp32 process needs fp32.
        launcher = ["-m", "accelerate.commands.launch", "--config_file", str(config), "--mixed_precision=no"]
        launcher += [f"--num_processes={WORLD}", f"--main_process_port={_free_port()}"]
    cmd = [sys.executable, *launcher, str(ROOT / "tests" / "dist_worker.py"), str(out), *worker_args]
    # 600 s: the first DeepSpeed run JIT-builds its CPU communication op (~3 min on 2 cores, then cached).
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    """Run tests/dist_worker.py once on 2 processes; every multi-process test reads its outputs."""
    out = tmp_path_factory.mktemp("dist")
    _launch(out)
    return out


# ---- sharding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 7])
def test_shard_batches_gives_each_batch_to_exactly_one_rank(n, world):
    items = list(range(n))
    shards = [shard_batches(items, r, world) for r in range(world)]
    assert sorted(x for s in shards for x in s) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_batches_defaults_and_errors():
    assert rank_info().world_size == 1 and shard_batches([1, 2, 3]) == [1, 2, 3]
    with pytest.raises(ValueError, match="rank"):
        shard_batches([1], rank=2, world_size=2)


def test_full_parameters_is_a_no_op_for_whole_weights_and_refuses_sharded_ones():
    from alignguard import AlignGuardRegularizer
    from alignguard.distributed import full_parameters, regularizer_parameters
    from tests.helpers import random_subspaces_for, tiny_peft

    model = tiny_peft("llama")
    params = regularizer_parameters(AlignGuardRegularizer(model, random_subspaces_for(model)))
    assert len(params) == 2 * len([n for n, _ in model.named_parameters() if "lora_A" in n])
    with full_parameters(params):
        pass
    flat = torch.nn.Parameter(torch.zeros(7))  # what an FSDP shard of a LoRA weight looks like outside forward
    with pytest.raises(RuntimeError, match="sharded"):
        full_parameters([*params, flat])


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes == WORLD and config.num_machines == 1


# ---- 2 processes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(dist_worker.FISHER_CASES))
def test_two_process_fisher_equals_one_process(ddp_out, case):
    model, batches = dist_worker.fisher_inputs(dist_worker.FISHER_CASES[case][1])
    ref = estimate_fisher(model, batches, dist_worker.fisher_config(case))
    got = load_file(str(ddp_out / f"fisher_{case}.safetensors"))
    want = dist_worker.factor_tensors(ref)
    assert sorted(got) == sorted(want)
    assert any(n.startswith("input.") for n in want) == bool(dist_worker.fisher_config(case).input_factor)
    for name in want:
        # Only the float32 summation order differs (sketch: also Y's); Omega is seeded identically per rank.
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * want[name].abs().max().item())
    counts = load_file(str(ddp_out / f"counts_{case}.safetensors"))
    assert {n: int(c) for n, c in counts.items()} == ref.token_counts  # every token counted exactly once


def test_ddp_step_equals_single_process_step_with_regulariser_once(ddp_out, tmp_path):
    got = load_file(str(ddp_out / "ddp_lora.safetensors"))
    got_ga = load_file(str(ddp_out / "ddp_ga2_lora.safetensors"))  # 2 ranks x 2 accumulated micro-batches of 1
    n = 2 * WORLD
    single = dist_worker.train_one_step(str(tmp_path / "a"), per_device_batch=n, n_examples=n)
    for name in single:
        torch.testing.assert_close(got[name], single[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_ga[name], single[name], rtol=1e-4, atol=1e-6)

    # The match is informative only if the regulariser moves the weights far more than the tolerance, and if
    # counting it WORLD times (summed instead of averaged over ranks) would be visibly different.
    def dist(x):
        return max((x[k] - got[k]).abs().max().item() for k in got)

    no_reg = dist_worker.train_one_step(
        str(tmp_path / "b"), n, n, ag_config=dict(lambda_a=0.0, lambda_t=0.0, lambda_nc=0.0)
    )
    twice = dist_worker.train_one_step(
        str(tmp_path / "c"), n, n, ag_config={k: WORLD * v for k, v in dist_worker.AG_CONFIG.items()}
    )
    assert dist(no_reg) > 1e-3 and dist(twice) > 1e-3


def test_fsdp2_fisher_equals_one_process_and_uneven_or_project_fail_clearly(ddp_out):
    """On an FSDP2-sharded model every rank runs its batches in lockstep (an empty batch still joins the
    collectives but adds nothing); the factors equal one unsharded process over all batches."""
    _, batches = dist_worker.fsdp2_fisher_inputs()
    ref = estimate_fisher(dist_worker.tiny_peft("llama", seed=0), batches, dist_worker.fisher_config("dense"))
    got = load_file(str(ddp_out / "fisher_fsdp2.safetensors"))
    wanted = dist_worker.factor_tensors(ref)  # output and input factors
    assert sorted(got) == sorted(wanted) and any(n.startswith("input.") for n in wanted)
    for name, want in wanted.items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    counts = load_file(str(ddp_out / "counts_fsdp2.safetensors"))
    assert {n: int(c) for n, c in counts.items()} == ref.token_counts
    errors = (ddp_out / "fsdp2_errors.txt").read_text()
    assert "uneven: ValueError: estimate_fisher: the model is sharded by FSDP2" in errors, errors
    assert "between 1 and 2 batches" in errors, errors
    assert "project: NotImplementedError: mode='project' with FSDP2-sharded LoRA weights" in errors, errors


@pytest.mark.parametrize("reshard", [1, 0])
def test_fsdp2_step_equals_single_process_step_with_regulariser_once(ddp_out, reshard):
    """FSDP2 (`fully_shard`, DTensor LoRA weights): the regulariser gathers them with an autograd path back to the
    shards; with reshard_after_forward=False the weights are still whole when it runs. Both == one process."""
    got = load_file(str(ddp_out / f"fsdp2_reshard{reshard}_lora.safetensors"))
    single = dist_worker.fsdp2_sgd_step()
    for name in single:
        torch.testing.assert_close(got[name], single[name], rtol=1e-4, atol=1e-6)
    no_reg = dist_worker.fsdp2_sgd_step(ag_config=dict(lambda_a=0.0, lambda_t=0.0, lambda_nc=0.0))
    twice = dist_worker.fsdp2_sgd_step(ag_config={k: WORLD * v for k, v in dist_worker.AG_CONFIG.items()})
    for other in (no_reg, twice):  # dropping the regulariser or counting it per rank would be visible
        assert max((other[k] - got[k]).abs().max().item() for k in got) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, config",
    [(2, None), (3, None), ("accelerate", "deepspeed_zero2.yaml"), ("accelerate", "deepspeed_zero3.yaml")],
)
def test_deepspeed_zero_step_equals_single_process_step(tmp_path, stage, config):
    """ZeRO-2 (parameters whole) and ZeRO-3 (parameters partitioned, gathered for the regulariser), set up by
    TrainingArguments(deepspeed=...) under torchrun or by `accelerate launch` with the shipped configs."""
    pytest.importorskip("deepspeed")
    _launch(tmp_path, f"--zero={stage}", accelerate_config=config)
    got = load_file(str(tmp_path / f"zero{stage}_lora.safetensors"))
    n = 2 * WORLD
    single = dist_worker.train_one_step(str(tmp_path / "ref"), per_device_batch=n, n_examples=n)
    for name in single:
        torch.testing.assert_close(got[name], single[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_deepspeed_gradient_accumulation_counts_the_regulariser_once(tmp_path):
    """Under DeepSpeed the Trainer (transformers 5.23) still divides an unnormalised loss by the accumulation steps
    (and tells the engine not to divide again), so the regulariser must be weighted by GA there as elsewhere:
    GA=2 x 1 example == GA=1 x 2 examples == one process, for both of the Trainer's loss-scaling paths."""
    pytest.importorskip("deepspeed")
    _launch(tmp_path, "--zero-ga=2")
    n = 2 * WORLD
    single = dist_worker.train_one_step(str(tmp_path / "ref"), per_device_batch=n, n_examples=n)
    half = {k: v / 2 for k, v in dist_worker.AG_CONFIG.items()}  # what a regulariser weighted 1/GA amounts to
    half_reg = dist_worker.train_one_step(str(tmp_path / "half"), n, n, ag_config=half)
    for kind in ("scaled", "unscaled"):
        one = load_file(str(tmp_path / f"zero2_ga1_{kind}_lora.safetensors"))
        acc = load_file(str(tmp_path / f"zero2_ga2_{kind}_lora.safetensors"))
        for name in single:
            torch.testing.assert_close(one[name], single[name], rtol=1e-4, atol=1e-6, msg=f"{kind} {name}")
            torch.testing.assert_close(acc[name], one[name], rtol=1e-4, atol=1e-6, msg=f"{kind} {name}")
        assert max((half_reg[k] - acc[k]).abs().max().item() for k in acc) > 1e-3  # 1/GA would be visible


@pytest.mark.slow
def test_accelerate_launch_with_shipped_ddp_cpu_config(tmp_path):
    """configs/accelerate/ddp_cpu.yaml runs the whole worker (Fisher + DDP steps) like torch.distributed.run."""
    _launch(tmp_path, accelerate_config="ddp_cpu.yaml")
    model, batches = dist_worker.fisher_inputs(dist_worker.FISHER_CASES["dense"][1])
    ref = estimate_fisher(model, batches, dist_worker.fisher_config("dense"))
    got = load_file(str(tmp_path / "fisher_dense.safetensors"))
    for name, want in ref.factors.items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    n = 2 * WORLD
    single = dist_worker.train_one_step(str(tmp_path / "ref"), per_device_batch=n, n_examples=n)
    got = load_file(str(tmp_path / "ddp_lora.safetensors"))
    for name in single:
        torch.testing.assert_close(got[name], single[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fsdp1_sharded_lora_weights_are_refused_clearly(tmp_path):
    """Under FSDP1 the LoRA weights are flattened shards outside forward: a clear error pointing to FSDP2."""
    _launch(tmp_path, "--fsdp")
    outcome = (tmp_path / "fsdp_outcome.txt").read_text()
    assert outcome.startswith("RuntimeError: AlignGuard: some LoRA weights are sharded"), outcome
    assert "FSDP2" in outcome


# ---- sketch vs dense at a larger d ----------------------------------------------------------------------------


def test_sketch_top_subspace_matches_dense_at_d512_and_sums_across_shards():
    d, k, m, n = 512, 64, 16, 4096
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    spectrum = 0.8 ** torch.arange(d, dtype=torch.float64)  # decaying, like the measured factors
    g = (torch.randn(n, d, generator=gen, dtype=torch.float64) * spectrum.sqrt()) @ q.T
    dense = g.T @ g
    lam, vec = torch.linalg.eigh(dense)
    lam, vec = lam.flip(0)[:m], vec.flip(1)[:, :m]

    one, halves = NystromSketch(d, k, seed=3), [NystromSketch(d, k, seed=3) for _ in range(2)]
    one.update(g.float())
    halves[0].update(g[: n // 3].float())  # uneven shards, like round-robin batches on 2 ranks
    halves[1].update(g[n // 3 :].float())
    # What the all-reduce does: Y and the trace are linear in G, so the shard sums equal the one-stream sketch.
    torch.testing.assert_close(halves[0].y + halves[1].y, one.y, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(halves[0].trace + halves[1].trace, one.trace)
    torch.testing.assert_close(one.trace, dense.trace())

    eig, u = one.eigh()
    cos = torch.linalg.svdvals(vec.T @ u[:, :m].double())
    assert cos.min() > 0.999
    torch.testing.assert_close(eig[:m].double(), lam, rtol=0.02, atol=0.0)
