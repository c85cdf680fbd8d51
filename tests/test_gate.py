"""The registration gate and the champion rule (unlearn.gate): pure functions, no tracking store."""

from __future__ import annotations

import math

from unlearn import gate, tracking
from unlearn.gate import at_least_as_good, gate_decision

TARGET = {"forget_quality": 1e-6, "model_utility": 0.60}
GATE = {"min_forget_quality": 0.05, "min_utility_ratio": 0.9}


def test_gate_passes():
    d = gate_decision({"forget_quality": 0.5, "model_utility": 0.55}, TARGET, GATE)
    assert d.passed and d.reasons == []


def test_gate_fails_on_forget_quality():
    d = gate_decision({"forget_quality": 0.01, "model_utility": 0.59}, TARGET, GATE)
    assert not d.passed and len(d.reasons) == 1 and "forget_quality" in d.reasons[0]


def test_gate_fails_on_utility_ratio():
    d = gate_decision({"forget_quality": 0.9, "model_utility": 0.53}, TARGET, GATE)  # < 0.9 * 0.60
    assert not d.passed and len(d.reasons) == 1 and "model_utility" in d.reasons[0]


def test_gate_none_metric_fails_with_reason():
    d = gate_decision({"forget_quality": None, "model_utility": 0.59}, TARGET, GATE)
    assert not d.passed and "forget_quality is missing" in d.reasons[0]
    d = gate_decision({"forget_quality": 0.9, "model_utility": 0.59}, {"model_utility": None}, GATE)
    assert not d.passed and "target model_utility" in d.reasons[0]


def test_gate_defaults_and_non_finite_metrics():
    # no thresholds given: the defaults; a NaN is as missing as a None
    assert gate_decision({"forget_quality": 0.04, "model_utility": 0.6}, TARGET).reasons[0].endswith("0.05")
    d = gate_decision({"forget_quality": math.nan, "model_utility": 0.6}, TARGET, GATE)
    assert not d.passed and "forget_quality is missing" in d.reasons[0]


def test_champion_rule():
    champ = {"forget_quality": "0.3", "model_utility": "0.57"}  # as MLflow version tags: strings
    assert at_least_as_good({"forget_quality": 0.3, "model_utility": 0.58}, champ)  # tie + better: takes over
    assert not at_least_as_good({"forget_quality": 0.4, "model_utility": 0.56}, champ)  # one worse: challenger
    assert not at_least_as_good({"forget_quality": None, "model_utility": 0.9}, champ)  # a missing value loses
    assert at_least_as_good({"forget_quality": 0.1, "model_utility": 0.5}, {"forget_quality": "None"})


def test_tracking_still_exports_the_gate():
    assert tracking.gate_decision is gate.gate_decision and tracking.GateDecision is gate.GateDecision
    assert tracking.at_least_as_good is gate.at_least_as_good
