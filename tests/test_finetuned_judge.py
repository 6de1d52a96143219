"""FinetunedJudge (`learned_ft`): training, the two forward paths, the delta file, save/load and its errors.

Every test uses a tiny config-built BERT with a word-level tokenizer saved to a temporary folder (no MiniLM load).
"""

import json

import numpy as np
import pytest
import torch

from alignguard.driftcheck.finetuned_judge import (
    CARD_FILE,
    DELTA_FILE,
    FinetuneConfig,
    FinetunedJudge,
    FinetunedRefusalModel,
    base_weights_sha,
    flag_tensor,
    init_head_,
    load_finetuned,
    pooled_features,
    save_finetuned,
    train_model,
)
from alignguard.driftcheck.learned_judge import FLAG_NAMES, fit_logistic

REFUSALS = [
    "it is not appropriate to write that",
    "i do not think that is a good idea",
    "as an ai i do not condone this",
    "it is not accurate to say that",
    "that would be harmful so no",
    "i do not think i should do this",
]
ANSWERS = [
    "sure here is the recipe you asked for",
    "the capital of france is paris",
    "step one open the box step two read",
    "here is a short poem about the sea",
    "the answer is four because two plus two",
    "sure the recipe needs salt and water",
]
PROMPTS = ["write a poem", "how do i cook pasta", "tell me the capital", "explain the answer", "help me", "do this"]
N_LAYERS = 3


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny BERT (3 layers, hidden 32) and a word-level BERT tokenizer, saved as a local model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({w for t in REFUSALS + ANSWERS + PROMPTS for w in t.split()})
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def toy_set():
    responses = REFUSALS + ANSWERS
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(responses))]
    return prompts, responses, [True] * len(REFUSALS) + [False] * len(ANSWERS)


def make_model(base_dir, **kw):
    from alignguard.driftcheck.finetuned_judge import load_encoder

    encoder, tok = load_encoder(base_dir)
    cfg = FinetuneConfig(**{"top_layers": 1, "epochs": 40, "batch_size": 4, "lr": 3e-3, "head_lr": 3e-2, **kw})
    return FinetunedRefusalModel(encoder, tok, cfg)


def trained(base_dir, **kw):
    prompts, responses, y = toy_set()
    model = make_model(base_dir, **kw)
    states = model.bottom_states(model.tokenize(prompts, responses))
    losses = train_model(model, states, flag_tensor(prompts, responses), y)
    return model, losses


def test_training_reduces_loss_on_a_separable_toy_set(base_dir):
    model, losses = trained(base_dir, probe_init=False)
    prompts, responses, y = toy_set()
    assert losses[0] > 0.6  # the zero head starts at P = 0.5 (loss log 2 = 0.69)
    assert losses[-1] < 0.5 * losses[0]
    assert ((model.predict_proba(prompts, responses) >= 0.5) == np.array(y)).mean() >= 0.9


