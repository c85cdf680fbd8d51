"""Evaluation during training (``method.eval_every``) and checkpoint selection (``method.select``).

The rule is a pure function of the logged history (checked on histories written here by hand); the loop
evaluates without changing the run, and stops at the step the rule picks; the forget stage logs the
evaluations, writes the DVC plot and records which step it kept.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import TINY_ARCH
from unlearn import train as T
from unlearn.config import ArchCfg, MethodCfg
from unlearn.methods.selection import eval_curve, select_step
from unlearn.models.build import build_model, train_tokenizer
from unlearn.models.formatting import collate, encode_many
from unlearn.models.scoring import mean_nll


def _history(values: dict[int, float], steps: int = 8) -> list[dict]:
    """One entry per step; ``values`` maps the evaluated steps to their forget probability."""
    out = []
    for s in range(1, steps + 1):
        e = {"step": s, "epoch": 0, "lr": 0.1, "loss": 1.0 / s}
        if s in values:
            e.update(eval_forget_prob=values[s], eval_retain_prob=0.9)
        out.append(e)
    return out


def test_the_rule_keeps_the_first_evaluated_step_at_or_below_the_retain_model():
    h = _history({2: 0.8, 4: 0.31, 6: 0.3, 8: 0.1})
    assert select_step(h, "forget_prob_at_retain", 0.3)["step"] == 6  # at, not only below
    assert select_step(h, "forget_prob_at_retain", 0.305)["step"] == 6
    assert select_step(h, "forget_prob_at_retain", 0.5)["step"] == 4  # the first one, not the lowest
    assert select_step(h, "forget_prob_at_retain", 0.05) is None  # never reached: nothing picked (the last is kept)
    assert select_step(h, "last", 0.3) is None
    # Steps without an evaluation are never picked, whatever else they log.
    h[0]["forget_prob"] = 0.0
    assert select_step(h, "forget_prob_at_retain", 0.9)["step"] == 2
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_step(h, "best", 0.3)
    with pytest.raises(ValueError, match="retain_value"):
        select_step(h, "forget_prob_at_retain")
    assert eval_curve(h, 0.3) == [
        {"step": s, "forget_prob": v, "retain_prob": 0.9, "retain_model_forget_prob": 0.3}
        for s, v in ((2, 0.8), (4, 0.31), (6, 0.3), (8, 0.1))]


def test_the_knowmem_rule_compares_knowmem_not_the_forget_probability():
    """MUSE's published rule: the first step whose KnowMem on the forget QA is at or below the retain model's."""
    h = _history({2: 0.1, 4: 0.05, 6: 0.01})  # forget probabilities that would satisfy the other rule early
    for s, km in ((2, 0.6), (4, 0.41), (6, 0.4)):
        h[s - 1]["eval_knowmem_forget"] = km
    assert select_step(h, "knowmem_at_retain", 0.4)["step"] == 6
    assert select_step(h, "knowmem_at_retain", 0.5)["step"] == 4
    assert select_step(h, "forget_prob_at_retain", 0.5)["step"] == 2
    assert select_step(h, "knowmem_at_retain", 0.3) is None
    assert eval_curve(h, 0.4, "knowmem_at_retain")[-1] == {
        "step": 6, "forget_prob": 0.01, "retain_prob": 0.9, "knowmem_forget": 0.4, "retain_model_knowmem_forget": 0.4}


def test_the_knowmem_rule_needs_muse():
    from unlearn.config import ConfigError, load_params

    with pytest.raises(ConfigError, match="knowmem_at_retain needs benchmark muse"):
        load_params("params.yaml", ["method.eval_every=2", "method.select=knowmem_at_retain"])
    p = load_params("muse/params.yaml", ["method.eval_every=2", "method.select=knowmem_at_retain"])
    assert p.method.select == "knowmem_at_retain"


def test_select_needs_evaluations():
    with pytest.raises(ValueError, match="eval_every"):
        MethodCfg(select="forget_prob_at_retain")
    assert MethodCfg(select="forget_prob_at_retain", eval_every=2).select == "forget_prob_at_retain"


QA = [(f"What did author {i} write?", f"Author {i} wrote the book number {i * 7}.") for i in range(8)]


def _loop(cfg: T.LoopCfg, evaluate=None, stop=None):
    tok = train_tokenizer([q + " " + a for q, a in QA] * 4, 300)
    model = build_model(ArchCfg(**TINY_ARCH), tok, 0)
    enc = encode_many(tok, [q for q, _ in QA], [a for _, a in QA], 48)

    def step_loss(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return mean_nll(logits, b["labels"], b.get("n_tokens")), {}

    probe = collate(enc[:4], tok.pad_token_id)

    def nll(m):
        return {"nll": float(mean_nll(m(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits,
                                     probe["labels"]))}

    ev = (lambda m: evaluate(m, nll)) if evaluate else None
    log = T.train_loop(model, len(enc), lambda idx, ep: collate([enc[i] for i in idx], tok.pad_token_id),
                       step_loss, cfg, evaluate=ev, stop=stop)
    return model, log


def test_the_loop_evaluates_without_changing_the_run_and_stops_where_the_rule_says():
    cfg = T.LoopCfg(epochs=3, batch_size=2, lr=0.01, seed=0, eval_every=3)  # 12 steps
    modes = []

    def evaluate(m, nll):
        modes.append((m.training, torch.is_grad_enabled()))
        return nll(m)

    plain, log_plain = _loop(cfg)
    evald, log = _loop(cfg, evaluate)
    assert [e["step"] for e in log if "eval_nll" in e] == [3, 6, 9, 12]
    assert modes == [(False, False)] * 4  # eval mode, no gradients
    assert [e["loss"] for e in log] == [e["loss"] for e in log_plain]  # the same run, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), evald.parameters()))
    # The rule picks step 6 (the first evaluation below a threshold between steps 3's and 6's values): the run
    # ends there, with the weights the full run had after step 6.
    threshold = (log[2]["eval_nll"] + log[5]["eval_nll"]) / 2
    assert log[5]["eval_nll"] < threshold < log[2]["eval_nll"]
    stopped, short = _loop(cfg, evaluate, stop=lambda h: any(e.get("eval_nll", 1e9) <= threshold for e in h))
    assert [e["step"] for e in short] == [1, 2, 3, 4, 5, 6]
    six, _ = _loop(T.LoopCfg(epochs=3, batch_size=2, lr=0.01, seed=0, eval_every=3),
                   evaluate, stop=lambda h: len(h) == 6)
    assert all(torch.equal(a, b) for a, b in zip(stopped.parameters(), six.parameters()))
    assert short[-1]["eval_nll"] == log[5]["eval_nll"]


@pytest.mark.slow
def test_forget_stage_keeps_the_step_the_rule_picks_and_logs_the_evaluations(tiny_project, tmp_path):
    from unlearn import stages
    from unlearn.config import load_params

    cwd = os.getcwd()
    os.chdir(tiny_project)
    try:
        over = ["method.eval_every=1", "method.eval_rows=8", "method.epochs=4"]
        last = stages.forget(load_params("params.yaml", over), out_dir=tmp_path / "last")
        picked = stages.forget(load_params("params.yaml", over + ["method.select=forget_prob_at_retain"]),
                               out_dir=tmp_path / "picked")
    finally:
        os.chdir(cwd)
    full_log = json.loads((tmp_path / "last.reports" / "loss.json").read_text())
    curve = json.loads((tmp_path / "picked.reports" / "eval.json").read_text())
    assert all("eval_forget_prob" in e and "eval_retain_prob" in e for e in full_log)  # every step evaluated
    retain_value = picked["retain_model_forget_prob"]
    below = [e["step"] for e in full_log if e["eval_forget_prob"] <= retain_value]
    assert below, "the tiny run must reach the retain model's forget probability for this test to mean something"
    assert picked["select"] == "forget_prob_at_retain" and picked["selected_step"] == below[0]
    assert picked["steps"] == below[0] < last["steps"]  # the run stopped at the kept step
    assert [r["step"] for r in curve] == list(range(1, below[0] + 1))
    assert curve[-1]["forget_prob"] == pytest.approx(full_log[below[0] - 1]["eval_forget_prob"], abs=1e-9)
    assert "selected_step" not in last
