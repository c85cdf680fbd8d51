"""Membership-inference scores, their AUC and PrivLeak (unlearn.eval.mia) against computations written out here."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_auc_score, roc_curve

from unlearn.eval.mia import (
    ATTACKS,
    SIGMA_FLOOR,
    TokenStats,
    attack_scores,
    loss_score,
    mia_auc,
    min_k_pp_score,
    min_k_score,
    privleak,
    token_stats,
    zlib_score,
)
from unlearn.models.formatting import IGNORE, Encoded


def _stats(logp, mu=None, sigma=None) -> TokenStats:
    logp = np.asarray(logp, dtype=np.float64)
    mu = np.zeros_like(logp) if mu is None else np.asarray(mu, dtype=np.float64)
    sigma = np.ones_like(logp) if sigma is None else np.asarray(sigma, dtype=np.float64)
    return TokenStats(logp, mu, sigma)


# ----------------------------------------------------------------------------- the scores, by hand

def test_min_k_takes_the_lowest_k_share_and_is_loss_signed():
    s = _stats([-1.0, -5.0, -2.0, -0.5, -3.0])
    # 5 tokens, k = 0.4 -> the 2 lowest log-probs: -5 and -3; mean -4; loss-signed: +4.
    assert min_k_score(s, 0.4) == pytest.approx(4.0)
    # k = 0.1 -> int(0.5) = 0 tokens, at least one: the lowest, -5.
    assert min_k_score(s, 0.1) == pytest.approx(5.0)
    # k = 1 -> every token: the mean NLL.
    assert min_k_score(s, 1.0) == pytest.approx(2.3) == loss_score(s)
    with pytest.raises(ValueError):
        min_k_score(s, 0.0)


def test_min_k_plus_plus_standardises_then_takes_the_lowest():
    logp = [-1.0, -2.0, -3.0, -4.0, -5.0]
    mu = [-2.0, -2.0, -2.0, -2.0, -2.0]
    sigma = [1.0, 2.0, 0.5, 4.0, 1.0]
    # z = (logp - mu) / sigma = [1, 0, -2, -0.5, -3]; k = 0.4 -> -3 and -2; mean -2.5; loss-signed: +2.5.
    assert min_k_pp_score(_stats(logp, mu, sigma), 0.4) == pytest.approx(2.5)
    # A certain position (sigma 0) is divided by the floor, not by 0.
    s = _stats([-1.0], [-0.5], [0.0])
    assert min_k_pp_score(s, 0.4) == pytest.approx(0.5 / SIGMA_FLOOR)


def test_loss_and_zlib():
    s = _stats([-1.0, -2.0, -3.0])
    assert loss_score(s) == pytest.approx(2.0)
    text = "the cat sat on the mat " * 5
    assert zlib_score(s, text) == pytest.approx(2.0 / len(zlib.compress(text.encode("utf-8"))))
    empty = _stats([])
    assert math.isnan(loss_score(empty)) and math.isnan(min_k_score(empty, 0.4))
    assert math.isnan(min_k_pp_score(empty, 0.4))


def test_attack_scores_has_every_attack_in_order():
    stats = [_stats([-1.0, -2.0]), _stats([-0.1, -0.2, -4.0])]
    out = attack_scores(stats, ["ab", "cde"], 0.5)
    assert tuple(out) == ATTACKS
    assert out["loss"].tolist() == pytest.approx([1.5, 1.4333333333])
    assert out["min_k"].tolist() == pytest.approx([2.0, 4.0])  # 1 of 2, 1 of 3 tokens
    with pytest.raises(ValueError):
        attack_scores(stats, ["one text"], 0.5)


# ----------------------------------------------------------------------------- token_stats on known logits

class TableModel(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next-token distribution depends on the current token only."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None):
        class Out:
            pass

        o = Out()
        o.logits = self.table[input_ids]
        return o


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def test_token_stats_against_numpy():
    g = torch.Generator().manual_seed(0)
    V = 7
    table = torch.randn(V, V, generator=g) * 3
    model = TableModel(table)
    encoded = [
        Encoded([1, 3, 4, 5, 2], [IGNORE, 3, 4, 5, 2]),
        Encoded([1, 6], [IGNORE, 6]),
        Encoded([1, 2, 3, 4, 5, 6, 0], [IGNORE, IGNORE, 3, IGNORE, 5, 6, 0]),  # a masked position mid-sequence
    ]
    stats = token_stats(model, encoded, pad_id=0, batch_size=2)
    T = table.double().numpy()
    for e, s in zip(encoded, stats):
        want_logp, want_mu, want_sigma = [], [], []
        for t in range(1, len(e.input_ids)):
            if e.labels[t] == IGNORE:
                continue
            lsm = _np_log_softmax(T[e.input_ids[t - 1]])  # the token before predicts this one
            p = np.exp(lsm)
            mu = float((p * lsm).sum())
            want_logp.append(lsm[e.labels[t]])
            want_mu.append(mu)
            want_sigma.append(math.sqrt(float((p * (lsm - mu) ** 2).sum())))
        assert s.logp.dtype == np.float64 and len(s) == len(want_logp)
        np.testing.assert_allclose(s.logp, want_logp, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s.mu, want_mu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s.sigma, want_sigma, rtol=1e-5, atol=1e-5)


def test_token_stats_of_a_llama_do_not_depend_on_batching():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    encoded = []
    for L in (9, 4, 13, 6):
        ids = [1] + rng.integers(3, 40, size=L - 1).tolist()
        encoded.append(Encoded(ids, [IGNORE] + ids[1:]))
    batched = token_stats(model, encoded, pad_id=0, batch_size=3)
    for e, s in zip(encoded, batched):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0].double()
        lsm = torch.log_softmax(logits, -1)[:-1]
        want = lsm.gather(-1, torch.tensor(e.input_ids[1:])[:, None]).squeeze(-1).numpy()
        np.testing.assert_allclose(s.logp, want, atol=1e-4)
        p = lsm.exp()
        mu = (p * lsm).sum(-1)
        np.testing.assert_allclose(s.mu, mu.numpy(), atol=1e-4)
        np.testing.assert_allclose(s.sigma, ((p * (lsm - mu[:, None]) ** 2).sum(-1)).sqrt().numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- AUC and PrivLeak

def _pairwise_auc(forget, holdout) -> float:
    """P(holdout score < forget score), ties one half: MUSE's AUC written out."""
    wins = sum((h < f) + 0.5 * (h == f) for f in forget for h in holdout)
    return wins / (len(forget) * len(holdout))


