"""From accepted deletion requests to a forget set and TOFU-format splits (pure functions + a writer).

The forget set of a new model is the union of the rows of *every accepted*
request (pending, in_progress and fulfilled: a model registered later must keep
honouring requests fulfilled earlier), in ``full``'s order, deduplicated. Its
identity is :func:`forget_set_hash`, which goes into the ledger (``mark_fulfilled``)
and onto the registered model version (tag ``forget_set_hash``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.schema import N_PERTURBED, DataError, check_disjoint, validate_rows
from ..io import atomic_write_text, sha256_bytes
from .ledger import ACCEPTED, Request, RequestError, match_subject

FORGET = "forget_requests"
RETAIN = "retain_requests"
FORGET_PERTURBED = "forget_requests_perturbed"
PASS_THROUGH = ("real_authors", "world_facts", "retain_perturbed")
REQUEST_SPLIT_KINDS = {
    FORGET: "qa",
    RETAIN: "qa",
    FORGET_PERTURBED: "perturbed",
    "retain_perturbed": "perturbed",
    "real_authors": "utility",
    "world_facts": "utility",
}
MANIFEST = "manifest.json"


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


def forget_set_hash(rows: Iterable[Mapping[str, Any] | str]) -> str:
    """sha256 (hex) of the sorted, unique row ids joined by ``\\n`` (UTF-8): independent of order and duplicates.

    Accepts rows (dicts with ``id``) or bare ids. The empty set hashes the empty string.
    """
    ids = sorted({r if isinstance(r, str) else r["id"] for r in rows})
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


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
    """
    full_ids = {r["id"] for r in full_rows}
    unknown = [r["id"] for r in forget_rows if r["id"] not in full_ids]
    if unknown:
        raise RequestError(f"forget rows are not rows of full: {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
    wanted = {r["id"] for r in forget_rows}
    if not wanted:
        raise RequestError("empty forget set: no accepted deletion requests, nothing to unlearn")
    forget = [dict(r) for r in full_rows if r["id"] in wanted]
    authors = {r["author_id"] for r in forget}
    out: dict[str, list[dict]] = {
        FORGET: forget,
        RETAIN: [dict(r) for r in full_rows if r["author_id"] not in authors],
    }
    by_id = {r["id"]: r for r in (perturbed_rows or ())}
    pert = [by_id.get(r["id"], r) for r in forget]
    if all(_has_perturbations(r) for r in pert):
        out[FORGET_PERTURBED] = [dict(r, perturbed_answer=list(r["perturbed_answer"])) for r in pert]
    for name, rows in (("real_authors", real_authors), ("world_facts", world_facts), ("retain_perturbed", retain_perturbed)):
        kept = [dict(r) for r in rows or () if name != "retain_perturbed" or r["author_id"] not in authors]
        if kept:  # an empty split is no split (retain_perturbed can empty out when its authors are requested)
            out[name] = kept
    check_disjoint(out[FORGET], out[RETAIN], forget_name=FORGET, retain_name=RETAIN)
    if "retain_perturbed" in out:
        check_disjoint(out[FORGET], out["retain_perturbed"], forget_name=FORGET, retain_name="retain_perturbed")
    return out


def _dumps(rows: Any) -> str:
    return json.dumps(rows, ensure_ascii=False, sort_keys=True) + "\n"


def write_request_splits(
    splits: Mapping[str, list[dict]], out_dir: str | Path, *, request_ids: Sequence[str], forget_set_hash: str
) -> dict[str, Any]:
    """Write ``<out_dir>/<split>.json`` (canonical bytes, each file atomically) and ``manifest.json`` (last).

    The manifest records ``request_ids``, ``forget_set_hash`` and, per split,
    ``rows``/``authors``/``sha256``, so a DVC stage over ``out_dir`` changes exactly
    when the forget set does.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    for name, rows in splits.items():
        if name not in REQUEST_SPLIT_KINDS:
            raise RequestError(f"unknown request split {name!r}; expected {', '.join(REQUEST_SPLIT_KINDS)}")
        text = _dumps(rows)
        atomic_write_text(out / f"{name}.json", text)
        files[name] = {"rows": len(rows), "authors": len({r["author_id"] for r in rows}), "sha256": sha256_bytes(text.encode("utf-8"))}
    manifest = {"request_ids": sorted(request_ids), "forget_set_hash": forget_set_hash, "splits": files}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_request_splits(out_dir: str | Path) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """The splits written by :func:`write_request_splits` (sha256-checked, schema-validated) and the manifest."""
    out = Path(out_dir)
    mpath = out / MANIFEST
    if not mpath.is_file():
        raise DataError("request splits manifest not found (build the request splits first)", file=str(mpath))
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    splits: dict[str, list[dict]] = {}
    for name, info in manifest["splits"].items():
        path = out / f"{name}.json"
        data = path.read_bytes()
        if sha256_bytes(data) != info["sha256"]:
            raise DataError(f"sha256 does not match {MANIFEST}; the file changed after it was written", file=str(path))
        splits[name] = validate_rows(json.loads(data), file=str(path), kind=REQUEST_SPLIT_KINDS[name])  # type: ignore[arg-type]
    check_disjoint(splits[FORGET], splits[RETAIN], forget_name=str(out / f"{FORGET}.json"), retain_name=str(out / f"{RETAIN}.json"))
    return splits, manifest
