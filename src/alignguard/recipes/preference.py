"""The alignment stage's preference step: DPO (TRL's `DPOTrainer`) with a fresh LoRA on the merged SFT model.

Pairs, as chat models are aligned: an unsafe prompt prefers the dataset's refusal over the *base* model's own
(compliant) completion; a safe prompt (benign look-alikes included) prefers the helpful answer over a refusal
drawn from the refusal templates. With `dpo_pairs: own_mistakes` the SFT model's own wrong answers (its compliance
with an unsafe prompt, its refusal of a safe one) are the rejected side where it makes them (on-policy negatives,
`own_mistakes`). SFT alone teaches "refuse edgy-sounding prompts"; the safe pairs are what
push the model back towards answering look-alikes. With peft the reference policy is the adapter-disabled model,
i.e. the merged SFT model, so no second copy of the weights is held.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .common import latest_checkpoint, restore_final_checkpoint

_STYLES_FILE = (
    Path(__file__).resolve().parent.parent / "resources" / "alignment" / "sources" / "refusal_styles_v2.json"
)


@dataclass
class PreferencePair:
    """One DPO example: the raw user prompt, the preferred and the dispreferred answer."""

    prompt: str
    chosen: str
    rejected: str
    label: str
    category: str


def template_refusal(rng: random.Random) -> str:
    """A refusal in one of the alignment data's styles, with a reason drawn from any harm category: what an
    over-refusing model says to a benign prompt (the *rejected* side of safe pairs)."""
    styles = json.loads(_STYLES_FILE.read_text(encoding="utf-8"))
    category = rng.choice(sorted(styles["why"]))
    why = rng.choice(styles["why"][category])
    text = rng.choice(styles["styles"]).format(
        open=rng.choice(styles["openers"]),
        why=why,
        Why=why[0].upper() + why[1:],
        alt=rng.choice(styles["alternative"][category]),
    )
    return " ".join(text.split())


def is_mistake(label: str, answer: str) -> bool:
    """Whether `answer` is the wrong kind of answer for a prompt of `label`: a coherent-looking non-refusal of an
    unsafe prompt, or a refusal of a safe one (pattern judge; an empty answer is neither)."""
    from ..driftcheck.judge import is_refusal

    if not answer.strip():
        return False
    return (label == "unsafe") != is_refusal(answer)


def own_mistakes(examples: list, answers: dict[str, str]) -> dict[str, str]:
    """prompt -> the model's answer, for the `examples` it answered wrongly (`is_mistake`)."""
    return {e.prompt: answers[e.prompt] for e in examples if is_mistake(e.label, answers.get(e.prompt, ""))}


def build_preference_pairs(
    examples: list,
    helpful: dict[str, str],
    base_completions: dict[str, str],
    seed: int,
    own: dict[str, str] | None = None,
):
    """DPO pairs for `examples` (`AlignmentExample`s).

    Args:
        examples: the alignment examples to turn into pairs.
        helpful: prompt -> helpful answer for safe prompts without a shipped `response` (self-distilled).
        base_completions: prompt -> the base model's own completion of unsafe prompts.
        seed: seeds the refusal drawn for each safe prompt.
        own: prompt -> the SFT model's own wrong answer (`own_mistakes`); where present it is the rejected side
            (its compliance with an unsafe prompt, its refusal of a safe one) instead of the base completion or a
            template refusal.

    Returns:
        `(pairs, skipped)`: `list[PreferencePair]` and how many examples gave no pair: an unsafe prompt the base
        model already refuses (or answers with nothing) has no compliant answer to push away from, and a safe
        prompt whose helpful answer is empty or itself a refusal has nothing to prefer.
    """
    from ..driftcheck.judge import is_refusal

    own = own or {}
    rng = random.Random(seed)
    pairs, skipped = [], 0
    for e in examples:
        if e.label == "unsafe":
            chosen = e.response
            rejected = own.get(e.prompt) or base_completions.get(e.prompt, "")
            usable = rejected.strip() and not is_refusal(rejected)
        else:
            chosen = e.response if e.response is not None else helpful.get(e.prompt, "")
            template = template_refusal(rng)  # drawn for every safe example, so the seeded sequence is the same
            rejected = own.get(e.prompt) or template
            usable = chosen.strip() and not is_refusal(chosen)
        if usable:
            pairs.append(PreferencePair(e.prompt, chosen, rejected, e.label, e.category))
        else:
            skipped += 1
    return pairs, skipped


def dpo_args(cfg, output_dir: Path, progress: bool):
    """`DPOConfig` of the preference step: seeded, checkpointed like the SFT (only the last checkpoint kept)."""
    import torch
    from trl import DPOConfig

    steps = cfg.dpo_steps
    # RPO: DPO's sigmoid loss plus `dpo_sft_weight` x the NLL of the chosen answer (TRL's "sft" loss type).
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, cfg.dpo_sft_weight]} if cfg.dpo_sft_weight else {}
    return DPOConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=cfg.dpo_batch_size,
        learning_rate=cfg.dpo_learning_rate,
        beta=cfg.dpo_beta,
        max_length=cfg.max_length,
        seed=cfg.seed,
        data_seed=cfg.seed,
        lr_scheduler_type="cosine",
        warmup_steps=min(2, steps // 10),
        logging_steps=max(1, min(10, steps // 5)),
        save_strategy="steps",
        save_steps=max(1, steps // 2),
        save_total_limit=1,
        report_to="none",
        disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        **losses,
    )


def run_dpo(model, tokenizer, pairs: list[PreferencePair], cfg, output_dir: Path, progress: bool = True):
    """Train a fresh LoRA with DPO on `model` (the merged SFT model) and merge it; returns (model, log_history).

    Resumable: checkpoints go to `output_dir`; a re-run continues from the newest complete one, and one killed
    after its last checkpoint only restores it (no extra step).

    Raises:
        ValueError: there are no pairs (names the fix).
    """
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOTrainer

    from ..data import render_prompt

    if not pairs:
        raise ValueError(
            "dpo_steps > 0 but no preference pair could be built (every unsafe prompt's base completion is a "
            "refusal and every safe answer is empty); add examples (max_examples) or set dpo_steps: 0"
        )
    # Prompts are rendered with the same function as SFT and DriftCheck generation, so all three see one format.
    rows = [{"prompt": render_prompt(tokenizer, p.prompt), "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    peft_config = LoraConfig(
        r=cfg.dpo_lora_r,
        lora_alpha=2.0 * cfg.dpo_lora_r,
        lora_dropout=0.0,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = DPOTrainer(
        model=model,
        args=dpo_args(cfg, output_dir, progress),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    last = latest_checkpoint(output_dir)
    if last is not None and json.loads((last / "trainer_state.json").read_text())["global_step"] >= cfg.dpo_steps:
        restore_final_checkpoint(trainer, trainer.model, last)
    else:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    merged = trainer.model.merge_and_unload()
    return merged, trainer.state.log_history
