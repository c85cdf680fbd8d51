"""The request cycle as a library function and `unlearn request run` (no Prefect), on the tiny trained project.

A request is claimed, a failure mid-run puts it back to pending with the reason
(never fulfilled), the rerun fulfils it with a registered version, and the
version's audit shows the forget set's row count and parameters. A later request
that version already honours is told so and settled by it without unlearning.
"""

from __future__ import annotations

import shutil

import pytest
import yaml
from typer.testing import CliRunner

from unlearn.config import load_params
from unlearn.io import read_json
from unlearn.requests import Ledger
from unlearn.requests.cycle import CycleSteps, RequestPaths, honour_requests

pytestmark = pytest.mark.slow


@pytest.fixture
def project(tiny_project, tmp_path, monkeypatch):
    """A copy of the tiny project (data, tokenizer, target model) with its own ledger and MLflow store."""
    for rel in ("data/tofu", "models/tokenizer", "models/target"):
        shutil.copytree(tiny_project / rel, tmp_path / rel)
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params.update(tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "cycle",
                            "registered_model": "cycle-model", "artifact_location": str(tmp_path / "mlartifacts")},
                  gate={"min_forget_quality": 0.0, "min_utility_ratio": 0.0})  # the tiny model: always register
    params["requests"] = {"gate": {"min_ks_pvalue": 0.0, "max_mia_auc_gap": 0.5, "max_prob_gap": 1.0,
                                   "max_rouge_gap": 1.0}}  # oracle none (the default), as permissive
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


class Trained(RuntimeError):
    """A stage that trains, evaluates or registers was called."""


class FailingForget(CycleSteps):
    def forget(self, extra, *, out_dir, target_dir):
        raise RuntimeError("disk full while unlearning")


