"""MUSE end to end on the built-in default, as a user runs it: `dvc repro muse/dvc.yaml` in a fresh copy.

synthetic MUSE-format news -> GX validation -> target/retain models on text chunks -> reference cache ->
DiPO -> MUSE evaluation (VerbMem, KnowMem, MIA, PrivLeak) -> sustainability and scalability sequences
-> gated MLflow registration under `unlearned-muse`. A second `dvc repro` runs nothing.
Slow (a few minutes on 2 cores): the models are really trained, with the project's muse/params.yaml.
"""

from __future__ import annotations

import pytest

from helpers import copy_project, sh
from unlearn.io import read_json

pytestmark = pytest.mark.slow

PIPELINE = "muse/dvc.yaml"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    work = copy_project(tmp_path_factory.mktemp("muse"))
    res = sh(["dvc", "repro", PIPELINE], work)
    return {"dir": work, "first": res.stdout + res.stderr}


def _metrics(repo, name):
    return read_json(repo["dir"] / "muse" / "reports" / "eval" / name / "metrics.json")


def test_pipeline_ran_every_stage_and_validated(repo):
    for stage in ("prepare", "tokenizer", "validate", "finetune_target", "finetune_retain", "cache", "forget",
                  "evaluate_retain", "evaluate_target", "evaluate_unlearned", "sustainability", "scalability",
                  "register"):
        assert f"Running stage '{PIPELINE}:{stage}'" in repo["first"], stage
    assert read_json(repo["dir"] / "muse" / "reports" / "validation" / "result.json")["success"] is True
    for role in ("target", "retain", "unlearned"):
        assert (repo["dir"] / "muse" / "models" / role / "model.safetensors").stat().st_size > 100_000


def test_target_memorises_the_forget_articles_and_the_retain_model_does_not(repo):
    t, r = _metrics(repo, "target"), _metrics(repo, "retain")
    # The retain model never saw fold1, but every synthetic article shares the template language, so its
    # continuations overlap the truth by ROUGE-L ~0.3 (measured 0.31; the target 0.95).
    assert t["verbmem_forget"] >= 0.8 and r["verbmem_forget"] <= 0.4, (t, r)
    assert t["knowmem_forget"] > r["knowmem_forget"] + 0.2, (t, r)
    assert t["knowmem_retain"] > 0.5 and r["knowmem_retain"] > 0.5, (t, r)  # both trained on the retain text


def test_privleak_orientation(repo):
    """MUSE's orientation: the retain model is 0 by construction, a memorising target strongly negative."""
    t, r = _metrics(repo, "target"), _metrics(repo, "retain")
    assert r["privleak"] == pytest.approx(0.0)
    assert t["privleak"] < -50, t


def test_dipo_forgets_and_the_gate_decides(repo):
    t, u = _metrics(repo, "target"), _metrics(repo, "unlearned")
    assert u["verbmem_forget"] < 0.5 * t["verbmem_forget"], (t, u)
    assert u["knowmem_retain"] >= 0.5 * t["knowmem_retain"], (t, u)
    decision = read_json(repo["dir"] / "muse" / "reports" / "register" / "decision.json")
    if decision["passed"]:
        assert decision["version"] is not None and decision["registered_model"] == "unlearned-muse"
    else:  # refused: with the reason, and nothing registered
        assert decision["reasons"] and decision["version"] is None


def test_sequences_record_every_step_and_plot(repo):
    rdir = repo["dir"] / "muse" / "reports" / "sequences"
    sust = read_json(rdir / "sustainability.json")
    scal = read_json(rdir / "scalability.json")
    assert [pt["forget_set"] for pt in sust[1:]] == ["fold1", "fold2", "fold3", "fold4"]
    assert [pt["forget_set"] for pt in scal[1:]] == ["fold1", "fold1-2", "fold1-3"]
    assert [pt["forget_articles"] for pt in scal[1:]] == sorted(pt["forget_articles"] for pt in scal[1:])
    for pt in sust[1:] + scal[1:]:
        assert pt["privleak"] is not None and pt["knowmem_retain"] is not None, pt
    for kind in ("sustainability", "scalability"):
        assert (rdir / f"{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_repro_runs_nothing(repo):
    res = sh(["dvc", "repro", PIPELINE], repo["dir"])
    assert "Running stage" not in res.stdout + res.stderr, res.stdout
    assert "up to date" in sh(["dvc", "status", PIPELINE], repo["dir"]).stdout
