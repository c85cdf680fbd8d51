"""Answer-token log-probabilities: the one primitive behind training losses and metrics.

Everything is batched: one forward pass per batch of answers (the shared
:func:`~unlearn.models.teacher_forced.teacher_forced_pass`), the per-token
log-probabilities gathered with a single ``cross_entropy`` call.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .formatting import IGNORE, Encoded, encode_many
from .template import PLAIN, QAFormat
from .teacher_forced import teacher_forced_pass


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align logits at position t with the label at t+1 (next-token prediction)."""
    return logits[:, :-1, :], labels[:, 1:]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p(label) and the answer mask, both ``[B, T-1]``.

    ``labels`` follow the Hugging Face convention (aligned with ``input_ids``,
    -100 where no loss applies); the shift happens here.
    """
    lg, lb = shift(logits, labels)
    mask = lb != IGNORE
    safe = lb.masked_fill(~mask, 0)
    logp = -F.cross_entropy(lg.float().reshape(-1, lg.size(-1)), safe.reshape(-1), reduction="none").view(lb.shape)
    return logp * mask, mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of answer-token log-probs ``[B]`` and answer lengths ``[B]``."""
    logp, mask = token_logprobs(logits, labels)
    return logp.sum(-1), mask.sum(-1)


def mean_nll(logits: torch.Tensor, labels: torch.Tensor, n_tokens: float | None = None) -> torch.Tensor:
    """Mean answer-token NLL over the whole batch (the fine-tuning loss).

    ``n_tokens``: the answer tokens of the global batch (all ranks and micro-batches of
    the optimizer step, see :mod:`unlearn.train`); the value is then this batch's share.
    """
    logp, mask = token_logprobs(logits, labels)
    denom = mask.sum().clamp(min=1) if n_tokens is None else max(float(n_tokens), 1.0)
    return -(logp.sum() / denom)


@torch.no_grad()
def score_encoded(
    model, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 32, device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and number of labelled tokens per encoded example (QA answers, or every token of a text chunk).

    One :func:`~unlearn.models.teacher_forced.teacher_forced_pass` (rows sorted
    by length so each batch pads little; results in the callers' order).
    """
    nll = np.zeros(len(encoded), dtype=np.float64)
    n = np.zeros(len(encoded), dtype=np.int64)
    for b in teacher_forced_pass(model, encoded, pad_id=pad_id, batch_size=batch_size, device=device):
        s, L = sequence_logprob(b.logits, b.labels)
        nll[b.rows] = (-s).double().cpu().numpy()
        n[b.rows] = L.cpu().numpy()
    return nll, n


def score_answers(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    max_length: int,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    fmt: QAFormat = PLAIN,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed answer NLL and answer length per (question, answer) pair (:func:`score_encoded` of the QA rows).

    Callers flatten paraphrased and perturbed answers into one list so they share forward passes.
    """
    enc = encode_many(tokenizer, questions, answers, max_length, fmt=fmt)
    return score_encoded(model, enc, tokenizer.pad_token_id, batch_size, device)


def length_normalised_prob(nll_sum: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """P(a|q)^(1/|a|) = exp(-mean token NLL)."""
    return np.exp(-nll_sum / np.maximum(n_tokens, 1))
