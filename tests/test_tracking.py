"""Tracking and gated registration against a real local MLflow store (SQLite + artifact dir in tmp).

One store for the whole module (creating a SQLite store runs migrations, ~7 s); each
test uses its own registered-model name, so aliases never leak between tests.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

mlflow = pytest.importorskip("mlflow")

from unlearn import stages, tracking  # noqa: E402
from unlearn.config import Params  # noqa: E402
from unlearn.io import read_json, write_json  # noqa: E402

TARGET = {"forget_quality": 1e-6, "model_utility": 0.60}
LOSS_LOG = [
    {"step": s, "epoch": 0, "lr": 1e-4, "loss": 3.0 - 0.5 * s, "forget_loss": 2.0 - 0.4 * s, "retain_loss": 1.0 - 0.1 * s}
    for s in (1, 2, 3)
]
HASHES_A = {"forget_sha256": "a" * 64, "retain_sha256": "b" * 64}
HASHES_B = {"forget_sha256": "c" * 64, "retain_sha256": "d" * 64}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    cfg = {"uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": str(root / "mlartifacts")}
    client = tracking.client_for(tracking.TrackingCfg(cfg["uri"], "x", "x", cfg["artifact_location"]))
    yield cfg, client
    if old is not None:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    (d / "config.json").write_text('{"model_type": "llama"}\n')
    (d / "model.safetensors").write_bytes(b"not really weights")
    return d


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    (d / "report.html").write_text("<html>report</html>\n")
    (d / "report.md").write_text("# report\n")
    write_json(d / "notes.json", {"forget_rouge": "no generations (eval.generation_examples = 0)"})
    return d


def make_params(store_cfg, registered_model: str, **extra) -> Params:
    tr = {**store_cfg, "experiment": "tests", "registered_model": registered_model}
    return Params(tracking=tr, **extra)


def submit(p, model_dir, report_dir, fq, mu, hashes=HASHES_A, request_ids=("req-1",)):
    run = tracking.UnlearningRun(
        model_dir=model_dir, metrics={"forget_quality": fq, "model_utility": mu, "forget_rouge": None},
        target_metrics=TARGET, loss_log=LOSS_LOG, report_dir=report_dir, data_hashes=hashes, git_commit="abc123",
        request_ids=list(request_ids),
    )
    return tracking.register_if_passing(p, run)


# --------------------------------------------------------------------------- configuration (no store)
# The gate itself (unlearn.gate) is tested in tests/test_gate.py.
GATE = {"min_forget_quality": 0.05, "min_utility_ratio": 0.9, "max_abs_privleak": 25.0}


def test_gate_config_defaults_and_overrides():
    assert tracking.gate_config(Params()) == GATE
    assert tracking.gate_config(Params(gate={"min_forget_quality": 0.1}))["min_forget_quality"] == 0.1


def test_tracking_config_defaults_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tracking.tracking_config(Params(), tmp_path)
    assert cfg.uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.artifact_location == str(tmp_path / "mlartifacts")
    assert (cfg.experiment, cfg.registered_model) == ("dipo-unlearn", "unlearned-tofu")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking.tracking_config(Params(tracking={"uri": "sqlite:///x.db"}), tmp_path).uri == \
        "sqlite:///elsewhere.db"


def test_git_commit(tmp_path):
    assert tracking.git_commit(tmp_path) == "unknown"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    (tmp_path / "f").write_text("1")
    for cmd in (["git", "init", "-q"], ["git", "add", "f"], ["git", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=env)
    clean = tracking.git_commit(tmp_path)
    assert len(clean) == 40 and "+" not in clean
    (tmp_path / "f").write_text("2")
    assert tracking.git_commit(tmp_path) == clean + "+dirty"


# --------------------------------------------------------------------------- against the store
def test_failing_model_is_logged_not_registered(store, model_dir, report_dir):
    cfg, client = store
    p = make_params(cfg, "rm-fail")
    reg = submit(p, model_dir, report_dir, fq=0.001, mu=0.59)
    assert not reg.passed and reg.version is None and reg.alias is None
    tags = client.get_run(reg.run_id).data.tags
    assert tags["gate"] == "failed" and "forget_quality" in tags["gate_reasons"]
    assert client.search_model_versions("name='rm-fail'") == []


def test_champion_challenger(store, model_dir, report_dir):
    cfg, client = store
    p = make_params(cfg, "rm-cc")
    h_a = tracking.alias_names(HASHES_A["forget_sha256"])[0]
    h_b = tracking.alias_names(HASHES_B["forget_sha256"])[0]

    def alias(a):
        return str(client.get_model_version_by_alias("rm-cc", a).version)

    r1 = submit(p, model_dir, report_dir, fq=0.3, mu=0.57)
    assert (r1.passed, r1.alias, r1.version) == (True, "champion", "1")
    assert alias("champion") == alias(h_a) == "1"

    r2 = submit(p, model_dir, report_dir, fq=0.4, mu=0.56)  # better forget quality, worse utility: not as good
    assert r2.alias == "challenger" and alias("challenger") == "2" and alias("champion") == "1"

    r3 = submit(p, model_dir, report_dir, fq=0.3, mu=0.58)  # tie on forget quality, better utility: takes over
    assert r3.alias == "champion" and r3.displaced_version == "1"
    assert alias("champion") == alias(h_a) == "3"
    assert "champion" not in client.get_model_version("rm-cc", "1").aliases

    r4 = submit(p, model_dir, report_dir, fq=0.9, mu=0.60, hashes=HASHES_B)  # another forget set
    assert r4.alias == "champion" and alias(h_b) == "4"
    assert alias("champion") == alias(h_a) == "3"  # the first forget set's champion stands

    v = client.get_model_version("rm-cc", "3")
    for key in ("forget_set_hash", "forget_split", "retain_split", "data.forget_sha256", "data.retain_sha256",
                "git_commit", "method", "params_hash", "request_ids", "run_id", "forget_quality", "model_utility"):
        assert key in v.tags, key
    assert v.tags["forget_set_hash"] == HASHES_A["forget_sha256"] and v.tags["run_id"] == r3.run_id
    assert float(v.tags["model_utility"]) == 0.58
    # the registered version resolves to the logged model directory
    mlflow.set_tracking_uri(cfg["uri"])
    got = Path(mlflow.artifacts.download_artifacts("models:/rm-cc@champion"))
    assert (got / "config.json").read_text() == (model_dir / "config.json").read_text()


def stage_project(p, model_dir, report_dir, tmp_path) -> Path:
    """What the register stage reads, under tmp_path: manifest, dvc.lock, evaluations, the run's loss log."""
    p.data.out_dir = str(tmp_path / "data" / "tofu")
    p.model.out_dir = str(tmp_path / "models")
    p.reports_dir = str(tmp_path / "reports")
    manifest = {p.data.forget_split: {"rows": 1, "authors": 1, "sha256": "f" * 64},
                p.data.retain_split: {"rows": 1, "authors": 1, "sha256": "e" * 64}}
    write_json(Path(p.data.out_dir) / "manifest.json", manifest)
    (tmp_path / "dvc.lock").write_text(
        f"schema: '2.0'\nstages:\n  prepare:\n    cmd: unlearn prepare\n    outs:\n"
        f"    - path: {p.data.out_dir}\n      hash: md5\n      md5: 0123abcd.dir\n")
    rdir = Path(p.reports_dir)
    ev = rdir / "eval" / "unlearned"
    ev.mkdir(parents=True)
    for f in report_dir.iterdir():
        (ev / f.name).write_bytes(f.read_bytes())
    write_json(ev / "metrics.json", {"forget_quality": 0.5, "model_utility": 0.58, "forget_prob": 0.01,
                                     "forget_rouge": None})
    write_json(rdir / "eval" / "target" / "metrics.json", TARGET)
    # The loss log lives with the run that wrote the model (an --out run: <model>.reports/).
    write_json(stages.run_reports_dir(p, model_dir, stages.model_dir(p, "unlearned"), "forget") / "loss.json", LOSS_LOG)
    return rdir


