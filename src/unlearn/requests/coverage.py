"""Which registered model versions already honour a deletion request: their forget set holds every row it names.

A request's rows are what :func:`~unlearn.requests.forget_set.forget_rows_for` matches in ``full`` (every row
of an author, or the listed row ids). A registered version honours the request when its forget set contains
all of them; it *partly* covers it when it contains some. Pure functions over version-info dicts
(:mod:`unlearn.requests.audit`); the registry lookup is the caller's (:func:`unlearn.requests.cycle.already_honoured`).

How a version records its forget set, row by row
-----------------------------------------------

Registration (:func:`unlearn.stages.register`) writes the tags ``forget_row_evidence.0``, ``.1``, ...: in
order of the index they concatenate to one JSON object ``{row_id: [prob_before, prob_after]}`` holding every
row of the forget set with its answer probability under the target model (before) and under this version
(after), read from the evaluations' per-example records (``null`` where none). It is cut into pieces because
an MLflow tag value holds at most 5000 characters. The row ids are trusted only if they hash to the version's
``forget_set_hash`` tag (:func:`~unlearn.data.splits.forget_set_hash`), so a list that was cut off or edited
never makes a version look as if it honoured rows it was not unlearned on.

A version registered before these tags existed has none; the caller may then pass the row ids it reads from
the version's forget split on disk as ``version_info["forget_row_ids"]`` (checked against the same hash), and
the per-row evidence is then unknown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..data.splits import forget_set_hash
from ..fmt import fmt_number
from .audit import TAG_FORGET_SET_HASH, TAG_REQUEST_IDS, as_version_info, parse_request_ids, request_tag
from .forget_set import forget_rows_for
from .ledger import Request

EVIDENCE_TAG = "forget_row_evidence"
"""Tag prefix: ``forget_row_evidence.<i>`` are the pieces of the forget set's per-row evidence (module docstring)."""
TAG_CHUNK = 5000
"""Characters per piece: MLflow's limit on a tag value."""


def _round(x: Any) -> float | None:
    if x is None:
        return None
    f = float(x)
    return None if math.isnan(f) else float(f"{f:.4g}")


def forget_row_evidence_tags(evidence: Mapping[str, Sequence[Any] | None], *, chunk: int = TAG_CHUNK) -> dict[str, str]:
    """The version tags recording a forget set row by row: ``{row_id: (prob_before, prob_after)}`` (None where no
    evaluation record) as JSON cut into ``forget_row_evidence.<i>`` pieces of at most ``chunk`` characters."""
    obj = {rid: [_round(p) for p in (tuple(ev) if ev is not None else (None, None))[:2]]
           for rid, ev in sorted(evidence.items())}
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return {f"{EVIDENCE_TAG}.{i}": text[j:j + chunk] for i, j in enumerate(range(0, len(text), chunk))}


def version_forget_rows(version_info: Mapping[str, Any] | Any) -> tuple[dict[str, tuple[float | None, float | None]] | None, str | None]:
    """``(rows, None)``: the version's forget-set rows ``{row_id: (prob_before, prob_after)}``, from its
    ``forget_row_evidence.*`` tags (or the caller's ``forget_row_ids``), checked against ``forget_set_hash``;
    ``(None, why)`` when the version does not say, or what it says does not hash to its forget set."""
    v = as_version_info(version_info)
    tags = v["tags"]
    prefix = EVIDENCE_TAG + "."
    pieces = {int(k[len(prefix):]): val for k, val in tags.items() if k.startswith(prefix) and k[len(prefix):].isdigit()}
    if pieces:
        if sorted(pieces) != list(range(len(pieces))):
            return None, f"its {EVIDENCE_TAG}.* tags miss a piece"
        try:
            obj = json.loads("".join(pieces[i] for i in range(len(pieces))))
        except json.JSONDecodeError:
            return None, f"its {EVIDENCE_TAG}.* tags are not valid JSON"
        if not isinstance(obj, Mapping):
            return None, f"its {EVIDENCE_TAG}.* tags are not a JSON object"
        rows = {str(k): tuple((list(ev) + [None, None])[:2]) if isinstance(ev, list) else (None, None) for k, ev in obj.items()}
    elif v.get("forget_row_ids") is not None:
        rows = {str(r): (None, None) for r in v["forget_row_ids"]}
    else:
        return None, "it was registered without its forget-set rows"
    fhash = tags.get(TAG_FORGET_SET_HASH)
    if not fhash:
        return None, f"it has no {TAG_FORGET_SET_HASH} tag"
    if forget_set_hash(list(rows)) != fhash:
        return None, f"its recorded forget-set rows do not hash to its {TAG_FORGET_SET_HASH} {fhash[:12]}"
    return rows, None


def _rank(v: Mapping[str, Any]) -> tuple:
    """Champion first (the default forget set's), then any forget set's champion, then the rest; newest first."""
    aliases = v["aliases"]
    tier = 0 if "champion" in aliases else 1 if any(a.startswith("champion-") for a in aliases) else 2
    ver = str(v.get("version"))
    return (tier, -int(ver) if ver.isdigit() else 0, ver)


def _mean(vals: Iterable[float | None]) -> float | None:
    xs = [float(x) for x in vals if x is not None]
    return sum(xs) / len(xs) if xs else None


def _metric(v: Mapping[str, Any], key: str) -> float | None:
    for src in (v["metrics"], v["tags"]):
        if src.get(key) is not None:
            try:
                return float(src[key])
            except (TypeError, ValueError):
                return None
    return None


