"""The benchmark interface: TOFU satisfies it, the stages reach the data only through it, the gate reads its names."""

from __future__ import annotations

import pytest

from unlearn.benchmark import BENCHMARKS, Benchmark, get_benchmark
from unlearn.config import ConfigError, Params
from unlearn.gate import GateMetrics, at_least_as_good, gate_decision


def test_every_registered_benchmark_satisfies_the_protocol():
    assert "tofu" in BENCHMARKS
    for name, bench in BENCHMARKS.items():
        assert isinstance(bench, Benchmark) and bench.name == name
        assert isinstance(bench.gate_metrics, GateMetrics)


def test_unknown_benchmark_is_a_config_error_naming_the_known_ones():
    with pytest.raises(ConfigError, match="known: tofu"):
        get_benchmark("nope")


def test_params_reject_an_unknown_benchmark():
    with pytest.raises(Exception, match="benchmark"):
        Params(benchmark="nope")


def test_tofu_evaluates_the_perturbed_twin_and_the_utility_sets():
    forget, names = get_benchmark("tofu").eval_splits(Params())
    assert forget == "forget10_perturbed"
    assert names == ["forget10_perturbed", "retain_perturbed", "real_authors", "world_facts", "holdout10"]
    forget, names = get_benchmark("tofu").eval_splits(Params(data={"forget_split": "forget01"}))
    assert forget == "forget01_perturbed" and names[-1] == "holdout01"
    _, names = get_benchmark("tofu").eval_splits(Params(data={"forget_split": "forget_requests"}))
    assert not [n for n in names if n.startswith("holdout")]  # a request forget set has no holdout authors


def test_tofu_corpus_leaves_the_holdout_authors_out():
    from unlearn.data.synthetic import generate_tofu

    splits = {k: v for k, v in generate_tofu(10, 4, 0).items() if k != "idk"}
    text = "\n".join(get_benchmark("tofu").corpus_texts(splits))
    holdout = splits["holdout10"]
    assert holdout and not [r for r in holdout if r["question"] in text or r["answer"] in text]
    assert all(r["answer"] in text for r in splits["full"])


def test_the_gate_reads_the_benchmarks_metric_names():
    names = GateMetrics(forget="privleak_score", utility="knowmem_retain")
    good = {"privleak_score": 0.5, "knowmem_retain": 0.8, "forget_quality": 0.0, "model_utility": 0.0}
    target = {"knowmem_retain": 0.85, "model_utility": 1.0}
    assert gate_decision(good, target, None, names).passed
    assert not gate_decision(good, target).passed  # TOFU's names: forget_quality 0.0 fails
    bad = dict(good, privleak_score=0.01)
    d = gate_decision(bad, target, None, names)
    assert not d.passed and "privleak_score 0.01" in d.reasons[0]
    assert at_least_as_good(good, {"privleak_score": 0.4, "knowmem_retain": 0.8}, names)
    assert not at_least_as_good(good, {"privleak_score": 0.6, "knowmem_retain": 0.1}, names)