def test_register_stage_run_contents(store, model_dir, report_dir, tmp_path, monkeypatch):
    """The stage end to end: reads reports/ + manifest + dvc.lock, logs everything, writes decision.json."""
    cfg, client = store
    monkeypatch.chdir(tmp_path)
    p = make_params(cfg, "rm-stage")
    rdir = stage_project(p, model_dir, report_dir, tmp_path)

    d = stages.register(p, model_path=model_dir, request_ids=["req-7", "req-9"])
    assert d == read_json(rdir / "register" / "decision.json")
    assert d["passed"] and d["alias"] == "champion" and d["version"] == "1"

    run = client.get_run(d["run_id"])
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["method.name"] == "dipo" and params["data.forget_split"] == "forget10"
    assert params["tracking.registered_model"] == "rm-stage"
    assert metrics["forget_quality"] == 0.5 and metrics["forget_prob"] == 0.01
    assert metrics["target.model_utility"] == 0.60 and metrics["utility_ratio"] == pytest.approx(0.58 / 0.60)
    assert "forget_rouge" not in metrics
    assert tags["metric_skipped.forget_rouge"].startswith("no generations")
    hist = client.get_metric_history(d["run_id"], "train/loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert len(client.get_metric_history(d["run_id"], "train/forget_loss")) == 3
    assert tags["gate"] == "passed" and tags["registered_version"] == "1"
    assert tags["git_commit"] and tags["request_ids"] == "req-7,req-9"
    assert tags["data.forget_sha256"] == "f" * 64 and tags["data.retain_sha256"] == "e" * 64
    assert tags["data.dvc_md5"] == "0123abcd.dir"
    assert tags["forget_set_hash"] == "f" * 64 and tags["model_weights_sha256"]
    arts = {a.path for a in client.list_artifacts(d["run_id"], "eval")}
    assert {"eval/report.html", "eval/report.md", "eval/metrics.json"} <= arts
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(d["run_id"], "model")}
    # artifacts went to the configured artifact location, not ./mlruns
    assert not (tmp_path / "mlruns").exists()
    assert run.info.artifact_uri.startswith(("file://" + cfg["artifact_location"], cfg["artifact_location"]))


