"""Unlearning losses against values computed by hand (plain Python floats).

The reference values below never call the function under test: they are the
formulas written out with ``math`` on a 3-token vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unlearn.methods.losses import (
    build_buckets,
    dipo_delta,
    dipo_forget_loss,
    dipo_online_loss,
    dpo_loss,
    ga_loss,
    kl_retain_loss,
    nll_loss,
    npo_loss,
    simnpo_loss,
    undial_loss,
)

# --------------------------------------------------------------------------- #
# Plain-Python helpers
# --------------------------------------------------------------------------- #


def lsm(xs):
    m = max(xs)
    z = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - z for x in xs]


def softmax(xs):
    return [math.exp(v) for v in lsm(xs)]


def logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# One example, T = 3, V = 3: positions 0 and 1 predict the answer tokens 1 and 2.
POL = [[0.5, -1.0, 2.0], [1.0, 0.0, -0.5], [9.0, -9.0, 3.0]]  # last row predicts nothing
REF = [[1.0, 0.2, 0.3], [-0.3, 1.5, 0.4], [0.0, 0.0, 0.0]]
LABELS = [-100, 1, 2]
GOLD = [1, 2]  # labels[t + 1] for t = 0, 1
TOP1 = [0, 1]  # argmax of REF rows 0 and 1


def tensors(pol=POL, ref=REF, labels=LABELS, requires_grad=False):
    logits = torch.tensor([pol], requires_grad=requires_grad)
    ref_full = torch.tensor([ref], dtype=torch.float32)[:, :-1].log_softmax(-1)
    return logits, torch.tensor([labels]), ref_full


def hand_dipo_terms(pol, ref, memory, gamma, beta):
    """Per-position (p+, p-) and Delta for one example, by hand."""
    delta, pairs = 0.0, []
    for t, mem in enumerate(memory):
        lr, lp = lsm(ref[t]), lsm(pol[t])
        m = [1.0 if z in mem else 0.0 for z in range(3)]
        p_minus = softmax([lr[z] + gamma * m[z] for z in range(3)])
        p_plus = softmax([lr[z] - gamma * m[z] for z in range(3)])
        delta += beta * sum((p_plus[z] - p_minus[z]) * (lp[z] - lr[z]) for z in range(3))
        pairs.append((p_plus, p_minus))
    return delta, pairs


# --------------------------------------------------------------------------- #
# GA / NLL / KL retain
# --------------------------------------------------------------------------- #


def test_ga_and_nll_by_hand():
    logits, labels, _ = tensors()
    nll = -(lsm(POL[0])[1] + lsm(POL[1])[2]) / 2
    assert nll_loss(logits, labels).item() == pytest.approx(nll, rel=1e-6)
    assert ga_loss(logits, labels).item() == pytest.approx(-nll, rel=1e-6)


def test_nll_averages_over_all_answer_tokens_of_the_batch():
    # Two rows with 2 and 1 answer tokens: the mean is over the 3 tokens (HF / open-unlearning).
    logits = torch.tensor([POL, POL])
    labels = torch.tensor([[-100, 1, 2], [-100, 0, -100]])
    hand = -(lsm(POL[0])[1] + lsm(POL[1])[2] + lsm(POL[0])[0]) / 3
    assert nll_loss(logits, labels).item() == pytest.approx(hand, rel=1e-6)


def test_kl_retain_exact_by_hand():
    logits, labels, ref_full = tensors()
    hand = 0.0
    for t in range(2):
        lr, lp = lsm(REF[t]), lsm(POL[t])
        hand += sum(math.exp(lr[z]) * (lr[z] - lp[z]) for z in range(3))
    hand /= 2
    assert kl_retain_loss(logits, labels, None, ref_full).item() == pytest.approx(hand, rel=1e-5)
    # zero at theta = ref
    same = torch.tensor([REF])
    assert kl_retain_loss(same, labels, None, ref_full).item() == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------- #
# NPO / SimNPO / DPO
# --------------------------------------------------------------------------- #


def test_npo_direct_formula():
    pol, ref, beta = [-3.0, -7.5], [-4.0, -6.0], 0.1
    hand = -(2 / beta) * sum(logsigmoid(-beta * (p - r)) for p, r in zip(pol, ref)) / 2
    got = npo_loss(torch.tensor(pol), torch.tensor(ref), beta)
    assert got.item() == pytest.approx(hand, rel=1e-6)
    # at theta = ref: (2/beta) log 2
    assert npo_loss(torch.tensor(ref), torch.tensor(ref), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_simnpo_direct_formula_open_unlearning_convention():
    pol, n, beta, delta = [-3.0, -7.5], [3, 5], 4.5, 0.2
    # open-unlearning: -(2/beta) logsigmoid(beta * (NLL/|y| - delta))
    hand = -(2 / beta) * sum(logsigmoid(beta * (-p / m - delta)) for p, m in zip(pol, n)) / 2
    got = simnpo_loss(torch.tensor(pol), torch.tensor(n), beta, delta)
    assert got.item() == pytest.approx(hand, rel=1e-6)
    # equivalently logsigmoid(-(beta/|y|) log pi - beta*delta)
    alt = -(2 / beta) * sum(logsigmoid(-(beta / m) * p - beta * delta) for p, m in zip(pol, n)) / 2
    assert got.item() == pytest.approx(alt, rel=1e-6)


def test_dpo_direct_formula():
    pc, pr, rc, rr, beta = [-5.0, -2.0], [-3.0, -9.0], [-6.0, -2.5], [-2.0, -8.0], 0.1
    hand = -(2 / beta) * sum(
        logsigmoid(beta * ((a - c) - (b - d))) for a, b, c, d in zip(pc, pr, rc, rr)
    ) / 2
    got = dpo_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta)
    assert got.item() == pytest.approx(hand, rel=1e-6)


def test_sequence_losses_do_not_backprop_into_reference():
    pol = torch.tensor([-3.0, -7.5], requires_grad=True)
    ref = torch.tensor([-4.0, -6.0], requires_grad=True)
    npo_loss(pol, ref, 0.1).backward()
    assert ref.grad is None and pol.grad is not None


# --------------------------------------------------------------------------- #
# UNDIAL
# --------------------------------------------------------------------------- #


def test_undial_by_hand():
    logits, labels, ref_full = tensors()
    beta = 2.0
    hand = 0.0
    for t in range(2):
        lr, lp = lsm(REF[t]), lsm(POL[t])
        q = softmax([lr[z] - (beta if z == GOLD[t] else 0.0) for z in range(3)])
        hand += sum(q[z] * (math.log(q[z]) - lp[z]) for z in range(3))
    hand /= 2
    assert undial_loss(logits, labels, None, ref_full, beta).item() == pytest.approx(hand, rel=1e-5)


# --------------------------------------------------------------------------- #
# DiPO
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("mask,memory", [("topk", [[0], [1]]), ("gold", [[1], [2]])])
def test_dipo_by_hand(mask, memory):
    gamma, beta = 2.0, 0.5
    logits, labels, ref_full = tensors()
    delta, _ = hand_dipo_terms(POL, REF, memory, gamma, beta)
    got_delta = dipo_delta(logits, labels, None, ref_full, k=1, gamma=gamma, beta=beta, mask=mask)
    assert got_delta.item() == pytest.approx(delta, rel=1e-5)
    got = dipo_forget_loss(logits, labels, None, ref_full, k=1, gamma=gamma, beta=beta, mask=mask)
    assert got.item() == pytest.approx(-(2 / beta) * logsigmoid(delta), rel=1e-5)


def test_dipo_k2_by_hand():
    gamma, beta = 3.0, 0.1
    logits, labels, ref_full = tensors()
    top2 = [sorted(range(3), key=lambda z: -REF[t][z])[:2] for t in range(2)]  # [[0, 2], [1, 2]]
    delta, _ = hand_dipo_terms(POL, REF, top2, gamma, beta)
    got = dipo_forget_loss(logits, labels, None, ref_full, k=2, gamma=gamma, beta=beta)
    assert got.item() == pytest.approx(-(2 / beta) * logsigmoid(delta), rel=1e-5)


def test_dipo_gold_vs_topk():
    logits, labels, ref_full = tensors()
    kw = dict(k=1, gamma=5.0, beta=0.1)
    topk = dipo_forget_loss(logits, labels, None, ref_full, mask="topk", **kw)
    gold = dipo_forget_loss(logits, labels, None, ref_full, mask="gold", **kw)
    assert topk.item() != pytest.approx(gold.item(), rel=1e-4)  # gold tokens are not the top-1 here
    # when the gold token IS the reference top-1, the two masks coincide
    labels_top1 = torch.tensor([[-100] + TOP1])
    a = dipo_forget_loss(logits, labels_top1, None, ref_full, mask="topk", **kw)
    b = dipo_forget_loss(logits, labels_top1, None, ref_full, mask="gold", **kw)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("mask,k", [("topk", 1), ("topk", 2), ("gold", 1)])
def test_dipo_at_reference_is_two_over_beta_log2(beta, mask, k):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11) * 3
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :2] = -100
    labels[0, -1] = -100
    ref_full = logits[:, :-1].log_softmax(-1)
    loss = dipo_forget_loss(logits, labels, None, ref_full, k=k, gamma=5.0, beta=beta, mask=mask)
    assert loss.item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    # the cached (top-K) path is exact at theta = ref too: every log-ratio is 0
    tk = ref_full.topk(4, -1)
    ref_label = ref_full.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    cached = dipo_forget_loss(
        logits, labels, tk.indices, tk.values, k=k, gamma=5.0, beta=beta, mask=mask, ref_label_logp=ref_label
    )
    assert cached.item() == pytest.approx(2 / beta * math.log(2), rel=1e-5)  # float32 rounding of the tail


@pytest.mark.parametrize("mask,memory", [("topk", [[0], [1]]), ("gold", [[1], [2]]), ("topk2", [[0, 2], [1, 2]])])
def test_dipo_gradient_matches_derivation(mask, memory):
    """dL/d logits_t = -(2/beta) sigmoid(-Delta) beta [(p+ - p-) - sum(p+ - p-) pi] = -2 sigmoid(-Delta)(p+ - p-)."""
    gamma, beta = 2.0, 0.3
    logits, labels, ref_full = tensors(requires_grad=True)
    k = 2 if mask == "topk2" else 1
    m = "topk" if mask == "topk2" else mask
    dipo_forget_loss(logits, labels, None, ref_full, k=k, gamma=gamma, beta=beta, mask=m).backward()
    delta, pairs = hand_dipo_terms(POL, REF, memory, gamma, beta)
    for t, (p_plus, p_minus) in enumerate(pairs):
        expected = [-2 * sigmoid(-delta) * (p_plus[z] - p_minus[z]) for z in range(3)]
        assert logits.grad[0, t].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-7)
        # it lowers the memory tokens and raises the others
        for z in range(3):
            assert (logits.grad[0, t, z] > 0) == (z in memory[t])
    assert logits.grad[0, 2].abs().max().item() == 0.0  # last position predicts nothing


def test_dipo_gradient_batch_mean():
    """With B examples the batch mean adds a 1/B factor, per example."""
    gamma, beta = 2.0, 0.3
    pol2 = [[1.0, 1.0, -2.0], [0.0, 0.5, 0.25], [0.0, 0.0, 0.0]]
    logits = torch.tensor([POL, pol2], requires_grad=True)
    labels = torch.tensor([LABELS, [-100, 2, -100]])
    ref_full = torch.tensor([REF, REF])[:, :-1].log_softmax(-1)
    dipo_forget_loss(logits, labels, None, ref_full, k=1, gamma=gamma, beta=beta).backward()
    d0, pairs0 = hand_dipo_terms(POL, REF, [[0], [1]], gamma, beta)
    d1, pairs1 = hand_dipo_terms(pol2[:1], REF[:1], [[0]], gamma, beta)
    for b, t, d, (pp, pm) in [(0, 0, d0, pairs0[0]), (0, 1, d0, pairs0[1]), (1, 0, d1, pairs1[0])]:
        expected = [-2 / 2 * sigmoid(-d) * (pp[z] - pm[z]) for z in range(3)]
        assert logits.grad[b, t].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert logits.grad[1, 1:].abs().max().item() == 0.0


def test_dipo_online_value_and_gradient():
    gamma, beta = 2.0, 0.3
    logits = torch.tensor([POL], requires_grad=True)
    labels = torch.tensor([LABELS])
    loss = dipo_online_loss(logits, labels, k=1, gamma=gamma, beta=beta)
    assert loss.item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    loss.backward()
    top1 = [[max(range(3), key=lambda z: POL[t][z])] for t in range(2)]
    _, pairs = hand_dipo_terms(POL, POL, top1, gamma, beta)  # reference = the policy itself
    for t, (pp, pm) in enumerate(pairs):
        assert logits.grad[0, t].tolist() == pytest.approx([-(pp[z] - pm[z]) for z in range(3)], rel=1e-4, abs=1e-7)


# --------------------------------------------------------------------------- #
# Cached (top-K buckets) vs exact (full vocabulary)
# --------------------------------------------------------------------------- #


def _all_losses(logits, labels, ids, lp, ref_label):
    return {
        "dipo_topk": dipo_forget_loss(logits, labels, ids, lp, k=1, gamma=5.0, beta=0.1, ref_label_logp=ref_label),
        "dipo_k2": dipo_forget_loss(logits, labels, ids, lp, k=2, gamma=5.0, beta=0.1, ref_label_logp=ref_label),
        "dipo_gold": dipo_forget_loss(logits, labels, ids, lp, gamma=5.0, beta=0.1, mask="gold", ref_label_logp=ref_label),
        "undial": undial_loss(logits, labels, ids, lp, 10.0, ref_label),
        "kl": kl_retain_loss(logits, labels, ids, lp, ref_label),
        "kl_nogold": kl_retain_loss(logits, labels, ids, lp),
    }


def _setup(V, K, seed=0, scale=3.0, pert=0.5, B=3, T=9):
    g = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(B, T, V, generator=g) * scale
    logits = (ref_logits + pert * torch.randn(B, T, V, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100
    labels[1, -2:] = -100
    ref_full = ref_logits[:, :-1].log_softmax(-1)
    tk = ref_full.topk(K, -1)
    ref_label = ref_full.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    return logits, labels, ref_full, tk.indices, tk.values, ref_label


def test_cached_equals_exact_when_tail_is_one_token():
    """K = V-1: the tail bucket is a single token, so bucket space IS the vocabulary."""
    logits, labels, ref_full, ids, lp, ref_label = _setup(V=6, K=5)
    exact = _all_losses(logits, labels, None, ref_full, None)
    cached = _all_losses(logits, labels, ids, lp, ref_label)
    for name in exact:
        ge, = torch.autograd.grad(exact[name], logits)
        gc, = torch.autograd.grad(cached[name], logits)
        assert cached[name].item() == pytest.approx(exact[name].item(), rel=1e-5, abs=1e-6), name
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6, msg=name)


def test_cached_equals_exact_on_the_3_token_vocabulary():
    logits, labels, ref_full = tensors()
    tk = ref_full.topk(2, -1)
    ref_label = ref_full.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    exact = _all_losses(logits, labels, None, ref_full, None)
    cached = _all_losses(logits, labels, tk.indices, tk.values, ref_label)
    for name in exact:
        assert cached[name].item() == pytest.approx(exact[name].item(), rel=1e-5, abs=1e-6), name


def _tail_kl(logits, labels, ref_full, ids, with_gold):
    """Per-position KL(ref|tail || pi|tail) and the tail masks, computed on the full vocabulary."""
    lg = logits[:, :-1].detach().float()
    lab = labels[:, 1:].clamp(min=0)
    in_bucket = torch.zeros_like(lg, dtype=torch.bool).scatter(-1, ids, True)
    if with_gold:
        in_bucket = in_bucket.scatter(-1, lab[..., None], True)
    ref_cond = ref_full.masked_fill(in_bucket, -math.inf).log_softmax(-1)
    pol_cond = lg.masked_fill(in_bucket, -math.inf).log_softmax(-1)
    kl = torch.where(in_bucket, 0.0, ref_cond.exp() * (ref_cond - pol_cond)).sum(-1)
    return kl, ~in_bucket


def test_cached_vs_exact_gap_is_the_within_tail_kl():
    """What the tail bucket approximates, exactly.

    For a position t, with ``ref|tail``/``pi|tail`` the distributions restricted to
    the tail and renormalised, and KL_t = KL(ref|tail || pi|tail):

    * KL retain:   exact - cached = mean_t Ref_tail(t) * KL_t          (cached is a lower bound)
    * UNDIAL:      exact - cached = mean_t Q_tail(t) * KL_t            (q = ref on the tail, rescaled)
    * DiPO Delta:  exact - cached = -beta * sum_t (P+_tail - P-_tail)(t) * KL_t   (<= 0)
    """
    logits, labels, ref_full, ids, lp, ref_label = _setup(V=50, K=8)
    mask = labels[:, 1:] != -100
    n = mask.sum()
    kl_t, tail = _tail_kl(logits, labels, ref_full, ids, with_gold=True)
    ref_tail = torch.where(tail, ref_full.exp(), 0.0).sum(-1)

    gap = kl_retain_loss(logits, labels, None, ref_full) - kl_retain_loss(logits, labels, ids, lp, ref_label)
    assert gap.item() == pytest.approx(((ref_tail * kl_t * mask).sum() / n).item(), rel=1e-3, abs=1e-6)
    assert gap.item() >= 0

    beta_u = 10.0
    lab = labels[:, 1:].clamp(min=0)
    q = (ref_full - beta_u * F.one_hot(lab, 50)).softmax(-1)
    q_tail = torch.where(tail, q, 0.0).sum(-1)
    gap = undial_loss(logits, labels, None, ref_full, beta_u) - undial_loss(logits, labels, ids, lp, beta_u, ref_label)
    assert gap.item() == pytest.approx(((q_tail * kl_t * mask).sum() / n).item(), rel=1e-3, abs=1e-6)

    gamma, beta = 5.0, 0.1
    mem = torch.zeros_like(ref_full, dtype=torch.bool).scatter(-1, ids[..., :1], True)
    pp = (ref_full - gamma * mem).softmax(-1)
    pm = (ref_full + gamma * mem).softmax(-1)
    tail_diff = torch.where(tail, pp - pm, 0.0).sum(-1)
    expected = -beta * (tail_diff * kl_t * mask).sum(-1)
    d_exact = dipo_delta(logits, labels, None, ref_full, k=1, gamma=gamma, beta=beta)
    d_cached = dipo_delta(logits, labels, ids, lp, k=1, gamma=gamma, beta=beta, ref_label_logp=ref_label)
    torch.testing.assert_close(d_exact - d_cached, expected, rtol=1e-3, atol=1e-6)
    assert (d_exact <= d_cached + 1e-6).all()  # the cache is optimistic: Delta_cached >= Delta_exact


# Observed on V=50, K=8 (+gold bucket), reference logits ~ N(0, 3^2), policy = reference
# + N(0, 0.5^2), 3 examples x 6 answer tokens, mean reference tail mass 8.7%, 20 seeds
# (docs/dipo.md, "Top-K cache"):
#   DiPO (k=1 / k=2 / gold) loss rel. error max 1.0% / 1.4% / 0.25%, gradient cosine >= 0.9986
#   UNDIAL, KL retain      loss rel. error max 21% / 22% (median ~10%), gradient cosine >= 0.983
# The tolerances leave a margin over those maxima.
TOL = {
    "dipo_topk": (0.02, 0.998),
    "dipo_k2": (0.02, 0.998),
    "dipo_gold": (0.01, 0.999),
    "undial": (0.3, 0.98),
    "kl": (0.3, 0.98),
    "kl_nogold": (0.3, 0.98),
}


@pytest.mark.parametrize("seed", range(5))
def test_cached_vs_exact_tolerance_v50_k8(seed):
    logits, labels, ref_full, ids, lp, ref_label = _setup(V=50, K=8, seed=seed)
    exact = _all_losses(logits, labels, None, ref_full, None)
    cached = _all_losses(logits, labels, ids, lp, ref_label)
    for name, (rel, cos) in TOL.items():
        ge, = torch.autograd.grad(exact[name], logits)
        gc, = torch.autograd.grad(cached[name], logits)
        err = abs(cached[name].item() - exact[name].item()) / abs(exact[name].item())
        c = F.cosine_similarity(ge.flatten(), gc.flatten(), 0).item()
        assert err <= rel, (name, err)
        assert c >= cos, (name, c)


def test_fp16_cache_is_tolerated():
    """Top-K log-probs stored in fp16 may sum to slightly more than 1: the tail is clamped, losses stay finite."""
    logits, labels, ref_full, ids, lp, ref_label = _setup(V=50, K=8, scale=8.0)
    lp16, rl16 = lp.half(), ref_label.half()
    for name, v in _all_losses(logits, labels, ids, lp16, rl16).items():
        assert torch.isfinite(v), name
        g, = torch.autograd.grad(v, logits)
        assert torch.isfinite(g).all(), name


# --------------------------------------------------------------------------- #
# Gradients flow only through the policy; garbage at non-answer positions is ignored
# --------------------------------------------------------------------------- #


def test_gradients_flow_only_through_policy():
    logits, labels, ref_full, ids, lp, ref_label = _setup(V=20, K=4)
    for ref_args in [(None, ref_full.clone(), None), (ids, lp.clone(), ref_label.clone())]:
        i, p, r = ref_args
        p.requires_grad_()
        if r is not None:
            r.requires_grad_()
        total = sum(_all_losses(logits, labels, i, p, r).values())
        total.backward()
        assert p.grad is None and (r is None or r.grad is None)
        assert logits.grad is not None and logits.grad.abs().sum() > 0
        logits.grad = None


def test_garbage_at_non_answer_positions_is_masked():
    logits, labels, ref_full, ids, lp, ref_label = _setup(V=20, K=4)
    clean = {k: v.item() for k, v in _all_losses(logits, labels, ids, lp, ref_label).items()}
    clean_exact = {k: v.item() for k, v in _all_losses(logits, labels, None, ref_full, None).items()}
    off = (labels[:, 1:] == -100)
    ids_g = ids.masked_fill(off[..., None], -7)  # out-of-range ids
    lp_g = lp.masked_fill(off[..., None], math.nan)
    rl_g = ref_label.masked_fill(off, math.inf)
    full_g = ref_full.masked_fill(off[..., None], math.nan)
    for got, want in [
        (_all_losses(logits, labels, ids_g, lp_g, rl_g), clean),
        (_all_losses(logits, labels, None, full_g, None), clean_exact),
    ]:
        for name, v in got.items():
            assert v.item() == pytest.approx(want[name], rel=1e-6), name
            g, = torch.autograd.grad(v, logits)
            assert torch.isfinite(g).all(), name
            assert g[:, :-1][off].abs().max().item() == 0.0, name  # no gradient where nothing is predicted


def test_buckets_partition_the_mass():
    logits, labels, ref_full, ids, lp, ref_label = _setup(V=20, K=4)
    b = build_buckets(logits, labels, ids, lp, ref_label)
    assert b.policy.shape[-1] == 4 + 2
    torch.testing.assert_close(b.policy.exp().sum(-1), torch.ones_like(b.mask, dtype=torch.float32))
    torch.testing.assert_close(b.ref.exp().sum(-1), torch.ones_like(b.mask, dtype=torch.float32))
    assert (b.gold.sum(-1)[b.mask] == 1).all()


def test_argument_errors():
    logits, labels, ref_full, ids, lp, ref_label = _setup(V=20, K=4)
    with pytest.raises(ValueError, match="ref_label_logp"):
        dipo_forget_loss(logits, labels, ids, lp, mask="gold")
    with pytest.raises(ValueError, match="ref_label_logp"):
        undial_loss(logits, labels, ids, lp, 10.0)
    with pytest.raises(ValueError, match="k=5"):
        dipo_forget_loss(logits, labels, ids, lp, k=5)
    with pytest.raises(ValueError, match="mask"):
        dipo_forget_loss(logits, labels, None, ref_full, mask="bogus")
    with pytest.raises(ValueError, match="full-vocabulary"):
        kl_retain_loss(logits, labels, None, lp)


# --------------------------------------------------------------------------- #
# The chunked path (method.loss_chunk): same value and gradient, less memory
# --------------------------------------------------------------------------- #


def _chunkable(logits, labels, ids, lp, ref_label, chunk):
    """Every loss that reads the logits, with ``chunk`` positions per chunk (0: the plain path)."""
    from unlearn.methods.losses import sequence_logp

    d = dict(gamma=5.0, beta=0.1, chunk=chunk)
    return {
        "nll": nll_loss(logits, labels, chunk=chunk),
        "ga_global_denominator": ga_loss(logits, labels, 40.0, chunk=chunk),
        "seq_logp": sequence_logp(logits, labels, chunk)[0].sum(),
        "dipo_topk": dipo_forget_loss(logits, labels, ids, lp, k=1, ref_label_logp=ref_label, **d),
        "dipo_gold": dipo_forget_loss(logits, labels, ids, lp, mask="gold", ref_label_logp=ref_label, **d),
        "dipo_online": dipo_online_loss(logits, labels, k=1, **d),
        "undial": undial_loss(logits, labels, ids, lp, 10.0, ref_label, chunk=chunk),
        "kl": kl_retain_loss(logits, labels, ids, lp, ref_label, chunk=chunk),
    }


@pytest.mark.parametrize("cached", [False, True], ids=["exact", "topk"])
@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_chunked_losses_equal_the_plain_ones_in_value_and_gradient(cached, chunk):
    """T-1 = 11 positions in chunks of 1, 3 and 5 (uneven last chunk), exact (full vocabulary: the one_hot and
    every [B, T, V] intermediate per chunk) and top-K reference, against chunk=0, which is the plain code."""
    logits, labels, ref_full, ids, vals, ref_label = _setup(V=50, K=8, seed=3, T=12)
    ids, lp = (ids, vals) if cached else (None, ref_full)
    plain = _chunkable(logits, labels, ids, lp, ref_label, 0)
    for name, value in plain.items():
        (g_plain,) = torch.autograd.grad(value, logits)
        chunked = _chunkable(logits, labels, ids, lp, ref_label, chunk)[name]
        (g_chunk,) = torch.autograd.grad(chunked, logits)
        assert chunked.item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7), name
        assert torch.allclose(g_chunk, g_plain, rtol=1e-5, atol=1e-8), (name, (g_chunk - g_plain).abs().max())
        assert g_plain.abs().sum() > 0, name  # a gradient that is zero everywhere would agree trivially


def test_chunk_zero_is_the_scoring_primitive():
    """chunk=0 of the NLL is unlearn.models.scoring.mean_nll itself, bit for bit."""
    from unlearn.methods.losses import sequence_logp
    from unlearn.models.scoring import mean_nll, sequence_logprob

    logits, labels, *_ = _setup(V=50, K=8, seed=1)
    assert torch.equal(nll_loss(logits, labels), mean_nll(logits, labels))
    assert torch.equal(sequence_logp(logits, labels)[0], sequence_logprob(logits, labels)[0])


def test_chunked_losses_keep_no_vocabulary_sized_tensor_for_the_backward_pass():
    """The memory the chunked path saves, counted: the tensors autograd keeps from the forward pass for the
    backward pass, in new storage (not views of the logits or of the reference, which exist anyway).

    Plain exact DiPO keeps two fresh [B, T-1, V] float32 tensors (the policy log-softmax and the weights
    p+ - p-) and the plain NLL one (cross-entropy's log-softmax); with chunks, only the chunk inputs (views)
    are kept and each chunk's intermediates are recomputed one chunk at a time in the backward pass.
    """
    logits, labels, ref_full, *_ = _setup(V=50, K=8, seed=0, T=33)
    B, T, V = logits.shape
    full = B * (T - 1) * V
    inputs = {logits.untyped_storage().data_ptr(), ref_full.untyped_storage().data_ptr()}

    def fresh_saved(loss_fn) -> float:
        storages: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in inputs:
                storages[ptr] = t.untyped_storage().nbytes() // t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn()
        return sum(n for n in storages.values() if n >= full // 16) / full  # vocabulary-sized only

    def dipo(chunk):
        return lambda: dipo_forget_loss(logits, labels, None, ref_full, k=1, gamma=5.0, beta=0.1, chunk=chunk)

    def nll(chunk):
        return lambda: nll_loss(logits, labels, chunk=chunk)

    assert fresh_saved(dipo(0)) >= 2 and fresh_saved(nll(0)) >= 1  # the plain path: whole [B, T-1, V] copies
    assert fresh_saved(dipo(4)) == 0 and fresh_saved(nll(4)) == 0  # chunked: none survives the forward pass
