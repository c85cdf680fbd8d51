"""Deletion-request ledger, inbox, forget set, audit and the `unlearn request` CLI (SQLite in tmp_path, no models)."""

from __future__ import annotations

import copy
import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from unlearn.config import ConfigError, load_params
from unlearn.data.names import FORGET_REQUESTS, FORGET_REQUESTS_PERTURBED, RETAIN_REQUESTS
from unlearn.data.synthetic import generate_tofu
from unlearn.requests import (
    InboxError,
    Ledger,
    RequestError,
    TransitionError,
    audit_html,
    audit_model,
    audit_request,
    build_request_splits,
    forget_rows_for,
    forget_set_hash,
    ingest_inbox,
    match_subject,
    parse_request_ids,
    read_request_splits,
    render_audit_model,
    render_audit_request,
    requests_settings,
    write_request_splits,
)
from unlearn.requests import ledger as ledger_mod


@pytest.fixture(scope="module")
def tofu() -> dict:
    return generate_tofu(n_authors=6)


@pytest.fixture
def full(tofu) -> list[dict]:
    return copy.deepcopy(tofu["full"])


@pytest.fixture
def ledger(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as led:
        yield led


def author_rows(full, author_id):
    return [r for r in full if r["author_id"] == author_id]


def name_of(full, author_id):
    """The synthetic author's full name (q00's answer is "The author's full name is <name>.")."""
    ans = next(r["answer"] for r in full if r["id"] == f"{author_id}-q00")
    return ans.removeprefix("The author's full name is ").rstrip(".")


# --------------------------------------------------------------------------- adding
def test_same_request_id_twice_is_one_row_and_one_event(ledger, full):
    first = ledger.add("req-1", "author", "syn-a001", "2024-05-01T10:00:00Z", known_rows=full)
    again = ledger.add("req-1", "author", "syn-a002", known_rows=full)  # different subject: still a no-op
    assert first.status == "added" and again.status == "duplicate"
    assert again.request == first.request and again.request.subject == "syn-a001"
    assert [r.request_id for r in ledger.all()] == ["req-1"]
    assert len(ledger.events("req-1")) == 1
    assert first.request.received_at == "2024-05-01T10:00:00.000000+00:00"
    assert first.request.status == "pending"


def test_unknown_author_is_stored_rejected_with_the_reason(ledger, full):
    res = ledger.add("req-x", "author", "Nobody", known_rows=full, source="data/tofu/full.json")
    assert res.status == "rejected"
    rec = ledger.get("req-x")
    assert rec.status == "rejected"
    assert "author 'Nobody' matches no rows in data/tofu/full.json" in rec.reason
    assert "known authors: syn-a000, syn-a001" in rec.reason
    (ev,) = ledger.events("req-x")
    assert (ev["from_status"], ev["to_status"]) == (None, "rejected") and "Nobody" in ev["detail"]
    assert ledger.pending() == []


def test_author_matches_by_id_or_by_name(full):
    name = name_of(full, "syn-a003")
    by_id = match_subject("author", "syn-a003", full)
    by_name = match_subject("author", name.upper(), full)  # case-insensitive, whole words
    assert by_id.reason is None and by_name.reason is None
    assert [r["id"] for r in by_name.rows] == [r["id"] for r in by_id.rows] == [r["id"] for r in author_rows(full, "syn-a003")]
    assert "syn-a003" in by_name.detail
    # A surname shared by several synthetic authors is ambiguous: rejected, naming the candidates.
    surnames = [name_of(full, f"syn-a{i:03d}").split()[-1] for i in range(6)]
    shared = next(s for s in surnames if surnames.count(s) > 1)
    amb = match_subject("author", shared, full)
    assert amb.rows == [] and "ambiguous" in amb.reason and "author_id" in amb.reason


def test_rows_subject_with_unknown_ids_is_rejected_naming_them(ledger, full):
    ok = ledger.add("req-rows", "rows", "syn-a000-q00, syn-a000-q01", known_rows=full)
    assert ok.status == "added" and ok.request.row_ids == ["syn-a000-q00", "syn-a000-q01"]
    bad = ledger.add("req-bad", "rows", ["syn-a000-q02", "nope-1", "nope-2"], known_rows=full)
    assert bad.status == "rejected"
    assert "nope-1, nope-2" in bad.request.reason and "syn-a000-q02" not in bad.request.reason
    assert ledger.add("req-json", "rows", '["syn-a001-q00"]', known_rows=full).request.row_ids == ["syn-a001-q00"]
    assert ledger.add("req-empty", "rows", [], known_rows=full).status == "rejected"


def test_concurrent_add_of_the_same_id_is_a_duplicate(ledger, full, monkeypatch):
    ledger.add("r", "author", "syn-a000", known_rows=full)
    real_get = Ledger.get
    calls = []

    def stale_get(self, rid):  # the first look misses the row another process just inserted
        calls.append(rid)
        return None if len(calls) == 1 else real_get(self, rid)

    monkeypatch.setattr(Ledger, "get", stale_get)
    res = ledger.add("r", "author", "syn-a001", known_rows=full)
    assert res.status == "duplicate" and res.request.subject == "syn-a000"
    assert len(ledger.events("r")) == 1


@pytest.mark.parametrize(
    "args, match",
    [
        (("bad id", "author", "syn-a000"), "request_id"),
        (("a,b", "author", "syn-a000"), "request_id"),
        (("ok", "book", "syn-a000"), "subject_type"),
        (("ok", "author", "   "), "subject"),
        (("ok", "rows", 42), "subject"),
    ],
)
def test_invalid_requests_raise(ledger, full, args, match):
    with pytest.raises(RequestError, match=match):
        ledger.add(*args, known_rows=full)
    assert ledger.all() == []


def test_bad_received_at_raises(ledger, full):
    with pytest.raises(RequestError, match="received_at"):
        ledger.add("r", "author", "syn-a000", "yesterday", known_rows=full)


# --------------------------------------------------------------------------- transitions
def test_transitions_are_validated(ledger, full):
    ledger.add("a", "author", "syn-a000", known_rows=full)
    ledger.add("b", "author", "syn-a001", known_rows=full)
    ledger.add("x", "author", "Nobody", known_rows=full)
    with pytest.raises(TransitionError, match="in_progress"):
        ledger.mark_fulfilled(["a"], "m", 1, "h")  # fulfilling requires in_progress
    with pytest.raises(TransitionError, match="x is rejected"):
        ledger.mark_in_progress(["a", "x"])  # one bad id: nothing moves
    assert ledger.get("a").status == "pending"
    with pytest.raises(TransitionError, match="unknown request id"):
        ledger.mark_in_progress(["a", "ghost"])
    assert ledger.get("a").status == "pending" and len(ledger.events("a")) == 1

    ledger.mark_in_progress(["a", "b"], detail="run-1")
    with pytest.raises(TransitionError, match="model_version"):
        ledger.mark_fulfilled(["a"], "m", "", "h")
    with pytest.raises(TransitionError):
        ledger.mark_fulfilled(["a", "x"], "m", 1, "h")  # cannot fulfil a rejected request
    assert ledger.get("a").status == "in_progress"

    (b,) = ledger.mark_failed(["b"], "evaluation gate: forget_quality too low")
    assert b.status == "pending" and b.reason == "evaluation gate: forget_quality too low"
    (a,) = ledger.mark_fulfilled(["a"], "dipo-unlearn", 3, "f" * 64)
    assert (a.status, a.model_name, a.model_version, a.forget_set_hash, a.reason) == ("fulfilled", "dipo-unlearn", "3", "f" * 64, None)
    with pytest.raises(TransitionError):
        ledger.mark_failed(["a"], "too late")
    with pytest.raises(TransitionError):
        ledger.reject(["a"], "no")
    assert [(e["from_status"], e["to_status"]) for e in ledger.events("a")] == [
        (None, "pending"), ("pending", "in_progress"), ("in_progress", "fulfilled")
    ]
    assert "run-1" in ledger.events("a")[1]["detail"]
    assert ledger.mark_in_progress([]) == []


def test_a_transition_is_one_transaction(ledger, full, monkeypatch):
    for i in range(3):
        ledger.add(f"r{i}", "author", f"syn-a00{i}", known_rows=full)
    real = ledger_mod._insert_event
    calls = []

    def flaky(conn, *args):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(conn, *args)

    monkeypatch.setattr(ledger_mod, "_insert_event", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        ledger.mark_in_progress(["r0", "r1", "r2"])
    monkeypatch.setattr(ledger_mod, "_insert_event", real)
    assert [r.status for r in ledger.all()] == ["pending"] * 3  # r0's update was rolled back too
    assert all(len(ledger.events(f"r{i}")) == 1 for i in range(3))


# --------------------------------------------------------------------------- crash safety
class Crash(Exception):
    pass


def run_pipeline(url, full, *, crash: bool, version: str):
    """What the Prefect flow does, minus the models: recover, claim, build the forget set, (crash?), fulfil."""
    with Ledger(url) as led:  # a fresh process: a new engine on the same database
        led.recover_stale()
        todo = led.pending()
        if not todo:
            return []
        led.mark_in_progress([r.request_id for r in todo], detail=f"run for v{version}")
        rows = forget_rows_for(led.by_status("in_progress", "fulfilled"), full)  # claimed + earlier fulfilled
        h = forget_set_hash(rows)
        if crash:
            raise Crash("killed between unlearning and registration")
        return led.mark_fulfilled([r.request_id for r in todo], "dipo-unlearn", version, h)


def test_crash_between_in_progress_and_fulfilled_loses_nothing(tmp_path, full):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(url) as led:
        led.add("r1", "author", "syn-a004", known_rows=full)
        led.add("r2", "rows", ["syn-a000-q00"], known_rows=full)
    with pytest.raises(Crash):
        run_pipeline(url, full, crash=True, version="1")
    with Ledger(url) as led:
        assert [r.status for r in led.all()] == ["in_progress", "in_progress"]
        assert led.pending() == []
        assert {r.request_id for r in led.pending(include_in_progress=True)} == {"r1", "r2"}
        assert led.by_status("fulfilled") == []
    done = run_pipeline(url, full, crash=False, version="2")
    assert {r.request_id for r in done} == {"r1", "r2"}
    with Ledger(url) as led:
        assert all(r.status == "fulfilled" and r.model_version == "2" for r in led.all())
        trail = [(e["from_status"], e["to_status"]) for e in led.events("r1")]
        assert trail == [(None, "pending"), ("pending", "in_progress"), ("in_progress", "pending"),
                         ("pending", "in_progress"), ("in_progress", "fulfilled")]
        assert led.events("r1")[2]["detail"] == "recovered stale in_progress"
        assert not any(e["to_status"] == "fulfilled" and "v1" in (e["detail"] or "") for e in led.events())
    assert run_pipeline(url, full, crash=False, version="3") == []  # nothing left to do


def test_recover_stale_older_than_spares_a_live_run(tmp_path, full):
    now = [datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)]
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}", clock=lambda: now[0]) as led:
        led.add("old", "author", "syn-a000", known_rows=full)
        led.add("new", "author", "syn-a001", known_rows=full)
        led.mark_in_progress(["old"])
        now[0] += timedelta(hours=3)
        led.mark_in_progress(["new"])
        now[0] += timedelta(minutes=10)
        assert [r.request_id for r in led.recover_stale(older_than=timedelta(hours=1))] == ["old"]
        assert led.get("old").status == "pending" and "interrupted" in led.get("old").reason
        assert led.get("new").status == "in_progress"


