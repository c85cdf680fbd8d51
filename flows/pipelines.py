"""Prefect orchestration: the ``unlearn`` flow and its deployments.

A thin face, like the CLI and ``dvc.yaml``: each task calls one library function
(:mod:`unlearn.stages`, :mod:`unlearn.requests.cycle`), so no stage logic lives here.
The request cycle (its order and its ledger transitions) is
:func:`unlearn.requests.cycle.honour_requests`, the very function ``unlearn request run``
calls; this file only makes each of its steps a task. Training tasks are cached by
Prefect on :func:`unlearn.stages.stage_key` (parameters + content hashes of the data
and models they read, declared once in :func:`unlearn.stages.stage_io`), so a repeated
run reuses the trained models and caches.

Run in-process (no server needed; Prefect starts a temporary one)::

    python flows/pipelines.py run --benchmark tofu --method dipo
    python flows/pipelines.py run --benchmark muse            # on muse/params.yaml
    python flows/pipelines.py run --benchmark requests

Serve the deployments ``unlearn/tofu``, ``unlearn/muse`` and ``unlearn/requests``::

    python flows/pipelines.py serve      # then: prefect deployment run unlearn/tofu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from prefect import flow, get_run_logger, task  # noqa: E402

from unlearn import stages  # noqa: E402
from unlearn.config import Params, load_params  # noqa: E402
from unlearn.io import read_json  # noqa: E402
from unlearn.requests import cycle  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- cached stage tasks
_STAGE_OF: dict[Callable[..., Any], str] = {}
"""Task function -> the library stage it runs, recorded where the task is defined (see :func:`stage_task`)."""


def stage_cache_key(stage: str) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect ``cache_key_fn`` for a task over library ``stage``: :func:`unlearn.stages.stage_key` of its call.

    The task's parameters are ``params_path``, ``overrides`` and the stage function's own
    keyword arguments, passed on by name.
    """

    def key(context: Any, parameters: dict[str, Any]) -> str:
        kwargs = {k: v for k, v in parameters.items() if k not in ("params_path", "overrides")}
        return stages.stage_key(stage, load_params(parameters["params_path"], parameters.get("overrides")), **kwargs)

    return key


