"""Prefect orchestration: the ``unlearn`` flow and its deployments.

The tasks are thin wrappers over :mod:`unlearn.stages`, the same functions
``dvc repro`` runs, so no stage logic lives here. Expensive tasks are cached by
Prefect on a hash of their inputs (parameters + content hashes of the data and
models they read), so a repeated run reuses the trained models and caches.

Run in-process (no server needed; Prefect starts a temporary one)::

    python flows/unlearn.py run --benchmark tofu --method dipo
    python flows/unlearn.py run --benchmark requests

Serve the deployments ``unlearn/tofu``, ``unlearn/muse`` and ``unlearn/requests``::

    python flows/unlearn.py serve      # then: prefect deployment run unlearn/tofu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# This file is named like the library package; run as a script, its folder comes first on sys.path
# and `import unlearn` would find this file instead of the package. Drop that entry.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if getattr(sys.modules.get("unlearn"), "__file__", None) == os.path.abspath(__file__):
    del sys.modules["unlearn"]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from prefect import flow, get_run_logger, task  # noqa: E402

from unlearn import stages  # noqa: E402
from unlearn.config import Params, load_params  # noqa: E402
from unlearn.io import read_json, stable_hash  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- cache keys
def _fingerprint(path: Path) -> str:
    """Content identity of a stage input: a model's weights hash, a data dir's manifest, a file's sha256."""
    from unlearn.cache import model_hash
    from unlearn.io import sha256_file

    if path.is_dir() and (path / "manifest.json").exists():
        return stable_hash(read_json(path / "manifest.json"))
    if path.is_dir() and (list(path.glob("*.safetensors")) or list(path.glob("*.bin"))):
        return model_hash(path)  # weights and config.json
    if path.is_file():
        return sha256_file(path)
    return "missing"


def stage_cache_key(context, parameters: dict[str, Any]) -> str | None:
    """Prefect cache key: stage name + its parameters + content hashes of its inputs (and its output paths)."""
    p = load_params(parameters["params_path"], parameters.get("overrides"))
    stage = context.task.name
    ins, outs, cfg = _io(stage, p, parameters)
    return f"{stage}-" + stable_hash({"cfg": cfg, "inputs": {str(i): _fingerprint(Path(i)) for i in ins},
                                      "outputs": [str(o) for o in outs]})[:32]


def run_cached(task_fn, *args: Any) -> Any:
    """Call a cached task; if its outputs are gone (deleted by hand), refresh its cache entry instead of
    returning a stale result, so the stage really runs and the entry then points at real outputs."""
    params = dict(zip(("params_path", "overrides"), args[:2]))
    extra = {"role": args[2]} if task_fn.name == "finetune" else {}
    if task_fn.name == "finetune" and len(args) > 3:
        extra["out_dir"] = args[3]
    if task_fn.name == "reference-cache" and len(args) > 2:
        extra["target_dir"] = args[2]
    _, outs, _ = _io(task_fn.name, load_params(params["params_path"], params["overrides"]), {**params, **extra})
    fresh = all(Path(o).exists() for o in outs)
    return (task_fn if fresh else task_fn.with_options(refresh_cache=True))(*args)


def _io(stage: str, p: Params, parameters: dict[str, Any]) -> tuple[list[Path], list[Path], Any]:
    """(inputs, outputs, relevant parameters) of a stage: what its cache key covers."""
    data = Path(p.data.out_dir)
    role = parameters.get("role")
    # The trained tokenizer (none with model.path: the checkpoint's own comes with it), as in dvc.yaml.
    tok = [] if p.model.path else [stages.tokenizer_dir(p) / "tokenizer.json"]
    if stage == "tokenizer":
        return [data], [stages.tokenizer_dir(p)] if tok else [], [p.model.path, p.model.tokenizer.model_dump()]
    if stage == "finetune":
        out = Path(parameters.get("out_dir") or stages.model_dir(p, role))
        cfg = [role, p.seed, p.model.model_dump(), p.finetune.model_dump(), p.data.forget_split]
        return [data, *tok], [out], cfg
    if stage == "reference-cache":
        target = Path(parameters.get("target_dir") or stages.model_dir(p, "target"))
        return [data, target], [Path(p.cache.dir)], [p.seed, p.model.max_length, p.data.forget_split, p.cache.model_dump()]
    raise KeyError(stage)


