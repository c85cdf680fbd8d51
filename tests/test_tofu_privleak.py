"""TOFU's privacy leakage: membership-inference AUCs of forget vs holdout rows, and privleak against the retain model.

The scores are recomputed here by hand from the table model of ``test_eval`` (every
token log-prob is an entry of its matrix ``P``), the AUCs with scikit-learn, and
privleak from the AUCs the retain model's reference file stores.
"""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from test_eval import CFG, FORGET, HOLDOUT, MAXLEN, SPLITS, VOCAB, TableLM, make_table, make_tokenizer

from unlearn.eval import evaluate_dir, evaluate_model
from unlearn.eval.mia import SIGMA_FLOOR
from unlearn.eval.reference_store import (
    REFERENCE_DIRNAME,
    mia_reference_key,
    mia_reference_path,
    retain_mia_reference,
)
from unlearn.eval.tofu_metrics import MIA_K, MIA_KEYS, MIA_METRICS

FORGET_SPLIT, HOLDOUT_SPLIT = "forget10_perturbed", "holdout10"
ALL = {**SPLITS, HOLDOUT_SPLIT: HOLDOUT}
PER_EXAMPLE = {"loss": "mia_loss", "zlib": "mia_zlib", "min_k": "mia_min_k", "min_k++": "mia_min_k_plus_plus"}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def P():
    return make_table(0)


@pytest.fixture(scope="module")
def P_retain():
    return make_table(1)


def _eval(model, tok, splits=ALL, **kw):
    return evaluate_model(model, tok, splits, forget_split=FORGET_SPLIT, max_length=MAXLEN, cfg=CFG,
                          retain_truth_ratios=None, progress=False, **kw)


@pytest.fixture(scope="module")
def result(P, tok):
    return _eval(TableLM(P), tok, holdout_split=HOLDOUT_SPLIT)


# ----------------------------------------------------------------- by hand

def hand_scores(P: np.ndarray, answer: str, k: float = MIA_K) -> dict[str, float]:
    """The four attack scores of one answer, from the table: the prompt ends with ':', then answer words, EOS.

    loss / zlib over every answer token and EOS; Min-K% / Min-K%++ over the answer tokens without EOS
    (open-unlearning's TOFU MIA); Min-K%++ standardises each log-prob by the mean and standard deviation
    of log p under the context's next-token distribution (one row of P).
    """
    toks = [":"] + answer.split() + ["[EOS]"]
    rows = [P[VOCAB[a]] for a in toks[:-1]]
    logp = np.array([math.log(r[VOCAB[b]]) for r, b in zip(rows, toks[1:])])
    mu = np.array([float(np.sum(r * np.log(r))) for r in rows])
    sigma = np.array([math.sqrt(float(np.sum(r * (np.log(r) - m) ** 2))) for r, m in zip(rows, mu)])
    loss = -logp.mean()
    lp, n = logp[:-1], max(1, int((len(logp) - 1) * k))
    z = (lp - mu[:-1]) / np.maximum(sigma[:-1], SIGMA_FLOOR)
    return {"loss": loss, "zlib": loss / len(zlib.compress(answer.encode("utf-8"))),
            "min_k": -np.sort(lp)[:n].mean(), "min_k++": -np.sort(z)[:n].mean()}


def muse_auc(forget: np.ndarray, holdout: np.ndarray) -> float:
    """MUSE's orientation: forget labelled 0, holdout 1, scored by minus the (loss-like) score."""
    y = np.r_[np.zeros(len(forget)), np.ones(len(holdout))]
    return float(roc_auc_score(y, -np.r_[forget, holdout]))


# ----------------------------------------------------------------- tests

def test_scores_are_the_hand_computed_ones(result, P):
    for split, rows in ((FORGET_SPLIT, FORGET), (HOLDOUT_SPLIT, HOLDOUT)):
        recs = result.per_example[split]
        assert [r["id"] for r in recs] == [r["id"] for r in rows]
        for rec, row in zip(recs, rows):
            want = hand_scores(P, row["answer"])
            for attack, key in PER_EXAMPLE.items():
                assert rec[key] == pytest.approx(want[attack], rel=1e-5), (split, row["id"], attack)


