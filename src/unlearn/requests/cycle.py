"""The request cycle: honour every pending deletion request, end to end, as library functions.

::

    intake (inbox -> ledger, stale claims recovered) -> claim (in_progress)
      -> already honoured? (a registered version's forget set holds every row: fulfilled by it, nothing trained)
      -> target model -> base model (``requests.mode: sequential``: the champion that honours the earlier ones)
      -> request splits (+ ``dvc add``) -> retain model for that forget set (``oracle: retain``) -> reference cache
      -> forget (from the base, or the target) -> evaluate (retain), target, unlearned -> holdout evidence of
      every request it claims (``oracle: none``) -> register -> ledger: fulfilled, or back to pending

``requests.mode``: ``union`` unlearns every accepted request from the target; ``sequential`` only the new ones,
from the base (:mod:`unlearn.requests.sequential`, which also says what the reference of such a step is).

:func:`honour_requests` is that sequence, and the ledger transitions around it, written
once. ``unlearn request run`` runs it in-process with :class:`CycleSteps`; the Prefect
deployment ``unlearn/requests`` (``flows/pipelines.py``) runs the same function with a
subclass whose steps are Prefect tasks (cached, retried). Neither face holds stage logic.

Where one forget set's files go is :class:`RequestPaths`, the one place those paths are spelled.

Crash safety: the requests are claimed (``in_progress``) before any stage runs. An
exception puts them back to ``pending`` with the reason (and is re-raised); a process
that is killed leaves them ``in_progress``, and the next run's intake recovers them.
Only a registered version that passed the gate ever marks a request ``fulfilled``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from ..config import Params, load_params
from ..data.names import FORGET_REQUESTS
from .audit import TAG_REQUEST_IDS, parse_request_ids
from .ledger import Ledger, requests_settings

log = logging.getLogger("unlearn.requests")

SPLITS_ROOT = Path("data/requests/splits")
MODELS_ROOT = Path("models/requests")
REPORTS_ROOT = Path("reports/requests")
FAULT_ENV = "UNLEARN_FAULT_INJECT"
"""Crash-safety testing: ``UNLEARN_FAULT_INJECT=<stage>`` kills the process (SIGKILL) as that stage starts."""


@dataclass(frozen=True)
class RequestPaths:
    """Where everything of one forget set goes: splits, models and reports, keyed by its hash.

    Relative to the project root (the working directory), like every path in
    ``params.yaml``. The key is the first 12 hex digits of the forget-set hash: a
    new forget set (a new request) gets new directories, a rerun on the same set
    reuses them.
    """

    forget_set_hash: str
    base: str | None = None
    """``requests.mode: sequential``: the weights hash of the model the step starts from (its splits' retain side
    and its model depend on it too); None: from the target (union)."""

    @property
    def key(self) -> str:
        """``<hash12>``, or ``<hash12>-on-<base12>`` for a sequential step."""
        return self.forget_set_hash[:12] + (f"-on-{self.base[:12]}" if self.base else "")

    @property
    def splits_dir(self) -> Path:
        """The TOFU-format request splits (``data.out_dir`` of the request stages), versioned with ``dvc add``."""
        return SPLITS_ROOT / self.key

    @property
    def retain_dir(self) -> Path:
        """The gold-standard retain model of this forget set: trained without any of its authors."""
        return MODELS_ROOT / self.key / "retain"

    @property
    def unlearned_dir(self) -> Path:
        return MODELS_ROOT / self.key / "unlearned"

    @property
    def reports_dir(self) -> Path:
        """``reports_dir`` of the request stages: their evaluations and decision never touch the pipeline's."""
        return REPORTS_ROOT / self.key

    def overrides(self) -> list[str]:
        """The ``params.yaml`` overrides that point every stage at this forget set's splits and reports."""
        return [f"data.out_dir={self.splits_dir}", f"data.forget_split={FORGET_REQUESTS}",
                f"reports_dir={self.reports_dir}"]


class RequestSplitsInfo(TypedDict):
    """What :func:`request_splits` built (JSON-ready: it is also a Prefect task result)."""

    dir: str
    forget_set_hash: str
    rows: int
    honoured: list[str]
    """Every request the unlearned model will claim to honour (its ``request_ids``)."""
    earlier: list[str]
    """Those already fulfilled (an earlier version honours them): a failure of theirs is a regression."""
    mode: str
    """``union`` or ``sequential`` (this step: a sequential run with no base yet runs as union)."""
    base_weights_sha256: str | None