# --------------------------------------------------------------------------- tasks (thin wrappers)
def _p(params_path: str, overrides: list[str] | None) -> Params:
    return load_params(params_path, overrides)


@task(name="prepare", retries=1)
def prepare_task(params_path: str, overrides: list[str] | None) -> dict:
    p = _p(params_path, overrides)
    out = stages.prepare(p)
    return read_json(out / "manifest.json")


@task(name="tokenizer", cache_key_fn=stage_cache_key, persist_result=True)
def tokenizer_task(params_path: str, overrides: list[str] | None) -> str | None:
    """Train the BPE tokenizer (before validate, which counts the rows it cuts); nothing with model.path."""
    p = _p(params_path, overrides)
    if p.model.path:
        return None
    return str(stages.build_tokenizer(p))


@task(name="validate")
def validate_task(params_path: str, overrides: list[str] | None) -> dict:
    # No retry: a failing suite is a data problem, not a transient one.
    return stages.validate(_p(params_path, overrides))


@task(name="finetune", retries=1, cache_key_fn=stage_cache_key, persist_result=True)
def finetune_task(params_path: str, overrides: list[str] | None, role: str, out_dir: str | None = None) -> dict:
    # A retry resumes from the training checkpoint instead of starting over.
    return stages.finetune(_p(params_path, overrides), role, out_dir)


@task(name="reference-cache", retries=1, cache_key_fn=stage_cache_key, persist_result=True)
def cache_task(params_path: str, overrides: list[str] | None, target_dir: str | None = None) -> list[str]:
    c = stages.build_cache(_p(params_path, overrides), target_dir)
    return [str(x) for x in c.paths]


def _fault_point(stage: str) -> None:
    """Crash-safety testing: ``UNLEARN_FAULT_INJECT=<stage>`` kills the process (SIGKILL) as that stage starts."""
    if os.environ.get("UNLEARN_FAULT_INJECT") == stage:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@task(name="forget", retries=1)
def forget_task(params_path: str, overrides: list[str] | None, out_dir: str | None = None,
                target_dir: str | None = None) -> dict:
    _fault_point("forget")
    return stages.forget(_p(params_path, overrides), out_dir, target_dir)


@task(name="evaluate", retries=1)
def eval_task(params_path: str, overrides: list[str] | None, model: str, name: str, retain_dir: str | None = None,
              target_dir: str | None = None) -> dict:
    res = stages.evaluate(_p(params_path, overrides), model, name, retain_dir, target_dir)
    return res.metrics


@task(name="register", retries=2, retry_delay_seconds=5)
def register_task(params_path: str, overrides: list[str] | None, request_ids: list[str] | None = None,
                  model_path: str | None = None) -> dict:
    return stages.register(_p(params_path, overrides), model_path=model_path, request_ids=request_ids)


# --------------------------------------------------------------------------- flows
def tofu_pipeline(params_path: str, overrides: list[str], request_ids: list[str] | None = None) -> dict:
    """prepare -> tokenizer -> validate -> finetune target, retain -> reference cache -> forget -> evaluate -> register.

    The order of dvc.yaml: the tokenizer comes before the gate, which counts the rows it cuts.
    """
    log = get_run_logger()
    p = _p(params_path, overrides)
    prepare_task(params_path, overrides)
    run_cached(tokenizer_task, params_path, overrides)
    validate_task(params_path, overrides)
    target = run_cached(finetune_task, params_path, overrides, "target")
    retain = run_cached(finetune_task, params_path, overrides, "retain")
    log.info("target forget prob %.3f, retain model forget prob %.3f", target["forget_prob"], retain["forget_prob"])
    run_cached(cache_task, params_path, overrides)
    forget_task(params_path, overrides)
    metrics = {}
    for name in ("retain", "target", "unlearned"):
        metrics[name] = eval_task(params_path, overrides, str(stages.model_dir(p, name)), name)
    decision = register_task(params_path, overrides, request_ids)
    log.info("gate: %s", json.dumps(decision, default=str))
    return {"metrics": metrics, "decision": decision}


