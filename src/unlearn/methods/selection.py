"""Checkpoint selection: which step of an unlearning run to keep, from the evaluations logged during training.

Pure functions of the loss log (``train.train_loop``'s history: one entry per optimizer step, the
evaluated ones carrying ``eval_<name>`` values) and of the retain model's value of the same statistic on the
same slice. ``method.select``:

* ``last``: the last step (no rule; training runs to the end).
* ``forget_prob_at_retain``: the first evaluated step whose forget probability on the slice
  (``eval_forget_prob``) is at or below the retain model's. It is TOFU's analogue of the rule MUSE's authors
  published (the first checkpoint whose KnowMem on the forget set is at or below the retain model's): a model
  that never saw the forget set is the target, so training stops as soon as the forget answers are no more
  likely than for it. Because the rule picks the FIRST such step, later steps cannot change the choice and
  the loop stops there.
* ``knowmem_at_retain`` (MUSE): the rule MUSE's authors published: the first evaluated step whose KnowMem on
  the forget QA (``eval_knowmem_forget``: ROUGE-L of greedy answers to the first ``method.eval_rows``
  ``knowmem_forget`` questions, with the benchmark's few-shot prompt) is at or below the retain model's on the
  same questions.

Selection looks at the forget set (the evaluation slice is its first ``method.eval_rows`` rows) and at the
retain model: the kept model is chosen with knowledge of what it is evaluated on, like early stopping on a
test set. Report it beside the numbers (the forget stage's summary records ``select`` and ``selected_step``).
"""

from __future__ import annotations

from typing import Any, Sequence

RULES = ("last", "forget_prob_at_retain", "knowmem_at_retain")
STATISTIC = {"forget_prob_at_retain": "forget_prob", "knowmem_at_retain": "knowmem_forget"}
"""The statistic each rule compares (logged as ``eval_<statistic>``, the retain model's as ``retain_model_<statistic>``)."""


def select_step(history: Sequence[dict[str, Any]], rule: str, retain_value: float | None = None) -> dict | None:
    """The log entry the rule picks, or ``None`` (``last``, or no evaluated step satisfies the rule yet)."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; known: {', '.join(RULES)}")
    if rule == "last":
        return None
    if retain_value is None:
        raise ValueError(f"rule {rule} compares with the retain model's value: pass retain_value")
    key = "eval_" + STATISTIC[rule]
    for entry in history:
        if key in entry and entry[key] <= retain_value:
            return entry
    return None


def eval_curve(history: Sequence[dict[str, Any]], retain_value: float | None = None,
               rule: str = "forget_prob_at_retain") -> list[dict[str, Any]]:
    """The evaluated steps as plot rows: ``step`` and every ``eval_<name>`` as ``<name>`` (plus the retain
    model's value of the rule's statistic on the slice, when known, as ``retain_model_<statistic>``)."""
    rows = []
    for e in history:
        vals = {k[len("eval_"):]: v for k, v in e.items() if k.startswith("eval_")}
        if vals:
            if retain_value is not None:
                vals["retain_model_" + STATISTIC[rule]] = retain_value
            rows.append({"step": e["step"], **vals})
    return rows
