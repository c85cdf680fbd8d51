"""The registration gate and the champion rule: pure functions of metric dicts.

Kept apart from :mod:`unlearn.tracking` (which logs and registers through MLflow)
so the rules that decide what may be served can be read, tested and reused
without a tracking store: a second benchmark gates on the same two rules.

* :func:`gate_decision`: a model passes iff its forget metric passes its bound
  (TOFU: ``forget_quality >= min_forget_quality``; MUSE: ``|privleak| <= max_abs_privleak``)
  and its utility ``>= min_utility_ratio x`` the target model's (TOFU: model
  utility; MUSE: KnowMem on the retain set). A missing (None) or non-finite
  metric fails, with the reason.
* :func:`at_least_as_good`: a new version takes the champion alias of its forget
  set iff its forget metric is at least as good (TOFU: higher; MUSE: closer to 0)
  AND its utility is >= the champion's (ties go to the newer model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class GateMetrics:
    """Which metrics of a benchmark's ``metrics.json`` the two rules read, and how (each benchmark names its own).

    ``forget_rule`` ``min``: ``forget`` must reach ``gate.min_forget_quality`` (TOFU's KS
    p-value); ``abs_max``: ``|forget|`` must be at most ``gate.max_abs_privleak`` (MUSE's
    PrivLeak, 0 = the retain model). ``utility`` must reach ``gate.min_utility_ratio``
    times the target model's value. TOFU's are the defaults.
    """

    forget: str = "forget_quality"
    utility: str = "model_utility"
    forget_rule: Literal["min", "abs_max"] = "min"

    @property
    def forget_bound(self) -> str:
        """The ``gate:`` key of the forget metric's bound."""
        return "min_forget_quality" if self.forget_rule == "min" else "max_abs_privleak"

    def forget_score(self, value: float) -> float:
        """Higher is better: the metric itself (``min``), or minus its distance from 0 (``abs_max``)."""
        return value if self.forget_rule == "min" else -abs(value)


DEFAULT_GATE: dict[str, float] = {"min_forget_quality": 0.05, "min_utility_ratio": 0.9, "max_abs_privleak": 25.0}
"""The thresholds used when ``params.yaml`` leaves a gate key out."""

CHAMPION_METRICS: tuple[str, ...] = ("forget_quality", "model_utility")
"""The metrics the champion rule compares (both must be at least the champion's)."""


def as_float(v: Any) -> float | None:
    """``v`` as a finite float, or None (None, bools, non-numbers, NaN and infinities).

    Metrics arrive as floats from an evaluation, as strings from MLflow tags, or as
    None when they could not be computed; every rule treats "not a number" alike.
    """
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass
class GateDecision:
    """Whether a model passed the gate, and every reason it did not."""

    passed: bool
    reasons: list[str] = field(default_factory=list)


def gate_decision(metrics: Mapping[str, Any], target_metrics: Mapping[str, Any] | None,
                  gate: Mapping[str, float] | None = None, names: GateMetrics = GateMetrics()) -> GateDecision:
    """Pass iff the forget metric passes its bound (see :class:`GateMetrics`) and utility >= min_utility_ratio * target's.

    Every failed condition adds a reason; a None (or missing, or non-finite) metric fails with a reason.
    ``gate`` values that are None fall back to :data:`DEFAULT_GATE`.
    """
    g = {**DEFAULT_GATE, **{k: float(v) for k, v in (gate or {}).items() if v is not None}}
    reasons = []
    fq = as_float(metrics.get(names.forget))
    bound = g[names.forget_bound]
    if fq is None:
        reasons.append(f"{names.forget} is missing (None): cannot check the {names.forget_bound} gate")
    elif names.forget_rule == "min" and fq < bound:
        reasons.append(f"{names.forget} {fq:.4g} < {names.forget_bound} {bound:.4g}")
    elif names.forget_rule == "abs_max" and abs(fq) > bound:
        reasons.append(f"|{names.forget}| {abs(fq):.4g} > {names.forget_bound} {bound:.4g}")
    mu = as_float(metrics.get(names.utility))
    tmu = as_float((target_metrics or {}).get(names.utility))
    if mu is None:
        reasons.append(f"{names.utility} is missing (None): cannot check the utility gate")
    if tmu is None:
        reasons.append(f"target {names.utility} is missing (None): cannot check the utility ratio")
    if mu is not None and tmu is not None:
        need = g["min_utility_ratio"] * tmu
        if mu < need:
            ratio = mu / tmu if tmu else float("inf")
            reasons.append(f"{names.utility} {mu:.4g} < {g['min_utility_ratio']:.4g} x target {tmu:.4g} = {need:.4g} "
                           f"(ratio {ratio:.3f})")
    return GateDecision(passed=not reasons, reasons=reasons)


