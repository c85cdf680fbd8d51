"""The request cycle as a library function and `unlearn request run` (no Prefect), on the tiny trained project.

A request is claimed, a failure mid-run puts it back to pending with the reason
(never fulfilled), the rerun fulfils it with a registered version, and the
version's audit shows the forget set's row count and parameters.
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
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


class FailingForget(CycleSteps):
    def forget(self, extra, *, out_dir, target_dir):
        raise RuntimeError("disk full while unlearning")


def test_request_run_fails_safely_then_fulfils(project):
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
    paths = RequestPaths(r.forget_set_hash)
    assert (paths.splits_dir / "manifest.json").is_file()
    assert (paths.retain_dir / "config.json").is_file() and (paths.unlearned_dir / "config.json").is_file()
    decision = read_json(paths.reports_dir / "register" / "decision.json")
    assert decision["version"] == "1" and set(decision["request_evidence"]) == {"req-1"}
    assert not (project / "reports" / "register").exists()  # the pipeline's own reports are untouched

    p = load_params("params.yaml")
    text = stages.audit(p, model_version="1")
    n_rows = sum(row["author_id"] == author for row in full)
    assert f"({n_rows} rows)" in text and "method.name=dipo" in text and "req-1" in text
    assert "no pending deletion requests" in runner.invoke(request_app, ["run"]).output
