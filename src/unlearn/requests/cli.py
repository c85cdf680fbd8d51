"""``unlearn request ...``: record deletion requests, list them, ingest the inbox, honour them (``run``).

Mounted by the main CLI with ``app.add_typer(request_app, name="request")``. Every
command reads ``params.yaml`` (``--params``/``--set``): ``data.out_dir`` for the
full split the subjects are matched against, and the ``requests:`` section
(``ledger_url``, ``inbox``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional  # noqa: F401 - used in annotations

import typer

request_app = typer.Typer(
    help="Deletion requests ('forget author X', 'forget rows a,b,c'): record them in the ledger, list them, "
    "ingest the inbox, honour them (`run`: unlearn every accepted request and mark it fulfilled with the model "
    "version).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

from ..cli_common import ParamsOpt, SetOpt  # noqa: E402
from ..cli_common import friendly_errors as _friendly  # noqa: E402


def _open(params: Path, overrides: list[str] | None):
    """(Params, RequestsCfg, Ledger)."""
    from ..config import load_params
    from .ledger import Ledger, requests_settings

    p = load_params(params, overrides)
    cfg = requests_settings(p)
    return p, cfg, Ledger(cfg.url)


def _full_rows(p) -> tuple[list[dict], str]:
    from ..data.splits import read_split

    out = Path(p.data.out_dir)
    return read_split(out, "full"), str(out / "full.json")


def _echo_result(res) -> None:
    r = res.request
    line = f"{res.status}: {r.request_id} ({r.describe()}) status={r.status}"
    if res.status == "rejected" or (res.status == "duplicate" and r.reason):
        line += f"\n  reason: {r.reason}"
    typer.echo(line)


def _tell_honoured(p, ledger, results, full) -> None:
    """For each newly added request: is it already honoured by a registered version (its forget set holds every
    row), or partly? Say so, and note it in the ledger (an event; the request stays pending, and the next
    `unlearn request run` settles a fully honoured one without unlearning). A registry that cannot be read is a
    warning: the request is recorded either way."""
    from .cycle import already_honoured

    added = [r.request for r in results if r.status == "added"]
    if not added:
        return
    try:
        found = already_honoured(p, added, full)
    except Exception as e:  # noqa: BLE001 - the registry is advisory here; the run checks again
        typer.echo(f"warning: could not check the registered models for these requests: {type(e).__name__}: {e}", err=True)
        return
    for rid, cov in found.items():
        msg, note = cov.message(), cov.note()
        if msg is None:
            continue
        typer.echo(f"  {msg}")
        ledger.note(rid, note, reason=note)


@request_app.command("add")
@_friendly
def add(
    request_id: Annotated[str, typer.Argument(help="the requester's id for this request (idempotency key: adding it again is a no-op)")],
    author: Annotated[Optional[str], typer.Option(help="forget every row of this author (author_id, or the author's full name)")] = None,
    rows: Annotated[Optional[str], typer.Option(help="forget these rows: comma-separated row ids")] = None,
    received_at: Annotated[Optional[str], typer.Option(help="when the request was received (ISO-8601; default now, UTC)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Record one deletion request. Exactly one of --author / --rows. A subject that matches no rows of
    data.out_dir/full.json is stored as rejected with the reason (exit code 1). If a registered model version's
    forget set already holds every row of the request, it says which (with its evidence) and notes it in the
    ledger; the request stays pending and the next `request run` settles it by that version, without unlearning."""
    if (author is None) == (rows is None):
        raise typer.BadParameter("give exactly one of --author NAME_OR_ID or --rows ID1,ID2")
    p, _, ledger = _open(params, set_)
    with ledger:
        full, source = _full_rows(p)
        res = ledger.add(request_id, "author" if author is not None else "rows", author if author is not None else rows,
                         received_at, known_rows=full, source=source)
        _echo_result(res)
        _tell_honoured(p, ledger, [res], full)
    if res.status == "rejected":
        raise typer.Exit(1)


