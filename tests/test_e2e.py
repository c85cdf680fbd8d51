"""End to end on the built-in default, exactly as a user runs it: `dvc repro` in a fresh copy of the project.

synthetic data -> GX validation -> target/retain models -> reference cache -> DiPO -> TOFU evaluation
-> gated MLflow registration. Then: a second `dvc repro` runs nothing, changing only an unlearning
parameter re-runs only forget/evaluate_unlearned/register, and `dvc push`/`dvc pull` work offline.
Slow (a few minutes on 2 cores): the models are really trained, with the project's own params.yaml.
"""

from __future__ import annotations

import shutil

import pytest

from helpers import copy_project, sh
from unlearn.io import read_json

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    work = copy_project(tmp_path_factory.mktemp("project"))
    res = sh(["dvc", "repro"], work)
    return {"dir": work, "first": res.stdout + res.stderr}


def _metrics(repo, name):
    return read_json(repo["dir"] / "reports" / "eval" / name / "metrics.json")


def test_pipeline_ran_every_stage(repo):
    for stage in ("prepare", "validate", "tokenizer", "finetune_target", "finetune_retain", "cache", "forget",
                  "evaluate_retain", "evaluate_target", "evaluate_unlearned", "register"):
        assert f"Running stage '{stage}'" in repo["first"], stage
    assert read_json(repo["dir"] / "reports" / "validation" / "result.json")["success"] is True


def test_target_memorises_and_retain_model_does_not(repo):
    t = read_json(repo["dir"] / "reports" / "finetune" / "target.json")
    r = read_json(repo["dir"] / "reports" / "finetune" / "retain.json")
    assert t["forget_prob"] > 0.85, t
    assert r["forget_prob"] < 0.25, r
    assert r["retain_prob"] > 0.8, r


def test_dipo_forgets_and_keeps_the_retain_set(repo):
    t = read_json(repo["dir"] / "reports" / "finetune" / "target.json")
    u = read_json(repo["dir"] / "reports" / "forget" / "summary.json")
    assert u["method"] == "dipo"
    assert u["forget_prob"] < 0.1 * t["forget_prob"], (t, u)
    assert u["retain_prob"] > 0.85 * t["retain_prob"], (t, u)
    log = read_json(repo["dir"] / "reports" / "forget" / "loss.json")
    assert len(log) == u["steps"] and all("forget_loss" in e for e in log)


def test_forget_quality_orders_the_three_models(repo):
    m = {n: _metrics(repo, n) for n in ("retain", "target", "unlearned")}
    assert m["retain"]["forget_quality"] == pytest.approx(1.0)
    assert m["target"]["forget_quality"] < 1e-3
    assert m["target"]["forget_prob"] > 0.85 and m["target"]["forget_rouge"] > 0.8
    assert m["unlearned"]["forget_quality"] > 100 * m["target"]["forget_quality"]
    for name in m:
        assert 0 < m[name]["model_utility"] <= 1


def test_reports_are_written(repo):
    rep = repo["dir"] / "reports" / "eval"
    for name in ("retain", "target", "unlearned"):
        for f in ("metrics.json", "per_example.jsonl", "report.md", "report.html", "truth_ratio_hist.png"):
            assert (rep / name / f).stat().st_size > 0, (name, f)
    assert list((rep / "retain" / "reference").glob("*.json"))
    points = read_json(rep / "tradeoff.json")
    assert {pt["model"].split(" ")[0] for pt in points} == {"target", "retain", "unlearned"}


def test_model_is_registered_with_its_lineage(repo):
    decision = read_json(repo["dir"] / "reports" / "register" / "decision.json")
    assert decision["passed"] is True, decision
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo['dir'] / 'mlflow.db'}")
    mv = client.get_model_version_by_alias("unlearned-tofu", "champion")
    assert str(mv.version) == str(decision["version"])
    manifest = read_json(repo["dir"] / "data" / "tofu" / "manifest.json")
    assert mv.tags["data.forget_sha256"] == manifest["forget10"]["sha256"]
    assert mv.tags["method"] == "dipo" and mv.tags["git_commit"] not in ("", "unknown")


