"""The one batched teacher-forced pass: encoded QA rows in, one forward per right-padded batch out.

Scoring (:func:`unlearn.models.scoring.score_answers`), evaluation
(:func:`unlearn.eval.pair_stats.teacher_forced_stats`) and the reference cache
(:func:`unlearn.cache.reference_pass`) all read their numbers off this pass, and
so will MUSE and membership-inference attacks: batching, padding, device
placement and autocast are decided here once, so that two consumers scoring the
same rows under the same settings see the same logits.

What each consumer reduces a batch to stays with the consumer, because the
reductions are not interchangeable to the bit: probability metrics and the
training losses take answer-token log-probs through ``cross_entropy``
(:func:`unlearn.models.scoring.token_logprobs`), the cache takes them as
``logits - logsumexp`` because it stores the log-sum-exp too, and exact
memorisation needs the argmax of the raw (un-cast) logits. Forcing one of those
on every consumer would move numbers that are compared, cached and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..precision import autocast_context
from .formatting import IGNORE, Encoded, collate


@dataclass(frozen=True)
class TeacherForcedBatch:
    """One forward of :func:`teacher_forced_pass`.

    ``rows``: the positions of this batch's rows in the ``encoded`` sequence (so a
    consumer writes ``out[batch.index] = ...`` and gets the caller's order back,
    whatever order the pass batched in). ``input_ids``, ``attention_mask``,
    ``labels``: the right-padded batch on the forward's device (``labels`` -100
    on the prompt and the padding, Hugging Face layout, not shifted).
    ``logits``: ``[B, T, V]`` exactly as the model returned them (its dtype, or
    the autocast's), not shifted; position t predicts token t+1.
    """

    rows: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor

    @property
    def index(self) -> torch.Tensor:
        """``rows`` as a CPU ``long`` tensor, for indexing per-row output buffers."""
        return torch.as_tensor(self.rows, dtype=torch.long)

    @property
    def next_labels(self) -> torch.Tensor:
        """``[B, T-1]`` labels aligned with ``logits[:, :-1]`` (the token each position predicts)."""
        return self.labels[:, 1:]

    @property
    def answer_mask(self) -> torch.Tensor:
        """``[B, T-1]`` True where :attr:`next_labels` is an answer token (EOS included)."""
        return self.next_labels != IGNORE


def model_device(model) -> torch.device:
    """The device of the model's first parameter: where its inputs must go."""
    return next(model.parameters()).device


@torch.no_grad()
def teacher_forced_pass(
    model,
    encoded: Sequence[Encoded],
    *,
    pad_id: int,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    mixed_precision: str = "no",
    by_length: bool = True,
    progress: bool = False,
    desc: str = "scoring",
) -> Iterator[TeacherForcedBatch]:
    """Yield one :class:`TeacherForcedBatch` per ``batch_size`` rows of ``encoded``, in eval mode, without grad.

    Batches are right-padded (:func:`unlearn.models.formatting.collate`), so
    position t of every row lines up with position t of the reference cache.
    The forward runs on ``device`` (default: the model's; the model is not
    moved) under :func:`unlearn.precision.autocast_context` with
    ``mixed_precision`` ("no" | "bf16" | "fp16"), what accelerate wraps the
    policy's forward in, so a consumer can reproduce the training run's numbers.

    ``by_length``: batch rows sorted by length (stable), so each batch pads
    little -- the scorers' order. ``False`` batches consecutive rows in input
    order, the reference cache's order: the batch composition decides the
    padded width, and the width can move the last bits of a forward, so the
    cache keeps the order its stored values were computed in.
    """
    model.eval()
    dev = torch.device(device) if device is not None else model_device(model)
    n = len(encoded)
    order = sorted(range(n), key=lambda i: len(encoded[i].input_ids)) if by_length else list(range(n))
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        rows = order[start:start + batch_size]
        batch = {k: v.to(dev) for k, v in collate([encoded[i] for i in rows], pad_id).items()}
        with autocast_context(dev.type, mixed_precision):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        yield TeacherForcedBatch(rows, batch["input_ids"], batch["attention_mask"], batch["labels"], logits)
