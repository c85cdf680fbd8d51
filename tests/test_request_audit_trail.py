"""The tamper-evident audit trail: the ledger's hash chain, its migration, and `verify_store` over versions
(no models: weight files are small files written here; the trained end-to-end check is in test_request_cycle)."""

from __future__ import annotations

import copy
import json
import sqlite3

import pytest

from unlearn.data.synthetic import generate_tofu
from unlearn.io import stable_hash
from unlearn.requests import Ledger, forget_set_hash
from unlearn.requests.ledger import GENESIS
from unlearn.requests.verify import verify_store, weight_files


@pytest.fixture(scope="module")
def full() -> list[dict]:
    return copy.deepcopy(generate_tofu(n_authors=6)["full"])


def filled(url, full):
    with Ledger(url) as led:
        led.add("r1", "author", "syn-a001", known_rows=full)
        led.add("r2", "author", "syn-a002", known_rows=full)
        led.mark_in_progress(["r1", "r2"], detail="run 1")
        led.mark_fulfilled(["r1"], "m", 1, "a" * 64)
        led.mark_failed(["r2"], "gate failed: forget_quality 0.01 < 0.05")
        led.note("r2", "looked at by an operator")
        return led.chain_head()


def sql(path, stmt, *args):
    con = sqlite3.connect(path)
    con.execute(stmt, args)
    con.commit()
    con.close()


def test_every_event_links_to_the_previous_one_and_an_untouched_ledger_verifies(tmp_path, full):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    head = filled(url, full)
    with Ledger(url) as led:
        evs = led.events()
        assert evs[0]["prev_hash"] == GENESIS
        assert all(b["prev_hash"] == a["event_hash"] for a, b in zip(evs, evs[1:]))
        assert head == evs[-1]["event_hash"] and len(set(e["event_hash"] for e in evs)) == len(evs)
        rep = led.verify()
    assert rep.ok and rep.problems == [] and rep.events == len(evs) == 7 and rep.head == head
    assert rep.render().startswith(f"ledger: 7 event(s) over 2 request(s), chain head {head[:12]}: OK")


@pytest.mark.parametrize("tamper, expect", [
    ("UPDATE request_events SET detail = 'fulfilled by m v9' WHERE event_id = 5",
     "edited event: event 5 (r1 in_progress -> fulfilled) no longer hashes"),
    ("DELETE FROM request_events WHERE event_id = 5",
     "deleted event: the chain breaks after event 4: event 6 (r2 in_progress -> pending) does not link"),
    ("DELETE FROM request_events WHERE event_id = 7", "the latest event(s) after event 6 were deleted"),
    ("UPDATE deletion_requests SET model_version = '9' WHERE request_id = 'r1'",
     "edited row: request r1 (status=fulfilled, model=m v9"),
    ("UPDATE deletion_requests SET status = 'fulfilled' WHERE request_id = 'r2'", "edited row: request r2"),
    ("DELETE FROM deletion_requests WHERE request_id = 'r2'", "deleted row: request r2"),
])
def test_verify_names_an_edited_or_deleted_event_or_row(tmp_path, full, tamper, expect):
    filled(f"sqlite:///{tmp_path / 'l.db'}", full)
    sql(tmp_path / "l.db", tamper)
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as led:
        rep = led.verify()
    assert not rep.ok
    assert any(expect in p for p in rep.problems), rep.problems


def test_an_edited_event_rehashed_still_breaks_the_next_link(tmp_path, full):
    from unlearn.requests.ledger import event_digest

    filled(f"sqlite:///{tmp_path / 'l.db'}", full)
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as led:
        ev = led.events()[4]
    ev["detail"] = "fulfilled by m v9"
    sql(tmp_path / "l.db", "UPDATE request_events SET detail = ?, event_hash = ? WHERE event_id = 5", ev["detail"],
        event_digest(ev))
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as led:
        rep = led.verify()
    assert any(p.startswith("deleted event: the chain breaks after event 5: event 6") for p in rep.problems)