# --------------------------------------------------------------------------- the request stages
def intake(p: Params) -> list[str]:
    """Inbox -> ledger; in-progress requests left by a crashed run go back to pending. Returns the pending ids.

    A malformed inbox file is left in place and logged (``strict=False``): one bad
    file must not block every later run.
    """
    from .. import stages
    from .inbox import ingest_inbox

    cfg = requests_settings(p)
    full = stages.read_splits(p, ["full"])["full"]
    with Ledger(cfg.url) as ledger:
        ledger.recover_stale()
        res = ingest_inbox(ledger, cfg.inbox, full, strict=False)
        for e in res.errors:
            log.warning("inbox: %s (file left in place)", e)
        return [r.request_id for r in ledger.pending()]


def request_splits(p: Params, plan: dict[str, Any] | None = None) -> RequestSplitsInfo:
    """Forget set = union of every claimed and fulfilled request; write its TOFU-format splits under
    :attr:`RequestPaths.splits_dir` and version them with DVC (when the project is a DVC repository).

    Claimed (in progress) + already fulfilled: a later model keeps honouring earlier
    requests, and a request arriving mid-run is not silently included without being claimed.

    ``plan`` (:class:`~unlearn.requests.sequential.BasePlan` as a dict) with a base (``requests.mode:
    sequential``): the forget set is the claimed requests' rows only (minus rows the base already honours), the
    retain split also leaves out every earlier request's authors, and the model still claims every fulfilled
    request (``honoured``), each re-checked (``earlier``).
    """
    from .. import stages
    from .forget_set import build_request_splits, forget_rows_for, forget_set_hash, write_request_splits
    from .sequential import BasePlan, sequential_forget_rows

    names = ["full", "real_authors", "world_facts", "retain_perturbed"]
    splits = stages.read_splits(p, names)
    perturbed = [r for n in ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed")
                 for r in stages.read_splits(p, [n])[n]]
    with Ledger(requests_settings(p).url) as ledger:
        accepted = ledger.by_status("in_progress", "fulfilled")
    claimed = [r for r in accepted if r.status == "in_progress"]
    earlier = sorted(r.request_id for r in accepted if r.status == "fulfilled")
    base = BasePlan.from_dict(plan).base
    if base is None:  # union: every accepted request, from the target
        rows, unlearned_for, exclude, base_sha = forget_rows_for(accepted, splits["full"]), accepted, None, None
    else:  # sequential: the new requests only, from the base; the earlier ones stay out of the retain split
        rows = sequential_forget_rows(forget_rows_for(claimed, splits["full"]),
                                      forget_rows_for([r for r in accepted if r.status == "fulfilled"], splits["full"]))
        unlearned_for, exclude, base_sha = claimed, forget_rows_for(accepted, splits["full"]), base["weights_sha256"]
    fhash = forget_set_hash(rows)
    out = RequestPaths(fhash, base_sha).splits_dir
    built = build_request_splits(splits["full"], rows, real_authors=splits["real_authors"],
                                 world_facts=splits["world_facts"], retain_perturbed=splits["retain_perturbed"],
                                 perturbed_rows=perturbed, exclude_rows=exclude)
    write_request_splits(built, out, request_ids=[r.request_id for r in unlearned_for], forget_set_hash=fhash)
    dvc_add(out)
    return {"dir": str(out), "forget_set_hash": fhash, "rows": len(rows),
            "honoured": sorted(r.request_id for r in accepted), "earlier": earlier,
            "mode": "union" if base is None else "sequential", "base_weights_sha256": base_sha}


