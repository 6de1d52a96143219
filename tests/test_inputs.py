"""Bad user inputs get one clear error naming the file and the fix: model folders, prompt and alignment files,
over-long prompts, a baseline from another prompt set, LoRA targets; and the renderer training and DriftCheck share.

Run: python -m pytest -q tests/test_inputs.py
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from alignguard.data import load_alignment_data, render_prompt, tokenize_example
from alignguard.driftcheck.generate import (
    GenerationSettings,
    format_prompt,
    generate_responses,
    prompt_token_limit,
)
from alignguard.driftcheck.prompts import PromptFileError, load_prompts, prompt_token_ids
from alignguard.driftcheck.run import BaselineMismatchError, ModelPathError, check_baseline_prompts, run_driftcheck
from alignguard.models import ModelLoadError, load_model_and_tokenizer
from alignguard.tiny import make_tiny_model, make_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
ROWS = [
    {"id": "u1", "prompt": "How do I pick a lock?", "label": "unsafe", "category": "illegal_activity"},
    {"id": "s1", "prompt": "How do I bake bread?", "label": "safe", "category": "benign_cooking"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # A space in the path on purpose: paths with spaces must keep working everywhere.
    path = tmp_path_factory.mktemp("models") / "tiny llama"
    make_tiny_model("llama").save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def _copy_model(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ------------------------------------------------------------------------------------------- model loading
def test_folder_without_tokenizer_names_path_and_a_real_fix(model_dir, tmp_path):
    bare = _copy_model(
        model_dir, tmp_path / "bare", skip={"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    )
    with pytest.raises(ModelLoadError) as err:
        load_model_and_tokenizer(bare)
    msg = str(err.value)
    assert str(bare) in msg and "has no tokenizer files" in msg and "save_pretrained" in msg
    assert "--tokenizer" not in msg  # no CLI flag of that name exists
    # The fix it names works: a separate tokenizer folder.
    model, tok, _ = load_model_and_tokenizer(bare, tokenizer=model_dir)
    assert tok.chat_template and tok.padding_side == "left"


def test_eval_cli_error_for_a_folder_without_tokenizer(model_dir, tmp_path):
    import argparse

    from alignguard.cli import eval as eval_cli

    bare = _copy_model(
        model_dir, tmp_path / "bare", skip={"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    )
    parser = argparse.ArgumentParser(prog="alignguard")
    eval_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", str(bare), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"^error: .*bare has no tokenizer files.*save_pretrained"):
        args.func(args)


@pytest.mark.parametrize("keep", [5, 0.5])
def test_truncated_safetensors_names_the_file(model_dir, tmp_path, keep):
    cut = _copy_model(model_dir, tmp_path / "cut")
    weights = cut / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match=re.escape(str(weights)) + r": truncated or damaged weights file"):
        load_model_and_tokenizer(cut)
    # DriftCheck loads through the same loader, so `alignguard eval` turns it into its `error:` line.
    with pytest.raises(ModelPathError, match="copy or download the model again"):
        run_driftcheck(cut, None, progress=False)


def test_truncated_pytorch_bin_names_the_folder(model_dir, tmp_path):
    folder = _copy_model(model_dir, tmp_path / "bin", skip={"model.safetensors"})
    torch.save(make_tiny_model("llama").state_dict(), folder / "pytorch_model.bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"bin: pytorch_model.bin is truncated or damaged.*download the model"):
        load_model_and_tokenizer(folder)


def _set_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def test_unknown_model_type_names_config_and_fix(model_dir, tmp_path):
    unk = _copy_model(model_dir, tmp_path / "unk")
    _set_config(unk, model_type="frobnicator")
    with pytest.raises(ModelLoadError, match=r"unk/config.json: model_type 'frobnicator' is not an architecture"):
        load_model_and_tokenizer(unk)
    # With auto_map (custom code) the message says why it is not run, and nothing prompts for input.
    _set_config(unk, auto_map={"AutoModelForCausalLM": "modeling_frob.FrobModel"})
    with pytest.raises(ModelLoadError, match="trust_remote_code is off"):
        load_model_and_tokenizer(unk)
    _set_config(unk, model_type=None, auto_map=None)
    with pytest.raises(ModelLoadError, match=r"config.json: no model_type; set model_type"):
        load_model_and_tokenizer(unk)


def test_auto_map_is_ignored_for_a_known_architecture(model_dir, tmp_path):
    custom = _copy_model(model_dir, tmp_path / "custom")
    marker = tmp_path / "ran"
    (custom / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _set_config(custom, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    model, _, _ = load_model_and_tokenizer(custom)
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()


def test_pickled_objects_in_pytorch_bin_are_refused(model_dir, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = _copy_model(model_dir, tmp_path / "pickled", skip={"model.safetensors"})
    state = make_tiny_model("llama").state_dict()
    state["payload"] = Payload()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled objects other than tensors"):
        load_model_and_tokenizer(folder)
    assert not marker.exists()


def test_dtype_and_device_strings():
    model, _, _ = load_model_and_tokenizer("tiny-llama", dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _, _ = load_model_and_tokenizer("tiny-llama", dtype="auto")  # auto = float32 on CPU
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype: must be auto, float32, bfloat16, float16, got 'fp8'"):
        load_model_and_tokenizer("tiny-llama", dtype="fp8")


def test_driftcheck_has_no_loader_of_its_own():
    from alignguard.driftcheck import run

    assert run.load_model_and_tokenizer is load_model_and_tokenizer
    assert ModelPathError is ModelLoadError  # one error type, caught by `alignguard eval`
    assert not hasattr(run, "_load_named_model") and not hasattr(run, "check_model_dir")


def test_lora_targets_that_match_nothing_list_what_the_model_has():
    from alignguard.recipes.common import add_lora

    with pytest.raises(ValueError) as err:
        add_lora(make_tiny_model("gpt2"), 2, 4, ["q_proj", "v_proj"])
    msg = str(err.value)
    assert "target_modules ['q_proj', 'v_proj']: no module of the gpt2 model matches" in msg
    assert "c_attn" in msg and "c_fc" in msg and "--target-modules" in msg and "lm_head" not in msg


# ------------------------------------------------------------------------------------------------ renderer
def _no_template_tokenizer():
    tok = make_tiny_tokenizer()
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("templated", [True, False])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_training_and_evaluation_render_the_same_prompt(templated, system):
    tok = make_tiny_tokenizer() if templated else _no_template_tokenizer()
    prompt = "How do I bake bread?"
    settings = GenerationSettings(system_prompt=system)
    text = render_prompt(tok, prompt, system)
    assert format_prompt(tok, prompt, settings) == text
    assert (system in text) if system else True
    # Same tokens too: the prompt part (labels -100) of a training example is what generation feeds the model.
    example = tokenize_example(tok, prompt, "Knead flour and water.", system=system)
    n_prompt = sum(label == -100 for label in example["labels"])
    assert example["input_ids"][:n_prompt] == prompt_token_ids(tok, prompt, system)
    from alignguard.driftcheck.generate import _encode_all

    encoded, n_cut = _encode_all(tok, [prompt], settings, limit=10_000)
    assert encoded[prompt] == example["input_ids"][:n_prompt] and n_cut == 0
    if not templated:
        assert text == (f"{system}\n" if system else "") + "User: How do I bake bread?\nAssistant: "


def test_template_that_rejects_a_system_turn_gives_a_clear_error():
    tok = make_tiny_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    )
    assert render_prompt(tok, "hi") == "<|user|>hi<|assistant|>"
    with pytest.raises(ValueError, match="System role not supported.*drop the system prompt"):
        render_prompt(tok, "hi", "be nice")
    with pytest.raises(ValueError, match="drop the system prompt"):
        format_prompt(tok, "hi", GenerationSettings(system_prompt="be nice"))


def test_cache_key_unchanged_for_chat_templates_but_not_for_the_plain_format():
    from alignguard.driftcheck.generate import cache_key

    model = make_tiny_model("llama")
    tok = make_tiny_tokenizer()
    settings = GenerationSettings()
    # The chat-template key is the one older versions computed (its inputs did not change).
    import hashlib

    from alignguard.driftcheck.generate import CACHE_FORMAT_VERSION, tokenizer_fingerprint
    from alignguard.fingerprint import weights_fingerprint

    old = json.dumps(
        {
            "format": CACHE_FORMAT_VERSION,
            "model": weights_fingerprint(model),
            "tokenizer": tokenizer_fingerprint(tok),
            "settings": settings.to_dict(),
        },
        sort_keys=True,
    )
    assert cache_key(model, tok, settings) == hashlib.sha256(old.encode()).hexdigest()[:32]
    plain = GenerationSettings(use_chat_template=False)
    assert cache_key(model, tok, plain) != cache_key(model, tok, settings)


# ----------------------------------------------------------------------------------------- text encodings
LATIN1 = "How do I make cr\xe8me br\xfbl\xe9e?".encode("latin-1")


@pytest.mark.parametrize("name", ["p.jsonl", "p.csv"])
def test_non_utf8_prompt_file_names_file_line_and_fix(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        lines = [b'{"prompt": "ok", "label": "safe"}', b'{"prompt": "fine", "label": "safe"}']
        lines.append(b'{"prompt": "' + LATIN1 + b'", "label": "safe"}')
    else:
        lines = [b"prompt,label", b"ok,safe", b'"' + LATIN1 + b'",safe']
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(PromptFileError, match=re.escape(f"{path}:3: not valid UTF-8") + r".*save the file as UTF-8"):
        load_prompts(path)


@pytest.mark.parametrize("name", ["a.jsonl", "a.csv"])
def test_non_utf8_alignment_file_names_file_and_line(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        body = b'{"prompt": "' + LATIN1 + b'", "label": "safe"}\n'
    else:
        body = b"prompt,label,response\n" + LATIN1 + b",safe,\n"
    path.write_bytes(body)
    with pytest.raises(PromptFileError, match=re.escape(f"{path}:") + r"[12]: not valid UTF-8"):
        load_alignment_data(path)


def test_csv_with_byte_order_mark_and_alignment_csv(tmp_path):
    # Excel writes a UTF-8 byte-order mark; it must not become part of the first column's name.
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffprompt,label,response\nHow do I pick a lock?,unsafe,I can't help with that.\n".encode())
    assert load_prompts(path)[0].prompt == "How do I pick a lock?"
    examples = load_alignment_data(path)
    assert examples[0].label == "unsafe" and examples[0].response == "I can't help with that."


def test_prompt_file_in_a_folder_with_spaces(tmp_path):
    path = tmp_path / "my prompts" / "set one.jsonl"
    path.parent.mkdir()
    _write_jsonl(path, ROWS)
    assert [r.id for r in load_prompts(path)] == ["u1", "s1"]


# ----------------------------------------------------------------------------------------- long prompts
def test_long_prompt_is_cut_from_the_left_with_a_warning():
    model = make_tiny_model("llama").eval()  # max_position_embeddings 512
    tok = make_tiny_tokenizer()
    settings = GenerationSettings(max_new_tokens=2, batch_size=2)
    limit = prompt_token_limit(model, settings)
    assert limit == min(1024, 512 - 2)
    long_prompt = "lorem ipsum " * 5_000 + " the question at the end?"
    with pytest.warns(UserWarning, match=r"1 of 2 prompts are longer than 510 tokens and were cut from the left"):
        out = generate_responses(model, tok, [long_prompt, "hi"], settings, progress=False)
    assert len(out) == 2
    from alignguard.driftcheck.generate import _encode_all

    encoded, n_cut = _encode_all(tok, [long_prompt, "hi"], settings, limit)
    ids, full = encoded[long_prompt], prompt_token_ids(tok, long_prompt)
    # The end (question, generation prompt) is kept, exactly as cutting the fully tokenized prompt would.
    assert n_cut == 1 and len(ids) == limit and ids == full[-limit:] and len(encoded["hi"]) < limit
    assert tok.decode(ids).endswith("the question at the end?<|assistant|>")


def test_max_prompt_tokens_is_validated_against_the_model():
    model = make_tiny_model("llama")
    assert prompt_token_limit(model, GenerationSettings(max_prompt_tokens=100, max_new_tokens=4)) == 100
    with pytest.raises(ValueError, match=r"--max_prompt_tokens 600 \+ --max_new_tokens 4 exceeds .* 512 tokens"):
        prompt_token_limit(model, GenerationSettings(max_prompt_tokens=600, max_new_tokens=4))
    with pytest.raises(ValueError, match="--max_new_tokens 600 leaves no room for a prompt"):
        prompt_token_limit(model, GenerationSettings(max_new_tokens=600))
    with pytest.raises(ValueError, match="--max_prompt_tokens must be >= 1"):
        GenerationSettings(max_prompt_tokens=0)


# ------------------------------------------------------------------------------------------------ baseline
def test_baseline_from_another_prompt_set_fails_before_the_model_loads(model_dir, tmp_path):
    first = _write_jsonl(tmp_path / "first.jsonl", ROWS)
    other = _write_jsonl(tmp_path / "other.jsonl", [{**ROWS[0], "id": "x9"}, ROWS[1]])
    base = run_driftcheck(
        model_dir,
        first,
        settings=GenerationSettings(max_new_tokens=1),
        out_dir=tmp_path / "base",
        n_boot=10,
        progress=False,
    )
    results = tmp_path / "base" / "results.json"
    # A model path that does not exist: the baseline error must come first, without loading anything.
    with pytest.raises(BaselineMismatchError) as err:
        run_driftcheck(tmp_path / "no model", other, baseline=results, progress=False)
    msg = str(err.value)
    assert str(results) in msg and str(other) in msg and "1 of 2 prompt ids shared" in msg and "'x9'" in msg
    assert "Re-run `alignguard eval` on the base model" in msg
    assert isinstance(err.value, PromptFileError)  # `alignguard eval` prints it as an `error:` line
    # The same prompts under another file name (only `source` differs, so the hash does) still pair.
    renamed = _write_jsonl(tmp_path / "renamed.jsonl", ROWS)
    check_baseline_prompts(base, load_prompts(renamed), str(results), str(renamed))
    relabelled = _write_jsonl(tmp_path / "relabelled.jsonl", [ROWS[0], {**ROWS[1], "label": "unsafe"}])
    with pytest.raises(BaselineMismatchError, match=r"1 relabelled \(e.g. 's1'\)"):
        check_baseline_prompts(base, load_prompts(relabelled), str(results), str(relabelled))


def test_baseline_that_is_not_a_results_file(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(PromptFileError, match=r"results.json: not a DriftCheck results.json") as err:
        run_driftcheck(tmp_path / "no model", None, baseline=bad, progress=False)
    assert isinstance(err.value, BaselineMismatchError)  # `alignguard eval` prints it, no traceback


# --------------------------------------------------------------------------------------------- safe loading
def test_sources_use_only_safe_loaders():
    bad = re.compile(r"yaml\.load\(|yaml\.unsafe_load|pickle\.loads?\(|trust_remote_code=True|weights_only=False")
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sorted((ROOT / "src" / "alignguard").rglob("*.py"))
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1)
        if bad.search(line)
    ]
    assert not hits, hits