def test_a_ledger_written_before_the_chain_is_migrated_and_says_so(tmp_path, full):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)  # the schema of the ledger before the hash chain
    con.executescript("""
        CREATE TABLE deletion_requests (request_id VARCHAR(128) PRIMARY KEY, subject_type VARCHAR(16) NOT NULL,
          subject TEXT NOT NULL, received_at VARCHAR(40) NOT NULL, status VARCHAR(16) NOT NULL, reason TEXT,
          model_name VARCHAR(256), model_version VARCHAR(64), forget_set_hash VARCHAR(64), updated_at VARCHAR(40) NOT NULL,
          CONSTRAINT ck_deletion_requests_status CHECK (status IN ('pending', 'in_progress', 'fulfilled', 'rejected')));
        CREATE TABLE request_events (event_id INTEGER PRIMARY KEY, request_id VARCHAR(128) NOT NULL
          REFERENCES deletion_requests (request_id), at VARCHAR(40) NOT NULL, from_status VARCHAR(16),
          to_status VARCHAR(16) NOT NULL, detail TEXT);
        INSERT INTO deletion_requests VALUES ('old-1', 'author', 'syn-a001', '2024-01-01T00:00:00.000000+00:00',
          'pending', NULL, NULL, NULL, NULL, '2024-01-01T00:00:00.000000+00:00');
        INSERT INTO request_events (request_id, at, from_status, to_status, detail)
          VALUES ('old-1', '2024-01-01T00:00:00.000000+00:00', NULL, 'pending', 'accepted');
    """)
    con.close()
    with Ledger(f"sqlite:///{db}") as led:
        rep = led.verify()
        assert rep.ok and rep.events == 1 and "the first 1 event(s) predate the hash chain" in rep.migrated
        led.mark_in_progress(["old-1"])  # and it keeps working, chained
        led.add("new-1", "author", "syn-a002", known_rows=full)
        assert led.verify().ok
    with Ledger(f"sqlite:///{db}") as led:  # opening again does not migrate again
        assert led.verify().ok and led.events()[1]["prev_hash"] == led.events()[0]["event_hash"]


# --------------------------------------------------------------------------- verify_store: weights, forget set, anchor
def model_dir(root, name="m"):
    d = root / name
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights-1")
    (d / "config.json").write_text("{}")
    return d


def version_of(d, fhash, head, **tags):
    files = weight_files(d)
    return {"name": "m", "version": "1", "run_id": "run-1",
            "tags": {"forget_set_hash": fhash, "model_weights_sha256": stable_hash(files),
                     "model_weight_files": json.dumps(files), "ledger_chain_head": head, **tags}}


def test_verify_store_passes_untouched_and_names_a_swapped_file_a_changed_forget_split_a_rewritten_ledger(tmp_path, full):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    rows = [r for r in full if r["author_id"] == "syn-a001"]
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "forget_requests.json").write_text(json.dumps(rows))
    fhash = forget_set_hash(rows)
    with Ledger(url) as led:
        led.add("r1", "author", "syn-a001", known_rows=full)
        led.mark_in_progress(["r1"])
        head = led.chain_head()
        led.mark_fulfilled(["r1"], "m", 1, fhash)
    d = model_dir(tmp_path)
    v = version_of(d, fhash, head, **{"params.data.out_dir": str(tmp_path / "splits"),
                                      "params.data.forget_split": "forget_requests"})
    with Ledger(url) as led:
        rep = verify_store(led, [v], model_files=lambda info: d)
    assert rep.ok, rep.render()
    assert "verify: OK" in rep.render() and "1 weight file(s) match" in rep.render()

    (d / "model.safetensors").write_bytes(b"weights-2")  # the weight file swapped
    with Ledger(url) as led:
        rep = verify_store(led, [v], model_files=lambda info: d)
    assert not rep.ok
    assert [p for p in rep.problems if p.startswith("swapped weight file: m v1") and "model.safetensors has sha256" in p]
    (d / "model.safetensors").write_bytes(b"weights-1")

    (tmp_path / "splits" / "forget_requests.json").write_text(json.dumps(rows[1:]))  # a row taken out of the split
    with Ledger(url) as led:
        rep = verify_store(led, [v], model_files=lambda info: d)
    assert any("forget set: m v1: its forget split" in p and "the file was changed" in p for p in rep.problems)
    (tmp_path / "splits" / "forget_requests.json").write_text(json.dumps(rows))

    (tmp_path / "l.db").unlink()  # the ledger rebuilt from scratch: a consistent chain, but not the one v1 saw
    with Ledger(url) as led:
        led.add("r1", "author", "syn-a001", known_rows=full)
        led.mark_in_progress(["r1"])
        led.mark_fulfilled(["r1"], "m", 1, fhash)
        rep = verify_store(led, [v], model_files=lambda info: d)
    assert rep.ledger.ok and any(p.startswith("ledger rewritten: m v1 was registered at chain head") for p in rep.problems)