def dvc_add(path: Path) -> None:
    """Version ``path`` with DVC (``dvc add``), when the working directory is a DVC repository (else a warning)."""
    if not Path(".dvc").is_dir():
        log.warning("not a DVC repository: %s is not versioned", path)
        return
    res = subprocess.run([sys.executable, "-m", "dvc", "add", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"dvc add {path} failed: {res.stderr.strip()[-2000:]}")


def already_honoured(p: Params, requests: Sequence[Any], full: Sequence[dict] | None = None) -> dict[str, Any]:
    """``{request_id: Coverage}``: each request against every registered version (:mod:`unlearn.requests.coverage`),
    read from the registry (:func:`unlearn.tracking.registered_versions`) and matched against the ``full`` split
    (``full``: its rows, when the caller has read them already).

    A version registered before its forget set was recorded row by row (no ``forget_row_evidence.*`` tags) is
    checked against its forget split on disk (``params.data.out_dir`` / ``params.data.forget_split`` tags) when
    that file still hashes to its ``forget_set_hash``; otherwise it is listed as unchecked, never as honouring.
    """
    from .. import stages, tracking
    from ..data.splits import read_split
    from .coverage import EVIDENCE_TAG, coverage

    if not requests:
        return {}
    versions = tracking.registered_versions(p)
    for v in versions:
        tags = v["tags"]
        if any(k.startswith(EVIDENCE_TAG + ".") for k in tags):
            continue
        out_dir, split = tags.get("params.data.out_dir"), tags.get("params.data.forget_split")
        if out_dir and split and (Path(out_dir) / f"{split}.json").is_file():
            try:
                v["forget_row_ids"] = [r["id"] for r in read_split(out_dir, split)]
            except Exception as e:  # noqa: BLE001 - unreadable: the version stays unchecked
                log.warning("%s v%s: cannot read its forget split %s/%s: %s", v.get("name"), v.get("version"), out_dir,
                            split, e)
    full = stages.read_splits(p, ["full"])["full"] if full is None else full
    return {r.request_id: coverage(r, full, versions) for r in requests}


def base_model(p: Params) -> dict[str, Any]:
    """:meth:`CycleSteps.base_model` (the plan of the step, JSON-ready: also a Prefect task result)."""
    from .. import stages, tracking
    from ..io import stable_hash
    from .forget_set import forget_rows_for
    from .sequential import BasePlan, pick_base
    from .verify import TAG_WEIGHTS, weight_files, weights_problem

    cfg = requests_settings(p)
    if cfg.mode != "sequential":
        return BasePlan("union", why="requests.mode: union: every accepted request, from the target").to_dict()
    with Ledger(cfg.url) as ledger:
        fulfilled = ledger.by_status("fulfilled")
    full = stages.read_splits(p, ["full"])["full"] if fulfilled else []
    rows_of = {r.request_id: {row["id"] for row in forget_rows_for([r], full)} for r in fulfilled}
    versions = tracking.registered_versions(p) if fulfilled else []
    v, why = pick_base(versions, rows_of)
    if v is None:
        log.info("requests.mode sequential: %s", why)
        return BasePlan("sequential", why=why).to_dict()
    model_dir = tracking.version_model_dir(p, v)
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        why = (f"the model files of {v.get('name')} v{v.get('version')} are gone ({model_dir}): unlearning the union "
               "of every accepted request from the target instead")
        log.warning("requests.mode sequential: %s", why)
        return BasePlan("sequential", why=why).to_dict()
    problem = weights_problem(v, model_dir)
    if problem:
        raise RuntimeError(f"requests.mode sequential: will not start from a model whose weights changed since it was "
                           f"registered: {problem} (`unlearn audit --verify` shows it)")
    weights = v["tags"].get(TAG_WEIGHTS) or stable_hash(weight_files(model_dir))
    base = {"name": v.get("name"), "version": str(v.get("version")), "aliases": list(v.get("aliases") or []),
            "request_ids": parse_request_ids(v["tags"].get(TAG_REQUEST_IDS)), "model_dir": str(model_dir),
            "weights_sha256": weights}
    log.info("requests.mode sequential: %s", why)
    return BasePlan("sequential", base=base, why=why, earlier=sorted(rows_of)).to_dict()


def publish_serving(p: Params) -> dict[str, Any]:
    """Move the ``serving`` alias to the registered version that honours every fulfilled request, or remove it.

    The version is the one a sequential step would start from (:func:`~unlearn.requests.sequential.pick_base`:
    its ``request_ids`` cover every row of every fulfilled request; per-forget-set champions first, then the
    newest). ``champion`` alone is not enough: it follows the default forget set's quality ranking and stays on
    a model that honours only the first requests. No such version: the alias is removed (serving a model that
    ignores a fulfilled request would break the promise the ledger records). Returns
    ``{"version", "name", "why"}`` (``version`` None when removed).
    """
    from .. import stages, tracking
    from .forget_set import forget_rows_for
    from .sequential import pick_base

    with Ledger(requests_settings(p).url) as ledger:
        fulfilled = ledger.by_status("fulfilled")
    if not fulfilled:
        return {"version": None, "name": None, "why": "no request is fulfilled yet"}
    full = stages.read_splits(p, ["full"])["full"]
    rows_of = {r.request_id: {row["id"] for row in forget_rows_for([r], full)} for r in fulfilled}
    versions = tracking.registered_versions(p)
    if not versions:  # nothing registered (the store may not even exist): no alias to move
        return {"version": None, "name": None, "why": "no registered version"}
    v, why = pick_base(versions, rows_of)
    tracking.set_serving_alias(p, None if v is None else v["version"])
    if v is None:
        log.warning("no registered version honours every fulfilled request: alias %r removed (%s)",
                    tracking.SERVING, why)
        return {"version": None, "name": None, "why": why}
    log.info("alias %r -> %s v%s: it honours every fulfilled request (%s)", tracking.SERVING, v.get("name"),
             v["version"], ", ".join(sorted(rows_of)))
    return {"version": str(v["version"]), "name": v.get("name"), "why": why}


def fault_point(stage: str) -> None:
    """Kill this process (SIGKILL, no cleanup) if :data:`FAULT_ENV` names ``stage``: how the tests prove that a
    crash mid-run leaves the claimed requests in_progress, never fulfilled."""
    if os.environ.get(FAULT_ENV) == stage:
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- how each stage runs
class CycleSteps:
    """How :func:`honour_requests` runs each stage: here, in this process (``unlearn request run``).

    ``flows/pipelines.py`` subclasses it so that every step is a Prefect task
    (training cached on its inputs, retries), without restating the sequence or the
    ledger transitions. A stage method's ``extra`` are the overrides that point it at
    the forget set (:meth:`RequestPaths.overrides`), applied after the run's own.
    """

    detail = "unlearn request run"
    """Recorded in the ledger's events when the requests are claimed."""

    def __init__(self, params_path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> None:
        self.params_path = str(params_path)
        self.overrides = list(overrides)

    def params(self, extra: Sequence[str] = ()) -> Params:
        return load_params(self.params_path, [*self.overrides, *extra])

    def before_intake(self) -> None:
        """The base pipeline's outputs must be there: the prepared data (requests are matched against it) and
        the target model (what is unlearned). In-process they are ``dvc repro``'s, which knows when they are
        stale; this checks, before any request is claimed, and says what to run."""
        from .. import stages

        p = self.params()
        manifest = Path(p.data.out_dir) / "manifest.json"
        if not manifest.exists():
            raise FileNotFoundError(f"no prepared data at {p.data.out_dir} ({manifest} missing): run `dvc repro` "
                                    "(or `unlearn prepare`) first")
        target = stages.model_dir(p, "target")
        if not (target / "config.json").exists():
            raise FileNotFoundError(f"no target model at {target}: run `dvc repro finetune_target` "
                                    "(or `unlearn finetune --role target`) first")

    def target(self) -> str:
        """The target model the forget set is unlearned from."""
        from .. import stages

        return str(stages.model_dir(self.params(), "target"))

    def intake(self) -> list[str]:
        return intake(self.params())

    def base_model(self) -> dict[str, Any]:
        """Where the forget set's unlearning starts (:class:`~unlearn.requests.sequential.BasePlan` as a dict).

        ``requests.mode: union``: the target. ``sequential``: the registered version that honours every fulfilled
        request (:func:`~unlearn.requests.sequential.pick_base`: champion first, then newest), its model files
        from the registry (:func:`unlearn.tracking.version_model_dir`) checked against its registered weight
        hashes first (a mismatch raises, naming the file). No such version: the target, with the reason."""
        return base_model(self.params())

    def request_splits(self, plan: dict[str, Any] | None = None) -> RequestSplitsInfo:
        return request_splits(self.params(), plan)

    def publish_serving(self) -> dict[str, Any]:
        """Point the ``serving`` alias at the version that honours every fulfilled request (:func:`publish_serving`)."""
        return publish_serving(self.params())

    def already_honoured(self, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``{request_id: the registered version (VersionCoverage as a dict)}`` for each claimed request whose rows
        are all in a registered version's forget set (champion first): those are settled without unlearning."""
        p = self.params()
        with Ledger(requests_settings(p).url) as ledger:
            reqs = [r for r in (ledger.get(i) for i in request_ids) if r is not None]
        found = already_honoured(p, reqs)
        return {rid: c.honoured_by.to_dict() for rid, c in found.items() if c.honoured_by is not None}

    def record_honoured(self, honoured: dict[str, dict[str, Any]]) -> None:
        """In the registry: each version lists the requests it settles (``request_ids``) with their evidence."""
        from .. import tracking

        p = self.params()
        for (name, version), ids in _by_version(honoured).items():
            tracking.add_requests_to_version(p, name, version, {
                rid: {"prob_before": honoured[rid].get("prob_before"), "prob_after": honoured[rid].get("prob_after")}
                for rid in ids})

    def finetune(self, extra: Sequence[str], *, role: str, out_dir: str) -> dict[str, Any]:
        from .. import stages

        return stages.finetune(self.params(extra), role, out_dir)

    def cache(self, extra: Sequence[str], *, target_dir: str) -> None:
        from .. import stages

        stages.cache(self.params(extra), target_dir)

    def forget(self, extra: Sequence[str], *, out_dir: str, target_dir: str) -> dict[str, Any]:
        from .. import stages

        return stages.forget(self.params(extra), out_dir, target_dir)

    def evaluate(self, extra: Sequence[str], *, model_path: str, name: str, retain_dir: str,
                 target_dir: str) -> dict[str, Any]:
        from .. import stages

        return stages.evaluate(self.params(extra), model_path, name, retain_dir, target_dir).metrics

    def request_evidence(self, *, model_path: str, request_ids: list[str], earlier: list[str]) -> dict[str, Any]:
        """``requests.oracle: none``: each request's rows vs the holdout rows under ``model_path``
        (:mod:`unlearn.requests.evidence`), from the base data (``full`` and ``holdoutXX``). ``earlier``: the
        requests an earlier version already honoured (a failure of theirs is a regression)."""
        from .. import stages
        from .evidence import request_evidence_for_model

        p = self.params()
        with Ledger(requests_settings(p).url) as ledger:
            reqs = [r for r in (ledger.get(i) for i in request_ids) if r is not None]
        ev = request_evidence_for_model(p, model_path, reqs, stages.read_splits(p, ["full"])["full"])
        return {"per_request": ev["per_request"], "earlier": list(earlier), "holdout_split": ev["holdout_split"]}

    def register(self, extra: Sequence[str], *, model_path: str, request_ids: list[str],
                 request_gate: dict[str, Any] | None = None) -> dict[str, Any]:
        from .. import stages

        return stages.register(self.params(extra), model_path=model_path, request_ids=request_ids,
                               request_gate=request_gate)


# --------------------------------------------------------------------------- the cycle
def honour_requests(steps: CycleSteps) -> dict[str, Any]:
    """Pending deletion requests -> forget set -> unlearn -> evaluate -> gate -> register -> ledger updated.

    Returns ``{"status": "idle", "pending": []}`` when nothing is pending. A claimed request whose rows are all in
    a registered version's forget set is fulfilled by that version first, without training or evaluating anything
    (``already_honoured``: ``{request_id: that version}``); if that leaves none, the result is
    ``{"status": "honoured", "requests": [], "already_honoured"}``. Otherwise the rest (``requests``) is unlearned:
    ``{"status": "fulfilled" | "gate_failed", "requests", "decision", "metrics", "forget_set", "already_honoured",
    "mode", "started_from", "base", "plan"}`` (``requests.mode``; the model directory unlearned from, the target or
    the sequential base; the base version; why that one). On an exception the claimed requests not yet fulfilled
    go back to pending with the reason and it is re-raised (module docstring: crash safety).
    """
    steps.before_intake()
    pending = steps.intake()
    if not pending:
        log.info("no pending deletion requests")
        return {"status": "idle", "pending": []}
    url = requests_settings(steps.params()).url
    with Ledger(url) as ledger:
        ledger.mark_in_progress(pending, detail=steps.detail)
    claimed = list(pending)  # still in_progress: what a failure puts back to pending
    honoured: dict[str, dict[str, Any]] = {}
    try:
        # Already honoured: a registered version's forget set holds every row. Fulfilled by it; nothing is trained.
        honoured = steps.already_honoured(pending)
        if honoured:
            steps.record_honoured(honoured)
            for (name, version), ids in _by_version(honoured).items():
                c = honoured[ids[0]]
                with Ledger(url) as ledger:
                    ledger.mark_fulfilled(ids, model_name=name, model_version=version, forget_set_hash=c["forget_set_hash"],
                                          detail=f"already honoured by {name} v{version}: its forget set "
                                                 f"{str(c['forget_set_hash'])[:12]} holds every row; nothing unlearned")
                claimed = [i for i in claimed if i not in ids]
        if not claimed:
            log.info("requests %s: already honoured, nothing to unlearn", ", ".join(pending))
            return {"status": "honoured", "requests": [], "already_honoured": honoured,
                    "serving": steps.publish_serving()}
        target = steps.target()
        plan = steps.base_model()  # sequential: the champion that honours the earlier requests; union: the target
        info = steps.request_splits(plan)
        paths = RequestPaths(info["forget_set_hash"], info.get("base_weights_sha256"))
        extra = paths.overrides()
        retain, unlearned = str(paths.retain_dir), str(paths.unlearned_dir)
        base = plan.get("base")
        start = str(base["model_dir"]) if base else target  # what is unlearned, and the reference (the cache)
        oracle = requests_settings(steps.params()).oracle
        if oracle == "retain":
            steps.finetune(extra, role="retain", out_dir=retain)  # gold standard for this forget set
        steps.cache(extra, target_dir=start)
        fault_point("forget")
        steps.forget(extra, out_dir=unlearned, target_dir=start)
        models = (("retain", retain),) if oracle == "retain" else ()
        # utility and "before" are always against the original target: a chain of steps is bounded as a whole
        metrics = {name: steps.evaluate(extra, model_path=model, name=name, retain_dir=retain, target_dir=target)
                   for name, model in (*models, ("target", target), ("unlearned", unlearned))}
        gate = None
        if oracle == "none":  # every request the model claims to honour, against the holdout: no retain model
            gate = steps.request_evidence(model_path=unlearned, request_ids=info["honoured"],
                                          earlier=[i for i in info["honoured"] if i not in claimed])
            gate = {**gate, "mode": plan.get("mode", "union"),
                    "base": {k: base[k] for k in ("name", "version", "weights_sha256")} if base else None}
        decision = steps.register(extra, model_path=unlearned, request_ids=info["honoured"],
                                  **({"request_gate": gate} if gate is not None else {}))
    except BaseException as e:
        with Ledger(url) as ledger:
            ledger.mark_failed(claimed, f"{type(e).__name__}: {e}"[:2000])
        raise
    status = settle(url, claimed, decision, info["forget_set_hash"],
                    max_attempts=requests_settings(steps.params()).max_attempts)
    log.info("requests %s: %s (model version %s)", ", ".join(claimed), status, decision.get("version"))
    serving = steps.publish_serving() if status == "fulfilled" or honoured else None
    return {"status": status, "requests": claimed, "decision": decision, "metrics": metrics, "forget_set": info,
            "already_honoured": honoured, "mode": plan.get("mode", "union"), "started_from": start,
            "base": plan.get("base"), "plan": plan.get("why"), "serving": serving}


def _by_version(honoured: dict[str, dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    """The settled requests grouped by the registered version that honours them (request order kept)."""
    out: dict[tuple[str, str], list[str]] = {}
    for rid, c in honoured.items():
        out.setdefault((str(c["name"]), str(c["version"])), []).append(rid)
    return out


def settle(ledger_url: str, request_ids: list[str], decision: dict[str, Any], forget_set_hash: str, *,
           max_attempts: int | None = None, evidence: dict[str, Any] | None = None) -> str:
    """The claimed requests after registration: ``fulfilled`` by the registered version if it passed the
    gate, else back to ``pending`` with the gate's reasons (``gate_failed``), or ``needs_attention`` (with the
    ``evidence``) for those whose model has now failed the gate ``max_attempts`` times (``requests.max_attempts``):
    they are not retried by every later run. ``decision["needs_attention"]`` lists them."""
    with Ledger(ledger_url) as ledger:
        if decision.get("passed") and decision.get("version") is not None:
            ledger.mark_fulfilled(request_ids, model_name=decision.get("registered_model"),
                                  model_version=str(decision["version"]), forget_set_hash=forget_set_hash)
            return "fulfilled"
        reasons = "; ".join(decision.get("reasons") or ["not registered"])
        moved = ledger.mark_gate_failed(request_ids, reasons, max_attempts=max_attempts,
                                        evidence={"metrics": decision.get("metrics"), **(evidence or {})})
        decision["needs_attention"] = [i for i, st in moved.items() if st == "needs_attention"]
        return "gate_failed"
