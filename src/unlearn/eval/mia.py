"""Membership-inference scores and their AUC, as MUSE's PrivLeak (Shi et al. 2024) computes them.

One batched teacher-forced pass (:func:`token_stats`) turns every sequence into
per-token statistics; every attack is then a pure NumPy function of them, so the
four attacks of a split cost one forward, and a test can hit each attack with
hand-written numbers.

Orientation (one convention for every score and every AUC here)
----------------------------------------------------------------
Every attack score is **loss-like: higher = less likely a member**, the sign
MUSE stores (``metrics/privleak.py``: ``PPL`` is the mean NLL, ``Min-40%`` is
``-mean(lowest 40 % log-probs)``) and open-unlearning's ``mia/*.py`` too ("all
MIA attack statistics are signed [...] to show the same trends as loss"). Shi et
al. (2023) define Min-K% Prob as the mean of the lowest-k log-probs (higher =
member): :func:`min_k_score` is its negative, and :func:`min_k_pp_score` the
negative of Zhang et al.'s (2024) Min-K%++.

The AUC is MUSE's, exactly: ``muse_bench/metrics/privleak.py`` labels the first
set of the key ``forget_holdout_Min-40%`` (forget, its ``ppl_nonmember``) 0 and
the second (holdout, ``ppl_member``) 1 and takes ``roc_curve(y, -score)``
(``sweep``), i.e. ``AUC = P(score_holdout < score_forget)``
(ties count one half). A model that memorised the forget articles gives them a
low loss, so the AUC goes to 0; a model that never saw either set gives ~0.5;
one that "over-unlearned" (forget loss above holdout loss) goes towards 1.
PrivLeak = ``(AUC - AUC_retain) / AUC_retain * 100`` is then ~-100 for a model
that memorised the forget set, exactly 0 for the retain model and positive for
over-unlearning. :func:`mia_auc` calls ``roc_auc_score(y, -score)``, which is
``auc(*roc_curve(y, -score)[:2])`` -- what MUSE's ``sweep`` computes.

How open-unlearning maps onto this: its ``mia_auc`` labels forget 0, holdout 1
but passes the loss-like score itself, so ``AUC_OU = P(score_holdout >
score_forget) = 1 - AUC_MUSE`` (exactly, ties included), "1 when the forget data
is much more likely than the holdout data"; its ``privleak`` turns both back
with ``1 - x``: ``((1 - AUC_OU) - (1 - AUC_OU_ref)) / (1 - AUC_OU_ref + 1e-10) *
100``, which is :func:`privleak` of the MUSE AUCs but for the 1e-10.

Differences from open-unlearning (``src/evals/metrics/mia/``, d3d7cf9)
------------------------------------------------------------------------
1. Every labelled token is scored: open-unlearning's ``tokenwise_logprobs``
   drops the last labelled position ("to ignore eos prediction") for Min-K% and
   Min-K%++ (its loss attack keeps it). A raw-text example here ends with a text
   token, not EOS, and MUSE (``compute_ppl``) scores every token too.
2. AUC orientation: MUSE's (above), not open-unlearning's ``1 - AUC``.
3. PrivLeak has no 1e-10 in the denominator (MUSE has none); a retain AUC of 0
   gives NaN (the runner reports None with a note), and there is no default
   retain AUC of 0.5 when the retain model was not evaluated.
4. Min-K%++'s sigma is the standard deviation computed as
   ``sqrt(E[(log p - mu)^2])`` in float64 (open-unlearning: ``E[log p^2] - mu^2``
   in the model's precision, which can cancel to a negative number); the same
   floor as open-unlearning's variance clamp (1e-6, so sigma >= 1e-3) guards
   positions where the model is certain.
5. A sequence without labelled tokens scores NaN (open-unlearning: 0, which
   silently ranks it as a likely member); :func:`mia_auc` refuses non-finite
   scores, so the caller has to leave such rows out and say so.
6. zlib: the same ``loss / len(zlib.compress(text))``; the runner passes the raw
   article when it was scored whole (MUSE) and the decoded scored tokens when it
   was cut at ``max_length`` (open-unlearning always decodes the labels).

Differences from MUSE: MUSE's Min-K% takes ``int(n * k)`` tokens (no minimum:
a sequence of fewer than 1/k tokens averages nothing, NaN); here, as in
open-unlearning, at least one. MUSE has no Min-K%++ (open-unlearning's addition).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from unlearn.models.formatting import IGNORE, Encoded
from unlearn.models.scoring import shift
from unlearn.models.teacher_forced import teacher_forced_pass

ATTACKS: tuple[str, ...] = ("loss", "zlib", "min_k", "min_k++")
"""The membership-inference attacks, in the order files and tables list them."""


def metric_suffix(attack: str) -> str:
    """The attack's name in a metric key: MLflow refuses ``+`` in metric names (``min_k++`` -> ``min_k_plus_plus``)."""
    return attack.replace("+", "_plus")

