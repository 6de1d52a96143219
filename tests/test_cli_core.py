"""`alignguard fisher` and `alignguard train` end to end on a tiny model, YAML + flags, resume after a kill.

Run: python -m pytest -q tests/test_cli_core.py
"""

import contextlib
import io
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import Trainer

from alignguard.cli.main import main

FISHER_ARGS = [
    "--model",
    "tiny-llama",
    "--max_examples",
    "8",
    "--max_new_tokens",
    "8",
    "--fixed_m",
    "4",
    "--batch_size",
    "4",
]
TRAIN_ARGS = [
    "--model",
    "tiny-llama",
    "--task",
    "arithmetic",
    "--n_train",
    "16",
    "--max_steps",
    "4",
    "--save_steps",
    "2",
    "--batch_size",
    "2",
    "--lambda_a",
    "10",
]


def _help(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return buf.getvalue()


def test_top_level_help_lists_subcommands():
    text = _help(["--help"])
    for cmd in ("fisher", "train", "eval", "models", "capsule"):
        assert cmd in text


@pytest.mark.parametrize(
    "cmd,flags",
    [
        ("fisher", ["--energy", "--m_min", "--fisher_labels", "--responses", "--mode", "--sketch_rank", "--config"]),
        (
            "train",
            [
                "--lambda_a",
                "--lambda_t",
                "--lambda_nc",
                "--alpha",
                "--geo_metric",
                "--refresh_every",
                "--poison_ratio",
                "--method",
                "--fisher",
                "--config",
            ],
        ),
    ],
)
def test_subcommand_help_lists_every_option(cmd, flags):
    text = _help([cmd, "--help"])
    for flag in flags:
        assert flag in text, flag


@pytest.fixture(scope="module")
def fisher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fisher")
    assert main(["fisher", *FISHER_ARGS, "--out", str(out)]) == 0
    return out


def test_fisher_output_tree(fisher_dir):
    names = {p.name for p in fisher_dir.iterdir()}
    assert {
        "fisher.safetensors",
        "fisher.json",
        "subspaces.safetensors",
        "subspaces.json",
        "config.yaml",
        "fisher_data.json",
    } <= names
    cfg = yaml.safe_load((fisher_dir / "config.yaml").read_text())
    assert cfg["subspace"]["fixed_m"] == 4 and cfg["run"]["model"] == "tiny-llama"
    meta = json.loads((fisher_dir / "subspaces.json").read_text())
    assert all(v["m"] == 4 for v in meta["modules"].values())
    assert len(json.loads((fisher_dir / "fisher_data.json").read_text())) == 8


def test_yaml_config_and_flags_win(tmp_path, fisher_dir):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"lambda_a": 3.0, "max_steps": 1, "learning_rate": 0.01}))
    from alignguard.cli.main import build_parser
    from alignguard.cli.train import resolve

    args = build_parser().parse_args(["train", "--config", str(cfg), "--fisher", str(fisher_dir), "--max_steps", "2"])
    run_cfg, ag_cfg = resolve(args)
    assert ag_cfg.lambda_a == 3.0 and run_cfg.learning_rate == 0.01 and run_cfg.max_steps == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("lambda_z: 1\n")
    with pytest.raises(SystemExit, match="unknown option"):
        resolve(build_parser().parse_args(["train", "--config", str(bad)]))
    with pytest.raises(SystemExit, match="fisher"):
        resolve(build_parser().parse_args(["train", "--method", "alignguard"]))


def test_train_resumes_after_a_kill_with_the_same_result(tmp_path, fisher_dir, monkeypatch):
    argv = ["train", *TRAIN_ARGS, "--fisher", str(fisher_dir)]
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    full = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    assert {"adapter_model.safetensors", "subspaces.safetensors", "alignguard_config.json"} <= {
        p.name for p in (tmp_path / "full" / "adapter").iterdir()
    }

    original = Trainer.training_step

    def dying_step(self, *a, **k):
        if self.state.global_step == 3:
            raise KeyboardInterrupt("killed")
        return original(self, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(tmp_path / "killed")])
    assert not (tmp_path / "killed" / "adapter").exists()
    monkeypatch.setattr(Trainer, "training_step", original)
    assert main([*argv, "--out", str(tmp_path / "killed")]) == 0
    summary = json.loads((tmp_path / "killed" / "train_summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-2"
    resumed = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    for name, tensor in full.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-7)


def test_align_writes_a_merged_model_that_loads(tmp_path):
    from alignguard.models import load_model_and_tokenizer
    from alignguard.tiny import make_tiny_model

    out = tmp_path / "aligned"
    argv = [
        "align",
        "--model",
        "tiny-llama",
        "--out",
        str(out),
        "--max_steps",
        "2",
        "--max_examples",
        "8",
        "--max_new_tokens",
        "4",
        "--batch_size",
        "4",
        "--learning_rate",
        "0.01",
    ]
    assert main(argv) == 0
    assert {"config.json", "model.safetensors", "align_info.json", "align_config.yaml"} <= {
        p.name for p in out.iterdir()
    }
    model, _, _ = load_model_and_tokenizer(str(out))
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged, a plain model
    base = dict(make_tiny_model("llama").named_parameters())
    moved = [n for n, p in model.named_parameters() if not torch.allclose(p, base[n])]
    assert any("q_proj" in n for n in moved) and not any("embed" in n for n in moved)
    info = json.loads((out / "align_info.json").read_text())
    assert info["base_model"] == "tiny-llama" and info["n_examples"] >= 4


def test_recipe_errors_become_one_error_line_and_bugs_keep_their_traceback(monkeypatch):
    from alignguard.cli.common import user_errors_exit

    def bad_input(args):
        raise ValueError("prompts: /x.jsonl holds no unsafe prompts")

    def bug(args):
        raise KeyError("oops")

    with pytest.raises(SystemExit, match=r"^error: prompts: /x\.jsonl holds no unsafe prompts"):
        user_errors_exit(bad_input)(None)
    with pytest.raises(KeyError):
        user_errors_exit(bug)(None)
    monkeypatch.setenv("ALIGNGUARD_TRACEBACK", "1")
    with pytest.raises(ValueError):
        user_errors_exit(bad_input)(None)


def test_compare_without_unsafe_prompts_is_an_error_line_before_any_work(tmp_path):
    from alignguard.cli.main import main

    prompts = tmp_path / "safe.jsonl"
    prompts.write_text('{"id": "s1", "prompt": "How do I bake bread?", "label": "safe"}\n')
    with pytest.raises(SystemExit, match=r"^error: .*unsafe"):
        main(["compare", "--model", "tiny-llama", "--out", str(tmp_path / "c"), "--prompts", str(prompts)])
    assert not (tmp_path / "c" / "fisher").exists()
