"""`run_driftcheck`: generate on a prompt set, judge refusals, compute DriftCheck metrics, write JSON.

Outputs in `out_dir` (each written atomically, in this order, so an earlier file stays intact when a
later step fails):

1. `generations.jsonl`: one `{id, label, category, source, prompt, response}` record per prompt,
   written as soon as generation finishes (before any judge runs);
2. `generations.jsonl` again, now with `refused` and `extra` (per extra judge) flags;
3. `results.json`: the `DriftCheckResult` (schema in `alignguard.driftcheck.metrics`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from alignguard.driftcheck.generate import GenerationSettings, generate_responses
from alignguard.driftcheck.metrics import DriftCheckResult, drift_stat, paired_flags, rate_stat, summarize
from alignguard.fingerprint import weights_fingerprint
from alignguard.io import atomic_write_text


class ModelPathError(ValueError):
    """A `--model` / `--adapter` path that is not a loadable local model; the message says what is missing."""


def check_model_dir(path: str | os.PathLike, need_tokenizer: bool = True) -> Path:
    """Check that `path` is a local Hugging Face causal-LM folder; raise `ModelPathError` naming what is missing."""
    from alignguard.models import ModelLoadError, check_model_folder

    try:
        return check_model_folder(path, need_tokenizer=need_tokenizer)
    except ModelLoadError as exc:
        raise ModelPathError(str(exc)) from None


def _resolve_dtype(dtype: str | torch.dtype, device: str) -> Any:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # bf16/fp16 matmuls are slow (or unsupported) on CPU; keep the checkpoint dtype only on an accelerator.
        return torch.float32 if device == "cpu" else "auto"
    try:
        return getattr(torch, dtype)
    except AttributeError as exc:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}") from exc


def load_model_and_tokenizer(path, tokenizer=None, dtype: str | torch.dtype = "auto", device: str | None = None):
    """Load a local causal LM (and its tokenizer unless given) with `local_files_only=True`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    p = Path(path).expanduser()
    if not p.is_dir() and (not p.exists() or p.suffix.lower() == ".gguf"):
        return _load_named_model(path, tokenizer, dtype, device)
    p = check_model_dir(p, need_tokenizer=tokenizer is None)
    model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=_resolve_dtype(dtype, device))
    model.to(device)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load_tokenizer(tokenizer)
    return model, tokenizer


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_named_model(spec, tokenizer, dtype, device):
    # A .gguf file or a name from `alignguard models` (registry or tiny-*): alignguard.models converts
    # GGUF once into a cached HF folder. Anything else that does not exist gets our clear path error.
    try:
        from alignguard.models import ModelLoadError
        from alignguard.models import load_model_and_tokenizer as load_any
    except ImportError:  # pragma: no cover - the models module is optional here
        raise ModelPathError(f"model path {spec} does not exist (give a local model folder)") from None
    resolved = _resolve_dtype(dtype, device)
    try:
        model, tok, _info = load_any(spec, dtype=resolved if isinstance(resolved, torch.dtype) else torch.float32)
    except ModelLoadError as exc:
        raise ModelPathError(f"model path {spec} does not exist and is not a model name or .gguf file: {exc}") from exc
    model.to(device)
    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    return model, tok


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


def _load_baseline(baseline) -> DriftCheckResult | None:
    if baseline is None or isinstance(baseline, DriftCheckResult):
        return baseline
    p = Path(baseline)
    if not p.is_file():
        raise FileNotFoundError(f"--baseline {p}: file not found (expected a DriftCheck results.json)")
    try:
        return DriftCheckResult.from_json(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, KeyError, ValueError) as exc:
        raise ValueError(f"--baseline {p}: not a DriftCheck results.json: {exc}") from exc


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
    """Run DriftCheck on one model: generate, judge refusals, compute RA/OR/per-category, optional drift.

    Args:
        model_or_path (`str`, `os.PathLike`, `PreTrainedModel` or `PeftModel`):
            A local Hugging Face model folder (loaded with `local_files_only=True`), a `.gguf` file or a name
            listed by `alignguard models` (converted and cached by `alignguard.models`), or a model object.
        prompts (`str`, `os.PathLike` or `list[PromptRecord]`, *optional*):
            A JSONL/CSV prompt file, a list of records, or `None` for the bundled small split.
        tokenizer (*optional*):
            Tokenizer (or its local path); required when `model_or_path` is an object.
        adapter (`str` or `os.PathLike`, *optional*):
            A PEFT adapter folder loaded on top of the model.
        judge (`str` or `Judge`, defaults to `"pattern"`):
            The default judge, whose flags drive `metrics`: `"pattern"`, `"embedding"`, a path or a callable.
        extra_judges (`Sequence`, *optional*):
            More judges whose rates are reported beside the default one (`extra_judges` in the JSON).
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
        `ModelPathError`: the model or adapter path is not loadable (the message names what is missing).
        `FileNotFoundError` / `ValueError`: bad prompt file or baseline.
    """
    from alignguard.driftcheck import prompts as prompts_mod

    settings = settings or GenerationSettings()
    # Resolve everything that can fail on user input before the expensive generation step.
    base_result = _load_baseline(baseline)
    judge_name, judge_fn = _judge_name(judge), _resolve_judge(judge)
    extra = [(_judge_name(j), _resolve_judge(j)) for j in extra_judges]
    if prompts is None:
        records = prompts_mod.bundled_prompts("small")
    elif isinstance(prompts, (str, os.PathLike)):
        records = prompts_mod.load_prompts(prompts, prompt_field=prompt_field, label=label)
    else:
        records = list(prompts)
    if not records:
        raise ValueError("the prompt set is empty")

    if isinstance(model_or_path, (str, os.PathLike)):
        model, tokenizer = load_model_and_tokenizer(model_or_path, tokenizer, dtype=dtype, device=device)
        model_id = str(model_or_path)
    else:
        if tokenizer is None:
            raise ValueError("a tokenizer is required when the model is passed as an object")
        model, model_id = model_or_path, _model_id(model_or_path)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = _load_tokenizer(tokenizer)
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

    flags = _run_judge(judge_name, judge_fn, texts, responses)
    extra_flags = {name: _run_judge(name, fn, texts, responses) for name, fn in extra}
    labels = [r.label for r in records]
    cats = [r.category for r in records]
    per_prompt = []
    for i, (r, row) in enumerate(zip(records, rows)):
        extra = {name: f[i] for name, f in extra_flags.items()}
        row.update(refused=flags[i], extra=extra)
        per_prompt.append({"id": r.id, "label": r.label, "category": r.category, "refused": flags[i], "extra": extra})
    if out is not None:
        _write_jsonl(out / "generations.jsonl", rows)

    result = DriftCheckResult(
        model_id=model_id,
        adapter=str(adapter) if adapter is not None else None,
        model_fingerprint=weights_fingerprint(model),
        prompts_hash=prompts_mod.prompts_hash(records),
        judge=judge_name,
        settings=settings.to_dict(),
        metrics=summarize(flags, labels, cats, n_boot=n_boot, seed=seed),
        extra_judges={n: summarize(f, labels, cats, n_boot=n_boot, seed=seed) for n, f in extra_flags.items()},
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