def test_request_run_fails_safely_then_fulfils(project, monkeypatch):
    from unlearn import stages
    from unlearn.requests.cli import request_app

    runner = CliRunner()
    full = read_json(project / "data" / "tofu" / "full.json")
    author = full[len(full) // 2]["author_id"]
    assert runner.invoke(request_app, ["add", "req-1", "--author", author]).exit_code == 0

    with pytest.raises(RuntimeError, match="disk full"):
        honour_requests(FailingForget())
    with Ledger("sqlite:///data/requests/ledger.db") as led:
        r = led.get("req-1")
        assert r.status == "pending" and "RuntimeError: disk full while unlearning" in r.reason
        assert r.model_version is None
        assert [(e["from_status"], e["to_status"]) for e in led.events("req-1")] == [
            (None, "pending"), ("pending", "in_progress"), ("in_progress", "pending")]
        assert "unlearn request run" in led.events("req-1")[1]["detail"]

    res = runner.invoke(request_app, ["run"])
    assert res.exit_code == 0, res.output
    with Ledger("sqlite:///data/requests/ledger.db") as led:
        r = led.get("req-1")
    assert r.status == "fulfilled" and r.model_name == "cycle-model" and r.model_version == "1"
    assert "fulfilled: req-1 by cycle-model v1" in res.output
    assert "serving: cycle-model@serving = v1 (honours every fulfilled request)" in res.output
    paths = RequestPaths(r.forget_set_hash)
    assert (paths.splits_dir / "manifest.json").is_file()
    # requests.oracle: none (the default): no retain model was trained for the request, anywhere
    assert (paths.unlearned_dir / "config.json").is_file() and not paths.retain_dir.exists()
    assert not [d for d in (project / "models").rglob("*") if d.is_dir() and d.name == "retain"]
    assert not (project / "models" / "retain").exists()
    decision = read_json(paths.reports_dir / "register" / "decision.json")
    assert decision["version"] == "1" and set(decision["request_evidence"]) == {"req-1"}
    assert decision["oracle"] == "none" and decision["metrics"]["request_ks_pvalue"] is not None
    ev = read_json(paths.reports_dir / "eval" / "unlearned" / "request_evidence.json")
    assert ev["holdout_split"] == "holdout10" and ev["per_request"]["req-1"]["holdout_rows"] == 24
    for key in ("ks_pvalue", "mia_auc_loss", "mia_auc_min_k_plus_plus", "privleak", "prob_gap", "rouge_gap"):
        assert ev["per_request"]["req-1"][key] is not None, key
    assert not (project / "reports" / "register").exists()  # the pipeline's own reports are untouched

    p = load_params("params.yaml")
    text = stages.audit(p, model_version="1")
    n_rows = sum(row["author_id"] == author for row in full)
    assert f"({n_rows} rows)" in text and "method.name=dipo" in text and "req-1" in text
    assert "no pending deletion requests" in runner.invoke(request_app, ["run"]).output

    # `unlearn audit --model champion`: the forget set's size, the params and the command that rebuilds it
    text = stages.audit(p, model_version="champion")
    assert text.startswith("model cycle-model v1 [") and "champion" in text.splitlines()[0]
    assert f"{r.forget_set_hash} ({n_rows} rows)" in text and "params:        " in text and "method.name=dipo" in text
    repro = next(line for line in text.splitlines() if line.strip().startswith("reproduce:"))
    assert "git checkout " in repro and "dvc exp run " in repro and "-S method.name=dipo" in repro

    # A new request for the same author: v1 already honours it. `request add` says so, with v1's evidence, and
    # `request run` settles it as fulfilled by v1 without training, evaluating or registering anything.
    def refuse(name):
        def stage(*a, **k):
            raise Trained(f"request run called stages.{name}")
        return stage

    for name in ("finetune", "cache", "forget", "evaluate", "register"):
        monkeypatch.setattr(stages, name, refuse(name))
    res = runner.invoke(request_app, ["add", "req-2", "--author", author])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "already honoured" in x)
    assert f"already honoured by cycle-model v1 [champion, champion-{r.forget_set_hash[:8]}, serving]: all {n_rows} row(s)" in line
    ev = decision["request_evidence"]["req-1"]  # the same rows: the same evidence registration recorded for req-1
    assert f"answer prob before={ev['prob_before']:.4f} after={ev['prob_after']:.4f}" in line
    res = runner.invoke(request_app, ["run"])
    assert res.exit_code == 0, res.output
    assert "already honoured: req-2 fulfilled by cycle-model v1" in res.output and "nothing unlearned" in res.output
    with Ledger("sqlite:///data/requests/ledger.db") as led:
        r2 = led.get("req-2")
        assert (r2.status, r2.model_version, r2.forget_set_hash) == ("fulfilled", "1", r.forget_set_hash)
        assert [(e["from_status"], e["to_status"]) for e in led.events("req-2")] == [
            (None, "pending"), ("pending", "pending"), ("pending", "in_progress"), ("in_progress", "fulfilled")]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}", registry_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions("name='cycle-model'")] == ["1"]  # no new version
    # the registry agrees: v1 lists req-2, and the audit finds it without a warning, both ways
    text = stages.audit(p, request_id="req-2")
    assert "honoured:      yes" in text and "cycle-model v1" in text and "from registry+ledger" in text
    assert "warning" not in text
    text = stages.audit(p, model_version="champion")
    assert "req-2: author" in text and "fulfilled by v1" in text and "warning" not in text

    # rows of this author and of another one: partly honoured, stays pending, and the run unlearns it (here it stops
    # at the retain model's training)
    other = next(row["id"] for row in full if row["author_id"] != author)
    mine = next(row["id"] for row in full if row["author_id"] == author)
    res = runner.invoke(request_app, ["add", "req-3", "--rows", f"{mine},{other}"])
    assert f"partly honoured: cycle-model v1 [champion, champion-{r.forget_set_hash[:8]}, serving] holds 1 of 2 row(s)" in res.output
    assert f"not: {other}" in res.output
    res = runner.invoke(request_app, ["run"])
    assert res.exit_code != 0 and isinstance(res.exception, Trained) and "stages.cache" in str(res.exception)
    with Ledger("sqlite:///data/requests/ledger.db") as led:
        assert led.get("req-3").status == "pending" and led.get("req-3").model_version is None

    # A certificate for req-1: the request, its rows' hash, the version and weights hash, evidence, chain head
    from unlearn.cli import app

    cert_file = project / "certs" / "req-1.json"
    res = runner.invoke(app, ["audit", "req-1", "--certificate", str(cert_file)])
    assert res.exit_code == 0, res.output
    cert = read_json(cert_file)
    req_rows = [row for row in full if row["author_id"] == author]
    from unlearn.requests import forget_set_hash

    assert cert["request"]["rows_sha256"] == forget_set_hash(req_rows) and cert["request"]["rows"] == n_rows
    assert (cert["model"]["name"], cert["model"]["version"], cert["oracle"]) == ("cycle-model", "1", "none")
    assert cert["model"]["weights_sha256"] and cert["ledger"]["chain_head_at_registration"]
    assert {"ks_pvalue", "mia_auc_loss", "prob", "holdout_prob"} <= set(cert["evidence"])
    assert cert["thresholds"]["requests.gate.min_ks_pvalue"] == 0.0 and cert_file.with_suffix(".html").is_file()
    assert f"certificates/req-1.json" in [a.path for a in client.list_artifacts(decision["run_id"], "certificates")]

    # `unlearn audit --verify`: passes on the untouched store; names an edited ledger row, a swapped weight file,
    # a deleted event
    import sqlite3

    res = runner.invoke(app, ["audit", "--verify"])
    assert res.exit_code == 0 and "verify: OK" in res.output, res.output
    assert "cycle-model v1: 1 weight file(s) match" in res.output and "its ledger chain head" in res.output

    def sql(stmt):
        con = sqlite3.connect(project / "data" / "requests" / "ledger.db")
        con.execute(stmt)
        con.commit()
        con.close()

    sql("UPDATE deletion_requests SET model_version = '7' WHERE request_id = 'req-1'")
    res = runner.invoke(app, ["audit", "--verify"])
    assert res.exit_code == 1 and "FAIL edited row: request req-1" in res.output, res.output
    sql("UPDATE deletion_requests SET model_version = '1' WHERE request_id = 'req-1'")
    assert runner.invoke(app, ["audit", "--verify"]).exit_code == 0

    weights = next((project / "mlartifacts").rglob("model/*.safetensors"))
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    res = runner.invoke(app, ["audit", "--verify"])
    assert res.exit_code == 1 and f"FAIL swapped weight file: cycle-model v1" in res.output
    assert f"{weights.name} has sha256" in res.output, res.output
    weights.write_bytes(original)

    sql("DELETE FROM request_events WHERE event_id = 3")
    res = runner.invoke(app, ["audit", "--verify"])
    assert res.exit_code == 1 and "FAIL deleted event: the chain breaks after event 2" in res.output, res.output


