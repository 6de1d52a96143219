"""Render `report.md` and a self-contained `report.html` (plus `plots/*.png`) from a run folder.

Reads JSON, YAML and safetensors only; never imports the trainer or any training code. The report is built once
as a list of blocks (heading, paragraph, table, image, code) and written twice, as Markdown and as HTML (the Jinja2
template `templates/report.html.j2`, autoescaped), so the two can never disagree and no Markdown parser is needed.
The HTML embeds every image as a base64 data URI with inline CSS, so it can be mailed or archived as a single file.
The comparison table comes from `compare_table.comparison_tables`, the same model results.md is written from.

Run folders: `alignguard compare` output (`results.json` schema "compare-1", `config.yaml`, `fisher/`,
`seed*/*/driftcheck/`) or `alignguard eval --out DIR` output (DriftCheck `results.json` schema "1.0"), optionally
with `scaling/scaling.json` (schema "scaling-1") and a Fisher folder (`fisher/` or the run folder itself).
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import re
import statistics
from pathlib import Path

import jinja2
import yaml

from ..io import atomic_write_text, package_versions
from . import plots
from .calibration import calibration_section
from .compare_table import Cell, comparison_tables, format_cell, markdown_table, natural_key, seed_rows, table_note
from .plots import pareto_front

# Above this size the Fisher file is read lazily, a few modules at a time: a 7B model's dense factors are
# tens of GB and the report only draws four spectra.
_EAGER_FISHER_BYTES = 1 << 30
_SPECTRUM_MODULES = 4
# Dense eigendecompositions beyond this d_out cost minutes on a laptop CPU; use the stored top eigenvalues.
_MAX_DENSE_EIG_DIM = 4096

Block = tuple


def _load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _v(x):
    return x.get("value") if isinstance(x, dict) else x


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and x == x


def _pct_ci(stat) -> str:
    """'52.0 [47.1, 56.9]' from a Stat dict (fractions) or '52.0' from a number; 'n/a' when missing."""
    return format_cell(Cell.of(stat))


def _vlh(stat) -> tuple:
    stat = stat if isinstance(stat, dict) else {"value": stat}
    return stat.get("value"), stat.get("ci_low"), stat.get("ci_high")


def _fmean(vals):
    vals = [v for v in vals if _ok(v)]
    return statistics.fmean(vals) if vals else None


def _mean_of(row: dict, key: str):
    return _fmean([_v(r.get(key)) for _, r in seed_rows(row)])


# ---------------------------------------------------------------- sections

_PARETO_NOTE = (
    "Pareto front (higher task metric and higher refusal rate are better; marked * in the plot): {}. "
    "One point per method row (mean over seeds); the aligned model (grey star) is the reference, not a contender."
)
_SPECTRUM_NOTE = (
    "Eigenvalues of each module's output-side Fisher factor divided by its trace (log axes); dots mark the chosen "
    "subspace size m."
)
_SCALING_NOTE = (
    "Fit L(D) = L0 + A·D^beta per method, D = {}. The claim under test: AlignGuard lowers the amplitude A at a "
    "similar exponent beta."
)


def _compare_results(res: dict) -> list[Block]:
    tables = comparison_tables(res)
    out: list[Block] = [("h", 2, "1. Results")]
    for k, table in enumerate(tables):
        if k:
            out.append(("h", 3, table.title))
        out.append(("table", table.header(), table.body()))
        if not k:
            out.append(("p", table_note(res, tables)))
    return out


def _compare_figures(res: dict, plot_dir: Path) -> list[Block]:
    rows = {n: r for n, r in res.get("rows", {}).items() if seed_rows(r)}
    out: list[Block] = [("h", 2, "2. Drift per method")]
    bars = {n: [(s, *_vlh(r.get("drift"))) for s, r in seed_rows(row)] for n, row in rows.items()}
    if any(_ok(v) for b in bars.values() for _, v, _, _ in b):
        out.append(_figure(plots.plot_drift(bars), plot_dir / "drift.png", "Drift per method with 95% CIs"))
    else:
        out.append(("p", "No drift values in this run."))

    out.append(("h", 2, "3. Task metric vs refusal rate"))
    points = [(n, _mean_of(r, "task_accuracy"), _mean_of(r, "refusal_rate")) for n, r in rows.items()]
    points = [p for p in points if _ok(p[1]) and _ok(p[2])]
    base = res.get("base") or {}
    if points:
        front = pareto_front(points)
        base_pt = (_v(base.get("task_accuracy")), _v(base.get("refusal_rate")))
        fig = plots.plot_pareto(points, base=base_pt if all(_ok(v) for v in base_pt) else None, front=front)
        out.append(_figure(fig, plot_dir / "pareto.png", "Task metric vs refusal rate with the Pareto front"))
        out.append(("p", _PARETO_NOTE.format(", ".join(front))))
        table = [[n, f"{100 * x:.1f}", f"{100 * y:.1f}", "yes" if n in front else "no"] for n, x, y in points]
        out.append(("table", ["method", "task metric %", "refusal %", "on Pareto front"], table))
    else:
        out.append(("p", "No method has both a task metric and a refusal rate; nothing to plot."))

    cat_rows = {}
    if base.get("per_category"):
        cat_rows["aligned model"] = base["per_category"]
    for n, row in rows.items():
        per_cat = [r.get("per_category") or {} for _, r in seed_rows(row)]
        means = {c: _fmean([_v(pc.get(c)) for pc in per_cat]) for c in sorted({c for pc in per_cat for c in pc})}
        cat_rows[n] = {c: v for c, v in means.items() if v is not None}
    out += _category_section(cat_rows, plot_dir)
    return out


def _category_section(cat_rows: dict, plot_dir: Path) -> list[Block]:
    out: list[Block] = [("h", 2, "4. Refusal rate per category")]
    cats = sorted({c for r in cat_rows.values() for c in r})
    if not cats:
        return out + [("p", "No per-category refusal rates recorded.")]
    fig = plots.plot_category_heatmap(cat_rows)
    out.append(_figure(fig, plot_dir / "categories.png", "Per-category refusal rate heat map"))
    table = [[lab] + [_pct_ci(r.get(c)) for c in cats] for lab, r in cat_rows.items()]
    out.append(("table", ["model / method"] + cats, table))
    return out


_DC_ROWS = (
    ("refusal_rate", "refusal rate % (unsafe prompts)"),
    ("harmful_compliance_rate", "harmful compliance % (unsafe prompts answered)"),
    ("incoherence_rate_unsafe", "incoherent % (unsafe prompts)"),
    ("over_refusal_rate", "over-refusal rate % (safe prompts)"),
    ("lookalike_over_refusal_rate", "over-refusal rate % (benign look-alikes)"),
    ("incoherence_rate_safe", "incoherent % (safe prompts)"),
)


_INCOHERENCE_NOTE = (
    "Incoherent answers (empty, repetitive, echoed, off topic, degenerate) count as neither refusal nor compliance, "
    "for every judge."
)


def _driftcheck_sections(res: dict, plot_dir: Path) -> list[Block]:
    m = res.get("metrics") or {}
    # Rates a results.json of schema 1.0 does not have (harmful compliance, look-alikes, incoherence) are left out.
    always = ("refusal_rate", "over_refusal_rate")
    table = [[label, _pct_ci(m.get(key))] for key, label in _DC_ROWS if key in m or key in always]
    b = res.get("baseline")
    if b:
        table.append(["refusal rate % of the baseline", _pct_ci(b.get("refusal_rate_base"))])
        table.append(["drift (baseline - this), pts", _pct_ci(b.get("drift"))])
    for name, val in (res.get("task_metrics") or {}).items():
        table.append([f"task metric: {name}", f"{val:.4g}" if _ok(val) else str(val)])
    for judge, block in (res.get("extra_judges") or {}).items():
        rates = f"{_pct_ci(block.get('refusal_rate'))} / {_pct_ci(block.get('over_refusal_rate'))}"
        table.append([f"judge {judge}: refusal / over-refusal", rates])
        if "harmful_compliance_rate" in block:
            table.append([f"judge {judge}: harmful compliance", _pct_ci(block.get("harmful_compliance_rate"))])
    label = res.get("model_id", "model") + (f" + {res['adapter']}" if res.get("adapter") else "")
    n_unsafe, n_safe, judge = res.get("n_unsafe", "?"), res.get("n_safe", "?"), res.get("judge", "?")
    intro = f"DriftCheck of {label}: {n_unsafe} unsafe and {n_safe} safe prompts, judge {judge}."
    out: list[Block] = [
        ("h", 2, "1. Results"),
        ("p", intro + " Intervals: 95% bootstrap over prompts. " + _INCOHERENCE_NOTE),
        ("table", ["metric", "value [95% CI]"], table),
        ("h", 2, "2-3. Drift and Pareto plots"),
        ("p", "These need several methods: run `alignguard compare` for them."),
    ]
    cats = {c: _v(s) for c, s in (m.get("per_category_refusal_rate") or {}).items()}
    return out + _category_section({Path(str(res.get("model_id", "model"))).name or "model": cats}, plot_dir)


def _find_fisher_dir(run: Path) -> Path | None:
    for d in (run / "fisher", run):
        if (d / "fisher.json").is_file() or (d / "subspaces.json").is_file():
            return d
    return None


def _spectra(fdir: Path, names: list[str], subs) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Eigenvalues per module (and the trace of those that are only the top ones) for the spectrum plot."""
    import torch

    from ..fisher import FisherState

    weights, tensors, dims = fdir / "fisher.safetensors", {}, {}
    if (fdir / "fisher.json").is_file() and weights.is_file() and weights.stat().st_size <= _EAGER_FISHER_BYTES:
        state = FisherState.load(fdir)
        tensors = {n: state.factors[n] for n in names if n in state.factors}
        tensors.update({f"{n}.eigvals": state.low_rank[n][0] for n in names if n in state.low_rank})
        dims = state.dims
    elif weights.is_file():
        from safetensors import safe_open

        dims = {n: d for n, d in (_load_json(fdir / "fisher.json") or {}).get("dims", {}).items()}
        with safe_open(str(weights), framework="pt") as f:
            keys = set(f.keys())
            for key in [f"{n}.{kind}" for n in names for kind in ("factor", "eigvals")]:
                if key in keys and (key.endswith(".eigvals") or f.get_slice(key).get_shape()[0] <= _MAX_DENSE_EIG_DIM):
                    tensors[key.removesuffix(".factor")] = f.get_tensor(key)
    spectra, traces = {}, {}
    for n in names:
        if n in tensors and tensors[n].shape[0] <= _MAX_DENSE_EIG_DIM:
            spectra[n] = torch.linalg.eigvalsh(tensors[n].double()).tolist()
        elif f"{n}.eigvals" in tensors:
            # A sketch keeps the top eigenvalues of the normalised factor, whose trace is d_out (mean eigenvalue 1).
            spectra[n], traces[n] = tensors[f"{n}.eigvals"].double().tolist(), float(dims[n][0])
        elif subs is not None and n in subs.subspaces:
            spectra[n], traces[n] = subs.subspaces[n].eigvals.double().tolist(), subs.subspaces[n].trace
    return spectra, traces