@request_app.command("list")
@_friendly
def list_(
    status: Annotated[Optional[list[str]], typer.Option(help="only this status (repeatable): pending, in_progress, fulfilled, rejected")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Table of the deletion requests (oldest first) with status, fulfilling model version and reason."""
    _, cfg, ledger = _open(params, set_)
    with ledger:
        reqs = ledger.by_status(*status) if status else ledger.all()
    if not reqs:
        typer.echo(f"no deletion requests in {ledger.url}")
        return
    header = ["request_id", "status", "subject", "received_at", "model", "reason"]
    table = [header] + [
        [r.request_id, r.status, r.describe(), r.received_at[:19] + "Z",
         f"{r.model_name} v{r.model_version}" if r.model_version else "-", r.reason or ""]
        for r in reqs
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    for j, line in enumerate(table):
        typer.echo("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1])
        if j == 0:
            typer.echo("  ".join("-" * w for w in widths) + "  ------")
    counts = {s: sum(r.status == s for r in reqs) for s in ("pending", "in_progress", "fulfilled", "rejected")}
    if any(r.status == "needs_attention" for r in reqs):
        counts["needs_attention"] = sum(r.status == "needs_attention" for r in reqs)
    typer.echo("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()))


@request_app.command("ingest")
@_friendly
def ingest(
    inbox: Annotated[Optional[Path], typer.Option(help="inbox directory (default requests.inbox)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Add the requests of every *.jsonl file in the inbox (one JSON object per line: request_id, subject_type,
    subject, received_at?) and move each processed file to <inbox>/processed/. A file with a malformed line is
    left in place, added nothing, and is reported by file and line (exit code 2); the other files are processed."""
    from .inbox import ingest_inbox

    p, cfg, ledger = _open(params, set_)
    inbox_dir = inbox or Path(cfg.inbox)
    with ledger:
        if not inbox_dir.is_dir():
            typer.echo(f"inbox {inbox_dir} does not exist: nothing to ingest")
            return
        full, source = _full_rows(p)
        res = ingest_inbox(ledger, inbox_dir, full, source=source, strict=False)
        for r in res:
            _echo_result(r)
        _tell_honoured(p, ledger, res, full)
    counts = {s: sum(r.status == s for r in res) for s in ("added", "duplicate", "rejected")}
    typer.echo(f"{len(res.moved)} file(s) processed: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if res.errors:
        typer.echo(f"error: {len({e.file for e in res.errors})} file(s) left in {inbox_dir} (malformed lines):", err=True)
        for e in res.errors:
            typer.echo(f"  {e}", err=True)
        raise typer.Exit(2)


@request_app.command("show")
@_friendly
def show(
    request_id: Annotated[str, typer.Argument(help="request id")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """One request with its full history (the request_events audit trail)."""
    _, _, ledger = _open(params, set_)
    with ledger:
        r = ledger.get(request_id)
        if r is None:
            typer.echo(f"error: no request {request_id!r} in {ledger.url}", err=True)
            raise typer.Exit(2)
        events = ledger.events(request_id)
    typer.echo(f"{r.request_id}: {r.describe()}\n  status: {r.status}" + (f" ({r.reason})" if r.reason else ""))
    typer.echo(f"  received: {r.received_at}\n  updated: {r.updated_at}")
    if r.model_version:
        typer.echo(f"  fulfilled by: {r.model_name} v{r.model_version} (forget set {r.forget_set_hash})")
    for ev in events:
        typer.echo(f"  {ev['at']}  {ev['from_status'] or '-'} -> {ev['to_status']}  {ev['detail'] or ''}".rstrip())


@request_app.command("retry")
@_friendly
def retry(
    request_id: Annotated[list[str], typer.Argument(help="request id(s) in needs_attention")],
    why: Annotated[Optional[str], typer.Option("--why", help="what changed (recorded in the ledger)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Put requests that failed the gate requests.max_attempts times (needs_attention) back to pending, their
    attempts counted from zero: the next `request run` unlearns them again."""
    _, _, ledger = _open(params, set_)
    with ledger:
        for r in ledger.retry(request_id, why):
            typer.echo(f"retry: {r.request_id} status={r.status}")


def _tell_serving(out: dict) -> None:
    """Which version the ``serving`` alias now names (the one to serve: it honours every fulfilled request)."""
    sv = out.get("serving") or {}
    if sv.get("version"):
        typer.echo(f"serving: {sv['name']}@serving = v{sv['version']} (honours every fulfilled request)")
    elif sv:
        typer.echo(f"serving: no alias ({sv.get('why')})", err=True)


@request_app.command("run")
@_friendly
def run(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Honour every pending deletion request, end to end, in this process (no Prefect needed): ingest the inbox,
    claim the pending requests, build the forget set's splits (and `dvc add` them in a DVC repository), train its
    retain model, unlearn the target model, evaluate retain/target/unlearned, gate and register, then mark the
    requests fulfilled with the registered version, or back to pending with the reason. The same cycle as the
    Prefect deployment unlearn/requests. Needs the prepared data and the target model (`dvc repro`). Exit code 1
    when the gate fails; a crash leaves the requests claimed (in_progress) for the next run to recover."""
    from ..cli import _setup
    from ..fmt import fmt_number
    from .cycle import CycleSteps, honour_requests

    _setup()
    out = honour_requests(CycleSteps(params, set_ or []))
    if out["status"] == "idle":
        typer.echo("no pending deletion requests")
        return
    for rid, c in out.get("already_honoured", {}).items():
        aliases = f" ({', '.join(c['aliases'])})" if c.get("aliases") else ""
        typer.echo(f"already honoured: {rid} fulfilled by {c['name']} v{c['version']}{aliases}, whose forget set holds "
                   f"its {c['covered']} rows (answer prob before={fmt_number(c.get('prob_before'))} "
                   f"after={fmt_number(c.get('prob_after'))}); nothing unlearned")
    if out["status"] == "honoured":
        _tell_serving(out)
        return
    d, info = out["decision"], out["forget_set"]
    typer.echo(f"forget set {info['forget_set_hash'][:12]}: {info['rows']} rows, honouring "
               f"{', '.join(info['honoured'])} (splits in {info['dir']})")
    if out.get("base"):  # requests.mode sequential: unlearned from the champion that honours the earlier ones
        b = out["base"]
        typer.echo(f"  unlearned from {b['name']} v{b['version']} ({out['started_from']}); re-checked: "
                   f"{', '.join(info.get('earlier') or []) or 'none'}")
    elif out.get("mode") == "sequential":
        typer.echo(f"  unlearned from the target: {out.get('plan')}")
    for name, m in out["metrics"].items():
        typer.echo(f"  {name:<9}  forget_quality={fmt_number(m.get('forget_quality'))}  "
                   f"model_utility={fmt_number(m.get('model_utility'))}")
    ids = ", ".join(out["requests"])
    if out["status"] == "fulfilled":
        aliases = f" ({', '.join(d['aliases'])})" if d.get("aliases") else ""
        typer.echo(f"fulfilled: {ids} by {d['registered_model']} v{d['version']}{aliases}")
        _tell_serving(out)
        return
    typer.echo(f"gate failed: {ids} back to pending: {'; '.join(d.get('reasons') or ['not registered'])}", err=True)
    if d.get("needs_attention"):
        typer.echo(f"needs attention (failed the gate requests.max_attempts times, not retried until `unlearn request "
                   f"retry`): {', '.join(d['needs_attention'])}", err=True)
    raise typer.Exit(1)
