"""`AlignRunConfig`: the options of `alignguard align` (the recipe is `recipes/align.py`), with the bundled data path and
the choices its fields accept."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config_values import require_at_least, require_positive
from ..tasks import TASKS

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def alignment_v2_path() -> Path:
    """The alignment stage's default data: alignment_v1 plus the benign prompts of v2 (scripts/build_alignment_data.py).
    Other stages (Fisher, compare) keep reading alignment_v1.jsonl through `data.alignment_data_path()`."""
    from ..data import alignment_data_path

    return alignment_data_path().with_name("alignment_v2.jsonl")


# Bundled alignment sets `alignment_data` may name instead of a path (scripts/build_alignment_data.py builds both).
BUNDLED_ALIGNMENT = ("v2", "v3")


def alignment_file(value: str | None) -> Path:
    """The JSONL an `alignment_data` value names: unset = the default (v2), "v2"/"v3" = a bundled set, else a path.
    v3 is v2 plus varied unsafe prompts in the four weakest categories and look-alikes on their themes (session 15)."""
    if value is None or value == "v2":
        return alignment_v2_path()
    if value in BUNDLED_ALIGNMENT:
        return alignment_v2_path().with_name(f"alignment_{value}.jsonl")
    path = Path(value)
    if not path.is_file():
        raise ValueError(
            f"alignment_data: {value!r} is neither a bundled set ({', '.join(BUNDLED_ALIGNMENT)}) nor a file; "
            "give one of those names or the path of an alignment JSONL"
        )
    return path


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
        alignment_data: alignment JSONL or a bundled set, v2 (default) or v3; all disjoint from DriftCheck.
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
        default=None,
        metadata={"help": "Alignment JSONL, or a bundled set: v2 (the default) or v3 (v2 + varied unsafe prompts)."},
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