def test_auc_is_muse_orientation():
    forget = np.array([1.0, 2.5, 0.3, 2.0, 2.0])
    holdout = np.array([1.5, 2.0, 3.0, 0.1])
    got = mia_auc(forget, holdout)
    y = np.r_[np.zeros(len(forget)), np.ones(len(holdout))]
    s = np.r_[forget, holdout]
    assert got == pytest.approx(roc_auc_score(y, -s))
    fpr, tpr, _ = roc_curve(y, -s)  # MUSE's sweep(): roc_curve(y, -ppl) with forget = 0, holdout = 1
    assert got == pytest.approx(sk_auc(fpr, tpr))
    assert got == pytest.approx(_pairwise_auc(forget, holdout))
    # open-unlearning's AUC is the complement.
    assert 1 - got == pytest.approx(roc_auc_score(y, s))


def test_memorised_forget_set_gives_auc_zero():
    forget_loss = np.array([0.1, 0.2, 0.15, 0.05])  # members: low loss
    holdout_loss = np.array([3.0, 2.5, 4.0])
    assert mia_auc(forget_loss, holdout_loss) == 0.0
    assert mia_auc(holdout_loss, forget_loss) == 1.0


def test_auc_refuses_nan_and_empty():
    with pytest.raises(ValueError):
        mia_auc([1.0, float("nan")], [2.0])
    with pytest.raises(ValueError):
        mia_auc([], [2.0])


def test_privleak_sign():
    rng = np.random.default_rng(0)
    forget_r, holdout_r = rng.normal(2.0, 0.5, 50), rng.normal(2.0, 0.5, 50)
    auc_retain = mia_auc(forget_r, holdout_r)
    assert 0.3 < auc_retain < 0.7
    assert privleak(auc_retain, auc_retain) == 0.0  # the retain model against itself
    memorised = mia_auc(forget_r - 10.0, holdout_r)  # forget scores far below every holdout score
    assert memorised == 0.0
    assert privleak(memorised, auc_retain) == pytest.approx(-100.0)
    over = mia_auc(forget_r + 10.0, holdout_r)  # over-unlearned: forget loss above holdout loss
    assert over == 1.0 and privleak(over, auc_retain) > 0
    assert privleak(over, auc_retain) == pytest.approx((1.0 - auc_retain) / auc_retain * 100)
    assert math.isnan(privleak(0.3, 0.0)) and math.isnan(privleak(float("nan"), 0.5))
