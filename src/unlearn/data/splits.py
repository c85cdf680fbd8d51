"""TOFU's split rule, and the one format of a split directory: its writer, its reader and its manifest.

A split directory holds ``<split>.json`` files (one JSON array of rows each;
``idk.json`` the refusal strings) and ``manifest.json``. The benchmark splits of
the ``data`` stage and the splits built from deletion requests are the same
format, written by :func:`write_splits` and read by :func:`read_split_dir`
(:func:`read_split` / :func:`read_idk` for one file), so no consumer needs to
know which kind of directory it reads. The manifest is flat, one entry per
split::

    {"<split>": {"rows": int, "authors": int, "sha256": hex of the file's bytes,  # authors: TOFU's splits only
                 "forget_set_hash": hex,    # forget splits (forget01/05/10, forget_requests, MUSE's fold1..4) only
                 "request_ids": [id, ...]}}  # splits built from deletion requests only: on forget_requests

``forget_set_hash`` is :func:`forget_set_hash` of the split's rows, the identity
of "what was forgotten" that the ledger and the model registry record; the
sha256 of every file is checked on every read, so a file changed after it was
written is an error, not silently different data.

A MUSE dataset (split names of :data:`~unlearn.data.names.MUSE_SPLIT_NAMES`:
articles, continuation prompts, plain QA, none with an author) is written and read
the same way; its names select MUSE's rules
(:func:`~unlearn.data.schema.validate_muse_split_set`) instead of TOFU's.

The written files are a DVC output that every later stage reads, so they are
(a) byte-deterministic (sorted keys, fixed separators) so that an unchanged
source gives an unchanged hash and DVC does not re-run downstream stages, and
(b) never half-written: everything goes into a temp directory that is swapped in
only after every file is complete, and nothing at all is written for splits
that fail validation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .names import (
    FORGET_PCTS,
    FORGET_REQUESTS,
    FORGET_SPLITS,
    IDK,
    MUSE_FOLDS,
    MUSE_SPLIT_NAMES,
    REQUEST_SPLIT_NAMES,
    REQUIRED_REQUEST_SPLITS,
    RETAIN_PERTURBED,
    TOFU_FORGET_SPLITS,
    retain_of,
)
from .schema import DataError, split_kind, validate_idk, validate_rows, validate_split_set, validate_splits
from .schema import MUSE_MAY_BE_EMPTY, MUSE_ROW_KEYS, validate_muse_split_set, validate_muse_splits

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
    for pct, forget in zip(FORGET_PCTS, TOFU_FORGET_SPLITS):
        k = n_forget_authors(len(authors), int(pct))
        forget_authors = set(authors[len(authors) - k :])
        out[forget] = [r for r in full if r["author_id"] in forget_authors]
        out[retain_of(forget)] = [r for r in full if r["author_id"] not in forget_authors]
    first = set(authors[: n_forget_authors(len(authors), 10)])
    out[RETAIN_PERTURBED] = [r for r in full if r["author_id"] in first]
    return out


def dumps_rows(rows: Any) -> bytes:
    """The canonical bytes of a split file: one JSON array, sorted keys, UTF-8, trailing newline."""
    return (json.dumps(rows, ensure_ascii=False, indent=None, sort_keys=True) + "\n").encode("utf-8")


def forget_set_hash(rows: Iterable[Mapping[str, Any] | str]) -> str:
    """sha256 (hex) of the sorted, unique row ids joined by ``\\n`` (UTF-8): independent of order and duplicates.

    Accepts rows (dicts with ``id``) or bare ids. The empty set hashes the empty string.
    It is the identity of a forget set wherever one is recorded: the manifest's
    forget splits, the ledger (``mark_fulfilled``) and the registered model version.
    """
    ids = sorted({r if isinstance(r, str) else r["id"] for r in rows})
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entry(name: str, value: list, data: bytes, request_ids: Sequence[str] | None) -> dict[str, Any]:
    """The manifest entry of split ``name`` (see the module docstring) for its validated ``value`` and file bytes."""
    entry: dict[str, Any] = {"rows": len(value), "sha256": _sha256(data)}
    if name == IDK or split_kind(name) not in MUSE_ROW_KEYS:  # MUSE's rows have no author
        entry["authors"] = 0 if name == IDK else len({r["author_id"] for r in value})
    if name in FORGET_SPLITS or name in MUSE_FOLDS:
        entry["forget_set_hash"] = forget_set_hash(value)
        if request_ids is not None:
            entry["request_ids"] = sorted(request_ids)
    return entry


def write_splits(
    splits: Mapping[str, Any], out_dir: str | Path, *, request_ids: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Validate ``splits`` and write ``<out_dir>/<split>.json`` for each, plus ``manifest.json``: the one writer.

    Without ``request_ids``, ``splits`` is the benchmark dataset: every split of
    :data:`~unlearn.data.names.SPLIT_NAMES` plus ``idk``, checked by
    :func:`~unlearn.data.schema.validate_splits`. With ``request_ids`` (the
    requests whose rows make up the forget set) it is a request split set:
    ``forget_requests`` and ``retain_requests`` plus any of
    :data:`~unlearn.data.names.REQUEST_SPLIT_NAMES`, and ``request_ids`` is
    recorded on the ``forget_requests`` entry. A dataset with MUSE's split names is
    a MUSE dataset: every split of :data:`~unlearn.data.names.MUSE_SPLIT_NAMES`,
    checked by :func:`~unlearn.data.schema.validate_muse_splits`.

    Returns the manifest (see the module docstring). ``out_dir`` is replaced as
    a whole: files are written to a temp directory next to it and swapped in by
    rename, so readers see either the old complete set or the new one, and on
    any error (including a validation error, raised before anything is written)
    the old ``out_dir`` is left untouched.
    """
    if request_ids is None:
        clean = validate_muse_splits(splits) if _is_muse(splits) else validate_splits(splits)
    else:
        clean = validate_split_set(splits, allowed=REQUEST_SPLIT_NAMES, required=REQUIRED_REQUEST_SPLITS)
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise DataError("exists and is not a directory; cannot write the splits there", file=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest: dict[str, dict[str, Any]] = {}
        for name, value in clean.items():
            data = dumps_rows(value)
            (tmp / f"{name}.json").write_bytes(data)
            manifest[name] = _entry(name, value, data, request_ids)
        (tmp / MANIFEST).write_bytes((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the output is an ordinary directory
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _is_muse(names: Iterable[str]) -> bool:
    """Whether a set of split names is (part of) a MUSE dataset: any MUSE name makes it one (mixed sets then fail its rules)."""
    return any(n in MUSE_SPLIT_NAMES for n in names)


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


# --- reading ----------------------------------------------------------------------------------------


class SplitFileError(DataError):
    """A split file that cannot be read as written; ``check`` says which check failed.

    ``split_exists`` (no such file), ``file_matches_manifest_sha256`` (changed
    after it was written; ``observed`` is the start of its actual sha256) or
    ``file_is_json`` (empty, not UTF-8, not JSON). The validation gate reports
    these as failures of the same names instead of raising.
    """

    def __init__(self, message: str, *, file: str, check: str, line: int | None = None, observed: str | None = None) -> None:
        self.check = check
        self.observed = observed
        super().__init__(message, file=file, line=line)

    def __reduce__(self):  # picklable despite keyword-only args (see DataError.__reduce__)
        return (_rebuild_split_file_error, (self.reason, self.file, self.check, self.line, self.observed))


def _rebuild_split_file_error(message: str, file: str, check: str, line: int | None, observed: str | None) -> SplitFileError:
    return SplitFileError(message, file=file, check=check, line=line, observed=observed)


def _legacy_request_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The flat manifest equivalent to the nested one request splits used to have (``{"splits": {...}, ...}``).

    Request split directories are versioned (``dvc add``) and referenced by
    registered models, so the ones written before the formats were merged stay readable.
    """
    flat = {name: dict(entry) for name, entry in manifest["splits"].items()}
    if isinstance(flat.get(FORGET_REQUESTS), dict):
        for key in ("forget_set_hash", "request_ids"):
            if key in manifest:
                flat[FORGET_REQUESTS][key] = manifest[key]
    return flat


def _load_manifest(out_dir: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest of ``out_dir`` (None when there is none); DataError when it is not one."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"unreadable manifest: {e}", file=str(path)) from None
    if isinstance(manifest, dict) and isinstance(manifest.get("splits"), dict):
        manifest = _legacy_request_manifest(manifest)
    if not isinstance(manifest, dict):
        raise DataError(f"expected a JSON object {{split: {{rows, authors, sha256}}}}, got a JSON {type(manifest).__name__}", file=str(path))
    for name, entry in manifest.items():
        if not isinstance(entry, dict):
            raise DataError(f"expected an object {{rows, authors, sha256}}, got a JSON {type(entry).__name__}", file=str(path), field=name)
    return manifest


def read_manifest(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The manifest written by :func:`write_splits` in ``out_dir``; FileNotFoundError when the splits are not written yet."""
    out = Path(out_dir)
    manifest = _load_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"no splits in {out} ({MANIFEST} missing): run `unlearn prepare` (or `dvc repro prepare`) first")
    return manifest


def load_split_file(out_dir: str | Path, name: str, manifest: Mapping[str, Mapping[str, Any]] | None) -> Any:
    """The JSON value of ``<out_dir>/<name>.json``, checked against ``manifest``'s sha256 for it when there is one.

    The one place a split file is read (the readers below and the validation
    gate). Not schema-checked: that is the caller's, by the split's kind.
    Problems are :class:`SplitFileError`.
    """
    path = Path(out_dir) / f"{name}.json"
    if not path.is_file():
        raise SplitFileError("split file not found (run the data stage first: `unlearn prepare`)", file=str(path), check="split_exists")
    data = path.read_bytes()
    expected = (manifest or {}).get(name, {}).get("sha256")
    if expected is not None and expected != _sha256(data):
        raise SplitFileError(
            f"sha256 {_sha256(data)[:12]}... does not match {MANIFEST} ({expected[:12]}...); the file changed after it was written",
            file=str(path), check="file_matches_manifest_sha256", observed=_sha256(data)[:12],
        )
    if not data.strip():
        raise SplitFileError("empty file: expected a JSON array of rows", file=str(path), check="file_is_json")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SplitFileError(f"not UTF-8 text (byte {e.start})", file=str(path), check="file_is_json") from None
    except json.JSONDecodeError as e:
        raise SplitFileError(
            f"malformed JSON at line {e.lineno}, column {e.colno} (char {e.pos}): {e.msg}", file=str(path), line=e.lineno, check="file_is_json"
        ) from None


def read_split_dir(out_dir: str | Path, names: Sequence[str] | None = None) -> dict[str, Any]:
    """The validated splits ``names`` (default: every split the manifest lists, ``idk`` included) of ``out_dir``: the one reader.

    Benchmark and request split directories read the same. Each file is
    sha256-checked against the manifest and schema-checked by its kind; the
    cross-split rules of :func:`~unlearn.data.schema.validate_split_set` whose
    splits are among ``names`` are checked too (forget/retain disjoint, ...; all
    of them for the whole benchmark dataset). Returns ``{name: rows}`` in the
    order of ``names`` (``idk``: its refusal strings). A name the manifest does
    not list is a FileNotFoundError naming the splits it does list.
    """
    out = Path(out_dir)
    manifest = read_manifest(out)
    wanted = list(manifest) if names is None else list(names)
    for name in wanted:
        if name != IDK:
            split_kind(name)  # an unknown name is a DataError naming the known ones
    missing = [n for n in wanted if n not in manifest]
    if missing:
        raise FileNotFoundError(f"{out} has no split(s) {', '.join(missing)} ({MANIFEST} lists: {', '.join(manifest)})")
    raw = {name: load_split_file(out, name, manifest) for name in wanted}
    validate = validate_muse_split_set if _is_muse(wanted) else validate_split_set
    clean = validate(raw, origin={name: str(out / f"{name}.json") for name in wanted})
    return {name: clean[name] for name in wanted}


def read_split(out_dir: str | Path, name: str) -> list[dict]:
    """The validated rows of split ``name`` written by :func:`write_splits`.

    Unlike :func:`read_split_dir` this reads a directory without a manifest too
    (a hand-made fixture directory); the sha256 is checked whenever the manifest lists the file.
    """
    if name == IDK:
        raise DataError("'idk' holds refusal strings, not rows; use read_idk()")
    kind = split_kind(name)
    out = Path(out_dir)
    return validate_rows(load_split_file(out, name, _load_manifest(out)), file=str(out / f"{name}.json"), kind=kind,
                         allow_empty=name in MUSE_MAY_BE_EMPTY)


def read_idk(out_dir: str | Path) -> list[str]:
    """The IdK refusal strings written by :func:`write_splits` (used by DPO-IdK)."""
    out = Path(out_dir)
    return validate_idk(load_split_file(out, IDK, _load_manifest(out)), file=str(out / f"{IDK}.json"))
