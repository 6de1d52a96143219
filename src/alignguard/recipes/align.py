"""The alignment stage (docs/design.md §7, docs/alignment.md): LoRA SFT, then DPO, merged into a normal HF model.

1. SFT: unsafe prompts are trained towards the dataset's refusals (varied styles, most explain why); safe prompts
   (many ordinary topics and benign look-alikes, so the model does not learn "refuse anything that sounds edgy")
   towards the base model's *own* answers (self-distillation, generated once and cached), so helpfulness is kept
   rather than replaced by our text.
2. DPO (`preference.py`, `dpo_steps` > 0): a fresh LoRA on the merged SFT model; unsafe prompts prefer the
   refusal over the base model's own compliant completion, safe ones the helpful answer over a refusal.
3. Report (`eval_prompts`): DriftCheck on base and aligned model -> `align_report.json` and a table.

The output folder is a plain `save_pretrained` model plus `align_info.json` recording the base model (what Safe
LoRA needs as its (base, aligned) pair) and both stages' logs.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..driftcheck.prompts import LOOKALIKE_CATEGORY
from ..io import atomic_write_json
from .align_config import (  # noqa: F401  (re-exported: the config has always been importable from here)
    ALL_PROJECTIONS,
    DPO_PAIRS,
    DPO_POOLS,
    EVAL_SPLITS,
    AlignRunConfig,
    alignment_file,
    alignment_v2_path,
    default_eval_prompts,
)
from .common import add_lora, checkpointed_training_args, latest_checkpoint, restore_final_checkpoint


def sample_alignment_examples(examples: list, cfg: AlignRunConfig, rng: random.Random) -> list:
    """`cfg.max_examples` of `examples` (all when None), `cfg.safe_fraction` of them safe where there are enough,
    and `cfg.lookalike_fraction` of the safe ones benign look-alikes (when set)."""
    if cfg.max_examples is None or len(examples) <= cfg.max_examples:
        return list(examples)
    unsafe = [e for e in examples if e.label == "unsafe"]
    safe = [e for e in examples if e.label == "safe"]
    n_safe = min(round(cfg.max_examples * cfg.safe_fraction), len(safe))
    n_unsafe = min(cfg.max_examples - n_safe, len(unsafe))
    n_safe = min(cfg.max_examples - n_unsafe, len(safe))  # fill from the safe side when unsafe ones run out
    if cfg.lookalike_fraction is None:
        return rng.sample(unsafe, n_unsafe) + rng.sample(safe, n_safe)
    looks = [e for e in safe if e.category == LOOKALIKE_CATEGORY]
    other = [e for e in safe if e.category != LOOKALIKE_CATEGORY]
    n_look = min(round(n_safe * cfg.lookalike_fraction), len(looks))
    n_other = min(n_safe - n_look, len(other))
    n_look = min(n_safe - n_other, len(looks))
    return rng.sample(unsafe, n_unsafe) + rng.sample(looks, n_look) + rng.sample(other, n_other)


def generation_cache_dir(cfg: AlignRunConfig) -> Path:
    return Path(cfg.generation_cache) if cfg.generation_cache else Path(cfg.out) / "generation_cache"


def dpo_sample(examples: list, cfg: AlignRunConfig, first: frozenset[str] = frozenset()) -> list:
    """The examples the DPO stage turns into pairs: a seeded sample of `examples`, `dpo_safe_fraction` of them safe,
    `dpo_examples` of them (unset: enough for `dpo_steps` batches); none when `dpo_steps` is 0. Prompts in `first`
    (the SFT model's mistakes, `dpo_pairs: own_mistakes`) are taken before the others of their label."""
    if cfg.dpo_steps == 0:
        return []
    n = cfg.dpo_examples if cfg.dpo_examples is not None else cfg.dpo_steps * cfg.dpo_batch_size
    n = min(n, len(examples))
    unsafe = [e for e in examples if e.label == "unsafe"]
    safe = [e for e in examples if e.label != "unsafe"]
    rng = random.Random(cfg.seed + 1)
    n_safe = min(round(n * cfg.dpo_safe_fraction), len(safe))
    n_unsafe = min(n - n_safe, len(unsafe))
    n_safe = min(n - n_unsafe, len(safe))  # fill from the safe side when unsafe ones run out

    def pick(group: list, k: int) -> list:
        top = [e for e in group if e.prompt in first]
        if not top:  # the plain seeded sample (what `dpo_pairs: base` has always drawn)
            return rng.sample(group, k)
        if len(top) >= k:
            return rng.sample(top, k)
        rest = [e for e in group if e.prompt not in first]
        return rng.sample(top, len(top)) + rng.sample(rest, k - len(top))

    return pick(unsafe, n_unsafe) + pick(safe, n_safe)


def dpo_pool(cfg: AlignRunConfig, sft: list) -> list:
    """The examples the DPO sample is drawn from (`dpo_pool`): the SFT sample, or every alignment example."""
    if cfg.dpo_pool == "sft":
        return sft
    from ..data import load_alignment_data

    return load_alignment_data(alignment_file(cfg.alignment_data))


def alignment_examples(cfg: AlignRunConfig) -> tuple[list, list]:
    """(SFT examples, examples whose base-model answers DPO may need), both seeded. With `dpo_pairs: base` the
    second list is the DPO sample itself; with `own_mistakes` it is the whole pool, since which prompts the
    sample takes is known only once the SFT model has answered them."""
    from ..data import load_alignment_data

    data = load_alignment_data(alignment_file(cfg.alignment_data))
    examples = sample_alignment_examples(data, cfg, random.Random(cfg.seed))
    if cfg.dpo_steps > 0 and cfg.dpo_pairs == "own_mistakes":
        return examples, dpo_pool(cfg, examples)
    return examples, dpo_sample(dpo_pool(cfg, examples), cfg)


def base_generations(model, tokenizer, cfg: AlignRunConfig, sft: list, dpo: list, progress: bool = True):
    """The base model's answers that both stages need, cached: self-distilled answers to safe prompts without a
    shipped response (SFT targets and DPO's chosen side; written under `helpful_system_prompt` when set), and its
    own completions of the unsafe prompts DPO rejects (always the plain prompt: what the model does unprompted)."""
    from ..driftcheck.generate import GenerationSettings, generate_responses

    helpful = (cfg.helpful_max_new_tokens or cfg.max_new_tokens, cfg.helpful_system_prompt)
    rejected = (cfg.max_new_tokens, None)
    need = [(e.prompt, helpful) for e in sft if e.label != "unsafe" and e.response is None]
    need += [(e.prompt, rejected) for e in dpo if e.label == "unsafe"]
    need += [(e.prompt, helpful) for e in dpo if e.label != "unsafe" and e.response is None]
    groups: dict[tuple, list[str]] = {}  # one pass per setting, in this order: the default is one pass, as it was
    for prompt, setting in need:
        groups.setdefault(setting, []).append(prompt)
    answers = {}
    for (max_new_tokens, system_prompt), prompts in groups.items():
        prompts = list(dict.fromkeys(prompts))
        if not prompts:
            continue
        settings = GenerationSettings(max_new_tokens=max_new_tokens, system_prompt=system_prompt)
        outs = generate_responses(
            model, tokenizer, prompts, settings, cache_dir=str(generation_cache_dir(cfg)), progress=progress
        )
        answers.update(zip(prompts, outs))
    return answers


def sft_pairs(examples: list, answers: dict[str, str], seed: int) -> list[tuple[str, str]]:
    """(prompt, response) pairs: refusals for unsafe prompts, the model's own answers for safe ones."""
    from ..driftcheck.judge import is_refusal

    pairs = []
    for e in examples:
        response = e.response if e.response is not None else answers.get(e.prompt, "")
        if not response.strip():  # an empty self-distilled answer teaches nothing
            continue
        if e.label != "unsafe" and is_refusal(response):  # a base refusal of a safe prompt teaches over-refusal
            continue
        pairs.append((e.prompt, response))
    random.Random(seed).shuffle(pairs)
    return pairs


def alignment_sft_pairs(model, tokenizer, cfg: AlignRunConfig, progress: bool = True) -> list[tuple[str, str]]:
    """The SFT pairs of `cfg` (generating what is not cached)."""
    sft, _ = alignment_examples(cfg)
    return sft_pairs(sft, base_generations(model, tokenizer, cfg, sft, [], progress), cfg.seed)


def alignment_data_digest(cfg: AlignRunConfig) -> str:
    """sha256 of the alignment data file `cfg` reads: a changed file (a new release's data) means new weights."""
    import hashlib

    path = alignment_file(cfg.alignment_data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


# AlignRunConfig fields that never change the aligned weights: where generations are cached and how the report is
# made. Left out of every "aligned with the same settings" check and of the demo's cache key.
NOT_WEIGHT_FIELDS = (
    "generation_cache",
    "eval_prompts",
    "eval_max_new_tokens",
    "eval_batch_size",
    "eval_task",
    "eval_task_n",
)


def _model_settings(cfg: AlignRunConfig) -> dict:
    """The settings that determine the aligned weights (not where things go or how the report is made)."""
    from .common import plain_settings

    return {k: v for k, v in plain_settings({"c": cfg})["c"].items() if k not in NOT_WEIGHT_FIELDS}


def aligned_with_settings(out: str | os.PathLike, cfg: AlignRunConfig) -> bool:
    """Whether `out` holds a merged model aligned with `cfg`'s settings and the same alignment data file, by any
    command (align or the demo's cache; align_info.json records them)."""
    from .common import plain_settings

    out = Path(out)
    info = out / "align_info.json"
    if not (info.is_file() and (out / "config.json").is_file()):
        return False
    record = json.loads(info.read_text())
    if record.get("alignment_data_sha256") != alignment_data_digest(cfg):
        return False  # other data (or a record from before the digest was kept): align again
    recorded = plain_settings({"c": record.get("config", {})})["c"]
    # Fields added after a model was aligned count as their default when the record predates them.
    defaults = _model_settings(AlignRunConfig(model=cfg.model, eval_prompts="none"))
    recorded = {k: recorded.get(k, v) for k, v in defaults.items()}
    return recorded == _model_settings(cfg)


def sft_stage(model, tokenizer, pairs, cfg: AlignRunConfig, out: Path, progress: bool):
    """LoRA SFT on `pairs`, resumable from out/checkpoints; returns (merged model, log_history)."""
    from transformers import Trainer

    from ..data import PaddingCollator, pad_token_id, tokenize_example

    features = [tokenize_example(tokenizer, p, r, cfg.max_length, index=i) for i, (p, r) in enumerate(pairs)]
    peft_model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.target_modules)
    args = checkpointed_training_args(
        out / "checkpoints",
        cfg.max_steps,
        cfg.batch_size,
        cfg.learning_rate,
        cfg.seed,
        max(1, cfg.max_steps // 2),
        progress,
        lr_scheduler_type="cosine",
        warmup_steps=min(5, cfg.max_steps // 10),
    )
    trainer = Trainer(
        model=peft_model, args=args, train_dataset=features, data_collator=PaddingCollator(pad_token_id(tokenizer))
    )
    last = latest_checkpoint(out / "checkpoints")
    if last is not None and json.loads((last / "trainer_state.json").read_text())["global_step"] >= cfg.max_steps:
        restore_final_checkpoint(trainer, peft_model, last)  # killed after the last checkpoint, before the merge
    else:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    return peft_model.merge_and_unload(), trainer.state.log_history


def preference_stage(sft_model, tokenizer, cfg: AlignRunConfig, dpo: list, answers: dict, out: Path, progress: bool):
    """The DPO stage on the merged SFT model; returns (merged model, info for align_info.json).

    `dpo` is `alignment_examples(cfg)[1]` and `answers` holds the base model's answers to it. With
    `dpo_pairs: own_mistakes` the SFT model first answers the whole pool (cached like every generation); its
    mistakes fill the sample first and are the rejected side of their pairs.
    """
    from ..driftcheck.generate import GenerationSettings, generate_responses
    from .preference import build_preference_pairs, own_mistakes, run_dpo

    own = {}
    if cfg.dpo_pairs == "own_mistakes":
        prompts = [e.prompt for e in dpo]
        settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens)
        outs = generate_responses(
            sft_model, tokenizer, prompts, settings, cache_dir=str(generation_cache_dir(cfg)), progress=progress
        )
        own = own_mistakes(dpo, dict(zip(prompts, outs)))
        dpo = dpo_sample(dpo, cfg, first=frozenset(own))
        own = {e.prompt: own[e.prompt] for e in dpo if e.prompt in own}
    prefs, skipped = build_preference_pairs(dpo, answers, answers, cfg.seed, own=own)
    merged, log = run_dpo(sft_model, tokenizer, prefs, cfg, out, progress)
    info = {
        "n_pairs": len(prefs),
        "n_unsafe_pairs": sum(p.label == "unsafe" for p in prefs),
        "n_skipped": skipped,
        "log_history": log,
    }
    if cfg.dpo_pairs == "own_mistakes":  # how many pairs reject the SFT model's own wrong answer, per label
        mined = [p.label == "unsafe" for p in prefs if p.prompt in own]
        info["n_own_rejected"] = {"unsafe": sum(mined), "safe": len(mined) - sum(mined)}
    return merged, info


def run_align(cfg: AlignRunConfig, model=None, tokenizer=None, progress: bool = True) -> Path:
    """Align `cfg.model` with LoRA SFT (+ DPO when `dpo_steps` > 0), merge, save to `cfg.out`, report; returns
    the folder.

    Upon completion `cfg.out` holds config.json, model.safetensors, the tokenizer, align_info.json and (unless
    `eval_prompts` is none) align_report.json.
    """
    out = Path(cfg.out)
    if aligned_with_settings(out, cfg):
        print(f"[align] {out}: aligned earlier with the same settings; skipped (align_info.json kept)")
    else:
        if model is None:
            from ..models import load_model_and_tokenizer

            model, tokenizer, _ = load_model_and_tokenizer(cfg.model)
        sft, dpo = alignment_examples(cfg)
        answers = base_generations(model, tokenizer, cfg, sft, dpo, progress)
        pairs = sft_pairs(sft, answers, cfg.seed)
        merged, sft_log = sft_stage(model, tokenizer, pairs, cfg, out, progress)
        dpo_info = None
        if cfg.dpo_steps > 0:
            merged, dpo_info = preference_stage(
                merged, tokenizer, cfg, dpo, answers, out / "dpo_checkpoints", progress
            )
        tmp = out.with_name(out.name + ".tmp-merge")
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(
            tmp / "align_info.json",
            {
                "base_model": cfg.model,
                "alignment_data_sha256": alignment_data_digest(cfg),
                "n_examples": len(pairs),
                "config": vars(cfg),
                "log_history": sft_log,
                "dpo": dpo_info,
            },
        )
        # Move the finished model files into place; checkpoints and the generation cache stay where they are.
        out.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            item.replace(out / item.name)
        tmp.rmdir()
    if str(cfg.eval_prompts).lower() != "none":
        from .align_report import write_align_report

        write_align_report(cfg, out, progress=progress)
    return out
