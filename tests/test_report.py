"""`alignguard report`: Markdown/HTML/plots from synthetic compare, DriftCheck and scaling folders.

Run: python -m pytest -q tests/test_report.py
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from alignguard.cli.main import main as cli_main
from alignguard.fisher import FisherState
from alignguard.report import pareto_front
from alignguard.report.plots import scaling_x_key
from alignguard.subspace import AlignmentSubspaces, Subspace

METHODS = ["plain_lora", "alignguard", "replay", "alignguard@lambda_a=10"]
CATS = ["cyber", "self_harm", "violence"]
# (task accuracy, refusal rate) per method: alignguard and the lambda row trade task for refusals, replay is
# dominated by alignguard, plain LoRA has the best task metric.
POINTS = {
    "plain_lora": (0.70, 0.40),
    "alignguard": (0.66, 0.85),
    "replay": (0.62, 0.80),
    "alignguard@lambda_a=10": (0.55, 0.92),
}


def _stat(v, w=0.05, n=60):
    return {"value": v, "ci_low": v - w, "ci_high": v + w, "n": n}


def _row(task, ra, seed):
    jitter = 0.01 * seed
    return {
        "task_accuracy": task + jitter,
        "refusal_rate": _stat(ra - jitter),
        "over_refusal_rate": _stat(0.05 + jitter),
        "drift": _stat(0.9 - ra + jitter),
        "drift_reduction": _stat((0.5 - (0.9 - ra)) / 0.5 if ra > 0.4 else 0.0),
        "step_seconds": 0.5,
        "step_time_ratio": 1.0 if ra == 0.40 else 1.3 + jitter,
        "per_category": {c: min(1.0, ra + 0.05 * i) for i, c in enumerate(CATS)},
        # On unsafe prompts refusal + harmful compliance + incoherent = 1.
        "harmful_compliance_rate": _stat(0.95 - ra),
        "incoherence_rate_unsafe": _stat(0.05 + jitter),
        "incoherence_rate_safe": _stat(0.02),
        "lookalike_over_refusal_rate": _stat(0.12 + jitter),
    }


def _dc_results(ra, model="/models/tiny", baseline=None):
    return {
        "schema_version": "1.0",
        "model_id": model,
        "adapter": None,
        "model_fingerprint": None,
        "prompts_hash": "abc",
        "n_prompts": 120,
        "n_unsafe": 60,
        "n_safe": 60,
        "judge": "pattern",
        "settings": {},
        "metrics": {
            "refusal_rate": _stat(ra),
            "over_refusal_rate": _stat(0.1),
            "per_category_refusal_rate": {c: _stat(ra) for c in CATS},
        },
        "extra_judges": {},
        "baseline": baseline,
        "task_metrics": {"accuracy": 0.5},
        "per_prompt": [],
        "meta": {
            "created_at": "2026-11-23T00:00:00+00:00",
            "versions": {"torch": "2.13.0+cpu", "trl": "1.16.0"},
            "bootstrap": {"n_boot": 1000, "seed": 0},
        },
    }


def make_compare_run(root: Path, seeds=(0, 1), scaling=True) -> Path:
    """A compare-1 run folder with made-up, non-trivial numbers, a tiny Fisher state and subspaces."""
    rows = {}
    for name in METHODS:
        task, ra = POINTS[name]
        rows[name] = {"seeds": {str(s): _row(task, ra, s) for s in seeds}, "mean": {}}
        for s in seeds:
            dc = root / f"seed{s}" / name / "driftcheck"
            dc.mkdir(parents=True)
            (dc / "results.json").write_text(json.dumps(_dc_results(ra)))
    results = {
        "schema_version": "compare-1",
        "model": "/models/tiny",
        "seeds": list(seeds),
        "methods": METHODS,
        "prompts_hash": "abc",
        "base": {
            "refusal_rate": _stat(0.9),
            "over_refusal_rate": _stat(0.08),
            "task_accuracy": 0.3,
            "per_category": {c: 0.9 for c in CATS},
        },
        "rows": rows,
        "config": {"model": "/models/tiny"},
    }
    (root / "results.json").write_text(json.dumps(results))
    (root / "config.yaml").write_text(yaml.safe_dump({"compare": {"model": "/models/tiny", "seeds": list(seeds)}}))

    gen = torch.Generator().manual_seed(0)
    state, subs = FisherState(metadata={"versions": {"torch": "2.13.0+cpu"}}), AlignmentSubspaces()
    for layer in range(2):
        for proj, d in (("q_proj", 8), ("up_proj", 12)):
            name = f"model.layers.{layer}.mlp.{proj}"
            a = torch.randn(d, d, generator=gen)
            factor = a @ a.T
            factor *= d / torch.trace(factor)
            state.dims[name], state.token_counts[name] = (d, 4), 10
            if proj == "up_proj" and layer == 1:  # one low-rank (sketch) module
                ev, vec = torch.linalg.eigh(factor)
                state.low_rank[name] = (ev.flip(0)[:4].contiguous(), vec.flip(1)[:, :4].contiguous())
            else:
                state.factors[name] = factor
            ev, vec = torch.linalg.eigh(factor)
            m = 2 + layer
            subs.subspaces[name] = Subspace(vec.flip(1)[:, :m].contiguous(), ev.flip(0)[:m].contiguous(), float(d))
    state.save(root / "fisher")
    subs.save(root / "fisher")

    if scaling:
        sc = {"schema_version": "scaling-1", "methods": {}}
        for name, amp in (("plain_lora", 0.5), ("alignguard", 0.2)):
            fit = {"L0": 1.0, "A": amp, "beta": 0.4, "r2": 0.97}
            pts = [
                {"steps": s, "tokens": 512 * s, "alignment_loss": 1.0 + amp * s**0.4, "refusal_rate": 0.9 - amp / 2}
                for s in (10, 20, 40, 80)
            ]
            sc["methods"][name] = {"points": pts, "fit": fit}
        sc["methods"]["replay"] = {"points": pts[:1], "fit": None}
        (root / "scaling").mkdir()
        (root / "scaling" / "scaling.json").write_text(json.dumps(sc))
    return root


def _tables(md: str) -> list[list[str]]:
    """Blocks of consecutive Markdown lines that start with '|'."""
    blocks, cur = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            blocks.append(cur)
            cur = []
    return blocks + ([cur] if cur else [])


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def check_report(out: Path) -> tuple[str, str]:
    """Assertions every report must pass; returns (markdown, html)."""
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    for rel in images:
        assert (out / rel).is_file(), rel
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count('src="data:image/png;base64,') == len(images)
    refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page)
    assert refs and all(r.startswith("data:") for r in refs)
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", page)
    assert "<link" not in page and "<script" not in page and "@import" not in page
    tables = _tables(md)
    assert tables
    for t in tables:
        assert len(t) >= 2 and re.fullmatch(r"\|(?:\s*:?-{3,}:?\s*\|)+", t[1]), t[:2]
        n = len(_cells(t[0]))
        assert all(len(_cells(line)) == n for line in t), t
    return md, page


def _section(md: str, heading: str) -> str:
    return md.split(heading, 1)[1].split("\n## ", 1)[0]


def test_pareto_front_hand_made():
    pts = [
        ("a", 0.9, 0.1),
        ("b", 0.5, 0.5),
        ("c", 0.4, 0.4),
        ("d", 0.1, 0.9),
        ("e", 0.5, 0.3),
        ("f", 0.1, 0.9),
        ("g", 0.8, 0.1),
        ("nan", float("nan"), 1.0),
    ]
    # c and e are dominated by b, g by a; d and f tie (both stay); the NaN point is ignored.
    assert pareto_front(pts) == ["d", "f", "b", "a"]
    assert pareto_front([("x", 0.3, 0.3)]) == ["x"]
    assert pareto_front([]) == []
    assert pareto_front([(n, *POINTS[n]) for n in METHODS]) == ["alignguard@lambda_a=10", "alignguard", "plain_lora"]


def test_scaling_x_key_finds_the_fitted_axis():
    pts = [{"steps": s, "tokens": 100 * s + 7 * s * s, "alignment_loss": 1 + 0.3 * s**0.5} for s in (5, 10, 20, 40)]
    on_steps = {"m": {"points": pts, "fit": {"L0": 1.0, "A": 0.3, "beta": 0.5, "r2": 1.0}}}
    assert scaling_x_key(on_steps) == "steps"
    for p in pts:
        p["alignment_loss"] = 1 + 0.01 * p["tokens"] ** 0.5
    assert scaling_x_key({"m": {"points": pts, "fit": {"L0": 1.0, "A": 0.01, "beta": 0.5, "r2": 1.0}}}) == "tokens"
    assert scaling_x_key({"m": {"points": pts, "fit": None}}) == "steps"


def test_report_compare_run_two_seeds(tmp_path, capsys):
    run = make_compare_run(tmp_path / "run")
    assert cli_main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run / "report.md")
    md, page = check_report(run)
    results = _section(md, "## 1. Results")
    for name in METHODS:
        assert f"| {name} |" in results and name in page
    assert "±" in results and "[" in _section(md, "### Per seed")  # mean ± sd, then per-seed 95% CIs
    assert re.search(r"\| alignguard \| 0 \| .*\[\d+\.\d, \d+\.\d\]", _section(md, "### Per seed"))
    assert "alignguard@lambda_a=10, alignguard, plain_lora" in md  # Pareto front, ordered by task metric
    assert "| replay | 62.5 | 79.5 | no |" in md  # mean of seeds 0 and 1
    for png in ("drift", "pareto", "categories", "fisher_spectrum", "subspace_m", "scaling"):
        assert f"(plots/{png}.png)" in md
    assert "| aligned model |" in _section(md, "## 4.")  # heat map rows include the base model
    scaling = _section(md, "## 6.")
    assert "| alignguard | 4 | 1 | 0.2 | 0.4 | 0.97 | 0.40× | 80.0 |" in scaling and "D = steps" in scaling
    assert "| replay | 1 | n/a | n/a | n/a | n/a | n/a |" in scaling
    assert "seeds:" in md and "| torch |" in md and "2.13.0+cpu" in md


def test_report_single_seed_has_cis_and_out_dir(tmp_path):
    run = make_compare_run(tmp_path / "run", seeds=(3,), scaling=False)
    out = tmp_path / "elsewhere"
    assert cli_main(["report", str(run), "--out", str(out)]) == 0
    md, _ = check_report(out)
    assert not (run / "report.md").exists()
    assert "| alignguard | 69.0 | n/a | 82.0 [77.0, 87.0] | 8.0 [3.0, 13.0] |" in md  # seed 3 of _row (no n_refused)
    assert "No scaling-law run in this folder" in md


def test_report_driftcheck_only(tmp_path):
    run = tmp_path / "eval"
    run.mkdir()
    base = {
        "model_id": "/models/base",
        "prompts_hash": "abc",
        "n_paired": 60,
        "refusal_rate_base": _stat(0.9),
        "drift": _stat(0.3),
    }
    (run / "results.json").write_text(json.dumps(_dc_results(0.6, baseline=base)))
    (run / "config.yaml").write_text("eval:\n  model: /models/tiny\n")
    (run / "generations.jsonl").write_text("")
    assert cli_main(["report", str(run)]) == 0
    md, _ = check_report(run)
    assert "| refusal rate % (unsafe prompts) | 60.0 [55.0, 65.0] |" in md
    assert "| drift (baseline - this), pts | 30.0 [25.0, 35.0] |" in md
    assert "(plots/categories.png)" in md and "No Fisher state in this folder" in md
    assert "No scaling-law run in this folder" in md and "model: /models/tiny" in md


def test_fisher_spectra_lazy_and_fallback_match_eager(tmp_path, monkeypatch):
    from alignguard.report import render

    run = make_compare_run(tmp_path / "run", seeds=(0,), scaling=False)
    subs = AlignmentSubspaces.load(run / "fisher")
    names = sorted(subs.subspaces)
    eager, eager_tr = render._spectra(run / "fisher", names, subs)
    assert set(eager) == set(names) and list(eager_tr) == ["model.layers.1.mlp.up_proj"]  # the sketched one
    assert eager_tr["model.layers.1.mlp.up_proj"] == 12.0
    # Huge Fisher files are read lazily (safe_open); huge dense factors fall back to the subspace eigenvalues.
    monkeypatch.setattr(render, "_EAGER_FISHER_BYTES", 0)
    monkeypatch.setattr(render, "_MAX_DENSE_EIG_DIM", 10)
    lazy, lazy_tr = render._spectra(run / "fisher", names, subs)
    assert lazy["model.layers.0.mlp.q_proj"] == pytest.approx(eager["model.layers.0.mlp.q_proj"])
    assert lazy_tr["model.layers.0.mlp.up_proj"] == 12.0 and len(lazy["model.layers.0.mlp.up_proj"]) == 2  # top m
    assert lazy["model.layers.1.mlp.up_proj"] == pytest.approx(eager["model.layers.1.mlp.up_proj"])


def test_report_errors(tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        cli_main(["report", str(tmp_path)])
    (tmp_path / "results.json").write_text(json.dumps({"schema_version": "zzz"}))
    with pytest.raises(SystemExit, match="unknown schema"):
        cli_main(["report", str(tmp_path)])


@pytest.mark.parametrize("seeds", [(0,), (0, 1)])
def test_results_md_and_report_md_show_the_same_numbers(tmp_path, seeds):
    from alignguard.report.compare_table import format_table

    run = make_compare_run(tmp_path / "run", seeds=seeds, scaling=False)
    results = json.loads((run / "results.json").read_text())
    results["base"]["refusal_rate_by_judge"] = {"pattern_relevance": _stat(0.93)}
    for i, row in enumerate(results["rows"].values()):
        for r in row["seeds"].values():
            r["refusal_rate_by_judge"] = {"pattern_relevance": _stat(0.5 + 0.1 * i)}
    (run / "results.json").write_text(json.dumps(results))
    assert cli_main(["report", str(run)]) == 0
    report_tables = _tables(_section(check_report(run)[0], "## 1. Results"))
    md_tables = _tables(format_table(results))
    assert len(md_tables) == len(report_tables) == len(seeds)  # headline (+ per seed with several seeds)
    assert md_tables == report_tables  # one table model, one formatting function: the very same cells
    assert md_tables[0][0].endswith("| refusal % (pattern_relevance) |") and "| 93.0 [88.0, 98.0] |" in md_tables[0][2]
    if len(seeds) > 1:
        assert "| replay | 2 | 62.5 ± 0.7 | n/a | 79.5 ± 0.7 |" in md_tables[0][5]


def test_html_escapes_run_text(tmp_path):
    run = make_compare_run(tmp_path / "run", seeds=(0,), scaling=False)
    results = json.loads((run / "results.json").read_text())
    evil = '<script>alert("x")</script>&'
    results["rows"][evil] = results["rows"].pop("replay")
    results["model"] = "<b>model</b>"
    (run / "results.json").write_text(json.dumps(results))
    (run / "config.yaml").write_text("name: </code></pre><img src=x onerror=alert(1)>\n")
    assert cli_main(["report", str(run)]) == 0
    _, page = check_report(run)  # no <script>, every src/href a data: URI
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;" in page
    assert "<b>model</b>" not in page and "&lt;b&gt;model&lt;/b&gt;" in page
    assert "onerror" in page and "<img src=x" not in page
    assert page.startswith("<!DOCTYPE html>")


def test_html_template_ships_as_package_data():
    import fnmatch
    from importlib.resources import files

    tomllib = pytest.importorskip("tomllib")
    template = "report/templates/report.html.j2"
    assert (files("alignguard") / template).is_file()
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["alignguard"]
    assert any(fnmatch.fnmatch(template, p) for p in patterns), patterns
    assert any(d.lower().startswith("jinja2") for d in pyproject["project"]["dependencies"])


def test_aggregate_pairs_prompts_through_paired_flags(tmp_path):
    """Drift reduction is paired over the prompts base, plain LoRA and the method share; a method result that
    misses one of them (an interrupted eval, another prompt file) is paired on the rest instead of failing."""
    from types import SimpleNamespace

    from alignguard.report.compare_table import aggregate

    def dc(flags, ids):
        d = _dc_results(sum(flags) / len(flags))
        d["per_prompt"] = [
            {"id": i, "label": "unsafe", "category": "cyber", "refused": f, "extra": {}} for i, f in zip(ids, flags)
        ]
        return d

    ids = [f"p{i}" for i in range(10)]
    (tmp_path / "base" / "driftcheck").mkdir(parents=True)
    (tmp_path / "base" / "driftcheck" / "results.json").write_text(json.dumps(dc([True] * 10, ids)))
    (tmp_path / "base" / "task.json").write_text(json.dumps({"accuracy": 0.3}))
    runs = {"plain_lora": ([False] * 6 + [True] * 4, ids), "alignguard": ([True] * 8 + [False], ids[1:])}
    for name, (flags, pids) in runs.items():
        mdir = tmp_path / "seed0" / name
        (mdir / "driftcheck").mkdir(parents=True)
        (mdir / "driftcheck" / "results.json").write_text(json.dumps(dc(flags, pids)))
        (mdir / "result.json").write_text(json.dumps({"task": {"accuracy": 0.6}, "mean_step_seconds": 1.0}))
    cfg = SimpleNamespace(out=str(tmp_path), methods=["plain_lora", "alignguard"], seeds=[0], model="m")
    results = aggregate(cfg)
    rows = results["rows"]
    ag = rows["alignguard"]["seeds"][0]
    assert ag["drift"]["value"] == pytest.approx(1 / 9) and ag["drift"]["n"] == 9
    # On p1..p9 plain LoRA lost 5 refusals of 9 and alignguard 1: reduction 1 - (1/9) / (5/9).
    assert ag["drift_reduction"]["value"] == pytest.approx(1 - 1 / 5) and ag["drift_reduction"]["n"] == 9
    assert rows["plain_lora"]["seeds"][0]["drift"]["value"] == pytest.approx(0.6)
    # results.md is written from the in-memory dict (int seed keys) and must equal the one from results.json.
    from alignguard.report.compare_table import format_table

    assert "| alignguard | 60.0 | n/a | 88.9 [" in format_table(results)  # no n_refused in these rows
    assert format_table(results) == format_table(json.loads(json.dumps(results)))


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_html_renders_in_headless_chromium(tmp_path):
    from matplotlib.image import imread

    run = make_compare_run(tmp_path / "run", seeds=(0,))
    assert cli_main(["report", str(run)]) == 0
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        (run / "report.html").resolve().as_uri(),
    ]
    subprocess.run(cmd, check=False, capture_output=True, timeout=120)
    assert shot.is_file()
    pixels = imread(shot)[..., :3].reshape(-1, 3)
    assert len({tuple(p) for p in pixels[::7].tolist()}) > 20  # text, tables and plots, not a blank page


def test_report_code_imports_no_training_code():
    import alignguard.report

    files = list(Path(alignguard.report.__file__).parent.glob("*.py"))
    files.append(Path(alignguard.report.__file__).parent.parent / "cli" / "report.py")
    for path in files:
        imports = [ln for ln in path.read_text().splitlines() if re.match(r"\s*(from|import)\s", ln)]
        bad = [ln for ln in imports if re.search(r"\b(trainer|stages|compare|scaling_run|trl|transformers)\b", ln)]
        assert not bad, (path.name, bad)


def test_report_says_when_the_subspace_files_are_damaged(tmp_path):
    run = make_compare_run(tmp_path / "run", seeds=(0,), scaling=False)
    fdir = next(p.parent for p in run.rglob("subspaces.safetensors"))
    raw = bytearray((fdir / "subspaces.safetensors").read_bytes())
    raw[-64:] = b"\xff" * 64  # NaNs in the last tensor, header intact
    (fdir / "subspaces.safetensors").write_bytes(bytes(raw))
    assert cli_main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "the subspace files are damaged" in _section(md, "## 5.") and "subspaces.safetensors" in md