# --------------------------------------------------------------------------- no endless retries
def test_a_request_that_fails_the_gate_max_attempts_times_needs_attention(tmp_path, full):
    from unlearn.requests.cycle import settle

    url = f"sqlite:///{tmp_path / 'l.db'}"
    with Ledger(url) as led:
        led.add("r1", "author", "syn-a001", known_rows=full)
        led.add("r2", "author", "syn-a002", known_rows=full)
        led.mark_in_progress(["r1"])
        led.mark_failed(["r1"], "RuntimeError: disk full")  # a crash is not a gate failure: not counted
    refused = {"passed": False, "version": None, "reasons": ["forget_quality 0.01 < min_forget_quality 0.05"],
               "metrics": {"forget_quality": 0.01}}
    for attempt in (1, 2, 3):
        ids = ["r1", "r2"] if attempt < 3 else ["r1"]
        with Ledger(url) as led:
            led.mark_in_progress(ids)
        decision = dict(refused)
        assert settle(url, ids, decision, "h" * 64, max_attempts=3,
                      evidence={"r1": {"ks_pvalue": 0.01}}) == "gate_failed"
        with Ledger(url) as led:
            if attempt < 3:
                assert led.get("r1").status == "pending" and f"attempt {attempt} of 3" in led.get("r1").reason
                assert decision["needs_attention"] == []
    with Ledger(url) as led:
        r1 = led.get("r1")
        assert r1.status == "needs_attention" and decision["needs_attention"] == ["r1"]
        assert "the gate failed 3 time(s) (requests.max_attempts=3)" in r1.reason
        assert "forget_quality 0.01 < min_forget_quality 0.05" in r1.reason and '"ks_pvalue": 0.01' in r1.reason
        assert led.pending() == [led.get("r2")]  # r2 failed twice: still retried; r1 is not
        assert led.gate_attempts("r1") == 3 and led.gate_attempts("r2") == 2
        led.retry(["r1"], "method changed to npo")
        assert led.get("r1").status == "pending" and led.gate_attempts("r1") == 0
        led.mark_in_progress(["r1"])
        assert led.mark_gate_failed(["r1"], "again", max_attempts=3) == {"r1": "pending"}
        assert led.verify().ok


