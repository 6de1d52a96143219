"""The comparison table's and the DriftCheck report's incoherence, harmful-compliance and look-alike columns.

Run: python -m pytest -q tests/test_report_columns.py
"""

import json

import pytest

from alignguard.cli.main import main as cli_main
from tests.test_report import _dc_results, _section, _stat, _tables, check_report, make_compare_run


def test_table_has_harmful_compliance_incoherence_and_lookalike_columns(tmp_path):
    from alignguard.report.compare_table import comparison_tables, format_table

    run = make_compare_run(tmp_path / "run", seeds=(0,), scaling=False)
    results = json.loads((run / "results.json").read_text())
    results["judge"] = "pattern"
    results["base"]["refusal_rate_by_judge"] = {"pattern_relevance": _stat(0.93)}
    for row in results["rows"].values():
        for r in row["seeds"].values():
            r["refusal_rate_by_judge"] = {"pattern_relevance": _stat(0.7)}
    (table,) = comparison_tables(results)
    header = table.header()
    for name in ("look-alike over-refusal %", "harmful compliance %", "incoherent % (unsafe)"):
        assert f"{name} [95% CI]" in header
    # The two judges' refusal columns, side by side: the default one named, then the extra one.
    assert "refusal % (pattern) [95% CI]" in header and header[-1] == "refusal % (pattern_relevance)"
    row = dict(zip(header, next(b for b in table.body() if b[0] == "alignguard")))
    assert row["harmful compliance % [95% CI]"] == "10.0 [5.0, 15.0]"  # 0.95 - 0.85
    assert row["incoherent % (unsafe) [95% CI]"] == "5.0 [0.0, 10.0]"
    assert row["look-alike over-refusal % [95% CI]"] == "12.0 [7.0, 17.0]"
    assert "| harmful compliance % [95% CI] |" in format_table(results).splitlines()[0]
    assert "refusal + harmful compliance + incoherent = 100%" in format_table(results)
    # The same cells in report.md (one table model for both outputs).
    (run / "results.json").write_text(json.dumps(results))
    assert cli_main(["report", str(run)]) == 0
    assert _tables(_section(check_report(run)[0], "## 1. Results")) == _tables(format_table(results))


def test_table_reads_compare_results_without_the_new_rates(tmp_path):
    from alignguard.report.compare_table import comparison_tables

    run = make_compare_run(tmp_path / "run", seeds=(0, 1), scaling=False)
    results = json.loads((run / "results.json").read_text())
    new = (
        "harmful_compliance_rate",
        "incoherence_rate_unsafe",
        "incoherence_rate_safe",
        "lookalike_over_refusal_rate",
    )
    for row in results["rows"].values():
        for r in row["seeds"].values():
            for key in new:
                r.pop(key)
    headline, per_seed = comparison_tables(results)
    col = headline.header().index("harmful compliance %")
    assert {b[col] for b in headline.body()} == {"n/a"} and "refusal % [95% CI]" in per_seed.header()


def test_driftcheck_report_shows_the_new_rates_and_reads_old_files(tmp_path):
    run = tmp_path / "eval"
    run.mkdir()
    res = _dc_results(0.6)
    res["schema_version"] = "1.1"
    res["metrics"].update(
        harmful_compliance_rate=_stat(0.3),
        incoherence_rate_unsafe=_stat(0.1),
        incoherence_rate_safe=_stat(0.2),
        lookalike_over_refusal_rate=_stat(0.25),
    )
    res["extra_judges"] = {"pattern_relevance": dict(res["metrics"], refusal_rate=_stat(0.7))}
    (run / "results.json").write_text(json.dumps(res))
    assert cli_main(["report", str(run)]) == 0
    md, _ = check_report(run)
    assert "| harmful compliance % (unsafe prompts answered) | 30.0 [25.0, 35.0] |" in md
    assert "| incoherent % (unsafe prompts) | 10.0 [5.0, 15.0] |" in md
    assert "| over-refusal rate % (benign look-alikes) | 25.0 [20.0, 30.0] |" in md
    assert "| judge pattern_relevance: harmful compliance | 30.0 [25.0, 35.0] |" in md
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text(json.dumps(_dc_results(0.6)))  # schema 1.0: no new rates
    assert cli_main(["report", str(old)]) == 0
    md, _ = check_report(old)
    assert "| refusal rate % (unsafe prompts) | 60.0 [55.0, 65.0] |" in md and "harmful compliance" not in md


