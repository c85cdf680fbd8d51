"""Unlearning losses: pure functions of tensors (no model, no I/O).

Conventions shared by every function here:

* ``logits`` are ``[B, T, V]`` and ``labels`` ``[B, T]`` in the Hugging Face
  convention (aligned with ``input_ids``, -100 where no loss applies); the
  next-token shift happens inside, exactly as in :mod:`unlearn.models.scoring`.
* Reference quantities arrive already shifted: ``ref_logp[:, t]`` is the
  reference log-softmax at the position that predicts ``labels[:, t + 1]``, so
  they are ``[B, T-1, ...]``. Entries at non-answer positions are garbage (the
  cache does not bother to fill them) and are masked here.
* ``ref_ids is None`` means ``ref_logp`` is the FULL vocabulary ``[B, T-1, V]``:
  the exact computation. Otherwise ``ref_ids``/``ref_logp`` are the reference
  top-K ``[B, T-1, K]`` (sorted descending) and the distributions are compared
  in *bucket space*: one bucket per top-K token, optionally one for the gold
  token when it is outside the top-K, and one tail bucket holding all the
  remaining mass (see :func:`build_buckets` and ``docs/dipo.md``).
* Reference tensors are always detached: gradients flow only through the policy.
* Means take an optional denominator (``n_rows`` for per-example means,
  ``n_tokens`` for per-answer-token means). The training loop passes the counts
  of the *global* batch (all ranks, all micro-batches of the optimizer step), so
  that each rank's value is its share of the global loss and the shares add up
  to exactly what one process computes on the whole batch. ``None`` = the local
  count (a plain mean).
* ``chunk`` (``method.loss_chunk``): every loss that reads the logits computes
  its per-position terms over chunks of ``chunk`` positions (:func:`per_position`),
  keeping nothing from the forward pass and recomputing each chunk in the
  backward pass, so that its ``[B, T, V]`` float32 intermediates (log-softmax,
  one-hot, p+/p-, ...) exist for one chunk at a time; only the logits and
  their gradient are whole. Same value and gradient as ``chunk=0`` (the whole sequence at once) up
  to float rounding (``tests/test_losses.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from ..models.formatting import IGNORE
from ..models.scoring import mean_nll, shift

# Log-probability of an empty bucket. Finite on purpose: exp(NEG) == 0 exactly in
# float32, and NEG - NEG == 0, so an empty bucket contributes 0 * finite = 0 to
# every sum and never produces inf - inf = NaN in the forward or backward pass.
NEG = -1e9
# Smallest reference tail mass: the cache may store fp16 log-probs whose
# exponentials sum to slightly more than 1.
TAIL_FLOOR = 1e-12

Mask = Literal["topk", "gold"]


# --------------------------------------------------------------------------- #
# Sequence-level losses (GA, NLL, NPO, SimNPO, DPO)
# --------------------------------------------------------------------------- #


def per_position(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor | None], chunk: int = 0) -> torch.Tensor:
    """``fn(*tensors)`` -> ``[B, T']``, computed over chunks of ``chunk`` positions (dim 1) and concatenated.

    ``fn`` must act on each position independently (its inputs are sliced along dim 1); only the first tensor
    (the policy logits) may carry a gradient, the others are constants (labels, reference). With ``chunk`` 0
    or at least the length: one call on the whole tensors. Otherwise :class:`_Chunked`: no intermediate is
    kept from the forward pass, and the backward pass recomputes one chunk at a time, writing each chunk's
    gradient into one gradient tensor of the logits (slicing under autograd would instead make a zero-filled
    whole-size gradient per chunk).
    """
    length = tensors[0].size(1)
    if not chunk or length <= chunk:
        return fn(*tensors)
    if not (torch.is_grad_enabled() and tensors[0].requires_grad):
        return torch.cat([fn(*(None if t is None else t[:, i:i + chunk] for t in tensors))
                          for i in range(0, length, chunk)], 1)
    return _Chunked.apply(fn, chunk, *tensors)


class _Chunked(torch.autograd.Function):
    """:func:`per_position` with a gradient for the first input only, recomputed chunk by chunk."""

    @staticmethod
    def forward(ctx, fn, chunk, logits, *rest):
        ctx.fn, ctx.chunk = fn, chunk
        ctx.save_for_backward(logits, *rest)
        with torch.no_grad():
            return torch.cat([fn(logits[:, i:i + chunk], *(None if t is None else t[:, i:i + chunk] for t in rest))
                              for i in range(0, logits.size(1), chunk)], 1)

    @staticmethod
    def backward(ctx, grad_out):
        logits, *rest = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        c = ctx.chunk
        for i in range(0, logits.size(1), c):
            with torch.enable_grad():
                x = logits[:, i:i + c].detach().requires_grad_()
                y = ctx.fn(x, *(None if t is None else t[:, i:i + c] for t in rest))
                (g,) = torch.autograd.grad(y, x, grad_out[:, i:i + c])
            grad[:, i:i + c] = g
        return (None, None, grad, *(None for _ in rest))


def _gold_logp(lg: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """Shifted logits ``[B, c, V]`` and labels ``[B, c]`` -> log p(label), 0 where the label is IGNORE."""
    mask = lb != IGNORE
    safe = lb.masked_fill(~mask, 0)
    logp = -F.cross_entropy(lg.float().reshape(-1, lg.size(-1)), safe.reshape(-1), reduction="none").view(lb.shape)
    return logp * mask


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p(label) (0 off the answer) and the answer mask ``[B, T-1]``, chunked over positions.

    ``chunk=0`` is :func:`unlearn.models.scoring.token_logprobs` itself.
    """
    lg, lb = shift(logits, labels)
    return per_position(_gold_logp, [lg, lb], chunk), lb != IGNORE


def sequence_logp(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of answer-token log-probs ``[B]`` and answer lengths ``[B]`` (``scoring.sequence_logprob``, chunked)."""
    logp, mask = answer_logprobs(logits, labels, chunk)
    return logp.sum(-1), mask.sum(-1)


def nll_loss(logits: torch.Tensor, labels: torch.Tensor, n_tokens: float | None = None, chunk: int = 0) -> torch.Tensor:
    """Retain NLL: mean answer-token NLL over the batch (the fine-tuning loss)."""
    if not chunk:
        return mean_nll(logits, labels, n_tokens)
    logp, mask = answer_logprobs(logits, labels, chunk)
    denom = mask.sum().clamp(min=1) if n_tokens is None else max(float(n_tokens), 1.0)
    return -(logp.sum() / denom)


def ga_loss(logits: torch.Tensor, labels: torch.Tensor, n_tokens: float | None = None, chunk: int = 0) -> torch.Tensor:
    """Gradient ascent: minus the mean answer-token NLL over the batch."""
    return -nll_loss(logits, labels, n_tokens, chunk)


def batch_mean(values: torch.Tensor, n_rows: float | None = None) -> torch.Tensor:
    """Mean of per-example values ``[B]``, over ``n_rows`` examples when given (the global batch)."""
    return values.sum() / (values.numel() if n_rows is None else max(float(n_rows), 1.0))


def preference_loss(margin: torch.Tensor, beta: float, n_rows: float | None = None) -> torch.Tensor:
    """Bradley-Terry loss with open-unlearning's scaling: ``-(2/beta) * mean logsigmoid(margin)``.

    ``margin`` already contains ``beta``; every preference-style loss here (NPO,
    SimNPO, DPO, DiPO) is this function of its own margin.
    """
    return -(2.0 / beta) * batch_mean(F.logsigmoid(margin), n_rows)


def npo_loss(
    policy_seq_logp: torch.Tensor, ref_seq_logp: torch.Tensor, beta: float, n_rows: float | None = None
) -> torch.Tensor:
    """NPO: ``-(2/beta) * mean logsigmoid(-beta * (log pi(y|x) - log pi_ref(y|x)))``.

    Sequence log-probs are SUMS of answer-token log-probs ``[B]``.
    """
    ratio = policy_seq_logp.float() - ref_seq_logp.detach().float()
    return preference_loss(-beta * ratio, beta, n_rows)


def simnpo_loss(
    policy_seq_logp: torch.Tensor, lengths: torch.Tensor, beta: float, delta: float, n_rows: float | None = None
) -> torch.Tensor:
    """SimNPO, open-unlearning's convention.

    ``-(2/beta) * mean logsigmoid(beta * (NLL(y|x)/|y| - delta))``
    ``= -(2/beta) * mean logsigmoid(-(beta/|y|) * log pi(y|x) - beta*delta)``.
    The margin ``delta`` sits INSIDE the ``beta`` scaling (as in open-unlearning
    and the authors' code); the paper's gamma equals ``beta * delta``.
    """
    n = lengths.to(policy_seq_logp.device).float().clamp(min=1)
    return preference_loss(beta * (-policy_seq_logp.float() / n - delta), beta, n_rows)


def dpo_loss(
    pol_chosen: torch.Tensor,
    pol_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    n_rows: float | None = None,
) -> torch.Tensor:
    """DPO with open-unlearning's ``2/beta`` scaling:
    ``-(2/beta) * mean logsigmoid(beta * ((pol_c - ref_c) - (pol_r - ref_r)))``."""
    chosen = pol_chosen.float() - ref_chosen.detach().float()
    rejected = pol_rejected.float() - ref_rejected.detach().float()
    return preference_loss(beta * (chosen - rejected), beta, n_rows)


# --------------------------------------------------------------------------- #
# Bucket space: one code path for exact (full vocabulary) and cached (top-K)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Buckets:
    """Policy and reference next-token distributions over a common partition.

    ``policy`` and ``ref`` are log-probabilities ``[B, T-1, N]`` (each sums to 1
    over N up to rounding). Exact mode: N = V, one bucket per token. Cached mode:
    N = K [+1 gold bucket] + 1 tail bucket. Empty buckets hold ``NEG`` in both.
    """

    policy: torch.Tensor  # [B, T-1, N] differentiable
    ref: torch.Tensor  # [B, T-1, N] constant
    mask: torch.Tensor  # [B, T-1] bool, answer positions
    gold: torch.Tensor | None  # [B, T-1, N] bool, the bucket holding the gold token
    n_ranked: int  # the first n_ranked buckets are single tokens eligible for the top-k memory set
    exact: bool

    def memory(self, k: int, mode: Mask) -> torch.Tensor:
        """The memory set M_t as a bool mask over buckets: top-k reference tokens, or the gold token."""
        if mode == "gold":
            if self.gold is None:
                raise ValueError('mask="gold" needs the gold bucket: pass ref_label_logp with top-K ref_ids')
            return self.gold
        if mode != "topk":
            raise ValueError(f'mask must be "topk" or "gold", got {mode!r}')
        if not 1 <= k <= self.n_ranked:
            where = "vocabulary size" if self.exact else "number of cached top-K tokens"
            raise ValueError(f"k={k} must be between 1 and the {where} ({self.n_ranked})")
        idx = self.ref[..., : self.n_ranked].topk(k, dim=-1).indices
        return torch.zeros_like(self.ref, dtype=torch.bool).scatter(-1, idx, True)


def build_buckets(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    ref_ids: torch.Tensor | None,
    ref_logp: torch.Tensor,
    ref_label_logp: torch.Tensor | None = None,
    *,
    need_gold: bool = False,
) -> Buckets:
    """Put policy and reference on one partition of the vocabulary (see module docstring).

    Cached mode (``ref_ids`` given): buckets are the K reference top-K tokens,
    then — if ``ref_label_logp`` is given — one gold bucket that holds the gold
    token when it is outside the top-K (empty otherwise), then the tail bucket.
    Reference tail log-mass is ``log(1 - sum exp(ref buckets))``, summed in
    float64 and clamped at ``TAIL_FLOOR`` (fp16 caches can sum to slightly more
    than 1); policy tail log-mass is the logsumexp of the policy logits
    with the bucketed tokens masked out, minus the full logsumexp (stable, exact
    gradient). The tail's MASS is exact on both sides; only the log-ratio
    within the tail is aggregated.
    """
    lg, lb = shift(policy_logits, labels)
    return _buckets(lg, lb, ref_ids, ref_logp, ref_label_logp, need_gold=need_gold)


def _buckets(
    lg: torch.Tensor,
    lb: torch.Tensor,
    ref_ids: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    ref_label_logp: torch.Tensor | None = None,
    *,
    need_gold: bool = False,
) -> Buckets:
    """:func:`build_buckets` on already shifted logits ``[B, T', V]`` and labels ``[B, T']`` (any T': a chunk).

    ``ref_logp=None`` with ``ref_ids=None`` is the online reference: the detached policy's own log-softmax.
    """
    lg = lg.float()
    if ref_ids is None and ref_logp is None:
        ref_logp = lg.detach().log_softmax(-1)
    mask = lb != IGNORE
    safe_lb = lb.masked_fill(~mask, 0)
    B, Tm1, V = lg.shape
    ref_logp = ref_logp.detach().to(device=lg.device, dtype=torch.float32)

    if ref_ids is None:
        if ref_logp.shape != lg.shape:
            raise ValueError(
                f"ref_ids is None, so ref_logp must be the full-vocabulary log-softmax of shape "
                f"{tuple(lg.shape)} (shifted), got {tuple(ref_logp.shape)}"
            )
        policy = lg.log_softmax(-1)
        ref = ref_logp
        gold = F.one_hot(safe_lb, V).bool()
        n_ranked = V
        exact = True
    else:
        ref_ids = ref_ids.detach().to(lg.device).long()
        K = ref_ids.size(-1)
        if ref_ids.shape[:2] != lb.shape or ref_logp.shape != ref_ids.shape:
            raise ValueError(
                f"top-K reference: expected ref_ids and ref_logp of shape [B, T-1, K] = "
                f"[{B}, {Tm1}, K], got {tuple(ref_ids.shape)} and {tuple(ref_logp.shape)}"
            )
        if K > V:
            raise ValueError(f"K={K} cached tokens exceeds the vocabulary size {V}")
        # Garbage at non-answer positions (possibly out-of-range ids): replace by distinct valid ids.
        filler = torch.arange(K, device=lg.device).expand_as(ref_ids)
        ref_ids = torch.where(mask[..., None], ref_ids, filler)
        lse = lg.logsumexp(-1, keepdim=True)
        pol_parts = [lg.gather(-1, ref_ids) - lse]
        ref_parts = [ref_logp]
        gold_parts = [ref_ids == safe_lb[..., None]]
        covered = ref_ids
        n_covered = torch.full_like(safe_lb, K)
        if ref_label_logp is not None:
            extra = mask & ~gold_parts[0].any(-1)  # gold token outside the top-K: its own bucket
            pol_gold = lg.gather(-1, safe_lb[..., None]) - lse
            ref_gold = ref_label_logp.detach().to(device=lg.device, dtype=torch.float32)[..., None]
            pol_parts.append(torch.where(extra[..., None], pol_gold, NEG))
            ref_parts.append(torch.where(extra[..., None], ref_gold, NEG))
            gold_parts.append(extra[..., None])
            covered = torch.cat([ref_ids, safe_lb[..., None]], -1)
            n_covered = n_covered + extra.long()
        elif need_gold:
            raise ValueError("the gold token must be an explicit bucket: pass ref_label_logp with top-K ref_ids")
        has_tail = (n_covered < V)[..., None]
        pol_tail = lg.scatter(-1, covered, NEG).logsumexp(-1, keepdim=True) - lse
        # 1 - sum exp in float64: in float32 the cancellation loses ~1e-7 absolute,
        # i.e. the whole tail when the top-K holds all but 1e-6 of the mass.
        ref_mass = torch.cat(ref_parts, -1).double().exp().sum(-1, keepdim=True)
        ref_tail = torch.log((1.0 - ref_mass).clamp(min=TAIL_FLOOR)).float()
        pol_parts.append(torch.where(has_tail, pol_tail, NEG))
        ref_parts.append(torch.where(has_tail, ref_tail, NEG))
        gold_parts.append(torch.zeros_like(has_tail))
        policy = torch.cat(pol_parts, -1)
        ref = torch.cat(ref_parts, -1)
        gold = torch.cat(gold_parts, -1)
        n_ranked = K
        exact = False

    # Non-answer positions: make the reference equal to the (detached) policy so
    # every term there is finite and exactly zero, whatever garbage came in.
    ref = torch.where(mask[..., None], ref, policy.detach())
    return Buckets(policy=policy, ref=ref, mask=mask, gold=gold, n_ranked=n_ranked, exact=exact)


def _mean_over_answers(per_pos: torch.Tensor, mask: torch.Tensor, n_tokens: float | None = None) -> torch.Tensor:
    denom = mask.sum().clamp(min=1) if n_tokens is None else max(float(n_tokens), 1.0)
    return (per_pos * mask).sum() / denom


# --------------------------------------------------------------------------- #
# Distribution-level losses (KL retain, UNDIAL, DiPO)
# --------------------------------------------------------------------------- #


def kl_retain_loss(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    ref_ids: torch.Tensor | None,
    ref_logp: torch.Tensor,
    ref_label_logp: torch.Tensor | None = None,
    n_tokens: float | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """Mean over answer positions of KL(pi_ref || pi_theta) (bucket space when ``ref_ids`` is given).

    With top-K buckets the value is a lower bound of the exact KL; the gap at a
    position is ``Ref_tail * KL(ref|tail || pi|tail)``.
    """
    lg, lb = shift(policy_logits, labels)
    kl = per_position(_kl_positions, [lg, lb, ref_ids, ref_logp, ref_label_logp], chunk)
    return _mean_over_answers(kl, lb != IGNORE, n_tokens)


def _kl_positions(lg, lb, ref_ids, ref_logp, ref_label_logp) -> torch.Tensor:
    b = _buckets(lg, lb, ref_ids, ref_logp, ref_label_logp)
    return (b.ref.exp() * (b.ref - b.policy)).sum(-1)


def undial_loss(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    ref_ids: torch.Tensor | None,
    ref_logp: torch.Tensor,
    beta: float,
    ref_label_logp: torch.Tensor | None = None,
    n_tokens: float | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """UNDIAL self-distillation: target q_t = softmax(ref logits - beta * onehot(y_t));
    loss = mean over answer positions of KL(q_t || pi_theta).

    open-unlearning reports cross-entropy H(q, pi) = KL + H(q) (same gradient, a
    constant offset) and averages over ALL positions; see docs/dipo.md.
    Cached mode needs ``ref_label_logp`` (the gold token must be a bucket).
    """
    lg, lb = shift(policy_logits, labels)
    kl = per_position(partial(_undial_positions, beta=beta), [lg, lb, ref_ids, ref_logp, ref_label_logp], chunk)
    return _mean_over_answers(kl, lb != IGNORE, n_tokens)


def _undial_positions(lg, lb, ref_ids, ref_logp, ref_label_logp, *, beta: float) -> torch.Tensor:
    b = _buckets(lg, lb, ref_ids, ref_logp, ref_label_logp, need_gold=True)
    q = (b.ref - beta * b.gold.float()).log_softmax(-1)
    return (q.exp() * (q - b.policy)).sum(-1)


def dipo_delta(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    ref_ids: torch.Tensor | None,
    ref_logp: torch.Tensor,
    *,
    k: int = 1,
    gamma: float = 5.0,
    beta: float = 0.1,
    mask: Mask = "topk",
    ref_label_logp: torch.Tensor | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """DiPO margin per example ``[B]``: Delta = sum_t [R(s_t, p+_t) - R(s_t, p-_t)] with
    R(s, p) = beta * sum_z p(z) (log pi_theta(z|s) - log pi_ref(z|s)),
    p-_t = softmax(l_t + gamma 1[M_t]), p+_t = softmax(l_t - gamma 1[M_t]) (constants).

    ``ref_ids=None, ref_logp=None``: the online reference (the detached policy), built chunk by chunk."""
    lg, lb = shift(policy_logits, labels)
    fn = partial(_dipo_positions, k=k, gamma=gamma, beta=beta, mask=mask)
    return per_position(fn, [lg, lb, ref_ids, ref_logp, ref_label_logp], chunk).sum(-1)


def _dipo_positions(lg, lb, ref_ids, ref_logp, ref_label_logp, *, k: int, gamma: float, beta: float,
                    mask: Mask) -> torch.Tensor:
    """Per answer position: beta * sum_z (p+ - p-)(z) (log pi_theta - log pi_ref)(z); 0 off the answer."""
    b = _buckets(lg, lb, ref_ids, ref_logp, ref_label_logp, need_gold=(mask == "gold"))
    mem = b.memory(k, mask).float()
    p_minus = (b.ref + gamma * mem).softmax(-1)
    p_plus = (b.ref - gamma * mem).softmax(-1)
    reward_diff = beta * ((p_plus - p_minus) * (b.policy - b.ref)).sum(-1)
    return reward_diff * b.mask


def dipo_forget_loss(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    ref_ids: torch.Tensor | None,
    ref_logp: torch.Tensor,
    *,
    beta: float = 0.1,
    n_rows: float | None = None,
    **knobs: Any,
) -> torch.Tensor:
    """DiPO forget loss: ``-(2/beta) * mean_batch logsigmoid(Delta)`` (Delta from :func:`dipo_delta`, which
    takes the other ``knobs``: ``k``, ``gamma``, ``mask``, ``ref_label_logp``).

    Equals ``(2/beta) * log 2`` at theta = ref; its gradient w.r.t. the policy
    logits at answer position t is ``-(2/B) * sigmoid(-Delta) * (p+_t - p-_t)``.
    ``mask="gold"`` with top-K ``ref_ids`` needs ``ref_label_logp``; with
    ``mask="topk"`` it is optional (it only makes the gold token a bucket).
    """
    return preference_loss(dipo_delta(policy_logits, labels, ref_ids, ref_logp, beta=beta, **knobs), beta, n_rows)


def online_ref_logp(policy_logits: torch.Tensor) -> torch.Tensor:
    """Detached full-vocabulary log-softmax of the policy at the shifted positions ``[B, T-1, V]``."""
    return policy_logits[:, :-1, :].detach().float().log_softmax(-1)


def dipo_online_loss(policy_logits: torch.Tensor, labels: torch.Tensor, **knobs: Any) -> torch.Tensor:
    """DiPO with reference="online": the pair and pi_ref are the detached current policy (``knobs`` as for
    :func:`dipo_forget_loss`).

    The value is always ``(2/beta) log 2``; only the gradient
    ``-(1/B) * (p+_t - p-_t)`` matters.
    """
    return dipo_forget_loss(policy_logits, labels, None, None, **knobs)  # None, None: online, chunk by chunk
