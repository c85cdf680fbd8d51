"""Audit both ways: which registered model versions honour a request, and what produced a model version.

Pure functions over the ledger and plain dicts, so they need no MLflow: the
tracking layer supplies *version info* dicts (and a ``versions_lookup`` callable
returning them). The contract (every key optional except ``name``/``version``)::

    {
      "name": "dipo-unlearn", "version": "3",            # registered model name and version
      "aliases": ["champion"], "run_id": "...", "created_at": "...",
      "tags": {                                           # MLflow model-version (or run) tags
        "request_ids": "req-1,req-2",                     # EVERY request in the forget set (comma-separated)
        "forget_set_hash": "<sha256>", "forget_rows": "40",
        "git_commit": "<sha>",                            # or mlflow.source.git.commit
        "data.full_sha256": "<sha>", ...                  # data hashes: any tag starting with "data."
        "params.method.name": "dipo", ...                 # params: any tag starting with "params."
        "request.req-1.prob_before": "0.91",              # per-request evidence (also via request_metrics)
        "request.req-1.prob_after": "0.02",
      },
      "metrics": {"forget_quality": 0.8, "model_utility": 0.6, ...},
      "params": {...},                                     # if given, used instead of the params.* tags
      "request_metrics": {"req-1": {"prob_before": 0.91, "prob_after": 0.02}},
    }

``prob_before``/``prob_after`` are the mean (length-normalised) answer
probability of the request's rows under the model before unlearning (target)
and after (this version).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..fmt import fmt_number
from .ledger import Ledger, Request

TAG_REQUEST_IDS = "request_ids"
TAG_FORGET_SET_HASH = "forget_set_hash"
TAG_FORGET_ROWS = "forget_rows"
GIT_COMMIT_TAGS = ("git_commit", "mlflow.source.git.commit")
DATA_TAG_PREFIX = "data."
PARAMS_TAG_PREFIX = "params."
EVIDENCE_METRICS = ("forget_quality", "model_utility", "forget_prob", "retain_prob", "forget_truth_ratio", "forget_rouge")
REQUEST_EVIDENCE = ("prob_before", "prob_after")

VersionsLookup = Callable[[str], Iterable[Mapping[str, Any]]]


def request_tag(request_id: str, key: str) -> str:
    """The per-request evidence tag name, e.g. ``request.req-1.prob_after``."""
    return f"request.{request_id}.{key}"


def parse_request_ids(value: Any) -> list[str]:
    """A ``request_ids`` tag (``"a,b"``, ``"a b"``, a JSON list string, or a list) -> ids, order kept, unique."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text.strip("[]").replace('"', "").split(",")
        else:
            value = text.replace(",", " ").split()
    return list(dict.fromkeys(str(v).strip() for v in value if str(v).strip()))


def as_version_info(v: Any) -> dict[str, Any]:
    """A version-info dict from a dict or an MLflow ``ModelVersion``-like object (name, version, tags, aliases, run_id)."""
    if isinstance(v, Mapping):
        d = dict(v)
    else:
        d = {k: getattr(v, k, None) for k in ("name", "version", "tags", "aliases", "run_id")}
        ts = getattr(v, "creation_timestamp", None)
        if ts is not None:
            d["created_at"] = ts
    if d.get("name") is None and d.get("model_name") is not None:
        d["name"] = d["model_name"]
    d["version"] = None if d.get("version") is None else str(d["version"])
    d["tags"] = dict(d.get("tags") or {})
    d["metrics"] = dict(d.get("metrics") or {})
    d["aliases"] = list(d.get("aliases") or [])
    return d


def _num(x: Any) -> Any:
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def _count(x: Any) -> Any:
    """A row count from a tag (``"21"``) as an int, so it prints as ``21`` rather than ``21.0000``."""
    n = _num(x)
    return int(n) if isinstance(n, float) and n.is_integer() else n


def _metric(v: Mapping[str, Any], key: str) -> Any:
    for src in (v["metrics"], v, v["tags"]):
        if src.get(key) is not None:
            return _num(src[key])
    return None


def _request_evidence(v: Mapping[str, Any], request_id: str) -> dict[str, Any]:
    per = dict((v.get("request_metrics") or {}).get(request_id) or {})
    out = {}
    for k in REQUEST_EVIDENCE:
        val = per.get(k, v["tags"].get(request_tag(request_id, k)))
        out[k] = _num(val) if val is not None else None
    return out


