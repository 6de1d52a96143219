"""Fisher / subspace files: raw traces, eigenvalue scales, bad-file errors, weight fingerprints, mismatch messages.

Run: python -m pytest -q tests/test_fisher_files.py
"""

import json
import struct

import pytest
import torch

from alignguard import (
    AlignmentSubspaces,
    FisherConfig,
    FisherMismatchError,
    FisherState,
    SubspaceConfig,
    build_subspaces,
    estimate_fisher,
)
from alignguard.data import IGNORE_INDEX
from alignguard.fingerprint import architecture_fingerprint, base_weights_fingerprint
from alignguard.fisher import FisherFileError
from alignguard.subspace import eigenvalue_scales
from alignguard.targets import find_target_modules
from alignguard.tiny import make_tiny_model
from tests.helpers import randomize_lora_, tiny_batches, tiny_peft

EMPIRICAL = FisherConfig(fisher_labels="empirical", show_progress=False)
SKETCH = FisherConfig(fisher_labels="empirical", fisher_storage="sketch", sketch_rank=8, show_progress=False)
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, dense dir, sketch dir): a tiny Llama's Fisher state and subspaces, dense and sketched."""
    model = make_tiny_model("llama")
    dirs = []
    for cfg in (EMPIRICAL, SKETCH):
        d = tmp_path_factory.mktemp(cfg.fisher_storage)
        state = estimate_fisher(model, tiny_batches(), cfg)
        state.save(d)
        build_subspaces(state, SubspaceConfig(m_min=2)).save(d)
        dirs.append(d)
    return model, *dirs