def test_registered_version_carries_what_the_audit_reads(store, model_dir, report_dir, tmp_path, monkeypatch):
    """One pass: the version is created with the forget-set row count, every parameter (params.*) and the
    per-request evidence; `unlearn audit --model` shows them; the audit page is rendered from the same tags."""
    from unlearn.requests import Ledger, requests_settings

    cfg, client = store
    monkeypatch.chdir(tmp_path)
    p = make_params(cfg, "rm-audit")
    rdir = stage_project(p, model_dir, report_dir, tmp_path)
    full = [{"id": "row-1", "author_id": "a1", "question": "Who is A?", "answer": "A is a writer."}]
    write_json(Path(p.data.out_dir) / f"{p.data.forget_split}.json", full)  # the request's row, in the forget split
    for name, prob in (("target", 0.9), ("unlearned", 0.1)):
        (rdir / "eval" / name).mkdir(parents=True, exist_ok=True)
        (rdir / "eval" / name / "per_example.jsonl").write_text(
            json.dumps({"id": "row-1", "split": f"{p.data.forget_split}_perturbed", "prob": prob}) + "\n")
    with Ledger(requests_settings(p).url) as led:
        led.add("req-a", "rows", ["row-1"], known_rows=full)
    monkeypatch.setattr(stages, "read_splits", lambda p, names: {names[0]: full})

    d = stages.register(p, model_path=model_dir, request_ids=["req-a"])
    assert d["passed"] and d["request_evidence"] == {"req-a": {"prob_before": 0.9, "prob_after": 0.1}}
    tags = client.get_model_version("rm-audit", d["version"]).tags
    assert tags["forget_rows"] == "1" and tags["params.method.name"] == "dipo" and tags["role"] == "champion"
    assert tags["params.tracking.registered_model"] == "rm-audit"
    assert float(tags["request.req-a.prob_after"]) == 0.1 and tags["request_ids"] == "req-a"
    text = stages.audit(p, model_version=d["version"])
    assert "(1 rows)" in text and "n/a rows" not in text
    assert "method.name=dipo" in text and "req-a" in text
    # ...and the command that rebuilds it: its commit, then the pipeline with every parameter it ran with.
    repro = next(line for line in text.splitlines() if line.strip().startswith("reproduce:"))
    assert f"git checkout {tags['git_commit'].removesuffix('+dirty')} && dvc exp run " in repro
    assert "+dirty &&" not in repro  # `git checkout <sha>+dirty` would fail

    assert "-S method.name=dipo" in repro and "-S tracking.registered_model=rm-audit" in repro
    assert "-S data.forget_split=forget10" in repro
    page = Path(mlflow.artifacts.download_artifacts(run_id=d["run_id"], artifact_path="audit/audit.html",
                                                    tracking_uri=cfg["uri"])).read_text()
    assert "rm-audit v1" in page and "req-a" in page and "row-1" in page and "0.1000" in page


def test_reproduce_command_of_a_dirty_run_checks_out_the_sha_and_says_so():
    from unlearn.requests.audit import reproduce_command

    clean = reproduce_command({"git_commit": "abc123", "params": {"seed": 0}})
    dirty = reproduce_command({"git_commit": "abc123+dirty", "params": {"seed": 0}})
    assert clean == "git checkout abc123 && dvc exp run -S seed=0"
    assert dirty.startswith("git checkout abc123 && dvc exp run -S seed=0") and "uncommitted changes" in dirty
