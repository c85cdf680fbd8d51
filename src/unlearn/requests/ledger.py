"""The deletion-request ledger: every request, its status, and an append-only audit trail.

Two tables (SQLAlchemy Core, any SQLAlchemy URL; SQLite by default):

``deletion_requests``
    one row per request id: ``subject_type`` (``author`` | ``rows``), ``subject``
    (author id or name; for rows a JSON list of row ids), ``received_at`` (UTC ISO),
    ``status`` (``pending`` | ``in_progress`` | ``fulfilled`` | ``rejected``),
    ``reason`` (why it was rejected, or the last failure while pending),
    ``model_name`` / ``model_version`` (the registered version that fulfilled it),
    ``forget_set_hash`` (of the forget set that model was unlearned on), ``updated_at``.
``request_events``
    append-only: ``(event_id, request_id, at, from_status, to_status, detail, row_hash, prev_hash, event_hash)``.
    Every insert and every status change writes exactly one event, in the same
    transaction as the change; so does a note (:meth:`Ledger.note`: a finding, such as
    "already honoured by a registered version", with from and to status the same).
    Nothing ever updates or deletes an event.
``ledger_meta``
    ``(key, value)``: ``chain_head`` (the last event's hash), and for a ledger created before the hash chain,
    ``chain_migrated_at`` / ``chain_migrated_events``.

The hash chain (tamper evidence)
--------------------------------
Every event carries ``row_hash`` (:func:`row_digest` of its request's row just after the change),
``prev_hash`` (the previous event's ``event_hash``; :data:`GENESIS` for the first) and ``event_hash``
(:func:`event_digest` of its own fields and ``prev_hash``). ``prev_hash`` is unique, so two writers cannot
fork the chain (the second insert fails and its transaction rolls back). :meth:`Ledger.verify` recomputes it
all and names an edited event, a deleted event, an edited or deleted request row. Registered model versions
carry the head (tag ``ledger_chain_head``), so a chain rewritten from scratch no longer contains them.
A ledger written before the chain existed is migrated when it is opened: its events are hashed as they are
then, and ``verify`` says that edits made before the migration cannot be detected.

Status machine (anything else raises :class:`TransitionError`, nothing changes)::

    add ──> pending ──mark_in_progress──> in_progress ──mark_fulfilled──> fulfilled
      │        ^  │                          │  │  └──mark_gate_failed, max_attempts reached──> needs_attention
      │        │  └──reject──> rejected      │  └──mark_failed / mark_gate_failed / recover_stale──> pending
      │        └──────────── retry ──────────────────────────────────────────── needs_attention ──reject──> rejected
      └──> rejected (subject matches no rows)

Every transition call is one transaction over all the ids it is given: either
every id moves (and gets its event) or none does. Each UPDATE is also guarded by
``WHERE status = <the status just read>``, so two processes racing on the same
request cannot both move it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from ..config import Params, RequestsCfg  # RequestsCfg is re-exported: it lives with the other sections
from ..errors import UserError

log = logging.getLogger("unlearn.requests")

SubjectType = Literal["author", "rows"]
Status = Literal["pending", "in_progress", "fulfilled", "rejected", "needs_attention"]
SUBJECT_TYPES: tuple[str, ...] = ("author", "rows")
STATUSES: tuple[str, ...] = ("pending", "in_progress", "fulfilled", "rejected", "needs_attention")
ACCEPTED: tuple[str, ...] = ("pending", "in_progress", "fulfilled")
"""Statuses whose rows belong in every forget set from now on (a fulfilled request stays honoured)."""

DEFAULT_LEDGER_PATH = "data/requests/ledger.db"
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}$")
"""Request ids: no whitespace and no commas, because MLflow's ``request_ids`` tag is a comma-separated list."""
NAME_SHARE = 0.25
"""An author name resolves to the authors whose rows mention it in at least this share of their rows."""


class RequestError(UserError):
    """A request that cannot be recorded as given (bad id, bad subject type, unparsable date)."""


class TransitionError(RequestError):
    """A status change the state machine does not allow (or an unknown request id); nothing was changed."""


# --------------------------------------------------------------------------- settings
def requests_settings(p: Params) -> RequestsCfg:
    """The ``requests:`` section of ``p``: validated, with its defaults, when ``p`` was loaded.

    Kept so that callers keep one name for "the request settings"; a bad key
    (``requests.inbx``) or cron expression is a ``ConfigError`` from ``load_params`` itself.
    """
    return p.requests