# --------------------------------------------------------------------------- inbox
def write_lines(path: Path, objs) -> None:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs), encoding="utf-8")


def test_inbox_ingestion_with_a_malformed_line(ledger, full, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_lines(inbox / "a.jsonl", [
        {"request_id": "in-1", "subject_type": "author", "subject": "syn-a002", "received_at": "2024-05-01T09:00:00+02:00"},
        "",
        {"request_id": "in-2", "subject_type": "rows", "subject": ["syn-a001-q03", "nope"]},
        {"request_id": "in-1", "subject_type": "author", "subject": "syn-a003"},
    ])
    write_lines(inbox / "b.jsonl", [
        {"request_id": "in-3", "subject_type": "author", "subject": "syn-a005"},
        '{"request_id": "in-4", "subject_type": "author"',
        {"request_id": "in-5", "subject_type": "author", "subjet": "syn-a001"},
    ])
    (inbox / "notes.txt").write_text("not a request file")

    with pytest.raises(InboxError) as ei:
        ingest_inbox(ledger, inbox, full)
    msg = str(ei.value)
    assert f"{inbox / 'b.jsonl'}, line 2: not valid JSON" in msg
    assert f"{inbox / 'b.jsonl'}, line 3: unknown key(s) subjet" in msg
    assert [r.status for r in ei.value.results] == ["added", "rejected", "duplicate"]
    # the good file was processed and moved; the bad one added nothing and stays
    assert not (inbox / "a.jsonl").exists() and (inbox / "processed" / "a.jsonl").exists()
    assert (inbox / "b.jsonl").exists() and (inbox / "notes.txt").exists()
    assert ledger.get("in-3") is None
    assert ledger.get("in-1").subject == "syn-a002" and ledger.get("in-1").received_at.startswith("2024-05-01T07:00:00")
    assert "nope" in ledger.get("in-2").reason

    # fix the file, drop another file with an already-processed name: nothing lost, nothing overwritten
    write_lines(inbox / "b.jsonl", [{"request_id": "in-3", "subject_type": "author", "subject": "syn-a005"}])
    write_lines(inbox / "a.jsonl", [{"request_id": "in-1", "subject_type": "author", "subject": "syn-a002"}])
    res = ingest_inbox(ledger, inbox, full, strict=False)
    assert res.errors == [] and sorted(r.status for r in res) == ["added", "duplicate"]
    assert len(list((inbox / "processed").glob("a*.jsonl"))) == 2
    assert {p.name for p in inbox.glob("*.jsonl")} == set()
    assert ingest_inbox(ledger, tmp_path / "missing", full) == []


def test_inbox_non_strict_reports_errors_without_raising(ledger, full, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_lines(inbox / "x.jsonl", [{"request_id": "bad id", "subject_type": "author", "subject": "syn-a000"}])
    res = ingest_inbox(ledger, inbox, full, strict=False)
    assert list(res) == [] and len(res.errors) == 1
    assert res.errors[0].line == 1 and res.errors[0].field == "request_id"
    assert (inbox / "x.jsonl").exists()


# --------------------------------------------------------------------------- forget set
def test_forget_set_union_dedup_order_and_hash(ledger, full):
    ledger.add("r-rows", "rows", ["syn-a003-q05", "syn-a001-q02"], known_rows=full)
    ledger.add("r-author", "author", name_of(full, "syn-a003"), known_rows=full)  # overlaps r-rows
    ledger.add("r-done", "author", "syn-a005", known_rows=full)
    ledger.add("r-rej", "author", "Nobody", known_rows=full)
    ledger.mark_in_progress(["r-done"])
    ledger.mark_fulfilled(["r-done"], "m", 1, "h")  # fulfilled requests stay in every later forget set

    rows = forget_rows_for(ledger.all(), full)
    want = {"syn-a001-q02"} | {r["id"] for r in author_rows(full, "syn-a003")} | {r["id"] for r in author_rows(full, "syn-a005")}
    assert [r["id"] for r in rows] == [r["id"] for r in full if r["id"] in want]  # full's order, once each
    assert len(rows) == len(want)
    # dict input works too, and order of requests does not matter
    again = forget_rows_for([r.to_dict() for r in reversed(ledger.all())], full)
    assert again == rows

    h = forget_set_hash(rows)
    assert h == hashlib.sha256("\n".join(sorted(want)).encode()).hexdigest()
    assert forget_set_hash(list(reversed(rows)) + rows[:3]) == h == forget_set_hash(sorted(want))
    assert forget_set_hash(rows[1:]) != h


def test_forget_set_refuses_requests_that_no_longer_match(ledger, full):
    ledger.add("r1", "author", "syn-a002", known_rows=full)
    shrunk = [r for r in full if r["author_id"] != "syn-a002"]
    with pytest.raises(RequestError, match="r1 .pending.: author 'syn-a002' matches no rows"):
        forget_rows_for(ledger.all(), shrunk)


def test_build_request_splits_is_disjoint_by_author_and_pure(tofu, full, tmp_path):
    forget = [r for r in full if r["author_id"] == "syn-a001"] + [full[45]]  # one author + one row of another
    partial_author = full[45]["author_id"]
    before = copy.deepcopy((full, forget, tofu["retain_perturbed"]))
    splits = build_request_splits(
        full, forget, real_authors=tofu["real_authors"], world_facts=tofu["world_facts"], retain_perturbed=tofu["retain_perturbed"]
    )
    assert (full, forget, tofu["retain_perturbed"]) == before  # inputs untouched
    assert [r["id"] for r in splits[FORGET_REQUESTS]] == [r["id"] for r in full if r["id"] in {f["id"] for f in forget}]
    forget_authors = {"syn-a001", partial_author}
    assert {r["author_id"] for r in splits[RETAIN_REQUESTS]}.isdisjoint(forget_authors)
    assert len(splits[RETAIN_REQUESTS]) == len(full) - sum(r["author_id"] in forget_authors for r in full)
    # the rest of a partly requested author is in neither split
    assert not any(r["author_id"] == partial_author and r["id"] != full[45]["id"] for r in splits[FORGET_REQUESTS] + splits[RETAIN_REQUESTS])
    assert splits["retain_perturbed"] == tofu["retain_perturbed"]  # retain_perturbed = the first author (syn-a000)
    # requesting a retain_perturbed author removes its rows there (here: all of them, so the split is absent)
    first = build_request_splits(full, author_rows(full, "syn-a000"), retain_perturbed=tofu["retain_perturbed"])
    assert "retain_perturbed" not in first and {r["author_id"] for r in first[RETAIN_REQUESTS]} == {f"syn-a00{i}" for i in range(1, 6)}
    mixed = tofu["retain_perturbed"] + author_rows(tofu["full"], "syn-a003")
    kept = build_request_splits(full, author_rows(full, "syn-a003"), retain_perturbed=mixed)["retain_perturbed"]
    assert kept == tofu["retain_perturbed"]
    assert splits["real_authors"] == tofu["real_authors"] and splits["world_facts"] == tofu["world_facts"]
    assert [r["id"] for r in splits[FORGET_REQUESTS_PERTURBED]] == [r["id"] for r in splits[FORGET_REQUESTS]]

    no_pert = [dict(r, paraphrased_answer=None, perturbed_answer=None) for r in full]
    assert FORGET_REQUESTS_PERTURBED not in build_request_splits(no_pert, forget)
    with pytest.raises(RequestError, match="empty forget set"):
        build_request_splits(full, [])

    manifest = write_request_splits(splits, tmp_path / "req", request_ids=["r2", "r1"], forget_set_hash=forget_set_hash(forget))
    assert manifest[FORGET_REQUESTS]["request_ids"] == ["r1", "r2"]  # the forget split's entry of the one manifest format
    back, m2 = read_request_splits(tmp_path / "req")
    assert m2 == manifest and back[FORGET_REQUESTS] == splits[FORGET_REQUESTS] and back[RETAIN_REQUESTS] == splits[RETAIN_REQUESTS]
    assert manifest[FORGET_REQUESTS]["forget_set_hash"] == forget_set_hash(forget)
    with pytest.raises(RequestError, match="is not the hash of the 21 forget_requests rows"):
        write_request_splits(splits, tmp_path / "req2", request_ids=["r1"], forget_set_hash=forget_set_hash(forget[1:]))
    assert not (tmp_path / "req2").exists()


# --------------------------------------------------------------------------- audit
def version(v, request_ids, fhash, **extra):
    tags = {"request_ids": ",".join(request_ids), "forget_set_hash": fhash, "forget_rows": "21",
            "git_commit": "abc123", "data.full_sha256": "d" * 64, "params.method.name": "dipo"}
    tags.update(extra.pop("tags", {}))
    return {"name": "dipo-unlearn", "version": v, "tags": tags, "metrics": {"forget_quality": 0.81, "model_utility": 0.6}, **extra}


def test_audit_request_both_sources_and_evidence(ledger, full):
    ledger.add("r1", "author", "syn-a004", known_rows=full)
    ledger.mark_in_progress(["r1"])
    h1 = forget_set_hash(forget_rows_for(ledger.all(), full))
    ledger.mark_fulfilled(["r1"], "dipo-unlearn", 1, h1)
    registry = {
        "r1": [
            version("1", ["r1"], h1, tags={"request.r1.prob_before": "0.93", "request.r1.prob_after": "0.04"}),
            version(2, ["r1", "r2"], "e" * 64, request_metrics={"r1": {"prob_before": 0.93, "prob_after": 0.03}}),
        ]
    }
    lookup = lambda rid: registry.get(rid, [])  # noqa: E731
    d = audit_request(ledger, "r1", versions_lookup=lookup)
    assert d["honoured"] and d["status"] == "fulfilled" and d["warnings"] == []
    v1, v2 = d["versions"]
    assert (v1["version"], v1["source"], v1["prob_before"], v1["prob_after"]) == ("1", ["registry", "ledger"], 0.93, 0.04)
    assert (v2["version"], v2["source"], v2["prob_after"], v2["forget_quality"]) == ("2", ["registry"], 0.03, 0.81)
    text = render_audit_request(d)
    assert "honoured:      yes" in text and "dipo-unlearn v2" in text and "in_progress -> fulfilled" in text

    # the ledger's version missing from the registry, with a different hash story: flagged
    d2 = audit_request(ledger, "r1", versions_lookup=lambda rid: [])
    assert d2["versions"][0]["source"] == ["ledger"] and "does not return that version" in d2["warnings"][0]
    registry["r1"][0]["tags"]["forget_set_hash"] = "0" * 64
    assert any("forget_set_hash" in w for w in audit_request(ledger, "r1", versions_lookup=lookup)["warnings"])

    # a pending request, and one the ledger has never seen
    ledger.add("r2", "author", "syn-a001", known_rows=full)
    d3 = audit_request(ledger, "r2", versions_lookup=lambda rid: [version("2", ["r1", "r2"], "e" * 64)])
    assert not d3["honoured"] and "mark_fulfilled" in d3["warnings"][0]
    d4 = audit_request(ledger, "ghost", versions_lookup=lambda rid: [])
    assert not d4["found"] and not d4["honoured"] and "not in the ledger" in render_audit_request(d4)


def test_audit_model(ledger, full):
    ledger.add("r1", "author", "syn-a004", known_rows=full)
    ledger.add("r2", "rows", ["syn-a000-q01"], known_rows=full)
    ledger.add("r3", "author", "syn-a003", known_rows=full)
    ledger.mark_in_progress(["r1", "r2", "r3"])
    ledger.mark_fulfilled(["r1", "r2", "r3"], "dipo-unlearn", 5, "c" * 64)
    info = version("5", ["r1", "r2", "r9"], "c" * 64, run_id="run-5", aliases=["champion"])
    d = audit_model(info, ledger)
    assert d["request_ids"] == ["r1", "r2", "r9"]
    assert [r["in_ledger"] for r in d["requests"]] == [True, True, False]
    assert d["requests"][0]["status"] == "fulfilled"
    assert d["git_commit"] == "abc123" and d["data"] == {"data.full_sha256": "d" * 64}
    assert d["params"] == {"method.name": "dipo"} and d["metrics"]["forget_quality"] == 0.81
    assert d["forget_set_hash"] == "c" * 64 and d["forget_rows"] == 21.0
    assert any("r9" in w and "not in the ledger" in w for w in d["warnings"])
    assert any("r3" in w and "does not list it" in w for w in d["warnings"])
    text = render_audit_model(d)
    assert "model dipo-unlearn v5 [champion]" in text and "r9: not in the ledger" in text and "abc123" in text
    assert parse_request_ids('["a", "b"]') == ["a", "b"] == parse_request_ids("a, b,a")


def test_audit_html_is_self_contained_and_escaped(ledger, full):
    evil = "<script>alert(1)</script>"
    ledger.add("r1", "rows", ["syn-a000-q00"], known_rows=full)
    page = audit_html(version("1", ["r1"], "h" * 64, tags={"data.note": evil}), ledger.all())
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert evil not in page and "&lt;script&gt;" in page
    assert "http" not in page and "<script" not in page
    assert "r1" in page and "syn-a000-q00" in page


# --------------------------------------------------------------------------- settings + CLI
def test_requests_settings():
    p = load_params("/nonexistent.yaml")
    cfg = requests_settings(p)
    assert (cfg.ledger_url, cfg.inbox, cfg.schedule_cron) == (None, "data/requests/inbox", "*/30 * * * *")
    assert cfg.url == "sqlite:///data/requests/ledger.db"
    p = load_params("/nonexistent.yaml", ["requests.ledger_url=sqlite:///x.db", "requests.schedule_cron=0 * * * *"])
    assert requests_settings(p).url == "sqlite:///x.db"
    with pytest.raises(ConfigError, match="requests.inbx"):
        requests_settings(load_params("/nonexistent.yaml", ["requests.inbx=x"]))
    with pytest.raises(ConfigError, match="schedule_cron"):
        requests_settings(load_params("/nonexistent.yaml", ["requests.schedule_cron=hourly"]))


@pytest.fixture
def project(tmp_path, monkeypatch, tofu):
    from unlearn.data.splits import write_splits

    write_splits(tofu, tmp_path / "data" / "tofu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"out_dir": "data/tofu"}, "requests": {"inbox": "inbox"}}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_add_list_ingest_show(project, tofu):
    from unlearn.requests.cli import request_app

    runner = CliRunner()
    name = name_of(tofu["full"], "syn-a002")
    res = runner.invoke(request_app, ["add", "req-1", "--author", name, "--received-at", "2024-05-01T10:00:00Z"])
    assert res.exit_code == 0, res.output
    assert "added: req-1" in res.output and "pending" in res.output
    assert (project / "data" / "requests" / "ledger.db").is_file()  # the default ledger location

    res = runner.invoke(request_app, ["add", "req-2", "--rows", "syn-a001-q00,ghost-7"])
    assert res.exit_code == 1 and "rejected" in res.output and "ghost-7" in res.output and "data/tofu/full.json" in res.output
    res = runner.invoke(request_app, ["add", "req-1", "--author", "syn-a000"])
    assert res.exit_code == 0 and "duplicate: req-1" in res.output
    res = runner.invoke(request_app, ["add", "req-3", "--author", "x", "--rows", "y"])
    assert res.exit_code != 0

    (project / "inbox").mkdir()
    write_lines(project / "inbox" / "batch.jsonl", [{"request_id": "req-4", "subject_type": "rows", "subject": ["syn-a005-q01"]}])
    write_lines(project / "inbox" / "broken.jsonl", ["{oops"])
    res = runner.invoke(request_app, ["ingest"])
    assert res.exit_code == 2 and "added: req-4" in res.output and "broken.jsonl, line 1" in res.output
    assert (project / "inbox" / "processed" / "batch.jsonl").exists()

    res = runner.invoke(request_app, ["list"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:4] == ["request_id", "status", "subject", "received_at"]
    assert any(line.startswith("req-1") and "pending" in line and name in line for line in lines)
    assert any(line.startswith("req-2") and "rejected" in line for line in lines)
    assert "2 pending, 0 in_progress, 0 fulfilled, 1 rejected" in res.output
    res = runner.invoke(request_app, ["list", "--status", "rejected"])
    assert "req-2" in res.output and "req-1" not in res.output

    res = runner.invoke(request_app, ["show", "req-1"])
    assert res.exit_code == 0 and "- -> pending" in res.output and "syn-a002" in res.output
    res = runner.invoke(request_app, ["list", "--set", "requests.bogus=1"])
    assert res.exit_code == 2 and "requests.bogus" in res.output


# --------------------------------------------------------------------------- the request cycle (no models)
def test_request_paths_are_spelled_once():
    from unlearn.requests.cycle import RequestPaths

    rp = RequestPaths("0123456789abcdef" * 4)
    assert rp.key == "0123456789ab"
    assert rp.splits_dir == Path("data/requests/splits/0123456789ab")
    assert (rp.retain_dir, rp.unlearned_dir) == (Path("models/requests/0123456789ab/retain"),
                                                 Path("models/requests/0123456789ab/unlearned"))
    assert rp.reports_dir == Path("reports/requests/0123456789ab")
    p = load_params("/nonexistent.yaml", rp.overrides())
    assert (p.data.out_dir, p.data.forget_split, p.data.retain_split) == (str(rp.splits_dir), FORGET_REQUESTS, RETAIN_REQUESTS)
    assert p.reports_dir == str(rp.reports_dir)


def test_request_run_needs_the_base_pipeline_and_claims_nothing_without_it(project, tofu):
    from unlearn.requests.cli import request_app

    runner = CliRunner()
    assert runner.invoke(request_app, ["add", "req-1", "--author", "syn-a002"]).exit_code == 0
    res = runner.invoke(request_app, ["run"])
    assert res.exit_code == 2, res.output
    assert "no target model at models/target" in res.output and "dvc repro" in res.output
    with Ledger("sqlite:///data/requests/ledger.db") as led:
        assert led.get("req-1").status == "pending" and len(led.events("req-1")) == 1


# --------------------------------------------------------------------------- already honoured by a registered version
def registered(v, rows, *, aliases=(), probs=None, request_ids=(), fhash=None, chunk=None, drop_tags=()):
    """A registered version as the registry returns it: its forget set recorded row by row (forget_row_evidence.*)."""
    from unlearn.requests.coverage import forget_row_evidence_tags

    ids = [r if isinstance(r, str) else r["id"] for r in rows]
    ev = {rid: (probs or {}).get(rid, (0.9, 0.05)) for rid in ids}
    tags = forget_row_evidence_tags(ev, **({"chunk": chunk} if chunk else {}))
    for k in drop_tags:
        tags.pop(k)
    info = version(v, list(request_ids), fhash or forget_set_hash(ids), tags=tags, aliases=list(aliases))
    return info


def test_coverage_says_which_version_holds_every_row_champion_first(ledger, full):
    from unlearn.requests.coverage import coverage, version_forget_rows

    a4, a5 = author_rows(full, "syn-a004"), author_rows(full, "syn-a005")
    probs = {r["id"]: (0.8, 0.02) for r in a5[:10]} | {r["id"]: (1.0, 0.04) for r in a5[10:]}
    v1 = registered("1", a4 + a5, aliases=["champion", "champion-abcd1234"], probs=probs, chunk=200)
    v2 = registered("2", a5, probs={r["id"]: (0.5, 0.5) for r in a5})  # newer, no alias: not preferred
    v3 = registered("3", full, fhash="0" * 64)  # rows that do not hash to its forget set: never trusted
    v4 = version("4", [], "e" * 64)  # registered before forget sets were recorded row by row
    assert sum(k.startswith("forget_row_evidence.") for k in v1["tags"]) > 1  # cut into pieces
    rows, why = version_forget_rows(v1)
    assert why is None and set(rows) == {r["id"] for r in a4 + a5}
    versions = [v4, v3, v2, v1]

    ledger.add("by-name", "author", name_of(full, "syn-a005"), known_rows=full)
    c = coverage(ledger.get("by-name"), full, versions)
    assert c.rows == [r["id"] for r in a5]
    hb = c.honoured_by
    assert (hb.version, hb.aliases, hb.covered, hb.missing, hb.forget_set_rows) == ("1", ["champion", "champion-abcd1234"], len(a5), [], len(a4) + len(a5))
    assert hb.prob_before == pytest.approx((10 * 0.8 + 10 * 1.0) / 20) and hb.prob_after == pytest.approx(0.03)
    assert [x.version for x in c.versions] == ["1", "2"]
    assert any(u.startswith("dipo-unlearn v3:") and "do not hash" in u for u in c.unchecked)
    assert any(u.startswith("dipo-unlearn v4:") and "without its forget-set rows" in u for u in c.unchecked)
    msg = c.message()
    assert msg.startswith("already honoured by dipo-unlearn v1 [champion, champion-abcd1234]: all 20 row(s) of by-name")
    assert "answer prob before=0.9000 after=0.0300" in msg and "forget_quality=0.8100" in msg and "without unlearning" in msg
    assert "already honoured by dipo-unlearn v1" in c.note()

    # rows of two authors, only one of them in any forget set: partly honoured, not honoured
    ledger.add("two-authors", "rows", ["syn-a005-q03", "syn-a000-q01"], known_rows=full)
    c = coverage(ledger.get("two-authors"), full, versions)
    assert c.honoured_by is None
    part = c.partly
    assert (part.version, part.covered, part.missing) == ("1", 1, ["syn-a000-q01"])
    assert c.message().startswith("partly honoured: dipo-unlearn v1 [champion, champion-abcd1234] holds 1 of 2 row(s)")
    assert "not: syn-a000-q01" in c.message() and "stays pending" in c.message()
    # rows of two authors that are both in the champion's forget set: honoured
    ledger.add("both", "rows", ["syn-a005-q03", "syn-a004-q01"], known_rows=full)
    assert coverage(ledger.get("both"), full, versions).honoured_by.version == "1"
    # an author only part of whose rows a version forgot is only partly honoured by it
    ledger.add("a003", "author", "syn-a003", known_rows=full)
    c = coverage(ledger.get("a003"), full, [registered("5", author_rows(full, "syn-a003")[:-1], aliases=["champion"])])
    assert c.honoured_by is None and c.partly.missing == [author_rows(full, "syn-a003")[-1]["id"]]
    # nobody holds it: nothing to say
    ledger.add("a000", "author", "syn-a000", known_rows=full)
    assert coverage(ledger.get("a000"), full, versions).message() is None

    # a piece missing, or the caller's row ids from the forget split on disk (checked against the hash too)
    cut = registered("6", a5, chunk=100, drop_tags=["forget_row_evidence.1"])
    assert version_forget_rows(cut) == (None, "its forget_row_evidence.* tags miss a piece")
    on_disk = dict(version("7", [], forget_set_hash(a5)), forget_row_ids=[r["id"] for r in a5])
    c = coverage(ledger.get("by-name"), full, [on_disk])
    assert c.honoured_by.version == "7" and c.honoured_by.prob_before is None
    wrong = dict(version("8", [], forget_set_hash(a5)), forget_row_ids=[r["id"] for r in a5 + a4])
    assert coverage(ledger.get("by-name"), full, [wrong]).honoured_by is None


def test_ledger_note_records_an_event_without_changing_the_status(ledger, full):
    ledger.add("r1", "author", "syn-a001", known_rows=full)
    rec = ledger.note("r1", "already honoured by m v1", reason="already honoured by m v1")
    assert (rec.status, rec.reason) == ("pending", "already honoured by m v1")
    assert [(e["from_status"], e["to_status"], e["detail"]) for e in ledger.events("r1")][1:] == [
        ("pending", "pending", "already honoured by m v1")]
    with pytest.raises(TransitionError, match="unknown request id"):
        ledger.note("ghost", "x")
    with pytest.raises(TransitionError, match="detail"):
        ledger.note("r1", " ")


@pytest.fixture
def registry(monkeypatch, tofu):
    """The registry `request add` and `request run` read, as a list: v1 is the champion of the last two authors."""
    from unlearn import tracking

    last = sorted({r["author_id"] for r in tofu["full"]})[-2:]
    rows = [r for r in tofu["full"] if r["author_id"] in last]
    versions = [registered("1", rows, aliases=["champion"], probs={r["id"]: (0.96, 0.02) for r in rows}),
                registered("2", author_rows(tofu["full"], "syn-a000")[:3], aliases=["champion-0123abcd"])]
    tagged = []
    monkeypatch.setattr(tracking, "registered_versions", lambda p: copy.deepcopy(versions))
    monkeypatch.setattr(tracking, "add_requests_to_version", lambda p, name, v, ev: tagged.append((name, v, ev)))
    return {"authors": last, "versions": versions, "tagged": tagged}


def test_cli_add_says_which_registered_version_already_honours_it(project, tofu, registry):
    from unlearn.requests.cli import request_app

    runner = CliRunner()
    a = registry["authors"][-1]
    res = runner.invoke(request_app, ["add", "req-001", "--author", a])
    assert res.exit_code == 0, res.output
    assert f"added: req-001 (author '{a}') status=pending" in res.output
    assert "already honoured by dipo-unlearn v1 [champion]: all 20 row(s) of req-001 are in its forget set" in res.output
    assert "answer prob before=0.9600 after=0.0200" in res.output and "next `unlearn request run`" in res.output
    with Ledger("sqlite:///data/requests/ledger.db") as led:
        r = led.get("req-001")
        assert r.status == "pending" and r.model_version is None and r.reason.startswith("already honoured by dipo-unlearn v1")
        assert [(e["from_status"], e["to_status"]) for e in led.events("req-001")] == [(None, "pending"), ("pending", "pending")]

    # one row the champion forgot, one of an author nobody forgot: partly, stays pending, told so
    res = runner.invoke(request_app, ["add", "req-002", "--rows", f"{a}-q04,syn-a001-q00"])
    assert res.exit_code == 0, res.output
    assert "partly honoured: dipo-unlearn v1 [champion] holds 1 of 2 row(s) of req-002" in res.output
    assert "not: syn-a001-q00" in res.output and "already honoured" not in res.output
    # the rows of the smaller version (another forget set's champion) are honoured by it
    res = runner.invoke(request_app, ["add", "req-003", "--rows", "syn-a000-q00,syn-a000-q02"])
    assert "already honoured by dipo-unlearn v2 [champion-0123abcd]" in res.output
    # nothing registered holds it: as before, no note
    res = runner.invoke(request_app, ["add", "req-004", "--author", "syn-a001"])
    assert res.exit_code == 0 and "honoured" not in res.output
    # an unknown subject: rejected as before, nothing checked
    res = runner.invoke(request_app, ["add", "req-005", "--author", "Nobody"])
    assert res.exit_code == 1 and "rejected" in res.output and "honoured" not in res.output
    with Ledger("sqlite:///data/requests/ledger.db") as led:
        assert led.get("req-002").status == "pending" and led.get("req-002").reason.startswith("partly honoured by dipo-unlearn v1")
        assert len(led.events("req-004")) == 1 and len(led.events("req-005")) == 1

    # the inbox is told the same way
    (project / "inbox").mkdir()
    write_lines(project / "inbox" / "b.jsonl", [{"request_id": "req-006", "subject_type": "author", "subject": registry["authors"][0]}])
    res = runner.invoke(request_app, ["ingest"])
    assert res.exit_code == 0 and "already honoured by dipo-unlearn v1 [champion]: all 20 row(s) of req-006" in res.output


class NoTraining:
    """Steps that would train or evaluate: a request run that reaches them fails the test's expectation."""

    def finetune(self, extra, *, role, out_dir):
        raise AssertionError(f"trained a {role} model")

    def cache(self, extra, *, target_dir):
        raise AssertionError("built a reference cache")

    def forget(self, extra, *, out_dir, target_dir):
        raise AssertionError("unlearned")

    def evaluate(self, extra, **kw):
        raise AssertionError("evaluated")

    def register(self, extra, **kw):
        raise AssertionError("registered a new version")


def test_request_run_settles_already_honoured_requests_without_unlearning(project, tofu, registry, monkeypatch):
    from unlearn.requests.cli import request_app
    from unlearn.requests.cycle import CycleSteps, honour_requests

    class Steps(NoTraining, CycleSteps):
        def before_intake(self):  # no target model in this project: nothing may need it
            pass

        def target(self):
            raise AssertionError("asked for the target model")

        def request_splits(self):
            raise AssertionError("built request splits")

    runner = CliRunner()
    a, b = registry["authors"]
    assert runner.invoke(request_app, ["add", "req-001", "--author", b]).exit_code == 0
    assert runner.invoke(request_app, ["add", "req-002", "--rows", f"{a}-q01,{b}-q02"]).exit_code == 0  # two authors, both forgotten
    out = honour_requests(Steps())
    assert out["status"] == "honoured" and out["requests"] == []
    assert {rid: (c["name"], c["version"]) for rid, c in out["already_honoured"].items()} == {
        "req-001": ("dipo-unlearn", "1"), "req-002": ("dipo-unlearn", "1")}
    name, v, ev = registry["tagged"][0]  # the version now lists them, with their evidence
    assert (name, v, sorted(ev)) == ("dipo-unlearn", "1", ["req-001", "req-002"])
    assert ev["req-001"] == {"prob_before": pytest.approx(0.96), "prob_after": pytest.approx(0.02)}
    fhash = registry["versions"][0]["tags"]["forget_set_hash"]
    with Ledger("sqlite:///data/requests/ledger.db") as led:
        for rid in ("req-001", "req-002"):
            r = led.get(rid)
            assert (r.status, r.model_name, r.model_version, r.forget_set_hash, r.reason) == ("fulfilled", "dipo-unlearn", "1", fhash, None)
            trail = led.events(rid)
            assert [(e["from_status"], e["to_status"]) for e in trail] == [
                (None, "pending"), ("pending", "pending"), ("pending", "in_progress"), ("in_progress", "fulfilled")]
            assert trail[-1]["detail"] == f"already honoured by dipo-unlearn v1: its forget set {fhash[:12]} holds every row; nothing unlearned"

    # a partly honoured request is unlearned as usual (here: the steps refuse), the honoured one is settled first
    assert runner.invoke(request_app, ["add", "req-003", "--rows", f"{b}-q03,syn-a001-q00"]).exit_code == 0
    assert runner.invoke(request_app, ["add", "req-004", "--rows", f"{a}-q05"]).exit_code == 0
    with pytest.raises(AssertionError, match="asked for the target model"):
        honour_requests(Steps())
    with Ledger("sqlite:///data/requests/ledger.db") as led:
        assert led.get("req-004").status == "fulfilled" and led.get("req-004").model_version == "1"
        r3 = led.get("req-003")
        assert r3.status == "pending" and r3.model_version is None and "asked for the target model" in r3.reason


def test_a_version_registered_without_its_rows_is_checked_against_its_forget_split_on_disk(project, tofu, monkeypatch):
    from unlearn import tracking
    from unlearn.requests.cli import request_app

    forget = tofu["forget10"]
    author = forget[0]["author_id"]
    old = version("1", [], forget_set_hash(forget), aliases=["champion"],
                  tags={"params.data.out_dir": "data/tofu", "params.data.forget_split": "forget10"})
    stale = version("2", [], forget_set_hash(forget[1:]), tags={"params.data.out_dir": "data/tofu",
                                                                 "params.data.forget_split": "forget10"})
    monkeypatch.setattr(tracking, "registered_versions", lambda p: copy.deepcopy([stale, old]))
    res = CliRunner().invoke(request_app, ["add", "req-1", "--author", author])
    assert res.exit_code == 0, res.output
    assert "already honoured by dipo-unlearn v1 [champion]" in res.output and "answer prob before=n/a after=n/a" in res.output
    # the file no longer hashes to v2's forget set: v2 is never taken as honouring
    monkeypatch.setattr(tracking, "registered_versions", lambda p: copy.deepcopy([stale]))
    res = CliRunner().invoke(request_app, ["add", "req-2", "--author", author])
    assert res.exit_code == 0 and "honoured" not in res.output
