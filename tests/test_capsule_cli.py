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


def test_train_then_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert capsule_cli.main(["train", *TINY, "--out", str(out)]) == 0
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
    # The same command again resumes (nothing left to do); a different config is refused.
    assert capsule_cli.main(["train", *TINY, "--out", str(out)]) == 0
    assert "resumed from" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="recon_lambda"):
        capsule_cli.main(["train", *TINY, "--recon_lambda", "0.5", "--out", str(out)])
    # The lambda = 0 control shares stage 1 with the main run: it starts at the end-of-stage-1 checkpoint.
    l0 = tmp_path / "lambda0"
    with pytest.raises(SystemExit, match=r"stage 1 differs .*train\.seed"):
        capsule_cli.main(
            ["train", *TINY, "--recon_lambda", "0", "--seed", "1", "--init_from", str(out), "--out", str(l0)]
        )
    assert capsule_cli.main(["train", *TINY, "--recon_lambda", "0", "--init_from", str(out), "--out", str(l0)]) == 0
    assert "resumed from" in capsys.readouterr().out
    l0_hist = json.loads((l0 / "train_results.json").read_text())
    assert l0_hist["resumed_from"] == 1 and l0_hist["history"][-1]["recon_loss"] is None

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
    ]
    assert capsule_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| split | system |" in printed and "capsule shuffled" in printed
    result = json.loads((ev / "results.json").read_text())
    systems = {r["system"] for r in result["rows"]}
    assert {"capsule zeroed", "capsule shuffled", "full CoT", "no CoT", "capsule (lambda=0) [lambda0]"} <= systems
    assert len(systems) == 6
    assert {r["split"] for r in result["rows"]} == {"eval", "eval_long"}
    for r in result["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["latency_s"] > 0 and r["n"] == 2
        # max_new_tokens plus a forced "Plan:"/"Answer:" prefix (one byte token per character)
        assert 0 < r["visible_tokens"] <= 4 + len("Answer:")
    assert (ev / "accuracy_vs_tokens.png").stat().st_size > 1000 and (ev / "results.md").is_file()
