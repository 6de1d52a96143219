"""Worker for tests/test_distributed.py, launched on N CPU processes (gloo) by torch.distributed.run:

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT_DIR [--zero=2|--zero=3|--zero=accelerate|--zero-ga=2|--fsdp]

Each rank (1) estimates the Fisher factors of a tiny model on its round-robin shard of the same batches (dense
and sketch, an uneven split, and a split where one rank gets no batch), and (2) runs one AlignGuardTrainer step
under DDP (or, with --zero=N, only that step under DeepSpeed ZeRO-N). Rank 0 writes everything to OUT_DIR as safetensors; the test compares it with one-process runs.
The functions here are also imported by the test, so both sides build exactly the same models and data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests.helpers`, when run as a script

from alignguard import AlignGuardConfig, AlignGuardTrainer, FisherConfig, estimate_fisher  # noqa: E402
from alignguard.data import PaddingCollator, tokenize_example  # noqa: E402
from alignguard.distributed import full_parameters, rank_info, shard_batches  # noqa: E402
from alignguard.io import atomic_save_file  # noqa: E402
from alignguard.tiny import make_tiny_model, make_tiny_tokenizer  # noqa: E402
from tests.helpers import random_subspaces_for, randomize_lora_, tiny_batches, tiny_peft  # noqa: E402

# name -> (FisherConfig kwargs, number of batches): 5 batches split 3/2, and 1 batch split 1/0.
FISHER_CASES = {
    "dense": (dict(fisher_storage="dense", input_factor=True), 5),
    "sketch": (dict(fisher_storage="sketch", sketch_rank=24, input_factor=True), 5),
    "dense_one_batch": (dict(fisher_storage="dense"), 1),
}
# Examples in the FSDP2 step: split evenly over the ranks; the one-process reference takes all of them.
FSDP2_EXAMPLES = 4
# Strong enough that the regulariser's gradient is a large part of the step (checked by the test).
AG_CONFIG = dict(lambda_a=20.0, lambda_t=1.0, lambda_nc=1.0)


def fisher_inputs(n_batches: int):
    """The tiny model and the first `n_batches` alignment batches (same on every rank)."""
    model = make_tiny_model("llama", seed=0)
    batches = tiny_batches(n_repeat=3, batch_size=2)[:n_batches]
    return model, batches


def fisher_config(case: str) -> FisherConfig:
    # Empirical labels: sampled labels would be drawn per rank, a valid Fisher but not the one-process draw.
    return FisherConfig(fisher_labels="empirical", show_progress=False, **FISHER_CASES[case][0])


def factor_tensors(state) -> dict[str, torch.Tensor]:
    """Dense factors, or the sketch's rank-k approximation V diag(lambda) V^T (free of eigenvector signs); input
    factors (when estimated) under `input.<name>`."""
    out = {n: f.contiguous() for n, f in state.factors.items()}
    out.update({f"input.{n}": f.contiguous() for n, f in state.input_factors.items()})
    out.update({n: (vec * eig) @ vec.T for n, (eig, vec) in state.low_rank.items()})
    out.update({f"input.{n}": (vec * eig) @ vec.T for n, (eig, vec) in state.input_low_rank.items()})
    return out


def train_dataset(n_examples: int):
    """Equal-length examples, so no padding and the token count per example is the same everywhere."""
    tok = make_tiny_tokenizer()
    pairs = [(f"Classify item {i}: {'up' if i % 2 else 'dn'}.", f"label {i % 2}") for i in range(n_examples)]
    feats = [tokenize_example(tok, p, r) for p, r in pairs]
    assert len({len(f["input_ids"]) for f in feats}) == 1
    return feats, PaddingCollator(tok.pad_token_id)


def train_one_step(
    out_dir: str,
    per_device_batch: int,
    n_examples: int,
    ag_config: dict | None = None,
    loss_kwargs: bool = True,
    **training_args,
) -> dict:
    """One SGD step of AlignGuardTrainer from fixed non-zero LoRA weights; returns the LoRA weights after it.

    `training_args` override the `TrainingArguments` below (e.g. `deepspeed=` a ZeRO config dict).
    `loss_kwargs=False`: the Trainer treats the model as not accepting `num_items_in_batch`, so it averages each
    micro-batch and divides by the accumulation steps itself (the other of its two loss-scaling paths).
    """
    from transformers import TrainingArguments

    model = tiny_peft("llama", seed=0)
    randomize_lora_(model, std=0.2, seed=1)  # B != 0, so the regulariser has a gradient at the first step
    subs = random_subspaces_for(model, seed=0, dtype=torch.float32)
    data, collator = train_dataset(n_examples)
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=1,
        per_device_train_batch_size=per_device_batch,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: it would rescale the very gradient we compare
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **training_args,
    )
    trainer = AlignGuardTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collator,
        subspaces=subs,
        alignguard_config=AlignGuardConfig(**(AG_CONFIG if ag_config is None else ag_config)),
    )
    if not loss_kwargs:
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    with full_parameters(list(lora.values())):  # ZeRO-3 keeps only this rank's partition outside forward
        return {n: p.detach().clone().contiguous() for n, p in lora.items()}


def zero_config(stage: int) -> dict:
    """A DeepSpeed config for `TrainingArguments(deepspeed=...)`; with ZeRO-3 every parameter stays partitioned."""
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # else tiny LoRA weights are kept whole after step 1
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,  # torch SGD from TrainingArguments(optim="sgd")
    }


def main_zero(out_dir: str, stage: int | None) -> None:
    """Only the training step, under DeepSpeed ZeRO-`stage` (the Fisher pass does not involve DeepSpeed).

    `stage=None`: take the DeepSpeed settings from `accelerate launch --config_file configs/accelerate/...`.
    """
    info = rank_info()
    extra = {} if stage is None else {"deepspeed": zero_config(stage)}
    weights = train_one_step(str(Path(out_dir) / f"zero{stage}"), 2, 2 * info.world_size, **extra)
    if info.is_main:
        atomic_save_file(weights, Path(out_dir) / f"zero{stage or 'accelerate'}_lora.safetensors")
    torch.distributed.barrier()


def main_zero_ga(out_dir: str, stage: int) -> None:
    """Under DeepSpeed ZeRO-`stage`, the same global batch as 1 micro-batch of 2 and as 2 accumulated micro-batches
    of 1 per rank, with the loss normalised by `num_items_in_batch` (scaled) and by the Trainer's 1/GA (unscaled).
    Rank 0 writes `zero{stage}_ga{1,2}_{scaled,unscaled}_lora.safetensors`."""
    info = rank_info()
    n = 2 * info.world_size
    for loss_kwargs, kind in ((True, "scaled"), (False, "unscaled")):
        for ga in (1, 2):
            weights = train_one_step(
                str(Path(out_dir) / f"zero{stage}_ga{ga}_{kind}"),
                per_device_batch=2 // ga,
                n_examples=n,
                loss_kwargs=loss_kwargs,
                gradient_accumulation_steps=ga,
                deepspeed=zero_config(stage),
            )
            if info.is_main:
                atomic_save_file(weights, Path(out_dir) / f"zero{stage}_ga{ga}_{kind}_lora.safetensors")
    torch.distributed.barrier()


def fsdp2_sgd_step(ag_config: dict | None = None, reshard_after_forward: bool = True) -> dict:
    """One SGD step on task loss + AlignGuard terms; under torch.distributed the model is sharded with FSDP2
    (`fully_shard` on every decoder layer, then the root, as accelerate's TRANSFORMER_BASED_WRAP does) and each
    rank takes its own share of the examples. Returns the full LoRA weights after the step.

    The regulariser is built before sharding, as `AlignGuardTrainer` builds it before accelerate wraps the
    model; without a process group this is the one-process reference on all the examples at once.
    """
    from alignguard import AlignGuardRegularizer
    from alignguard.distributed import full_parameters, regularizer_parameters, whole_weight

    info = rank_info()
    model = tiny_peft("llama", seed=0)
    randomize_lora_(model, std=0.2, seed=1)
    regularizer = AlignGuardRegularizer(
        model, random_subspaces_for(model, seed=0, dtype=torch.float32), AlignGuardConfig(**(ag_config or AG_CONFIG))
    )
    data, collator = train_dataset(FSDP2_EXAMPLES)
    if info.world_size > 1:
        shard_fsdp2_(model, reshard_after_forward)
        per_rank = FSDP2_EXAMPLES // info.world_size
        data = data[per_rank * info.rank : per_rank * (info.rank + 1)]
    batch = collator(data)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    optimizer = torch.optim.SGD(list(lora.values()), lr=0.5)
    loss = model(**batch).loss  # equal-length examples: the mean over ranks of per-rank means is the global mean
    with full_parameters(regularizer_parameters(regularizer)):  # what the trainer does (a no-op here)
        loss = loss + regularizer()["total"]
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        return {n: whole_weight(p).detach().clone().contiguous() for n, p in lora.items()}


def fsdp2_fisher_inputs():
    """4 alignment batches, the last with no response tokens (it lands on rank 1 of 2, which must still run it)."""
    model, batches = fisher_inputs(4)
    batches[3] = {**batches[3], "labels": torch.full_like(batches[3]["labels"], -100)}
    return model, batches


def shard_fsdp2_(model, reshard_after_forward: bool = True) -> None:
    """FSDP2 on every decoder layer, then the root, as accelerate's TRANSFORMER_BASED_WRAP does it."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)


def main_fsdp2_fisher_and_errors(out: Path) -> None:
    """Fisher pass on an FSDP2-sharded model (2/2 batches, one of them empty), and the clear errors for an uneven
    split (3 batches) and for mode='project' on DTensor weights. Rank 0 writes the factors and the messages."""
    from alignguard.projection import attach_projection_hooks

    _, batches = fsdp2_fisher_inputs()
    model = tiny_peft("llama", seed=0)  # the PEFT model, as training would wrap it
    shard_fsdp2_(model)
    state = estimate_fisher(model, shard_batches(batches), fisher_config("dense"))
    outcomes = []
    try:
        estimate_fisher(model, shard_batches(batches[:3]), fisher_config("dense"))
        outcomes.append("uneven: no error")
    except ValueError as err:
        outcomes.append(f"uneven: ValueError: {err}")
    try:
        attach_projection_hooks(model, random_subspaces_for(model, seed=0, dtype=torch.float32))
        outcomes.append("project: no error")
    except NotImplementedError as err:
        outcomes.append(f"project: NotImplementedError: {err}")
    if rank_info().is_main:
        atomic_save_file(factor_tensors(state), out / "fisher_fsdp2.safetensors")
        counts = {n: torch.tensor([c]) for n, c in state.token_counts.items()}
        atomic_save_file(counts, out / "counts_fsdp2.safetensors")
        (out / "fsdp2_errors.txt").write_text("\n".join(outcomes) + "\n")


def main_fsdp(out_dir: str) -> None:
    """Wrap the tiny PEFT model in torch FSDP (use_orig_params=True, CPU) and ask for the AlignGuard terms after a
    forward: the LoRA weights are then flattened shards, which `full_parameters` must refuse. Writes the outcome."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from alignguard import AlignGuardRegularizer
    from alignguard.distributed import regularizer_parameters

    model = tiny_peft("llama", seed=0)
    randomize_lora_(model, std=0.2, seed=1)
    regularizer = AlignGuardRegularizer(model, random_subspaces_for(model, seed=0, dtype=torch.float32))
    params = regularizer_parameters(regularizer)
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    ids = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    try:
        with full_parameters(params):
            regularizer()
        outcome = "no error"
    except RuntimeError as err:
        outcome = f"RuntimeError: {err}"
    shapes = sorted({tuple(p.shape) for p in params})
    if rank_info().is_main:
        (Path(out_dir) / "fsdp_outcome.txt").write_text(f"{outcome}\nshapes outside forward: {shapes}\n")
    torch.distributed.barrier()


def main(out_dir: str) -> None:
    out = Path(out_dir)
    info = rank_info()
    for case, (_, n_batches) in FISHER_CASES.items():
        model, batches = fisher_inputs(n_batches)
        state = estimate_fisher(model, shard_batches(batches), fisher_config(case))
        if info.is_main:
            atomic_save_file(factor_tensors(state), out / f"fisher_{case}.safetensors")
            counts = {n: torch.tensor([c]) for n, c in state.token_counts.items()}
            atomic_save_file(counts, out / f"counts_{case}.safetensors")
    # Per-device batch 2 on each rank = one global batch of 2 * world examples = the whole dataset.
    weights = train_one_step(str(out / "trainer"), per_device_batch=2, n_examples=2 * info.world_size)
    # The same global batch as 2 micro-batches of 1 per rank (the regulariser is added on the syncing one).
    weights_ga = train_one_step(
        str(out / "trainer_ga"), per_device_batch=1, n_examples=2 * info.world_size, gradient_accumulation_steps=2
    )
    fsdp2 = {reshard: fsdp2_sgd_step(reshard_after_forward=reshard) for reshard in (True, False)}
    main_fsdp2_fisher_and_errors(out)
    if info.is_main:
        atomic_save_file(weights, out / "ddp_lora.safetensors")
        atomic_save_file(weights_ga, out / "ddp_ga2_lora.safetensors")
        for reshard, result in fsdp2.items():
            atomic_save_file(result, out / f"fsdp2_reshard{int(reshard)}_lora.safetensors")
    torch.distributed.barrier()


if __name__ == "__main__":
    from accelerate import PartialState

    # Initialises the gloo process group from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).
    PartialState(cpu=True)
    if rank_info().world_size < 2:
        raise SystemExit("dist_worker.py must be launched on >= 2 processes (torch.distributed.run)")
    if len(sys.argv) > 2 and sys.argv[2] == "--fsdp":
        main_fsdp(sys.argv[1])
    elif len(sys.argv) > 2 and sys.argv[2].startswith("--zero-ga="):
        main_zero_ga(sys.argv[1], int(sys.argv[2].split("=")[1]))
    elif len(sys.argv) > 2 and sys.argv[2].startswith("--zero="):
        value = sys.argv[2].split("=")[1]
        main_zero(sys.argv[1], None if value == "accelerate" else int(value))
    else:
        main(sys.argv[1])
