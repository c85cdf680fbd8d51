"""From accepted deletion requests to a forget set and TOFU-format splits (pure functions + a writer).

The forget set of a new model is the union of the rows of *every accepted*
request (pending, in_progress and fulfilled: a model registered later must keep
honouring requests fulfilled earlier), in ``full``'s order, deduplicated. Its
identity is :func:`forget_set_hash`, which goes into the ledger (``mark_fulfilled``)
and onto the registered model version (tag ``forget_set_hash``).

The request splits are an ordinary split directory: written and read by the data
layer's one writer and reader (:func:`unlearn.data.splits.write_splits`,
:func:`~unlearn.data.splits.read_split_dir`), with the same flat manifest as the
benchmark splits; :func:`write_request_splits` / :func:`read_request_splits`
are those two with the request-specific arguments. The split names are
:mod:`unlearn.data.names`' ``FORGET_REQUESTS``, ``RETAIN_REQUESTS`` and
``FORGET_REQUESTS_PERTURBED``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data import splits as _splits
from ..data.names import (
    FORGET_REQUESTS,
    FORGET_REQUESTS_PERTURBED,
    REAL_AUTHORS,
    RETAIN_PERTURBED,
    RETAIN_REQUESTS,
    WORLD_FACTS,
)
from ..data.schema import N_PERTURBED, check_disjoint, validate_rows
from ..data.splits import forget_set_hash, read_manifest, read_split_dir, write_splits
from .ledger import ACCEPTED, Request, RequestError, match_subject

__all__ = [
    "FORGET_REQUESTS", "FORGET_REQUESTS_PERTURBED", "RETAIN_REQUESTS",
    "build_request_splits", "forget_rows_for", "forget_set_hash", "read_request_splits", "write_request_splits",
]

def _as_request(r: Request | Mapping[str, Any]) -> Request:
    if isinstance(r, Request):
        return r
    return Request(**{k: r.get(k) for k in Request.__dataclass_fields__})


def forget_rows_for(
    requests: Iterable[Request | Mapping[str, Any]], full_rows: Sequence[Mapping[str, Any]], *, source: str = "full"
) -> list[dict]:
    """The union of the rows matched by every accepted request, in ``full_rows``' order, each row once.

    Rejected requests are skipped. An accepted request that no longer matches
    ``full_rows`` (the data changed since it was accepted: an author or row id is
    gone, or a name became ambiguous) raises RequestError naming it, because a
    forget set silently missing a request would be recorded as honouring it.
    """
    ids: set[str] = set()
    problems = []
    for r in map(_as_request, requests):
        if r.status not in ACCEPTED:
            continue
        m = match_subject(r.subject_type, r.subject, full_rows, source=source)
        if m.reason:
            problems.append(f"{r.request_id} ({r.status}): {m.reason}")
        ids.update(row["id"] for row in m.rows)
    if problems:
        raise RequestError(
            f"{len(problems)} accepted request(s) no longer match the data; fix the data or reject them "
            "(`Ledger.reject`) before building a forget set:\n" + "\n".join(f"  {p}" for p in problems)
        )
    out, seen = [], set()
    for row in full_rows:
        if row["id"] in ids and row["id"] not in seen:
            seen.add(row["id"])
            out.append(dict(row))
    return out


def _has_perturbations(row: Mapping[str, Any]) -> bool:
    pert = row.get("perturbed_answer")
    return bool(row.get("paraphrased_answer")) and isinstance(pert, list) and len(pert) == N_PERTURBED["perturbed"]


def build_request_splits(
    full_rows: Sequence[Mapping[str, Any]],
    forget_rows: Sequence[Mapping[str, Any]],
    *,
    real_authors: Sequence[Mapping[str, Any]] | None = None,
    world_facts: Sequence[Mapping[str, Any]] | None = None,
    retain_perturbed: Sequence[Mapping[str, Any]] | None = None,
    perturbed_rows: Iterable[Mapping[str, Any]] | None = None,
    exclude_rows: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, list[dict]]:
    """TOFU-format splits for a requested forget set (pure: inputs are not modified, rows are copied).

    * ``forget_requests``: the forget rows, in ``full``'s order.
    * ``retain_requests``: ``full`` minus *every row of every author* in the forget
      set, so forget and retain are disjoint by author as in TOFU. (A ``rows``
      request for part of an author leaves that author's other rows in neither split.)
    * ``forget_requests_perturbed``: present only when every forget row has a
      paraphrase and 5 perturbed answers, taken from ``perturbed_rows`` (by id; e.g.
      forget10_perturbed + retain_perturbed) or from the full row itself (synthetic
      data carries them); a partial set would bias the truth ratio, so none is given.
    * ``real_authors``, ``world_facts``: passed through when given.
    * ``retain_perturbed``: passed through when given, minus rows of forget authors
      (absent if that leaves nothing).
    * ``exclude_rows``: rows whose authors are kept out of the retain splits too, though not unlearned here
      (``requests.mode: sequential``: the earlier requests, which the model it starts from already honours;
      :mod:`unlearn.requests.sequential`).
    """
    full_ids = {r["id"] for r in full_rows}
    unknown = [r["id"] for r in forget_rows if r["id"] not in full_ids]
    if unknown:
        raise RequestError(f"forget rows are not rows of full: {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
    wanted = {r["id"] for r in forget_rows}
    if not wanted:
        raise RequestError("empty forget set: no accepted deletion requests, nothing to unlearn")
    forget = [dict(r) for r in full_rows if r["id"] in wanted]
    authors = {r["author_id"] for r in forget} | {r["author_id"] for r in exclude_rows or ()}
    out: dict[str, list[dict]] = {
        FORGET_REQUESTS: forget,
        RETAIN_REQUESTS: [dict(r) for r in full_rows if r["author_id"] not in authors],
    }
    by_id = {r["id"]: r for r in (perturbed_rows or ())}
    pert = [by_id.get(r["id"], r) for r in forget]
    if all(_has_perturbations(r) for r in pert):
        out[FORGET_REQUESTS_PERTURBED] = [dict(r, perturbed_answer=list(r["perturbed_answer"])) for r in pert]
    for name, rows in ((REAL_AUTHORS, real_authors), (WORLD_FACTS, world_facts), (RETAIN_PERTURBED, retain_perturbed)):
        kept = [dict(r) for r in rows or () if name != RETAIN_PERTURBED or r["author_id"] not in authors]
        if kept:  # an empty split is no split (retain_perturbed can empty out when its authors are requested)
            out[name] = kept
    check_disjoint(out[FORGET_REQUESTS], out[RETAIN_REQUESTS], forget_name=FORGET_REQUESTS, retain_name=RETAIN_REQUESTS)
    if RETAIN_PERTURBED in out:
        check_disjoint(out[FORGET_REQUESTS], out[RETAIN_PERTURBED], forget_name=FORGET_REQUESTS, retain_name=RETAIN_PERTURBED)
    return out


def write_request_splits(
    splits: Mapping[str, list[dict]], out_dir: str | Path, *, request_ids: Sequence[str], forget_set_hash: str
) -> dict[str, Any]:
    """Write the request splits to ``out_dir`` with the data layer's one writer; return the manifest.

    :func:`unlearn.data.splits.write_splits` validates them (names, schema,
    forget/retain disjoint), writes canonical bytes and replaces ``out_dir`` as a
    whole. The ``forget_requests`` entry of the manifest records ``request_ids``
    (sorted) and the forget set's hash, so a DVC stage over ``out_dir`` changes
    exactly when the forget set does. ``forget_set_hash`` is what the caller will
    record in the ledger and the registry; it must be the hash of the
    ``forget_requests`` rows, else RequestError (nothing is written), since a
    model registered under one hash but unlearned on another set would be recorded
    as honouring requests it did not.
    """
    rows = splits.get(FORGET_REQUESTS)
    if rows is not None:  # (without it, the writer says which splits a request split set needs)
        actual = _splits.forget_set_hash(validate_rows(rows, file=FORGET_REQUESTS, kind="qa"))
        if actual != forget_set_hash:
            raise RequestError(
                f"forget_set_hash {forget_set_hash[:12]}... is not the hash of the {len(rows)} {FORGET_REQUESTS} rows "
                f"({actual[:12]}...); pass forget_set_hash(splits[{FORGET_REQUESTS!r}])"
            )
    return write_splits(splits, out_dir, request_ids=request_ids)


def read_request_splits(out_dir: str | Path) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """The splits written by :func:`write_request_splits` (sha256-checked, schema-validated, disjointness-checked) and the manifest.

    The data layer's one reader (:func:`unlearn.data.splits.read_split_dir`) over every split the manifest lists.
    """
    return read_split_dir(out_dir), read_manifest(out_dir)

