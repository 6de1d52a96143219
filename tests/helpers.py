"""Test helpers: tiny PEFT models, alignment batches and random subspaces."""

import torch
from peft import LoraConfig, get_peft_model

from alignguard.data import make_batches
from alignguard.subspace import AlignmentSubspaces, Subspace
from alignguard.tiny import make_tiny_model, make_tiny_tokenizer, tiny_target_modules

PAIRS = [
    ("How do I make a weapon at home?", "I can't help with that."),
    ("Tell me a joke about cats.", "Why did the cat sit on the computer? To keep an eye on the mouse."),
    ("Write malware that steals passwords.", "Sorry, I won't write malware."),
    ("What is the capital of France?", "The capital of France is Paris."),
]


def tiny_batches(tokenizer=None, n_repeat=1, batch_size=2):
    tokenizer = tokenizer or make_tiny_tokenizer()
    return make_batches(tokenizer, PAIRS * n_repeat, batch_size=batch_size, max_length=128)


def tiny_peft(family="llama", r=4, alpha=8, rslora=False, seed=0, targets=None):
    model = make_tiny_model(family, seed=seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets or tiny_target_modules(family),
        use_rslora=rslora,
        fan_in_fan_out=family == "gpt2",
        lora_dropout=0.0,
    )
    return get_peft_model(model, cfg)


def randomize_lora_(model, std=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def random_subspaces_for(
    model, m_of=lambda i: 2 + i % 4, task_rank=None, seed=0, dtype=torch.float64, input_rank_of=None
):
    """Random orthonormal bases (float64) with positive eigenvalues for every LoRA layer of `model`; with
    `input_rank_of(i)`, also random input factors (rank k, trace d_in, so a positive residual sigma)."""
    from alignguard.targets import layer_dims, lora_modules

    gen = torch.Generator().manual_seed(seed)
    out = AlignmentSubspaces()
    for i, (name, (layer, _)) in enumerate(sorted(lora_modules(model).items())):
        d_out, _ = layer_dims(layer.get_base_layer())
        m = min(m_of(i), d_out)
        q = torch.linalg.qr(torch.randn(d_out, m, generator=gen, dtype=torch.float64)).Q.to(dtype)
        eig = torch.sort(torch.rand(m, generator=gen, dtype=torch.float64) * 3 + 0.1, descending=True).values
        out.subspaces[name] = Subspace(q, eig.to(dtype), float(d_out))
        if task_rank:
            k = min(task_rank, d_out)
            v = torch.linalg.qr(torch.randn(d_out, k, generator=gen, dtype=torch.float64)).Q.to(dtype)
            mu = torch.rand(k, generator=gen, dtype=torch.float64).to(dtype) + 0.5
            out.task_factors[name] = Subspace(v, mu, float(d_out))
        if input_rank_of:
            d_in = layer_dims(layer.get_base_layer())[1]
            k = min(input_rank_of(i), d_in - 1)
            p = torch.linalg.qr(torch.randn(d_in, k, generator=gen, dtype=torch.float64)).Q.to(dtype)
            rho = torch.sort(torch.rand(k, generator=gen, dtype=torch.float64) * d_in / k, descending=True).values
            out.input_factors[name] = Subspace(p, rho.to(dtype), float(d_in))
    return out


def tiny_compare_argv(root, *methods, **flags):
    """`alignguard compare` argv for a seconds-long tiny-llama run into <root>/run on <root>/prompts.jsonl
    (flags override the defaults: `task="word_problems"`, `max_steps="2"`)."""
    values = {
        "model": "tiny-llama",
        "out": str(root / "run"),
        "task": "arithmetic",
        "n_train": "4",
        "max_steps": "1",
        "save_steps": "1",
        "batch_size": "2",
        "max_length": "48",
        "fisher_examples": "2",
        "task_eval_n": "1",
        "eval_max_new_tokens": "2",
        "eval_batch_size": "2",
        "task_fisher": "false",
        "extra_judges": "pattern_relevance",
        "prompts": str(root / "prompts.jsonl"),
        "lora_r": "2",
        **flags,
    }
    argv = ["compare", "--methods", *methods]
    for k, v in values.items():
        argv += [f"--{k}", v]
    return argv


def stage_lines(out: str) -> dict[str, str]:
    """`[stage] what` lines printed by a run, as {stage: what}."""
    lines = [line for line in out.splitlines() if line.startswith("[") and "] " in line]
    return {line[1 : line.index("]")]: line[line.index("]") + 2 :] for line in lines}


def tiny_training_args(output_dir, **overrides):
    """TrainingArguments for the trainer tests: CPU, a few constant-lr steps, logging every step, no saving."""
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **overrides})
