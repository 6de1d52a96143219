"""Recipe of `alignguard eval`: DriftCheck on one model (optionally with a PEFT adapter and a baseline result)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# The judge names `alignguard.driftcheck.judge.get_judge` accepts (besides a classifier folder).
JUDGE_NAMES = ("pattern", "pattern_relevance", "embedding", "learned")


def check_judge(name: str, field_name: str) -> None:
    """Refuse a judge `get_judge` would not resolve (checked before any model is loaded)."""
    if name not in JUDGE_NAMES and not Path(name).is_dir():
        raise ValueError(
            f"{field_name}: unknown judge {name!r}; use one of {list(JUDGE_NAMES)} or the folder of a local Hugging "
            "Face sequence-classification model"
        )


@dataclass
class EvalConfig:
    """Options of `alignguard eval` (DriftCheck).

    Args:
        model (`str`): Local Hugging Face model folder, `.gguf` file or a name listed by `alignguard models`.
        adapter (`str`, *optional*): PEFT adapter folder loaded on top of `model`.
        prompts (`str`, *optional*): JSONL/CSV prompt file or a bundled split name (`standard`, `demo`, ...); the
            bundled small split when omitted.
        prompt_field (`str`, defaults to `"prompt"`): Column/key holding the prompt text.
        label (`Literal["safe", "unsafe"]`, *optional*): Label for every prompt of a file without labels.
        out (`str`): Output folder.
        max_new_tokens (`int`, defaults to `128`): New tokens per response.
        batch_size (`int`, defaults to `16`): Prompts per generation batch.
        system_prompt (`str`, *optional*): System turn before each prompt.
        max_prompt_tokens (`int`, *optional*): Longer prompts are cut from the left to this many tokens (with a
            warning); default: the smaller of 1024 and the model's context minus `max_new_tokens`.
        judge (`str`, defaults to `"pattern"`): Default refusal judge: pattern, embedding or a classifier path.
        extra_judges (`list[str]`): More judges reported beside the default.
        baseline (`str`, *optional*): A base model's results.json; adds drift D = RA_base - RA_this.
        cache_dir (`str`, *optional*): Generation cache folder.
        dtype (`str`, defaults to `"auto"`): Model dtype (auto = float32 on CPU, checkpoint dtype on GPU).
        device (`str`, *optional*): Device (default: cuda if available, else cpu).
        n_boot (`int`, defaults to `1000`): Bootstrap resamples for the 95% intervals.
        seed (`int`, defaults to `0`): Bootstrap seed.
    """

    model: str | None = field(
        default=None, metadata={"help": "Local HF model folder, .gguf file or `alignguard models` name (required)."}
    )
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter folder loaded on top of --model."})
    prompts: str | None = field(
        default=None,
        metadata={"help": "JSONL/CSV prompt file or bundled split (standard, demo, calibration, small, full)."},
    )
    prompt_field: str = field(default="prompt", metadata={"help": "Key/column holding the prompt text."})
    label: Literal["safe", "unsafe"] | None = field(
        default=None, metadata={"help": "Label for every prompt of a file that has no label column."}
    )
    out: str | None = field(default=None, metadata={"help": "Output folder (required)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Maximum new tokens per response."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per left-padded generation batch."})
    system_prompt: str | None = field(default=None, metadata={"help": "System turn placed before each prompt."})
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={"help": "Prompt tokens kept (longer prompts lose their beginning); none: min(1024, context)."},
    )
    judge: str = field(
        default="pattern", metadata={"help": "Default refusal judge: pattern, embedding, or a classifier path."}
    )
    extra_judges: list[str] = field(
        default_factory=list, metadata={"help": "More judges whose rates are reported beside the default."}
    )
    baseline: str | None = field(
        default=None, metadata={"help": "A base model's results.json; adds paired drift RA_base - RA_this."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Generation cache folder (none: no cache)."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Model dtype; auto = float32 on CPU, checkpoint dtype on GPU."}
    )
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})
    n_boot: int = field(default=1000, metadata={"help": "Bootstrap resamples for the 95 percent intervals."})
    seed: int = field(default=0, metadata={"help": "Bootstrap seed."})
    overwrite: bool = field(
        default=False, metadata={"help": "Delete what --out holds (another run or other settings) and start afresh."}
    )

    def generation_settings(self):
        """The `GenerationSettings` these options ask for (recorded in config.yaml and used by `run_eval`)."""
        from ..driftcheck.generate import GenerationSettings

        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            system_prompt=self.system_prompt,
            max_prompt_tokens=self.max_prompt_tokens,
        )

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model is required (a local Hugging Face model folder)")
        if not self.out:
            raise ValueError("--out is required (an output folder)")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.n_boot < 1:
            raise ValueError(f"--n-boot must be >= 1, got {self.n_boot}")
        if isinstance(self.extra_judges, str):
            self.extra_judges = [self.extra_judges]
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        check_judge(self.judge, "--judge")
        for name in self.extra_judges:
            check_judge(name, "--extra-judges")


def run_eval(cfg: EvalConfig):
    """DriftCheck of `cfg.model` (+ adapter); writes results.json and generations.jsonl into `cfg.out`."""
    from ..driftcheck.run import run_driftcheck

    settings = cfg.generation_settings()
    return run_driftcheck(
        cfg.model,
        prompts=cfg.prompts,
        adapter=cfg.adapter,
        judge=cfg.judge,
        extra_judges=cfg.extra_judges,
        settings=settings,
        out_dir=cfg.out,
        baseline=cfg.baseline,
        cache_dir=cfg.cache_dir,
        prompt_field=cfg.prompt_field,
        label=cfg.label,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
        dtype=cfg.dtype,
        device=cfg.device,
    )
