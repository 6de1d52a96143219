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
from dataclasses import dataclass, field
from pathlib import Path

from ..config_values import require_at_least, require_positive
from ..driftcheck.prompts import LOOKALIKE_CATEGORY
from ..io import atomic_write_json
from ..tasks import TASKS
from .common import add_lora, checkpointed_training_args, latest_checkpoint, restore_final_checkpoint

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def alignment_v2_path() -> Path:
    """The alignment stage's default data: alignment_v1 plus the benign prompts of v2 (scripts/build_alignment_data.py).
    Other stages (Fisher, compare) keep reading alignment_v1.jsonl through `data.alignment_data_path()`."""
    from ..data import alignment_data_path

    return alignment_data_path().with_name("alignment_v2.jsonl")


EVAL_SPLITS = ("standard", "small", "full", "demo")
DPO_PAIRS = ("base", "own_mistakes")
DPO_POOLS = ("sft", "all")


def default_eval_prompts() -> str:
    """The bundled "standard" DriftCheck split where this install has it, else "small"."""
    from ..driftcheck.prompts import bundled_prompts_path

    try:
        return "standard" if bundled_prompts_path("standard").is_file() else "small"
    except ValueError:  # an older prompts module without the split
        return "small"


@dataclass
class AlignRunConfig:
    """Options of `alignguard align`.

    Args:
        model: base model (folder, .gguf, registry or tiny name).
        out: folder for the merged aligned model.
        alignment_data: alignment JSONL (default: the bundled v2 set, disjoint from DriftCheck).
        max_examples: examples used (a seeded sample with `safe_fraction` safe ones); None = all.
        safe_fraction: share of safe prompts in the `max_examples` sample. More benign than unsafe data limits
            over-refusal (Bianchi et al., ICLR 2024, "Safety-Tuned LLaMAs"); 0.5 is a balanced mix.
        lookalike_fraction: share of benign look-alikes among the sampled safe prompts; None = as they come.
        max_steps / batch_size / learning_rate / lora_r / lora_alpha / target_modules / max_length: the SFT.
        max_new_tokens: length of the self-distilled answers (and of the base completions DPO rejects).
        helpful_system_prompt / helpful_max_new_tokens: a system turn, and a length, used only while the base model
            writes its helpful answers (context distillation); SFT and DPO see the prompt without it.
        generation_cache: folder of those generations (default <out>/generation_cache); runs that share it
            generate each answer once.
        dpo_steps / dpo_batch_size / dpo_learning_rate / dpo_beta / dpo_lora_r / dpo_examples / dpo_safe_fraction /
            dpo_pairs / dpo_pool / dpo_sft_weight: the DPO stage.
        eval_prompts / eval_max_new_tokens / eval_batch_size / eval_task / eval_task_n: the base-vs-aligned report.
        seed: seed of sampling and training.
    """

    model: str = field(default="smollm2-135m-instruct", metadata={"help": "Base model to align."})
    out: str = field(default="runs/aligned", metadata={"help": "Output folder of the merged aligned model."})
    alignment_data: str | None = field(
        default=None, metadata={"help": "Alignment JSONL (default: the bundled alignment_v2.jsonl)."}
    )
    max_examples: int | None = field(default=None, metadata={"help": "Use at most this many examples."})
    safe_fraction: float = field(default=0.5, metadata={"help": "Share of safe prompts in the sample (0..1)."})
    lookalike_fraction: float | None = field(
        default=None,
        metadata={"help": "Share of benign look-alikes among the sampled safe prompts (0..1); unset: as sampled."},
    )
    max_steps: int = field(default=40, metadata={"help": "SFT optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "SFT batch size."})
    learning_rate: float = field(default=4e-4, metadata={"help": "SFT learning rate."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the alignment adapter."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha of the alignment adapter."})
    target_modules: list[str] = field(
        default_factory=lambda: list(ALL_PROJECTIONS), metadata={"help": "LoRA targets of the alignment adapter."}
    )
    max_length: int = field(default=256, metadata={"help": "Token limit of prompt + response."})
    max_new_tokens: int = field(
        default=48, metadata={"help": "Length of self-distilled answers and of the base completions DPO rejects."}
    )
    helpful_system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "System turn placed before safe prompts only while the base model writes its helpful answers "
            "(context distillation, Askell et al. 2021); SFT and DPO train those answers on the prompt alone. A "
            "small model's own answers run long and ignore format instructions ('answer in one sentence'); SFT on "
            "them teaches that style to every prompt. Unset: answers as the plain prompt gets them."
        },
    )
    helpful_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Length of the self-distilled helpful answers; unset: max_new_tokens."}
    )
    generation_cache: str | None = field(
        default=None, metadata={"help": "Folder of the generation cache (default: <out>/generation_cache)."}
    )
    dpo_steps: int = field(default=20, metadata={"help": "DPO optimizer steps after the SFT (0 = no DPO stage)."})
    dpo_batch_size: int = field(default=4, metadata={"help": "DPO batch size (preference pairs per step)."})
    dpo_learning_rate: float = field(default=5e-4, metadata={"help": "DPO learning rate (fresh LoRA)."})
    dpo_beta: float = field(
        default=0.1, metadata={"help": "DPO beta: how far the policy may move from the SFT model."}
    )
    dpo_lora_r: int = field(default=16, metadata={"help": "LoRA rank of the DPO adapter (alpha = 2r)."})
    dpo_safe_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Share of safe pairs in the DPO sample (0..1). Chosen refusals of unsafe pairs and rejected "
            "refusals of safe pairs are the same kind of text; with more safe than unsafe pairs DPO learns "
            "'refusing is bad' regardless of the prompt, so keep it balanced."
        },
    )
    dpo_examples: int | None = field(
        default=None,
        metadata={
            "help": "Preference pairs drawn from the SFT sample (same safe share); unset: as many as steps use."
        },
    )
    dpo_pairs: str = field(
        default="base",
        metadata={
            "help": "Where DPO's rejected answers come from. base: an unsafe prompt rejects the base model's own "
            "completion, a safe one a template refusal. own_mistakes: the SFT model first answers every prompt of "
            "the DPO pool; the prompts it gets wrong (it complies with an unsafe one or refuses a safe one, by the "
            "pattern judge) fill the sample first and its own wrong answer is the rejected side (on-policy "
            "negatives); the rest of the sample falls back to base."
        },
    )
    dpo_pool: str = field(
        default="sft",
        metadata={
            "help": "Prompts the DPO sample is drawn from. sft: the SFT sample. all: every alignment example, so "
            "prompts the SFT never trained on can show the mistakes it still makes (use with own_mistakes)."
        },
    )
    dpo_sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an NLL term on the chosen answers added to the DPO loss (RPO; TRL loss_type "
            "['sigmoid', 'sft']). DPO alone may lower the chosen answers' likelihood along with the rejected ones "
            "(likelihood displacement) and move the freed mass to refusals; the NLL term holds the chosen answers "
            "up. 0: plain DPO."
        },
    )
    eval_prompts: str = field(
        default_factory=default_eval_prompts,
        metadata={
            "help": "DriftCheck prompts of the base-vs-aligned report: a bundled split (standard, small, full, "
            "demo), a JSONL/CSV file, or none (no report)."
        },
    )
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per report prompt."})
    eval_batch_size: int = field(default=16, metadata={"help": "Prompts per generation batch of the report."})
    eval_task: str = field(
        default="word_problems_easy",
        metadata={
            "help": "Task whose test problems the report also scores on both models (accuracy and how many "
            "answers are refusals: an aligned model that refuses ordinary work has lost ability DriftCheck's safe "
            "prompts may not show), or none."
        },
    )
    eval_task_n: int = field(default=200, metadata={"help": "Test problems of eval_task in the report."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    overwrite: bool = field(
        default=False, metadata={"help": "Delete what --out holds (another run or other settings) and start afresh."}
    )

    def __post_init__(self):
        require_at_least(
            self,
            ("max_steps", "batch_size", "lora_r", "max_length", "max_new_tokens", "dpo_batch_size", "dpo_lora_r"),
        )
        require_at_least(self, ("eval_max_new_tokens", "eval_batch_size", "eval_task_n"))
        if self.eval_task != "none" and self.eval_task not in TASKS:
            raise ValueError(f"eval_task: must be one of {', '.join(TASKS)} or none, got {self.eval_task!r}")
        if not 0.0 <= self.safe_fraction <= 1.0:
            raise ValueError(f"safe_fraction: must be in [0, 1], got {self.safe_fraction}")
        if self.lookalike_fraction is not None and not 0.0 <= self.lookalike_fraction <= 1.0:
            raise ValueError(f"lookalike_fraction: must be in [0, 1] or unset, got {self.lookalike_fraction}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples: must be >= 1 or None, got {self.max_examples}")
        if not 0.0 <= self.dpo_safe_fraction <= 1.0:
            raise ValueError(f"dpo_safe_fraction: must be in [0, 1], got {self.dpo_safe_fraction}")
        if self.dpo_examples is not None and self.dpo_examples < 1:
            raise ValueError(f"dpo_examples: must be >= 1 or unset, got {self.dpo_examples}")
        if self.dpo_steps < 0:
            raise ValueError(f"dpo_steps: must be >= 0 (0 = no DPO stage), got {self.dpo_steps}")
        if self.dpo_pairs not in DPO_PAIRS:
            raise ValueError(f"dpo_pairs: must be one of {', '.join(DPO_PAIRS)}, got {self.dpo_pairs!r}")
        if self.dpo_pool not in DPO_POOLS:
            raise ValueError(f"dpo_pool: must be one of {', '.join(DPO_POOLS)}, got {self.dpo_pool!r}")
        require_positive(self, ("learning_rate", "lora_alpha", "dpo_learning_rate", "dpo_beta"))
        if self.dpo_sft_weight < 0:
            raise ValueError(f"dpo_sft_weight: must be >= 0 (0 = plain DPO), got {self.dpo_sft_weight}")
        if self.helpful_max_new_tokens is not None and self.helpful_max_new_tokens < 1:
            raise ValueError(f"helpful_max_new_tokens: must be >= 1 or unset, got {self.helpful_max_new_tokens}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        if not self.target_modules:
            raise ValueError("target_modules: give at least one module name (e.g. q_proj v_proj)")
        name = str(self.eval_prompts)
        if name.lower() != "none" and name not in EVAL_SPLITS and not Path(name).is_file():
            raise ValueError(
                f"eval_prompts: {name!r} is neither a bundled split ({', '.join(EVAL_SPLITS)}), an existing "
                "JSONL/CSV file, nor 'none'"
            )


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

    return load_alignment_data(cfg.alignment_data if cfg.alignment_data is not None else alignment_v2_path())


def alignment_examples(cfg: AlignRunConfig) -> tuple[list, list]:
    """(SFT examples, examples whose base-model answers DPO may need), both seeded. With `dpo_pairs: base` the
    second list is the DPO sample itself; with `own_mistakes` it is the whole pool, since which prompts the
    sample takes is known only once the SFT model has answered them."""
    from ..data import load_alignment_data

    path = cfg.alignment_data if cfg.alignment_data is not None else alignment_v2_path()
    examples = sample_alignment_examples(load_alignment_data(path), cfg, random.Random(cfg.seed))
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

    path = Path(cfg.alignment_data) if cfg.alignment_data is not None else alignment_v2_path()
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
