"""The registration gate and the champion rule: pure functions of metric dicts.

Kept apart from :mod:`unlearn.tracking` (which logs and registers through MLflow)
so the rules that decide what may be served can be read, tested and reused
without a tracking store: a second benchmark gates on the same two rules.

* :func:`gate_decision`: a model passes iff ``forget_quality >= min_forget_quality``
  and ``model_utility >= min_utility_ratio x`` the target model's utility. A
  missing (None) or non-finite metric fails, with the reason.
* :func:`at_least_as_good`: a new version takes the champion alias of its forget
  set iff its forget quality AND its utility are both >= the champion's (ties go
  to the newer model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

@dataclass(frozen=True)
class GateMetrics:
    """Which metrics of a benchmark's ``metrics.json`` the two rules read (each benchmark names its own).

    ``forget`` must reach ``gate.min_forget_quality``; ``utility`` must reach
    ``gate.min_utility_ratio`` times the target model's value. TOFU's are the defaults.
    """

    forget: str = "forget_quality"
    utility: str = "model_utility"


DEFAULT_GATE: dict[str, float] = {"min_forget_quality": 0.05, "min_utility_ratio": 0.9}
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
    """Pass iff forget_quality >= min_forget_quality and model_utility >= min_utility_ratio * target's.

    Every failed condition adds a reason; a None (or missing, or non-finite) metric fails with a reason.
    ``gate`` values that are None fall back to :data:`DEFAULT_GATE`.
    """
    g = {**DEFAULT_GATE, **{k: float(v) for k, v in (gate or {}).items() if v is not None}}
    reasons = []
    fq = as_float(metrics.get(names.forget))
    if fq is None:
        reasons.append(f"{names.forget} is missing (None): cannot check the forget-quality gate")
    elif fq < g["min_forget_quality"]:
        reasons.append(f"{names.forget} {fq:.4g} < min_forget_quality {g['min_forget_quality']:.4g}")
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
    """The champion rule: forget metric >= champion's AND utility >= champion's (a missing champion value loses)."""
    for k in (names.forget, names.utility):
        a, b = as_float(new.get(k)), as_float(champion.get(k))
        if a is None:
            return False
        if b is not None and a < b:
            return False
    return True
