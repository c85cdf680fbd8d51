"""Prefect orchestration and deletion requests, end to end, in a fresh copy of the project.

1. the `unlearn` flow runs in-process (no server) on the default data and registers a model;
2. a deletion request goes through `unlearn/requests`: a crash mid-run leaves it pending with the reason,
   the rerun fulfils it with a newly registered version, and `unlearn audit` answers both ways;
3. a local Prefect server on 127.0.0.1 serves the deployments; `prefect deployment run unlearn/tofu` and
   `prefect deployment run unlearn/muse` complete (MUSE to a registered or gate-refused model), then a request
   dropped into the inbox is fulfilled by `prefect deployment run unlearn/requests`.
Slow: models are really trained (once; later runs hit the Prefect cache).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import copy_project, env
from unlearn.io import read_json

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The served MUSE run only has to reach a gate decision (tests/test_muse_e2e.py checks the default's results):
# a smaller corpus and fewer epochs keep it to a fraction of the default's training time.
SMALL_MUSE = {("finetune", "epochs"): 10, ("method", "epochs"): 2,
              **{("muse", "synthetic", k): 4 for k in ("articles_per_fold", "retain_articles", "holdout_articles")}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = copy_project(tmp_path_factory.mktemp("flows"))
    (d / ".prefect").mkdir()
    muse = yaml.safe_load((d / "muse" / "params.yaml").read_text())
    for keys, value in SMALL_MUSE.items():
        node = muse
        for k in keys[:-1]:
            node = node[k]
        assert keys[-1] in node, keys
        node[keys[-1]] = value
    (d / "muse" / "params.yaml").write_text(yaml.safe_dump(muse, sort_keys=False))
    return d


def flow_env(project: Path, **extra: str) -> dict[str, str]:
    e = env()
    e.update(PREFECT_HOME=str(project / ".prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
             PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", PREFECT_LOGGING_LEVEL="WARNING",
             PYTHONPATH=str(project))
    e.pop("PREFECT_API_URL", None)
    e.update(extra)
    return e


def run_flow(project: Path, *args: str, check: bool = True, extra_env: dict | None = None):
    """Run the flow script in its own session; output goes to files, not pipes, and whatever the flow leaves
    behind (e.g. the temporary Prefect server of a killed run) is terminated with its process group."""
    logs = project / ".prefect"
    out_f, err_f = logs / "flow.out", logs / "flow.err"
    with open(out_f, "w") as out, open(err_f, "w") as err:
        proc = subprocess.Popen([sys.executable, "flows/pipelines.py", "run", *args], cwd=project, stdout=out,
                                stderr=err, env=flow_env(project, **(extra_env or {})), start_new_session=True)
        try:
            rc = proc.wait(timeout=1800)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    res = subprocess.CompletedProcess(proc.args, rc, out_f.read_text(), err_f.read_text())
    if check and res.returncode != 0:
        raise AssertionError(f"flow failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def unlearn_cli(project: Path, *args: str, check: bool = True):
    res = subprocess.run(["unlearn", *args], cwd=project, capture_output=True, text=True,
                         env=flow_env(project), timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"unlearn {' '.join(args)} failed:\n{res.stdout}\n{res.stderr[-3000:]}")
    return res


def _ledger(project: Path) -> dict[str, dict]:
    from unlearn.requests import Ledger

    with Ledger(f"sqlite:///{project / 'data' / 'requests' / 'ledger.db'}") as led:
        return {r.request_id: r.to_dict() for r in led.all()}


def test_unlearn_flow_runs_in_process_and_registers(project):
    res = run_flow(project, "--benchmark", "tofu", "--method", "dipo")
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert out["decision"]["passed"] is True, out["decision"]
    assert out["decision"]["version"] is not None
    assert out["metrics"]["retain"]["forget_quality"] == pytest.approx(1.0)
    # a repeated run reuses the trained models through the Prefect cache: they are not written again
    weights = [project / "models" / m / "model.safetensors" for m in ("target", "retain")]
    stamps = [w.stat().st_mtime_ns for w in weights]
    again = run_flow(project, "--benchmark", "tofu", "--method", "dipo")
    assert json.loads(again.stdout[again.stdout.index("{"):])["decision"]["passed"] is True
    assert [w.stat().st_mtime_ns for w in weights] == stamps, "models were retrained instead of cached"


def test_flow_refuses_a_params_file_of_another_benchmark(project):
    res = run_flow(project, "--benchmark", "muse", "--params", "params.yaml", check=False)
    assert res.returncode != 0
    assert "configures benchmark 'tofu', not 'muse'" in res.stdout + res.stderr


def test_request_crash_then_fulfilment_and_audit(project):
    full = read_json(project / "data" / "tofu" / "full.json")
    author = full[0]["author_id"]
    unlearn_cli(project, "request", "add", "req-001", "--author", author)
    # an unknown subject is rejected with the reason
    bad = unlearn_cli(project, "request", "add", "req-bad", "--author", "Nobody Atall", check=False)
    assert "match" in (bad.stdout + bad.stderr).lower()
    # crash between stages: the process is killed (SIGKILL) as the forget stage starts
    crashed = run_flow(project, "--benchmark", "requests", check=False, extra_env={"UNLEARN_FAULT_INJECT": "forget"})
    assert crashed.returncode != 0
    led = _ledger(project)
    assert led["req-001"]["status"] == "in_progress", led["req-001"]  # claimed, never marked fulfilled
    assert led["req-001"]["model_version"] in (None, "")
    assert led["req-bad"]["status"] == "rejected"
    # rerun: the stale claim is recovered and the request fulfilled by a newly registered version
    res = run_flow(project, "--benchmark", "requests")
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert out["status"] == "fulfilled", out
    led = _ledger(project)
    assert led["req-001"]["status"] == "fulfilled"
    version = led["req-001"]["model_version"]
    assert version == str(out["decision"]["version"])
    # audit both ways
    a = unlearn_cli(project, "audit", "req-001").stdout
    assert f"{version}" in a and "prob" in a.lower()
    m = unlearn_cli(project, "audit", "--model", version).stdout
    assert "req-001" in m and "commit" in m.lower()


def test_served_deployments_run_and_fulfil_an_inbox_request(project):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    e = flow_env(project, PREFECT_API_URL=api, PREFECT_RUNNER_POLL_FREQUENCY="2")
    logs = project / ".prefect"
    server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=project,
                              env=e, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    served = None
    try:
        for _ in range(120):
            try:
                import urllib.request

                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except Exception:  # noqa: BLE001
                time.sleep(1)
        else:
            pytest.fail("Prefect server did not start:\n" + (logs / "server.log").read_text()[-3000:])
        served = subprocess.Popen([sys.executable, "flows/pipelines.py", "serve"], cwd=project, env=e,
                                  stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)

        def deployment_run(name: str) -> subprocess.CompletedProcess:
            for _ in range(60):  # wait until the deployment is registered by the serve process
                r = subprocess.run(["prefect", "deployment", "inspect", name], cwd=project, env=e,
                                   capture_output=True, text=True)
                if r.returncode == 0:
                    break
                time.sleep(2)
            return subprocess.run(["prefect", "deployment", "run", name, "--watch"], cwd=project, env=e,
                                  capture_output=True, text=True, timeout=1500)

        r = deployment_run("unlearn/tofu")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + (logs / "serve.log").read_text()[-5000:]
        # MUSE: the same flow on muse/params.yaml, to a registered (or gate-refused, with the reason) model
        r = deployment_run("unlearn/muse")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + (logs / "serve.log").read_text()[-5000:]
        decision = read_json(project / "muse" / "reports" / "register" / "decision.json")
        assert decision["passed"] is True or decision["reasons"], decision
        if decision["passed"]:
            assert decision["registered_model"] == "unlearned-muse" and decision["version"] is not None
        for role in ("target", "retain", "unlearned"):
            assert (project / "muse" / "models" / role / "model.safetensors").exists()
        inbox = project / "data" / "requests" / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        full = read_json(project / "data" / "tofu" / "full.json")
        (inbox / "batch-1.jsonl").write_text(json.dumps(
            {"request_id": "req-inbox-1", "subject_type": "rows", "subject": [full[-1]["id"], full[-2]["id"]]}) + "\n")
        r = deployment_run("unlearn/requests")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + (logs / "serve.log").read_text()[-5000:]
        led = _ledger(project)
        assert led["req-inbox-1"]["status"] == "fulfilled", led["req-inbox-1"]
        assert (inbox / "processed" / "batch-1.jsonl").exists()
        before = {v for v in (led.get("req-001") or {}).get("model_version", "") or ""}
        assert led["req-inbox-1"]["model_version"] not in (None, ""), led
        assert before is not None
    finally:
        for proc in (served, server):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