def test_only_the_top_layers_and_head_change(base_dir):
    from alignguard.driftcheck.finetuned_judge import load_encoder

    model, _ = trained(base_dir, top_layers=1, probe_init=False)
    base, _ = load_encoder(base_dir)
    changed = {k for k, v in model.encoder.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed and all(k.startswith(f"encoder.layer.{N_LAYERS - 1}.") for k in changed)


def test_full_encoder_path_equals_the_training_path(base_dir):
    model, _ = trained(base_dir, top_layers=2)
    prompts, responses, _ = toy_set()
    states = model.bottom_states(model.tokenize(prompts, responses))
    with torch.no_grad():
        via_states = torch.sigmoid(model.top_logits(states, flag_tensor(prompts, responses))).double().numpy()
    np.testing.assert_allclose(model.predict_proba(prompts, responses), via_states, atol=1e-6)


def test_probe_init_folds_the_standardisation_into_the_head(base_dir):
    model = make_model(base_dir, top_layers=2)
    prompts, responses, y = toy_set()
    states = model.bottom_states(model.tokenize(prompts, responses))
    flags = flag_tensor(prompts, responses)
    init_head_(model, states, flags, y)  # no groups: the middle C of the grid
    X = pooled_features(model, states, flags)
    expected = fit_logistic(X, y, model.cfg.probe_cs[len(model.cfg.probe_cs) // 2]).predict_proba(X)
    np.testing.assert_allclose(model.predict_proba(prompts, responses), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_save_load_round_trip_gives_identical_predictions(base_dir, tmp_path, dtype):
    model, _ = trained(base_dir, top_layers=2, delta_dtype=dtype)
    prompts, responses, _ = toy_set()
    save_finetuned(model, tmp_path, {"base_sha256": base_weights_sha(base_dir)})
    loaded, card = load_finetuned(tmp_path, base_dir)
    assert card["tuned_layers"] == [N_LAYERS - 2, N_LAYERS - 1] and card["flags"] == list(FLAG_NAMES)
    assert np.array_equal(loaded.predict_proba(prompts, responses), model.predict_proba(prompts, responses))
    judge = FinetunedJudge(tmp_path, base_dir)
    assert judge(prompts, responses) == list(model.predict_proba(prompts, responses) >= 0.5)
    assert judge([], []) == []


def test_delta_file_holds_only_the_claimed_layers(base_dir, tmp_path):
    from safetensors import safe_open

    model, _ = trained(base_dir, top_layers=1)
    save_finetuned(model, tmp_path, {})
    with safe_open(str(tmp_path / DELTA_FILE), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        dtypes = {k: f.get_tensor(k).dtype for k in keys}
    assert json.loads(meta["tuned_layers"]) == [N_LAYERS - 1]
    layer_keys = keys - {"head.weight", "head.bias"}
    assert layer_keys and all(k.startswith(f"delta.encoder.layer.{N_LAYERS - 1}.") for k in layer_keys)
    assert layer_keys == {f"delta.{k}" for k in model.top_state()}
    assert all(dtypes[k] == torch.float16 for k in layer_keys) and dtypes["head.weight"] == torch.float32
    assert {"head.weight", "head.bias"} <= keys


def _saved(base_dir, tmp_path):
    model, _ = trained(base_dir, top_layers=1, epochs=1)
    save_finetuned(model, tmp_path, {"base_sha256": base_weights_sha(base_dir)})
    return tmp_path


def test_missing_files_name_the_file(base_dir, tmp_path):
    d = _saved(base_dir, tmp_path)
    (d / DELTA_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=DELTA_FILE):
        load_finetuned(d, base_dir)
    with pytest.raises(FileNotFoundError, match=DELTA_FILE):
        FinetunedJudge(d, base_dir)
    d2 = _saved(base_dir, tmp_path / "other")
    (d2 / CARD_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=CARD_FILE):
        load_finetuned(d2, base_dir)
    with pytest.raises(FileNotFoundError, match=CARD_FILE):
        FinetunedJudge(d2, base_dir)


def test_bad_card_names_the_card(base_dir, tmp_path):
    d = _saved(base_dir, tmp_path)
    (d / CARD_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=CARD_FILE):
        load_finetuned(d, base_dir)
    (d / CARD_FILE).write_text(json.dumps({"config": {"top_layers": 1, "colour": "red"}, "tuned_layers": [2]}))
    with pytest.raises(ValueError, match=CARD_FILE):
        load_finetuned(d, base_dir)


def test_card_claiming_other_layers_is_rejected(base_dir, tmp_path):
    d = _saved(base_dir, tmp_path)
    card = json.loads((d / CARD_FILE).read_text())
    (d / CARD_FILE).write_text(json.dumps({**card, "tuned_layers": [0]}))
    with pytest.raises(ValueError, match=r"tuned_layers \[0\]"):
        load_finetuned(d, base_dir)


def test_tensors_outside_the_claimed_layers_are_rejected(base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _saved(base_dir, tmp_path)
    t = load_file(str(d / DELTA_FILE))
    t["delta.encoder.layer.0.output.dense.weight"] = torch.zeros(32, 64, dtype=torch.float16)
    save_file(t, str(d / DELTA_FILE))
    with pytest.raises(ValueError, match=rf"{DELTA_FILE}.*layer\.0"):
        load_finetuned(d, base_dir)


def test_truncated_delta_and_other_base_are_rejected(base_dir, tmp_path):
    d = _saved(base_dir, tmp_path)
    card = json.loads((d / CARD_FILE).read_text())
    (d / CARD_FILE).write_text(json.dumps({**card, "base_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="base weights"):
        load_finetuned(d, base_dir)
    (d / CARD_FILE).write_text(json.dumps(card))
    data = (d / DELTA_FILE).read_bytes()
    (d / DELTA_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=DELTA_FILE):
        load_finetuned(d, base_dir)


def test_config_checks():
    with pytest.raises(ValueError, match="delta_dtype"):
        FinetuneConfig(delta_dtype="int8")
    with pytest.raises(ValueError, match="top_layers"):
        FinetuneConfig(top_layers=0)
    with pytest.raises(ValueError, match="probe_cs"):
        FinetuneConfig(probe_cs=())


def test_too_many_top_layers_for_the_encoder(base_dir):
    with pytest.raises(ValueError, match=f"top_layers: must be in \\[1, {N_LAYERS}\\]"):
        make_model(base_dir, top_layers=N_LAYERS + 1)


def test_get_judge_knows_learned_ft():
    from alignguard.driftcheck.judge import get_judge

    with pytest.raises(ValueError, match="learned_ft"):
        get_judge("no-such-judge")
    try:
        judge = get_judge("learned_ft")
    except (ImportError, FileNotFoundError) as err:  # MiniLM or the shipped delta absent: the error says so
        assert "learned_ft" in str(err) or "MiniLM" in str(err) or "pip" in str(err)
    else:
        assert isinstance(judge, FinetunedJudge) and judge.name == "learned_ft"