def test_auc_is_sklearns_on_the_same_scores(result, P):
    for attack, key in MIA_KEYS.items():
        f = np.array([r[PER_EXAMPLE[attack]] for r in result.per_example[FORGET_SPLIT]])
        h = np.array([r[PER_EXAMPLE[attack]] for r in result.per_example[HOLDOUT_SPLIT]])
        assert result.metrics[key] == muse_auc(f, h), attack
        # open-unlearning's AUC (labels as MUSE, the loss-like score itself) is its complement
        y = np.r_[np.zeros(len(f)), np.ones(len(h))]
        assert result.metrics[key] == pytest.approx(1 - roc_auc_score(y, np.r_[f, h]), abs=1e-12)
        hand_f = np.array([hand_scores(P, r["answer"])[attack] for r in FORGET])
        hand_h = np.array([hand_scores(P, r["answer"])[attack] for r in HOLDOUT])
        assert result.metrics[key] == pytest.approx(muse_auc(hand_f, hand_h)), attack
    assert 0 < result.metrics["mia_auc_loss"] < 1  # not degenerate: the test would not notice a flipped label


def test_metric_keys_and_no_privleak_without_a_reference(result):
    for key in MIA_METRICS:
        assert key in result.metrics
    assert all(isinstance(result.metrics[k], float) for k in MIA_KEYS.values())
    assert "+" not in "".join(result.metrics)  # MLflow refuses '+' in metric names
    assert result.metrics["privleak"] is None and "retain" in result.notes["privleak"]
    assert result.roles["holdout"] == HOLDOUT_SPLIT and "holdout_truncation" in result.notes


def test_no_holdout_split_means_none_with_a_note(P, tok):
    for kw in ({}, {"holdout_split": HOLDOUT_SPLIT}):  # not asked for / asked for but not among the splits
        res = _eval(TableLM(P), tok, splits=SPLITS, **kw)
        for key in MIA_METRICS:
            assert res.metrics[key] is None and "holdout" in res.notes[key], (kw, key)
        assert HOLDOUT_SPLIT not in res.per_example and "holdout" not in res.roles


def _fake_retain_dir(path, content=b"retain-weights-v1"):
    path.mkdir(exist_ok=True)
    (path / "model.safetensors").write_bytes(content)
    return path


def test_privleak_matches_the_formula_on_the_stored_retain_aucs(tmp_path, P, P_retain, tok):
    d = _fake_retain_dir(tmp_path / "retain")
    calls = []

    def loader(path):
        calls.append(path)
        return TableLM(P_retain), tok

    kw = dict(forget_split=FORGET_SPLIT, holdout_split=HOLDOUT_SPLIT, max_length=MAXLEN, cfg=CFG, loader=loader,
              progress=False)
    ref = retain_mia_reference(d, ALL, **kw)
    key = mia_reference_key(d, FORGET, HOLDOUT, MAXLEN)
    path = mia_reference_path(d / REFERENCE_DIRNAME, key)
    stored = json.loads(path.read_text())["aucs"]
    assert stored == ref and set(stored) == set(MIA_KEYS) and len(calls) == 1

    res = _eval(TableLM(P), tok, holdout_split=HOLDOUT_SPLIT, retain_mia_aucs=ref)
    auc = res.metrics["mia_auc_min_k"]
    assert res.metrics["privleak"] == pytest.approx((auc - stored["min_k"]) / stored["min_k"] * 100, rel=1e-12)
    assert auc != stored["min_k"] and res.metrics["privleak"] != 0  # two different models
    # The retain model against its own reference: exactly 0, and its AUCs are the stored ones.
    own = _eval(TableLM(P_retain), tok, holdout_split=HOLDOUT_SPLIT, retain_mia_aucs=ref)
    assert own.metrics["privleak"] == 0.0
    assert {a: own.metrics[k] for a, k in MIA_KEYS.items()} == stored


