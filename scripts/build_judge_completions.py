"""Generate the unlabelled completions of the judge set (docs/judge.md): several local models on DriftCheck prompts.

Each `--model` spec is `NAME` or `NAME+ADAPTER` (a PEFT adapter folder on top of the model). Every model answers its
own seeded, stratified sample of `driftcheck_v1` prompts (half unsafe over all categories, half safe with the
look-alikes), so the set covers many prompts and many answer styles. Output: one JSONL row per completion with the
model, prompt id, label, category, prompt and response; appended per model, so a killed run resumes.

    python scripts/build_judge_completions.py --out data/judge/completions_raw.jsonl \
        --model smollm2-135m-instruct --model ~/.cache/alignguard/aligned/<key> --n 160 --max_new_tokens 48
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sample_prompts(records, n: int, seed: int, exclude: set[str]):
    """n prompts: n/2 unsafe round-robin over categories, n/2 safe (half look-alikes), none of `exclude`."""
    rng = random.Random(seed)
    pools: dict[tuple[str, str], list] = {}
    for r in records:
        if r.id not in exclude:
            pools.setdefault((r.label, r.category), []).append(r)
    for pool in pools.values():
        rng.shuffle(pool)
    out = []
    unsafe_cats = sorted(c for (lab, c) in pools if lab == "unsafe")
    while sum(r.label == "unsafe" for r in out) < n // 2 and any(pools[("unsafe", c)] for c in unsafe_cats):
        for c in unsafe_cats:
            if pools[("unsafe", c)] and sum(r.label == "unsafe" for r in out) < n // 2:
                out.append(pools[("unsafe", c)].pop())
    look = pools.get(("safe", "benign_lookalike"), [])
    other = [r for (lab, c), p in pools.items() if lab == "safe" and c != "benign_lookalike" for r in p]
    rng.shuffle(other)
    n_safe = n - len(out)
    out += look[: n_safe // 2] + other[: n_safe - min(len(look), n_safe // 2)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="Output JSONL (appended; models already in it are skipped).")
    ap.add_argument("--model", action="append", required=True, help="NAME or NAME+ADAPTER; repeat.")
    ap.add_argument("--n", type=int, default=160, help="Prompts per model.")
    ap.add_argument("--max_new_tokens", type=int, default=48, help="Tokens per completion.")
    ap.add_argument("--batch_size", type=int, default=16, help="Generation batch size.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the prompt samples (model i uses seed + i).")
    ap.add_argument(
        "--system_prompt",
        default=None,
        help="System turn for every prompt (to draw other answer styles: lectures, partial refusals, disclaimers).",
    )
    ap.add_argument("--system_tag", default="", help="Short name of the system prompt, appended to the model key.")
    args = ap.parse_args()

    from alignguard.driftcheck.generate import GenerationSettings, generate_responses
    from alignguard.driftcheck.prompts import bundled_prompts
    from alignguard.driftcheck.run import load_adapter
    from alignguard.models import load_model_and_tokenizer

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {json.loads(line)["model"] for line in out.read_text().splitlines() if line.strip()}
    records = bundled_prompts("full")
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, system_prompt=args.system_prompt
    )
    for i, model_spec in enumerate(args.model):
        spec = f"{model_spec} [system:{args.system_tag}]" if args.system_prompt else model_spec
        if spec in done:
            print(f"[judge-completions] {spec}: already in {out}; skipped")
            continue
        name, _, adapter = model_spec.partition("+")
        model, tok, _ = load_model_and_tokenizer(os.path.expanduser(name))
        if adapter:
            model = load_adapter(model, os.path.expanduser(adapter))
        sample = sample_prompts(records, args.n, args.seed + i, exclude=set())
        responses = generate_responses(model, tok, [r.prompt for r in sample], settings, progress=True)
        with out.open("a", encoding="utf-8") as f:
            for r, resp in zip(sample, responses):
                row = {"model": spec, "prompt_id": r.id, "label": r.label, "category": r.category}
                f.write(json.dumps({**row, "prompt": r.prompt, "response": resp}, ensure_ascii=False) + "\n")
        print(f"[judge-completions] {spec}: {len(sample)} completions")
        del model


if __name__ == "__main__":
    main()
