"""Sequential unlearning (``requests.mode: sequential``): which model a new forget set starts from, and its splits.

``union`` (the default) unlearns every accepted request from the original target, so each new request costs
an unlearning run over all of them. ``sequential`` unlearns only the **new** requests, starting from the
registered model that already honours the earlier ones (the *base*): the cost grows with the new requests alone.

The base (:func:`pick_base`) is the registered version whose ``request_ids`` cover **every** fulfilled
request of the ledger (every row of each): a version holding a ``champion`` alias first (the champion of its
forget set, or the default forget set's ``champion``), then the newest. With no fulfilled request yet there is
no base, and the first model starts from the target, as in union. If fulfilled requests exist but no registered
version covers them all (a version was deleted, or its model files are gone), there is no safe base either: the
cycle then unlearns the union from the target, and says why (:attr:`BasePlan.why`).

The base's weight files are checked against its registered ``model_weight_files`` before anything starts from
them (:func:`unlearn.requests.verify.weights_problem`): a swapped file stops the run, naming it.

What a sequential step's splits are (:func:`sequential_forget_rows`, ``build_request_splits(..., exclude_rows=)``):

* ``forget_requests``: the rows of the new (claimed) requests, minus rows the base already honours;
* ``retain_requests``: ``full`` minus every row of every author of **every accepted request**, earlier ones
  included: the retain loss must not teach an earlier request's author back.

**The reference of a sequential step is the base** (the model it starts from), not the original target. The
reference cache is keyed on the weights of the model it was computed on (:mod:`unlearn.cache`), so a new cache
is computed for the base. A method's KL / retain anchor then holds the model close to the base, which has
already forgotten the earlier requests; anchoring to the original target would pull them back. Utility is still
gated against the **original target** (``gate.min_utility_ratio``), so the loss over a chain of steps is bounded
as a whole, not step by step, and the answer probability "before" of the new rows is the target's.

Every request the model claims to honour (the base's and the new ones) is re-checked against the holdout under
the new model (:func:`unlearn.requests.evidence.request_evidence_for_model`), and a base request that fails is a
regression (:func:`unlearn.gate.request_gate`, ``earlier``): the model is refused, the request named.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .audit import TAG_REQUEST_IDS, parse_request_ids

MODES = ("union", "sequential")


@dataclass(frozen=True)
class BasePlan:
    """Where a forget set's unlearning starts. ``base`` None: from the target (``why`` says why)."""

    mode: str
    """``union`` or ``sequential`` (the configured mode; a sequential run without a base runs as union)."""
    base: dict[str, Any] | None = None
    """The base version: ``name``, ``version``, ``aliases``, ``request_ids``, ``model_dir``, ``weights_sha256``."""
    why: str = ""
    earlier: list[str] = field(default_factory=list)
    """Requests the base honours (each re-checked on the new model; a failure is a regression)."""

    @property
    def start(self) -> str | None:
        """The model directory the step starts from (None: the target)."""
        return None if self.base is None else str(self.base["model_dir"])

    @property
    def effective_mode(self) -> str:
        """``sequential`` when there is a base, else ``union`` (from the target, every accepted request)."""
        return "sequential" if self.base is not None else "union"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> BasePlan:
        if d is None:
            return cls(mode="union")
        return cls(mode=d["mode"], base=d.get("base"), why=d.get("why", ""), earlier=list(d.get("earlier") or []))


def _version_number(v: Mapping[str, Any]) -> int:
    try:
        return int(v.get("version"))
    except (TypeError, ValueError):
        return -1


def pick_base(versions: Sequence[Mapping[str, Any]],
              rows_of: Mapping[str, Iterable[str]]) -> tuple[Mapping[str, Any] | None, str]:
    """``(version info, why)``: the registered version a sequential step starts from (module docstring), or None.

    ``versions``: version-info dicts (``tags``, ``aliases``, ``version``), e.g.
    :func:`unlearn.tracking.registered_versions`. ``rows_of``: ``{request id: its row ids}`` for every fulfilled
    request of the ledger. A version qualifies when the requests it lists (``request_ids``) cover every row of
    every fulfilled request: a request settled by an older version because its rows were already forgotten
    (:mod:`unlearn.requests.coverage`) is honoured by every later version that honours those rows.
    """
    rows = {rid: set(ids) for rid, ids in rows_of.items()}
    if not rows:
        return None, "no request is fulfilled yet: the first model starts from the target"
    need = set().union(*rows.values())

    def covered(v: Mapping[str, Any]) -> set[str]:
        ids = parse_request_ids((v.get("tags") or {}).get(TAG_REQUEST_IDS))
        return set().union(*(rows[i] for i in ids if i in rows)) if any(i in rows for i in ids) else set()

    cands = [v for v in versions if need <= covered(v)]
    if not cands:
        return None, (f"no registered version honours every fulfilled request ({', '.join(sorted(rows))}): "
                      "unlearning the union of every accepted request from the target instead")

    def champion(v: Mapping[str, Any]) -> bool:
        return any(str(a).startswith("champion") for a in v.get("aliases") or ())

    best = max(cands, key=lambda v: (champion(v), _version_number(v)))
    return best, (f"starting from {best.get('name')} v{best.get('version')} ({'champion' if champion(best) else 'newest'}"
                  f"), which honours every fulfilled request ({', '.join(sorted(rows))})")


def sequential_forget_rows(new_rows: Sequence[Mapping[str, Any]],
                           base_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows a sequential step unlearns: the new requests' rows minus those the base already honours (all of
    the new rows if that leaves none: a request is never left with nothing to unlearn)."""
    done = {r["id"] for r in base_rows}
    kept = [dict(r) for r in new_rows if r["id"] not in done]
    return kept or [dict(r) for r in new_rows]