def test_aggregate_copies_the_new_rates_and_the_judge_name(tmp_path):
    from types import SimpleNamespace

    from alignguard.report.compare_table import aggregate

    def dc(hc):
        d = _dc_results(0.6)
        d["metrics"]["harmful_compliance_rate"] = None if hc is None else _stat(hc)
        d["per_prompt"] = [{"id": "p0", "label": "unsafe", "category": "cyber", "refused": True, "extra": {}}]
        return d

    (tmp_path / "base" / "driftcheck").mkdir(parents=True)
    (tmp_path / "base" / "driftcheck" / "results.json").write_text(json.dumps(dc(0.1)))
    (tmp_path / "base" / "task.json").write_text(json.dumps({"accuracy": 0.3}))
    for seed, hc in ((0, 0.3), (1, 0.5)):
        mdir = tmp_path / f"seed{seed}" / "plain_lora"
        (mdir / "driftcheck").mkdir(parents=True)
        (mdir / "driftcheck" / "results.json").write_text(json.dumps(dc(hc)))
        (mdir / "result.json").write_text(json.dumps({"task": {"accuracy": 0.6}, "mean_step_seconds": 1.0}))
    cfg = SimpleNamespace(out=str(tmp_path), methods=["plain_lora"], seeds=[0, 1], model="m")
    results = aggregate(cfg)
    assert results["judge"] == "pattern" and results["base"]["harmful_compliance_rate"]["value"] == 0.1
    row = results["rows"]["plain_lora"]
    assert row["seeds"][1]["harmful_compliance_rate"]["value"] == 0.5
    assert row["seeds"][0]["incoherence_rate_unsafe"] is None  # not in that results.json
    assert row["mean"]["harmful_compliance_rate"]["mean"] == pytest.approx(0.4)


def _one_prompt_dc():
    """DriftCheck results with one per-prompt row (what `aggregate` pairs over)."""
    d = _dc_results(0.6)
    d["per_prompt"] = [{"id": "p0", "label": "unsafe", "category": "cyber", "refused": True, "extra": {}}]
    return d


def test_task_refused_column_reads_n_refused_and_is_na_for_older_results(tmp_path):
    """The share of task problems refused (score_task's n_refused / n) is a column beside the task metric: an aligned
    model that refuses the task's own prompts is visible in the table, not only as a low task score."""
    from types import SimpleNamespace

    from alignguard.report.compare_table import aggregate, comparison_tables

    (tmp_path / "base" / "driftcheck").mkdir(parents=True)
    (tmp_path / "base" / "driftcheck" / "results.json").write_text(json.dumps(_one_prompt_dc()))
    (tmp_path / "base" / "task.json").write_text(json.dumps({"accuracy": 0.1, "n": 200, "n_refused": 50}))
    tasks = {0: {"accuracy": 0.6, "n": 200, "n_refused": 4}, 1: {"accuracy": 0.5, "n": 200, "n_refused": 8}}
    for method in ("plain_lora", "alignguard"):  # alignguard: an older row
        for seed, task in tasks.items():
            mdir = tmp_path / f"seed{seed}" / method
            (mdir / "driftcheck").mkdir(parents=True)
            (mdir / "driftcheck" / "results.json").write_text(json.dumps(_one_prompt_dc()))
            if method == "alignguard":
                task = {"accuracy": task["accuracy"]}  # scored before n_refused was counted
            (mdir / "result.json").write_text(json.dumps({"task": task, "mean_step_seconds": 1.0}))
    results = aggregate(
        SimpleNamespace(out=str(tmp_path), methods=["plain_lora", "alignguard"], seeds=[0, 1], model="m")
    )
    assert results["base"]["task_refused_rate"] == 0.25
    assert results["rows"]["plain_lora"]["mean"]["task_refused_rate"]["mean"] == pytest.approx(0.03)
    assert results["rows"]["alignguard"]["seeds"][0]["task_refused_rate"] is None
    headline, _ = comparison_tables(results)
    col = headline.header().index("task refused %")
    cells = {b[0]: b[col] for b in headline.body()}
    assert cells["aligned model (no fine-tune)"] == "25.0"
    assert cells["plain_lora"].startswith("3.0 ± ") and cells["alignguard"] == "n/a"


