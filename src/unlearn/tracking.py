"""Experiment tracking (MLflow) and gated model registration.

Where things go
---------------
By default tracking is an embedded local store with no server: the backend is
``sqlite:///<project>/mlflow.db`` and artifacts go under ``<project>/mlartifacts``
(set as the experiment's ``artifact_location`` when the experiment is created;
otherwise MLflow would write to ``./mlruns``). ``<project>`` is the current
directory (``dvc repro`` and ``unlearn`` run from the repository root).
Precedence for the tracking URI: ``MLFLOW_TRACKING_URI`` in the environment,
then ``tracking.uri`` in ``params.yaml``, then the SQLite default.
``params.yaml``::

    tracking:
      uri: null                      # null -> sqlite:///<project>/mlflow.db
      experiment: dipo-unlearn
      registered_model: unlearned-tofu
      artifact_location: null        # null -> <project>/mlartifacts (new experiments only)
    gate:
      min_forget_quality: 0.05
      min_utility_ratio: 0.9         # unlearned model_utility >= ratio * target model_utility

Browse with ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` from the project root.

How the model is stored
-----------------------
The saved Hugging Face directory (config, safetensors, tokenizer) is logged
**as plain run artifacts** under ``model/``, and the registered version's
source is ``runs:/<run_id>/model``. We do not use ``mlflow.transformers.log_model``:
it infers and validates a pip environment, builds a pipeline and copies the weights
again, which is slow on CPU and fragile offline, and it adds nothing here because
consumers load the directory with ``from_pretrained`` anyway::

    path = mlflow.artifacts.download_artifacts("models:/unlearned-tofu@champion")
    model = AutoModelForCausalLM.from_pretrained(path)

The gate and the champion rule
------------------------------
Both rules are pure functions in :mod:`unlearn.gate` (re-exported here).
A model passes the gate iff ``forget_quality >= gate.min_forget_quality`` and
``model_utility >= gate.min_utility_ratio * target model_utility``. A missing
(None) metric fails, with the reason. A failing model is still logged as a run
(tags ``gate=failed`` and ``gate_reasons``) and is never registered.

A passing model becomes a new version of ``tracking.registered_model``. Models are
compared only with models unlearned from the *same forget set*: the
``forget_set_hash`` version tag (the sha256 of the forget split's sorted row ids,
shared with the deletion-request ledger; see :func:`data_hashes`). The new version is **at least as good** as the
current champion of its forget set iff its ``forget_quality >= champion's`` AND its
``model_utility >= champion's`` (ties go to the newer model). Then it takes the
champion alias and the old champion loses it; otherwise it gets the challenger
alias. With no champion for that forget set yet, it becomes champion.

MLflow aliases are unique per registered model, not per forget set, so:

* ``champion-<hash8>`` / ``challenger-<hash8>`` (``hash8`` = first 8 hex digits of
  ``forget_set_hash``) are the per-forget-set aliases, and the comparison uses them.
  A model for another forget set never touches them.
* ``champion`` / ``challenger`` (no suffix) follow the *default* forget set: the one
  named by the registered-model tag ``default_forget_set_hash``, which is set by
  the first registration. To move the default, change that tag (UI, or
  ``client.set_registered_model_tag``). The next registration on the new default
  set moves the unsuffixed aliases.

Registration is one pass: everything a version carries (provenance, ``forget_rows``,
every parameter as ``params.<key>``, the per-request evidence, the forget set row by row
as ``forget_row_evidence.*``) is computed first and
the version is created with all its tags; its audit page is rendered from what was
just written, not read back from the registry. The one later change to a version's tags:
a deletion request its forget set already held is settled by it without unlearning, and
:func:`add_requests_to_version` appends it to ``request_ids`` (:mod:`unlearn.requests.coverage`).

Registration is not locked: two registrations on the same store at the same time
can interleave the alias moves. The pipeline runs them one at a time.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import Params
from .gate import CHAMPION_METRICS, DEFAULT_GATE, GateDecision, GateMetrics, as_float, at_least_as_good, gate_decision
from .io import read_json, stable_hash

__all__ = [  # the gate is re-exported: callers and tests written against tracking keep working
    "DEFAULT_GATE", "GateDecision", "Registration", "TrackingCfg", "UnlearningRun", "alias_names", "at_least_as_good",
    "client_for", "data_hashes", "flat_params", "forget_row_count", "gate_config", "gate_decision", "git_commit",
    "add_requests_to_version", "log_unlearning_run", "model_version_info", "register_if_passing", "register_version",
    "registered_versions", "run_tags", "version_model_dir",
    "tracking_config", "version_tags", "versions_for_request",
]

log = logging.getLogger("unlearn.tracking")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_EXPERIMENT = "dipo-unlearn"
DEFAULT_REGISTERED_MODEL = "unlearned-tofu"
CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_ARTIFACT_PATH = "model"
REPORT_ARTIFACT_PATH = "eval"
LOSS_PREFIX = "train/"
TARGET_PREFIX = "target."
_NOT_LOSSES = {"step", "epoch"}
_MAX_PARAM_VALUE = 6000  # MLflow 3 limit on a param value (characters)


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class TrackingCfg:
    uri: str
    experiment: str
    registered_model: str
    artifact_location: str


def tracking_config(p: Params, project_dir: str | Path | None = None) -> TrackingCfg:
    """The ``tracking:`` section of ``params.yaml`` with defaults filled in; ``MLFLOW_TRACKING_URI`` wins.

    ``p.tracking`` was validated, with its defaults, when ``p`` was loaded
    (:class:`unlearn.config.MlflowCfg`). What is resolved here depends on where the
    process runs, so it cannot live in the typed config: the environment variable, and
    paths relative to ``project_dir`` (default: the current directory).
    """
    t = p.tracking
    project = Path(project_dir or Path.cwd()).absolute()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or t.uri or f"sqlite:///{project / 'mlflow.db'}"
    art = t.artifact_location or str(project / "mlartifacts")
    if "://" not in art:
        art = str((project / art).absolute())
    return TrackingCfg(uri=uri, experiment=t.experiment, registered_model=t.registered_model, artifact_location=art)


def gate_metrics(p: Params) -> GateMetrics:
    """The metric names the gate and the champion rule read: the configured benchmark's."""
    from .benchmark import get_benchmark

    return get_benchmark(p.benchmark).gate_metrics