def _fisher_section(run: Path, plot_dir: Path) -> list[Block]:
    out: list[Block] = [("h", 2, "5. Fisher spectrum and subspace size")]
    fdir = _find_fisher_dir(run)
    if fdir is None:
        return out + [("p", "No Fisher state in this folder.")]
    modules: dict[str, dict] = {}
    subs = None
    damaged = None
    from ..factor_checks import FisherMismatchError
    from ..subspace import AlignmentSubspaces

    try:
        subs = AlignmentSubspaces.load(fdir)
        modules = subs.summary()
    except (FileNotFoundError, KeyError, FisherMismatchError) as exc:
        # The report still shows what subspaces.json says, and says plainly that the tensors are not usable.
        if isinstance(exc, FisherMismatchError):
            damaged = str(exc)
        meta = _load_json(fdir / "subspaces.json") or {}
        modules = {n: dict(info) for n, info in (meta.get("modules") or {}).items()}
    fmeta = _load_json(fdir / "fisher.json") or {}
    names = sorted(modules or fmeta.get("dims", {}), key=natural_key)
    if damaged:
        out.append(("p", f"Warning: the subspace files are damaged ({damaged}); only subspaces.json is shown."))
    if not names:
        return out + [("p", f"Fisher folder {fdir} holds no modules.")]
    # A few modules spread over the depth of the model: first, last and evenly in between.
    k = min(_SPECTRUM_MODULES, len(names))
    picks = [names[round(i * (len(names) - 1) / max(k - 1, 1))] for i in range(k)]
    spectra, traces = _spectra(fdir, list(dict.fromkeys(picks)), subs)
    if spectra:
        chosen = {n: int(modules[n]["m"]) for n in spectra if n in modules}
        fig = plots.plot_fisher_spectrum(spectra, chosen, traces)
        out += [
            _figure(fig, plot_dir / "fisher_spectrum.png", "Fisher spectrum of a few modules"),
            ("p", _SPECTRUM_NOTE),
        ]
    if modules:
        ordered = {n: modules[n] for n in names if n in modules}
        out.append(_figure(plots.plot_subspace_m(ordered), plot_dir / "subspace_m.png", "Chosen m per module"))
        ms = [int(v["m"]) for v in ordered.values()]
        energies = [v.get("energy") for v in ordered.values() if _ok(v.get("energy"))]
        rows = [
            ["modules", str(len(ms))],
            ["m min / median / max", f"{min(ms)} / {statistics.median(ms):g} / {max(ms)}"],
            ["total m (sum over modules)", str(sum(ms))],
        ]
        if energies:
            rows.append(["energy captured min / mean", f"{min(energies):.1%} / {statistics.fmean(energies):.1%}"])
        out.append(("table", ["subspaces", "value"], rows))
    return out