def test_an_old_ledger_gets_the_needs_attention_status(tmp_path, full):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE deletion_requests (request_id VARCHAR(128) PRIMARY KEY, subject_type VARCHAR(16) NOT NULL,
          subject TEXT NOT NULL, received_at VARCHAR(40) NOT NULL, status VARCHAR(16) NOT NULL, reason TEXT,
          model_name VARCHAR(256), model_version VARCHAR(64), forget_set_hash VARCHAR(64), updated_at VARCHAR(40) NOT NULL,
          CONSTRAINT ck_deletion_requests_status CHECK (status IN ('pending', 'in_progress', 'fulfilled', 'rejected')));
        CREATE TABLE request_events (event_id INTEGER PRIMARY KEY, request_id VARCHAR(128) NOT NULL,
          at VARCHAR(40) NOT NULL, from_status VARCHAR(16), to_status VARCHAR(16) NOT NULL, detail TEXT);
    """)
    con.close()
    with Ledger(f"sqlite:///{db}") as led:
        led.add("r1", "author", "syn-a001", known_rows=full)
        led.mark_in_progress(["r1"])
        assert led.mark_gate_failed(["r1"], "no", max_attempts=1) == {"r1": "needs_attention"}
        assert led.get("r1").status == "needs_attention" and led.verify().ok


# --------------------------------------------------------------------------- oracle-free evidence and its gate
def test_holdout_evidence_and_the_request_gate_name_a_regressed_earlier_request():
    import numpy as np

    from unlearn.gate import request_gate
    from unlearn.requests.evidence import holdout_evidence

    rng = np.random.default_rng(0)
    held = {"truth_ratio": [None] * 40, "prob": list(rng.uniform(0.1, 0.3, 40)), "rouge": list(rng.uniform(0, 0.3, 40)),
            **{f"mia_{a}": list(rng.uniform(2, 3, 40)) for a in ("loss", "zlib", "min_k", "min_k_plus_plus")}}
    forgotten = {"truth_ratio": [None] * 20, "prob": list(rng.uniform(0.1, 0.3, 20)),
                 "rouge": list(rng.uniform(0, 0.3, 20)),
                 **{f"mia_{a}": list(rng.uniform(2, 3, 20)) for a in ("loss", "zlib", "min_k", "min_k_plus_plus")}}
    relearned = {"truth_ratio": [None] * 20, "prob": list(rng.uniform(0.8, 0.95, 20)), "rouge": [0.9] * 20,
                 **{f"mia_{a}": list(rng.uniform(0.1, 0.3, 20)) for a in ("loss", "zlib", "min_k", "min_k_plus_plus")}}
    ok, bad = holdout_evidence(forgotten, held), holdout_evidence(relearned, held)
    assert ok["ks_on"] == "prob" and ok["ks_pvalue"] > 0.05 and abs(ok["mia_auc_loss"] - 0.5) < 0.2
    assert bad["ks_pvalue"] < 1e-6 and bad["mia_auc_loss"] == 0.0 and bad["privleak"] == -100.0
    assert bad["prob_gap"] > 0.5 and bad["rouge_gap"] > 0.5
    target, good_utility = {"model_utility": 0.6}, {"model_utility": 0.58}
    assert request_gate({"req-1": ok, "req-2": ok}, good_utility, target).passed
    # forgets request 2 but relearns request 1 (honoured by an earlier version): refused, request 1 named
    d = request_gate({"req-1": bad, "req-2": ok}, good_utility, target, earlier=["req-1"])
    assert not d.passed and len(d.reasons) == 1
    assert d.reasons[0].startswith("regresses on earlier request req-1: ks_pvalue") and "mia_auc_loss 0 is 0.5" in d.reasons[0]
    d = request_gate({"req-2": ok}, {"model_utility": 0.3}, target, min_utility_ratio=0.9)
    assert d.reasons == ["model_utility 0.3 < 0.9 x target 0.6 = 0.54 (ratio 0.500)"]


class Recorder:
    """Cycle steps that record what they were asked to do instead of doing it."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = []

    def before_intake(self):
        pass

    def target(self):
        return "models/target"

    def finetune(self, extra, *, role, out_dir):
        self.calls.append(("finetune", role))

    def cache(self, extra, *, target_dir):
        self.calls.append(("cache",))

    def forget(self, extra, *, out_dir, target_dir):
        self.calls.append(("forget",))

    def evaluate(self, extra, *, model_path, name, **kw):
        self.calls.append(("evaluate", name))
        return {}

    def request_evidence(self, *, model_path, request_ids, earlier):
        self.calls.append(("evidence", tuple(request_ids), tuple(earlier)))
        return {"per_request": {}, "earlier": earlier, "holdout_split": "holdout10"}

    def register(self, extra, *, model_path, request_ids, request_gate=None):
        self.calls.append(("register", request_gate is not None))
        return {"passed": False, "version": None, "reasons": ["stub"]}