def gate_config(p: Params) -> dict[str, float]:
    """The ``gate:`` section of ``params.yaml`` as the mapping :func:`gate_decision` takes.

    Validated with its defaults (min_forget_quality 0.05, min_utility_ratio 0.9) when ``p``
    was loaded (:class:`unlearn.config.GateCfg`); kept as a dict for ``gate_decision``'s callers.
    """
    return p.gate.model_dump()


def client_for(cfg: TrackingCfg):
    """An ``MlflowClient`` on the configured store (the model registry lives in the same store)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.uri, registry_uri=cfg.uri)


def ensure_experiment(client, name: str, artifact_location: str) -> str:
    """Experiment id of ``name``, created with ``artifact_location`` if new (restored if deleted)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        if "://" not in artifact_location:
            Path(artifact_location).mkdir(parents=True, exist_ok=True)
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created concurrently
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


# --------------------------------------------------------------------------- provenance helpers
def git_commit(cwd: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` (+ ``+dirty`` if the work tree has changes); ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return head + ("+dirty" if dirty else "")


def dvc_data_hash(lock_path: str | Path = "dvc.lock", out_path: str = "data/tofu", stage: str = "prepare") -> str | None:
    """md5 DVC recorded for ``out_path`` in ``stage`` of ``dvc.lock`` (``None`` if absent)."""
    lock_path = Path(lock_path)
    if not lock_path.exists():
        return None
    try:
        lock = yaml.safe_load(lock_path.read_text()) or {}
    except yaml.YAMLError:
        log.warning("%s is not valid YAML; no DVC data hash recorded", lock_path)
        return None
    want = os.path.normpath(out_path)
    for out in ((lock.get("stages") or {}).get(stage) or {}).get("outs") or []:
        if isinstance(out, dict) and os.path.normpath(str(out.get("path", ""))) == want:
            return out.get("md5") or out.get("hash")
    return None


def data_hashes(p: Params, lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """sha256 of the forget and retain split files (from the manifest) + the DVC md5 of the data dir if locked.

    Keys: ``forget_sha256``, ``retain_sha256``, ``forget_set_hash`` (sha256 of the forget
    split's sorted row ids: the forget set's identity, shared with the deletion-request
    ledger), and ``dvc_md5`` when ``dvc.lock`` has it. Reads both the prepared-data
    manifest (flat) and the request-splits manifest (``{"splits": {...}}``).
    """
    from .benchmark import get_benchmark
    from .io import stable_hash
    from .requests.forget_set import forget_set_hash

    manifest_path = Path(p.data.out_dir) / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"no {manifest_path}: run `unlearn prepare` (or `dvc repro prepare`) first")
    manifest = read_json(manifest_path)
    manifest = manifest.get("splits", manifest)
    out = {}
    forget_names, retain_names = get_benchmark(p.benchmark).split_groups(p)
    for key, names in (("forget_sha256", forget_names), ("retain_sha256", retain_names)):
        for split in names:
            if split not in manifest:
                raise FileNotFoundError(f"{manifest_path} has no split {split!r}")
        shas = [manifest[split]["sha256"] for split in names]
        out[key] = shas[0] if len(shas) == 1 else stable_hash(shas)  # several splits (MUSE folds): one identity
    forget_files = [Path(p.data.out_dir) / f"{name}.json" for name in forget_names]
    if all(f.exists() for f in forget_files):
        out["forget_set_hash"] = forget_set_hash([r for f in forget_files for r in read_json(f)])
    md5 = dvc_data_hash(lock_path, p.data.out_dir)
    if md5:
        out["dvc_md5"] = md5
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def flat_params(p: Params) -> dict[str, Any]:
    """Every parameter of ``params.yaml`` (every section is typed), flattened to dotted keys."""
    return flatten(p.model_dump())


def params_hash(flat: Mapping[str, Any]) -> str:
    return stable_hash({k: flat[k] for k in sorted(flat)})


def _split_request_ids(request_ids: str | Iterable[str] | None) -> list[str]:
    if request_ids is None:
        return []
    if isinstance(request_ids, str):
        request_ids = request_ids.split(",")
    return [str(r).strip() for r in request_ids if str(r).strip()]


def forget_row_count(p: Params) -> int | None:
    """Rows in the forget split, from ``<data.out_dir>/manifest.json`` (None if the manifest does not say).

    Recorded on the run and the registered version (tag ``forget_rows``) so the audit
    says how much a version forgot without reading the data again.
    """
    from .benchmark import get_benchmark

    manifest_path = Path(p.data.out_dir) / "manifest.json"
    if not manifest_path.exists():
        return None
    manifest = read_json(manifest_path)
    entries = manifest.get("splits", manifest)
    counts = [(entries.get(name) or {}).get("rows") for name in get_benchmark(p.benchmark).split_groups(p)[0]]
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) for n in counts):
        return None
    return int(sum(counts))


# --------------------------------------------------------------------------- logging a run
def _tag_value(v: Any) -> str:
    return v if isinstance(v, str) else repr(v) if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class UnlearningRun:
    """What one unlearning run logs (and registers, if it passes): gathered once by :func:`unlearn.stages.register`.

    One object rather than the same dozen keywords restated by every function that
    only forwards them to the next.
    """

    model_dir: str | Path | None
    metrics: Mapping[str, Any]
    target_metrics: Mapping[str, Any] | None
    loss_log: Sequence[Mapping[str, Any]] | None
    report_dir: str | Path | None
    data_hashes: Mapping[str, str]
    git_commit: str
    request_ids: str | Iterable[str] | None = None
    forget_rows: int | None = None


def log_unlearning_run(
    p: Params,
    run: UnlearningRun,
    *,
    tags: Mapping[str, str],
    decision: GateDecision | None = None,
    cfg: TrackingCfg | None = None,
    client=None,
) -> str:
    """Log one unlearning run; return its run id.

    Params: the flattened ``params.yaml`` (:func:`flat_params`).
    Metrics: every numeric evaluation metric (None ones are skipped, their reason in the tag
    ``metric_skipped.<name>``, from ``<report_dir>/notes.json``), the target's as
    ``target.<name>``, ``utility_ratio``, and each per-step loss-log value as ``train/<name>`` with ``step=``.
    Tags: ``tags`` (the provenance of :func:`run_tags`, computed once by the caller and shared
    with the version) plus ``gate``/``gate_reasons`` when ``decision`` is given.
    Artifacts: ``report_dir`` under ``eval/``, ``model_dir`` under ``model/``.
    """
    from mlflow.entities import Metric, Param, RunTag

    cfg = cfg or tracking_config(p)
    client = client or client_for(cfg)
    exp_id = ensure_experiment(client, cfg.experiment, cfg.artifact_location)
    flat = flat_params(p)
    tags = dict(tags)
    if decision is not None:
        tags["gate"] = "passed" if decision.passed else "failed"
        tags["gate_reasons"] = "; ".join(decision.reasons) if decision.reasons else "none"

    mlrun = client.create_run(exp_id, run_name=f"{p.method.name}-{p.data.forget_split}", tags=tags)
    run_id = mlrun.info.run_id
    try:
        # params (MLflow: at most 100 per batch, values up to 6000 chars)
        params = [Param(k, _tag_value(v)[:_MAX_PARAM_VALUE]) for k, v in sorted(flat.items())]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100], synchronous=True)

        now = int(time.time() * 1000)
        ms: list[Metric] = []
        skipped: dict[str, str] = {}
        notes_file = Path(run.report_dir) / "notes.json" if run.report_dir is not None else None
        notes = read_json(notes_file) if notes_file is not None and notes_file.exists() else {}
        for k, v in run.metrics.items():
            f = as_float(v)
            if f is None:
                skipped[k] = notes.get(k) or ("value is None" if v is None else f"not a finite number: {v!r}")
            else:
                ms.append(Metric(k, f, now, 0))
        for k, v in (run.target_metrics or {}).items():
            f = as_float(v)
            if f is not None:
                ms.append(Metric(TARGET_PREFIX + k, f, now, 0))
        util = gate_metrics(p).utility
        mu, tmu = as_float(run.metrics.get(util)), as_float((run.target_metrics or {}).get(util))
        if mu is not None and tmu:
            ms.append(Metric("utility_ratio", mu / tmu, now, 0))
        for i, entry in enumerate(run.loss_log or []):
            step = int(entry.get("step", i))
            for k, v in entry.items():
                f = as_float(v)
                if k not in _NOT_LOSSES and f is not None:
                    ms.append(Metric(LOSS_PREFIX + k, f, now, step))
        for i in range(0, len(ms), 1000):
            client.log_batch(run_id, metrics=ms[i:i + 1000], synchronous=True)
        if skipped:
            st = [RunTag(f"metric_skipped.{k}", r[:5000]) for k, r in skipped.items()]
            client.log_batch(run_id, tags=st, synchronous=True)

        if run.report_dir is not None and Path(run.report_dir).is_dir():
            client.log_artifacts(run_id, str(run.report_dir), REPORT_ARTIFACT_PATH)
        if run.model_dir is not None and Path(run.model_dir).is_dir():
            client.log_artifacts(run_id, str(run.model_dir), MODEL_ARTIFACT_PATH)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    log.info("logged run %s in experiment %s (%s)", run_id, cfg.experiment, cfg.uri)
    return run_id


def run_tags(p: Params, run: UnlearningRun) -> dict[str, str]:
    """Provenance tags shared by the run and the model version (computed once per registration)."""
    from .requests.audit import TAG_FORGET_ROWS

    ids = _split_request_ids(run.request_ids)
    hashes = run.data_hashes
    forget_hash = (hashes.get("forget_set_hash") or hashes.get("forget_sha256")
                   or stable_hash({"forget_split": p.data.forget_split}))
    tags = {
        "git_commit": run.git_commit,
        "mlflow.source.git.commit": run.git_commit.removesuffix("+dirty"),
        "forget_split": p.data.forget_split,
        "retain_split": p.data.retain_split,
        "forget_set_hash": forget_hash,
        "method": p.method.name,
        "params_hash": params_hash(flat_params(p)),
        "request_ids": ",".join(ids),
    }
    if run.forget_rows is not None:
        tags[TAG_FORGET_ROWS] = str(run.forget_rows)
    if p.benchmark == "tofu":  # the prompt format the model was trained and scored in (MUSE: raw text)
        from .models.template import eval_format, train_format

        tags["prompt_format"] = train_format(p).describe()
        tags["eval_format"] = eval_format(p).describe()
    for k, v in hashes.items():
        tags[f"data.{k}"] = str(v)
    if run.model_dir is not None:
        try:
            from .models.build import weights_hash

            tags["model_weights_sha256"] = weights_hash(run.model_dir)
            from .requests.verify import TAG_WEIGHT_FILES, weight_files

            files = json.dumps(weight_files(run.model_dir), separators=(",", ":"))
            if len(files) <= _MAX_TAG_VALUE:  # each file by name: `unlearn audit --verify` names a swapped one
                tags[TAG_WEIGHT_FILES] = files
        except (FileNotFoundError, OSError):
            pass
    return tags


_VERSION_TAGS = ("git_commit", "forget_split", "retain_split", "forget_set_hash", "method", "params_hash",
                 "request_ids", "model_weights_sha256", "model_weight_files", "forget_rows", "prompt_format",
                 "eval_format")
"""Run tags a registered version carries too (with every ``data.*`` tag)."""
_MAX_TAG_VALUE = 5000  # MLflow limit on a tag value (characters)


def version_tags(p: Params, run_tags: Mapping[str, str], extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The tags a registered version is created with, all at once: the run's provenance (:data:`_VERSION_TAGS`,
    ``data.*``), every parameter as ``params.<dotted.key>`` (what ``unlearn audit --model`` lists) and ``extra``
    (e.g. the per-request evidence ``request.<id>.prob_before``)."""
    from .requests.audit import PARAMS_TAG_PREFIX

    tags = {k: run_tags[k] for k in _VERSION_TAGS if k in run_tags}
    tags.update({k: v for k, v in run_tags.items() if k.startswith("data.")})
    tags.update({PARAMS_TAG_PREFIX + k: _tag_value(v)[:_MAX_TAG_VALUE] for k, v in flat_params(p).items()})
    tags.update({k: _tag_value(v) for k, v in (extra or {}).items()})
    return tags


# --------------------------------------------------------------------------- registration
AUDIT_PAGE_PATH = "audit/audit.html"
"""Where a registered version's HTML audit page goes among its run's artifacts."""


@dataclass
class Registration:
    passed: bool
    reasons: list[str]
    run_id: str
    version: str | None = None
    alias: str | None = None              # champion | challenger | None (not registered)
    aliases: list[str] = field(default_factory=list)
    registered_model: str | None = None
    forget_set_hash: str | None = None
    displaced_version: str | None = None  # previous champion of this forget set, if it lost the alias
    tags: dict[str, str] = field(default_factory=dict, repr=False)  # the version's tags (not in as_dict)

    def as_dict(self) -> dict[str, Any]:
        """What ``reports/register/decision.json`` records (the version's tags are in the registry)."""
        d = asdict(self)
        d.pop("tags")
        return d

    def version_info(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The registered version as a version-info dict (:mod:`unlearn.requests.audit`), from what was just
        written rather than read back from the registry; ``metrics`` as logged (None values dropped)."""
        logged = {k: f for k, f in ((k, as_float(v)) for k, v in metrics.items()) if f is not None}
        return {"name": self.registered_model, "version": self.version, "aliases": list(self.aliases),
                "run_id": self.run_id, "tags": dict(self.tags), "metrics": logged}


def alias_names(forget_set_hash: str) -> tuple[str, str]:
    """Per-forget-set aliases: ``champion-<hash8>``, ``challenger-<hash8>``."""
    h = forget_set_hash[:8]
    return f"{CHAMPION}-{h}", f"{CHALLENGER}-{h}"


def _version_by_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _ensure_registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        try:
            return client.create_registered_model(
                name, description="Unlearned models that passed the benchmark's forget/utility gate "
                                  "(aliases: champion/challenger, per forget set: champion-<hash8>).")
        except MlflowException:  # created concurrently
            return client.get_registered_model(name)


def register_version(client, name: str, run_id: str, tags: Mapping[str, str], metrics: Mapping[str, Any],
                     names: GateMetrics = GateMetrics()) -> Registration:
    """Create a version from ``runs:/<run_id>/model`` with all its tags, and assign champion/challenger aliases.

    The role is decided first (the champion rule against the current champion of the same
    forget set, module docstring), so the version is created already tagged, ``role``
    included; afterwards only aliases move (and the displaced champion gets ``displaced_by``).
    """
    rm = _ensure_registered_model(client, name)
    fhash = tags["forget_set_hash"]
    vtags = dict(tags)
    vtags["run_id"] = run_id
    for k in (names.forget, names.utility):
        vtags[k] = _tag_value(as_float(metrics.get(k)))

    champ_alias, chall_alias = alias_names(fhash)
    current = _version_by_alias(client, name, champ_alias)
    if current is not None and current.tags.get("forget_set_hash") != fhash:
        # an 8-hex-digit prefix collision: fall back to the full-hash tag
        log.warning("alias %s points at version %s of another forget set; ignoring it", champ_alias, current.version)
        current = None
    if current is None or at_least_as_good(vtags, current.tags, names):
        role, alias = CHAMPION, champ_alias
        displaced = str(current.version) if current is not None else None
    else:
        role, alias, displaced = CHALLENGER, chall_alias, None
    vtags["role"] = role
    mv = client.create_model_version(name, f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}", run_id=run_id, tags=vtags)
    version = str(mv.version)

    client.set_registered_model_alias(name, alias, version)
    if displaced:
        client.set_model_version_tag(name, displaced, "displaced_by", version)
    aliases = [alias]
    default = (rm.tags or {}).get("default_forget_set_hash")
    if default is None:
        client.set_registered_model_tag(name, "default_forget_set_hash", fhash)
        default = fhash
    if default == fhash:
        client.set_registered_model_alias(name, role, version)
        aliases.append(role)
    log.info("registered %s version %s as %s (forget set %s)", name, version, ", ".join(aliases), fhash[:8])
    return Registration(passed=True, reasons=[], run_id=run_id, version=version, alias=role, aliases=aliases,
                        registered_model=name, forget_set_hash=fhash, displaced_version=displaced, tags=vtags)


def register_if_passing(
    p: Params,
    run: UnlearningRun,
    *,
    extra_version_tags: Mapping[str, Any] | None = None,
    audit_page: Callable[[dict[str, Any]], str] | None = None,
    cfg: TrackingCfg | None = None,
    client=None,
    decision: GateDecision | None = None,
    names: GateMetrics | None = None,
) -> Registration:
    """Gate, log the run (always), and register the model only if it passed. One pass, nothing read back.

    ``extra_version_tags`` (the per-request evidence) go onto the version as it is
    created; ``audit_page(version_info) -> html`` renders its audit page, logged to the
    run as ``audit/audit.html``, from the version just written (:meth:`Registration.version_info`).
    ``decision``: a gate decision made by the caller (deletion requests without an oracle,
    :func:`unlearn.gate.request_gate`) instead of the benchmark's gate; ``names``: the metrics the champion rule
    compares then (default: the benchmark's).
    """
    cfg = cfg or tracking_config(p)
    client = client or client_for(cfg)
    if decision is None:
        decision = gate_decision(run.metrics, run.target_metrics, gate_config(p), gate_metrics(p))
    tags = run_tags(p, run)
    run_id = log_unlearning_run(p, run, tags=tags, decision=decision, cfg=cfg, client=client)
    fhash = tags["forget_set_hash"]
    if not decision.passed:
        log.warning("gate failed, not registering: %s", "; ".join(decision.reasons))
        return Registration(passed=False, reasons=decision.reasons, run_id=run_id, registered_model=cfg.registered_model,
                            forget_set_hash=fhash)
    reg = register_version(client, cfg.registered_model, run_id, version_tags(p, tags, extra_version_tags), run.metrics,
                           names or gate_metrics(p))
    client.set_tag(run_id, "registered_version", reg.version)
    client.set_tag(run_id, "registered_alias", reg.alias)
    if audit_page is not None:
        client.log_text(run_id, audit_page(reg.version_info(run.metrics)), AUDIT_PAGE_PATH)
    return reg


# --------------------------------------------------------------------------- audit support
def versions_for_request(p: Params, request_id: str) -> list[dict[str, Any]]:
    """Registered versions whose ``request_ids`` tag contains ``request_id`` (exact match after parsing)."""
    from .requests.audit import as_version_info, parse_request_ids

    cfg = tracking_config(p)
    client = client_for(cfg)
    try:
        versions = client.search_model_versions(f"name='{cfg.registered_model}'")
    except Exception:  # noqa: BLE001 - no registered model yet
        return []
    out = []
    for v in versions:
        if request_id in parse_request_ids((v.tags or {}).get("request_ids")):
            out.append(_with_run_metrics(client, as_version_info(v)))
    return out


def registered_versions(p: Params) -> list[dict[str, Any]]:
    """Every version of ``tracking.registered_model`` as version info (tags, aliases, run metrics); ``[]`` when
    none is registered, or when the store is a SQLite file that does not exist yet (nothing is created)."""
    from .requests.audit import as_version_info

    cfg = tracking_config(p)
    if cfg.uri.startswith("sqlite:///") and not Path(cfg.uri.removeprefix("sqlite:///")).exists():
        return []
    client = client_for(cfg)
    try:
        aliases = dict(client.get_registered_model(cfg.registered_model).aliases or {})
        versions = client.search_model_versions(f"name='{cfg.registered_model}'")
    except Exception:  # noqa: BLE001 - no registered model yet
        return []
    out = []
    for v in versions:
        info = as_version_info(v)
        info["aliases"] = sorted(a for a, n in aliases.items() if str(n) == info["version"])
        out.append(_with_run_metrics(client, info))
    return out


SERVING = "serving"
"""The alias of the version to serve: the one that honours every fulfilled deletion request (set by the request
cycle, :func:`unlearn.requests.cycle.publish_serving`). ``champion`` ranks models of one forget set by quality;
it does not follow the requests, so it is not what a platform should serve once requests arrive."""


def set_serving_alias(p: Params, version: str | None) -> None:
    """Point :data:`SERVING` at ``version``, or (None) remove it: no version honours every request, so none may
    be served as if it did."""
    cfg = tracking_config(p)
    client = client_for(cfg)
    if version is not None:
        client.set_registered_model_alias(cfg.registered_model, SERVING, str(version))
        return
    try:
        client.delete_registered_model_alias(cfg.registered_model, SERVING)
    except Exception:  # noqa: BLE001 - no such alias (or no registered model): nothing to remove
        pass


def add_requests_to_version(p: Params, name: str, version: str, evidence: Mapping[str, Mapping[str, Any]]) -> str:
    """Record on a registered version that it honours more deletion requests: those settled without unlearning
    because its forget set already held their rows (:mod:`unlearn.requests.coverage`). Appends them to its
    ``request_ids`` tag and writes their ``request.<id>.prob_*`` evidence, so ``unlearn audit`` finds the version
    for them; the run keeps what registration logged. Returns the new ``request_ids``. Not locked: one request
    run at a time."""
    from .requests.audit import TAG_REQUEST_IDS, parse_request_ids, request_tag

    client = client_for(tracking_config(p))
    mv = client.get_model_version(name, str(version))
    ids = parse_request_ids((mv.tags or {}).get(TAG_REQUEST_IDS))
    ids += [r for r in evidence if r not in ids]
    for rid, ev in evidence.items():
        for k, v in ev.items():
            if v is not None:
                client.set_model_version_tag(name, str(version), request_tag(rid, k), _tag_value(v))
    client.set_model_version_tag(name, str(version), TAG_REQUEST_IDS, ",".join(ids))
    return ",".join(ids)


def version_model_dir(p: Params, info: Mapping[str, Any]) -> Path | None:
    """Where a registered version's model files are: ``runs:/<run_id>/model`` in the artifact store (the directory
    itself for a local store; a downloaded copy otherwise). None when the run or its model is gone."""
    if not info.get("run_id"):
        return None
    cfg = tracking_config(p)
    client = client_for(cfg)
    try:
        uri = client.get_run(info["run_id"]).info.artifact_uri
    except Exception:  # noqa: BLE001 - a deleted run: its files are gone
        return None
    if uri.startswith("file://") or "://" not in uri:
        local = Path(uri.removeprefix("file://")) / MODEL_ARTIFACT_PATH
        return local if local.is_dir() else None
    import mlflow.artifacts

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=info["run_id"], artifact_path=MODEL_ARTIFACT_PATH,
                                                        tracking_uri=cfg.uri))
    except Exception:  # noqa: BLE001
        return None


def model_version_info(p: Params, version: str) -> dict[str, Any]:
    """A registered version (by number or alias, e.g. ``champion``) with its tags, aliases and run metrics."""
    from .requests.audit import as_version_info

    cfg = tracking_config(p)
    client = client_for(cfg)
    mv = (client.get_model_version(cfg.registered_model, str(version)) if str(version).isdigit()
          else client.get_model_version_by_alias(cfg.registered_model, str(version)))
    return _with_run_metrics(client, as_version_info(mv))


def _with_run_metrics(client, info: dict[str, Any]) -> dict[str, Any]:
    if info.get("run_id"):
        try:
            info["metrics"] = {**client.get_run(info["run_id"]).data.metrics, **info.get("metrics", {})}
        except Exception:  # noqa: BLE001 - a deleted run leaves the tags as evidence
            pass
    return info