# --------------------------------------------------------------------------- schema
metadata = sa.MetaData()

requests_table = sa.Table(
    "deletion_requests",
    metadata,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("subject_type", sa.String(16), nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("received_at", sa.String(40), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("reason", sa.Text),
    sa.Column("model_name", sa.String(256)),
    sa.Column("model_version", sa.String(64)),
    sa.Column("forget_set_hash", sa.String(64)),
    sa.Column("updated_at", sa.String(40), nullable=False),
    sa.CheckConstraint("subject_type IN ('author', 'rows')", name="ck_deletion_requests_subject_type"),
    sa.CheckConstraint("status IN ('pending', 'in_progress', 'fulfilled', 'rejected', 'needs_attention')",
                       name="ck_deletion_requests_status"),
)

events_table = sa.Table(
    "request_events",
    metadata,
    sa.Column("event_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(128), sa.ForeignKey("deletion_requests.request_id"), nullable=False, index=True),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("from_status", sa.String(16)),
    sa.Column("to_status", sa.String(16), nullable=False),
    sa.Column("detail", sa.Text),
    sa.Column("row_hash", sa.String(64)),
    sa.Column("prev_hash", sa.String(64)),
    sa.Column("event_hash", sa.String(64)),
    sa.Index("ux_request_events_prev_hash", "prev_hash", unique=True),
)

meta_table = sa.Table(
    "ledger_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text),
)

GATE_FAILED_PREFIX = "gate failed"
"""Detail of the event of a gate failure (:meth:`Ledger.mark_gate_failed`): what :meth:`Ledger.gate_attempts` counts."""
RETRY_PREFIX = "retry:"
"""Detail of the event of :meth:`Ledger.retry`: the gate attempts are counted from there."""
GENESIS = "0" * 64
"""``prev_hash`` of the first event of a chain."""
CHAIN_HEAD = "chain_head"
CHAIN_FIELDS = ("request_id", "at", "from_status", "to_status", "detail", "row_hash", "prev_hash")
"""What an event's hash covers, in this order (its ``event_id`` is not covered: the links give the order)."""


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Request:
    """One row of ``deletion_requests``."""

    request_id: str
    subject_type: str
    subject: str
    received_at: str
    status: str
    reason: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    forget_set_hash: str | None = None
    updated_at: str | None = None

    @property
    def row_ids(self) -> list[str] | None:
        """The row ids of a ``rows`` request (None for an author request)."""
        return json.loads(self.subject) if self.subject_type == "rows" else None

    @property
    def accepted(self) -> bool:
        return self.status in ACCEPTED

    def describe(self) -> str:
        """``author 'Leila Abdi'`` / ``rows syn-a000-q00, syn-a000-q01 (+3 more)``."""
        if self.subject_type == "author":
            return f"author {self.subject!r}"
        ids = self.row_ids or []
        head = ", ".join(ids[:3])
        return f"rows {head}" + (f" (+{len(ids) - 3} more)" if len(ids) > 3 else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ChainReport:
    """What :meth:`Ledger.verify` found: ``problems`` (empty when ``ok``), each naming the event or request."""

    ok: bool
    events: int
    requests: int
    head: str
    problems: list[str]
    migrated: str | None = None
    hashes: frozenset[str] = frozenset()

    def render(self) -> str:
        lines = [f"ledger: {self.events} event(s) over {self.requests} request(s), chain head {self.head[:12]}: "
                 + ("OK" if self.ok else f"{len(self.problems)} problem(s)")]
        lines += [f"  FAIL {p}" for p in self.problems]
        if self.migrated:
            lines.append(f"  note: {self.migrated}")
        return "\n".join(lines)


@dataclass(frozen=True)
class AddResult:
    status: Literal["added", "duplicate", "rejected"]
    request: Request


@dataclass(frozen=True)
class Match:
    """What a subject resolves to in a set of rows: the rows (full's order), or why none."""

    rows: list[dict]
    reason: str | None
    detail: str


# --------------------------------------------------------------------------- validation helpers
def utc_iso(dt: datetime) -> str:
    """Fixed-width UTC ISO-8601 (microseconds, ``+00:00``): sorts as text, round-trips through fromisoformat."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds")


def parse_received_at(value: str | datetime | None, *, now: datetime) -> str:
    """``received_at`` as UTC ISO; None -> now; naive times are taken as UTC."""
    if value is None:
        return utc_iso(now)
    if isinstance(value, datetime):
        return utc_iso(value)
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"received_at: expected an ISO-8601 date/time string, got {value!r}")
    try:
        return utc_iso(datetime.fromisoformat(value.strip()))
    except ValueError:
        raise RequestError(f"received_at: {value!r} is not an ISO-8601 date/time (e.g. 2024-05-01T12:00:00Z)") from None


def check_request_id(request_id: Any) -> str:
    if not isinstance(request_id, str) or not REQUEST_ID_RE.match(request_id):
        raise RequestError(
            f"request_id: {request_id!r} is not a valid id (1-128 characters: letters, digits and . _ : @ / + -, "
            "starting with a letter or digit; no spaces or commas)"
        )
    return request_id


def check_subject_type(subject_type: Any) -> str:
    if subject_type not in SUBJECT_TYPES:
        raise RequestError(f"subject_type: expected 'author' or 'rows', got {subject_type!r}")
    return subject_type


def normalize_subject(subject_type: str, subject: Any) -> str:
    """The subject as stored: the stripped author id/name, or a JSON list of unique row ids (given order).

    A ``rows`` subject may be a list of ids, a JSON list string or a comma-separated string.
    """
    check_subject_type(subject_type)
    if subject_type == "author":
        if not isinstance(subject, str) or not subject.strip():
            raise RequestError(f"subject: an author request needs a non-empty author id or name, got {subject!r}")
        return " ".join(subject.split())
    ids = subject
    if isinstance(subject, str):
        text = subject.strip()
        if text.startswith("["):
            try:
                ids = json.loads(text)
            except json.JSONDecodeError as e:
                raise RequestError(f"subject: not a valid JSON list of row ids: {e.msg}") from None
        else:
            ids = [s.strip() for s in text.split(",") if s.strip()]
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, str) and i.strip() for i in ids):
        raise RequestError(f"subject: a rows request needs a list of row ids (strings), got {subject!r}")
    return json.dumps(list(dict.fromkeys(i.strip() for i in ids)))


def _first(items: Iterable[str], n: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _name_pattern(name: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, name.split())) + r"(?!\w)", re.IGNORECASE)


def match_subject(subject_type: str, subject: Any, rows: Sequence[Mapping[str, Any]], *, source: str = "the known rows") -> Match:
    """Resolve a subject against ``rows`` (the full split).

    * ``author``: an exact ``author_id`` wins; otherwise the subject is taken as the
      author's *name*: it must appear (case-insensitive, whole words) in the question
      or answer of that author's rows, in at least :data:`NAME_SHARE` of them, and
      that must single out exactly one author. The match is *every* row of that
      author (also the rows that do not spell the name out).
    * ``rows``: every id must be a row of ``rows``; any unknown id rejects the whole
      request, naming the unknown ids (a partial deletion would be a silent one).
    """
    stored = normalize_subject(subject_type, subject)
    if subject_type == "rows":
        wanted = json.loads(stored)
        if not wanted:
            return Match([], "rows subject lists no row ids", "")
        known = {r["id"] for r in rows}
        unknown = [i for i in wanted if i not in known]
        if unknown:
            return Match(
                [],
                f"rows subject names {len(unknown)} row id(s) not in {source}: {_first(unknown)}; "
                "resubmit with existing ids only",
                "",
            )
        want = set(wanted)
        return Match([r for r in rows if r["id"] in want], None, f"{len(want)} row(s)")

    authors: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        authors.setdefault(r["author_id"], []).append(r)
    if stored in authors:
        return Match([dict(r) for r in authors[stored]], None, f"author id {stored}: {len(authors[stored])} row(s)")
    pattern = _name_pattern(stored)
    hits = {a: sum(1 for r in rs if pattern.search(r["question"]) or pattern.search(r["answer"])) for a, rs in authors.items()}
    mentioned = [a for a, n in hits.items() if n]
    if not mentioned:
        return Match(
            [],
            f"author {stored!r} matches no rows in {source}: it is neither an author_id nor a name found in any "
            f"question/answer (known authors: {_first(authors)})",
            "",
        )
    strong = [a for a in mentioned if hits[a] >= NAME_SHARE * len(authors[a])]
    if len(strong) != 1:
        cands = strong or mentioned
        return Match(
            [],
            f"author {stored!r} is ambiguous in {source}: the name appears in the rows of {len(cands)} authors "
            f"({_first(cands)}); give the author_id or the full name",
            "",
        )
    a = strong[0]
    return Match([dict(r) for r in authors[a]], None, f"author name {stored!r} -> author id {a}: {len(authors[a])} row(s)")


# --------------------------------------------------------------------------- the ledger
def _engine_for(url: str) -> sa.Engine:
    u = sa.make_url(url)
    kwargs: dict[str, Any] = {}
    if u.get_backend_name() == "sqlite":
        db = u.database
        if db in (None, "", ":memory:"):
            from sqlalchemy.pool import StaticPool

            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        elif not db.startswith("file:"):
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
    return sa.create_engine(u, **kwargs)


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def row_digest(row: Mapping[str, Any]) -> str:
    """sha256 of a ``deletion_requests`` row (every column, canonical JSON)."""
    return hashlib.sha256(_canon({c.name: row.get(c.name) for c in requests_table.columns})).hexdigest()


def event_digest(ev: Mapping[str, Any]) -> str:
    """sha256 of an event's :data:`CHAIN_FIELDS` (canonical JSON): its ``event_hash``."""
    return hashlib.sha256(_canon([ev.get(k) for k in CHAIN_FIELDS])).hexdigest()


def _head(conn: sa.Connection) -> str:
    last = conn.execute(sa.select(events_table.c.event_hash).order_by(events_table.c.event_id.desc()).limit(1)).scalar()
    return last or GENESIS


def _set_meta(conn: sa.Connection, key: str, value: str) -> None:
    if conn.execute(meta_table.update().where(meta_table.c.key == key).values(value=value)).rowcount == 0:
        conn.execute(meta_table.insert().values(key=key, value=value))


def _insert_event(conn: sa.Connection, request_id: str, at: str, from_status: str | None, to_status: str, detail: str | None) -> None:
    """Append one event, chained: called in the transaction that changed the request, after the change (so the
    database's write lock is already held, and the row hashed is the new one)."""
    row = conn.execute(sa.select(requests_table).where(requests_table.c.request_id == request_id)).first()
    ev = {"request_id": request_id, "at": at, "from_status": from_status, "to_status": to_status, "detail": detail,
          "row_hash": None if row is None else row_digest(row._mapping), "prev_hash": _head(conn)}
    ev["event_hash"] = event_digest(ev)
    conn.execute(events_table.insert().values(**ev))
    _set_meta(conn, CHAIN_HEAD, ev["event_hash"])


def _migrate_statuses(engine: sa.Engine) -> None:
    """A ledger whose status CHECK constraint predates ``needs_attention``: widen it (SQLite: rebuild the table,
    rows kept as they are, so their row hashes stay valid)."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            ddl = conn.execute(sa.text("SELECT sql FROM sqlite_master WHERE type='table' AND name='deletion_requests'")).scalar()
        else:
            ddl = " ".join(str(c.get("sqltext")) for c in sa.inspect(conn).get_check_constraints("deletion_requests"))
    if not ddl or "needs_attention" in ddl:
        return
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(sa.text("ALTER TABLE deletion_requests RENAME TO deletion_requests_old"))
            requests_table.create(conn)
            conn.execute(sa.text("INSERT INTO deletion_requests SELECT * FROM deletion_requests_old"))
            conn.execute(sa.text("DROP TABLE deletion_requests_old"))
        else:
            conn.execute(sa.text("ALTER TABLE deletion_requests DROP CONSTRAINT ck_deletion_requests_status"))
            conn.execute(sa.text("ALTER TABLE deletion_requests ADD CONSTRAINT ck_deletion_requests_status CHECK "
                                 "(status IN ('pending', 'in_progress', 'fulfilled', 'rejected', 'needs_attention'))"))
    log.warning("ledger migrated: status needs_attention allowed")


def _migrate(engine: sa.Engine) -> None:
    """Bring a ledger written by an older version up to this schema, in one transaction: the hash-chain columns
    (every existing event hashed as it is now, each request's last event given its current row hash; recorded in
    ``ledger_meta``)."""
    _migrate_statuses(engine)
    cols = {c["name"] for c in sa.inspect(engine).get_columns("request_events")}
    if "event_hash" in cols:
        return
    with engine.begin() as conn:
        meta_table.create(conn, checkfirst=True)
        for name in ("row_hash", "prev_hash", "event_hash"):
            if name not in cols:
                conn.execute(sa.text(f"ALTER TABLE request_events ADD COLUMN {name} VARCHAR(64)"))
        evs = [dict(r._mapping) for r in conn.execute(sa.select(events_table).order_by(events_table.c.event_id))]
        last = {e["request_id"]: e["event_id"] for e in evs}
        rows = {r.request_id: row_digest(r._mapping) for r in conn.execute(sa.select(requests_table))}
        prev = GENESIS
        for e in evs:
            e["row_hash"] = rows.get(e["request_id"]) if last[e["request_id"]] == e["event_id"] else None
            e["prev_hash"] = prev
            e["event_hash"] = prev = event_digest(e)
            conn.execute(events_table.update().where(events_table.c.event_id == e["event_id"]).values(
                row_hash=e["row_hash"], prev_hash=e["prev_hash"], event_hash=e["event_hash"]))
        conn.execute(sa.text("CREATE UNIQUE INDEX IF NOT EXISTS ux_request_events_prev_hash ON request_events (prev_hash)"))
        _set_meta(conn, CHAIN_HEAD, prev)
        _set_meta(conn, "chain_migrated_at", utc_iso(datetime.now(timezone.utc)))
        _set_meta(conn, "chain_migrated_events", str(len(evs)))
    log.warning("ledger migrated to the hash chain: %d existing event(s) hashed as they are now", len(evs))


def _record(row: Any) -> Request:
    return Request(**{k: row._mapping[k] for k in Request.__dataclass_fields__})


class Ledger:
    """The deletion-request ledger behind a SQLAlchemy URL (tables are created if missing).

    ``clock`` (returns an aware UTC datetime) is injectable for tests.
    """

    def __init__(self, url: str | None = None, *, clock: Callable[[], datetime] | None = None) -> None:
        self.url = url or f"sqlite:///{DEFAULT_LEDGER_PATH}"
        self._engine = _engine_for(self.url)
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        with self._engine.connect() as conn:
            old = sa.inspect(conn).has_table("request_events")
        if old:
            _migrate(self._engine)
        metadata.create_all(self._engine)

    # -- lifecycle
    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self._engine.url.render_as_string(hide_password=True)!r})"

    def _now(self) -> str:
        return utc_iso(self._clock())

    # -- reads
    def get(self, request_id: str) -> Request | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(requests_table).where(requests_table.c.request_id == request_id)).first()
        return None if row is None else _record(row)

    def _select(self, statuses: Sequence[str] | None = None) -> list[Request]:
        q = sa.select(requests_table)
        if statuses is not None:
            q = q.where(requests_table.c.status.in_(list(statuses)))
        q = q.order_by(requests_table.c.received_at, requests_table.c.request_id)
        with self._engine.connect() as conn:
            return [_record(r) for r in conn.execute(q)]

    def all(self) -> list[Request]:
        """Every request, oldest first (received_at, then request_id)."""
        return self._select()

    def pending(self, include_in_progress: bool = False) -> list[Request]:
        """Requests waiting for a model (plus the in_progress ones if asked: e.g. to report a stuck run)."""
        return self._select(("pending", "in_progress") if include_in_progress else ("pending",))

    def accepted(self) -> list[Request]:
        """pending + in_progress + fulfilled: the requests every new model's forget set must cover."""
        return self._select(ACCEPTED)

    def by_status(self, *statuses: str) -> list[Request]:
        bad = [s for s in statuses if s not in STATUSES]
        if bad:
            raise RequestError(f"unknown status(es) {bad}; expected {', '.join(STATUSES)}")
        return self._select(statuses)

    def events(self, request_id: str | None = None) -> list[dict[str, Any]]:
        """The audit trail (oldest first), of one request or of all."""
        q = sa.select(events_table).order_by(events_table.c.event_id)
        if request_id is not None:
            q = q.where(events_table.c.request_id == request_id)
        with self._engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def chain_head(self) -> str:
        """The hash of the last event (:data:`GENESIS` for an empty ledger): what a registered version records."""
        with self._engine.connect() as conn:
            return _head(conn)

    def verify(self) -> ChainReport:
        """Recompute the hash chain: every event's hash, every link, every request row against the state its last
        event recorded, and the stored head. Each problem names the event or request (module docstring)."""
        with self._engine.connect() as conn:
            evs = [dict(r._mapping) for r in conn.execute(sa.select(events_table).order_by(events_table.c.event_id))]
            rows = {r.request_id: dict(r._mapping) for r in conn.execute(sa.select(requests_table))}
            meta = {r.key: r.value for r in conn.execute(sa.select(meta_table))}
        problems: list[str] = []
        prev, prev_id = GENESIS, None
        last: dict[str, dict[str, Any]] = {}

        def what(e: Mapping[str, Any]) -> str:
            return f"event {e['event_id']} ({e['request_id']} {e['from_status'] or '-'} -> {e['to_status']})"

        for e in evs:
            if e["prev_hash"] != prev:
                where = f"after event {prev_id}" if prev_id is not None else "at the start of the chain"
                problems.append(f"deleted event: the chain breaks {where}: {what(e)} does not link to "
                                f"{'event ' + str(prev_id) if prev_id is not None else 'the chain start'} "
                                "(an event between them was deleted, or the earlier one edited and re-hashed)")
            if event_digest(e) != e["event_hash"]:
                problems.append(f"edited event: {what(e)} no longer hashes to its recorded hash "
                                f"{str(e['event_hash'])[:12]}: its content was changed")
            prev, prev_id = e["event_hash"], e["event_id"]
            last[e["request_id"]] = e
        head = prev
        stored = meta.get(CHAIN_HEAD)
        if stored is not None and stored != head:
            problems.append(f"deleted event: the ledger's recorded chain head {stored[:12]} is not its last event's "
                            f"hash {head[:12]}: the latest event(s) after event {prev_id} were deleted")
        for rid, row in rows.items():
            e = last.get(rid)
            if e is None:
                problems.append(f"edited row: request {rid} has no events: it was inserted outside the ledger")
            elif e["row_hash"] is not None and row_digest(row) != e["row_hash"]:
                problems.append(f"edited row: request {rid} (status={row['status']}, model={row['model_name']} "
                                f"v{row['model_version']}, forget set {str(row['forget_set_hash'])[:12]}) is not the "
                                f"state its last {what(e)} recorded: the row was edited, or its later events deleted")
        for rid in sorted(set(last) - set(rows)):
            problems.append(f"deleted row: request {rid} is gone from deletion_requests but has events")
        migrated = None
        if meta.get("chain_migrated_events"):
            migrated = (f"the first {meta['chain_migrated_events']} event(s) predate the hash chain: they were hashed "
                        f"as they stood when the ledger was migrated ({meta.get('chain_migrated_at')}); an edit "
                        "made before then cannot be detected")
        return ChainReport(ok=not problems, events=len(evs), requests=len(rows), head=head, problems=problems,
                           migrated=migrated, hashes=frozenset(e["event_hash"] for e in evs))

    # -- writes
    def add(
        self,
        request_id: str,
        subject_type: str,
        subject: Any,
        received_at: str | datetime | None = None,
        *,
        known_rows: Sequence[Mapping[str, Any]],
        source: str = "the known rows",
    ) -> AddResult:
        """Record a request: ``added`` (pending), ``rejected`` (stored, with the reason) or ``duplicate``.

        A request id seen before is a no-op returning the existing record, whatever
        the new subject says (ids are the requester's idempotency key). ``source``
        names the data in rejection reasons (e.g. ``data/tofu/full.json``).
        """
        rid = check_request_id(request_id)
        existing = self.get(rid)
        if existing is not None:
            return AddResult("duplicate", existing)
        check_subject_type(subject_type)
        stored = normalize_subject(subject_type, subject)
        now_dt = self._clock()
        received = parse_received_at(received_at, now=now_dt)
        m = match_subject(subject_type, stored, known_rows, source=source)
        status = "rejected" if m.reason else "pending"
        now = utc_iso(now_dt)
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    requests_table.insert().values(
                        request_id=rid, subject_type=subject_type, subject=stored, received_at=received,
                        status=status, reason=m.reason, updated_at=now,
                    )
                )
                _insert_event(conn, rid, now, None, status, m.reason or f"accepted: {m.detail}")
        except IntegrityError:
            # Another writer inserted the same id between our get() and insert(): theirs wins.
            existing = self.get(rid)
            if existing is None:
                raise
            return AddResult("duplicate", existing)
        rec = self.get(rid)
        assert rec is not None
        return AddResult("rejected" if m.reason else "added", rec)

    def _transition(
        self,
        ids: Iterable[str],
        *,
        allowed_from: tuple[str, ...],
        to: str,
        values: Mapping[str, Any] | None = None,
        detail: str | None = None,
        action: str,
    ) -> list[Request]:
        ids = list(dict.fromkeys(ids))
        if not ids:
            return []
        now = self._now()
        with self._engine.begin() as conn:
            current = {
                r.request_id: r.status
                for r in conn.execute(
                    sa.select(requests_table.c.request_id, requests_table.c.status).where(requests_table.c.request_id.in_(ids))
                )
            }
            unknown = [i for i in ids if i not in current]
            if unknown:
                raise TransitionError(f"cannot {action}: unknown request id(s) {_first(unknown)}; nothing was changed")
            bad = [f"{i} is {current[i]}" for i in ids if current[i] not in allowed_from]
            if bad:
                need = " or ".join(allowed_from)
                raise TransitionError(f"cannot {action}: requires status {need}, but {_first(bad)}; nothing was changed")
            for i in ids:
                res = conn.execute(
                    requests_table.update()
                    .where(requests_table.c.request_id == i, requests_table.c.status == current[i])
                    .values(status=to, updated_at=now, **dict(values or {}))
                )
                if res.rowcount != 1:
                    raise TransitionError(f"cannot {action}: {i} changed status concurrently; nothing was changed")
                _insert_event(conn, i, now, current[i], to, detail)
        return [r for r in (self.get(i) for i in ids) if r is not None]

    def mark_in_progress(self, ids: Iterable[str], *, detail: str | None = None) -> list[Request]:
        """pending -> in_progress (the pipeline claims them; ``detail``, e.g. the flow run id, goes into the events)."""
        return self._transition(ids, allowed_from=("pending",), to="in_progress", detail=detail, action="mark in progress")

    def mark_fulfilled(
        self, ids: Iterable[str], model_name: str, model_version: str | int, forget_set_hash: str, *, detail: str | None = None
    ) -> list[Request]:
        """in_progress -> fulfilled by registered ``model_name`` version ``model_version``, unlearned on ``forget_set_hash``."""
        for key, val in (("model_name", model_name), ("model_version", model_version), ("forget_set_hash", forget_set_hash)):
            if val is None or not str(val).strip():
                raise TransitionError(f"cannot mark fulfilled: {key} is required (got {val!r}); nothing was changed")
        values = {"model_name": str(model_name), "model_version": str(model_version), "forget_set_hash": str(forget_set_hash), "reason": None}
        detail = detail or f"fulfilled by {model_name} v{model_version} (forget set {str(forget_set_hash)[:12]})"
        return self._transition(ids, allowed_from=("in_progress",), to="fulfilled", values=values, detail=detail, action="mark fulfilled")

    def mark_failed(self, ids: Iterable[str], reason: str) -> list[Request]:
        """in_progress -> pending, keeping ``reason`` (the failure) so the next run retries them."""
        if not isinstance(reason, str) or not reason.strip():
            raise TransitionError("cannot mark failed: a reason is required; nothing was changed")
        return self._transition(
            ids, allowed_from=("in_progress",), to="pending", values={"reason": reason}, detail=f"failed: {reason}", action="mark failed"
        )

    def reject(self, ids: Iterable[str], reason: str) -> list[Request]:
        """pending or needs_attention -> rejected (an operator decision, e.g. a request found to be invalid)."""
        if not isinstance(reason, str) or not reason.strip():
            raise TransitionError("cannot reject: a reason is required; nothing was changed")
        return self._transition(
            ids, allowed_from=("pending", "needs_attention"), to="rejected", values={"reason": reason},
            detail=f"rejected: {reason}", action="reject"
        )

    def gate_attempts(self, request_id: str) -> int:
        """How many times a model unlearned for this request failed the gate since it was added or last retried
        (:meth:`retry`): counted from its events, so the count is as tamper-evident as the chain."""
        n = 0
        for e in self.events(request_id):
            detail = e["detail"] or ""
            if detail.startswith(RETRY_PREFIX):
                n = 0
            elif e["from_status"] == "in_progress" and detail.startswith(GATE_FAILED_PREFIX):
                n += 1
        return n

    def mark_gate_failed(self, ids: Iterable[str], reason: str, *, max_attempts: int | None,
                         evidence: Mapping[str, Any] | None = None) -> dict[str, str]:
        """in_progress -> pending, or -> ``needs_attention`` for a request whose model has now failed the gate
        ``max_attempts`` times (:meth:`gate_attempts`): it is no longer retried by every scheduled run; its reason
        holds the failure and ``evidence`` (JSON), for a person to look at. Returns ``{id: new status}``.
        One transaction over all ids, like every transition."""
        if not isinstance(reason, str) or not reason.strip():
            raise TransitionError("cannot mark gate failed: a reason is required; nothing was changed")
        ids = list(dict.fromkeys(ids))
        plan: dict[str, tuple[str, str, str]] = {}
        for i in ids:
            n = self.gate_attempts(i) + 1
            of = f" of {max_attempts}" if max_attempts else ""
            detail = f"{GATE_FAILED_PREFIX} (attempt {n}{of}): {reason}"
            if max_attempts is not None and n >= max_attempts:
                ev = f"; evidence: {json.dumps(evidence.get(i, evidence), default=str)}" if evidence else ""
                why = (f"needs attention: the gate failed {n} time(s) (requests.max_attempts={max_attempts}), "
                       f"not retried until `unlearn request retry {i}`; last failure: {reason}{ev}")
                plan[i] = ("needs_attention", why[:20000], detail)
            else:
                plan[i] = ("pending", detail, detail)
        now = self._now()
        with self._engine.begin() as conn:
            current = {r.request_id: r.status for r in conn.execute(
                sa.select(requests_table.c.request_id, requests_table.c.status).where(requests_table.c.request_id.in_(ids)))}
            bad = [f"{i} is {current.get(i, 'unknown')}" for i in ids if current.get(i) != "in_progress"]
            if bad:
                raise TransitionError(f"cannot mark gate failed: requires status in_progress, but {_first(bad)}; "
                                      "nothing was changed")
            for i, (to, why, detail) in plan.items():
                res = conn.execute(requests_table.update().where(requests_table.c.request_id == i,
                                                                 requests_table.c.status == "in_progress")
                                   .values(status=to, reason=why, updated_at=now))
                if res.rowcount != 1:
                    raise TransitionError(f"cannot mark gate failed: {i} changed status concurrently; nothing was changed")
                _insert_event(conn, i, now, "in_progress", to, detail)
        return {i: to for i, (to, _, _) in plan.items()}

    def retry(self, ids: Iterable[str], detail: str | None = None) -> list[Request]:
        """needs_attention -> pending (an operator decision, e.g. after changing the method or the thresholds): the
        next run unlearns it again, with its gate attempts counted from zero."""
        return self._transition(ids, allowed_from=("needs_attention",), to="pending",
                                values={"reason": None}, detail=f"{RETRY_PREFIX} {detail or 'by an operator'}",
                                action="retry")

    def note(self, request_id: str, detail: str, *, reason: str | None = None) -> Request:
        """Record a finding about a request without changing its status: one event whose from and to status are
        both the current one, with ``detail`` (and ``reason`` stored on the request when given). E.g. ``request
        add`` noting that a registered version already honours the new request. TransitionError if unknown."""
        if not isinstance(detail, str) or not detail.strip():
            raise TransitionError("cannot note: a detail is required; nothing was changed")
        now = self._now()
        with self._engine.begin() as conn:
            status = conn.execute(
                sa.select(requests_table.c.status).where(requests_table.c.request_id == request_id)
            ).scalar_one_or_none()
            if status is None:
                raise TransitionError(f"cannot note: unknown request id {request_id}; nothing was changed")
            values: dict[str, Any] = {"updated_at": now}
            if reason is not None:
                values["reason"] = reason
            res = conn.execute(
                requests_table.update()
                .where(requests_table.c.request_id == request_id, requests_table.c.status == status)
                .values(**values)
            )
            if res.rowcount != 1:
                raise TransitionError(f"cannot note: {request_id} changed status concurrently; nothing was changed")
            _insert_event(conn, request_id, now, status, status, detail)
        rec = self.get(request_id)
        assert rec is not None
        return rec

    def recover_stale(self, older_than: timedelta | None = None) -> list[Request]:
        """in_progress -> pending for requests a run claimed but never finished (it crashed or was killed).

        ``older_than=None`` recovers every in_progress request: call it at the start of
        a run when no other run can be active (a concurrency limit of 1). With
        ``older_than`` only requests whose last change is older than that are
        recovered, so a run that is still going is not robbed.
        """
        stuck = self.by_status("in_progress")
        if older_than is not None:
            cutoff = self._clock() - older_than
            stuck = [r for r in stuck if datetime.fromisoformat(r.updated_at or r.received_at) < cutoff]
        out: list[Request] = []
        for r in stuck:  # one transaction each: a request moved by someone else meanwhile is skipped, not fatal
            reason = f"interrupted: the run that claimed it at {r.updated_at} did not finish; retrying"
            try:
                out += self._transition(
                    [r.request_id], allowed_from=("in_progress",), to="pending", values={"reason": reason},
                    detail="recovered stale in_progress", action="recover",
                )
            except TransitionError:
                continue
        return out
