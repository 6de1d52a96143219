"""`alignguard compare`: every method on the same model, task data, seeds and DriftCheck prompts (docs/design.md §5).

Layout of a compare run folder (also documented in the README):

    <out>/config.yaml, run.json           resolved configuration; the command and settings (the --out guard)
    <out>/fisher/                         Fisher state + subspaces (alignment data), task factors
    <out>/base/driftcheck/                DriftCheck of the aligned model without adapter (results.json, ...)
    <out>/base/task.json                  its task metric
    <out>/seed<S>/<method>/adapter/       the trained adapter (+ AlignGuard state)
    <out>/seed<S>/<method>/train_summary.json, train_settings.json   the training (loss, step time), its settings
    <out>/seed<S>/<method>/driftcheck/    DriftCheck of model + adapter
    <out>/seed<S>/<method>/result.json    per-method summary; marks the method done
    <out>/<stage>/stage_key.json          settings the stage was made with (fisher/, base/, each seed<S>/<method>/)
    <out>/superseded/                     stages made with other settings, moved aside when redone (never deleted)
    <out>/results.json                    all methods, one schema (see `aggregate`)
    <out>/results.md                      the table

Each stage is keyed by what it depends on (`fisher_stage_settings`, `base_stage_settings`, `row_settings`): a
re-run reuses a finished stage with the same settings, redoes one made with other settings (another --model,
--energy, --max_steps, --lambda_a, ...) and prints which it did and why. A killed run started again skips
finished methods and resumes the interrupted one from its newest complete Trainer checkpoint. A row depends on the
Fisher stage through that stage's key, not its path, so rows copied from another run folder with the same Fisher
and base stages are reused (two machines' rows can be merged into one folder and re-tabled by a re-run).

Method names: a name of `METHODS`, optionally with per-row overrides `<method>@<field>=<value>[,...]` of
AlignGuardConfig fields (`alignguard@lambda_a=1000`) and of `poison_ratio` (`plain_lora@poison_ratio=0`: the
benign-drift control, the same fine-tuning without harmful pairs; `alignguard@poison_ratio=0.1`). The row's folder
is named after the whole name. A peer's row also takes its own options (`asft@asft_lambda=10`,
`lox@lox_rank=4`; `methods.PEER_CONFIGS`). `prompts` may name a bundled DriftCheck split (`standard`, `demo`,
`calibration`, `small`, `full`) instead of a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..config import AlignGuardConfig, FisherConfig, SubspaceConfig
from ..config_values import require_at_least
from ..driftcheck.prompts import resolve_prompts
from ..io import atomic_write_json, atomic_write_text
from ..tasks import evaluate_task
from .eval import check_judge
from .fisher import FisherRunConfig, run_fisher
from .method_rows import PEER_LOGS, prepare_peer, replay_pairs, row_subspaces, safe_lora_once
from .methods import (  # noqa: F401  (re-exported: compare.METHODS, compare.method_spec, ...)
    DEFAULT_METHODS,
    METHODS,
    TRAIN_OVERRIDES,
    method_spec,
    method_train_config,
    peer_config,
)
from .train import TrainRunConfig, run_train


@dataclass
class HarnessConfig:
    """How every method is evaluated (shared by `alignguard compare` and `alignguard scaling`).

    Args:
        prompts: DriftCheck prompts: a file, or a bundled split by name (`standard`, `demo`, `calibration`,
            `small`, `full`; see `driftcheck.prompts.resolve_prompts`). Default: the bundled small split.
        eval_max_new_tokens: generation length for DriftCheck (refusals show in the first tokens).
        eval_batch_size: generation batch size.
        task_eval_n: held-out task examples for the task metric.
        task_fisher: also estimate the output factor on task data (H and M = G_task for R_T and E_geo).
        replay_ratio: fraction of refusal-replay examples in the mix for the replay methods.
        safe_lora_threshold: Safe LoRA projects a layer when cos(dW, C dW) is below this.
        fisher_examples: alignment examples for the Fisher pass.
        extra_judges: judges whose refusal rates are reported beside the default pattern judge.
            `pattern_relevance` also counts answers that ignore the prompt as non-compliance: a fine-tune that
            collapses the model into its task format (a topic word for every prompt) then shows as format
            collapse, not as harmful compliance.
    """

    prompts: str | None = field(
        default=None,
        metadata={"help": "DriftCheck prompt file or bundled split (standard, demo, calibration, small, full)."},
    )
    eval_max_new_tokens: int = field(default=48, metadata={"help": "DriftCheck generation length."})
    eval_batch_size: int = field(default=32, metadata={"help": "Generation batch size."})
    task_eval_n: int = field(default=50, metadata={"help": "Held-out task examples."})
    task_fisher: bool = field(default=True, metadata={"help": "Estimate G_task on task data too."})
    replay_ratio: float = field(default=0.05, metadata={"help": "Refusal-replay fraction (replay methods)."})
    safe_lora_threshold: float = field(default=0.5, metadata={"help": "Safe LoRA cosine threshold."})
    fisher_examples: int = field(default=128, metadata={"help": "Alignment examples for the Fisher pass."})
    extra_judges: list[str] = field(
        default_factory=lambda: ["pattern_relevance"],
        metadata={"help": "Judges reported beside the default (pattern) judge."},
    )

    def __post_init__(self):
        if isinstance(self.extra_judges, str):
            self.extra_judges = [self.extra_judges]
        require_at_least(self, ("eval_max_new_tokens", "eval_batch_size", "task_eval_n", "fisher_examples"))
        if not 0 <= self.replay_ratio < 1:
            raise ValueError(f"replay_ratio: must be in [0, 1), got {self.replay_ratio}")
        if not -1 <= self.safe_lora_threshold <= 1:
            raise ValueError(f"safe_lora_threshold: must be in [-1, 1] (a cosine), got {self.safe_lora_threshold}")
        for judge in self.extra_judges:
            check_judge(judge, "extra_judges")

    def harness_values(self) -> dict:
        """The harness fields as a dict (to build another config with the same evaluation)."""
        return {f.name: getattr(self, f.name) for f in fields(HarnessConfig)}


@dataclass
class CompareConfig(HarnessConfig):
    """Options of `alignguard compare` (evaluation from `HarnessConfig`, training from `TrainRunConfig`, loss from
    `AlignGuardConfig`).

    Args:
        model: the aligned model (folder, registry or tiny name).
        base_model: its unaligned base, for Safe LoRA, AsFT and LoX (default: `base_model` in the model's
            align_info.json).
        out: run folder.
        methods: methods to run (see `alignguard.recipes.compare.METHODS`).
        seeds: one full comparison per seed; tables report mean and spread.
    """

    model: str = field(default="smollm2-135m-instruct", metadata={"help": "Aligned model to fine-tune."})
    base_model: str | None = field(default=None, metadata={"help": "Unaligned base (Safe LoRA, AsFT, LoX)."})
    out: str = field(default="runs/compare", metadata={"help": "Run folder."})
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS), metadata={"help": "Methods to run."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds (one comparison each)."})
    overwrite: bool = field(
        default=False, metadata={"help": "Delete what --out holds (another run or other settings) and start afresh."}
    )

    def __post_init__(self):
        super().__post_init__()
        for name in self.methods:
            method_spec(name)  # raises ValueError naming the bad method or override
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds: give one or more seeds >= 0, got {self.seeds}")


def _load(spec):
    from ..models import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(spec)
    return model, tok


def _driftcheck(model, tokenizer, cfg: CompareConfig, out_dir: Path, baseline, task: dict):
    from ..driftcheck.generate import GenerationSettings
    from ..driftcheck.run import run_driftcheck

    settings = GenerationSettings(max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size)
    return run_driftcheck(
        model,
        resolve_prompts(cfg.prompts),
        tokenizer=tokenizer,
        settings=settings,
        out_dir=out_dir,
        baseline=baseline,
        extra_judges=cfg.extra_judges,
        cache_dir=str(Path(cfg.out) / "generation_cache"),
        task_metrics={"accuracy": task.get("accuracy")},
    )


def _has_task_factors(fisher_dir: Path) -> bool:
    meta = json.loads((fisher_dir / "subspaces.json").read_text())
    return bool(meta.get("task_modules"))


def _has_input_factors(fisher_dir: Path) -> bool:
    meta = json.loads((fisher_dir / "subspaces.json").read_text())
    return bool(meta.get("input_modules"))


def check_prompts(prompts: str | None) -> None:
    """Refuse a DriftCheck prompt file without unsafe prompts before any work: the comparison is about the
    refusal rate on them (drift needs it too). A bundled split name (`standard`, ...) stands for its file."""
    from ..driftcheck.prompts import load_prompts

    if prompts is None:
        return  # the bundled split has both kinds
    records = load_prompts(resolve_prompts(prompts))
    if not any(r.label == "unsafe" for r in records):
        raise ValueError(
            f"prompts: {prompts} has no unsafe prompts ({len(records)} safe ones), so there is no refusal rate to "
            "compare; add prompts labelled 'unsafe' or leave --prompts unset for the bundled set"
        )


def fisher_stage_settings(cfg: CompareConfig, train_cfg: TrainRunConfig, fisher_cfg, subspace_cfg, fcfg) -> dict:
    """What <out>/fisher depends on: the model, the Fisher-pass data and settings, the subspace settings and (with
    task_fisher) the task data of the task factors. `input_factor` is left out: A_in is added to a folder without
    redoing its rows (see `prepare_shared`)."""
    from .common import plain_settings

    settings = plain_settings({"run": fcfg, "fisher": fisher_cfg, "subspace": subspace_cfg or SubspaceConfig()})
    settings["run"].pop("cache_dir", None)
    settings["fisher"].pop("input_factor", None)
    settings["task_fisher"] = cfg.task_fisher
    if cfg.task_fisher:
        settings["task_factors"] = {
            "task": train_cfg.task,
            "n": min(64, train_cfg.n_train),
            "seed": train_cfg.seed,
            "max_length": train_cfg.max_length,
        }
    return settings


def base_stage_settings(cfg: CompareConfig, train_cfg: TrainRunConfig) -> dict:
    """What <out>/base depends on: the model, the DriftCheck prompts (their bytes) and the evaluation settings."""
    from .common import file_digest

    return {
        "model": cfg.model,
        "prompts": cfg.prompts,
        "prompts_digest": file_digest(resolve_prompts(cfg.prompts)),
        "eval_max_new_tokens": cfg.eval_max_new_tokens,
        "eval_batch_size": cfg.eval_batch_size,
        "extra_judges": list(cfg.extra_judges),
        "task": train_cfg.task,
        "task_eval_n": cfg.task_eval_n,
    }


def prepare_shared(
    cfg: CompareConfig,
    train_cfg: TrainRunConfig,
    fisher_cfg: FisherConfig | None = None,
    subspace_cfg: SubspaceConfig | None = None,
    log=print,
) -> tuple[Path, Path]:
    """What every method shares: the Fisher state + subspaces (<out>/fisher) and the DriftCheck and task metric of
    the model without adapter (<out>/base). Each stage is keyed by its settings (`fisher_stage_settings`,
    `base_stage_settings`, in <stage>/stage_key.json): reused when they match, otherwise moved to
    <out>/superseded/ and redone. Returns (fisher_dir, base_dir)."""
    from .common import stage_is_current

    out = Path(cfg.out)
    cache = str(out / "generation_cache")
    fisher_dir, base_dir = out / "fisher", out / "base"
    # Factors are only needed for the modules LoRA will train: estimating the others costs time and memory.
    fisher_cfg = fisher_cfg or FisherConfig()
    if fisher_cfg.fisher_modules is None:
        fisher_cfg = replace(fisher_cfg, fisher_modules=list(train_cfg.target_modules))
    # The input factor A_in is estimated only when a method uses it. A folder made without it is redone with it
    # when such a method is added later: same data and seed, so the output factors match the earlier ones up to
    # floating-point noise (rows already trained keep their results).
    needs_input = any(method_spec(m)["ag"].get("alignment_input") == "kfac" for m in cfg.methods)
    if needs_input:
        fisher_cfg = replace(fisher_cfg, input_factor=True)
    fcfg = FisherRunConfig(model=cfg.model, out=str(fisher_dir), max_examples=cfg.fisher_examples, cache_dir=cache)
    settings = fisher_stage_settings(cfg, train_cfg, fisher_cfg, subspace_cfg, fcfg)
    # Finished = the subspaces are there, with the task factors when asked for (they are added last).
    done = (fisher_dir / "subspaces.json").is_file() and (not cfg.task_fisher or _has_task_factors(fisher_dir))
    current = stage_is_current(fisher_dir, settings, done, out, "fisher", log)
    if not current or (needs_input and not _has_input_factors(fisher_dir)):
        if current:
            log("[fisher] redone in place: a method needs the input factors A_in, which this folder lacks")
        model, tok = _load(cfg.model)
        _, subspaces = run_fisher(fcfg, fisher_cfg, subspace_cfg, model=model, tokenizer=tok)
        if cfg.task_fisher:
            subspaces.task_factors = _task_factors(model, tok, train_cfg, fisher_cfg, subspace_cfg)
            subspaces.save(fisher_dir)
    if not stage_is_current(base_dir, base_stage_settings(cfg, train_cfg), base_dir / "task.json", out, "base", log):
        model, tok = _load(cfg.model)
        task = evaluate_task(model, tok, train_cfg.task, cfg.task_eval_n, 0, cfg.eval_batch_size, cache)
        _driftcheck(model, tok, cfg, base_dir / "driftcheck", None, task)
        atomic_write_json(base_dir / "task.json", task)
    return fisher_dir, base_dir


def run_compare(
    cfg: CompareConfig,
    train_cfg: TrainRunConfig,
    ag_cfg: AlignGuardConfig,
    fisher_cfg: FisherConfig | None = None,
    subspace_cfg: SubspaceConfig | None = None,
) -> dict:
    """Run every method in `cfg.methods` for every seed; write per-method results, results.json and results.md."""
    out = Path(cfg.out)
    check_prompts(cfg.prompts)  # before the model is loaded: a file the comparison cannot use fails now
    fisher_dir, base_dir = prepare_shared(cfg, train_cfg, fisher_cfg, subspace_cfg)
    for seed in cfg.seeds:
        for name in cfg.methods:
            run_method(cfg, train_cfg, ag_cfg, name, seed, fisher_dir, base_dir)
    results = aggregate(cfg)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", format_table(results))
    return results


def _task_factors(model, tok, train_cfg, fisher_cfg, subspace_cfg):
    from ..data import make_batches
    from ..fisher import estimate_fisher
    from ..subspace import build_subspaces
    from ..tasks import load_task

    examples = load_task(train_cfg.task, "train", n=min(64, train_cfg.n_train), seed=train_cfg.seed)
    batches = make_batches(
        tok, [(e.prompt, e.training_response) for e in examples], batch_size=8, max_length=train_cfg.max_length
    )
    fc = replace(fisher_cfg or FisherConfig(), fisher_labels="empirical", input_factor=False)
    state = estimate_fisher(model, batches, fc)
    return build_subspaces(state, subspace_cfg or SubspaceConfig(), task_state=state, task_rank=64).task_factors


# What a row's key holds for the training config's `fisher` path: the Fisher stage is keyed by its content
# (`fisher_key`), so a row copied into another run folder with the same Fisher stage is the same row.
FISHER_STAGE = "<the run's fisher stage>"


def row_settings(
    cfg: CompareConfig, train_cfg, ag_cfg, name: str, seed: int, fisher_dir: Path, base_dir: Path, fisher_as=None
):
    """What <out>/seed<S>/<method> depends on: the Fisher and base stages (their keys), the training config with
    the method's own overrides (`@poison_ratio=...`), the AlignGuard config with the method's overrides, the method
    spec, the seed and the method's own options. `fisher_as`: what stands for the Fisher folder's path in the
    training config (default `FISHER_STAGE`; releases before session 15 wrote the path itself)."""
    from .common import STAGE_KEY_FILE, plain_settings

    spec = method_spec(name)
    settings = {
        "model": cfg.model,
        # Plain-LoRA rows (plain_lora, replay, safe_lora) never read the Fisher folder: a new Fisher pass keeps them.
        # Gradient surgery and Lisa read its alignment data.
        "fisher_key": json.loads((fisher_dir / STAGE_KEY_FILE).read_text())["key"]
        if spec["method"] == "alignguard" or spec.get("peer") in ("surgery", "lisa")
        else None,
        "base_key": json.loads((base_dir / STAGE_KEY_FILE).read_text())["key"],
        "method": name,
        "spec": spec,
        "seed": seed,
        **plain_settings(
            {
                "train": replace(
                    method_train_config(train_cfg, name),
                    seed=seed,
                    method=spec["method"],
                    fisher=FISHER_STAGE if fisher_as is None else fisher_as,
                )
            }
        ),
    }
    if spec["method"] == "alignguard":
        settings["alignguard"] = plain_settings({"c": replace(ag_cfg, **spec.get("ag", {}))})["c"]
    if spec.get("replay"):
        settings["replay_ratio"] = cfg.replay_ratio
    if spec.get("post") == "safe_lora":
        settings["safe_lora"] = {"threshold": cfg.safe_lora_threshold, "base_model": cfg.base_model}
    if spec.get("peer"):
        settings[spec["peer"]] = {**peer_config(name).to_dict(), "base_model": cfg.base_model}
    return settings


def run_method(
    cfg: CompareConfig,
    train_cfg: TrainRunConfig,
    ag_cfg: AlignGuardConfig,
    name: str,
    seed: int,
    fisher_dir: Path,
    base_dir: Path,
    log=print,
) -> dict:
    """Train + evaluate one method for one seed.

    The row is keyed by `row_settings` (<row>/stage_key.json): a finished row (result.json) with the same settings
    is reused; one with other settings is moved to <out>/superseded/ and redone. A row whose training finished but
    whose result.json is missing is evaluated again from the saved adapter and train_summary.json (the training
    is not redone, its loss and step time are kept).
    """
    from .common import stage_is_current, supersede
    from .train import TrainSettingsMismatch

    spec = method_spec(name)
    mdir = Path(cfg.out) / f"seed{seed}" / name
    label = f"seed{seed}/{name}"
    settings = row_settings(cfg, train_cfg, ag_cfg, name, seed, fisher_dir, base_dir)
    earlier = (row_settings(cfg, train_cfg, ag_cfg, name, seed, fisher_dir, base_dir, fisher_as=str(fisher_dir)),)
    if stage_is_current(mdir, settings, mdir / "result.json", Path(cfg.out), label, log, earlier):
        return json.loads((mdir / "result.json").read_text())
    model, tok = _load(cfg.model)
    tcfg = replace(
        method_train_config(train_cfg, name), out=str(mdir), method=spec["method"], fisher=str(fisher_dir), seed=seed
    )
    acfg = replace(ag_cfg, **spec.get("ag", {}))
    subspaces = row_subspaces(spec, fisher_dir, seed)
    extra = replay_pairs(train_cfg.n_train, cfg.replay_ratio, seed) if spec.get("replay") else None
    train = dict(model=model, tokenizer=tok, subspaces=subspaces, extra_pairs=extra, log=log)
    peer, peer_info = spec.get("peer"), None
    if peer:
        peer_info, peer_train = prepare_peer(cfg, name, peer, model, tok, tcfg.target_modules, fisher_dir)
        train.update(peer_train)
    try:
        summary = run_train(tcfg, acfg, **train)
    except TrainSettingsMismatch as exc:
        # Same row settings but the Fisher folder was redone in place (input factors added): start the row over.
        moved = supersede(mdir, Path(cfg.out))
        log(f"[{label}] redone: {exc}; the old outputs moved to {moved}")
        stage_is_current(mdir, settings, mdir / "result.json", Path(cfg.out), label, log)
        summary = run_train(tcfg, acfg, **train)
    peft_model = summary.pop("peft_model")
    if peer in PEER_LOGS:  # what the peer's trainer logged beside `loss`, into its result.json
        field, key = PEER_LOGS[peer]
        peer_info[field] = [h[key] for h in summary.get("log_history", []) if key in h]
    elif peer == "self_screen":  # what the screen dropped, by kind (from the summary: kept across a resume)
        peer_info["screen"] = summary.get("screen")
    info = {}
    if spec.get("post") == "safe_lora":
        info = safe_lora_once(cfg.model, cfg.base_model, cfg.safe_lora_threshold, peft_model, mdir)
    task = evaluate_task(
        peft_model,
        tok,
        train_cfg.task,
        cfg.task_eval_n,
        0,
        cfg.eval_batch_size,
        str(Path(cfg.out) / "generation_cache"),
    )
    dc = _driftcheck(peft_model, tok, cfg, mdir / "driftcheck", base_dir / "driftcheck" / "results.json", task)
    result = {
        "method": name,
        "seed": seed,
        "poison_ratio": tcfg.poison_ratio,  # this row's own (a `@poison_ratio=` override); the drift reference
        "task": {k: v for k, v in task.items() if k != "predictions"},
        # From train_summary.json when the training was finished earlier (never recomputed as zero).
        "mean_step_seconds": summary["mean_step_seconds"],
        "step_times_process": summary.get("step_times_process"),  # which process timed them (see compare_table)
        "train_loss": summary["train_loss"],
        "n_examples": summary["n_examples"],
        "n_unprotected_layers": summary.get("n_unprotected_layers"),
        "safe_lora": {"projected": info.get("projected", [])} if info else None,
        "driftcheck": str(mdir / "driftcheck" / "results.json"),
        "refusal_rate": dc.refusal_rate,
        "over_refusal_rate": dc.over_refusal_rate,
        "harmful_compliance_rate": dc.harmful_compliance_rate,
        **({peer: peer_info} if peer else {}),  # what the peer applied (layers, lambda / k and alpha)
    }
    atomic_write_json(mdir / "result.json", result)
    return result


from ..report.compare_table import aggregate, format_table  # noqa: E402  (tables live in the report package)
