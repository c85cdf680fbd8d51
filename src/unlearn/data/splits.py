"""TOFU's split rule, and writing / reading the split files of the ``data`` stage.

The written files are a DVC stage output that every later stage reads, so they
are (a) byte-deterministic (sorted keys, fixed separators) so that an unchanged
source gives an unchanged hash and DVC does not re-run downstream stages, and
(b) never half-written: everything goes into a temp directory that is swapped in
only after every file is complete, and nothing at all is written for a source
that fails validation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .schema import FORGET_PCTS, IDK, SPLIT_NAMES, DataError, retain_of, split_kind, validate_idk, validate_rows, validate_splits

MANIFEST = "manifest.json"


def n_forget_authors(n_authors: int, pct: int) -> int:
    """TOFU: forgetXX covers XX% of the authors, rounded half up, at least one.

    Integer arithmetic (``floor(n*XX/100 + 0.5)``) so the rule never depends on
    float rounding.
    """
    return max(1, (2 * n_authors * pct + 100) // 200)


def author_order(rows: list[dict]) -> list[str]:
    """Author ids in order of first appearance (the order TOFU's ``full`` lists them)."""
    return list(dict.fromkeys(r["author_id"] for r in rows))


def split_by_authors(full: list[dict]) -> dict[str, list[dict]]:
    """forgetXX / retainXX / retain_perturbed *selections* of ``full`` rows by TOFU's rule.

    forgetXX = rows of the last ``n_forget_authors`` authors; retain(100-XX) its
    complement; retain_perturbed = rows of the first authors, as many as forget10
    has (TOFU: the first 20 of 200 authors = 400 rows). Rows keep full's order.
    Returns the rows as they are in ``full`` (the caller adds perturbations).
    """
    authors = author_order(full)
    out: dict[str, list[dict]] = {}
    for pct in FORGET_PCTS:
        k = n_forget_authors(len(authors), int(pct))
        forget_authors = set(authors[len(authors) - k :])
        out[f"forget{pct}"] = [r for r in full if r["author_id"] in forget_authors]
        out[retain_of(f"forget{pct}")] = [r for r in full if r["author_id"] not in forget_authors]
    first = set(authors[: n_forget_authors(len(authors), 10)])
    out["retain_perturbed"] = [r for r in full if r["author_id"] in first]
    return out


def dumps_rows(rows: Any) -> bytes:
    """The canonical bytes of a split file: one JSON array, sorted keys, UTF-8, trailing newline."""
    return (json.dumps(rows, ensure_ascii=False, indent=None, sort_keys=True) + "\n").encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_splits(splits: Mapping[str, Any], out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Validate ``splits`` and write ``<out_dir>/<split>.json``, ``idk.json`` and ``manifest.json``.

    Returns the manifest ``{split: {"rows": n, "authors": k, "sha256": hex}}``
    (``idk`` has ``authors`` 0). ``out_dir`` is replaced as a whole: files are
    written to a temp directory next to it and swapped in by rename, so readers
    see either the old complete set or the new one, and on any error (including
    a validation error, raised before anything is written) the old ``out_dir``
    is left untouched.
    """
    clean = validate_splits(splits)
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise DataError("exists and is not a directory; cannot write the splits there", file=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest: dict[str, dict[str, Any]] = {}
        for name in (*SPLIT_NAMES, IDK):
            data = dumps_rows(clean[name])
            (tmp / f"{name}.json").write_bytes(data)
            authors = 0 if name == IDK else len({r["author_id"] for r in clean[name]})
            manifest[name] = {"rows": len(clean[name]), "authors": authors, "sha256": _sha256(data)}
        (tmp / MANIFEST).write_bytes((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the output is an ordinary directory
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with renames (same filesystem), restoring ``out`` if the second rename fails."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _read_written(out_dir: str | Path, name: str) -> Any:
    """Load ``<out_dir>/<name>.json`` and check it against the manifest's sha256 when there is one."""
    path = Path(out_dir) / f"{name}.json"
    if not path.is_file():
        raise DataError("split file not found (run the data stage first: `unlearn prepare`)", file=str(path))
    data = path.read_bytes()
    manifest_path = Path(out_dir) / MANIFEST
    if manifest_path.is_file():
        try:
            expected = json.loads(manifest_path.read_text(encoding="utf-8")).get(name, {}).get("sha256")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
            raise DataError(f"unreadable manifest: {e}", file=str(manifest_path)) from None
        if expected is not None and expected != _sha256(data):
            raise DataError(
                f"sha256 {_sha256(data)[:12]}... does not match {MANIFEST} ({expected[:12]}...); the file changed after it was written",
                file=str(path),
            )
    if not data.strip():
        raise DataError("empty file: expected a JSON array of rows", file=str(path))
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start})", file=str(path)) from None
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON at line {e.lineno}, column {e.colno} (char {e.pos}): {e.msg}", file=str(path), line=e.lineno) from None


def read_split(out_dir: str | Path, name: str) -> list[dict]:
    """The validated rows of split ``name`` written by :func:`write_splits`."""
    if name == IDK:
        raise DataError("'idk' holds refusal strings, not rows; use read_idk()")
    kind = split_kind(name)
    return validate_rows(_read_written(out_dir, name), file=str(Path(out_dir) / f"{name}.json"), kind=kind)


def read_idk(out_dir: str | Path) -> list[str]:
    """The IdK refusal strings written by :func:`write_splits` (used by DPO-IdK)."""
    return validate_idk(_read_written(out_dir, IDK), file=str(Path(out_dir) / f"{IDK}.json"))


def read_splits(out_dir: str | Path) -> dict[str, Any]:
    """Every split plus ``idk``, with the cross-split checks of :func:`validate_splits` (disjointness etc.)."""
    splits: dict[str, Any] = {name: _read_written(out_dir, name) for name in SPLIT_NAMES}
    splits[IDK] = _read_written(out_dir, IDK)
    return validate_splits(splits, origin={n: str(Path(out_dir) / f"{n}.json") for n in (*SPLIT_NAMES, IDK)})
