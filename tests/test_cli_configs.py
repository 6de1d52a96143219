"""The CLI's config plumbing (alignguard.cli.common.Command) on every subcommand, without running any stage.

Checks: no two configs of one command expose the same field; the demo's nested stage configs (namespaced flags,
YAML sections, help, nested saved YAML, the old flat flags, the same defaults and aligned-model cache key as
before); YAML values converted and checked like flags, errors naming the key; bad values refused before any work,
naming the field; one wiring pattern and both flag spellings everywhere.

Run: python -m pytest -q tests/test_cli_configs.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io

import pytest
import yaml

from alignguard.cli import common
from alignguard.cli.main import COMMANDS, build_parser, main

# Commands without config dataclasses (plain argparse, a positional run folder / a listing).
NO_CONFIGS = {"report", "models"}
# Field names that two configs of one command may both expose, with the reason. None today: where two configs
# hold a name, the command sets one of them itself (compare/scaling: TrainRunConfig.model/out/seed from
# --model/--out/--seed(s), `Section.set_by_command`), so it gets no flag and no YAML key of its own.
SHARED: dict[tuple[str, str], str] = {}


def _subparsers(parser: argparse.ArgumentParser, prefix: str = ""):
    """(`command path`, parser) of every subcommand, capsule's nested ones included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix}{name}"
                yield path, sub
                yield from _subparsers(sub, f"{path} ")


def _resolve(argv: list[str]):
    """Parse `argv` and resolve its configs the way the command's `main` does (nothing runs)."""
    args = build_parser().parse_args(argv)
    if argv[0] in COMMANDS and argv[0] != "capsule":
        return importlib.import_module(COMMANDS[argv[0]]).resolve(args)
    return args._command.resolve(args)


def _commands():
    return [(path, sub) for path, sub in _subparsers(build_parser()) if path not in NO_CONFIGS | {"capsule"}]


def test_every_config_command_uses_the_one_helper():
    paths = {path for path, _ in _subparsers(build_parser())}
    assert set(COMMANDS) <= paths and {"capsule train", "capsule eval"} <= paths
    for path, sub in _commands():
        assert isinstance(sub.get_default("_command"), common.Command), f"{path} is wired by hand"


@pytest.mark.parametrize("path", [p for p, _ in _commands()])
def test_no_two_configs_of_a_command_expose_the_same_field(path):
    command = dict(_commands())[path].get_default("_command")
    owners: dict[str, list[str]] = {}
    for section in command.sections:
        for f in dataclasses.fields(section.cls):
            if f.init and f.metadata.get("cli") is not False and f.name not in section.set_by_command:
                owners.setdefault(f.name, []).append(f"{section.cls.__name__}")
    clashes = {n: o for n, o in owners.items() if len(o) > 1 and (path, n) not in SHARED}
    assert not clashes, f"alignguard {path}: one flag / YAML key would feed several configs: {clashes}"


def test_a_collision_is_refused_when_the_command_is_built():
    @dataclasses.dataclass
    class A:
        seed: int = dataclasses.field(default=0, metadata={"help": "a"})

    @dataclasses.dataclass
    class B:
        seed: int = dataclasses.field(default=1, metadata={"help": "b"})

    with pytest.raises(ValueError, match="seed"):
        common.Command("x", "x", "x", [common.Section("a", A), common.Section("b", B)])
    command = common.Command("x", "x", "x", [common.Section("a", A), common.Section("b", B, ("seed",))])
    assert command.exposed() == {"seed": ["a"]}


# ---------------------------------------------------------------- both spellings, everywhere


@pytest.mark.parametrize("path", [p for p, _ in _commands()])
def test_every_underscore_flag_also_has_the_dashed_spelling(path):
    sub = dict(_commands())[path]
    flags = set(sub._option_string_actions)
    for flag in flags:
        if flag.startswith("--") and "_" in flag:
            assert flag.replace("_", "-") in flags, flag
            assert sub._option_string_actions[flag] is sub._option_string_actions[flag.replace("_", "-")]


