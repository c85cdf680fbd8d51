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


# --------------------------------------------------------------------------- MUSE: |PrivLeak| bound, KnowMem utility
MUSE = gate.GateMetrics(forget="privleak", utility="knowmem_retain", forget_rule="abs_max")


def test_muse_gate_bounds_privleak_on_both_sides():
    target = {"knowmem_retain": 0.5}
    g = {"max_abs_privleak": 10.0, "min_utility_ratio": 0.9}
    assert gate_decision({"privleak": -9.9, "knowmem_retain": 0.45}, target, g, MUSE).passed
    assert gate_decision({"privleak": 9.9, "knowmem_retain": 0.45}, target, g, MUSE).passed
    under = gate_decision({"privleak": -60.0, "knowmem_retain": 0.5}, target, g, MUSE)  # still leaks (target: ~-100)
    over = gate_decision({"privleak": 30.0, "knowmem_retain": 0.5}, target, g, MUSE)    # over-unlearned
    assert not under.passed and not over.passed
    assert under.reasons == ["|privleak| 60 > max_abs_privleak 10"]
    low = gate_decision({"privleak": 0.0, "knowmem_retain": 0.44}, target, g, MUSE)
    assert not low.passed and "knowmem_retain 0.44 < 0.9 x target 0.5" in low.reasons[0]


def test_muse_champion_is_the_one_closer_to_the_retain_model():
    champ = {"privleak": -20.0, "knowmem_retain": 0.4}
    assert at_least_as_good({"privleak": 5.0, "knowmem_retain": 0.4}, champ, MUSE)
    assert at_least_as_good({"privleak": 20.0, "knowmem_retain": 0.4}, champ, MUSE)  # tie on |privleak|
    assert not at_least_as_good({"privleak": -30.0, "knowmem_retain": 0.5}, champ, MUSE)
    assert not at_least_as_good({"privleak": 25.0, "knowmem_retain": 0.5}, champ, MUSE)
    assert not at_least_as_good({"privleak": 0.0, "knowmem_retain": 0.3}, champ, MUSE)
