"""Aggregate a compare run into one results JSON, and the comparison table shown by results.md and report.md.

The table is built once (`comparison_tables`: rows of values) and formatted by one function (`format_cell`), so
results.md, the terminal and report.md always show the same numbers with the same rounding.

results.json schema (version "compare-1"):

    {"schema_version": "compare-1", "model": str, "seeds": [int], "methods": [str], "prompts_hash": str,
     "judge": str,                         # the default DriftCheck judge (absent in older files)
     "base": {<the DriftCheck rates of Row>, "task_accuracy": float, "task_refused_rate": float | null,
              "refusal_rate_by_judge": {judge: Stat}},
     "rows": {method: {"seeds": {seed: Row}, "mean": Summary}},
     "config": {...}}
    Row = {"task_accuracy", "task_refused_rate" (share of task problems refused; null before it was counted),
           "refusal_rate": Stat, "over_refusal_rate": Stat,
           "harmful_compliance_rate": Stat, "lookalike_over_refusal_rate": Stat,
           "incoherence_rate_unsafe": Stat, "incoherence_rate_safe": Stat,   (null in older files / when unmeasured)
           "drift": Stat, "drift_reduction": Stat | null, "step_time_ratio": float | null,
           "per_category": {cat: float},
           "refusal_rate_by_judge": {judge: Stat}}   (the extra judges' refusal rates on unsafe prompts)
    Summary = {"task_accuracy", "task_refused_rate", "refusal_rate", "over_refusal_rate", "harmful_compliance_rate",
               "lookalike_over_refusal_rate", "incoherence_rate_unsafe", "incoherence_rate_safe", "drift",
               "drift_reduction", "step_time_ratio": {"mean", "sd"} each}
    Stat = {"value", "ci_low", "ci_high", "n"}   (95% bootstrap over prompts; paired for drift / reduction)

Every rate counts an incoherent answer (empty, repetitive, echoed, off topic, degenerate) as neither a refusal nor
compliance (`alignguard.driftcheck.metrics`), so refusal + harmful compliance + incoherent = 100% of unsafe prompts.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from ..driftcheck.metrics import DriftCheckResult, compare_drift, drift_stat, paired_flags

SCHEMA_VERSION = "compare-1"


def _load_dc(path: Path) -> DriftCheckResult:
    return DriftCheckResult.from_dict(json.loads(Path(path).read_text()))


def _stat(s):
    return None if s is None else s.to_dict()


def _by_judge(dc: DriftCheckResult) -> dict:
    return {name: _stat(block.get("refusal_rate")) for name, block in dc.extra_judges.items()}


# The rates every row (and the base) copies from its DriftCheck results.json, default judge.
_DC_RATES = (
    "refusal_rate",
    "over_refusal_rate",
    "harmful_compliance_rate",
    "lookalike_over_refusal_rate",
    "incoherence_rate_unsafe",
    "incoherence_rate_safe",
)


def _dc_rates(dc: DriftCheckResult) -> dict:
    return {key: _stat(dc.metrics.get(key)) for key in _DC_RATES}


def task_refused_rate(task: dict) -> float | None:
    """Share of the task's problems answered with a refusal (`score_task`'s n_refused / n); None for results
    scored before n_refused was counted."""
    n, refused = task.get("n"), task.get("n_refused")
    return refused / n if n and refused is not None else None


def aggregate(cfg) -> dict:
    """Read every finished method of a compare run folder and build the results dict (schema above)."""
    out = Path(cfg.out)
    base = _load_dc(out / "base" / "driftcheck" / "results.json")
    base_task = json.loads((out / "base" / "task.json").read_text())
    from ..recipes.methods import reference_method  # here, not at the top: the recipes import this module

    poison = {}  # each method's poison ratio, from its rows' result.json (None: not recorded)
    for name in cfg.methods:
        ratios = {
            json.loads(p.read_text()).get("poison_ratio")
            for p in (out / f"seed{s}" / name / "result.json" for s in cfg.seeds)
            if p.is_file()
        }
        poison[name] = ratios.pop() if len(ratios) == 1 else None
    rows: dict[str, dict] = {}
    for name in cfg.methods:
        reference = reference_method(name, poison)
        rows[name] = {"seeds": {}, "reference": reference}
        for seed in cfg.seeds:
            mdir = out / f"seed{seed}" / name
            if not (mdir / "result.json").is_file():
                continue
            res = json.loads((mdir / "result.json").read_text())
            dc = _load_dc(mdir / "driftcheck" / "results.json")
            bflags, mflags, _ = paired_flags(base, dc)
            row = {
                "task_accuracy": res["task"].get("accuracy"),
                "task_refused_rate": task_refused_rate(res["task"]),
                **_dc_rates(dc),
                "drift": _stat(drift_stat(bflags, mflags, seed=seed)),
                "drift_reduction": None,
                "step_seconds": res.get("mean_step_seconds"),
                "step_time_ratio": None,
                "step_time_same_process": None,
                "per_category": {k: v.value for k, v in dc.metrics.get("per_category_refusal_rate", {}).items()},
                "refusal_rate_by_judge": _by_judge(dc),
            }
            # Plain LoRA at this row's poison ratio: benign drift is compared with benign drift.
            plain_dir = out / f"seed{seed}" / reference if reference else None
            if plain_dir is not None and (plain_dir / "result.json").is_file():
                plain = _load_dc(plain_dir / "driftcheck" / "results.json")
                # Paired over the prompts all three results share (base, plain LoRA, this method).
                row["drift_reduction"] = _stat(compare_drift(base, plain, dc, seed=seed)["drift_reduction"])
                plain_res = json.loads((plain_dir / "result.json").read_text())
                plain_s = plain_res.get("mean_step_seconds")
                if plain_s and row["step_seconds"]:
                    row["step_time_ratio"] = row["step_seconds"] / plain_s
                    # Timed in one process or not (None: a result from before the process was recorded).
                    mine, theirs = res.get("step_times_process"), plain_res.get("step_times_process")
                    if "step_times_process" in res and "step_times_process" in plain_res:
                        row["step_time_same_process"] = mine is not None and mine == theirs
            rows[name]["seeds"][seed] = row
        rows[name]["mean"] = _summary(rows[name]["seeds"].values())
    return {
        "schema_version": SCHEMA_VERSION,
        "model": cfg.model,
        "seeds": list(cfg.seeds),
        "methods": list(cfg.methods),
        "prompts_hash": base.prompts_hash,
        "judge": base.judge,
        "base": {
            **_dc_rates(base),
            "task_accuracy": base_task.get("accuracy"),
            "task_refused_rate": task_refused_rate(base_task),
            "per_category": {k: v.value for k, v in base.metrics.get("per_category_refusal_rate", {}).items()},
            "refusal_rate_by_judge": _by_judge(base),
        },
        "rows": rows,
        "config": {k: v for k, v in vars(cfg).items()},
    }


def _value(x):
    return x.get("value") if isinstance(x, dict) else x


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and x == x


def _mean_sd(vals) -> tuple[float | None, float | None]:
    """Mean and sample sd of the finite values (sd None for fewer than two)."""
    vals = [v for v in vals if _ok(v)]
    mean = statistics.fmean(vals) if vals else None
    return mean, (statistics.stdev(vals) if len(vals) > 1 else None)


def _summary(seed_rows) -> dict:
    seed_rows = list(seed_rows)
    out = {}
    for key in ("task_accuracy", "task_refused_rate", *_DC_RATES, "drift", "drift_reduction", "step_time_ratio"):
        vals = [_value(r.get(key)) for r in seed_rows if _ok(_value(r.get(key)))]
        mean, sd = _mean_sd(vals)
        out[key] = {"mean": mean, "sd": sd, "n_seeds": len(vals)}
    return out


# ---------------------------------------------------------------- the comparison table


@dataclass(frozen=True)
class Column:
    """One column: `key` names the field of a results.json row; `kind` says how its cells are written."""

    key: str
    header: str
    kind: str = "pct"  # "pct": a fraction written as a percentage (points for drift); "ratio": written as 1.30×
    ci_header: bool = True  # say "[95% CI]" in the header of tables with intervals (not for values without one)


@dataclass(frozen=True)
class Cell:
    """One value of the table: a point with its 95% interval, or a mean with its sd over seeds, or fixed text."""

    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    sd: float | None = None
    text: str | None = None
    mark: str = ""  # a footnote mark after the value (see `table_note`)

    @classmethod
    def of(cls, stat) -> Cell:
        """A cell from a Stat dict, a plain number or None."""
        if isinstance(stat, dict):
            return cls(stat.get("value"), stat.get("ci_low"), stat.get("ci_high"))
        return cls(stat)


def format_cell(cell: Cell, kind: str = "pct") -> str:
    """The one place where table numbers are rounded: '52.0 [47.1, 56.9]', '52.0 ± 1.3', '1.30×', 'n/a'."""
    if cell.text is not None:
        return cell.text
    if not _ok(cell.value):
        return "n/a"
    scale, digits, unit = (1.0, 2, "×") if kind == "ratio" else (100.0, 1, "")
    text = f"{cell.value * scale:.{digits}f}"
    if _ok(cell.sd):
        text += f" ± {cell.sd * scale:.{digits}f}"
    elif _ok(cell.ci_low) and _ok(cell.ci_high):
        text += f" [{cell.ci_low * scale:.{digits}f}, {cell.ci_high * scale:.{digits}f}]"
    return text + unit + cell.mark


@dataclass
class ComparisonTable:
    """Rows of cells under `columns`; `label` heads the first column, `extra` the optional second (seeds)."""

    title: str
    columns: list[Column]
    rows: list[tuple[str, str | None, list[Cell]]]
    extra: str | None = None
    with_ci: bool = True

    def header(self) -> list[str]:
        ci = " [95% CI]" if self.with_ci else ""
        cols = [c.header + (ci if c.ci_header else "") for c in self.columns]
        return ["method"] + ([self.extra] if self.extra else []) + cols

    def body(self) -> list[list[str]]:
        return [
            [label]
            + ([extra or "-"] if self.extra else [])
            + [format_cell(x, c.kind) for x, c in zip(cells, self.columns)]
            for label, extra, cells in self.rows
        ]


_COLUMNS = (
    Column("task_accuracy", "task metric %", ci_header=False),
    Column("task_refused_rate", "task refused %", ci_header=False),
    Column("refusal_rate", "refusal %"),
    Column("over_refusal_rate", "over-refusal %"),
    Column("lookalike_over_refusal_rate", "look-alike over-refusal %"),
    Column("harmful_compliance_rate", "harmful compliance %"),
    Column("incoherence_rate_unsafe", "incoherent % (unsafe)"),
    Column("drift", "drift pts"),
    Column("drift_reduction", "drift reduction %"),
    Column("step_time_ratio", "step time vs plain LoRA", "ratio", ci_header=False),
)
_BASE_LABEL = "aligned model (no fine-tune)"


def natural_key(text) -> list:
    """Sort key that orders "layers.2" before "layers.10" (and seed 2 before seed 10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


def seed_rows(row: dict) -> list[tuple[str, dict]]:
    """(seed, row) of one method's finished seeds, in seed order (keys are ints in memory, strings from JSON)."""
    return sorted(((str(s), r) for s, r in (row.get("seeds") or {}).items() if r), key=lambda t: natural_key(t[0]))


def _get(row: dict, key: str):
    if key.startswith("judge:"):
        return (row.get("refusal_rate_by_judge") or {}).get(key.removeprefix("judge:"))
    return row.get(key)


CROSS_PROCESS_MARK = "*"


def _mark(seed_rows_: list[dict], column: Column) -> str:
    """`CROSS_PROCESS_MARK` on a step-time ratio of which some seed was timed in another process than its plain-LoRA
    reference (steps of separate `compare` runs, or of a resumed training: the machine's load differed)."""
    if column.key != "step_time_ratio":
        return ""
    crossed = any(r.get("step_time_same_process") is False and _ok(r.get("step_time_ratio")) for r in seed_rows_)
    return CROSS_PROCESS_MARK if crossed else ""


def _seed_cell(row: dict, column: Column) -> Cell:
    return replace(Cell.of(_get(row, column.key)), mark=_mark([row], column))


def comparison_tables(results: dict) -> list[ComparisonTable]:
    """The comparison table of a compare-1 results dict, as values.

    One seed per method: one table, each cell with its 95% bootstrap interval over prompts. Several seeds: the
    headline table holds mean ± sd over seeds (the seed-to-seed spread is the honest error bar of a training
    method), followed by a per-seed table with each seed's intervals. The extra judges' refusal rates on unsafe
    prompts get one column each, after the default judge's columns (refusal, over-refusal on all safe prompts and
    on benign look-alikes, harmful compliance and incoherence on unsafe prompts, drift).
    """
    rows = {n: r for n, r in (results.get("rows") or {}).items() if seed_rows(r)}
    base = results.get("base") or {}
    judges = list(base.get("refusal_rate_by_judge") or {})
    for row in rows.values():
        for _, r in seed_rows(row):
            judges += [j for j in r.get("refusal_rate_by_judge") or {} if j not in judges]
    default = results.get("judge")  # named in the header, so the judges' refusal columns read side by side
    columns = [Column(c.key, f"refusal % ({default})") if default and c.key == "refusal_rate" else c for c in _COLUMNS]
    columns += [Column(f"judge:{j}", f"refusal % ({j})", ci_header=False) for j in judges]
    reference = {"drift": Cell(text="0 (reference)")}
    base_cells = [reference.get(c.key) or Cell.of(_get(base, c.key)) for c in columns]
    multi = any(len(seed_rows(r)) > 1 for r in rows.values())
    if not multi:
        body = [(_BASE_LABEL, None, base_cells)]
        body += [(name, None, [_seed_cell(seed_rows(row)[0][1], c) for c in columns]) for name, row in rows.items()]
        return [ComparisonTable("Results", columns, body)]
    headline = [(_BASE_LABEL, "-", base_cells)]
    for name, row in rows.items():
        srows = [r for _, r in seed_rows(row)]
        stats = [_mean_sd([_value(_get(r, c.key)) for r in srows]) for c in columns]
        cells = [Cell(mean, sd=sd, mark=_mark(srows, c)) for (mean, sd), c in zip(stats, columns)]
        headline.append((name, str(len(srows)), cells))
    per_seed = [
        (name, seed, [_seed_cell(r, c) for c in columns]) for name, row in rows.items() for seed, r in seed_rows(row)
    ]
    return [
        ComparisonTable("Results", columns, headline, extra="seeds", with_ci=False),
        ComparisonTable("Per seed", columns, per_seed, extra="seed"),
    ]


def table_note(results: dict, tables: list[ComparisonTable]) -> str:
    """What the cells mean (the same sentence under both outputs)."""
    seeds = results.get("seeds") or sorted({s for t in tables[1:] for _, s, _ in t.rows})
    note = (
        f"Model: {results.get('model', 'n/a')}. Seeds: {seeds}. Drift = refusal rate of the aligned model minus "
        "that of the fine-tuned one (positive = refusals lost). Drift reduction = 1 - drift / drift of plain "
        "LoRA at the same poison ratio (n/a when it did not drift or was not run). Incoherent answers (empty, repetitive, echoed, off topic, "
        "degenerate) count as neither refusal nor compliance: on unsafe prompts refusal + harmful compliance + "
        "incoherent = 100%; over-refusal is on all safe prompts, look-alike over-refusal on the safe prompts that "
        "only sound unsafe."
    )
    if any(c.mark for t in tables for _, _, cells in t.rows for c in cells):
        note += (
            f" {CROSS_PROCESS_MARK} step-time ratio of steps timed in another process than plain LoRA's (separate "
            "`compare` runs, or a resumed training), so the machine's load may differ between the two; "
            "benchmarks/peer_steps.py times every method's Trainer in one process."
        )
    if len(tables) > 1:
        return note + " Cells are mean ± sd over seeds; the per-seed table gives 95% bootstrap CIs over prompts."
    return note + " Intervals: 95% bootstrap over prompts (paired for drift and drift reduction)."


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A Markdown table; `|` and backslashes inside cells are escaped."""

    def cell(text) -> str:
        return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in body])


def format_table(results: dict) -> str:
    """results.md: the comparison table(s) in Markdown, with the note that says what the cells mean."""
    tables = comparison_tables(results)
    parts = []
    for i, table in enumerate(tables):
        if i:
            parts.append(f"### {table.title}")
        parts.append(markdown_table(table.header(), table.body()))
    parts.append(table_note(results, tables))
    return "\n\n".join(parts) + "\n"


__all__ = [
    "SCHEMA_VERSION",
    "Cell",
    "Column",
    "ComparisonTable",
    "aggregate",
    "comparison_tables",
    "format_cell",
    "format_table",
    "markdown_table",
    "natural_key",
    "seed_rows",
    "table_note",
]