def _scaling_section(run: Path, plot_dir: Path) -> list[Block]:
    out: list[Block] = [("h", 2, "6. Forgetting scaling law")]
    path = next((p for p in (run / "scaling" / "scaling.json", run / "scaling.json") if p.is_file()), None)
    data = _load_json(path) if path else None
    if not data or not data.get("methods"):
        return out + [("p", "No scaling-law run in this folder (run `alignguard scaling` to add one).")]
    methods = data["methods"]
    x_key = plots.scaling_x_key(methods)
    out.append(_figure(plots.plot_scaling(methods, x_key), plot_dir / "scaling.png", "Forgetting scaling law"))
    # A relative to plain LoRA is the number the claim is about; "n/a" without a plain LoRA fit.
    a_ref = (methods.get("plain_lora", {}).get("fit") or {}).get("A")
    rows = []
    for name, block in methods.items():
        fit, pts = block.get("fit") or {}, block.get("points", [])
        cells = [f"{fit[k]:.4g}" if _ok(fit.get(k)) else "n/a" for k in ("L0", "A", "beta", "r2")]
        cells.append(f"{fit['A'] / a_ref:.2f}×" if _ok(fit.get("A")) and _ok(a_ref) and a_ref else "n/a")
        longest = max(pts, key=lambda p: p.get(x_key) if _ok(p.get(x_key)) else -1, default={})
        rows.append([name, str(len(pts))] + cells + [_pct_ci(longest.get("refusal_rate"))])
    head = ["method", "points", "L0", "A", "beta", "R²", "A vs plain LoRA", "refusal % at longest D"]
    out.append(("table", head, rows))
    out.append(("p", _SCALING_NOTE.format(x_key)))
    return out