def test_retain_mia_reference_is_cached_and_keyed(tmp_path, P_retain, tok):
    d = _fake_retain_dir(tmp_path / "retain")
    calls = []

    def loader(path):
        calls.append(path)
        return TableLM(P_retain), tok

    kw = dict(forget_split=FORGET_SPLIT, holdout_split=HOLDOUT_SPLIT, max_length=MAXLEN, cfg=CFG, loader=loader,
              progress=False)
    r1 = retain_mia_reference(d, ALL, **kw)
    r2 = retain_mia_reference(d, ALL, **kw)
    assert r1 == r2 and len(calls) == 1  # loaded, not recomputed
    key = mia_reference_key(d, FORGET, HOLDOUT, MAXLEN)
    path = mia_reference_path(d / REFERENCE_DIRNAME, key)
    data = json.loads(path.read_text())
    data["aucs"]["min_k"] = 0.123  # tampered: checksum mismatch -> recomputed
    path.write_text(json.dumps(data))
    assert retain_mia_reference(d, ALL, **kw) == r1 and len(calls) == 2
    path.write_text("{")  # unreadable -> recomputed
    assert retain_mia_reference(d, ALL, **kw) == r1 and len(calls) == 3
    # Everything the AUCs depend on is in the key.
    assert mia_reference_key(d, FORGET, HOLDOUT[:-1], MAXLEN) != key
    assert mia_reference_key(d, FORGET[:-1], HOLDOUT, MAXLEN) != key
    assert mia_reference_key(d, FORGET, [dict(HOLDOUT[0], answer="eta"), *HOLDOUT[1:]], MAXLEN) != key
    assert mia_reference_key(d, FORGET, HOLDOUT, MAXLEN + 1) != key
    assert mia_reference_key(d, FORGET, HOLDOUT, MAXLEN, k=0.2) != key
    (d / "model.safetensors").write_bytes(b"retain-weights-v2")
    assert mia_reference_key(d, FORGET, HOLDOUT, MAXLEN) != key
    retain_mia_reference(d, ALL, **kw)
    assert len(calls) == 4


# ----------------------------------------------------------------- saved models, the runner

def _llama(path, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=128,
                      bos_token_id=VOCAB["[BOS]"], eos_token_id=VOCAB["[EOS]"], pad_token_id=VOCAB["[PAD]"])
    LlamaForCausalLM(cfg).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_runner_retain_zero_then_formula_for_another_model(tmp_path):
    retain, other = _llama(tmp_path / "retain", 0), _llama(tmp_path / "other", 1)
    ref_dir = tmp_path / "reference"
    kw = dict(splits=ALL, forget_split=FORGET_SPLIT, max_length=MAXLEN, cfg=CFG, progress=False,
              reference_dir=ref_dir, holdout_split=HOLDOUT_SPLIT)
    own = evaluate_dir(retain, retain_model_dir=retain, out_dir=tmp_path / "eval_retain", **kw)
    assert own.metrics["privleak"] == 0.0
    (stored_file,) = ref_dir.glob("mia-*.json")
    stored = json.loads(stored_file.read_text())
    assert stored["aucs"] == {a: own.metrics[k] for a, k in MIA_KEYS.items()}  # from the retain model's evaluation
    assert stored["holdout_split"] == HOLDOUT_SPLIT and stored["k"] == MIA_K

    res = evaluate_dir(other, retain_model_dir=retain, out_dir=tmp_path / "eval_other", **kw)
    want = (res.metrics["mia_auc_min_k"] - stored["aucs"]["min_k"]) / stored["aucs"]["min_k"] * 100
    assert res.metrics["privleak"] == pytest.approx(want, rel=1e-12)
    metrics = json.loads((tmp_path / "eval_other" / "metrics.json").read_text())
    assert metrics["privleak"] == res.metrics["privleak"]
    assert "PrivLeak" in (tmp_path / "eval_other" / "report.md").read_text()
    lines = [json.loads(x) for x in (tmp_path / "eval_other" / "per_example.jsonl").read_text().splitlines()]
    assert sum(r["split"] == HOLDOUT_SPLIT for r in lines) == len(HOLDOUT)

    # No retain model: the AUCs are there, privleak is None with the reason.
    none = evaluate_dir(other, out_dir=tmp_path / "eval_none", **kw)
    assert none.metrics["mia_auc_min_k"] == res.metrics["mia_auc_min_k"]
    assert none.metrics["privleak"] is None and "retain" in none.notes["privleak"]
    assert json.loads((tmp_path / "eval_none" / "notes.json").read_text())["privleak"] == none.notes["privleak"]