def test_dashed_and_underscored_flags_give_the_same_config(tmp_path):
    from alignguard.cli import fisher

    a = fisher.resolve(build_parser().parse_args(["fisher", "--max_new_tokens", "7", "--fisher-storage", "sketch"]))
    b = fisher.resolve(build_parser().parse_args(["fisher", "--max-new-tokens", "7", "--fisher_storage", "sketch"]))
    assert a == b and a[0].max_new_tokens == 7 and a[1].fisher_storage == "sketch"


# ---------------------------------------------------------------- the demo's nested configs


def _demo(argv, tmp_path=None, yaml_values=None):
    from alignguard.cli import demo

    if yaml_values is not None:
        path = tmp_path / "demo.yaml"
        path.write_text(yaml.safe_dump(yaml_values))
        argv = [*argv, "--config", str(path)]
    (cfg,) = demo.resolve(build_parser().parse_args(["demo", *argv]))
    return cfg


def test_demo_defaults_are_the_old_hand_mapped_ones(tmp_path):
    cfg = _demo(["--out", "runs/demo", "--cache_dir", str(tmp_path)])
    t, a, h = cfg.train, cfg.align, cfg.harness
    assert (cfg.out, cfg.model, cfg.methods, cfg.seeds) == (
        "runs/demo",
        "smollm2-135m-instruct",
        ["plain_lora", "plain_lora@poison_ratio=0", "alignguard"],
        [0],
    )
    assert (t.method, t.task, t.n_train, t.poison_ratio, t.max_steps) == ("lora", "word_problems_easy", 96, 0.2, 30)
    assert (t.lora_r, t.lora_alpha, t.learning_rate, t.max_length, t.save_steps, t.seed) == (8, 16.0, 2e-3, 256, 15, 0)
    assert (t.batch_size, t.grad_accum, t.lora_dropout, t.use_rslora, t.fisher) == (4, 1, 0.0, False, None)
    assert (t.out, t.model) == ("runs/demo", a.out)  # the task runs on the aligned copy
    # The demo's alignment is run a2 of docs/alignment.md (SFT + a short DPO stage, no report).
    assert (a.model, a.max_steps, a.max_examples, a.learning_rate, a.safe_fraction) == (cfg.model, 20, 128, 1e-3, 0.65)
    assert (a.max_new_tokens, a.lora_r, a.lora_alpha, a.batch_size) == (48, 16, 32.0, 8)
    assert (a.lookalike_fraction, a.dpo_steps, a.dpo_learning_rate, a.eval_prompts) == (0.5, 8, 2e-4, "none")
    assert (h.eval_max_new_tokens, h.task_eval_n, h.fisher_examples, h.prompts, h.extra_judges) == (
        32,
        100,
        64,
        "demo",
        ["learned"],
    )
    assert cfg.alignguard.lambda_a == 100.0 and cfg.alignguard.lambda_t == 0.01
    assert cfg.fisher == type(cfg.fisher)() and cfg.subspace == type(cfg.subspace)()


def test_demo_aligned_model_cache_key_is_pinned(tmp_path):
    # The alignment v2 settings (data v2 + DPO) made another model than v1, and session 8's homework prompts changed
    # the data file (its sha256 is in the key), so the key changed on purpose (docs/alignment.md); it must not
    # change again by accident (a new field at its default stays out of it).
    cfg = _demo(["--cache_dir", str(tmp_path)])
    assert cfg.align.out == str(tmp_path / "smollm2-135m-instruct-6c7ed11a6111")
    assert _demo(["--cache_dir", str(tmp_path), "--overwrite", "true"]).align.out == cfg.align.out
    assert _demo(["--cache_dir", str(tmp_path), "--align.max_steps", "17"]).align.out != cfg.align.out


