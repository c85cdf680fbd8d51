"""The request inbox: a directory of ``*.jsonl`` files, one request per line.

Each line is a JSON object ``{"request_id", "subject_type", "subject", "received_at"?}``
(blank lines are skipped; any other key is an error, so a typo such as
``"subjet"`` is caught rather than ignored).

A file is all-or-nothing: every line is checked first; a file with a malformed
line adds *nothing*, stays in the inbox, and is reported with its file and line
numbers; the other files are still processed. A file whose lines are all well
formed is added line by line (idempotent: a request id already in the ledger is a
``duplicate``) and then moved to ``<inbox>/processed/`` by an atomic rename. A
crash between the adds and the rename only means the file is read again next
time, and every line comes back as a duplicate.

A request whose subject matches no rows is *well formed*: it is stored as
``rejected`` with the reason (that is the ledger's job), not treated as malformed.

Writers should create the file under another name (e.g. ``.tmp``) and rename it
to ``*.jsonl`` when complete, so a half-written file is never read (if one is,
its truncated last line is malformed, so it is left alone and retried).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..data.schema import DataError
from .ledger import AddResult, Ledger, RequestError, check_request_id, check_subject_type, normalize_subject, parse_received_at

LINE_KEYS = ("request_id", "subject_type", "subject", "received_at")
PROCESSED = "processed"


class InboxError(DataError):
    """One or more inbox files had malformed lines; ``errors`` locates each, ``results`` holds what was added."""

    def __init__(self, errors: list[DataError], results: list[AddResult]) -> None:
        self.errors = errors
        self.results = results
        files = sorted({e.file for e in errors if e.file})
        msg = f"{len(files)} inbox file(s) left in place because of malformed lines:\n" + "\n".join(f"  {e}" for e in errors)
        super().__init__(msg)

    def __reduce__(self):
        return (InboxError, (self.errors, self.results))


class IngestResult(list):
    """A ``list[AddResult]`` (in file, then line order) plus ``errors`` (one DataError per bad line) and ``moved``."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[DataError] = []
        self.moved: list[Path] = []


def parse_line(text: str, *, file: str, line: int) -> dict[str, Any] | None:
    """One inbox line -> the kwargs of :meth:`Ledger.add` (None for a blank line); DataError if malformed."""
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON (column {e.colno}): {e.msg}", file=file, line=line) from None
    if not isinstance(obj, Mapping):
        raise DataError(f"expected a JSON object with {', '.join(LINE_KEYS[:3])}, got {type(obj).__name__}", file=file, line=line)
    unknown = sorted(set(obj) - set(LINE_KEYS))
    if unknown:
        raise DataError(f"unknown key(s) {', '.join(unknown)}; expected {', '.join(LINE_KEYS)}", file=file, line=line)
    missing = [k for k in LINE_KEYS[:3] if k not in obj]
    if missing:
        raise DataError(f"missing key(s) {', '.join(missing)}", file=file, line=line)
    checks = (
        ("request_id", lambda: check_request_id(obj["request_id"])),
        ("subject_type", lambda: check_subject_type(obj["subject_type"])),
        ("subject", lambda: normalize_subject(obj["subject_type"], obj["subject"])),
        ("received_at", lambda: parse_received_at(obj.get("received_at"), now=datetime.now(timezone.utc))),
    )
    for field, check in checks:
        try:
            check()
        except RequestError as e:
            reason = str(e).removeprefix(f"{field}:").strip()
            raise DataError(reason, file=file, line=line, field=field) from None
    return {k: obj.get(k) for k in LINE_KEYS}


def _read_file(path: Path) -> tuple[list[dict[str, Any]], list[DataError]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return [], [DataError(f"not UTF-8 text (byte {e.start})", file=str(path))]
    entries, errors = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        try:
            entry = parse_line(line, file=str(path), line=n)
        except DataError as e:
            errors.append(e)
            continue
        if entry is not None:
            entries.append(entry)
    return entries, errors


def _move_to_processed(path: Path) -> Path:
    dest_dir = path.parent / PROCESSED
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / path.name
    if dest.exists():  # the same file name was dropped again: keep both
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        dest = dest_dir / f"{path.stem}.{stamp}{path.suffix}"
    os.rename(path, dest)
    return dest


def ingest_inbox(
    ledger: Ledger,
    inbox_dir: str | Path,
    known_rows: Sequence[Mapping[str, Any]],
    *,
    source: str = "the known rows",
    strict: bool = True,
) -> IngestResult:
    """Add the requests of every ``<inbox_dir>/*.jsonl`` (sorted by name) to ``ledger``; see the module doc.

    Returns the AddResults (``added`` / ``duplicate`` / ``rejected``). Files with
    malformed lines are left in place; after every other file is processed,
    ``strict=True`` raises :class:`InboxError` (carrying ``errors`` and ``results``),
    ``strict=False`` returns with the problems in ``result.errors`` (for a scheduled
    flow that must not be blocked by one bad file). A missing inbox is an empty one.
    """
    inbox = Path(inbox_dir)
    out = IngestResult()
    if not inbox.is_dir():
        return out
    for path in sorted(p for p in inbox.glob("*.jsonl") if p.is_file()):
        entries, errors = _read_file(path)
        if errors:
            out.errors.extend(errors)
            continue
        for e in entries:
            out.append(ledger.add(e["request_id"], e["subject_type"], e["subject"], e["received_at"], known_rows=known_rows, source=source))
        out.moved.append(_move_to_processed(path))
    if out.errors and strict:
        raise InboxError(out.errors, list(out))
    return out
