"""A certificate per fulfilled deletion request: ``unlearn audit REQUEST_ID --certificate FILE``.

A JSON document (and an HTML page beside it, ``FILE`` with ``.html``; both logged to the fulfilling version's
MLflow run under ``certificates/``) that says, for one request: what was asked (the request, and the sha256 of
its rows' ids, :func:`~unlearn.requests.forget_set.forget_set_hash` of them), which registered model version
honours it (name, version, weights sha256, its forget-set hash), the evidence it was accepted on and the
thresholds it had to meet, and the ledger's hash-chain head (now, and when the version was registered), so
``unlearn audit --verify`` can later show that nothing in it was changed.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..config import Params
from ..errors import UserError
from .audit import request_tag

CERT_ARTIFACT_DIR = "certificates"
EVIDENCE_FIELDS = ("prob_before", "prob_after", "ks_pvalue", "mia_auc_loss", "mia_auc_min_k_plus_plus", "privleak",
                   "prob", "holdout_prob", "rouge", "holdout_rouge")


def _num(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def certificate(p: Params, request_id: str) -> dict[str, Any]:
    """The certificate of ``request_id`` (module docstring). UserError when it is not fulfilled."""
    from .. import tracking
    from ..data.splits import read_split
    from .forget_set import forget_rows_for, forget_set_hash
    from .ledger import Ledger, requests_settings

    with Ledger(requests_settings(p).url) as ledger:
        req = ledger.get(request_id)
        if req is None:
            raise UserError(f"no request {request_id!r} in the ledger")
        if req.status != "fulfilled" or not req.model_version:
            raise UserError(f"request {request_id} is {req.status}: only a fulfilled request has a certificate")
        head = ledger.chain_head()
        events = ledger.events(request_id)
    rows = forget_rows_for([req], read_split(p.data.out_dir, "full"))
    v = tracking.model_version_info(p, req.model_version)
    tags = v["tags"]
    oracle = tags.get("request_oracle") or "retain"
    thresholds = {k[len("params."):]: _num(val) for k, val in sorted(tags.items())
                  if k.startswith("params.requests.gate.") or k.startswith("params.gate.")}
    evidence = {k: _num(tags.get(request_tag(request_id, k))) for k in EVIDENCE_FIELDS
                if tags.get(request_tag(request_id, k)) is not None}
    metrics = {k: v["metrics"].get(k) for k in ("forget_quality", "model_utility", "request_ks_pvalue")
               if v["metrics"].get(k) is not None}
    return {
        "certificate": "deletion request fulfilment",
        "request": {**req.to_dict(), "rows": len(rows), "rows_sha256": forget_set_hash(rows),
                    "row_ids": [r["id"] for r in rows]},
        "model": {"name": v.get("name"), "version": v.get("version"), "aliases": v.get("aliases"),
                  "run_id": v.get("run_id"), "weights_sha256": tags.get("model_weights_sha256"),
                  "weight_files": json.loads(tags["model_weight_files"]) if tags.get("model_weight_files") else None,
                  "forget_set_hash": tags.get("forget_set_hash"), "git_commit": tags.get("git_commit")},
        "oracle": oracle,
        "holdout_split": tags.get("request_holdout_split"),
        "evidence": evidence,
        "metrics": metrics,
        "thresholds": thresholds,
        "ledger": {"chain_head": head, "chain_head_at_registration": tags.get("ledger_chain_head"),
                   "events": [{k: e[k] for k in ("event_id", "at", "from_status", "to_status", "detail", "event_hash")}
                              for e in events]},
        "verify": "unlearn audit --verify recomputes the ledger chain, this version's weight files and forget set",
    }


def certificate_html(cert: dict[str, Any]) -> str:
    """The certificate as a self-contained HTML page (inline CSS, no scripts or links, every value escaped)."""
    e = html.escape

    def table(d: dict[str, Any]) -> str:
        return "<table>" + "".join(f"<tr><th>{e(str(k))}</th><td>{e(json.dumps(v) if isinstance(v, (list, dict)) else str(v))}</td></tr>"
                                   for k, v in d.items()) + "</table>"

    r, m = cert["request"], cert["model"]
    title = f"Deletion certificate: {r['request_id']}"
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>body{{font-family:system-ui,sans-serif;margin:2em}}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;"
            "vertical-align:top}th{background:#f3f3f3}</style></head><body>"
            f"<h1>{e(title)}</h1>"
            f"<p>{e(r['request_id'])} is honoured by {e(str(m['name']))} v{e(str(m['version']))} "
            f"(oracle: {e(cert['oracle'])}).</p>"
            "<h2>Request</h2>" + table({k: r[k] for k in ("subject_type", "subject", "received_at", "status", "rows",
                                                          "rows_sha256")})
            + "<h2>Model</h2>" + table({k: m[k] for k in ("name", "version", "run_id", "weights_sha256",
                                                          "forget_set_hash", "git_commit")})
            + "<h2>Evidence</h2>" + table(cert["evidence"]) + table(cert["metrics"])
            + "<h2>Thresholds</h2>" + table(cert["thresholds"])
            + "<h2>Ledger</h2>" + table({"chain head": cert["ledger"]["chain_head"],
                                        "chain head at registration": cert["ledger"]["chain_head_at_registration"]})
            + "</body></html>\n")


def write_certificate(p: Params, request_id: str, path: str | Path) -> str:
    """Write the certificate to ``path`` (JSON) and ``path`` with ``.html``, log both to the version's run under
    ``certificates/``; returns what was written (one line each)."""
    from .. import tracking

    cert = certificate(p, request_id)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cert, indent=2, default=str) + "\n")
    page = path.with_suffix(".html")
    page.write_text(certificate_html(cert))
    lines = [f"certificate of {request_id}: {path} (+ {page})"]
    run_id = cert["model"].get("run_id")
    if run_id:
        client = tracking.client_for(tracking.tracking_config(p))
        client.log_text(run_id, path.read_text(), f"{CERT_ARTIFACT_DIR}/{request_id}.json")
        client.log_text(run_id, page.read_text(), f"{CERT_ARTIFACT_DIR}/{request_id}.html")
        lines.append(f"logged to MLflow run {run_id}: {CERT_ARTIFACT_DIR}/{request_id}.json, .html")
    return "\n".join(lines)