@pytest.mark.parametrize("oracle", ["none", "retain"])
def test_the_cycle_trains_a_retain_model_only_with_the_retain_oracle(tmp_path, monkeypatch, full, oracle):
    import yaml

    from unlearn.data.splits import write_splits
    from unlearn.requests.cycle import CycleSteps, honour_requests

    tofu = generate_tofu(n_authors=6)
    write_splits(tofu, tmp_path / "data" / "tofu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"requests": {"oracle": oracle, "max_attempts": 2},
                                                          "tracking": {"uri": f"sqlite:///{tmp_path / 'no.db'}"}}))
    monkeypatch.chdir(tmp_path)

    class Steps(Recorder, CycleSteps):
        pass

    with Ledger("sqlite:///data/requests/ledger.db") as led:
        led.add("req-1", "author", "syn-a001", known_rows=tofu["full"])
    for attempt in (1, 2):
        steps = Steps()
        out = honour_requests(steps)
        assert out["status"] == "gate_failed"
        trained = [c for c in steps.calls if c[0] == "finetune"]
        assert trained == ([("finetune", "retain")] if oracle == "retain" else [])
        assert (("evidence", ("req-1",), ()) in steps.calls) == (oracle == "none")
        assert ("register", oracle == "none") in steps.calls
    with Ledger("sqlite:///data/requests/ledger.db") as led:  # max_attempts 2: not retried by a third run
        assert led.get("req-1").status == "needs_attention"
    assert honour_requests(Steps())["status"] == "idle"



def test_the_request_gate_is_one_sided_over_unlearned_rows_pass_remembered_rows_fail():
    """A deletion asks "is it still known better than rows never trained on?": rows the model now knows *worse*
    (over-unlearning: AUC near 1, negative gaps) honour the request; rows known better fail, on every check."""
    import numpy as np
    import scipy.stats

    from unlearn.gate import request_checks
    from unlearn.requests.evidence import holdout_evidence

    rng = np.random.default_rng(1)
    attacks = ("loss", "zlib", "min_k", "min_k_plus_plus")
    held = {"truth_ratio": [None] * 40, "prob": list(rng.uniform(0.3, 0.5, 40)), "rouge": list(rng.uniform(0.2, 0.4, 40)),
            **{f"mia_{a}": list(rng.uniform(2, 3, 40)) for a in attacks}}

    def rows(lo, hi, mia_lo, mia_hi):
        return {"truth_ratio": [None] * 20, "prob": list(rng.uniform(lo, hi, 20)), "rouge": list(rng.uniform(lo, hi, 20)),
                **{f"mia_{a}": list(rng.uniform(mia_lo, mia_hi, 20)) for a in attacks}}

    over_rows, remembered_rows = rows(0.0, 0.1, 4, 5), rows(0.7, 0.9, 0.5, 1)
    over, remembered = holdout_evidence(over_rows, held), holdout_evidence(remembered_rows, held)
    assert over["mia_auc_loss"] == 1.0 and over["prob_gap"] < 0 and over["rouge_gap"] < 0
    assert request_checks(over) == []  # the two-sided gate refused this (and the retain model itself)
    why = request_checks(remembered)
    assert len(why) == 5 and why[0].startswith("ks_pvalue") and "still look trained on" in why[1]
    # the KS p-value is the one-sided one, in the remembered direction (scipy's 'less': the first sample larger)
    for ev, r in ((over, over_rows), (remembered, remembered_rows)):
        assert ev["ks_pvalue"] == pytest.approx(scipy.stats.ks_2samp(r["prob"], held["prob"], alternative="less").pvalue)
    assert over["ks_pvalue"] == pytest.approx(1.0) and remembered["ks_pvalue"] < 1e-6