def _versions_section(run: Path, res: dict | None, config_text: str | None) -> list[Block]:
    out: list[Block] = [("h", 2, "7. Configuration and package versions")]
    if config_text:
        out += [("p", "Resolved configuration (config.yaml):"), ("code", "yaml", config_text)]
    else:
        out.append(("p", "No config.yaml in this folder."))
    recorded: dict[str, set] = {}
    sources = [res or {}, _load_json(run / "fisher" / "fisher.json") or _load_json(run / "fisher.json") or {}]
    sources += [_load_json(p) or {} for p in sorted(run.glob("base/driftcheck/results.json"))]
    sources += [_load_json(p) or {} for p in sorted(run.glob("seed*/*/driftcheck/results.json"))]
    for src in sources:
        versions = src.get("versions") or (src.get("meta") or {}).get("versions") or {}
        for pkg, ver in versions.items():
            recorded.setdefault(pkg, set()).add(str(ver))
    now = package_versions()
    pkgs = list(now) + sorted(p for p in recorded if p not in now)
    rows = [[p, now.get(p, "-"), ", ".join(sorted(recorded.get(p, ()))) or "-"] for p in pkgs]
    out.append(("table", ["package", "this report", "recorded in the run"], rows))
    return out


# ---------------------------------------------------------------- output


