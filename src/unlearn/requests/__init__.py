"""Deletion requests: the ledger, the inbox, the forget set they imply, the audit trail, and the cycle that
honours them (:mod:`unlearn.requests.cycle`: ``unlearn request run`` and the Prefect deployment unlearn/requests;
not imported here: it runs the stages, a layer above the rest of this package, see docs/architecture.md).

:mod:`unlearn.requests.coverage` tells whether a registered version's forget set already holds every row of a
request (``request add`` says so; ``request run`` settles it by that version without unlearning).

See ``docs/requests.md`` for the life of a request and how the pipeline uses this.
``request_app`` (the ``unlearn request`` typer sub-app) lives in
:mod:`unlearn.requests.cli`, the command-line layer: not imported here.
"""

from __future__ import annotations

from .audit import (
    GIT_COMMIT_TAGS,
    TAG_FORGET_ROWS,
    TAG_FORGET_SET_HASH,
    TAG_REQUEST_IDS,
    as_version_info,
    audit_html,
    audit_model,
    audit_request,
    parse_request_ids,
    render_audit_model,
    render_audit_request,
    request_tag,
)
from .forget_set import (
    FORGET_REQUESTS,
    FORGET_REQUESTS_PERTURBED,
    RETAIN_REQUESTS,
    build_request_splits,
    forget_rows_for,
    forget_set_hash,
    read_request_splits,
    write_request_splits,
)
from .inbox import InboxError, IngestResult, ingest_inbox
from .ledger import (
    ACCEPTED,
    STATUSES,
    AddResult,
    Ledger,
    Match,
    Request,
    RequestError,
    RequestsCfg,
    TransitionError,
    match_subject,
    requests_settings,
)

__all__ = [
    "ACCEPTED", "FORGET_REQUESTS", "FORGET_REQUESTS_PERTURBED", "GIT_COMMIT_TAGS", "RETAIN_REQUESTS", "STATUSES",
    "TAG_FORGET_ROWS", "TAG_FORGET_SET_HASH", "TAG_REQUEST_IDS", "AddResult", "InboxError", "IngestResult", "Ledger",
    "Match", "Request", "RequestError", "RequestsCfg", "TransitionError", "as_version_info", "audit_html",
    "audit_model", "audit_request", "build_request_splits", "forget_rows_for", "forget_set_hash",
    "ingest_inbox", "match_subject", "parse_request_ids", "read_request_splits", "render_audit_model",
    "render_audit_request", "request_tag", "requests_settings", "write_request_splits",
]

