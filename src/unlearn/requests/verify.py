"""``unlearn audit --verify``: recompute what the audit trail claims and name whatever no longer matches.

Three things are checked, each against what was recorded when it was written:

* **the ledger** (:meth:`unlearn.requests.ledger.Ledger.verify`): the hash chain of its events, each request row
  against the state its last event recorded, the stored chain head;
* **every registered version's model files**: the sha256 of each weight file against the version's
  ``model_weight_files`` tag (``[[file name, sha256], ...]``; the combined ``model_weights_sha256`` for a
  version registered before that tag), so a swapped file is named;
* **every registered version's forget set**: its recorded rows (``forget_row_evidence.*``) and its forget split
  on disk (``params.data.out_dir`` / ``params.data.forget_split``, when the file is still there) must hash to its
  ``forget_set_hash``, and so must the hash the ledger recorded for the requests it fulfilled; its
  ``ledger_chain_head`` must be an event of the ledger's chain (a chain rewritten after it was registered is not).

Pure over the ledger and version-info dicts (:mod:`unlearn.requests.audit`); where a version's files are is the
caller's (``model_files(version_info) -> directory | None``, :func:`unlearn.tracking.version_model_dir`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.splits import forget_set_hash
from ..io import read_json, sha256_file
from .audit import TAG_FORGET_SET_HASH, as_version_info
from .coverage import EVIDENCE_TAG, version_forget_rows
from .ledger import ChainReport, Ledger

TAG_WEIGHTS = "model_weights_sha256"
TAG_WEIGHT_FILES = "model_weight_files"
TAG_CHAIN_HEAD = "ledger_chain_head"


def weight_files(model_dir: str | Path) -> list[list[str]]:
    """``[[file name, sha256], ...]`` of a saved model's weight files (``*.safetensors`` then ``*.bin``), as
    :func:`unlearn.models.build.weights_hash` hashes them."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin"))
    return [[f.name, sha256_file(f)] for f in files]


@dataclass
class VerifyReport:
    """Every check made (``checked``: one line each) and every mismatch (``problems``: each names what it is)."""

    ledger: ChainReport
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.ledger.ok and not self.problems

    def render(self) -> str:
        lines = [self.ledger.render()]
        lines += [f"  ok   {c}" for c in self.checked]
        lines += [f"  FAIL {p}" for p in self.problems]
        n = len(self.ledger.problems) + len(self.problems)
        lines.append("verify: OK" if self.ok else f"verify: FAILED ({n} problem(s))")
        return "\n".join(lines)


def _label(v: Mapping[str, Any]) -> str:
    return f"{v.get('name')} v{v.get('version')}"


def _check_weights(v: Mapping[str, Any], model_dir: Path | None, rep: VerifyReport) -> None:
    tags = v["tags"]
    recorded = tags.get(TAG_WEIGHT_FILES)
    combined = tags.get(TAG_WEIGHTS)
    if not recorded and not combined:
        rep.checked.append(f"{_label(v)}: no weights hash recorded (registered before it was): not checked")
        return
    if model_dir is None or not Path(model_dir).is_dir():
        rep.problems.append(f"swapped weight file: {_label(v)}: its registered model files are missing ({model_dir})")
        return
    now = weight_files(model_dir)
    if recorded:
        want = {name: sha for name, sha in json.loads(recorded)}
        have = dict((name, sha) for name, sha in now)
        bad = [f"{n} has sha256 {have[n][:12]}, registered {want[n][:12]}" for n in sorted(want) if n in have and have[n] != want[n]]
        bad += [f"{n} is missing" for n in sorted(set(want) - set(have))]
        bad += [f"{n} was added" for n in sorted(set(have) - set(want))]
        if bad:
            rep.problems.append(f"swapped weight file: {_label(v)} ({model_dir}): " + "; ".join(bad))
            return
    if combined:
        from ..io import stable_hash

        got = stable_hash(now) if now else None
        if got != combined:
            rep.problems.append(f"swapped weight file: {_label(v)} ({model_dir}): the weights hash {str(got)[:12]} is "
                                f"not the registered {TAG_WEIGHTS} {combined[:12]}")
            return
    rep.checked.append(f"{_label(v)}: {len(now)} weight file(s) match the registered sha256 "
                       f"({str(combined or '')[:12]})")


def weights_problem(v: Mapping[str, Any], model_dir: Path | None) -> str | None:
    """Why the model files at ``model_dir`` are not the weights version ``v`` was registered with (the same check
    as ``audit --verify``), or None when they match or no hash was recorded. A sequential step
    (:mod:`unlearn.requests.sequential`) runs it before starting from a registered version."""
    rep = VerifyReport(ledger=None)  # type: ignore[arg-type]  # only its problems are read
    _check_weights(v, model_dir, rep)
    return rep.problems[0] if rep.problems else None


def _check_forget_set(v: Mapping[str, Any], ledger: Ledger, rep: VerifyReport) -> None:
    tags = v["tags"]
    fhash = tags.get(TAG_FORGET_SET_HASH)
    if not fhash:
        rep.checked.append(f"{_label(v)}: no forget_set_hash: not checked")
        return
    said = []
    if any(k.startswith(EVIDENCE_TAG + ".") for k in tags):
        rows, why = version_forget_rows(v)
        if rows is None:
            rep.problems.append(f"forget set: {_label(v)}: {why} (its recorded rows do not give forget_set_hash "
                                f"{fhash[:12]})")
            return
        said.append(f"{len(rows)} recorded rows")
    out_dir, split = tags.get("params.data.out_dir"), tags.get("params.data.forget_split")
    path = Path(out_dir) / f"{split}.json" if out_dir and split else None
    if path is not None and path.is_file():
        got = forget_set_hash(read_json(path))
        if got != fhash:
            rep.problems.append(f"forget set: {_label(v)}: its forget split {path} hashes to {got[:12]}, not the "
                                f"registered forget_set_hash {fhash[:12]}: the file was changed")
            return
        said.append(str(path))
    for r in ledger.by_status("fulfilled"):
        if (r.model_name, r.model_version) == (v.get("name"), v.get("version")) and r.forget_set_hash != fhash:
            rep.problems.append(f"forget set: {_label(v)}: the ledger says it fulfilled {r.request_id} on forget set "
                                f"{str(r.forget_set_hash)[:12]}, the version's is {fhash[:12]}")
            return
    rep.checked.append(f"{_label(v)}: forget set {fhash[:12]} matches " + (" and ".join(said) or "the ledger"))


def _check_anchor(v: Mapping[str, Any], chain: ChainReport, rep: VerifyReport) -> None:
    head = v["tags"].get(TAG_CHAIN_HEAD)
    if not head:
        return
    if head not in chain.hashes:
        rep.problems.append(f"ledger rewritten: {_label(v)} was registered at chain head {head[:12]}, which is no "
                            "event of the ledger's chain now: events it saw were deleted or rewritten")
    else:
        rep.checked.append(f"{_label(v)}: its ledger chain head {head[:12]} is in the chain")


def verify_store(ledger: Ledger, versions: Iterable[Mapping[str, Any]], *,
                 model_files: Callable[[dict[str, Any]], Path | None]) -> VerifyReport:
    """The ledger's chain, then each version's weights, forget set and chain anchor (module docstring)."""
    rep = VerifyReport(ledger=ledger.verify())
    for raw in versions:
        v = as_version_info(raw)
        _check_weights(v, model_files(v), rep)
        _check_forget_set(v, ledger, rep)
        _check_anchor(v, rep.ledger, rep)
    return rep