def stage_task(stage: str, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``@task`` for a library stage whose result is cached on :func:`stage_cache_key`; :func:`run_cached` calls it."""

    def wrap(fn: Callable[..., Any]) -> Any:
        _STAGE_OF[fn] = stage
        return task(cache_key_fn=stage_cache_key(stage), persist_result=True, **options)(fn)

    return wrap


def run_cached(task_fn: Any, params_path: str, overrides: Sequence[str] | None, **kwargs: Any) -> Any:
    """Call a cached stage task (keyword arguments only); if its outputs are gone (deleted by hand), refresh its
    cache entry instead of returning a stale result, so the stage really runs and the entry then points at
    real outputs. The outputs are the library's declaration (:func:`unlearn.stages.stage_io`)."""
    overrides = list(overrides or [])
    outs = stages.stage_io(_STAGE_OF[task_fn.fn], load_params(params_path, overrides), **kwargs).outputs
    fresh = all(Path(o).exists() for o in outs)
    return (task_fn if fresh else task_fn.with_options(refresh_cache=True))(
        params_path=params_path, overrides=overrides, **kwargs)


# --------------------------------------------------------------------------- tasks (thin wrappers)
def _p(params_path: str, overrides: Sequence[str] | None) -> Params:
    return load_params(params_path, list(overrides or []))


@task(name="prepare", retries=1)
def prepare_task(params_path: str, overrides: list[str] | None) -> dict:
    out = stages.prepare(_p(params_path, overrides))
    return read_json(out / "manifest.json")


@stage_task("tokenizer", name="tokenizer")
def tokenizer_task(params_path: str, overrides: list[str] | None) -> str | None:
    """Train the BPE tokenizer (before validate, which counts the rows it cuts); nothing with model.path."""
    p = _p(params_path, overrides)
    if p.model.path:
        return None
    return str(stages.tokenizer(p))


@task(name="validate")
def validate_task(params_path: str, overrides: list[str] | None) -> dict:
    # No retry: a failing suite is a data problem, not a transient one.
    return stages.validate(_p(params_path, overrides))


@stage_task("finetune", name="finetune", retries=1)
def finetune_task(params_path: str, overrides: list[str] | None, role: str, out_dir: str | None = None) -> dict:
    # A retry resumes from the training checkpoint instead of starting over.
    return stages.finetune(_p(params_path, overrides), role, out_dir)


@stage_task("cache", name="cache", retries=1)
def cache_task(params_path: str, overrides: list[str] | None, target_dir: str | None = None) -> list[str]:
    c = stages.cache(_p(params_path, overrides), target_dir)
    return [str(x) for x in c.paths]


@task(name="forget", retries=1)
def forget_task(params_path: str, overrides: list[str] | None, out_dir: str | None = None,
                target_dir: str | None = None) -> dict:
    cycle.fault_point("forget")
    return stages.forget(_p(params_path, overrides), out_dir, target_dir)


@task(name="evaluate", retries=1)
def evaluate_task(params_path: str, overrides: list[str] | None, model_path: str, name: str,
              retain_dir: str | None = None, target_dir: str | None = None) -> dict:
    return stages.evaluate(_p(params_path, overrides), model_path, name, retain_dir, target_dir).metrics


@task(name="register", retries=2, retry_delay_seconds=5)
def register_task(params_path: str, overrides: list[str] | None, request_ids: list[str] | None = None,
                  model_path: str | None = None, request_gate: dict[str, Any] | None = None) -> dict:
    return stages.register(_p(params_path, overrides), model_path=model_path, request_ids=request_ids,
                           request_gate=request_gate)


@task(name="requests-intake")
def intake_task(params_path: str, overrides: list[str] | None) -> list[str]:
    """Inbox -> ledger; in-progress requests left by a crashed run go back to pending. Returns pending ids."""
    return cycle.intake(_p(params_path, overrides))


@task(name="request-base-model")
def base_model_task(params_path: str, overrides: list[str] | None) -> dict:
    """requests.mode sequential: the registered version that honours every fulfilled request (else the target)."""
    return cycle.base_model(_p(params_path, overrides))


@task(name="request-splits")
def request_splits_task(params_path: str, overrides: list[str] | None, plan: dict | None = None) -> dict:
    """Forget set = union of every accepted request (sequential with a base: the new ones only); write its
    TOFU-format splits and version them with DVC."""
    return dict(cycle.request_splits(_p(params_path, overrides), plan))


# --------------------------------------------------------------------------- flows
@task(name="sequence", retries=1)
def sequence_task(params_path: str, overrides: list[str] | None, kind: str) -> list[dict]:
    return stages.sequence(_p(params_path, overrides), kind)


def benchmark_pipeline(params_path: str, overrides: list[str], sequences: bool = False) -> dict:
    """prepare -> tokenizer -> validate -> finetune target, retain -> reference cache -> forget -> evaluate -> register.

    The order of dvc.yaml (and muse/dvc.yaml): the tokenizer comes before the gate, which counts the rows it
    cuts. The same for every benchmark: the params file says which. ``sequences`` (MUSE): also run the
    sustainability and scalability sequences after the evaluations.
    """
    log = get_run_logger()
    p = _p(params_path, overrides)
    prepare_task(params_path=params_path, overrides=overrides)
    run_cached(tokenizer_task, params_path, overrides)
    validate_task(params_path=params_path, overrides=overrides)
    target = run_cached(finetune_task, params_path, overrides, role="target")
    retain = run_cached(finetune_task, params_path, overrides, role="retain")
    log.info("target forget prob %.3f, retain model forget prob %.3f", target["forget_prob"], retain["forget_prob"])
    run_cached(cache_task, params_path, overrides)
    forget_task(params_path=params_path, overrides=overrides)
    metrics = {}
    for name in ("retain", "target", "unlearned"):
        metrics[name] = evaluate_task(params_path=params_path, overrides=overrides,
                                  model_path=str(stages.model_dir(p, name)), name=name)
    curves = {kind: sequence_task(params_path=params_path, overrides=overrides, kind=kind)
              for kind in (stages.SEQUENCES if sequences else ())}
    decision = register_task(params_path=params_path, overrides=overrides)
    log.info("gate: %s", json.dumps(decision, default=str))
    return {"metrics": metrics, "decision": decision, **({"sequences": curves} if curves else {})}


def requests_pipeline(params_path: str, overrides: list[str]) -> dict:
    """Pending deletion requests -> forget set -> unlearn -> evaluate -> gate -> register -> ledger updated.

    :func:`unlearn.requests.cycle.honour_requests` with each step a Prefect task
    (:class:`PrefectCycle`); its docstring says how no request is lost and none is
    marked fulfilled unless a registered model honours it.
    """
    return cycle.honour_requests(PrefectCycle(params_path, overrides))


class PrefectCycle(cycle.CycleSteps):
    """The request cycle's steps as Prefect tasks: the base pipeline (prepare, tokenizer, validate, target) is
    built and cached here rather than expected from ``dvc repro``, and training reuses the Prefect cache."""

    detail = "unlearn/requests flow run"

    def before_intake(self) -> None:
        prepare_task(params_path=self.params_path, overrides=self.overrides)
        run_cached(tokenizer_task, self.params_path, self.overrides)
        validate_task(params_path=self.params_path, overrides=self.overrides)

    def target(self) -> str:
        run_cached(finetune_task, self.params_path, self.overrides, role="target")
        return super().target()

    def intake(self) -> list[str]:
        return intake_task(params_path=self.params_path, overrides=self.overrides)

    def base_model(self) -> dict[str, Any]:
        return base_model_task(params_path=self.params_path, overrides=self.overrides)

    def request_splits(self, plan: dict[str, Any] | None = None) -> cycle.RequestSplitsInfo:
        return request_splits_task(params_path=self.params_path, overrides=self.overrides, plan=plan)

    def finetune(self, extra: Sequence[str], *, role: str, out_dir: str) -> dict[str, Any]:
        return run_cached(finetune_task, self.params_path, [*self.overrides, *extra], role=role, out_dir=out_dir)

    def cache(self, extra: Sequence[str], *, target_dir: str) -> None:
        run_cached(cache_task, self.params_path, [*self.overrides, *extra], target_dir=target_dir)

    def forget(self, extra: Sequence[str], *, out_dir: str, target_dir: str) -> dict[str, Any]:
        return forget_task(params_path=self.params_path, overrides=[*self.overrides, *extra], out_dir=out_dir,
                           target_dir=target_dir)

    def evaluate(self, extra: Sequence[str], *, model_path: str, name: str, retain_dir: str,
                 target_dir: str) -> dict[str, Any]:
        return evaluate_task(params_path=self.params_path, overrides=[*self.overrides, *extra], model_path=model_path,
                         name=name, retain_dir=retain_dir, target_dir=target_dir)

    def register(self, extra: Sequence[str], *, model_path: str, request_ids: list[str],
                 request_gate: dict[str, Any] | None = None) -> dict[str, Any]:
        return register_task(params_path=self.params_path, overrides=[*self.overrides, *extra],
                             request_ids=request_ids, model_path=model_path, request_gate=request_gate)


PARAMS_FILES = {"tofu": "params.yaml", "muse": "muse/params.yaml", "requests": "params.yaml"}
"""Each benchmark's parameters file (relative to the working directory, the project root)."""


@flow(name="unlearn", log_prints=True)
def unlearn(
    benchmark: str = "tofu",
    split: str | None = None,
    method: str | None = None,
    overrides: list[str] | None = None,
    params_path: str | None = None,
    sequences: bool = False,
) -> dict:
    """Unlearn ``split`` with ``method`` on ``benchmark`` (tofu | muse | requests) and register the model if it
    passes the gate. ``split``/``method`` default to the params file's (``params.yaml``; MUSE:
    ``muse/params.yaml``); ``overrides`` are ``key=value`` strings applied on top of it. ``sequences``
    (MUSE): also run the sustainability and scalability sequences."""
    if benchmark not in PARAMS_FILES:
        raise ValueError(f"unknown benchmark {benchmark!r}: expected {', '.join(PARAMS_FILES)}")
    params_path = params_path or PARAMS_FILES[benchmark]
    params_path = str(Path(params_path) if Path(params_path).is_absolute() else Path.cwd() / params_path)
    if load_params(params_path).benchmark != ("tofu" if benchmark == "requests" else benchmark):
        raise ValueError(f"{params_path} configures benchmark {load_params(params_path).benchmark!r}, not {benchmark!r}")
    if benchmark == "requests":
        return requests_pipeline(params_path, list(overrides or []))
    ov = [*([f"data.forget_split={split}"] if split else []), *([f"method.name={method}"] if method else []),
          *(overrides or [])]
    return benchmark_pipeline(params_path, ov, sequences=sequences and benchmark == "muse")


def deployments():
    """The three deployments, served together by :func:`serve_all`."""
    p = load_params(PROJECT / "params.yaml")
    cron = p.requests.schedule_cron
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
    run.add_argument("--split", default=None, help="forget split (default: the params file's)")
    run.add_argument("--method", default=None, help="unlearning method (default: the params file's)")
    run.add_argument("--params", default=None, help="params file (default: params.yaml; MUSE: muse/params.yaml)")
    run.add_argument("--sequences", action="store_true", help="MUSE: also run the sustainability/scalability sequences")
    run.add_argument("--set", dest="overrides", action="append", default=[], help="key=value override (repeatable)")
    sub.add_parser("serve", help="serve the deployments unlearn/tofu, unlearn/muse, unlearn/requests")
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        serve_all()
        return 0
    out = unlearn(benchmark=a.benchmark, split=a.split, method=a.method, overrides=a.overrides, params_path=a.params,
                  sequences=a.sequences)
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
