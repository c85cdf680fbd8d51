"""Per (question, answer) pair statistics from one teacher-forced pass: NLL, exact memorisation, extraction strength.

Benchmark-agnostic (TOFU's metrics read them, MUSE's will): every pair is one
row of :func:`unlearn.models.teacher_forced.teacher_forced_pass`, scored with
the same encoding and log-prob primitive as
:func:`unlearn.models.scoring.score_answers`, so the NLLs are identical to it,
and the argmax-match statistics are read off the same logits, so memorisation
costs no second pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from unlearn.models.formatting import encode_many
from unlearn.models.template import PLAIN, QAFormat
from unlearn.models.scoring import token_logprobs
from unlearn.models.teacher_forced import teacher_forced_pass


@dataclass
class PairStats:
    """Per (question, answer) pair statistics from one teacher-forced pass.

    ``nll_sum``/``n_tokens`` cover the answer tokens *and* EOS (the probability
    metrics); ``em_hits``/``em_n``/``es_k`` cover the answer tokens *without* EOS
    (open-unlearning drops the EOS prediction for memorisation metrics).
    ``es_k`` is the first answer position from which every greedy (argmax)
    prediction equals the label (``em_n`` when the last token is wrong).
    """

    nll_sum: np.ndarray
    n_tokens: np.ndarray
    em_hits: np.ndarray
    em_n: np.ndarray
    es_k: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> "PairStats":
        """``n`` pairs, all counts 0: the buffers a pass fills (and the empty result for ``n = 0``)."""
        return cls(nll_sum=np.zeros(n, dtype=np.float64), n_tokens=np.zeros(n, dtype=np.int64),
                   em_hits=np.zeros(n, dtype=np.int64), em_n=np.zeros(n, dtype=np.int64),
                   es_k=np.zeros(n, dtype=np.int64))

    @property
    def mean_nll(self) -> np.ndarray:
        return self.nll_sum / np.maximum(self.n_tokens, 1)

    @property
    def prob(self) -> np.ndarray:
        """Length-normalised P(a|q) = exp(-mean token NLL)."""
        return np.exp(-self.mean_nll)

    @property
    def exact_mem(self) -> np.ndarray:
        """Share of answer tokens whose argmax equals the label (NaN without answer tokens)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.em_n > 0, self.em_hits / np.maximum(self.em_n, 1), np.nan)

    @property
    def extraction_strength(self) -> np.ndarray:
        """``1 - k/n``; 0 without answer tokens (as open-unlearning)."""
        return np.where(self.em_n > 0, 1.0 - self.es_k / np.maximum(self.em_n, 1), 0.0)


@torch.no_grad()
def teacher_forced_stats(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    max_length: int,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "scoring",
    fmt: QAFormat = PLAIN,
) -> PairStats:
    """:func:`unlearn.models.scoring.score_answers` plus argmax-match statistics (exact memorisation,
    extraction strength), from the same :func:`~unlearn.models.teacher_forced.teacher_forced_pass`.

    Same encoding, batching (sorted by length), padding and log-prob primitive as
    ``score_answers`` (so the NLLs are identical); one forward per batch,
    everything else vectorised. The argmax is taken on the logits as the model
    returned them, before the float32 cast of the log-probs, so that a rounding
    of nearly tied logits cannot change a greedy prediction.
    """
    enc = encode_many(tokenizer, questions, answers, max_length, fmt=fmt)
    out = PairStats.zeros(len(enc))
    eos = tokenizer.eos_token_id
    for b in teacher_forced_pass(model, enc, pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=device,
                                 progress=progress, desc=desc):
        idx = b.rows
        logp, mask = token_logprobs(b.logits, b.labels)  # [B, T-1]
        labels = b.next_labels
        pred = b.logits[:, :-1, :].argmax(-1)
        em_mask = mask if eos is None else mask & (labels != eos)
        match = (pred == labels) & em_mask
        mismatch = em_mask & ~match
        pos = em_mask.long().cumsum(-1) - 1  # index of each answer token within the answer
        last_mismatch = torch.where(mismatch, pos, torch.full_like(pos, -1)).max(-1).values
        out.nll_sum[idx] = (-logp.sum(-1)).double().cpu().numpy()
        out.n_tokens[idx] = mask.sum(-1).cpu().numpy()
        out.em_hits[idx] = match.sum(-1).cpu().numpy()
        out.em_n[idx] = em_mask.sum(-1).cpu().numpy()
        out.es_k[idx] = (last_mismatch + 1).cpu().numpy()
    return out
