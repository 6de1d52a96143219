"""Run folders: the --out guard, complete-checkpoint lookup, settings keys, skip / resume of train and compare.

Unit tests of the helpers first (no model), then end-to-end runs of `alignguard fisher / train / compare` on
tiny-llama sharing module fixtures (each test adds seconds). Run: python -m pytest -q tests/test_run_folders.py
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignguard.cli.main import main
from alignguard.recipes.common import (
    STAGE_KEY_FILE,
    check_output_dir,
    latest_checkpoint,
    settings_diff,
    stage_is_current,
)

# --- latest_checkpoint -------------------------------------------------------------------------------------------


def _fake_checkpoint(root, step, files=("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter.safetensors")):
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for name in files:
        name = "adapter_model.safetensors" if name == "adapter.safetensors" else name
        text = json.dumps({"global_step": step}) if name == "trainer_state.json" else "x"
        (ckpt / name).write_text(text)
    return ckpt


def test_latest_checkpoint_skips_and_removes_half_written_ones(tmp_path):
    good = _fake_checkpoint(tmp_path, 2)
    # A save killed half-way: the adapter is there, optimizer and trainer state are not.
    half = _fake_checkpoint(tmp_path, 4, files=("adapter.safetensors",))
    assert latest_checkpoint(tmp_path, log=None) == good
    assert not half.exists()  # the Trainer would otherwise rotate the good one away at its next save
    assert (tmp_path / "incomplete-checkpoint-4" / "adapter_model.safetensors").is_file()  # kept aside


def test_latest_checkpoint_accepts_deepspeed_optimizer_state(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 2, files=("trainer_state.json", "scheduler.pt", "adapter.safetensors"))
    (ckpt / "global_step2").mkdir()  # DeepSpeed keeps the optimizer state in a folder, not optimizer.pt
    assert latest_checkpoint(tmp_path, log=None) == ckpt


@pytest.mark.parametrize(
    "files, corrupt",
    [
        (("trainer_state.json", "optimizer.pt", "scheduler.pt"), None),  # no adapter weights
        (("trainer_state.json", "scheduler.pt", "adapter.safetensors"), None),  # no optimizer
        (("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter.safetensors"), "{trunc"),
    ],
)
def test_latest_checkpoint_needs_every_file(tmp_path, files, corrupt):
    _fake_checkpoint(tmp_path, 1)
    bad = _fake_checkpoint(tmp_path, 3, files=files)
    if corrupt:
        (bad / "trainer_state.json").write_text(corrupt)
    assert latest_checkpoint(tmp_path, log=None).name == "checkpoint-1"


def test_latest_checkpoint_none_when_all_incomplete(tmp_path):
    _fake_checkpoint(tmp_path, 1, files=("optimizer.pt",))
    assert latest_checkpoint(tmp_path, log=None) is None
    assert latest_checkpoint(tmp_path / "missing", log=None) is None


# --- check_output_dir (the guard every CLI main calls before writing config.yaml) -------------------------------


def test_guard_accepts_new_and_same_run(tmp_path):
    out = tmp_path / "a" / "b"
    check_output_dir(out, "train", {"run": {"lr": 1, "overwrite": False}})
    assert json.loads((out / "run.json").read_text())["command"] == "train"
    (out / "adapter").mkdir()
    # Same settings (overwrite itself does not count): resumable.
    check_output_dir(out, "train", {"run": {"lr": 1, "overwrite": True}}, overwrite=False)
    assert (out / "adapter").is_dir()


def test_guard_refuses_other_settings_naming_fields(tmp_path):
    check_output_dir(tmp_path, "train", {"run": {"lr": 0.001, "method": "alignguard"}})
    (tmp_path / "config.yaml").write_text("run: {}\n")
    with pytest.raises(SystemExit, match=r"run.lr: 0.001 -> 0.01.*run.method: 'alignguard' -> 'lora'.*--overwrite"):
        check_output_dir(tmp_path, "train", {"run": {"lr": 0.01, "method": "lora"}})
    assert (tmp_path / "config.yaml").read_text() == "run: {}\n"  # nothing changed


def test_guard_resumes_a_run_recorded_before_a_field_was_added_only_at_its_default(tmp_path):
    """A field the recorded run lacks behaved as its default (new options default to the old behaviour): resumable
    at the default, refused (naming the field) at any other value."""
    from dataclasses import dataclass, field

    @dataclass
    class Old:
        lr: float = 0.1

    @dataclass
    class New:
        lr: float = 0.1
        new_weight: float = 0.0
        new_list: list = field(default_factory=lambda: [1, 2])

    check_output_dir(tmp_path, "train", {"run": Old()})
    (tmp_path / "adapter").mkdir()
    check_output_dir(tmp_path, "train", {"run": New()})  # the new fields at their defaults: the same run
    (tmp_path / "run.json").write_text(json.dumps({"command": "train", "settings": {"run": {"lr": 0.1}}}))
    with pytest.raises(SystemExit, match=r"run.new_weight: 0.0 -> 1.0"):
        check_output_dir(tmp_path, "train", {"run": New(new_weight=1.0)})
    with pytest.raises(SystemExit, match=r"run.lr: 0.1 -> 0.2"):
        check_output_dir(tmp_path, "train", {"run": New(lr=0.2)})
    assert (tmp_path / "adapter").is_dir()


def test_guard_refuses_other_command_and_foreign_files(tmp_path):
    check_output_dir(tmp_path / "f", "fisher", {"run": {}})
    with pytest.raises(SystemExit, match=r"alignguard fisher.*not an `alignguard compare`"):
        check_output_dir(tmp_path / "f", "compare", {"compare": {}})
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"--out .*g: is not empty \(notes.txt\)"):
        check_output_dir(tmp_path / "g", "train", {"run": {}})
    assert (tmp_path / "g" / "notes.txt").read_text() == "mine"


def test_guard_stage_keyed_commands_only_need_the_command(tmp_path):
    check_output_dir(tmp_path, "compare", {"compare": {"model": "a"}})
    (tmp_path / "results.json").write_text("{}")
    check_output_dir(tmp_path, "compare", {"compare": {"model": "b"}})  # its stages are keyed themselves
    assert (tmp_path / "results.json").is_file()


def test_guard_recognises_runs_from_before_run_json(tmp_path):
    (tmp_path / "config.yaml").write_text("run:\n  lr: 1\nalignguard:\n  lambda_a: 2\n")
    (tmp_path / "adapter").mkdir()
    check_output_dir(tmp_path, "train", {"run": {"lr": 1}, "alignguard": {"lambda_a": 2}})
    with pytest.raises(SystemExit, match=r"alignguard.lambda_a: 2 -> 3"):
        check_output_dir(tmp_path, "train", {"run": {"lr": 1}, "alignguard": {"lambda_a": 3}})


def test_guard_overwrite_empties_the_folder(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "README.md").write_text("x")
    (tmp_path / "results.json").write_text("{}")
    check_output_dir(tmp_path, "eval", {"eval": {}}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_guard_unwritable_out_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"--out .*file/run: cannot write there"):
        check_output_dir(tmp_path / "file" / "run", "train", {})


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_guard_read_only_out(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(SystemExit, match=r"--out .*ro: cannot write there"):
            check_output_dir(ro, "train", {})
    finally:
        ro.chmod(0o755)


def test_guard_read_only_out_simulated(tmp_path, monkeypatch):
    # Root (CI containers) can write into a 0555 folder, so the permission error is simulated at the probe.
    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(SystemExit, match=r"--out .*: cannot write there \(Permission denied\)"):
        check_output_dir(tmp_path, "train", {})


# --- stage keys ---------------------------------------------------------------------------------------------------


def test_stage_is_current_reuses_resumes_and_supersedes(tmp_path):
    stage = tmp_path / "fisher"
    lines = []
    assert not stage_is_current(stage, {"model": "a"}, stage / "done", tmp_path, "fisher", lines.append)
    (stage / "partial").write_text("ckpt")
    assert not stage_is_current(stage, {"model": "a"}, stage / "done", tmp_path, "fisher", lines.append)
    assert (stage / "partial").is_file()  # same settings, unfinished: kept for resuming
    (stage / "done").write_text("1")
    assert stage_is_current(stage, {"model": "a"}, stage / "done", tmp_path, "fisher", lines.append)
    assert not stage_is_current(stage, {"model": "b"}, stage / "done", tmp_path, "fisher", lines.append)
    assert "model: 'a' -> 'b'" in lines[-1]
    moved = list((tmp_path / "superseded").iterdir())
    assert len(moved) == 1 and (moved[0] / "done").is_file()  # the old outputs are kept, not deleted
    assert sorted(p.name for p in stage.iterdir()) == [STAGE_KEY_FILE]


def test_stage_keyed_by_an_earlier_form_of_its_settings_is_reused_and_rekeyed(tmp_path):
    old_form, new_form = {"train": {"fisher": "/elsewhere/fisher"}}, {"train": {"fisher": "<stage>"}}
    lines = []
    for name in ("a", "b"):
        assert not stage_is_current(tmp_path / name, old_form, tmp_path / name / "done", tmp_path, name, lines.append)
        (tmp_path / name / "done").write_text("1")
    stage = tmp_path / "a"
    assert stage_is_current(stage, new_form, stage / "done", tmp_path, "a", lines.append, (old_form,))
    assert lines[-1].startswith("[a] reused")
    assert json.loads((stage / STAGE_KEY_FILE).read_text())["settings"] == new_form  # rekeyed in the new form
    assert stage_is_current(stage, new_form, stage / "done", tmp_path, "a", lines.append)
    # Without the earlier form, other settings: redone.
    assert not stage_is_current(tmp_path / "b", new_form, tmp_path / "b" / "done", tmp_path, "b", lines.append)


def test_stage_without_key_is_redone(tmp_path):
    stage = tmp_path / "base"
    stage.mkdir()
    (stage / "task.json").write_text("{}")
    lines = []
    assert not stage_is_current(stage, {"x": 1}, stage / "task.json", tmp_path, "base", lines.append)
    assert "no stage_key.json" in lines[-1]


def test_settings_diff_names_dotted_fields():
    assert settings_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == [
        "a.c: 2 -> 3",
        "d: '(unset)' -> 4",
    ]


# --- alignguard fisher / train end to end ----------------------------------------------------------------------

TRAIN = [
    "--model",
    "tiny-llama",
    "--task",
    "arithmetic",
    "--n_train",
    "8",
    "--max_steps",
    "2",
    "--save_steps",
    "1",
    "--batch_size",
    "2",
    "--max_length",
    "64",
    "--target_modules",
    "q_proj",
    "v_proj",
]


@pytest.fixture(scope="module")
def fisher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fisher") / "f"
    argv = ["fisher", "--model", "tiny-llama", "--out", str(out), "--max_examples", "4", "--responses", "dataset"]
    argv += ["--batch_size", "2", "--max_length", "64", "--fisher_modules", "q_proj", "v_proj"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def trained(fisher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "t"
    argv = ["train", *TRAIN, "--fisher", str(fisher_dir), "--out", str(out)]
    assert main(argv) == 0
    return out, argv


def test_fisher_records_its_batching(fisher_dir):
    assert json.loads((fisher_dir / "fisher_batches.json").read_text()) == {
        "batch_size": 2,
        "max_length": 64,
        "min_response_tokens": 16,
    }


def test_finished_train_is_skipped_with_summary_intact(trained, capsys):
    out, argv = trained
    before = (out / "train_summary.json").read_text()
    summary = json.loads(before)
    assert summary["train_loss"] > 0 and summary["mean_step_seconds"] is not None
    assert main(argv) == 0
    assert "skipped" in capsys.readouterr().out
    assert (out / "train_summary.json").read_text() == before


def test_train_resume_with_other_config_is_refused(trained):
    out, argv = trained
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(SystemExit, match=r"learning_rate: 0.001 -> 0.01.*method: 'alignguard' -> 'lora'"):
        main([*argv, "--method", "lora", "--learning_rate", "0.01"])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == files


def test_run_train_refuses_other_settings_as_a_library_call(trained):
    from alignguard.recipes.train import TrainRunConfig, TrainSettingsMismatch, run_train

    out, _ = trained
    cfg = TrainRunConfig(model="tiny-llama", out=str(out), method="lora", task="arithmetic", n_train=8)
    with pytest.raises(TrainSettingsMismatch, match=r"train_settings.json: .*train.method: 'alignguard' -> 'lora'"):
        run_train(cfg)


def test_resume_from_newest_complete_checkpoint_after_kill(trained, tmp_path):
    out, argv = trained
    run = tmp_path / "t"
    shutil.copytree(out, run)
    old = json.loads((run / "train_summary.json").read_text())
    # Killed after checkpoint-2 was complete but before the summary, while a checkpoint-3 was half written.
    (run / "train_summary.json").unlink()
    shutil.rmtree(run / "adapter")
    half = run / "checkpoints" / "checkpoint-3"
    half.mkdir()
    shutil.copy(run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors", half)
    argv = [a if a != str(out) else str(run) for a in argv]
    assert main(argv) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-2" and summary["steps"] == 2
    # Not the 0.0 loss and missing step time of a resume that trains no step.
    assert summary["train_loss"] == pytest.approx(old["train_loss"], rel=1e-3) and summary["train_loss"] > 0
    assert summary["mean_step_seconds"] == pytest.approx(old["mean_step_seconds"])
    assert not half.exists() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "incomplete-checkpoint-3").is_dir()


def test_refresh_every_from_the_cli(fisher_dir, tmp_path):
    out = tmp_path / "r"
    argv = ["train", *TRAIN, "--fisher", str(fisher_dir), "--out", str(out), "--refresh_every", "1"]
    argv += ["--learning_rate", "0.05"]
    assert main(argv) == 0
    before = load_file(str(fisher_dir / "subspaces.safetensors"))
    after = load_file(str(out / "adapter" / "subspaces.safetensors"))
    assert set(after) == set(before)
    assert any(
        after[k].shape != before[k].shape or not bool((after[k] - before[k]).abs().max() < 1e-6) for k in before
    )


def test_unprotected_layers_are_recorded(fisher_dir, tmp_path):
    from alignguard.config import AlignGuardConfig

    if "allow_unprotected" not in AlignGuardConfig.__dataclass_fields__:
        pytest.skip("AlignGuardConfig.allow_unprotected not there yet")
    out = tmp_path / "u"
    argv = ["train", *TRAIN, "k_proj", "--fisher", str(fisher_dir), "--out", str(out)]
    assert main([*argv, "--allow_unprotected", "true", "--max_steps", "1"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["n_unprotected_layers"] == len(summary["unprotected_layers"]) > 0
    assert all("k_proj" in name for name in summary["unprotected_layers"])


def test_refresh_resume_continues_from_the_checkpoint_subspaces(fisher_dir, tmp_path):
    out = tmp_path / "r"
    argv = ["train", *TRAIN, "--fisher", str(fisher_dir), "--out", str(out), "--refresh_every", "1"]
    argv += ["--learning_rate", "0.05"]
    assert main(argv) == 0
    ckpt = out / "checkpoints" / "checkpoint-2"
    refreshed = load_file(str(ckpt / "subspaces.safetensors"))
    # Killed after the last checkpoint: the resumed run must keep the refreshed subspaces, not the initial ones.
    (out / "train_summary.json").unlink()
    shutil.rmtree(out / "adapter")
    assert main(argv) == 0
    saved = load_file(str(out / "adapter" / "subspaces.safetensors"))
    assert set(saved) == set(refreshed) and all(bool((saved[k] == refreshed[k]).all()) for k in saved)


def test_overwrite_replaces_an_alignguard_run_with_a_lora_one(trained, tmp_path):
    out, argv = trained
    run = tmp_path / "t"
    shutil.copytree(out, run)
    argv = [a if a != str(out) else str(run) for a in argv]
    assert main([*argv, "--method", "lora", "--learning_rate", "0.01", "--overwrite", "true"]) == 0
    assert not (run / "adapter" / "alignguard_config.json").exists()  # no AlignGuard file left from before
    assert json.loads((run / "train_summary.json").read_text())["method"] == "lora"
    assert json.loads((run / "run.json").read_text())["settings"]["run"]["method"] == "lora"


def test_other_command_into_a_train_folder_is_refused_before_any_work(trained, monkeypatch):
    import alignguard.models

    out, _ = trained
    before = {str(p): p.stat().st_mtime_ns for p in out.rglob("*")}
    monkeypatch.setattr(alignguard.models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit, match=r"holds an `alignguard train` run .*not an `alignguard fisher` one"):
        main(["fisher", "--model", "tiny-llama", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"holds an `alignguard train` run"):
        main(["eval", "--model", "tiny-llama", "--out", str(out)])
    assert {str(p): p.stat().st_mtime_ns for p in out.rglob("*")} == before  # config.yaml etc. untouched


def test_unwritable_out_fails_before_any_work(tmp_path, monkeypatch):
    import alignguard.models

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(alignguard.models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit, match=r"error: --out .*file/t: cannot write there"):
        main(["train", *TRAIN, "--method", "lora", "--out", str(tmp_path / "file" / "t")])


def test_finished_align_is_skipped(tmp_path, capsys):
    out = tmp_path / "aligned"
    argv = ["align", "--model", "tiny-llama", "--out", str(out), "--max_steps", "1", "--max_examples", "4"]
    argv += ["--batch_size", "2", "--max_length", "160", "--max_new_tokens", "2", "--lora_r", "2"]
    assert main(argv) == 0
    info = (out / "align_info.json").read_text()
    capsys.readouterr()
    assert main(argv) == 0
    assert "skipped" in capsys.readouterr().out and (out / "align_info.json").read_text() == info
    # A model aligned with the same settings by another command (the demo's cache holds no run.json) is adopted,
    # not refused; one aligned with other settings still is, and nothing in it changes.
    cache = tmp_path / "cache"
    shutil.copytree(out, cache)
    (cache / "run.json").unlink()
    (cache / "align_config.yaml").unlink()
    adopt = [a if a != str(out) else str(cache) for a in argv]
    assert main(adopt) == 0
    printed = capsys.readouterr().out
    assert "adopted" in printed and "skipped" in printed and (cache / "align_info.json").read_text() == info
    assert json.loads((cache / "run.json").read_text())["command"] == "align"
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    (other / "run.json").unlink()
    (other / "align_config.yaml").unlink()
    before = {str(p): p.stat().st_mtime_ns for p in other.rglob("*")}
    with pytest.raises(SystemExit, match=r"holds no `alignguard align` run"):
        main([a if a != str(out) else str(other) for a in argv] + ["--learning_rate", "0.5"])
    assert {str(p): p.stat().st_mtime_ns for p in other.rglob("*")} == before


def test_train_from_before_settings_files_is_skipped_when_config_matches(trained, tmp_path, capsys):
    out, argv = trained
    run = tmp_path / "t"
    shutil.copytree(out, run)
    (run / "run.json").unlink()
    (run / "train_settings.json").unlink()
    before = (run / "train_summary.json").read_text()
    argv = [a if a != str(out) else str(run) for a in argv]
    assert main(argv) == 0
    assert "skipped" in capsys.readouterr().out and (run / "train_summary.json").read_text() == before
    assert (run / "train_settings.json").is_file()


def test_finished_fisher_is_skipped(fisher_dir, capsys, monkeypatch):
    import alignguard.models

    argv = [
        "fisher",
        "--model",
        "tiny-llama",
        "--out",
        str(fisher_dir),
        "--max_examples",
        "4",
        "--responses",
        "dataset",
    ]
    argv += ["--batch_size", "2", "--max_length", "64", "--fisher_modules", "q_proj", "v_proj"]
    before = {p.name: p.stat().st_mtime_ns for p in fisher_dir.glob("*.safetensors")}
    monkeypatch.setattr(alignguard.models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    assert main(argv) == 0
    assert "skipped" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in fisher_dir.glob("*.safetensors")} == before


def test_guard_overwrite_never_empties_the_working_folder_or_a_folder_above_it(tmp_path, monkeypatch):
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for out in (work, tmp_path / "project", Path("..")):
        with pytest.raises(SystemExit, match="refuses to empty the working folder or a folder above it"):
            check_output_dir(out, "eval", {"eval": {}}, overwrite=True)
    assert (work / "keep.txt").read_text() == "x"