# --------------------------------------------------------------------------- deletion requests
@task(name="requests-intake")
def intake_task(params_path: str, overrides: list[str]) -> list[str]:
    """Inbox -> ledger; in-progress requests left by a crashed run go back to pending. Returns pending ids."""
    from unlearn.requests import Ledger, ingest_inbox, requests_settings

    p = _p(params_path, overrides)
    cfg = requests_settings(p)
    full = stages.read_splits(p, ["full"])["full"]
    with Ledger(cfg.url) as ledger:
        ledger.recover_stale()
        ingest_inbox(ledger, cfg.inbox, full, strict=False)
        return [r.request_id for r in ledger.pending()]


@task(name="request-splits")
def request_splits_task(params_path: str, overrides: list[str], request_ids: list[str]) -> dict:
    """Forget set = union of every accepted request; write its TOFU-format splits and version them with DVC."""
    from unlearn.requests import Ledger, build_request_splits, forget_rows_for, forget_set_hash, requests_settings
    from unlearn.requests.forget_set import write_request_splits

    p = _p(params_path, overrides)
    names = ["full", "real_authors", "world_facts", "retain_perturbed"]
    splits = stages.read_splits(p, names)
    perturbed = [r for n in ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed")
                 for r in stages.read_splits(p, [n])[n]]
    with Ledger(requests_settings(p).url) as ledger:
        # Claimed (in progress) + already fulfilled: a later model keeps honouring earlier requests, and a
        # request arriving mid-run is not silently included without being claimed.
        accepted = ledger.by_status("in_progress", "fulfilled")
    rows = forget_rows_for(accepted, splits["full"])
    fhash = forget_set_hash(rows)
    out = Path("data/requests/splits") / fhash[:12]
    built = build_request_splits(splits["full"], rows, real_authors=splits["real_authors"],
                                 world_facts=splits["world_facts"], retain_perturbed=splits["retain_perturbed"],
                                 perturbed_rows=perturbed)
    write_request_splits(built, out, request_ids=[r.request_id for r in accepted], forget_set_hash=fhash)
    _dvc_add(out)
    return {"dir": str(out), "forget_set_hash": fhash, "rows": len(rows),
            "honoured": sorted(r.request_id for r in accepted)}


