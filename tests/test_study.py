"""The evidence study's plan, its tuning choice, its resumable runner and one real (tiny) study.

The plan and the criterion are pure functions, checked on hand-made inputs; the runner is checked twice:
with a stand-in executor (which cells run, in which order, what a second run redoes) and on the tiny
synthetic world end to end, where one test cell is recomputed by hand through the stages and must give the
logged numbers exactly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from unlearn.study import plan
from unlearn.study.plan import Cell, choose, chosen_configs, keyed, tuning_configs
from unlearn.study.relearn import split_rows
from unlearn.study.spec import StudyError, StudySpec, load_spec


def _spec(**kw) -> StudySpec:
    base = dict(name="t", methods=["dipo", "ga", "npo"], seeds=[0, 1], splits=["forget05", "forget10"],
                tuning={"budget": 3, "shared": {"method.lr": [1e-4, 1e-3]},
                        "strength": {"dipo": {"method.dipo.gamma": [2.0, 5.0, 10.0]}, "npo": {"method.npo.beta": [0.1]}}})
    base.update(kw)
    return StudySpec(**base)


def test_every_method_gets_the_same_budget_drawn_reproducibly():
    s = _spec()
    assert len(plan.method_grid(s, "dipo")) == 6 and len(plan.method_grid(s, "ga")) == 2
    dipo = tuning_configs(s, "dipo")
    assert len(dipo) == 3 and dipo == tuning_configs(s, "dipo")  # same draw every time
    assert all(c in plan.method_grid(s, "dipo") for c in dipo) and len({json.dumps(c, sort_keys=True) for c in dipo}) == 3
    assert tuning_configs(s, "ga") == [{"method.lr": 1e-4}, {"method.lr": 1e-3}]  # smaller grid: all of it
    # The draw of one method does not depend on which other methods the study lists.
    assert tuning_configs(_spec(methods=["dipo"], tuning={**s.tuning.model_dump(), "strength": {
        "dipo": {"method.dipo.gamma": [2.0, 5.0, 10.0]}}}), "dipo") == dipo
    assert len(plan.tune_cells(s)) == 3 + 2 + 2


def test_cell_keys_cover_every_input_that_changes_the_numbers():
    s = _spec()
    c = Cell("test", "test", "forget10", "dipo", 0, (("method.lr", 1e-3),))
    k = keyed(s, c, "params-a").key
    assert keyed(s, c, "params-a").key == k
    assert keyed(s, c, "params-b").key != k  # the base params file
    assert keyed(s, Cell("test", "test", "forget10", "dipo", 1, c.config), "params-a").key != k  # seed
    assert keyed(s, Cell("test", "test", "forget10", "dipo", 0, (("method.lr", 1e-4),)), "params-a").key != k
    assert keyed(_spec(overrides=["eval.batch_size=8"]), c, "params-a").key != k  # the study's overrides
    assert keyed(_spec(relearn={"steps": 9}), c, "params-a").key != k  # the attack is part of a test cell
    assert keyed(_spec(trajectory_every=3), c, "params-a").key != k
    tune = Cell("tune", "validation", "forget10", "dipo", 0, c.config)
    assert keyed(_spec(relearn={"steps": 9}), tune, "p").key == keyed(s, tune, "p").key  # no attack in tuning
    assert keyed(_spec(worlds={"validation": ["data.synthetic.seed=7"], "test": []}), tune, "p").key != \
        keyed(s, tune, "p").key
    assert c.overrides() == ["data.forget_split=forget10", "seed=0", "method.name=dipo", "method.lr=0.001"]


def test_the_criterion_keeps_utility_first_then_forgets_most():
    r = [({"lr": 1}, {"forget_quality": 0.9, "model_utility": 0.50}),   # forgets most, loses utility (0.5/0.6)
         ({"lr": 2}, {"forget_quality": 0.2, "model_utility": 0.58}),
         ({"lr": 3}, {"forget_quality": 0.3, "model_utility": 0.55}),   # the answer: 0.55/0.6 = 0.917 >= 0.9
         ({"lr": 4}, {"forget_quality": float("nan"), "model_utility": 0.6})]
    c = choose(r, 0.6, 0.9)
    assert c.config == {"lr": 3} and c.kept_utility and c.tried == 4
    assert c.utility_ratio == pytest.approx(0.55 / 0.6)
    assert choose(r, 0.6, 0.5).config == {"lr": 1}  # a looser bar admits the one that forgets most
    none_keep = choose(r[:3], 1.0, 0.9)  # no config keeps utility: the least damaging one, flagged
    assert none_keep.config == {"lr": 2} and not none_keep.kept_utility
    tie = [({"a": 1}, {"forget_quality": 0.3, "model_utility": 0.55}), ({"a": 2}, {"forget_quality": 0.3,
                                                                                    "model_utility": 0.59})]
    assert choose(tie, 0.6, 0.9).config == {"a": 2}
    assert choose([({"a": 1}, {"forget_quality": float("nan"), "model_utility": 0.5})], 0.6, 0.9) is None


def test_a_method_is_chosen_only_when_its_whole_budget_has_run():
    s = _spec(methods=["ga"], tuning={"budget": 2, "shared": {"method.lr": [1e-4, 1e-3]}})
    one = [{"method": "ga", "config": {"method.lr": 1e-4}, "metrics": {"forget_quality": 0.5, "model_utility": 1}}]
    assert chosen_configs(s, one, 1.0) == {}
    both = one + [{"method": "ga", "config": {"method.lr": 1e-3}, "metrics": {"forget_quality": 0.7,
                                                                              "model_utility": 1}}]
    assert chosen_configs(s, both, 1.0)["ga"].config == {"method.lr": 1e-3}
    assert chosen_configs(s, both, None) == {}  # no target utility yet: nothing can be chosen


def test_the_study_file_is_checked_with_clear_errors(tmp_path):
    f = tmp_path / "study.yaml"
    f.write_text("name: x\nmethods: [dipo, sgd]\n")
    with pytest.raises(StudyError, match="unknown method.*sgd"):
        load_spec(f)
    f.write_text("name: x\nmethods: [dipo]\nsplits: [forget10]\nbudgett: 3\n")
    with pytest.raises(StudyError, match="budgett"):
        load_spec(f)
    f.write_text("name: x\nmethods: [ga]\nablations: [{name: a}]\n")
    with pytest.raises(StudyError, match="list dipo"):
        load_spec(f)
    with pytest.raises(StudyError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    assert load_spec(Path("configs/study.yaml"), ["seeds=[0]"]).seeds == [0]


def test_relearning_rows_are_disjoint_and_cover_the_forget_set():
    a, h = split_rows(40, 0.5, 3)
    assert len(a) == 20 and len(h) == 20 and not set(a) & set(h) and set(a) | set(h) == set(range(40))
    assert split_rows(40, 0.5, 3) == (a, h) and split_rows(40, 0.5, 4) != (a, h)
    assert len(split_rows(3, 0.01, 0)[0]) == 1 and len(split_rows(3, 0.99, 0)[1]) == 1  # never an empty side


# --------------------------------------------------------------------------- the runner, with a stand-in executor
def _project(tmp_path: Path, body: str) -> Path:
    (tmp_path / "params.yaml").write_text(f"tracking: {{uri: 'sqlite:///{tmp_path}/mlflow.db'}}\n")
    (tmp_path / "study.yaml").write_text(body)
    return tmp_path


def test_the_runner_resumes_and_redoes_only_failed_cells(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from unlearn.study.runner import run_study
    from unlearn.study.store import cell_tags, experiment_name, log_cell_run, read_runs

    _project(tmp_path, "name: r\nmethods: [dipo, ga]\nsplits: [forget10]\nseeds: [0, 1]\n"
             "tuning: {budget: 2, shared: {method.lr: [1.0e-4, 1.0e-3]}}\n"
             "ablations: [{name: gold, overrides: {method.dipo.mask: gold}}]\n")
    monkeypatch.chdir(tmp_path)
    s = load_spec("study.yaml")
    ran: list[str] = []
    broken = {"ga": True}

    def executor(spec, cell, uri, exp_id, git, family):
        if cell.phase == "test" and cell.method == "ga" and broken["ga"]:
            raise RuntimeError("boom")
        ran.append(cell.label())
        lr = cell.config_dict.get("method.lr", 0)
        metrics = {"model_utility": 0.6 if cell.method == "target" else 0.58 - 100 * lr,
                   "forget_quality": 0.01 + lr * 100}  # lr 1e-3: forgets more but loses utility (0.48/0.6)
        return log_cell_run(MlflowClient(tracking_uri=uri), exp_id,
                            cell_tags(spec.name, cell, family=family, git_commit=git), metrics)

    first = run_study(s, executor=executor)
    assert [(p.phase, p.done, p.skipped, len(p.failed)) for p in first] == [
        ("reference", 4, 0, 0), ("tune", 4, 0, 0), ("test", 2, 0, 2), ("ablation", 2, 0, 0)]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = read_runs(client, experiment_name("r"))
    tests = [r for r in runs if r.phase == "test"]
    assert {r.method for r in tests} == {"dipo"} and all(r.config == {"method.lr": 1e-4} for r in tests)  # kept utility
    failed = read_runs(client, experiment_name("r"), finished_only=False)
    assert sum(r.status == "FAILED" for r in failed) == 2
    ran.clear()
    broken["ga"] = False
    second = run_study(s, executor=executor)
    assert [(p.phase, p.done, p.skipped) for p in second] == [
        ("reference", 0, 4), ("tune", 0, 4), ("test", 2, 2), ("ablation", 0, 2)]
    assert sorted(ran) == ["test/test/forget10/ga/" + plan.keyed(s, Cell("test", "test", "forget10", "ga", sd,
                           (("method.lr", 1e-4),)), "").config_id + f"/seed{sd}" for sd in (0, 1)]
    ran.clear()
    assert all(p.done == 0 for p in run_study(s, executor=executor)) and ran == []
    assert [p.done for p in run_study(s, executor=executor, phases=["tune"])] == [0]


# --------------------------------------------------------------------------- one real study on the tiny world
TINY_STUDY = """\
name: tiny
methods: [dipo, ga]
splits: [forget10]
seeds: [0]
overrides: [eval.generation_examples=4]
tuning: {budget: 2, shared: {method.lr: [2.0e-3, 1.0e-2]}, strength: {dipo: {method.dipo.gamma: [5.0]}}}
trajectory_every: 2
ablations: [{name: gamma-1, family: gamma, overrides: {method.dipo.gamma: 1.0}}]
relearn: {steps: 3, batch_size: 4}
"""


@pytest.mark.slow
def test_a_tiny_study_runs_end_to_end_and_its_numbers_are_the_stages_numbers(tmp_path, monkeypatch):
    from conftest import TINY_PARAMS
    from mlflow import MlflowClient

    from unlearn import stages
    from unlearn.config import load_params
    from unlearn.study.runner import cell_params, run_study
    from unlearn.study.store import experiment_name, read_runs

    (tmp_path / "params.yaml").write_text(TINY_PARAMS + f"tracking: {{uri: 'sqlite:///{tmp_path}/mlflow.db'}}\n")
    (tmp_path / "study.yaml").write_text(TINY_STUDY)
    monkeypatch.chdir(tmp_path)
    s = load_spec("study.yaml")
    res = run_study(s)
    assert [(p.phase, p.done, p.failed) for p in res] == [
        ("reference", 4, []), ("tune", 4, []), ("test", 2, []), ("ablation", 1, [])]
    runs = read_runs(MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"), experiment_name("tiny"))
    # The validation world is another world: its target differs from the test world's.
    tgt = {r.world: r.metrics for r in runs if r.phase == "reference" and r.method == "target"}
    assert tgt["validation"]["forget_prob"] != tgt["test"]["forget_prob"]
    dipo = next(r for r in runs if r.phase == "test" and r.method == "dipo")
    assert {"traj_forget_prob", "traj_retain_prob"} <= set(dipo.history)
    assert [st for st, _ in dipo.history["traj_forget_prob"]][:2] == [2, 4]
    assert dipo.metrics["relearn_steps"] == 3
    if tgt["test"]["model_utility"] > 0:  # the tiny model's ROUGE, and so its utility, may be 0: no ratio then
        assert dipo.metrics["utility_ratio"] == pytest.approx(dipo.metrics["model_utility"] / tgt["test"]["model_utility"])
        assert tgt["test"]["utility_ratio"] == 1.0
    else:
        assert "utility_ratio" not in dipo.metrics
    assert not list((Path(s.root) / "tiny" / "cells").glob("*/model.safetensors"))  # weights not kept
    # The same cell by hand, through the stages: the same numbers.
    cell = Cell("test", "test", "forget10", "dipo", 0, tuple(sorted(dipo.config.items())))
    p = cell_params(s, cell)
    assert p.method.name == "dipo" and p.method.eval_every == 2 and p.eval.generation_examples == 4
    out = tmp_path / "by_hand"
    models = Path(p.model.out_dir)
    stages.forget(p, out_dir=out, target_dir=models / "target")
    m = stages.evaluate(p, out, "by_hand", retain_dir=models / "retain", target_dir=models / "target",
                        out_dir=tmp_path / "by_hand_eval").metrics
    for k in ("forget_quality", "model_utility", "forget_prob", "forget_truth_ratio"):
        assert dipo.metrics[k] == pytest.approx(m[k], rel=1e-9, abs=1e-12), k
    # A second run does nothing; the ablation really ran with its override.
    assert all(p.done == 0 for p in run_study(s))
    abl = next(r for r in runs if r.phase == "ablation")
    assert abl.tags["study.ablation_family"] == "gamma" and abl.metrics["forget_prob"] != dipo.metrics["forget_prob"]
    assert load_params("params.yaml").seed == 0 and math.isfinite(abl.metrics["forget_quality"])
    assert os.path.islink(models / "target")
