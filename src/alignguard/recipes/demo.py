"""`alignguard demo`: the whole pipeline on the bundled default, sized for a 2-core CPU.

Steps: align the default model if no aligned copy is cached (LoRA SFT, merged) -> Fisher factors and subspaces
on alignment data -> plain LoRA (with and without the poison pairs: `plain_lora@poison_ratio=0` is the
benign-drift control) vs AlignGuard on the word_problems_easy task with a small poison ratio -> DriftCheck (refusal,
over-refusal, task accuracy) -> report. Every stage writes into the run folder and is skipped when its
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
from .align import NOT_WEIGHT_FIELDS, AlignRunConfig, alignment_data_digest, run_align
from .compare import CompareConfig, HarnessConfig, method_spec, run_compare
from .train import TrainRunConfig


def _demo_align() -> AlignRunConfig:
    # docs/alignment.md, run a2: SFT on 128 examples (65% safe, half of them look-alikes), then DPO; no report
    # (the demo evaluates the aligned model itself).
    return AlignRunConfig(
        max_examples=128,
        safe_fraction=0.65,
        lookalike_fraction=0.5,
        max_steps=20,
        learning_rate=1e-3,
        max_new_tokens=48,
        dpo_steps=8,
        dpo_batch_size=4,
        dpo_learning_rate=2e-4,
        dpo_beta=0.1,
        eval_prompts="none",
    )


def _demo_harness() -> HarnessConfig:
    # The demo split (160 unsafe, 80 safe; a subset of the standard split): drift intervals of about +-8 points. The
    # whole demo takes 9.2 minutes on 2 quiet CPU cores from a fresh cache (README). Two judges side by side (the
    # learned one needs the bundled MiniLM, ~12 s / 600 answers).
    return HarnessConfig(
        prompts="demo", eval_max_new_tokens=32, task_eval_n=100, fisher_examples=64, extra_judges=["learned"]
    )


def _demo_train() -> TrainRunConfig:
    return TrainRunConfig(
        method="lora",
        task="word_problems_easy",
        n_train=96,
        poison_ratio=0.2,
        max_steps=30,
        lora_r=8,
        lora_alpha=16.0,
        learning_rate=2e-3,
        max_length=256,
        save_steps=15,
    )


# Fields of the nested configs that the demo fills in itself (no flag, no YAML key).
_ALIGN_SET_BY_DEMO = ("model", "out", "overwrite")
_TRAIN_SET_BY_DEMO = ("model", "out", "overwrite", "method", "fisher", "seed", "save_steps")


@dataclass
class DemoConfig:
    """Options of `alignguard demo` (defaults: the bundled default; 9 minutes on 2 CPU cores from a fresh cache).

    The stages' own configs are nested with the demo's defaults; on the command line they are namespaced
    (`--train.max_steps 2`, `--align.max_steps 1`, `--alignguard.lambda_a 10`, `--harness.task_eval_n 3`), in YAML
    they are sections (`train: {max_steps: 2}`).

    Args:
        out: run folder.
        model: the base model; it is aligned first unless `aligned_model` is given.
        aligned_model: an already aligned model (skips the alignment stage).
        methods: methods to compare.
        seeds: training seeds; with several, the table shows mean ± sd over seeds.
        cache_dir: where the aligned model is cached across demo runs (default: <alignguard cache>/aligned).
        overwrite: delete what `out` holds and start afresh (the aligned-model cache is never touched).
        align: the alignment stage (`model` and `out` are set by the demo: the base model and the cache folder).
        harness: how every method is evaluated (DriftCheck prompts and length, task metric, Fisher examples).
        train: task fine-tuning shared by all methods (`model`, `out`, `method`, `fisher`, `seed` and `save_steps` =
            max_steps // 2 are set by the demo).
        alignguard: the AlignGuard loss.
        fisher / subspace: the Fisher pass and the subspaces.
    """

    out: str = field(default="runs/demo", metadata={"help": "Run folder."})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "Base model (aligned first)."})
    aligned_model: str | None = field(default=None, metadata={"help": "Use this aligned model; skip alignment."})
    methods: list[str] = field(
        default_factory=lambda: ["plain_lora", "plain_lora@poison_ratio=0", "alignguard"],
        metadata={"help": "Methods to compare (`<method>@poison_ratio=0`: the same row without poison)."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Training seeds (rows: mean ± sd)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache of aligned models."})
    overwrite: bool = field(
        default=False, metadata={"help": "Delete what --out holds (another run or other settings) and start afresh."}
    )
    align: AlignRunConfig = field(
        default_factory=_demo_align,
        metadata={"help": "Alignment stage.", "set_by_command": _ALIGN_SET_BY_DEMO},
    )
    harness: HarnessConfig = field(default_factory=_demo_harness, metadata={"help": "Evaluation of every method."})
    train: TrainRunConfig = field(
        default_factory=_demo_train,
        metadata={"help": "Task fine-tuning.", "set_by_command": _TRAIN_SET_BY_DEMO},
    )
    alignguard: AlignGuardConfig = field(
        default_factory=lambda: AlignGuardConfig(lambda_a=100.0), metadata={"help": "The AlignGuard loss."}
    )
    fisher: FisherConfig = field(default_factory=FisherConfig, metadata={"help": "The Fisher pass."})
    subspace: SubspaceConfig = field(default_factory=SubspaceConfig, metadata={"help": "The subspaces U."})

    def __post_init__(self):
        if not self.methods:
            raise ValueError("methods: give at least one method")
        for name in self.methods:
            method_spec(name)  # raises ValueError naming the bad method or override
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds: give one or more seeds >= 0, got {self.seeds}")
        # The fields the demo sets itself, filled in here so the saved demo_config.yaml says what was run.
        self.align = replace(self.align, model=self.model)
        if self.aligned_model is None:
            self.align = replace(self.align, out=str(aligned_model_path(self, self.align)))
        self.train = replace(
            self.train,
            model=self.aligned_model or self.align.out,
            out=self.out,
            overwrite=False,
            method="lora",
            fisher=None,
            seed=0,  # run_compare sets each row's seed; this one seeds the shared task-factor sample, as in compare
            save_steps=max(1, self.train.max_steps // 2),
        )


# Fields whose value does not change the aligned model (align.NOT_WEIGHT_FIELDS: the report and the generation
# cache) are never part of its cache key; fields added to AlignRunConfig after a release are left out while at
# their default, so models aligned before the field existed (with the same, then implicit, setting) are still found.
_NOT_IN_KEY = ("out", "overwrite", *NOT_WEIGHT_FIELDS)
_ADDED_LATER = {
    "safe_fraction": 0.5,
    "dpo_pairs": "base",
    "dpo_pool": "sft",
    "dpo_sft_weight": 0.0,
    "helpful_system_prompt": None,
    "helpful_max_new_tokens": None,
}


def aligned_model_path(cfg: DemoConfig, align_cfg: AlignRunConfig) -> Path:
    """Cache folder of the aligned model for this base model and alignment config."""
    from ..models import cache_root

    values = {k: v for k, v in vars(align_cfg).items() if k not in _NOT_IN_KEY and _ADDED_LATER.get(k, object()) != v}
    values["alignment_data_sha256"] = alignment_data_digest(align_cfg)  # new data, new model
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
        path = Path(cfg.align.out)
        if not (path / "config.json").is_file():
            print(f"[demo] aligning {cfg.model} -> {path}")
            run_align(cfg.align, progress=progress)
        aligned = str(path)
    compare_cfg = CompareConfig(
        model=aligned,
        base_model=cfg.model,
        out=str(out),
        methods=list(cfg.methods),
        seeds=list(cfg.seeds),
        **cfg.harness.harness_values(),
    )
    fisher_cfg = replace(cfg.fisher, show_progress=cfg.fisher.show_progress and progress)
    print(f"[demo] Fisher + {', '.join(cfg.methods)} on {aligned}")
    results = run_compare(compare_cfg, cfg.train, cfg.alignguard, fisher_cfg, cfg.subspace)
    report = render_report(out)
    table = format_table(results)
    return {
        "results": results,
        "table": table,
        "report": str(report) if report else None,
        "seconds": time.perf_counter() - t0,
    }
