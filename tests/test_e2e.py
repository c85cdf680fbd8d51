"""End to end on the built-in default: synthetic data -> target/retain models -> DiPO -> TOFU evaluation.

Slow (a few minutes on 2 cores): the models are really trained, with the
project's own params.yaml, in a temporary working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unlearn import stages
from unlearn.config import load_params
from unlearn.io import read_json

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    old = os.getcwd()
    os.chdir(work)
    try:
        p = load_params(ROOT / "params.yaml")
        stages.prepare(p)
        target = stages.finetune(p, "target")
        retain = stages.finetune(p, "retain")
        unlearned = stages.forget(p)
        ev = {name: stages.evaluate(p, stages.model_dir(p, name), name) for name in ("retain", "target", "unlearned")}
        yield {"p": p, "work": work, "target": target, "retain": retain, "unlearned": unlearned, "eval": ev}
    finally:
        os.chdir(old)


def test_target_memorises_and_retain_model_does_not(run):
    assert run["target"]["forget_prob"] > 0.85, run["target"]
    assert run["retain"]["forget_prob"] < 0.25, run["retain"]
    assert run["retain"]["retain_prob"] > 0.8, run["retain"]


def test_dipo_forgets_and_keeps_the_retain_set(run):
    t, u = run["target"], run["unlearned"]
    assert u["forget_prob"] < 0.1 * t["forget_prob"], (t, u)
    assert u["retain_prob"] > 0.85 * t["retain_prob"], (t, u)
    log = read_json(run["work"] / "reports" / "forget" / "loss.json")
    assert len(log) == u["steps"] and all("forget_loss" in e for e in log)


def test_forget_quality_orders_the_three_models(run):
    m = {k: v.metrics for k, v in run["eval"].items()}
    assert m["retain"]["forget_quality"] == pytest.approx(1.0)
    assert m["target"]["forget_quality"] < 1e-3
    assert m["target"]["forget_prob"] > 0.85 and m["target"]["forget_rouge"] > 0.8
    assert m["unlearned"]["forget_quality"] > 100 * m["target"]["forget_quality"]
    for name in m:
        assert 0 < m[name]["model_utility"] <= 1


def test_reports_and_reference_are_written(run):
    rep = run["work"] / "reports" / "eval"
    for name in ("retain", "target", "unlearned"):
        for f in ("metrics.json", "per_example.jsonl", "report.md", "report.html", "truth_ratio_hist.png"):
            assert (rep / name / f).stat().st_size > 0, (name, f)
    assert list((rep / "retain" / "reference").glob("*.json"))
    points = read_json(rep / "tradeoff.json")
    assert {pt["model"].split(" ")[0] for pt in points} == {"target", "retain", "unlearned"}
    html = (rep / "unlearned" / "report.html").read_text()
    assert "Forget quality" in html or "forget_quality" in html