def _figure(fig, path: Path, alt: str) -> Block:
    plots.save_figure(fig, path)
    return ("img", alt, path)


def to_markdown(blocks: list[Block], out_dir: Path) -> str:
    """Markdown for the blocks; images are linked relative to `out_dir`."""
    parts = []
    for b in blocks:
        if b[0] == "h":
            parts.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            parts.append(b[1])
        elif b[0] == "table":
            parts.append(markdown_table(b[1], b[2]))
        elif b[0] == "img":
            parts.append(f"![{b[1]}]({b[2].relative_to(out_dir).as_posix()})")
        elif b[0] == "code":
            fence = "`" * max(3, max((len(m) for m in re.findall(r"`+", b[2])), default=0) + 1)
            parts.append(f"{fence}{b[1]}\n{b[2].rstrip()}\n{fence}")
    return "\n\n".join(parts) + "\n"


# autoescape on for every template: cell text, headings, paths and config come from run folders, not from us.
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("alignguard.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


def to_html(blocks: list[Block], title: str) -> str:
    """A single self-contained HTML page: inline CSS, images as base64 data URIs, no external resources."""
    items = []
    for b in blocks:
        if b[0] == "img":
            items.append({"kind": "img", "alt": b[1], "data": base64.b64encode(b[2].read_bytes()).decode("ascii")})
        elif b[0] == "h":
            items.append({"kind": "h", "level": int(b[1]), "text": b[2]})
        elif b[0] == "table":
            items.append(
                {"kind": "table", "head": [str(c) for c in b[1]], "rows": [[str(c) for c in r] for r in b[2]]}
            )
        else:  # "p", "code"
            items.append({"kind": b[0], "text": b[-1]})
    return _TEMPLATES.get_template("report.html.j2").render(title=title, blocks=items)


def render_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `report.md`, `report.html` and `plots/*.png` for a compare or DriftCheck run folder.

    Args:
        run_dir (`str` or `Path`): The run folder (see the module docstring for what it may contain).
        out_dir (`str` or `Path`, *optional*): Where to write; defaults to `run_dir`.

    Returns:
        `Path`: the written `report.md` (`report.html` sits beside it).

    Raises:
        FileNotFoundError: if `run_dir` holds no results.json, Fisher state or scaling.json.
        ValueError: if results.json has an unknown schema.
    """
    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run
    plot_dir = out / "plots"
    res = _load_json(run / "results.json")
    has_scaling = (run / "scaling" / "scaling.json").is_file() or (run / "scaling.json").is_file()
    has_calibration = (run / "calibration.json").is_file()
    if res is None and _find_fisher_dir(run) is None and not has_scaling and not has_calibration:
        raise FileNotFoundError(
            f"{run}: no results.json, Fisher state, scaling/scaling.json or calibration.json to report on"
        )
    config_path = run / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else None
    if config_text is None and res and res.get("config"):
        config_text = yaml.safe_dump(res["config"], sort_keys=False)

    kind = "no results.json"
    if res is not None and res.get("schema_version") == "compare-1":
        kind, body = "compare run", _compare_results(res) + _compare_figures(res, plot_dir)
    elif res is not None and "metrics" in res:
        kind, body = "DriftCheck run", _driftcheck_sections(res, plot_dir)
    elif res is not None:
        raise ValueError(f"{run / 'results.json'}: unknown schema {res.get('schema_version')!r}")
    else:
        body = [("h", 2, "1-4. Results"), ("p", "No results.json in this folder.")]
    title = f"alignguard report: {run.resolve().name}"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks: list[Block] = [("h", 1, title), ("p", f"Run folder: {run.resolve()} ({kind}). Generated {stamp}.")]
    blocks += body + _fisher_section(run, plot_dir) + _scaling_section(run, plot_dir)
    blocks += calibration_section(run, plot_dir)
    blocks += _versions_section(run, res, config_text)
    atomic_write_text(out / "report.md", to_markdown(blocks, out))
    atomic_write_text(out / "report.html", to_html(blocks, title))
    return out / "report.md"


__all__ = ["render_report", "to_html", "to_markdown"]
