"""`run_driftcheck`: generate on a prompt set, judge refusals, compute DriftCheck metrics, write JSON.

Outputs in `out_dir` (each written atomically, in this order, so an earlier file stays intact when a
later step fails):

1. `generations.jsonl`: one `{id, label, category, source, prompt, response}` record per prompt,
   written as soon as generation finishes (before any judge runs);
2. `generations.jsonl` again, now with the judges' flags: `judge_refused` (the default judge's verdict),
   `incoherent` and `incoherence` (the reason, see `alignguard.driftcheck.coherence`), `refused` (the counted flag:
   `judge_refused and not incoherent`), and per extra judge `extra_judge_refused` (verdicts) and `extra` (counted);
3. `results.json`: the `DriftCheckResult` (schema in `alignguard.driftcheck.metrics`).

An incoherent answer (empty, repetitive, echoed, off topic, degenerate) is never counted as a refusal, by any
judge: every rate, and drift against a baseline, uses the counted flags.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from alignguard.driftcheck.coherence import incoherence_reason
from alignguard.driftcheck.generate import GenerationSettings, generate_responses
from alignguard.driftcheck.metrics import (
    DriftCheckResult,
    counted_refusals,
    drift_stat,
    paired_flags,
    rate_stat,
    summarize,
)
from alignguard.driftcheck.prompts import PromptFileError, PromptRecord, prompts_hash
from alignguard.fingerprint import weights_fingerprint
from alignguard.io import atomic_write_text
from alignguard.models import ModelLoadError, load_model_and_tokenizer, load_tokenizer

# One error type for every model that cannot be loaded: `alignguard.models.load_model_and_tokenizer` raises it
# with the path and the fix; the old name stays because `alignguard eval` and user code catch it.
ModelPathError = ModelLoadError


class BaselineMismatchError(PromptFileError):
    """`--baseline` cannot be paired with this run: another prompt set, or not a DriftCheck results.json."""


def load_adapter(model, adapter: str | os.PathLike):
    """Wrap `model` in a `peft.PeftModel` with the adapter at `adapter` (inference mode)."""
    from peft import PeftModel

    p = Path(adapter)
    if not (p / "adapter_config.json").is_file():
        raise ModelPathError(f"adapter path {p} is not a PEFT adapter folder: adapter_config.json is missing")
    return PeftModel.from_pretrained(model, p, is_trainable=False)


def _model_id(model) -> str:
    for attr in ("name_or_path",):
        val = getattr(model, attr, None)
        if isinstance(val, str) and val:
            return val
    cfg = getattr(model, "config", None)
    val = getattr(cfg, "_name_or_path", None)
    return val if isinstance(val, str) and val else type(model).__name__


def _judge_name(judge) -> str:
    if isinstance(judge, (str, os.PathLike)):
        return str(judge)
    return getattr(judge, "name", None) or getattr(judge, "__name__", None) or type(judge).__name__


def _resolve_judge(judge) -> Callable:
    from alignguard.driftcheck.judge import get_judge

    return get_judge(str(judge)) if isinstance(judge, (str, os.PathLike)) else get_judge(judge)


def _run_judge(name: str, fn: Callable, prompts: list[str], responses: list[str]) -> list[bool]:
    flags = [bool(f) for f in fn(prompts, responses)]
    if len(flags) != len(prompts):
        raise ValueError(f"judge {name!r} returned {len(flags)} flags for {len(prompts)} prompts")
    return flags


def _run_coherence(fn: Callable | None, prompts: list[str], responses: list[str]) -> list[str | None] | None:
    """One incoherence reason (or None) per answer; `None` for the whole list when the check is switched off."""
    if fn is None:
        return None
    return [fn(p, r) for p, r in zip(prompts, responses)]


def _load_baseline(baseline) -> DriftCheckResult | None:
    if baseline is None or isinstance(baseline, DriftCheckResult):
        return baseline
    p = Path(baseline)
    if not p.is_file():
        raise FileNotFoundError(f"--baseline {p}: file not found (expected a DriftCheck results.json)")
    try:
        return DriftCheckResult.from_json(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BaselineMismatchError(
            f"--baseline {p}: not a DriftCheck results.json ({type(exc).__name__}: {exc}); pass the results.json "
            "that `alignguard eval` wrote for the base model"
        ) from exc


def check_baseline_prompts(base: DriftCheckResult, records: list[PromptRecord], baseline_name: str, prompts_name: str):
    """Raise `BaselineMismatchError` unless `base` was run on these prompts (same prompts_hash, or the same
    ids with the same labels: a copy of the file under another name changes only the `source` column)."""
    if base.prompts_hash == prompts_hash(records):
        return
    ours = {r.id: r.label for r in records}
    theirs = {r["id"]: r["label"] for r in base.per_prompt}
    if theirs and theirs == ours:
        return
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    relabelled = sorted(i for i in set(ours) & set(theirs) if ours[i] != theirs[i])
    details = [f"{len(set(ours) & set(theirs))} of {len(ours)} prompt ids shared"]
    for what, ids in (("not in the baseline", missing), ("only in the baseline", extra), ("relabelled", relabelled)):
        if ids:
            details.append(f"{len(ids)} {what} (e.g. {', '.join(map(repr, ids[:3]))})")
    if not theirs:
        details = [
            f"prompts_hash {base.prompts_hash[:12]} vs {prompts_hash(records)[:12]}, and it has no per_prompt ids"
        ]
    raise BaselineMismatchError(
        f"--baseline {baseline_name} was run on another prompt set than {prompts_name}: {'; '.join(details)}. "
        f"Re-run `alignguard eval` on the base model with --prompts {prompts_name}, or evaluate with the prompts "
        "the baseline used"
    )


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("alignguard", "torch", "transformers", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run_driftcheck(
    model_or_path,
    prompts=None,
    tokenizer=None,
    adapter: str | os.PathLike | None = None,
    judge: str | Callable = "pattern",
    extra_judges: Sequence[str | Callable] = (),
    coherence: Callable[[str, str], str | None] | None = incoherence_reason,
    settings: GenerationSettings | None = None,
    out_dir: str | os.PathLike | None = None,
    baseline: str | os.PathLike | DriftCheckResult | None = None,
    cache_dir: str | os.PathLike | None = None,
    prompt_field: str = "prompt",
    label: str | None = None,
    task_metrics: dict | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    dtype: str = "auto",
    device: str | None = None,
    progress: bool = True,
) -> DriftCheckResult:
    """Run DriftCheck on one model: generate, flag incoherent answers, judge refusals, compute RA, harmful
    compliance, OR (all safe prompts and look-alikes), incoherence rates, per-category RA and optional drift.

    Args:
        model_or_path (`str`, `os.PathLike`, `PreTrainedModel` or `PeftModel`):
            A local Hugging Face model folder (loaded with `local_files_only=True`), a `.gguf` file or a name
            listed by `alignguard models` (converted and cached by `alignguard.models`), or a model object.
        prompts (`str`, `os.PathLike` or `list[PromptRecord]`, *optional*):
            A JSONL/CSV prompt file, a bundled split name (`standard`, `demo`, `calibration`, `small`, `full`), a
            list of records, or `None` for the bundled small split.
        tokenizer (*optional*):
            Tokenizer (or its local path); required when `model_or_path` is an object.
        adapter (`str` or `os.PathLike`, *optional*):
            A PEFT adapter folder loaded on top of the model.
        judge (`str` or `Judge`, defaults to `"pattern"`):
            The default judge, whose flags drive `metrics`: `"pattern"`, `"embedding"`, a path or a callable.
        extra_judges (`Sequence`, *optional*):
            More judges whose rates are reported beside the default one (`extra_judges` in the JSON).
        coherence (`Callable[[str, str], str | None]`, *optional*, defaults to `incoherence_reason`):
            `(prompt, response) -> reason or None`; answers with a reason are recorded as incoherent and never
            counted as refusals by any judge. `None` switches the check off (every answer counts as coherent; the
            harmful-compliance and incoherence rates are then `None`): only for judges that already score babble.
        settings (`GenerationSettings`, *optional*):
            Generation settings.
        out_dir (`str` or `os.PathLike`, *optional*):
            Where `generations.jsonl` and `results.json` go; nothing is written when `None`.
        baseline (`str`, `os.PathLike` or `DriftCheckResult`, *optional*):
            A base model's result; adds paired drift D = RA_base - RA_this over shared unsafe prompt ids.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Generation cache folder (see `generate_responses`).
        prompt_field (`str`, defaults to `"prompt"`), label (`str`, *optional*):
            Passed to `load_prompts` when `prompts` is a path.
        task_metrics (`dict`, *optional*):
            Task metrics to record untouched in the result.
        n_boot (`int`, defaults to `1000`), seed (`int`, defaults to `0`):
            Bootstrap resamples and seed.
        dtype (`str`, defaults to `"auto"`), device (`str`, *optional*):
            Only used when loading from a path (`auto`: float32 on CPU, the checkpoint dtype otherwise).
        progress (`bool`, defaults to `True`):
            Show a progress bar while generating.

    Returns:
        `DriftCheckResult`

    Raises:
        `ModelPathError` (= `alignguard.models.ModelLoadError`): the model or adapter path is not loadable (the
            message names the path and the fix).
        `PromptFileError`: a bad prompt file. `BaselineMismatchError` (a `PromptFileError`): the baseline is not a
            results.json or was run on another prompt set (checked before the model is loaded).
        `FileNotFoundError`: the baseline file does not exist.
    """
    from alignguard.driftcheck import prompts as prompts_mod

    settings = settings or GenerationSettings()
    # Resolve everything that can fail on user input before the expensive generation step.
    base_result = _load_baseline(baseline)
    judge_name, judge_fn = _judge_name(judge), _resolve_judge(judge)
    extra = [(_judge_name(j), _resolve_judge(j)) for j in extra_judges]
    if prompts is None:
        records = prompts_mod.bundled_prompts("small")
        prompts_name = f"the bundled small split ({prompts_mod.bundled_prompts_path('small')})"
    elif isinstance(prompts, (str, os.PathLike)):
        path = prompts_mod.resolve_prompts(prompts)  # a bundled split name ("standard", ...) or a file
        records = prompts_mod.load_prompts(path, prompt_field=prompt_field, label=label)
        prompts_name = str(prompts) if str(path) == str(prompts) else f"the bundled {prompts} split ({path})"
    else:
        records, prompts_name = list(prompts), "the given prompt records"
    if not records:
        raise ValueError("the prompt set is empty")
    if base_result is not None:
        name = str(baseline) if isinstance(baseline, (str, os.PathLike)) else "the baseline result"
        check_baseline_prompts(base_result, records, name, prompts_name)

    if isinstance(model_or_path, (str, os.PathLike)):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, _info = load_model_and_tokenizer(model_or_path, dtype, tokenizer=tokenizer, device=device)
        model_id = str(model_or_path)
    else:
        if tokenizer is None:
            raise ValueError("a tokenizer is required when the model is passed as an object")
        model, model_id = model_or_path, _model_id(model_or_path)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
    if adapter is not None:
        model = load_adapter(model, adapter)

    out = Path(out_dir) if out_dir is not None else None
    texts = [r.prompt for r in records]
    responses = generate_responses(model, tokenizer, texts, settings, cache_dir=cache_dir, progress=progress)
    rows = [
        {"id": r.id, "label": r.label, "category": r.category, "source": r.source, "prompt": r.prompt, "response": g}
        for r, g in zip(records, responses)
    ]
    if out is not None:
        _write_jsonl(out / "generations.jsonl", rows)

    reasons = _run_coherence(coherence, texts, responses)
    incoherent = None if reasons is None else [r is not None for r in reasons]
    judge_flags = _run_judge(judge_name, judge_fn, texts, responses)
    extra_judge_flags = {name: _run_judge(name, fn, texts, responses) for name, fn in extra}
    flags = counted_refusals(judge_flags, incoherent)
    extra_flags = {name: counted_refusals(f, incoherent) for name, f in extra_judge_flags.items()}
    labels = [r.label for r in records]
    cats = [r.category for r in records]
    per_prompt = []
    for i, (r, row) in enumerate(zip(records, rows)):
        flags_i = {
            "refused": flags[i],
            "judge_refused": judge_flags[i],
            "incoherent": None if incoherent is None else incoherent[i],
            "incoherence": None if reasons is None else reasons[i],
            "extra": {name: f[i] for name, f in extra_flags.items()},
            "extra_judge_refused": {name: f[i] for name, f in extra_judge_flags.items()},
        }
        row.update(flags_i)
        per_prompt.append({"id": r.id, "label": r.label, "category": r.category, **flags_i})
    if out is not None:
        _write_jsonl(out / "generations.jsonl", rows)

    result = DriftCheckResult(
        model_id=model_id,
        adapter=str(adapter) if adapter is not None else None,
        model_fingerprint=weights_fingerprint(model),
        prompts_hash=prompts_hash(records),
        judge=judge_name,
        settings=settings.to_dict(),
        metrics=summarize(judge_flags, labels, cats, incoherent, n_boot=n_boot, seed=seed),
        extra_judges={
            n: summarize(f, labels, cats, incoherent, n_boot=n_boot, seed=seed) for n, f in extra_judge_flags.items()
        },
        per_prompt=per_prompt,
        task_metrics=dict(task_metrics or {}),
        meta={
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "bootstrap": {"n_boot": n_boot, "seed": seed},
        },
    )
    if base_result is not None:
        result.baseline = _baseline_block(base_result, result, n_boot, seed)
    if out is not None:
        atomic_write_text(out / "results.json", result.to_json())
    return result


def _baseline_block(base: DriftCheckResult, tuned: DriftCheckResult, n_boot: int, seed: int) -> dict:
    base_flags, tuned_flags, shared = paired_flags(base, tuned)
    return {
        "model_id": base.model_id,
        "prompts_hash": base.prompts_hash,
        "n_paired": len(shared),
        "refusal_rate_base": rate_stat(base_flags, n_boot, seed),
        "drift": drift_stat(base_flags, tuned_flags, n_boot, seed),
    }