def test_comparison_page_is_written_and_logged_with_the_run(repo):
    """The register stage's page: every model in one table, linked reports that exist, the charts as SVG files for
    the Markdown twin, and the page among the registration run's MLflow artifacts."""
    import re

    from mlflow import MlflowClient

    out = repo["dir"] / "reports" / "compare"
    md = (out / "comparison.md").read_text()
    for label in ("target", "retain", "unlearned (dipo)"):
        assert f"| {label} | " in md, label
    links = re.findall(r"\[report\.html\]\(([^)]+)\)", md)
    assert links == [f"../eval/{m}/report.html" for m in ("target", "retain", "unlearned")]
    assert all((out / link).is_file() for link in links)
    assert {f.name for f in (out / "comparison_files").iterdir()} == {"tradeoff.svg", "histograms.svg", "loss.svg"}
    decision = read_json(repo["dir"] / "reports" / "register" / "decision.json")
    assert decision["comparison"] == "reports/compare/comparison.html"
    assert f"registered as unlearned-tofu version {decision['version']}" in md
    client = MlflowClient(tracking_uri=f"sqlite:///{repo['dir'] / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(decision["run_id"], "compare")}
    assert {"compare/comparison.html", "compare/comparison.md", "compare/comparison_files"} <= logged


def test_dvc_plots_and_comparison_page_draw_offline(repo):
    """The README's `dvc plots show` and the comparison page, opened in headless Chromium with no network: each
    finds its charts drawn (the offline template inlines Vega; the comparison page is inline SVG)."""
    from browser import charts, drawn, render

    d = repo["dir"]
    sh(["dvc", "plots", "show", "-o", "dvc_plots"], d)
    dom = render(d / "dvc_plots" / "index.html", screenshot=d / "dvc_plots.png")
    got = {c.div for c in drawn(dom)}
    assert {"reports_finetune_target_loss_json", "reports_finetune_retain_loss_json",
            "reports_eval_tradeoff_json"} <= got, charts(dom)
    page = render(d / "reports" / "compare" / "comparison.html", screenshot=d / "comparison.png")
    assert {c.div for c in drawn(page)} == {"chart-tradeoff", "chart-histograms", "chart-loss"}, charts(page)


def test_the_unlearning_loss_plot_draws(repo):
    """The forget loss log's epoch-end rows carry shard_rows/rows_seen; written with the same keys in every row
    (io.plot_rows), DVC accepts it as plot data and the chart draws."""
    from browser import drawn, render

    d = repo["dir"]
    if not (d / "dvc_plots" / "index.html").exists():
        sh(["dvc", "plots", "show", "-o", "dvc_plots"], d)
    assert "reports_forget_loss_json" in {c.div for c in drawn(render(d / "dvc_plots" / "index.html"))}


def test_second_repro_runs_nothing(repo):
    out = sh(["dvc", "repro"], repo["dir"])
    text = out.stdout + out.stderr
    assert "Running stage" not in text, text
    # `dvc.yaml`: the TOFU pipeline; a bare `dvc status` also lists muse/dvc.yaml, which this test never ran
    status = sh(["dvc", "status", "dvc.yaml"], repo["dir"]).stdout
    assert "up to date" in status, status


def test_dvc_push_and_pull_with_the_local_remote(repo):
    d = repo["dir"]
    sh(["dvc", "push"], d)
    assert any((d / "dvc_remote").rglob("*")), "nothing pushed to the local remote"
    shutil.rmtree(d / "models" / "target")
    sh(["dvc", "pull", "finetune_target"], d)
    assert (d / "models" / "target" / "model.safetensors").exists()
    assert "up to date" in sh(["dvc", "status", "dvc.yaml"], d).stdout


def test_unlearning_param_change_reruns_only_downstream_stages(repo):
    """`dvc exp run -S method.name=npo`: a baseline comparison re-runs only forget, evaluate_unlearned, register."""
    out = sh(["dvc", "exp", "run", "-S", "method.name=npo"], repo["dir"])
    text = out.stdout + out.stderr
    ran = {line.split("'")[1] for line in text.splitlines() if line.startswith("Running stage '")}
    assert ran == {"forget", "evaluate_unlearned", "register"}, text
    assert read_json(repo["dir"] / "reports" / "forget" / "summary.json")["method"] == "npo"
    shown = sh(["dvc", "exp", "show", "--json"], repo["dir"]).stdout
    assert "npo" in shown