def at_least_as_good(new: Mapping[str, Any], champion: Mapping[str, Any], names: GateMetrics = GateMetrics()) -> bool:
    """The champion rule: forget metric at least as good as the champion's (:meth:`GateMetrics.forget_score`) AND
    utility >= champion's (a missing value of the new model loses; a missing champion value does not count)."""
    for k, score in ((names.forget, names.forget_score), (names.utility, float)):
        a, b = as_float(new.get(k)), as_float(champion.get(k))
        if a is None:
            return False
        if b is not None and score(a) < score(b):
            return False
    return True


REQUEST_GATE: dict[str, float] = {"min_ks_pvalue": 0.05, "max_mia_auc_gap": 0.15, "max_prob_gap": 0.1,
                                  "max_rouge_gap": 0.2}
"""``requests.gate`` defaults: the oracle-free thresholds (:mod:`unlearn.requests.evidence`)."""
REQUEST_MIA_KEYS: tuple[str, ...] = ("mia_auc_loss", "mia_auc_min_k_plus_plus")
"""The membership AUCs the request gate bounds from below (0.5 - ``max_mia_auc_gap``)."""


def request_checks(evidence: Mapping[str, Any], thresholds: Mapping[str, float] | None = None) -> list[str]:
    """Why one request's evidence (:func:`unlearn.requests.evidence.holdout_evidence`) fails ``requests.gate``;
    ``[]`` when it passes. A value that could not be computed fails, with the reason.

    Every check is one-sided, on the side of "still remembered": the KS test asks whether the rows are known
    better than the holdout's, the AUCs fail only below 0.5 (members' side), the gaps only when positive. Rows
    the model now knows *worse* than unseen ones (over-unlearning) pass: the request is honoured; that they
    stand out is visible in the evidence (AUC above 0.5, negative gaps). Measured in docs/requests.md: the
    two-sided form refused even the retain model, whose forget authors differ from the holdout authors."""
    g = {**REQUEST_GATE, **{k: float(v) for k, v in (thresholds or {}).items() if v is not None}}
    out = []
    ks = as_float(evidence.get("ks_pvalue"))
    if ks is None:
        out.append("ks_pvalue is missing (no finite scores of the rows or of the holdout)")
    elif ks < g["min_ks_pvalue"]:
        out.append(f"ks_pvalue {ks:.4g} < min_ks_pvalue {g['min_ks_pvalue']:.4g}")
    for key in REQUEST_MIA_KEYS:
        auc = as_float(evidence.get(key))
        if auc is None:
            out.append(f"{key} is missing")
        elif 0.5 - auc > g["max_mia_auc_gap"]:  # on the members' side only: an AUC above 0.5 is over-unlearning
            out.append(f"{key} {auc:.4g} is {0.5 - auc:.4g} below 0.5 > max_mia_auc_gap {g['max_mia_auc_gap']:.4g} "
                       "(the rows still look trained on)")
    for k, bound in (("prob_gap", "max_prob_gap"), ("rouge_gap", "max_rouge_gap")):
        gap = as_float(evidence.get(k))
        if gap is None:
            out.append(f"{k} is missing")
        elif gap > g[bound]:
            out.append(f"{k} {gap:.4g} > {bound} {g[bound]:.4g}")
    return out


def request_gate(evidence: Mapping[str, Mapping[str, Any]], metrics: Mapping[str, Any],
                 target_metrics: Mapping[str, Any] | None, thresholds: Mapping[str, float] | None = None,
                 min_utility_ratio: float | None = None, names: GateMetrics = GateMetrics(),
                 earlier: tuple[str, ...] | list[str] = ()) -> GateDecision:
    """The gate of a model unlearned for deletion requests without an oracle (``requests.oracle: none``): every
    request it claims to honour (``evidence``: ``{request_id: evidence}``) must pass :func:`request_checks`, and
    its utility must reach ``min_utility_ratio`` x the target's. A request in ``earlier`` (honoured by an earlier
    version; in ``requests.mode: sequential``, by the model this one was unlearned from) that fails, or has no
    evidence, is named as a regression: the model relearned it."""
    reasons = [f"regresses on earlier request {rid}: no evidence recorded for it (every request a model claims to "
               "honour is re-checked)" for rid in earlier if rid not in evidence]
    for rid, ev in evidence.items():
        why = request_checks(ev, thresholds)
        if why:
            what = f"regresses on earlier request {rid}" if rid in earlier else f"request {rid}"
            reasons.append(f"{what}: " + ", ".join(why))
    utility = gate_decision({names.forget: 1.0, names.utility: metrics.get(names.utility)}, target_metrics,
                            {"min_forget_quality": 0.0, "max_abs_privleak": float("inf"),
                             "min_utility_ratio": DEFAULT_GATE["min_utility_ratio"] if min_utility_ratio is None
                             else min_utility_ratio}, GateMetrics(forget=names.forget, utility=names.utility))
    reasons += utility.reasons
    return GateDecision(passed=not reasons, reasons=reasons)