def test_demo_namespaced_flags_and_yaml_sections(tmp_path):
    cfg = _demo(["--train.max_steps", "2", "--alignguard.lambda_a", "10", "--align.max_steps", "1"])
    assert (cfg.train.max_steps, cfg.alignguard.lambda_a, cfg.align.max_steps) == (2, 10.0, 1)
    assert cfg.train.save_steps == 1 and cfg.train.n_train == 96  # derived; the other defaults stay the demo's
    values = {
        "train": {"max_steps": 4, "lora_r": 4},
        "harness": {"task_eval_n": 3},
        "fisher": {"fisher_labels": "empirical"},
    }
    cfg = _demo(["--train.lora-r", "2"], tmp_path, values)
    assert (cfg.train.max_steps, cfg.train.lora_r, cfg.harness.task_eval_n) == (4, 2, 3)  # the flag wins
    assert cfg.fisher.fisher_labels == "empirical" and cfg.train.poison_ratio == 0.2


def test_demo_old_flat_flags_and_keys_still_work(tmp_path):
    cfg = _demo(
        ["--max_steps", "3", "--align_steps", "2", "--lambda_a", "5", "--task_eval_n", "4", "--task", "arithmetic"]
    )
    assert (cfg.train.max_steps, cfg.align.max_steps, cfg.alignguard.lambda_a) == (3, 2, 5.0)
    assert (cfg.harness.task_eval_n, cfg.train.task) == (4, "arithmetic")
    cfg = _demo([], tmp_path, {"max_steps": 6, "align_examples": 12, "poison_ratio": 0.1})
    assert (cfg.train.max_steps, cfg.align.max_examples, cfg.train.poison_ratio) == (6, 12, 0.1)
    with pytest.raises(SystemExit, match="not both"):
        _demo([], tmp_path, {"max_steps": 6, "train": {"max_steps": 7}})


def test_demo_fields_the_demo_sets_have_no_flag_or_key(tmp_path):
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["demo", "--train.method", "alignguard"])
    with pytest.raises(SystemExit, match=r"train\.model"):
        _demo([], tmp_path, {"train": {"model": "x"}})
    with pytest.raises(SystemExit, match=r"align\.max_stepz"):
        _demo([], tmp_path, {"align": {"max_stepz": 1}})


def test_demo_help_lists_nested_flags_with_help_text():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(buf.getvalue().split())
    for flag, help_word in [
        ("--train.max_steps", "Optimizer steps. (default: 30)"),
        ("--alignguard.lambda_a", "Weight of the alignment term R_A. (default: 100.0)"),
        ("--align.max_steps", "SFT optimizer steps. (default: 20)"),
        ("--harness.task_eval_n", "(default: 100)"),
        ("--fisher.fisher_labels", "sampled"),
        ("--subspace.energy", "(default: 0.9)"),
    ]:
        assert flag in text and help_word in text, flag


def test_demo_saves_its_resolved_config_nested(tmp_path, monkeypatch):
    from alignguard.cli import demo

    seen = {}
    monkeypatch.setattr(
        demo, "run_demo", lambda cfg: seen.setdefault("cfg", cfg) and {"table": "", "seconds": 0, "report": None}
    )
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--train.max_steps", "2", "--cache_dir", str(tmp_path / "c")]) == 0
    saved = yaml.safe_load((out / "demo_config.yaml").read_text())["demo"]
    assert saved["train"]["max_steps"] == 2 and saved["train"]["model"] == seen["cfg"].align.out
    assert saved["alignguard"]["lambda_a"] == 100.0 and saved["align"]["max_examples"] == 128


# ---------------------------------------------------------------- YAML values are converted like flags


def _train(tmp_path, values, *flags):
    from alignguard.cli import train

    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(values) if isinstance(values, dict) else values)
    return train.resolve(build_parser().parse_args(["train", "--config", str(path), "--method", "lora", *flags]))


