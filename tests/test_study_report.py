"""The study report (unlearn.study.report) regenerated from a small fixture MLflow store.

The store is written the way ``unlearn study run`` writes it (plan's cells, store.cell_tags, store.log_cell_run)
with numbers chosen so that every answer is known: which configuration the criterion picks, who wins each split
and on how many seeds. Every number checked is recomputed here with numpy/scipy from the values logged, not
with the report's own helpers, so a wrong aggregation, a wrong pick or a wrong sentence fails a test.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import gmean

from unlearn.fmt import fmt_number as F
from unlearn.study import plan, store
from unlearn.study.report import build_report
from unlearn.study.spec import Ablation, Criterion, StudySpec, Tuning

BASE = "seed: 0\nmethod: {name: dipo}\n"
SPEC = StudySpec(
    name="fixture", methods=["dipo", "npo", "ga"], seeds=[0, 1], splits=["forget05", "forget10"],
    tuning=Tuning(budget=2, split="forget10", shared={"method.lr": [1e-4, 5e-4]},
                  strength={"dipo": {"method.dipo.gamma": [5.0]}, "npo": {"method.npo.beta": [0.1]}}),
    criterion=Criterion(min_utility_ratio=0.9), trajectory_every=5, ablation_split="forget10",
    ablations=[Ablation(name="gamma-1", family="gamma", overrides={"method.dipo.gamma": 1.0}),
               Ablation(name="gamma-20", family="gamma", overrides={"method.dipo.gamma": 20.0}),
               Ablation(name="gold-mask", overrides={"method.dipo.mask": "gold"})])

# --- the numbers -------------------------------------------------------------------------------------------
REF = {  # (world, split, model) -> (forget_quality, model_utility, forget_prob)
    ("validation", "forget10", "target"): (2e-6, 0.60, 0.95), ("validation", "forget10", "retain"): (1.0, 0.59, 0.3),
    ("test", "forget05", "target"): (1e-5, 0.70, 0.96), ("test", "forget05", "retain"): (1.0, 0.69, 0.31),
    ("test", "forget10", "target"): (2e-6, 0.68, 0.97), ("test", "forget10", "retain"): (1.0, 0.67, 0.32),
}
VAL_TARGET = 0.60
TUNE = {  # method -> lr -> (forget_quality, model_utility) on the validation world
    "dipo": {1e-4: (0.3, 0.55), 5e-4: (0.8, 0.50)},   # the higher FQ loses utility (0.83 < 0.9): 1e-4 is chosen
    "npo": {1e-4: (0.9, 0.30), 5e-4: (0.01, 0.45)},   # neither keeps utility: the higher ratio (5e-4) is chosen
    "ga": {1e-4: (0.1, 0.58), 5e-4: (0.2, 0.57)},     # both keep utility: the higher FQ (5e-4) is chosen
}
CHOSEN_LR = {"dipo": 1e-4, "npo": 5e-4, "ga": 5e-4}
TEST = {  # (split, method) -> seed -> (fq, mu, forget_prob, relearn before, relearn after)
    ("forget10", "dipo"): {0: (0.33, 0.66, 0.20, 0.21, 0.50), 1: (0.70, 0.64, 0.10, 0.12, 0.40)},
    ("forget10", "ga"): {0: (0.04, 0.65, 0.30, 0.31, 0.80), 1: (0.90, 0.66, 0.25, 0.26, 0.70)},
    ("forget10", "npo"): {0: (0.95, 0.20, 0.01, 0.02, 0.03), 1: (0.99, 0.25, 0.02, 0.02, 0.05)},
    ("forget05", "dipo"): {0: (0.01, 0.69, 0.40, 0.41, 0.60), 1: (0.02, 0.68, 0.35, 0.36, 0.55)},
    ("forget05", "ga"): {0: (0.05, 0.66, 0.30, 0.33, 0.66), 1: (0.03, 0.65, 0.28, 0.29, 0.61)},
    ("forget05", "npo"): {0: (0.90, 0.30, 0.05, 0.06, 0.07)},  # seed 1 left out: coverage must say so
}
ABL = {"gamma-1": {0: (0.02, 0.67), 1: (0.04, 0.66)}, "gamma-20": {0: (0.5, 0.50), 1: (0.6, 0.52)}}
TRAJ = {0: [(0, 0.9), (5, 0.5), (10, 0.2)], 1: [(0, 0.9), (5, 0.4), (10, 0.1)]}


def _target(split: str) -> float:
    return REF[("test", split, "target")][1]


@pytest.fixture(scope="module")
def fixture_store(tmp_path_factory):
    """A sqlite MLflow store holding the fixture study; returns (client, runs read back)."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("study_store")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    exp = client.create_experiment(store.experiment_name(SPEC.name), artifact_location=(tmp / "artifacts").as_uri())

    def log(cell, metrics, history=None, commit="aaa111"):
        cell = plan.keyed(SPEC, cell, BASE)
        family = next((a.family for a in SPEC.ablations if a.name == cell.ablation), "")
        store.log_cell_run(client, exp, store.cell_tags(SPEC.name, cell, family=family, git_commit=commit),
                           metrics, history)

    for c in plan.reference_cells(SPEC):
        fq, mu, fp = REF[(c.world, c.split, c.method)]
        log(c, {"forget_quality": fq, "model_utility": mu, "forget_prob": fp,
                "utility_ratio": mu / REF[(c.world, c.split, "target")][1]})
    for c in plan.tune_cells(SPEC):
        fq, mu = TUNE[c.method][c.config_dict["method.lr"]]
        log(c, {"forget_quality": fq, "model_utility": mu, "utility_ratio": mu / VAL_TARGET})
    chosen = {m: next(cfg for cfg in plan.tuning_configs(SPEC, m) if cfg["method.lr"] == lr)
              for m, lr in CHOSEN_LR.items()}
    for c in plan.test_cells(SPEC, chosen):
        vals = TEST[(c.split, c.method)].get(c.seed)
        if vals is None:
            continue
        fq, mu, fp, before, after = vals
        log(c, {"forget_quality": fq, "model_utility": mu, "forget_prob": fp, "utility_ratio": mu / _target(c.split),
                "relearn_forget_prob_before": before, "relearn_forget_prob_after": after},
            {"traj_forget_prob": TRAJ[c.seed]} if c.split == "forget10" and c.method == "dipo" else None,
            commit="bbb222")
    for c in plan.ablation_cells(SPEC, chosen):
        if c.ablation in ABL:
            fq, mu = ABL[c.ablation][c.seed]
            log(c, {"forget_quality": fq, "model_utility": mu, "utility_ratio": mu / _target(c.split)})
    # a run of an earlier params file: another key, left out of every number
    stale = plan.tune_cells(SPEC)[0]
    log_stale = plan.keyed(SPEC, stale, BASE + "# edited\n")
    store.log_cell_run(client, exp, store.cell_tags(SPEC.name, log_stale, git_commit="ccc333"),
                       {"forget_quality": 1.0, "model_utility": 0.99})
    return client, store.read_runs(client, store.experiment_name(SPEC.name))