def _dvc_add(path: Path) -> None:
    """Version the request splits with DVC (``dvc add``), when the project is a DVC repo."""
    import subprocess

    log = get_run_logger()
    if not Path(".dvc").is_dir():
        log.warning("not a DVC repository: %s is not versioned", path)
        return
    res = subprocess.run([sys.executable, "-m", "dvc", "add", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"dvc add {path} failed: {res.stderr.strip()[-2000:]}")


def requests_pipeline(params_path: str, overrides: list[str]) -> dict:
    """Pending deletion requests -> forget set -> unlearn -> evaluate -> gate -> register -> ledger updated.

    The requests are marked in progress first; on any failure they go back to
    pending with the reason (and a crash that kills the process is recovered by
    the next run's intake), so no request is lost and none is marked fulfilled
    unless a registered model honours it.
    """
    from unlearn.requests import Ledger, requests_settings

    log = get_run_logger()
    base = _p(params_path, overrides)
    prepare_task(params_path, overrides)
    run_cached(tokenizer_task, params_path, overrides)
    validate_task(params_path, overrides)
    pending = intake_task(params_path, overrides)
    if not pending:
        log.info("no pending deletion requests")
        return {"status": "idle", "pending": []}
    url = requests_settings(base).url
    with Ledger(url) as ledger:
        ledger.mark_in_progress(pending, detail="unlearn/requests flow run")
    try:
        run_cached(finetune_task, params_path, overrides, "target")
        info = request_splits_task(params_path, overrides, pending)
        h = info["forget_set_hash"][:12]
        root = Path("models") / "requests" / h
        ov = [*overrides, f"data.out_dir={info['dir']}", "data.forget_split=forget_requests",
              f"reports_dir=reports/requests/{h}"]
        target = str(stages.model_dir(base, "target"))
        retain = str(root / "retain")
        unlearned = str(root / "unlearned")
        run_cached(finetune_task, params_path, ov, "retain", retain)  # gold standard for this forget set
        run_cached(cache_task, params_path, ov, target)
        forget_task(params_path, ov, unlearned, target)
        metrics = {}
        for name, model in (("retain", retain), ("target", target), ("unlearned", unlearned)):
            metrics[name] = eval_task(params_path, ov, model, name, retain, target)
        decision = register_task(params_path, ov, info["honoured"], unlearned)
    except BaseException as e:
        with Ledger(url) as ledger:
            ledger.mark_failed(pending, f"{type(e).__name__}: {e}"[:2000])
        raise
    with Ledger(url) as ledger:
        if decision.get("passed") and decision.get("version") is not None:
            ledger.mark_fulfilled(pending, model_name=decision.get("registered_model"),
                                  model_version=str(decision["version"]), forget_set_hash=info["forget_set_hash"])
            status = "fulfilled"
        else:
            reasons = "; ".join(decision.get("reasons") or ["not registered"])
            ledger.mark_failed(pending, f"gate failed: {reasons}")
            status = "gate_failed"
    log.info("requests %s: %s (model version %s)", ", ".join(pending), status, decision.get("version"))
    return {"status": status, "requests": pending, "decision": decision, "metrics": metrics, "forget_set": info}


@flow(name="unlearn", log_prints=True)
def unlearn(
    benchmark: str = "tofu",
    split: str = "forget10",
    method: str = "dipo",
    overrides: list[str] | None = None,
    params_path: str = "params.yaml",
) -> dict:
    """Unlearn ``split`` with ``method`` on ``benchmark`` (tofu | muse | requests) and register the model if it
    passes the gate. ``overrides`` are ``key=value`` strings applied on top of ``params.yaml``."""
    params_path = str(Path(params_path) if Path(params_path).is_absolute() else Path.cwd() / params_path)
    if benchmark == "muse":
        raise NotImplementedError(
            "benchmark 'muse' is not available yet: MUSE support is a later issue; use benchmark='tofu'"
        )
    if benchmark == "requests":
        return requests_pipeline(params_path, list(overrides or []))
    if benchmark != "tofu":
        raise ValueError(f"unknown benchmark {benchmark!r}: expected tofu, muse or requests")
    ov = [f"data.forget_split={split}", f"method.name={method}", *(overrides or [])]
    return tofu_pipeline(params_path, ov)


def deployments():
    """The three deployments, served together by :func:`serve_all`."""
    p = load_params(PROJECT / "params.yaml")
    cron = (p.extra.get("requests") or {}).get("schedule_cron", "*/30 * * * *")
    return [
        unlearn.to_deployment(name="tofu", parameters={"benchmark": "tofu"}),
        unlearn.to_deployment(name="muse", parameters={"benchmark": "muse"}),
        unlearn.to_deployment(name="requests", parameters={"benchmark": "requests"}, cron=cron),
    ]


def serve_all() -> None:
    from prefect import serve

    serve(*deployments())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the unlearn flow in-process")
    run.add_argument("--benchmark", default="tofu", choices=["tofu", "muse", "requests"])
    run.add_argument("--split", default="forget10")
    run.add_argument("--method", default="dipo")
    run.add_argument("--params", default="params.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], help="key=value override (repeatable)")
    sub.add_parser("serve", help="serve the deployments unlearn/tofu, unlearn/muse, unlearn/requests")
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        serve_all()
        return 0
    out = unlearn(benchmark=a.benchmark, split=a.split, method=a.method, overrides=a.overrides, params_path=a.params)
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT))
    sys.exit(main())