def _vkey(name: Any, version: Any) -> tuple[str, str]:
    return (str(name), str(version))


def _vsort(entry: Mapping[str, Any]) -> tuple:
    ver = str(entry.get("version"))
    return (str(entry.get("name")), int(ver) if ver.isdigit() else 0, ver)


def audit_request(ledger: Ledger, request_id: str, *, versions_lookup: VersionsLookup) -> dict[str, Any]:
    """Which registered model versions honour ``request_id``, with the evidence.

    Versions come from the ledger (the version that fulfilled it) and from
    ``versions_lookup(request_id)`` (e.g. the MLflow versions whose ``request_ids``
    tag lists it; later models keep honouring it). Each version entry says where it
    was found (``source``: ``ledger`` and/or ``registry``) and carries
    forget_quality, model_utility, ... and the request's ``prob_before``/``prob_after``
    when the version info has them. ``honoured`` is true when the ledger says
    fulfilled and at least one version is known. Inconsistencies go to ``warnings``.
    """
    req = ledger.get(request_id)
    warnings: list[str] = []
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for raw in versions_lookup(request_id) or ():
        v = as_version_info(raw)
        listed = request_id in parse_request_ids(v["tags"].get(TAG_REQUEST_IDS))
        if not listed:
            warnings.append(f"{v.get('name')} v{v.get('version')}: returned by the lookup but its {TAG_REQUEST_IDS} tag does not list {request_id}")
        entry = {
            "name": v.get("name"),
            "version": v.get("version"),
            "aliases": v["aliases"],
            "run_id": v.get("run_id"),
            "created_at": v.get("created_at"),
            "source": ["registry"],
            "forget_set_hash": v["tags"].get(TAG_FORGET_SET_HASH),
            **{k: _metric(v, k) for k in EVIDENCE_METRICS},
            **_request_evidence(v, request_id),
        }
        entries[_vkey(entry["name"], entry["version"])] = entry
    if req is None:
        warnings.append(f"{request_id} is not in the ledger")
    elif req.model_version is not None:
        key = _vkey(req.model_name, req.model_version)
        if key in entries:
            entries[key]["source"].append("ledger")
            reg_hash = entries[key]["forget_set_hash"]
            if reg_hash and req.forget_set_hash and reg_hash != req.forget_set_hash:
                warnings.append(
                    f"{req.model_name} v{req.model_version}: forget_set_hash {reg_hash[:12]} in the registry but "
                    f"{req.forget_set_hash[:12]} in the ledger"
                )
        else:
            entries[key] = {"name": req.model_name, "version": req.model_version, "aliases": [], "source": ["ledger"],
                            "forget_set_hash": req.forget_set_hash, **{k: None for k in EVIDENCE_METRICS + REQUEST_EVIDENCE}}
            warnings.append(
                f"the ledger says {req.model_name} v{req.model_version} fulfilled it, but the registry lookup does not "
                "return that version (deleted, or not tagged with the request)"
            )
    if req is not None and entries and req.status in ("pending", "in_progress"):
        reg = [f"{e['name']} v{e['version']}" for e in entries.values() if "registry" in e["source"]]
        if reg:
            warnings.append(
                f"registered version(s) {', '.join(reg)} list it but the ledger has it {req.status}: the run stopped between "
                "registering and mark_fulfilled (or is still running); the next run fulfils it"
            )
    if req is not None and req.status == "rejected" and entries:
        warnings.append("the request is rejected, yet model versions list it")
    versions = sorted(entries.values(), key=_vsort)
    return {
        "request_id": request_id,
        "found": req is not None,
        "request": None if req is None else req.to_dict(),
        "status": None if req is None else req.status,
        "honoured": req is not None and req.status == "fulfilled" and bool(versions),
        "versions": versions,
        "events": ledger.events(request_id),
        "warnings": warnings,
    }