SIGMA_FLOOR = 1e-3
"""Min-K%++: sigma is at least this (open-unlearning clamps the variance at 1e-6): a position where the model
puts all its mass on one token has sigma 0, and (logp - mu) / 0 is not a score."""

_POS_CHUNK = 512
"""Positions per float64 log-softmax block in :func:`token_stats`: bounds memory at ``_POS_CHUNK x vocab`` doubles."""


@dataclass(frozen=True)
class TokenStats:
    """Per labelled position of one sequence (in sequence order), all float64.

    ``logp``: log p(actual token | prefix); ``mu``: E_{x~p}[log p(x)] over the full
    vocabulary at that position (minus the entropy); ``sigma``: the standard
    deviation of log p(x) for x ~ p (Min-K%++'s normaliser).
    """

    logp: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray

    def __len__(self) -> int:
        return int(self.logp.shape[0])


def _vocab_moments(lsm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mu`` and ``sigma`` of log p(x) under p, per row of ``lsm`` (``[N, V]`` log-probs, float64).

    Tokens with p = 0 (log p = -inf) contribute 0, not ``0 * inf = nan``.
    """
    p = lsm.exp()
    finite = torch.isfinite(lsm)
    safe = torch.where(finite, lsm, torch.zeros_like(lsm))
    mu = (p * safe).sum(-1)
    var = (p * (safe - mu[:, None]).square()).sum(-1)
    return mu, var.clamp(min=0).sqrt()


def _to_numpy(blocks: list[torch.Tensor]) -> np.ndarray:
    return (torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.float64)).cpu().numpy()


@torch.no_grad()
def token_stats(
    model,
    encoded: Sequence[Encoded],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "MIA scoring",
) -> list[TokenStats]:
    """:class:`TokenStats` of every sequence of ``encoded`` (in its order), from one batched forward per batch.

    The batches are the shared teacher-forced pass (right-padded with
    :func:`unlearn.models.formatting.collate`, eval mode, no grad, rows sorted by
    length), so these numbers come from the same logits as every other score of
    the same rows. Positions are those with ``labels != -100``, with the usual
    causal shift (:func:`unlearn.models.scoring.shift`: the logits at t score the
    label at t + 1). The log-softmax is taken in float32 whatever the model's
    dtype (a bf16 log-softmax moves the AUC), then the vocabulary moments in
    float64, row by row and in blocks of positions, so memory stays at one
    ``positions x vocab`` block however large the batch.
    """
    out: list[TokenStats | None] = [None] * len(encoded)
    for b in teacher_forced_pass(model, encoded, pad_id=pad_id, batch_size=batch_size, device=device,
                                 progress=progress, desc=desc):
        logits, labels = shift(b.logits, b.labels)
        for j, row in enumerate(b.rows):
            pos = (labels[j] != IGNORE).nonzero(as_tuple=True)[0]
            logp, mu, sigma = [], [], []
            for s in range(0, pos.numel(), _POS_CHUNK):
                idx = pos[s:s + _POS_CHUNK]
                lsm32 = F.log_softmax(logits[j, idx].float(), dim=-1)
                logp.append(lsm32.gather(-1, labels[j, idx][:, None]).squeeze(-1).double())
                m, sd = _vocab_moments(lsm32.double())
                mu.append(m)
                sigma.append(sd)
            out[row] = TokenStats(_to_numpy(logp), _to_numpy(mu), _to_numpy(sigma))
    return out  # type: ignore[return-value]  # every row is filled by the pass


# --------------------------------------------------------------------------- scores (higher = less likely member)

def _num_k(n: int, k: float) -> int:
    """How many of ``n`` tokens Min-K% averages: ``int(n * k)`` as MUSE and open-unlearning, but at least one."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    return max(1, int(n * k))


def loss_score(s: TokenStats) -> float:
    """Mean NLL of the sequence's labelled tokens (MUSE's ``PPL`` key: the loss, not its exp). NaN when empty."""
    return float(-np.mean(s.logp)) if len(s) else math.nan


def zlib_score(s: TokenStats, text: str) -> float:
    """Mean NLL divided by the zlib-compressed length (bytes) of ``text``'s UTF-8, as MUSE's ``PPL/zlib``
    and open-unlearning's ``ZLIBAttack`` (Carlini et al. 2021): text that compresses well is expected to have
    a low loss anyway, so its loss counts as less evidence of membership."""
    return loss_score(s) / len(zlib.compress(text.encode("utf-8")))


def min_k_score(s: TokenStats, k: float) -> float:
    """Min-K% Prob (Shi et al. 2023), loss-signed: ``-mean`` of the ``max(1, int(n k))`` lowest token log-probs.

    A member's rarest tokens are still fairly likely, so a low value means "member"
    (Shi et al.'s score is the negative of this one). NaN when the sequence has no tokens.
    """
    if not len(s):
        return math.nan
    return float(-np.mean(np.sort(s.logp)[: _num_k(len(s), k)]))


def min_k_pp_score(s: TokenStats, k: float) -> float:
    """Min-K%++ (Zhang et al. 2024), loss-signed: ``-mean`` of the lowest ``max(1, int(n k))`` of
    ``(logp - mu) / sigma``, each token's log-prob standardised against the model's own distribution at
    that position (sigma floored at :data:`SIGMA_FLOOR`). NaN when the sequence has no tokens."""
    if not len(s):
        return math.nan
    z = (s.logp - s.mu) / np.maximum(s.sigma, SIGMA_FLOOR)
    return float(-np.mean(np.sort(z)[: _num_k(len(s), k)]))


def attack_scores(stats: Sequence[TokenStats], texts: Sequence[str], k: float) -> dict[str, np.ndarray]:
    """Every attack's score per sequence, ``{attack: float64 [n]}`` for each of :data:`ATTACKS`.

    ``texts[i]``: the text ``stats[i]`` scored (zlib's compressed length is taken of it).
    """
    if len(stats) != len(texts):
        raise ValueError(f"{len(stats)} token statistics but {len(texts)} texts")
    return {
        "loss": np.array([loss_score(s) for s in stats], dtype=np.float64),
        "zlib": np.array([zlib_score(s, t) for s, t in zip(stats, texts)], dtype=np.float64),
        "min_k": np.array([min_k_score(s, k) for s in stats], dtype=np.float64),
        "min_k++": np.array([min_k_pp_score(s, k) for s in stats], dtype=np.float64),
    }


# --------------------------------------------------------------------------- AUC and PrivLeak

def mia_auc(forget_scores: Sequence[float] | np.ndarray, holdout_scores: Sequence[float] | np.ndarray) -> float:
    """MUSE's membership AUC of loss-like scores: forget labelled 0, holdout 1, ``roc_auc_score(y, -score)``.

    = P(score_holdout < score_forget) + P(tie) / 2: ~0 when the forget set is
    memorised, ~0.5 when neither set was trained on (see the module docstring).
    Raises ``ValueError`` on an empty side or a non-finite score (the caller
    drops empty sequences and says so).
    """
    from sklearn.metrics import roc_auc_score

    f = np.asarray(forget_scores, dtype=np.float64)
    h = np.asarray(holdout_scores, dtype=np.float64)
    if f.size == 0 or h.size == 0:
        raise ValueError(f"membership AUC needs forget and holdout scores (got {f.size} and {h.size})")
    if not (np.isfinite(f).all() and np.isfinite(h).all()):
        raise ValueError("membership AUC: non-finite scores (sequences without scored tokens?)")
    y = np.concatenate([np.zeros(f.size), np.ones(h.size)])
    return float(roc_auc_score(y, -np.concatenate([f, h])))


def privleak(auc_model: float, auc_retain: float) -> float:
    """MUSE's PrivLeak in percent: ``(auc_model - auc_retain) / auc_retain * 100``.

    0 for the retain model itself, ~-100 for a model that memorised the forget set
    (AUC ~0), positive for over-unlearning. NaN when ``auc_retain`` is 0 or either AUC is NaN.
    """
    if not (math.isfinite(auc_model) and math.isfinite(auc_retain)) or auc_retain == 0:
        return math.nan
    return (auc_model - auc_retain) / auc_retain * 100.0