@pytest.mark.parametrize(
    "text,message",
    [
        ("method: AlignGuard", r"method: 'AlignGuard' is not one of \['lora', 'alignguard'\]"),
        ("task: BBC_topic", r"task: 'BBC_topic' is not one of"),
        ("max_steps: two", r"max_steps: expected an integer, got 'two'"),
        ("max_steps: 2.7", r"max_steps: expected an integer, got 2.7"),
        ("max_steps: true", r"max_steps: expected an integer, got True"),
        ("max_steps: null", r"max_steps: must be set"),
        ("use_rslora: maybe", r"use_rslora: expected true or false"),
        ("learning_rate: fast", r"learning_rate: expected a number, got 'fast'"),
        ("target_modules: [q_proj, 3.5, [x]]", r"target_modules: item 2: expected a string"),
        ("lambda_a: [1, 2]", r"lambda_a: expected a number"),
        ("mode: Project", r"mode: 'Project' is not one of \['penalty', 'project'\]"),
    ],
)
def test_bad_yaml_values_are_errors_naming_file_and_key(tmp_path, text, message):
    with pytest.raises(SystemExit, match=rf"--config .*train\.yaml: {message}"):
        _train(tmp_path, text + "\n")


def test_yaml_values_coerced_like_flags(tmp_path):
    run, ag = _train(tmp_path, 'use_rslora: "no"\nlearning_rate: 2e-3\nmax_steps: "3"\nrefresh_every: null\n')
    assert run.use_rslora is False and run.learning_rate == 0.002 and run.max_steps == 3 and ag.refresh_every is None
    run, _ = _train(tmp_path, "use_rslora: yes\ntarget_modules: q_proj\nlora_alpha: 8\n")
    assert run.use_rslora is True and run.target_modules == ["q_proj"] and run.lora_alpha == 8.0
    flags, _ = _train(tmp_path, "{}", "--use_rslora", "no", "--refresh_every", "none")
    assert flags.use_rslora is False


@pytest.mark.parametrize(
    "cmd,text,message",
    [
        ("fisher", "fisher_prompts: Unsafe", r"fisher_prompts: 'Unsafe' is not one of \['unsafe', 'all'\]"),
        ("fisher", "responses: Dataset", r"responses: 'Dataset' is not one of \['model', 'dataset'\]"),
        ("fisher", "fisher_storage: Sketch", r"fisher_storage: 'Sketch' is not one of"),
        ("compare", "seeds: [0, x]", r"seeds: item 1: expected an integer, got 'x'"),
        ("eval", "label: Unsafe", r"label: 'Unsafe' is not one of \['safe', 'unsafe'\]"),
        ("demo", "train: {max_steps: 2.7}", r"train\.max_steps: expected an integer, got 2.7"),
        ("demo", "train: 3", r"train: expected a mapping"),
        ("capsule train", "cot_steps: many", r"cot_steps: expected an integer"),
    ],
)
def test_every_command_converts_yaml_values(tmp_path, cmd, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    extra = {"eval": ["--model", "m", "--out", "o"], "capsule train": ["--out", str(tmp_path / "o")]}.get(cmd, [])
    with pytest.raises(SystemExit, match=message):
        _resolve([*cmd.split(), "--config", str(path), *extra])


# ---------------------------------------------------------------- bad values refused before any work


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--learning_rate", "-0.1"], r"learning_rate: must be > 0, got -0.1"),
        (["train", "--learning_rate", "0"], r"learning_rate: must be > 0"),
        (["train", "--seed", "-5"], r"seed: must be >= 0, got -5"),
        (["train", "--lora_dropout", "1.5"], r"lora_dropout: must be in \[0, 1\), got 1.5"),
        (["train", "--max_length", "0"], r"max_length: must be >= 1"),
        (["train", "--lora_alpha", "-16"], r"lora_alpha: must be > 0"),
        (["align", "--learning_rate", "0"], r"learning_rate: must be > 0"),
        (["align", "--seed", "-1"], r"seed: must be >= 0"),
        (["align", "--max_examples", "0"], r"max_examples: must be >= 1"),
        (["fisher", "--seed", "-1"], r"seed: must be >= 0"),
        (["fisher", "--max_new_tokens", "0"], r"max_new_tokens: must be >= 1"),
        (["eval", "--model", "m", "--out", "o", "--judge", "nosuchjudge"], r"--judge: unknown judge 'nosuchjudge'"),
        (["eval", "--model", "m", "--out", "o", "--seed", "-1"], r"--seed must be >= 0"),
        (["eval", "--model", "m", "--out", "o", "--extra-judges", "x"], r"--extra-judges: unknown judge 'x'"),
        (
            ["compare", "--methods", "alignguard@lambda_a=abc"],
            r"alignguard@lambda_a=abc'.*lambda_a: expected a number",
        ),
        (["compare", "--methods", "alignguard@lambda_a=-1"], r"lambda_a: must be >= 0"),
        (["compare", "--methods", "alignguard@mode=clip"], r"mode: 'clip' is not one of"),
        (["compare", "--seeds", "-1"], r"seeds: give one or more seeds >= 0"),
        (["compare", "--safe_lora_threshold", "2"], r"safe_lora_threshold: must be in \[-1, 1\]"),
        (["compare", "--extra_judges", "nope"], r"extra_judges: unknown judge 'nope'"),
        (["scaling", "--seed", "-1"], r"seed: must be >= 0"),
        (["demo", "--seeds", "-1"], r"seeds: give one or more seeds >= 0"),
        (["demo", "--train.lora_dropout", "1.5"], r"train\.lora_dropout: must be in \[0, 1\)"),
        (["demo", "--methods", "alignguard@lambda_a=abc"], r"lambda_a: expected a number"),
    ],
)
def test_bad_values_are_refused_naming_the_field(argv, message):
    with pytest.raises(SystemExit, match=message):
        _resolve(argv)