@dataclass(frozen=True)
class VersionCoverage:
    """How much of one request's rows one registered version's forget set holds, with the evidence."""

    name: str | None
    version: str | None
    aliases: list[str]
    forget_set_hash: str | None
    forget_set_rows: int
    covered: int
    missing: list[str]
    prob_before: float | None = None   # mean answer probability of the request's rows: target model
    prob_after: float | None = None    # ... and this version
    forget_quality: float | None = None
    model_utility: float | None = None
    lists_request: bool = False        # its request_ids tag already names the request

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def label(self) -> str:
        alias = f" [{', '.join(self.aliases)}]" if self.aliases else ""
        return f"{self.name} v{self.version}{alias}"

    def evidence(self) -> dict[str, float | None]:
        """The ``request.<id>.prob_*`` values for the request (what registration records for a listed request)."""
        return {"prob_before": self.prob_before, "prob_after": self.prob_after}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Coverage:
    """A request against the registry: ``versions`` (those holding at least one of its rows, champion first)."""

    request_id: str
    rows: list[str]
    versions: list[VersionCoverage] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # "<name> vN: why its forget set is unknown"

    @property
    def honoured_by(self) -> VersionCoverage | None:
        """The first version (champion first) whose forget set holds every row of the request."""
        return next((c for c in self.versions if c.complete), None)

    @property
    def partly(self) -> VersionCoverage | None:
        """With no version holding them all: the one holding the most of its rows (champion first on a tie)."""
        if self.honoured_by is not None or not self.versions:
            return None
        return max(self.versions, key=lambda c: c.covered)  # max keeps the first of equals

    def message(self) -> str | None:
        """What the requester is told; None when no registered version holds any of its rows."""
        n = len(self.rows)
        if (c := self.honoured_by) is not None:
            return (
                f"already honoured by {c.label}: all {n} row(s) of {self.request_id} are in its forget set "
                f"({(c.forget_set_hash or '')[:12]}, {c.forget_set_rows} rows); answer prob before={fmt_number(c.prob_before)} "
                f"after={fmt_number(c.prob_after)}, forget_quality={fmt_number(c.forget_quality)} "
                f"model_utility={fmt_number(c.model_utility)}. It stays pending until the next `unlearn request run`, "
                f"which settles it as fulfilled by v{c.version} without unlearning again"
            )
        if (c := self.partly) is not None:
            shown = ", ".join(c.missing[:5]) + (f", ... ({len(c.missing)} in all)" if len(c.missing) > 5 else "")
            return (
                f"partly honoured: {c.label} holds {c.covered} of {n} row(s) of {self.request_id} in its forget set "
                f"(not: {shown}); no registered version holds them all, so it stays pending and the next "
                "`unlearn request run` unlearns it"
            )
        return None

    def note(self) -> str | None:
        """The ledger note (event detail and reason) for what :meth:`message` says, shorter."""
        if (c := self.honoured_by) is not None:
            return (f"already honoured by {c.name} v{c.version} (forget set {(c.forget_set_hash or '')[:12]} holds all "
                    f"{len(self.rows)} rows; answer prob before={fmt_number(c.prob_before)} after={fmt_number(c.prob_after)}): "
                    "the next request run settles it without unlearning")
        if (c := self.partly) is not None:
            return (f"partly honoured by {c.name} v{c.version}: {c.covered} of {len(self.rows)} rows in its forget set "
                    f"(not: {', '.join(c.missing[:5])}{' ...' if len(c.missing) > 5 else ''}); the next request run unlearns it")
        return None


def coverage(request: Request | Mapping[str, Any], full_rows: Sequence[Mapping[str, Any]],
             versions: Iterable[Mapping[str, Any] | Any]) -> Coverage:
    """``request`` against registered ``versions``: which hold all, or some, of the rows it names in ``full_rows``.

    RequestError (from :func:`forget_rows_for`) if the request no longer matches ``full_rows``. A version whose
    forget set cannot be told (:func:`version_forget_rows`) is listed in ``unchecked``, never taken as honouring.
    """
    req = request if isinstance(request, Request) else Request(**{k: request.get(k) for k in Request.__dataclass_fields__})
    if req.status == "rejected":
        return Coverage(req.request_id, [])
    rows = [r["id"] for r in forget_rows_for([req], full_rows)]
    out, unchecked = [], []
    for v in sorted((as_version_info(x) for x in versions), key=_rank):
        known, why = version_forget_rows(v)
        if known is None:
            unchecked.append(f"{v.get('name')} v{v.get('version')}: {why}")
            continue
        held = [r for r in rows if r in known]
        if not held:
            continue
        out.append(VersionCoverage(
            name=v.get("name"), version=v.get("version"), aliases=list(v["aliases"]),
            forget_set_hash=v["tags"].get(TAG_FORGET_SET_HASH), forget_set_rows=len(known), covered=len(held),
            missing=[r for r in rows if r not in known],
            prob_before=_mean(known[r][0] for r in held), prob_after=_mean(known[r][1] for r in held),
            forget_quality=_metric(v, "forget_quality"), model_utility=_metric(v, "model_utility"),
            lists_request=req.request_id in parse_request_ids(v["tags"].get(TAG_REQUEST_IDS)),
        ))
    return Coverage(req.request_id, rows, out, unchecked)


def request_evidence_tags(request_id: str, c: VersionCoverage) -> dict[str, float]:
    """The ``request.<id>.prob_before/after`` tags a settled request adds to the version that honours it."""
    return {request_tag(request_id, k): v for k, v in c.evidence().items() if v is not None}
