"""`alignguard eval`: DriftCheck on one model (optionally with a PEFT adapter and a baseline result).

    alignguard eval --model PATH --out runs/base
    alignguard eval --model PATH --adapter runs/lora --prompts my_prompts.csv --prompt-field text \\
        --label unsafe --out runs/lora_eval --baseline runs/base/results.json
    alignguard eval --config eval.yaml --max-new-tokens 64     # flags win over the file

Writes `generations.jsonl`, `results.json` and the resolved `config.yaml` into `--out`, then prints
refusal rate (RA), over-refusal (OR, also on look-alikes alone), harmful compliance, incoherence and per-category
RA (plus drift with `--baseline`).
"""

from __future__ import annotations

import argparse
import dataclasses

from alignguard.cli.common import Command, Section
from alignguard.recipes.common import check_output_dir
from alignguard.recipes.eval import EvalConfig, run_eval

COMMAND = Command(
    "eval", "DriftCheck: refusal / over-refusal / drift of a model or adapter", __doc__, [Section("eval", EvalConfig)]
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    return COMMAND.add_parser(subparsers, main)


def resolve(args: argparse.Namespace) -> tuple[EvalConfig]:
    """(EvalConfig,): defaults < `--config` YAML < explicit flags."""
    return tuple(COMMAND.resolve(args).values())


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
    lines.append(f"  {'over-refusal (look-alikes)':<34}{_pct(m.get('lookalike_over_refusal_rate'))}")
    lines.append(f"  {'harmful compliance (unsafe)':<34}{_pct(m.get('harmful_compliance_rate'))}")
    lines.append(f"  {'incoherent (unsafe / safe)':<34}{_pct(m.get('incoherence_rate_unsafe'))}")
    lines.append(f"  {'':<34}{_pct(m.get('incoherence_rate_safe'))}")
    for cat, stat in m["per_category_refusal_rate"].items():
        lines.append(f"    {'RA ' + cat:<32}{_pct(stat)}")
    for name, block in result.extra_judges.items():
        lines.append(f"  judge {name}: RA {_pct(block['refusal_rate'])}  OR {_pct(block['over_refusal_rate'])}")
        lines.append(f"  {'':<14}harmful compliance {_pct(block.get('harmful_compliance_rate'))}")
    if result.baseline:
        b = result.baseline
        lines.append(f"  {'RA baseline':<34}{_pct(b['refusal_rate_base'])}")
        lines.append(f"  {'drift (RA_base - RA)':<34}{_pct(b['drift'])}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from alignguard.cli.common import save_resolved_config

    (cfg,) = resolve(args)
    print("alignguard eval, resolved config:")
    for key, val in dataclasses.asdict(cfg).items():
        print(f"  {key}: {val!r}")
    settings = cfg.generation_settings()
    # The config goes out first: it records what was asked for even if generation fails later.
    check_output_dir(cfg.out, "eval", {"eval": cfg, "generation": settings}, cfg.overwrite)
    save_resolved_config(cfg.out, {"eval": cfg, "generation": settings})
    result = run_eval(cfg)  # bad files, folders and settings become one `error:` line in cli.main
    print(format_table(result))
    print(f"wrote {cfg.out}/results.json, generations.jsonl, config.yaml")
    return 0