def test_step_time_ratios_timed_in_another_process_are_marked(tmp_path):
    """A row trained by a later `compare` run than its plain-LoRA reference has its step-time ratio marked, with a
    note; rows timed in the reference's process and results from before the process was recorded are not."""
    from types import SimpleNamespace

    from alignguard.report.compare_table import CROSS_PROCESS_MARK, aggregate, comparison_tables, table_note

    (tmp_path / "base" / "driftcheck").mkdir(parents=True)
    (tmp_path / "base" / "driftcheck" / "results.json").write_text(json.dumps(_one_prompt_dc()))
    (tmp_path / "base" / "task.json").write_text(json.dumps({"accuracy": 0.1, "n": 200}))
    # method -> (step seconds, process that timed them; absent key: a result from before it was recorded)
    rows = {"plain_lora": (1.0, "p1"), "alignguard": (1.1, "p1"), "asft": (1.5, "p2"), "ewc": (1.2, None)}
    methods = list(rows)
    for seed in (0, 1):
        for method, (secs, process) in rows.items():
            mdir = tmp_path / f"seed{seed}" / method
            (mdir / "driftcheck").mkdir(parents=True)
            (mdir / "driftcheck" / "results.json").write_text(json.dumps(_one_prompt_dc()))
            res = {"task": {"accuracy": 0.5, "n": 200}, "mean_step_seconds": secs}
            if method != "ewc":
                res["step_times_process"] = process if seed == 0 or method != "alignguard" else None  # resumed
            (mdir / "result.json").write_text(json.dumps(res))
    results = aggregate(SimpleNamespace(out=str(tmp_path), methods=methods, seeds=[0, 1], model="m"))
    seeds = {m: results["rows"][m]["seeds"] for m in methods}
    assert seeds["asft"][0]["step_time_ratio"] == pytest.approx(1.5)
    assert [seeds["asft"][s]["step_time_same_process"] for s in (0, 1)] == [False, False]
    assert [seeds["alignguard"][s]["step_time_same_process"] for s in (0, 1)] == [True, False]
    assert seeds["ewc"][0]["step_time_same_process"] is None
    headline, per_seed = comparison_tables(results)
    col = headline.header().index("step time vs plain LoRA")
    cells = {b[0]: b[col] for b in headline.body()}
    assert cells["asft"] == f"1.50 ± 0.00×{CROSS_PROCESS_MARK}"
    assert cells["alignguard"].endswith(CROSS_PROCESS_MARK)  # seed 1 was resumed
    assert cells["ewc"] == "1.20 ± 0.00×" and cells["plain_lora"] == "1.00 ± 0.00×"
    per = {(b[0], b[1]): b[per_seed.header().index("step time vs plain LoRA")] for b in per_seed.body()}
    assert per[("alignguard", "0")] == "1.10×" and per[("alignguard", "1")] == f"1.10×{CROSS_PROCESS_MARK}"
    assert "benchmarks/peer_steps.py" in table_note(results, [headline, per_seed])
    results["rows"] = {m: results["rows"][m] for m in ("plain_lora", "ewc")}
    assert "peer_steps" not in table_note(results, comparison_tables(results))
