"""The drift-budget calibration (`alignguard calibrate`, docs/design.md §12) as a table and a figure.

Both read the calibration.json payload (schema "calibration-1") only: plain data, no run-folder layout beyond the
file itself. `calibration_section` gives the blocks for `render.render_report` (a run folder holding
calibration.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from .plots import PALETTE, save_figure

_NOTE = (
    "Drift = refusal rate of the model without adapter minus that of the probe, on the unsafe prompts of the probe "
    "split (points). The fit is isotonic (non-increasing in lambda), linear in log lambda between probes; bands are "
    "95% paired percentile bootstraps over the probe prompts, the upper bound one-sided at the stated level. The "
    "chosen lambda is the smallest grid value whose {bound} is within the budget; its interval is the 95% range of "
    "the budget crossing over bootstrap resamples. The final run(s) are measured on the evaluation prompts."
)


def _num(x, fmt: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _pct(x) -> str:
    return _num(None if x is None else 100 * x)


def _lam(x) -> str:
    return "beyond" if x is None else format(x, "g")


def _rows(payload: dict) -> list[list[str]]:
    rows = []
    for p in payload["probes"]:
        task = p.get("task") or {}
        rows.append(
            [
                format(p["lambda"], "g"),
                _num(p["drift"]),
                f"[{_num(p['ci_low'])}, {_num(p['ci_high'])}]",
                _num(p["fit"]),
                _pct(task.get("accuracy")),
                f"[{_pct(task.get('ci_low'))}, {_pct(task.get('ci_high'))}]" if task else "-",
                str(len(p.get("seeds", []))),
            ]
        )
    return rows


def _choice_lines(payload: dict) -> list[str]:
    s, c = payload["settings"], payload["choice"]
    lo, hi = c["lambda_interval"]
    lines = [
        f"Chosen {s['knob']} = **{c['lambda']:g}** ({c['status']}, rule `{s['rule']}` at {s['confidence']:g}): "
        f"predicted drift {_num(c['predicted_drift'])} pts [{_num(c['predicted_drift_low'])}, "
        f"{_num(c['predicted_drift_high'])}], upper bound {_num(c['predicted_drift_upper'])}, budget "
        f"{s['drift_budget']:g} pts.",
        f"95% interval of the lambda where drift crosses the budget: [{_lam(lo)}, {_lam(hi)}]"
        + (" (its low end is the smallest probe: the crossing may lie below)" if c.get("censored_low") else "")
        + (" (above the largest probe in some resamples)" if c.get("censored_high") else "")
        + ".",
    ]
    if c.get("predicted_task") is not None:
        lines.append(
            f"Predicted task accuracy there: {_pct(c['predicted_task'])}% [{_pct(c.get('predicted_task_low'))}, "
            f"{_pct(c.get('predicted_task_high'))}]."
        )
    if payload.get("warning"):
        lines.append(f"**Warning:** {payload['warning']}.")
    return lines


def _final_rows(final: dict) -> list[list[str]]:
    return [
        [
            str(r["seed"]),
            _num(r["drift"]),
            f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]",
            _pct(r["refusal_rate"]),
            _pct(r["refusal_rate_base"]),
            _pct(r.get("task_accuracy")),
            "yes" if r["met_budget"] else "no",
        ]
        for r in final["runs"]
    ]


PROBE_HEAD = ["lambda", "drift (pts)", "95% CI", "fit", "task %", "task 95% CI", "seeds"]
FINAL_HEAD = ["seed", "drift (pts)", "95% CI", "refusal %", "base refusal %", "task %", "within budget"]


def format_calibration(payload: dict) -> str:
    """calibration.md: settings, the probe table, the choice and the final measurement."""
    from .compare_table import markdown_table

    s = payload["settings"]
    base = payload.get("base") or {}
    lines = [
        f"# Drift budget: {s['knob']} for {s['drift_budget']:g} pts of refusal drift ({s['method']})",
        "",
        f"Probes: {len(s['lambdas'])} values x {len(s['probe_seeds'])} seed(s), {s['probe_steps']} of "
        f"{s['max_steps']} steps, DriftCheck on `{s['probe_prompts']}` (aligned model: refusal "
        f"{_pct(base.get('refusal_rate'))}%, task {_pct(base.get('task'))}%).",
        "",
        markdown_table(PROBE_HEAD, _rows(payload)),
        "",
        *_choice_lines(payload),
        "",
    ]
    final = payload.get("final")
    if final:
        lines += [
            f"## Final run{'s' if len(final['runs']) > 1 else ''}: `{final['run_name']}`, {final['max_steps']} steps, "
            f"on `{final['prompts']}`",
            "",
            markdown_table(FINAL_HEAD, _final_rows(final)),
            "",
            f"Within the budget: {sum(r['met_budget'] for r in final['runs'])} of {len(final['runs'])} seed(s).",
            "",
        ]
    else:
        lines += ["No final run (train_final: false).", ""]
    bound = "one-sided upper bound" if s["rule"] == "upper" else "point estimate"
    lines += [_NOTE.format(bound=bound), ""]
    return "\n".join(lines)


def plot_calibration(payload: dict) -> Figure:
    """Drift (top) and task accuracy (bottom) vs lambda, log x: probes with 95% intervals (seeds faint), the fit
    and its band, the drift upper bound, the budget, the chosen lambda with its interval and the final run(s)."""
    s, grid, c = payload["settings"], payload["grid"], payload["choice"]
    task_grid = grid.get("task")
    fig = Figure(figsize=(6.4, 6.4 if task_grid else 4.0))
    axes = fig.subplots(2, 1, sharex=True) if task_grid else [fig.add_subplot()]
    ax = axes[0]
    lam = grid["lambda"]
    xs = [p["lambda"] for p in payload["probes"]]
    ax.fill_between(lam, grid["low"], grid["high"], color=PALETTE[0], alpha=0.15, lw=0, label="95% band")
    ax.plot(lam, grid["drift"], "-", color=PALETTE[0], lw=1.4, label="fit (isotonic)")
    ax.plot(lam, grid["upper"], "--", color=PALETTE[0], lw=1.0, label=f"upper bound ({s['confidence']:g})")
    for p in payload["probes"]:
        for r in p.get("seeds", []):
            if len(p["seeds"]) > 1 and r.get("drift") is not None:
                ax.plot(p["lambda"], r["drift"], ".", color=PALETTE[0], alpha=0.35)
    ax.errorbar(
        xs,
        [p["drift"] for p in payload["probes"]],
        yerr=[
            [p["drift"] - p["ci_low"] for p in payload["probes"]],
            [p["ci_high"] - p["drift"] for p in payload["probes"]],
        ],
        fmt="o",
        color=PALETTE[0],
        capsize=3,
        label=f"probes ({s['probe_prompts']})",
    )
    ax.axhline(s["drift_budget"], color=PALETTE[3], lw=1.0, label=f"budget {s['drift_budget']:g} pts")
    final = payload.get("final")
    if final:
        ax.plot(
            [c["lambda"]] * len(final["runs"]),
            [r["drift"] for r in final["runs"]],
            "*",
            color=PALETTE[1],
            ms=10,
            label=f"final ({final['prompts']})",
        )
    ax.set_ylabel("refusal drift (pts)")
    ax.set_title(f"Drift budget: {s['knob']} = {c['lambda']:g} ({c['status']})")
    for i, a in enumerate(axes):
        _mark_choice(a, c, labels=i == 0)
        a.set_xscale("log")
        a.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    if task_grid:
        ax2 = axes[1]
        pct = [[100 * v for v in task_grid[k]] for k in ("accuracy", "low", "high")]
        ax2.fill_between(lam, pct[1], pct[2], color=PALETTE[2], alpha=0.15, lw=0)
        ax2.plot(lam, pct[0], "-", color=PALETTE[2], lw=1.4, label="fit (isotonic)")
        tasks = [p.get("task") or {} for p in payload["probes"]]
        ax2.errorbar(
            xs,
            [100 * t["accuracy"] for t in tasks],
            yerr=[
                [100 * (t["accuracy"] - t["ci_low"]) for t in tasks],
                [100 * (t["ci_high"] - t["accuracy"]) for t in tasks],
            ],
            fmt="o",
            color=PALETTE[2],
            capsize=3,
            label="probes (Wilson 95%)",
        )
        if final and all(r.get("task_accuracy") is not None for r in final["runs"]):
            ax2.plot(
                [c["lambda"]] * len(final["runs"]),
                [100 * r["task_accuracy"] for r in final["runs"]],
                "*",
                color=PALETTE[1],
                ms=10,
                label="final",
            )
        ax2.set_ylabel("task accuracy (%)")
        ax2.legend(fontsize=7)
    axes[-1].set_xlabel(f"{s['knob']} (log scale)")
    return fig


def _mark_choice(ax, choice: dict, labels: bool) -> None:
    lo, hi = choice["lambda_interval"]
    ax.axvline(choice["lambda"], color=PALETTE[4], lw=1.2, ls=":", label="chosen" if labels else None)
    if lo is None:  # every resample is over budget on the whole range: nothing to shade
        return
    right = hi if hi is not None else ax.get_xlim()[1]  # a crossing beyond the probes: shade to the edge
    ax.axvspan(lo, right, color=PALETTE[4], alpha=0.08, lw=0, label="crossing 95% interval" if labels else None)


def calibration_section(run: Path, plot_dir: Path) -> list[tuple]:
    """Report blocks (heading, figure, tables, notes) for a run folder holding calibration.json; [] otherwise."""
    path = Path(run) / "calibration.json"
    if not path.is_file():
        return []
    payload = json.loads(path.read_text())
    plot = save_figure(plot_calibration(payload), Path(plot_dir) / "calibration.png")
    blocks: list[tuple] = [("h", 2, "Drift budget (alignguard calibrate)"), ("img", "Drift budget", plot)]
    blocks.append(("table", PROBE_HEAD, _rows(payload)))
    blocks += [("p", line) for line in _choice_lines(payload)]
    if payload.get("final"):
        blocks.append(("table", FINAL_HEAD, _final_rows(payload["final"])))
    return blocks
