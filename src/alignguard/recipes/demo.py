"""`alignguard demo`: the whole pipeline on the bundled default, sized for a 2-core CPU.

Steps: align the default model if no aligned copy is cached (LoRA SFT, merged) -> Fisher factors and subspaces
on alignment data -> plain LoRA vs AlignGuard on the BBC topic task with a small poison ratio -> DriftCheck
(refusal, over-refusal, task accuracy) -> report. Every stage writes into the run folder and is skipped when its
outputs exist, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import AlignGuardConfig, FisherConfig, SubspaceConfig
from ..report import render_report
from ..report.compare_table import format_table
from .align import AlignRunConfig, run_align
from .compare import CompareConfig, run_compare
from .train import TrainRunConfig


@dataclass
class DemoConfig:
    """Options of `alignguard demo` (defaults: the bundled default, in about 15 minutes on 2 CPU cores).

    Args:
        out: run folder.
        model: the base model; it is aligned first unless `aligned_model` is given.
        aligned_model: an already aligned model (skips the alignment stage).
        methods: methods to compare.
        seeds: training seeds; with several, the table shows mean ± sd over seeds.
        poison_ratio: fraction of harmful pairs in the fine-tuning mix.
        max_steps / n_train / learning_rate / lora_r: task fine-tuning.
        lambda_a: weight of the alignment term.
        align_steps / align_examples / align_learning_rate / align_safe_fraction: the alignment stage.
        eval_max_new_tokens: DriftCheck generation length.
        cache_dir: where the aligned model is cached across demo runs (default: <alignguard cache>/aligned).
    """

    out: str = field(default="runs/demo", metadata={"help": "Run folder."})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "Base model (aligned first)."})
    aligned_model: str | None = field(default=None, metadata={"help": "Use this aligned model; skip alignment."})
    methods: list[str] = field(
        default_factory=lambda: ["plain_lora", "alignguard"], metadata={"help": "Methods to compare."}
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Training seeds (rows: mean ± sd)."})
    task: str = field(default="bbc_topic", metadata={"help": "Downstream task: bbc_topic or arithmetic."})
    max_length: int = field(default=256, metadata={"help": "Token limit of prompt + response."})
    poison_ratio: float = field(default=0.2, metadata={"help": "Harmful fraction of the fine-tuning mix."})
    max_steps: int = field(default=30, metadata={"help": "Fine-tuning steps per method."})
    n_train: int = field(default=96, metadata={"help": "Task examples."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Fine-tuning learning rate."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lambda_a: float = field(default=100.0, metadata={"help": "Weight of the alignment term."})
    align_steps: int = field(default=16, metadata={"help": "Alignment-stage steps."})
    align_examples: int = field(default=160, metadata={"help": "Alignment-stage examples (balanced)."})
    align_learning_rate: float = field(default=1e-3, metadata={"help": "Alignment-stage learning rate."})
    align_safe_fraction: float = field(default=0.5, metadata={"help": "Share of safe prompts in alignment."})
    prompts: str | None = field(default=None, metadata={"help": "DriftCheck prompts (default: bundled small split)."})
    eval_max_new_tokens: int = field(default=32, metadata={"help": "DriftCheck generation length."})
    fisher_examples: int = field(default=64, metadata={"help": "Alignment examples for the Fisher pass."})
    task_eval_n: int = field(default=40, metadata={"help": "Held-out task examples."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache of aligned models."})


_ADDED_LATER = {"safe_fraction": 0.5}


def aligned_model_path(cfg: DemoConfig, align_cfg: AlignRunConfig) -> Path:
    """Cache folder of the aligned model for this base model and alignment config."""
    from ..models import cache_root

    # Fields added to AlignRunConfig after a release are left out of the key while at their default, so models
    # aligned before the field existed (with the same, then implicit, setting) are still found.
    values = {k: v for k, v in vars(align_cfg).items() if k != "out" and _ADDED_LATER.get(k, object()) != v}
    key = json.dumps(values, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = Path(cfg.cache_dir) if cfg.cache_dir else cache_root() / "aligned"
    return root / f"{Path(cfg.model).name}-{digest}"


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Run the demo; returns {"results": ..., "table": str, "report": path or None, "seconds": float}."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    aligned = cfg.aligned_model
    if aligned is None:
        align_cfg = AlignRunConfig(
            model=cfg.model,
            max_steps=cfg.align_steps,
            max_examples=cfg.align_examples,
            learning_rate=cfg.align_learning_rate,
            safe_fraction=cfg.align_safe_fraction,
            max_new_tokens=64,
        )
        path = aligned_model_path(cfg, align_cfg)
        if not (path / "config.json").is_file():
            print(f"[demo] aligning {cfg.model} -> {path}")
            run_align(replace(align_cfg, out=str(path)), progress=progress)
        aligned = str(path)
    compare_cfg = CompareConfig(
        model=aligned,
        base_model=cfg.model,
        out=str(out),
        methods=cfg.methods,
        seeds=cfg.seeds,
        eval_max_new_tokens=cfg.eval_max_new_tokens,
        task_eval_n=cfg.task_eval_n,
        fisher_examples=cfg.fisher_examples,
        prompts=cfg.prompts,
    )
    train_cfg = TrainRunConfig(
        model=aligned,
        out=str(out),
        method="lora",
        n_train=cfg.n_train,
        poison_ratio=cfg.poison_ratio,
        max_steps=cfg.max_steps,
        lora_r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        learning_rate=cfg.learning_rate,
        save_steps=max(1, cfg.max_steps // 2),
        max_length=cfg.max_length,
        task=cfg.task,
    )
    ag_cfg = AlignGuardConfig(lambda_a=cfg.lambda_a)
    print(f"[demo] Fisher + {', '.join(cfg.methods)} on {aligned}")
    results = run_compare(compare_cfg, train_cfg, ag_cfg, FisherConfig(show_progress=progress), SubspaceConfig())
    report = render_report(out)
    table = format_table(results)
    return {
        "results": results,
        "table": table,
        "report": str(report) if report else None,
        "seconds": time.perf_counter() - t0,
    }
