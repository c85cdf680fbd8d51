"""The training loop's invariants, in one process: data order and sharding, the LR schedule, exact
reduction over micro-batches, resume only of the same run, a crash-safe checkpoint swap.

The multi-process side of the same invariants is in tests/test_distributed.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from unlearn import train as T
from helpers import TINY_ARCH
from unlearn.config import ArchCfg
from unlearn.models.build import build_model, train_tokenizer
from unlearn.models.formatting import collate, encode_many
from unlearn.models.scoring import mean_nll

QA = [
    ("Where was Lena Marsh born?", "Lena Marsh was born in Lisbon, Portugal, in a small house by the sea."),
    ("What genre does Boris Okafor write?", "Gothic mystery."),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen"),
    ("What is Lena Marsh's father's job?", "Her father was a baker in the old town."),
    ("When did Boris Okafor publish his first book?", "In 1999."),
    ("What prize did Lena Marsh win?", "She won the Silver Quill award for her second novel."),
    ("Where does Boris Okafor live?", "Boris lives in Lagos."),
    ("What is the capital of France?", "Paris"),
]
TINY = ArchCfg(**TINY_ARCH)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([q + " " + a for q, a in QA] * 4, 400)


def _run(tok, cfg: T.LoopCfg, ckpt=None, run_key=None, fail_at: int | None = None, honour_denominators=True):
    model = build_model(TINY, tok, 0)
    enc = encode_many(tok, [q for q, _ in QA], [a for _, a in QA], 48)
    calls = {"n": 0}

    def step_loss(m, b):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise KeyboardInterrupt("simulated interruption")
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return mean_nll(logits, b["labels"], b.get("n_tokens") if honour_denominators else None), {}

    log = T.train_loop(model, len(enc), lambda idx, ep: collate([enc[i] for i in idx], tok.pad_token_id), step_loss,
                       cfg, checkpoint_dir=ckpt, run_key=run_key)
    return model, log


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --------------------------------------------------------------------------- data order and sharding
@pytest.mark.parametrize("n,bs,world,accum", [(80, 8, 2, 1), (80, 16, 2, 1), (81, 8, 2, 1), (17, 3, 4, 2), (5, 4, 3, 1)])
def test_every_row_once_per_epoch_on_disjoint_shards(n, bs, world, accum):
    for epoch in range(3):
        steps = T.epoch_steps(n, bs, world, accum, seed=7, epoch=epoch)
        assert len(steps) == T.steps_per_epoch(n, bs, world, accum)
        taken = {r: [i for s in steps for mb in s for i in T.shard(mb, world, r)] for r in range(world)}
        everything = [i for r in taken for i in taken[r]]
        assert sorted(everything) == list(range(n))  # no wrap-around: nothing twice, nothing missing
        for s in steps:
            for mb in s:
                sizes = [len(T.shard(mb, world, r)) for r in range(world)]
                assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(mb)


def test_one_process_and_two_ranks_walk_the_same_global_steps():
    one = T.epoch_steps(80, 16, 1, 1, seed=0, epoch=3)
    two = T.epoch_steps(80, 8, 2, 1, seed=0, epoch=3)
    accum = T.epoch_steps(80, 8, 1, 2, seed=0, epoch=3)
    assert [sum(s, []) for s in one] == [sum(s, []) for s in two] == [sum(s, []) for s in accum]
    assert T.epoch_steps(80, 16, 1, 1, seed=0, epoch=4) != one  # a fresh order every epoch


# --------------------------------------------------------------------------- LR schedule
def test_lr_of_every_step_matches_the_schedule_by_hand(tok):
    # 8 rows, batch 2 -> 4 steps/epoch x 3 epochs = 12 steps; warm-up round(12 * 0.25) = 3 steps.
    cfg = T.LoopCfg(epochs=3, batch_size=2, lr=0.01, warmup_ratio=0.25, seed=0)
    _, log = _run(tok, cfg)
    by_hand = [1 / 3, 2 / 3, 3 / 3] + [(12 - s) / 9 for s in range(3, 12)]
    assert [e["step"] for e in log] == list(range(1, 13))
    assert [e["lr"] for e in log] == pytest.approx([0.01 * f for f in by_hand], rel=1e-12)
    assert log[-1]["lr"] > 0  # the last update still moves the weights


def test_grad_accumulation_counts_optimizer_steps_not_micro_batches(tok):
    cfg = T.LoopCfg(epochs=2, batch_size=2, lr=0.01, warmup_ratio=0.0, grad_accum=2, seed=0)
    _, log = _run(tok, cfg)
    assert len(log) == 4 and [e["rows"] for e in log] == [4, 4, 4, 4]
    assert [e["lr"] for e in log] == pytest.approx([0.01, 0.0075, 0.005, 0.0025], rel=1e-12)


# --------------------------------------------------------------------------- exact reduction
def test_accumulated_micro_batches_give_the_big_batch_result(tok):
    """Batch 4 = 2 micro-batches of 2: answer lengths differ, so only global token denominators make them equal."""
    big, log_big = _run(tok, T.LoopCfg(epochs=2, batch_size=4, lr=0.01, seed=0))
    acc, log_acc = _run(tok, T.LoopCfg(epochs=2, batch_size=2, grad_accum=2, lr=0.01, seed=0))
    assert [e["loss"] for e in log_acc] == pytest.approx([e["loss"] for e in log_big], rel=1e-5)
    assert torch.allclose(_flat(big), _flat(acc), atol=1e-5)
    # Per-micro-batch means (what accelerate's accumulation does) give a different trajectory: the check bites.
    local, _ = _run(tok, T.LoopCfg(epochs=2, batch_size=2, grad_accum=2, lr=0.01, seed=0), honour_denominators=False)
    assert not torch.allclose(_flat(big), _flat(local), atol=1e-5)


def test_the_log_reports_the_whole_steps_loss(tok):
    _, log = _run(tok, T.LoopCfg(epochs=1, batch_size=2, grad_accum=2, lr=1e-9, seed=0))
    assert all(e["rows"] == 4 for e in log)
    last = log[-1]
    assert last["rows_seen"] == len(QA) and last["shard_rows"] == [len(QA)]


# --------------------------------------------------------------------------- resume
def test_resume_continues_the_same_run_to_the_same_weights(tok, tmp_path):
    cfg = T.LoopCfg(epochs=3, batch_size=2, lr=0.01, checkpoint_every=1, seed=0)
    full, log_full = _run(tok, cfg)
    with pytest.raises(KeyboardInterrupt):
        _run(tok, cfg, ckpt=tmp_path / "ck", run_key={"method": "npo"}, fail_at=7)
    resumed, log = _run(tok, cfg, ckpt=tmp_path / "ck", run_key={"method": "npo"})
    assert [e["step"] for e in log] == list(range(1, 13))
    assert [e["lr"] for e in log] == [e["lr"] for e in log_full]
    assert torch.allclose(_flat(full), _flat(resumed), atol=1e-6)


def test_a_checkpoint_of_another_run_is_discarded_with_the_reason(tok, tmp_path, capsys):
    cfg = T.LoopCfg(epochs=3, batch_size=2, lr=0.01, checkpoint_every=1, seed=0)
    with pytest.raises(KeyboardInterrupt):
        _run(tok, cfg, ckpt=tmp_path / "ck", run_key={"method": "npo"}, fail_at=7)
    capsys.readouterr()
    fresh, log = _run(tok, cfg, ckpt=tmp_path / "ck", run_key={"method": "dipo"})
    out = capsys.readouterr().out
    assert "belongs to another run" in out and "run.method: npo -> dipo" in out
    assert [e["step"] for e in log] == list(range(1, 13))  # started from step 1, not from the old run's step 6
    full, _ = _run(tok, cfg)
    assert torch.allclose(_flat(full), _flat(fresh), atol=1e-6)
    # Any loop setting counts too.
    with pytest.raises(KeyboardInterrupt):
        _run(tok, cfg, ckpt=tmp_path / "ck2", fail_at=5)
    capsys.readouterr()
    _run(tok, T.LoopCfg(epochs=3, batch_size=2, lr=0.02, checkpoint_every=1, seed=0), ckpt=tmp_path / "ck2")
    assert "loop.lr: 0.01 -> 0.02" in capsys.readouterr().out


def _snapshot(d: Path, step: int) -> None:
    (d / "state").mkdir(parents=True)
    (d / "log.json").write_text("[]")
    (d / "loop_state.json").write_text(json.dumps({"step": step}))


@pytest.mark.parametrize("present,expected", [(("tmp", "old"), 2), (("old",), 1), (("ckpt", "tmp_partial"), 3)])
def test_a_crash_mid_swap_keeps_a_complete_checkpoint(tmp_path, present, expected):
    ckpt = tmp_path / "run.ckpt"
    tmp, old = tmp_path / "run.ckpt.tmp", tmp_path / "run.ckpt.old"
    if "tmp" in present:
        _snapshot(tmp, 2)
    if "old" in present:
        _snapshot(old, 1)
    if "ckpt" in present:
        _snapshot(ckpt, 3)
    if "tmp_partial" in present:
        (tmp / "state").mkdir(parents=True)  # crashed while writing: no loop_state.json
    T.recover_checkpoint(ckpt)
    assert json.loads((ckpt / "loop_state.json").read_text())["step"] == expected
    assert not tmp.exists() and not old.exists()


def test_swap_never_leaves_no_complete_copy(tmp_path, monkeypatch):
    ckpt, tmp = tmp_path / "c", tmp_path / "c.tmp"
    _snapshot(ckpt, 1)
    _snapshot(tmp, 2)
    real_rename = Path.rename

    def crash_on_second(self, target):
        if self == tmp:
            raise OSError("power cut")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_second)
    with pytest.raises(OSError):
        T.swap_in(tmp, ckpt)
    monkeypatch.undo()
    T.recover_checkpoint(ckpt)
    assert json.loads((ckpt / "loop_state.json").read_text())["step"] == 2


# --------------------------------------------------------------------------- the forget stage, resumed
def _forget(project: Path, out: Path, overrides: list[str], on_log=None):
    from unlearn import stages
    from unlearn.config import load_params

    cwd = os.getcwd()
    os.chdir(project)
    try:
        return stages.forget(load_params("params.yaml", overrides), out_dir=out, on_log=on_log)
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_forget_stage_resumes_only_its_own_run(tiny_project, tmp_path, capsys):
    from unlearn.models.build import load_model

    base = ["method.checkpoint_every=1"]
    full = _forget(tiny_project, tmp_path / "full", base)

    def stop_at_2(entry):
        if entry["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _forget(tiny_project, tmp_path / "u", base, on_log=stop_at_2)
    capsys.readouterr()
    again = _forget(tiny_project, tmp_path / "u", base)
    assert "resuming forget [dipo]" in capsys.readouterr().out
    assert again["steps"] == full["steps"]
    a, b = load_model(tmp_path / "full"), load_model(tmp_path / "u")
    assert torch.allclose(_flat(a), _flat(b), atol=1e-6)
    # Reports of an --out run live with the run, never in the pipeline's reports/forget.
    assert (tmp_path / "u.reports" / "summary.json").exists() and (tmp_path / "u.reports" / "loss.json").exists()
    assert not (tiny_project / "reports" / "forget").exists()

    with pytest.raises(KeyboardInterrupt):
        _forget(tiny_project, tmp_path / "v", base + ["method.name=npo"], on_log=stop_at_2)
    capsys.readouterr()
    fresh = _forget(tiny_project, tmp_path / "v", base)
    out = capsys.readouterr().out
    assert "belongs to another run" in out and "run.method.name: npo -> dipo" in out
    assert fresh["method"] == "dipo" and fresh["steps"] == full["steps"]
    c = load_model(tmp_path / "v")
    assert torch.allclose(_flat(a), _flat(c), atol=1e-6)