def audit_model(version_info: Mapping[str, Any] | Any, ledger: Ledger) -> dict[str, Any]:
    """What produced a model version: its requests (with their ledger status), forget-set and data hashes,
    params and commit, all from the version's tags/metrics; cross-checked against the ledger in ``warnings``."""
    v = as_version_info(version_info)
    tags = v["tags"]
    ids = parse_request_ids(tags.get(TAG_REQUEST_IDS))
    warnings: list[str] = []
    requests: list[dict[str, Any]] = []
    fhash = tags.get(TAG_FORGET_SET_HASH)
    for rid in ids:
        r = ledger.get(rid)
        if r is None:
            requests.append({"request_id": rid, "in_ledger": False})
            warnings.append(f"{rid} is listed in {TAG_REQUEST_IDS} but not in the ledger")
            continue
        requests.append({**r.to_dict(), "in_ledger": True, **_request_evidence(v, rid)})
        if r.status == "rejected":
            warnings.append(f"{rid} is rejected in the ledger ({r.reason})")
        elif r.status == "pending":
            warnings.append(f"{rid} is still pending in the ledger (the run stopped before mark_fulfilled?)")
        if (r.model_name, r.model_version) == (v.get("name"), v.get("version")) and fhash and r.forget_set_hash and r.forget_set_hash != fhash:
            warnings.append(f"{rid}: the ledger's forget_set_hash {r.forget_set_hash[:12]} differs from this version's {fhash[:12]}")
    for r in ledger.by_status("fulfilled"):
        if (r.model_name, r.model_version) == (v.get("name"), v.get("version")) and r.request_id not in ids:
            warnings.append(f"the ledger says this version fulfilled {r.request_id}, but {TAG_REQUEST_IDS} does not list it")
    params = v.get("params") or {k[len(PARAMS_TAG_PREFIX):]: val for k, val in tags.items() if k.startswith(PARAMS_TAG_PREFIX)}
    return {
        "name": v.get("name"),
        "version": v.get("version"),
        "aliases": v["aliases"],
        "run_id": v.get("run_id"),
        "created_at": v.get("created_at"),
        "request_ids": ids,
        "requests": requests,
        "forget_set_hash": fhash,
        "forget_rows": _count(tags.get(TAG_FORGET_ROWS)),
        "data": {k: val for k, val in sorted(tags.items()) if k.startswith(DATA_TAG_PREFIX)},
        "params": dict(sorted(params.items())),
        "git_commit": next((tags[k] for k in GIT_COMMIT_TAGS if tags.get(k)), None),
        "metrics": {k: _metric(v, k) for k in EVIDENCE_METRICS if _metric(v, k) is not None},
        "mode": tags.get("request_mode"),
        "unlearned_from": (f"{tags.get('request_base_model')} v{tags['request_base_version']}"
                           if tags.get("request_base_version") else None),
        "warnings": warnings,
    }


# --------------------------------------------------------------------------- rendering

def _subject(d: Mapping[str, Any]) -> str:
    if not d.get("subject_type"):
        return "?"
    return Request(**{k: d.get(k) for k in Request.__dataclass_fields__}).describe()


def render_audit_request(d: Mapping[str, Any]) -> str:
    """Plain-text report of :func:`audit_request`."""
    lines = [f"deletion request {d['request_id']}"]
    r = d.get("request")
    if r is None:
        lines.append("  not in the ledger")
    else:
        lines += [
            f"  subject:       {_subject(r)}",
            f"  received:      {r['received_at']}",
            f"  status:        {r['status']}" + (f" ({r['reason']})" if r.get("reason") else ""),
            f"  fulfilled by:  {r['model_name']} v{r['model_version']}" if r.get("model_version") else "  fulfilled by:  -",
            f"  forget set:    {r['forget_set_hash'] or '-'}",
        ]
    lines.append(f"  honoured:      {'yes' if d['honoured'] else 'NO'}")
    if d["versions"]:
        lines.append("  model versions honouring it:")
        for e in d["versions"]:
            alias = f" [{', '.join(e['aliases'])}]" if e.get("aliases") else ""
            lines.append(
                f"    {e['name']} v{e['version']}{alias} (from {'+'.join(e['source'])}): "
                f"forget_quality={fmt_number(e.get('forget_quality'))} model_utility={fmt_number(e.get('model_utility'))} "
                f"answer prob before={fmt_number(e.get('prob_before'))} after={fmt_number(e.get('prob_after'))}"
            )
    else:
        lines.append("  model versions honouring it: none")
    if d.get("events"):
        lines.append("  history:")
        for ev in d["events"]:
            lines.append(f"    {ev['at']}  {ev['from_status'] or '-'} -> {ev['to_status']}" + (f"  {ev['detail']}" if ev.get("detail") else ""))
    for w in d.get("warnings", []):
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def reproduce_command(d: Mapping[str, Any]) -> str:
    """The command that rebuilds the version: its commit checked out, then the DVC pipeline with every
    parameter it ran with (``dvc exp run -S key=value``, so a run made with ``--set`` overrides is rebuilt
    with them too, whatever params.yaml says at that commit). The data come with the commit (DVC-tracked)."""
    import shlex

    commit = d.get("git_commit") or "<commit unknown>"
    # A run from a tree with uncommitted changes is tagged "<sha>+dirty": `git checkout` takes the sha only,
    # and the reader is told the commit alone does not hold everything the run saw.
    dirty = commit.endswith("+dirty")
    sets = " ".join("-S " + shlex.quote(f"{k}={'null' if v in (None, 'None') else v}")
                    for k, v in (d.get("params") or {}).items())
    cmd = f"git checkout {commit.removesuffix('+dirty')} && dvc exp run {sets}".rstrip()
    return cmd + ("  (the run had uncommitted changes: this commit alone may not rebuild it)" if dirty else "")


