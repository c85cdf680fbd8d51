"""``requests.mode: sequential`` without training: which registered version a step starts from, its splits, and the
gate on every earlier request (the trained end-to-end check is in test_request_cycle)."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from unlearn.data.synthetic import generate_tofu
from unlearn.config import ConfigError
from unlearn.io import stable_hash
from unlearn.requests import Ledger, build_request_splits, forget_set_hash
from unlearn.requests.sequential import BasePlan, pick_base, sequential_forget_rows


@pytest.fixture(scope="module")
def tofu() -> dict:
    return copy.deepcopy(generate_tofu(n_authors=6))


def rows_of(full, author):
    return [r for r in full if r["author_id"] == author]


def version(n, ids, aliases=()):
    return {"name": "m", "version": str(n), "aliases": list(aliases), "tags": {"request_ids": ",".join(ids)}}


def test_the_base_is_the_champion_that_covers_every_fulfilled_request():
    a, b = {"a1", "a2"}, {"b1"}
    v1 = version(1, ["req-1", "req-3"], ["champion-11111111"])
    v2 = version(2, ["req-1", "req-2"], ["champion-22222222"])
    v3 = version(3, ["req-1", "req-2"], ["challenger-22222222"])
    v4 = version(4, ["req-2"], ["champion-44444444"])
    base, why = pick_base([v1, v2, v3, v4], {})
    assert base is None and "starts from the target" in why
    # req-3 was settled by v1 (its rows are req-1's): v2 still honours it, by rows; v3 is newer but a challenger
    base, why = pick_base([v1, v2, v3, v4], {"req-1": a, "req-2": b, "req-3": {"a1"}})
    assert base is v2 and why.startswith("starting from m v2 (champion)")
    base, _ = pick_base([v1, v3, v4], {"req-1": a, "req-2": b})
    assert base is v3  # no champion covers both: the newest version that does
    base, why = pick_base([v1, v4], {"req-1": a, "req-2": b})
    assert base is None and "no registered version honours every fulfilled request (req-1, req-2)" in why
    assert "union" in why


def test_a_sequential_step_unlearns_only_the_new_rows_and_retains_no_earlier_author(tofu):
    full = tofu["full"]
    old, new = rows_of(full, "syn-a001"), rows_of(full, "syn-a002")
    assert sequential_forget_rows(new + old[:1], old) == [dict(r) for r in new]
    assert sequential_forget_rows(old[:2], old) == [dict(r) for r in old[:2]]  # never nothing to unlearn
    splits = build_request_splits(full, new, exclude_rows=old)
    assert {r["author_id"] for r in splits["forget_requests"]} == {"syn-a002"}
    assert not {"syn-a001", "syn-a002"} & {r["author_id"] for r in splits["retain_requests"]}


def test_sequential_needs_the_holdout_evidence(tmp_path):
    from unlearn.config import load_params

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"requests": {"mode": "sequential", "oracle": "retain"}}))
    with pytest.raises(ConfigError, match="requests.mode sequential needs requests.oracle none"):
        load_params(tmp_path / "params.yaml")
    assert load_params(tmp_path / "params.yaml", ["requests.oracle=none"]).requests.mode == "sequential"


EV_OK = {"ks_pvalue": 0.6, "mia_auc_loss": 0.52, "mia_auc_min_k_plus_plus": 0.47, "prob_gap": 0.01, "rouge_gap": 0.02}
EV_RELEARNED = {"ks_pvalue": 1e-9, "mia_auc_loss": 0.02, "mia_auc_min_k_plus_plus": 0.05, "prob_gap": 0.7,
                "rouge_gap": 0.8}


def test_the_gate_refuses_a_model_that_forgets_request_2_but_relearns_request_1():
    from unlearn.gate import request_gate

    target, utility = {"model_utility": 0.6}, {"model_utility": 0.59}
    assert request_gate({"req-1": EV_OK, "req-2": EV_OK}, utility, target, earlier=["req-1"]).passed
    d = request_gate({"req-1": EV_RELEARNED, "req-2": EV_OK}, utility, target, earlier=["req-1"])
    assert not d.passed and len(d.reasons) == 1 and d.reasons[0].startswith("regresses on earlier request req-1: ")
    # an earlier request the evidence leaves out is not taken on trust
    d = request_gate({"req-2": EV_OK}, utility, target, earlier=["req-1"])
    assert not d.passed and d.reasons == ["regresses on earlier request req-1: no evidence recorded for it (every "
                                          "request a model claims to honour is re-checked)"]


# --------------------------------------------------------------------------- the cycle, with recorded steps
class Recorder:
    """Cycle steps that record where each stage was pointed instead of running it; the gate is the real one."""

    evidence: dict = {}

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
        self.calls.append(("cache", target_dir))

    def forget(self, extra, *, out_dir, target_dir):
        self.calls.append(("forget", target_dir, out_dir))

    def evaluate(self, extra, *, model_path, name, retain_dir, target_dir):
        self.calls.append(("evaluate", name, model_path, target_dir))
        return {"model_utility": 0.6}

    def request_evidence(self, *, model_path, request_ids, earlier):
        self.calls.append(("evidence", model_path, tuple(request_ids), tuple(earlier)))
        return {"per_request": {r: self.evidence[r] for r in request_ids}, "earlier": list(earlier),
                "holdout_split": "holdout10"}

    def register(self, extra, *, model_path, request_ids, request_gate=None):
        from unlearn.gate import request_gate as gate

        self.calls.append(("register", tuple(request_ids), request_gate))
        d = gate(request_gate["per_request"], {"model_utility": 0.6}, {"model_utility": 0.6},
                 earlier=request_gate["earlier"])
        return {"passed": d.passed, "reasons": d.reasons, "version": "2" if d.passed else None,
                "registered_model": "m"}


@pytest.fixture
def sequential_project(tmp_path, monkeypatch, tofu):
    """Synthetic data, a ledger where req-1 is fulfilled by m v1, and a registry (faked) holding v1 as champion,
    its model files in a directory of their own."""
    from unlearn import tracking
    from unlearn.data.splits import write_splits
    from unlearn.requests.verify import weight_files

    write_splits(tofu, tmp_path / "data" / "tofu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"requests": {"mode": "sequential"},
                                                          "tracking": {"uri": f"sqlite:///{tmp_path / 'no.db'}"}}))
    monkeypatch.chdir(tmp_path)
    v1_dir = tmp_path / "mlartifacts" / "run1" / "artifacts" / "model"
    v1_dir.mkdir(parents=True)
    (v1_dir / "config.json").write_text("{}")
    (v1_dir / "model.safetensors").write_bytes(b"weights of v1")
    files = weight_files(v1_dir)
    v1 = {"name": "m", "version": "1", "aliases": ["champion", "champion-aaaaaaaa"], "run_id": "run1",
          "tags": {"request_ids": "req-1", "model_weight_files": json.dumps(files),
                   "model_weights_sha256": stable_hash(files)}}
    monkeypatch.setattr(tracking, "registered_versions", lambda p: [v1])
    monkeypatch.setattr(tracking, "version_model_dir", lambda p, info: v1_dir if info["version"] == "1" else None)
    with Ledger("sqlite:///data/requests/ledger.db") as led:
        led.add("req-1", "author", "syn-a001", known_rows=tofu["full"])
        led.mark_in_progress(["req-1"])
        led.mark_fulfilled(["req-1"], "m", "1", forget_set_hash(rows_of(tofu["full"], "syn-a001")))
        led.add("req-2", "author", "syn-a002", known_rows=tofu["full"])
    return {"v1": v1, "v1_dir": v1_dir, "weights": stable_hash(files)}


def test_the_second_request_starts_from_the_first_requests_champion_and_is_gated_on_both(sequential_project, tofu):
    from unlearn.requests.cycle import CycleSteps, RequestPaths, honour_requests
    from unlearn.requests.forget_set import read_request_splits

    class Steps(Recorder, CycleSteps):
        evidence = {"req-1": EV_OK, "req-2": EV_OK}

    steps = Steps()
    out = honour_requests(steps)
    v1_dir = str(sequential_project["v1_dir"])
    assert out["status"] == "fulfilled" and out["mode"] == "sequential" and out["started_from"] == v1_dir
    assert out["base"]["version"] == "1" and out["base"]["weights_sha256"] == sequential_project["weights"]
    paths = RequestPaths(out["forget_set"]["forget_set_hash"], sequential_project["weights"])
    assert paths.key.endswith(f"-on-{sequential_project['weights'][:12]}")
    unlearned = str(paths.unlearned_dir)
    # the reference cache and the unlearning start from v1's registered model files, not the target
    assert ("cache", v1_dir) in steps.calls and ("forget", v1_dir, unlearned) in steps.calls
    # utility is still measured against the original target
    assert ("evaluate", "target", "models/target", "models/target") in steps.calls
    assert ("evaluate", "unlearned", unlearned, "models/target") in steps.calls
    # the evidence covers both requests; req-1 is the earlier one
    assert ("evidence", unlearned, ("req-1", "req-2"), ("req-1",)) in steps.calls
    reg = next(c for c in steps.calls if c[0] == "register")
    assert reg[1] == ("req-1", "req-2") and reg[2]["mode"] == "sequential"
    assert reg[2]["base"] == {"name": "m", "version": "1", "weights_sha256": sequential_project["weights"]}
    # the splits: forget = req-2's rows only; retain has neither author
    splits, manifest = read_request_splits(paths.splits_dir)
    assert {r["author_id"] for r in splits["forget_requests"]} == {"syn-a002"}
    assert len(splits["forget_requests"]) == len(rows_of(tofu["full"], "syn-a002"))
    assert not {"syn-a001", "syn-a002"} & {r["author_id"] for r in splits["retain_requests"]}
    with Ledger("sqlite:///data/requests/ledger.db") as led:
        assert (led.get("req-2").status, led.get("req-2").model_version) == ("fulfilled", "2")
        assert (led.get("req-1").status, led.get("req-1").model_version) == ("fulfilled", "1")


def test_a_sequential_model_that_relearns_request_1_is_refused_naming_it(sequential_project):
    from unlearn.requests.cycle import CycleSteps, honour_requests

    class Steps(Recorder, CycleSteps):
        evidence = {"req-1": EV_RELEARNED, "req-2": EV_OK}

    out = honour_requests(Steps())
    assert out["status"] == "gate_failed" and out["started_from"] == str(sequential_project["v1_dir"])
    assert len(out["decision"]["reasons"]) == 1
    assert out["decision"]["reasons"][0].startswith("regresses on earlier request req-1: ks_pvalue 1e-09 < ")
    with Ledger("sqlite:///data/requests/ledger.db") as led:
        r2 = led.get("req-2")
        assert r2.status == "pending" and "regresses on earlier request req-1" in r2.reason
        assert (led.get("req-1").status, led.get("req-1").model_version) == ("fulfilled", "1")


def test_a_swapped_base_weight_file_stops_the_step_naming_it(sequential_project):
    from unlearn.requests.cycle import CycleSteps, honour_requests

    class Steps(Recorder, CycleSteps):
        evidence = {"req-1": EV_OK, "req-2": EV_OK}

    (sequential_project["v1_dir"] / "model.safetensors").write_bytes(b"other weights")
    steps = Steps()
    with pytest.raises(RuntimeError, match="will not start from a model whose weights changed .*model.safetensors"):
        honour_requests(steps)
    assert not [c for c in steps.calls if c[0] in ("cache", "forget")]
    with Ledger("sqlite:///data/requests/ledger.db") as led:
        assert led.get("req-2").status == "pending" and "RuntimeError" in led.get("req-2").reason


def test_without_a_base_covering_every_request_it_unlearns_the_union_from_the_target(sequential_project, monkeypatch):
    from unlearn import tracking
    from unlearn.requests.cycle import CycleSteps, honour_requests

    monkeypatch.setattr(tracking, "registered_versions", lambda p: [])  # v1 deleted

    class Steps(Recorder, CycleSteps):
        evidence = {"req-1": EV_OK, "req-2": EV_OK}

    steps = Steps()
    out = honour_requests(steps)
    assert out["started_from"] == "models/target" and out["base"] is None and "union" in out["plan"]
    assert out["forget_set"]["mode"] == "union" and out["forget_set"]["rows"] == 2 * len(
        [r for r in generate_tofu(n_authors=6)["full"] if r["author_id"] == "syn-a001"])
    assert ("forget", "models/target", next(c[2] for c in steps.calls if c[0] == "forget")) in steps.calls