class Spy(CycleSteps):
    """The in-process steps, recording the model each unlearning starts from."""

    started: list[tuple[str, str]] = []

    def cache(self, extra, *, target_dir):
        self.started.append(("cache", target_dir))
        super().cache(extra, target_dir=target_dir)

    def forget(self, extra, *, out_dir, target_dir):
        self.started.append(("forget", target_dir))
        return super().forget(extra, out_dir=out_dir, target_dir=target_dir)


class RelearnsRequest1(Spy):
    """The unlearned model's evidence, with request 1 replaced by a relearned one's and the new request by a
    forgotten one's: a model that forgets request 3 but relearns request 1."""

    def request_evidence(self, *, model_path, request_ids, earlier):
        ev = super().request_evidence(model_path=model_path, request_ids=request_ids, earlier=earlier)
        for rid, e in ev["per_request"].items():
            e.update(ks_pvalue=1e-9, mia_auc_loss=0.01, mia_auc_min_k_plus_plus=0.02, prob_gap=0.7, rouge_gap=0.8)
            if rid != "req-1":
                e.update(ks_pvalue=0.7, mia_auc_loss=0.5, mia_auc_min_k_plus_plus=0.5, prob_gap=0.0, rouge_gap=0.0)
        return ev


def test_sequential_mode_starts_from_the_champion_and_refuses_a_model_that_relearns_an_earlier_request(project):
    from mlflow import MlflowClient

    from unlearn import tracking
    from unlearn.models.build import weights_hash

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["requests"]["mode"] = "sequential"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    full = read_json(project / "data" / "tofu" / "full.json")
    authors = list(dict.fromkeys(r["author_id"] for r in full))
    a1, a2, a3 = authors[3], authors[4], authors[5]
    url = "sqlite:///data/requests/ledger.db"
    p = load_params("params.yaml")
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}", registry_uri=f"sqlite:///{project / 'mlflow.db'}")

    def add(rid, author):
        with Ledger(url) as led:
            assert led.add(rid, "author", author, known_rows=full).status == "added"

    # request 1: nothing fulfilled yet, so it is unlearned from the target
    add("req-1", a1)
    Spy.started = []
    out = honour_requests(Spy())
    assert out["status"] == "fulfilled" and out["base"] is None and out["started_from"] == "models/target"
    assert Spy.started == [("cache", "models/target"), ("forget", "models/target")]
    assert out["serving"]["version"] == "1" and str(client.get_model_version_by_alias("cycle-model", "serving").version) == "1"
    v1 = tracking.model_version_info(p, "1")
    v1_dir = tracking.version_model_dir(p, v1)

    # request 2: unlearned alone, from v1 (the champion that honours request 1): its registered model files
    add("req-2", a2)
    Spy.started = []
    out = honour_requests(Spy())
    assert out["status"] == "fulfilled" and out["decision"]["version"] == "2", out["decision"]
    assert out["started_from"] == str(v1_dir) and out["base"]["version"] == "1"
    assert Spy.started == [("cache", str(v1_dir)), ("forget", str(v1_dir))]
    assert weights_hash(v1_dir) == v1["tags"]["model_weights_sha256"] == out["base"]["weights_sha256"]
    info = out["forget_set"]
    assert info["mode"] == "sequential" and info["rows"] == sum(r["author_id"] == a2 for r in full)
    assert info["honoured"] == ["req-1", "req-2"] and info["earlier"] == ["req-1"]
    paths = RequestPaths(info["forget_set_hash"], info["base_weights_sha256"])
    retain = read_json(paths.splits_dir / "retain_requests.json")
    assert not {a1, a2} & {r["author_id"] for r in retain}  # no earlier author comes back through the retain loss
    # both requests' evidence is recorded on v2, with where it started from
    tags = client.get_model_version("cycle-model", "2").tags
    assert tags["request_ids"] == "req-1,req-2" and tags["request_mode"] == "sequential"
    # `serving` moved to v2, the one version that honours both (champion stays where the quality rule put it)
    assert out["serving"]["version"] == "2" and str(client.get_model_version_by_alias("cycle-model", "serving").version) == "2"
    assert (tags["request_base_version"], tags["request_earlier"]) == ("1", "req-1")
    assert tags["request_base_weights_sha256"] == v1["tags"]["model_weights_sha256"]
    for rid in ("req-1", "req-2"):
        for key in ("ks_pvalue", "mia_auc_loss", "mia_auc_min_k_plus_plus", "prob", "holdout_prob"):
            assert f"request.{rid}.{key}" in tags, (rid, key)
    with Ledger(url) as led:
        assert [(led.get(r).status, led.get(r).model_version) for r in ("req-1", "req-2")] == [
            ("fulfilled", "1"), ("fulfilled", "2")]
    report = stages_verify(p)
    assert "cycle-model v2: 1 weight file(s) match" in report and "verify: OK" in report, report
    from unlearn import stages

    text = stages.audit(p, model_version="2")
    assert "unlearned from: cycle-model v1 (requests.mode sequential" in text and "warning" not in text, text

    # request 3, from v2: a model that forgets it but relearns request 1 is refused, and request 1 is named
    add("req-3", a3)
    Spy.started = []
    out = RelearnsRequest1(overrides=["requests.gate.min_ks_pvalue=0.05", "requests.gate.max_mia_auc_gap=0.2",
                                      "requests.gate.max_prob_gap=0.1", "requests.gate.max_rouge_gap=0.2"])
    out = honour_requests(out)
    v2_dir = tracking.version_model_dir(p, tracking.model_version_info(p, "2"))
    assert out["status"] == "gate_failed" and out["started_from"] == str(v2_dir)
    assert out["forget_set"]["earlier"] == ["req-1", "req-2"]
    reasons = out["decision"]["reasons"]
    assert len(reasons) == 1 and reasons[0].startswith("regresses on earlier request req-1: ks_pvalue 1e-09"), reasons
    with Ledger(url) as led:
        r3 = led.get("req-3")
        assert r3.status == "pending" and "regresses on earlier request req-1" in r3.reason
        assert led.get("req-1").model_version == "1" and led.get("req-2").model_version == "2"
    assert sorted(str(v.version) for v in client.search_model_versions("name='cycle-model'")) == ["1", "2"]


def stages_verify(p) -> str:
    from unlearn import stages

    return stages.verify_audit_trail(p).render()