@pytest.fixture(scope="module")
def written(fixture_store, tmp_path_factory):
    _, runs = fixture_store
    report = build_report(SPEC, runs, base_text=BASE)
    md = tmp_path_factory.mktemp("docs") / "results.md"
    paths = report.write(md)
    return report, md, paths, md.read_text()


# --- reading the Markdown --------------------------------------------------------------------------------------
def _section(md: str, heading: str, sub: str | None = None) -> str:
    """The text under ``## heading`` (and under ``### sub`` within it)."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", md, re.S | re.M)
    assert m, f"no section {heading!r}"
    text = m.group(1)
    if sub is not None:
        m = re.search(rf"^### {re.escape(sub)}\n(.*?)(?=^### |\Z)", text, re.S | re.M)
        assert m, f"no subsection {sub!r} in {heading!r}"
        text = m.group(1)
    return text


def _row(text: str, first: str) -> list[str]:
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if cells[0] == first:
                return cells
    raise AssertionError(f"no table row {first!r} in:\n{text}")


def _fq_cell(values) -> str:
    a = np.asarray(values, dtype=float)
    return f"{F(float(gmean(a)))} [{F(float(a.min()))}, {F(float(a.max()))}]" if a.size > 1 else F(float(a[0]))


def _mu_cell(values) -> str:
    a = np.asarray(values, dtype=float)
    return f"{F(float(a.mean()))} ± {F(float(a.std(ddof=1))) if a.size > 1 else '—'}"


def _col(key, i):
    return [v[i] for _, v in sorted(TEST[key].items())]


# --- tests -----------------------------------------------------------------------------------------------------
def test_results_tables_match_the_store(written):
    _, _, _, md = written
    for split in SPEC.splits:
        text = _section(md, "Results", split)
        t = _target(split)
        for ref in ("target", "retain"):
            fq, mu, fp = REF[("test", split, ref)]
            row = _row(text, ref)
            assert row[1:7] == ["1", F(fq), f"{F(mu)} ± —", F(mu / t), F(fp), "—"], row
        for m in SPEC.methods:
            fq, mu, fp = _col((split, m), 0), _col((split, m), 1), _col((split, m), 2)
            ratio = np.asarray(mu) / t
            passes = sum(1 for q, r in zip(fq, ratio) if q >= 0.05 and r >= 0.9)
            row = _row(text, m)
            assert row[1] == str(len(fq))
            assert row[2] == _fq_cell(fq)
            assert row[3] == _mu_cell(mu)
            assert row[4] == F(float(ratio.mean()))
            assert row[5] == F(float(np.mean(fp)))
            assert row[6] == f"{passes}/{len(fq)}"
            assert row[7] == f"{F(float(np.mean(_col((split, m), 3))))} → {F(float(np.mean(_col((split, m), 4))))}"
    # the gate's FQ bound is inclusive (ga forget05 seed 0 has exactly 0.05) and a low FQ fails (ga forget10 seed 0)
    assert _row(_section(md, "Results", "forget05"), "ga")[6] == "1/2"
    assert _row(_section(md, "Results", "forget10"), "ga")[6] == "1/2"
    assert _row(_section(md, "Results", "forget10"), "dipo")[6] == "2/2"


def test_tuning_applies_the_criterion(written):
    report, _, _, md = written
    text = _section(md, "Tuning")
    assert "at least 0.9000 x the target's" in text
    expect = {"dipo": ({"method.dipo.gamma": 5.0, "method.lr": 1e-4}, True),
              "npo": ({"method.npo.beta": 0.1, "method.lr": 5e-4}, False),
              "ga": ({"method.lr": 5e-4}, True)}
    for m, (cfg, kept) in expect.items():
        ch = report.choices[m]
        assert ch.config == cfg and ch.kept_utility is kept
        fq, mu = TUNE[m][cfg["method.lr"]]
        row = _row(text, m)
        assert row[1] == "2 of 2"
        assert row[2] == ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()))
        assert row[3:5] == [F(fq), F(mu / VAL_TARGET)]
        assert row[5].startswith("yes" if kept else "no")
    # DiPO's higher-FQ configuration is not chosen: it loses utility
    assert TUNE["dipo"][5e-4][0] > TUNE["dipo"][1e-4][0]


def test_claim_names_the_winner_and_paired_seeds(written):
    report, _, _, md = written
    text = _section(md, "Does DiPO do what the paper claims?")
    lg = {k: np.mean(np.log10(_col(k, 0))) for k in TEST}
    # forget10: npo has the highest FQ but fails utility; DiPO beats ga on mean log10 FQ, on seed 0 only
    c10 = report.claims["forget10"]
    assert (c10.status, c10.winner, c10.rival, c10.beats) == ("holds", "dipo", "ga", (1, 2))
    assert c10.eligible == ("dipo", "ga")
    s10 = next(line for line in text.splitlines() if line.startswith("**forget10**"))
    assert "the claim holds" in s10 and "the best other is ga" in s10
    assert f"+{F(float(lg[('forget10', 'dipo')] - lg[('forget10', 'ga')]))}" in s10
    assert "higher on 1 of 2 seeds" in s10
    # forget05: ga wins; DiPO ranks 2 of 2 and is lower on both seeds
    c05 = report.claims["forget05"]
    assert (c05.status, c05.winner, c05.dipo_rank, c05.beats) == ("fails", "ga", 2, (0, 2))
    s05 = next(line for line in text.splitlines() if line.startswith("**forget05**"))
    assert "does not hold" in s05 and "ga has the highest" in s05 and "DiPO ranks 2 of 2" in s05
    assert F(float(lg[("forget05", "dipo")] - lg[("forget05", "ga")])) in s05 and "higher on 0 of 2 seeds" in s05
    assert "**Overall**: the claim holds at 1 of 2 tested splits (forget10); it does not hold at forget05." in text
    assert _row(_section(md, "Does DiPO do what the paper claims?"), "npo")[3] == "no"


def test_coverage_and_provenance(written, fixture_store):
    report, _, _, md = written
    _, runs = fixture_store
    assert report.partial
    assert "**Partial study**" in md.split("## Provenance")[0]
    cov = _section(md, "Coverage")
    assert "- test: 1 of 12 cells missing: npo forget05 seed 1" in cov
    assert "- ablation: 2 of 6 cells missing: gold-mask seeds 0, 1" in cov
    assert _row(cov, "tune")[1:] == ["6", "6", "0"]
    prov = _section(md, "Provenance")
    assert "reference 6, tune 6, test 11, ablation 4" in prov
    assert "`aaa111`, `bbb222`" in prov and "ccc333" not in prov  # the stale run's commit is not counted
    assert "1 finished run (1 cell key) matches no cell" in prov
    end = max(r.end_time for r in runs if r.tag("git_commit") != "ccc333")
    assert datetime.fromtimestamp(end / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") in prov
    notrun = _section(md, "Not run")
    assert "ablation gold-mask: no runs" in notrun and "MUSE" in notrun


def test_ablations_and_relearning(written):
    _, _, _, md = written
    text = _section(md, "Ablations of DiPO")
    base_fq, base_mu = _col(("forget10", "dipo"), 0), _col(("forget10", "dipo"), 1)
    assert _row(text, "base (chosen config)")[4:6] == [_fq_cell(base_fq), _mu_cell(base_mu)]
    for name, vals in ABL.items():
        fq, mu = [v[0] for _, v in sorted(vals.items())], [v[1] for _, v in sorted(vals.items())]
        row = _row(text, name)
        assert row[1] == "gamma" and row[3] == "2"
        assert row[4:6] == [_fq_cell(fq), _mu_cell(mu)]
        d = float(np.mean(np.log10(fq)) - np.mean(np.log10(base_fq)))
        assert row[6] == (F(d) if d < 0 else "+" + F(d))
    assert _row(text, "gold-mask")[4] == "not run"
    rel = _section(md, "Relearning attack", "forget10")
    for m in SPEC.methods:
        b, a = np.mean(_col(("forget10", m), 3)), np.mean(_col(("forget10", m), 4))
        assert _row(rel, m)[2:] == [F(float(b)), F(float(a)), "+" + F(float(a - b))]


def test_files_are_reproducible_and_charts_parse(written, fixture_store, tmp_path):
    report, md_path, paths, md = written
    files = md_path.parent / "results_files"
    assert paths[0] == md_path
    assert sorted(p.name for p in paths[1:]) == ["sensitivity.svg", "tradeoff.svg", "trajectory.svg"]
    for p in paths[1:]:
        assert p.parent == files
        assert f"](results_files/{p.name})" in md
        root = ET.parse(p).getroot()
        assert root.tag.endswith("svg")
    assert "no base point" not in md  # gamma is a tuned DiPO knob: the base point is drawn
    # the same store read again (its order not promised) gives the same bytes, and rewriting is idempotent
    client, _ = fixture_store
    again = build_report(SPEC, list(reversed(store.read_runs(client, store.experiment_name(SPEC.name)))),
                         base_text=BASE)
    other = tmp_path / "results.md"
    paths2 = again.write(other)
    for a, b in zip(paths, paths2):
        assert a.read_bytes() == b.read_bytes(), a.name
    before = {p: p.read_bytes() for p in paths}
    report.write(md_path)
    assert all(p.read_bytes() == b for p, b in before.items())


def test_a_partial_study_says_so(fixture_store, tmp_path):
    """ga's tuning incomplete and DiPO's test runs gone: no ga choice, ga's test runs left out, claims untested,
    and charts without data skipped with a sentence."""
    _, runs = fixture_store
    ga_tune = next(r for r in runs if r.phase == "tune" and r.method == "ga" and r.config["method.lr"] == 5e-4)
    kept = [r for r in runs if r is not ga_tune and not (r.phase == "test" and r.method == "dipo")]
    report = build_report(SPEC, kept, base_text=BASE)
    md = report.markdown("x_files")
    assert "ga" not in report.choices and set(report.choices) == {"dipo", "npo"}
    cov = _section(md, "Coverage")
    assert "tuning incomplete, no configuration chosen yet (so no test or ablation cells): ga" in cov
    assert "ga: all 4 cells (not tuned yet)" in cov
    assert _row(_section(md, "Tuning"), "ga")[1:3] == ["1 of 2", "no choice yet"]
    claims = _section(md, "Does DiPO do what the paper claims?")
    assert "**forget10**: DiPO has no test runs here, so the claim is untested." in claims
    assert "untested (no DiPO test runs) at forget05, forget10" in claims
    with pytest.raises(AssertionError):
        _row(_section(md, "Results", "forget10"), "ga")
    assert "trajectory" not in report.charts and "No chart: no test run at forget10" in md
    assert "family gamma: no base point" in md


def test_the_choice_follows_the_numbers(fixture_store):
    """Raise DiPO's second configuration's validation utility over the bar: now its higher FQ is chosen (and the
    test runs of the old choice no longer count)."""
    _, runs = fixture_store
    changed = []
    for r in runs:
        if r.phase == "tune" and r.method == "dipo" and r.config["method.lr"] == 5e-4:
            r = replace(r, metrics={**r.metrics, "model_utility": 0.56})
        changed.append(r)
    report = build_report(SPEC, changed, base_text=BASE)
    ch = report.choices["dipo"]
    assert ch.config["method.lr"] == 5e-4 and ch.kept_utility
    assert math.isclose(ch.utility_ratio, 0.56 / VAL_TARGET)
    assert ("forget10", "dipo") not in report.stats
    assert report.coverage["test"].finished == 11 - 4
