"""The relearning attack: does a few steps of fine-tuning on part of the forget set bring the rest back?

An unlearned model that only hides its knowledge recovers the held-out forget answers after a little
training on the others (the attack of Hu et al., "Jogging the memory of unlearned LLMs"); one that removed it
recovers them no faster than a model that never learned them. The forget rows are split with a seeded
permutation: the first ``fraction`` are the attack's training rows, the rest are measured, before and after,
by their mean length-normalised answer probability (the memorisation summary's measure). The attack trains
with the project's one loop (:func:`unlearn.train.train_loop`), plain answer NLL, no retain term.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..models.formatting import Encoded, collate
from ..models.scoring import length_normalised_prob, score_encoded


def split_rows(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(attack rows, measured rows): a seeded permutation's first ``round(fraction n)`` rows, and the rest."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(max(1, round(fraction * n)), n - 1)
    return sorted(perm[:k]), sorted(perm[k:])


def mean_prob(model, rows: Sequence[Encoded], pad_id: int, batch_size: int = 32) -> float:
    nll, n = score_encoded(model, list(rows), pad_id, batch_size=batch_size)
    return float(np.mean(length_normalised_prob(nll, n)))


def relearn_attack(model, forget: Sequence[Encoded], pad_id: int, *, fraction: float, steps: int, lr: float,
                   batch_size: int, seed: int) -> dict[str, float]:
    """Attack ``model`` in place; ``relearn_forget_prob_before`` / ``_after`` on the measured rows."""
    from ..methods.losses import nll_loss
    from ..train import LoopCfg, train_loop

    attack, held = split_rows(len(forget), fraction, seed)
    before = mean_prob(model, [forget[i] for i in held], pad_id)
    rows = [forget[i] for i in attack]
    epochs = math.ceil(steps / max(1, math.ceil(len(rows) / batch_size)))
    cfg = LoopCfg(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, eval_every=1, desc="relearning attack")

    def step_loss(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return nll_loss(logits, batch["labels"], batch.get("n_tokens")), {}

    log = train_loop(model, len(rows), lambda idx, epoch: collate([rows[i] for i in idx], pad_id), step_loss, cfg,
                     evaluate=lambda m: {}, stop=lambda history: len(history) >= steps)
    model.eval()
    after = mean_prob(model, [forget[i] for i in held], pad_id)
    return {"relearn_forget_prob_before": before, "relearn_forget_prob_after": after,
            "relearn_steps": float(len(log)), "relearn_rows": float(len(rows)), "relearn_measured_rows": float(len(held))}
