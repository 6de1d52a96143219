"""`alignguard eval`: DriftCheck on one model (optionally with a PEFT adapter and a baseline result).

    alignguard eval --model PATH --out runs/base
    alignguard eval --model PATH --adapter runs/lora --prompts my_prompts.csv --prompt-field text \\
        --label unsafe --out runs/lora_eval --baseline runs/base/results.json
    alignguard eval --config eval.yaml --max-new-tokens 64     # flags win over the file

Writes `generations.jsonl`, `results.json` and the resolved `config.yaml` into `--out`, then prints
refusal rate (RA), over-refusal (OR) and per-category RA (plus drift with `--baseline`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from alignguard.cli.common import add_dataclass_args, build_dataclass, check_unknown_keys, load_yaml

COMMAND_HELP = "DriftCheck: refusal / over-refusal / drift of a model or adapter"


@dataclass
class EvalConfig:
    """Options of `alignguard eval` (DriftCheck).

    Args:
        model (`str`): Local Hugging Face model folder, `.gguf` file or a name listed by `alignguard models`.
        adapter (`str`, *optional*): PEFT adapter folder loaded on top of `model`.
        prompts (`str`, *optional*): JSONL/CSV prompt file; the bundled small split when omitted.
        prompt_field (`str`, defaults to `"prompt"`): Column/key holding the prompt text.
        label (`Literal["safe", "unsafe"]`, *optional*): Label for every prompt of a file without labels.
        out (`str`): Output folder.
        max_new_tokens (`int`, defaults to `128`): New tokens per response.
        batch_size (`int`, defaults to `16`): Prompts per generation batch.
        system_prompt (`str`, *optional*): System turn before each prompt.
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
        default=None, metadata={"help": "JSONL or CSV prompt file (default: the bundled small split)."}
    )
    prompt_field: str = field(default="prompt", metadata={"help": "Key/column holding the prompt text."})
    label: Literal["safe", "unsafe"] | None = field(
        default=None, metadata={"help": "Label for every prompt of a file that has no label column."}
    )
    out: str | None = field(default=None, metadata={"help": "Output folder (required)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Maximum new tokens per response."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per left-padded generation batch."})
    system_prompt: str | None = field(default=None, metadata={"help": "System turn placed before each prompt."})
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


def _add_dash_aliases(parser: argparse.ArgumentParser) -> None:
    # common.add_dataclass_args names flags after the fields (--max_new_tokens); accept --max-new-tokens too.
    for action in list(parser._actions):
        for opt in list(action.option_strings):
            if opt.startswith("--") and "_" in opt:
                alias = opt.replace("_", "-")
                if alias not in parser._option_string_actions:
                    action.option_strings.insert(0, alias)  # usage shows the dashed form
                    parser._option_string_actions[alias] = action


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="alignguard eval", description=__doc__)
    parser.add_argument("--config", default=None, help="YAML file of options; flags given here win over it.")
    add_dataclass_args(parser, EvalConfig)
    _add_dash_aliases(parser)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help=COMMAND_HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    make_parser(parser)
    parser.set_defaults(func=main)
    return parser


def resolve_config(args: argparse.Namespace) -> EvalConfig:
    """Dataclass defaults < `--config` YAML < explicit flags."""
    file_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    if file_values:
        check_unknown_keys(file_values, [EvalConfig], f"--config {args.config}")
    return build_dataclass(EvalConfig, file_values, args)


def _pct(stat) -> str:
    if stat is None:
        return "   n/a"
    return f"{100 * stat.value:5.1f}% [{100 * stat.ci_low:5.1f}, {100 * stat.ci_high:5.1f}] (n={stat.n})"


def format_table(result) -> str:
    """A short plain-text table of the result: RA, OR, per-category RA, extra judges, drift."""
    m = result.metrics
    lines = [f"DriftCheck  model={result.model_id}" + (f"  adapter={result.adapter}" if result.adapter else "")]
    lines.append(f"  judge: {result.judge}   (95% bootstrap intervals)")
    lines.append(f"  {'refusal rate (unsafe, RA)':<34}{_pct(m['refusal_rate'])}")
    lines.append(f"  {'over-refusal (safe, OR)':<34}{_pct(m['over_refusal_rate'])}")
    for cat, stat in m["per_category_refusal_rate"].items():
        lines.append(f"    {'RA ' + cat:<32}{_pct(stat)}")
    for name, block in result.extra_judges.items():
        lines.append(f"  judge {name}: RA {_pct(block['refusal_rate'])}  OR {_pct(block['over_refusal_rate'])}")
    if result.baseline:
        b = result.baseline
        lines.append(f"  {'RA baseline':<34}{_pct(b['refusal_rate_base'])}")
        lines.append(f"  {'drift (RA_base - RA)':<34}{_pct(b['drift'])}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from alignguard.cli.common import save_resolved_config
    from alignguard.driftcheck.generate import GenerationSettings
    from alignguard.driftcheck.prompts import PromptFileError
    from alignguard.driftcheck.run import ModelPathError, run_driftcheck

    cfg = resolve_config(args)
    print("alignguard eval, resolved config:")
    for key, val in dataclasses.asdict(cfg).items():
        print(f"  {key}: {val!r}")
    settings = GenerationSettings(
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, system_prompt=cfg.system_prompt
    )
    # The config goes out first: it records what was asked for even if generation fails later.
    save_resolved_config(cfg.out, {"eval": cfg, "generation": settings})
    try:
        result = run_driftcheck(
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
    except (ModelPathError, PromptFileError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(format_table(result))
    print(f"wrote {cfg.out}/results.json, generations.jsonl, config.yaml")
    return 0