def _copy(src, dst):
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_json(path, fn):
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def _poke(path, key, index, value):
    """Overwrite one float32 element of tensor `key` in a safetensors file, leaving the header intact."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    info = json.loads(raw[8 : 8 + n])[key]
    assert info["dtype"] == "F32"
    offset = 8 + n + info["data_offsets"][0] + 4 * index
    raw[offset : offset + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(raw))


# ---- 5. raw traces -----------------------------------------------------------------------------------------


def test_raw_traces_are_the_unnormalised_trace_and_travel_into_the_subspaces(tmp_path):
    model = make_tiny_model("llama").double()
    batches = tiny_batches()
    state = estimate_fisher(model, batches, EMPIRICAL)
    # Reference: sum_t ||g_t||^2 / N with g_t = d(response NLL)/d(output), by autograd.grad.
    module = find_target_modules(model)[Q]
    total, count = torch.zeros((), dtype=torch.float64), 0
    for batch in batches:
        out = {}
        handle = module.register_forward_hook(lambda _m, _i, o, out=out: out.__setitem__("y", o))
        emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits
        handle.remove()
        labels = batch["labels"]
        mask = labels[:, 1:] != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits[:, :-1][mask], labels[:, 1:][mask], reduction="sum")
        (g,) = torch.autograd.grad(nll, out["y"])
        total += (g[:, :-1][mask] ** 2).sum()
        count += int(mask.sum())
    assert state.token_counts[Q] == count
    assert state.raw_traces[Q] == pytest.approx(float(total / count), rel=1e-5)
    state.save(tmp_path)
    meta = json.loads((tmp_path / "fisher.json").read_text())
    assert meta["raw_traces"] == state.raw_traces and meta["token_counts"] == state.token_counts
    assert FisherState.load(tmp_path).raw_traces == state.raw_traces
    subs = build_subspaces(state)
    assert subs.metadata["raw_traces"] == state.raw_traces
    subs.save(tmp_path)
    assert json.loads((tmp_path / "subspaces.json").read_text())["raw_traces"] == state.raw_traces
    assert AlignmentSubspaces.load(tmp_path).metadata["raw_traces"] == state.raw_traces


def test_eigenvalue_scales_rebuild_the_raw_and_global_factors_by_hand():
    gen = torch.Generator().manual_seed(0)
    raw, state = {}, FisherState()
    for i, (name, d) in enumerate((("a", 6), ("b", 9), ("c", 4))):
        x = torch.randn(d, d, generator=gen, dtype=torch.float64)
        raw[name] = (x @ x.T) * (10.0**i)  # very different scales per module
        state.factors[name] = raw[name] * (d / torch.trace(raw[name]))
        state.dims[name], state.token_counts[name] = (d, 3), 5
        state.raw_traces[name] = float(torch.trace(raw[name]))
    subs = build_subspaces(state, SubspaceConfig(fixed_m=9, m_min=1, m_max=9, eigen_solver="exact"))
    c = sum(f.shape[0] for f in raw.values()) / sum(float(torch.trace(r)) for r in raw.values())
    targets = {"per_layer": state.factors, "none": raw, "global": {n: c * r for n, r in raw.items()}}
    for mode, wanted in targets.items():
        scales = eigenvalue_scales(subs, mode)
        assert set(scales) == set(raw)
        for name in raw:
            got = torch.linalg.eigvalsh(state.factors[name]) * scales[name]
            torch.testing.assert_close(got, torch.linalg.eigvalsh(wanted[name]), rtol=1e-12, atol=1e-12)
    total = sum(torch.trace(c * r) for r in raw.values())
    assert float(total) == pytest.approx(sum(f.shape[0] for f in raw.values()), rel=1e-12)  # global: mean eig 1
    assert eigenvalue_scales(subs, "per_layer") == dict.fromkeys(raw, 1.0)
    subs.metadata.pop("raw_traces")
    assert eigenvalue_scales(subs) == dict.fromkeys(raw, 1.0)
    for mode in ("global", "none"):
        with pytest.raises(ValueError, match=r"subspaces\.json.*raw_traces.*alignguard fisher"):
            eigenvalue_scales(subs, mode)
    with pytest.raises(ValueError, match="^normalise: must be one of"):
        eigenvalue_scales(subs, "layer")


# ---- 6. bad files ------------------------------------------------------------------------------------------


def _drop(key):
    return lambda m: m.pop(key)


def _null(key):
    return lambda m: m.__setitem__(key, None)


def _add_module(name):
    def edit(meta):
        meta["dims"][name], meta["token_counts"][name], meta["raw_traces"][name] = [64, 32], 1, 1.0

    return edit


FISHER_JSON_EDITS = [
    (_drop("dims"), "field 'dims' is missing"),
    (_drop("token_counts"), "field 'token_counts' is missing"),
    (lambda m: m["dims"].__setitem__(Q, [999, 32]), r"shape \[32, 32\] but the JSON says \[999, 999\]"),
    (_add_module("model.layers.9.mlp.up"), r"only in the JSON \['model.layers.9.mlp.up'\]"),
    (lambda m: (m["dims"].pop(Q), m["token_counts"].pop(Q), m["raw_traces"].pop(Q)), "only in the tensors"),
    (lambda m: m["token_counts"].pop(Q), "'token_counts' must give a count"),
    (lambda m: m["raw_traces"].__setitem__(Q, float("nan")), "'raw_traces' has non-finite"),
    (lambda m: m["config"].update(mode="dense", seed=0), r"older alignguard.*mode -> fisher_storage"),
]


@pytest.mark.parametrize("edit,message", FISHER_JSON_EDITS)
def test_bad_fisher_json_is_one_clear_error(saved, tmp_path, edit, message):
    _, dense, _ = saved
    d = _copy(dense, tmp_path / "f")
    _edit_json(d / "fisher.json", edit)
    with pytest.raises(FisherFileError, match=rf"fisher\.(json|safetensors).*{message}.*alignguard fisher"):
        FisherState.load(d)


@pytest.mark.parametrize(
    "edit,message",
    [
        (_drop("config"), "field 'config' is missing"),
        (_null("base_weights_fingerprint"), "'base_weights_fingerprint' is missing or null"),
        (lambda m: (m.pop("architecture_fingerprint"), m.__setitem__("model_fingerprint", None)), "architecture"),
        (lambda m: (m.pop("architecture_fingerprint"), m.pop("model_fingerprint")), "architecture_fingerprint"),
    ],
)
def test_fields_needed_for_the_checks_are_required(saved, tmp_path, edit, message):
    model, dense, _ = saved
    d = _copy(dense, tmp_path / "f")
    FisherState.load(d, model=model, config=EMPIRICAL)  # the intact copy loads
    _edit_json(d / "fisher.json", edit)
    with pytest.raises(FisherMismatchError, match=rf"fisher\.json.*{message}.*alignguard fisher"):
        FisherState.load(d, model=model, config=EMPIRICAL)


def test_fisher_json_that_is_not_json(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "f")
    (d / "fisher.json").write_text('{"dims": {')
    with pytest.raises(FisherFileError, match=r"fisher\.json: not valid JSON.*alignguard fisher"):
        FisherState.load(d)


@pytest.mark.parametrize("name", ["fisher.safetensors", "subspaces.safetensors"])
def test_truncated_tensor_files(saved, tmp_path, name):
    d = _copy(saved[1], tmp_path / "f")
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(FisherFileError, match=rf"{name}: cannot be read.*alignguard fisher"):
        FisherState.load(d) if name.startswith("fisher") else AlignmentSubspaces.load(d)


@pytest.mark.parametrize(
    "storage,key,index,value,message",
    [
        ("dense", f"{Q}.factor", 5, float("nan"), "non-finite"),
        ("dense", f"{Q}.factor", 0, float("inf"), "non-finite"),
        ("dense", f"{Q}.factor", 1, 1e30, "not symmetric positive semi-definite"),
        ("dense", f"{Q}.factor", 33 * 3, 1e4, "not symmetric positive semi-definite|trace"),
        ("sketch", f"{Q}.eigvals", 0, float("nan"), "not finite"),
        ("sketch", f"{Q}.eigvals", 1, 1e30, r"outside \[0, trace"),
        ("sketch", f"{Q}.eigvecs", 3, 7.0, "not orthonormal"),
        ("sketch", f"{Q}.eigvecs", 2, float("nan"), "non-finite"),
    ],
)
def test_corrupt_values_with_an_intact_header(saved, tmp_path, storage, key, index, value, message):
    src = saved[1] if storage == "dense" else saved[2]
    d = _copy(src, tmp_path / "f")
    _poke(d / "fisher.safetensors", key, index, value)
    with pytest.raises(FisherFileError, match=rf"fisher\.safetensors: .*({message}).*alignguard fisher"):
        FisherState.load(d)


SUB = f"align.{Q}"


@pytest.mark.parametrize(
    "key,index,value,message",
    [
        (f"{SUB}.basis", 4, float("nan"), "non-finite"),
        (f"{SUB}.basis", 0, 3.0, "not orthonormal"),
        (f"{SUB}.eigvals", 0, float("inf"), "not finite"),
        (f"{SUB}.eigvals", 1, -5.0, "outside"),
    ],
)
def test_corrupt_subspace_tensors(saved, tmp_path, key, index, value, message):
    d = _copy(saved[1], tmp_path / "s")
    _poke(d / "subspaces.safetensors", key, index, value)
    with pytest.raises(FisherFileError, match=rf"subspaces\.safetensors: .*{message}.*alignguard fisher"):
        AlignmentSubspaces.load(d)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m["modules"][Q].__setitem__("m", 99), "subspaces.json says m = 99"),
        (
            lambda m: m["modules"].__setitem__("model.layers.7.mlp.up_proj", {"m": 1, "trace": 64.0}),
            "only in the JSON",
        ),
        (lambda m: m["modules"].pop(Q), "only in the tensors"),
        (lambda m: m["modules"][Q].__setitem__("trace", float("nan")), "trace nan"),
        (lambda m: m["config"].update(method="exact", seed=0), r"older alignguard.*method -> eigen_solver"),
        (lambda m: m["raw_traces"].pop(Q), "raw_traces"),
    ],
)
def test_bad_subspaces_json(saved, tmp_path, edit, message):
    d = _copy(saved[1], tmp_path / "s")
    AlignmentSubspaces.load(d)
    _edit_json(d / "subspaces.json", edit)
    with pytest.raises(FisherFileError, match=rf"subspaces\.(json|safetensors).*{message}.*alignguard fisher"):
        AlignmentSubspaces.load(d)
    (d / "subspaces.json").write_text("not json")
    with pytest.raises(FisherFileError, match=r"subspaces\.json: not valid JSON"):
        AlignmentSubspaces.load(d)


# ---- 7. base-weights fingerprint ---------------------------------------------------------------------------


def test_base_weights_fingerprint_ignores_lora_and_peft_names():
    base = make_tiny_model("llama")
    peft_model = tiny_peft("llama")  # same seed: the same base weights, LoRA B = 0
    fp = base_weights_fingerprint(base)
    assert base_weights_fingerprint(peft_model) == fp
    randomize_lora_(peft_model)  # training LoRA leaves the base weights alone
    assert base_weights_fingerprint(peft_model) == fp
    assert base_weights_fingerprint(make_tiny_model("llama", seed=1)) != fp
    other = make_tiny_model("llama")
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert base_weights_fingerprint(other) != fp
    assert architecture_fingerprint(other) == architecture_fingerprint(base)


def test_fisher_state_of_other_weights_is_refused(saved, tmp_path):
    model, dense, _ = saved
    FisherState.load(dense, model=tiny_peft("llama"))  # the same base weights after get_peft_model: accepted
    meta = json.loads((dense / "fisher.json").read_text())
    assert meta["architecture_fingerprint"] == meta["model_fingerprint"] == architecture_fingerprint(model)
    assert meta["base_weights_fingerprint"] == base_weights_fingerprint(model)
    with pytest.raises(FisherMismatchError, match=r"fisher\.json was estimated on other weights.*alignguard fisher"):
        FisherState.load(dense, model=make_tiny_model("llama", seed=1))


# ---- 8. what differs ---------------------------------------------------------------------------------------


def test_mismatch_message_lists_exactly_what_differs(tmp_path):
    qwen = make_tiny_model("qwen2")
    estimate_fisher(qwen, tiny_batches(), EMPIRICAL).save(tmp_path)
    llama = tiny_peft("llama", targets=["q_proj", "v_proj"])  # LoRA on two projections only
    with pytest.raises(FisherMismatchError, match="different model") as err:
        FisherState.load(tmp_path, model=llama)
    msg = str(err.value)
    assert "gate_proj" not in msg  # the model has it: not reported as missing
    biases = [f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv"]
    assert f"only in the Fisher state's model: {sorted(biases)}" in msg
    assert "only in this model: ['lm_head.weight']" in msg  # qwen2 ties the embeddings, this llama does not
    assert "shape differences (saved, this model): {}" in msg
    assert "The estimated modules exist here with the same (d_out, d_in)" in msg
    wide = make_tiny_model("llama", intermediate_size=48)
    estimate_fisher(make_tiny_model("llama"), tiny_batches(), EMPIRICAL).save(tmp_path / "l")
    with pytest.raises(FisherMismatchError) as err:
        FisherState.load(tmp_path / "l", model=wide)
    msg = str(err.value)
    assert "'model.layers.0.mlp.up_proj.weight': ([64, 32], [48, 32])" in msg
    assert "'model.layers.0.mlp.down_proj': ([32, 64], [32, 48])" in msg