def test_bad_flag_values_are_argparse_errors_naming_the_flag():
    for argv, message in [
        (["train", "--max_steps", "2.7"], "--max_steps/--max-steps: expected an integer, got '2.7'"),
        (["train", "--method", "AlignGuard"], "--method: 'AlignGuard' is not one of ['lora', 'alignguard']"),
        (["demo", "--train.use_rslora", "maybe"], "--train.use_rslora/--train.use-rslora: expected true or false"),
    ]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        assert message in err.getvalue(), err.getvalue()


def test_a_classifier_folder_is_still_a_valid_judge(tmp_path):
    from alignguard.recipes.eval import JUDGE_NAMES, EvalConfig

    assert EvalConfig(model="m", out="o", judge=str(tmp_path)).judge == str(tmp_path)
    from alignguard.driftcheck.judge import get_judge

    for name in JUDGE_NAMES:  # the names the config accepts are the ones the judge module resolves
        try:
            get_judge(name)
        except ImportError:
            pass  # the embedding judge's weights are optional; the name itself is known


def test_python_users_get_the_same_checks():
    from alignguard.recipes.compare import CompareConfig, method_spec
    from alignguard.recipes.train import TrainRunConfig

    with pytest.raises(ValueError, match=r"^learning_rate: must be > 0"):
        TrainRunConfig(method="lora", learning_rate=0)
    with pytest.raises(ValueError, match="lambda_a: expected a number"):
        CompareConfig(methods=["alignguard@lambda_a=abc"])
    assert method_spec("alignguard@refresh_every=none")["ag"] == {"refresh_every": None}


def test_compare_sets_the_training_fields_it_owns(tmp_path):
    cmp, train, *_ = _resolve(["compare", "--model", "tiny-llama", "--out", str(tmp_path), "--max_steps", "3"])
    assert (train.model, train.out, train.method, train.fisher, train.seed) == (
        "tiny-llama",
        str(tmp_path),
        "lora",
        None,
        0,
    )
    assert train.max_steps == 3 and cmp.model == "tiny-llama"
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\nmethod: alignguard\n")
    with pytest.raises(SystemExit, match=r"\['method', 'seed'\]: set by `alignguard compare` itself"):
        _resolve(["compare", "--config", str(path)])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--method", "lora"])
    assert "unrecognized arguments: --method lora" in err.getvalue()  # not an abbreviation of --methods


def test_a_bare_boolean_flag_means_true():
    run, _ = _resolve(["train", "--method", "lora", "--use_rslora", "--max_steps", "2"])
    assert run.use_rslora is True and run.max_steps == 2
    run, _ = _resolve(["train", "--method", "lora", "--use-rslora", "no"])
    assert run.use_rslora is False
    (cfg,) = _resolve(["demo", "--overwrite", "--train.use_rslora"])
    assert cfg.overwrite is True and cfg.train.use_rslora is True