def render_audit_model(d: Mapping[str, Any]) -> str:
    """Plain-text report of :func:`audit_model`."""
    alias = f" [{', '.join(d['aliases'])}]" if d.get("aliases") else ""
    lines = [
        f"model {d['name']} v{d['version']}{alias}",
        f"  run:           {d.get('run_id') or 'n/a'}",
        f"  git commit:    {d.get('git_commit') or 'n/a'}",
        f"  forget set:    {d.get('forget_set_hash') or 'n/a'} ({fmt_number(d.get('forget_rows'))} rows)",
    ]
    if d.get("unlearned_from"):  # requests.mode sequential: the forget set is this step's; the requests are all
        lines.append(f"  unlearned from: {d['unlearned_from']} (requests.mode {d.get('mode')}: its forget set is the "
                     "new requests' rows; every request below was re-checked on this model)")
    for k, val in d.get("data", {}).items():
        lines.append(f"  {k}: {val}")
    if d.get("metrics"):
        lines.append("  metrics:       " + " ".join(f"{k}={fmt_number(val)}" for k, val in d["metrics"].items()))
    if d.get("params"):
        lines.append("  params:        " + " ".join(f"{k}={val}" for k, val in d["params"].items()))
    lines.append("  reproduce:     " + reproduce_command(d))
    lines.append(f"  requests ({len(d['requests'])}):")
    for r in d["requests"]:
        if not r.get("in_ledger"):
            lines.append(f"    {r['request_id']}: not in the ledger")
            continue
        by = f", fulfilled by v{r['model_version']}" if r.get("model_version") else ""
        lines.append(f"    {r['request_id']}: {_subject(r)}, {r['status']}{by}")
    for w in d.get("warnings", []):
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}"
    "code{font-size:90%}.warn{color:#a40000}"
)


def _table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{e(fmt_number(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def audit_html(version_info: Mapping[str, Any] | Any, requests: Iterable[Request | Mapping[str, Any]]) -> str:
    """A self-contained HTML page (inline CSS, no scripts or external resources, every value escaped) describing
    a model version and the deletion requests it honours; log it to MLflow as an artifact."""
    e = html.escape
    v = as_version_info(version_info)
    tags = v["tags"]
    reqs = [r.to_dict() if isinstance(r, Request) else dict(r) for r in requests]
    title = f"Deletion audit: {v.get('name')} v{v.get('version')}"
    facts = [
        ("model", f"{v.get('name')} v{v.get('version')}"),
        ("aliases", ", ".join(v["aliases"]) or None),
        ("run", v.get("run_id")),
        ("git commit", next((tags[k] for k in GIT_COMMIT_TAGS if tags.get(k)), None)),
        ("forget set hash", tags.get(TAG_FORGET_SET_HASH)),
        ("forget rows", tags.get(TAG_FORGET_ROWS)),
        *[(k, val) for k, val in sorted(tags.items()) if k.startswith(DATA_TAG_PREFIX)],
        *[(k, _metric(v, k)) for k in EVIDENCE_METRICS if _metric(v, k) is not None],
    ]
    req_rows = [
        (
            r.get("request_id"), _subject(r), r.get("received_at"), r.get("status"),
            f"{r['model_name']} v{r['model_version']}" if r.get("model_version") else None,
            *_request_evidence(v, str(r.get("request_id"))).values(),
        )
        for r in reqs
    ]
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{e(title)}</h1>"
        + _table(["field", "value"], facts)
        + f"<h2>Deletion requests honoured ({len(reqs)})</h2>"
        + _table(["request", "subject", "received", "status", "fulfilled by", "answer prob before", "answer prob after"], req_rows)
        + "</body></html>\n"
    )
