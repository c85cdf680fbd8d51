"""LoRA adapters (``method.lora`` / ``finetune.lora``) and gradient checkpointing, through the one training loop.

* the merged model (what is saved and evaluated) gives the adapter-applied model's logits;
* a LoRA checkpoint holds the adapter (and its optimiser state) only, and a LoRA run resumes to the same weights;
* gradient checkpointing changes no number;
* LoRA unlearning on the tiny project forgets and keeps the retain answers like the full run does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import TINY_ARCH
from unlearn import train as T
from unlearn.config import ArchCfg, LoraCfg
from unlearn.models import lora
from unlearn.models.build import build_model, load_model, save_model, train_tokenizer
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
ADAPTER = LoraCfg(enabled=True, r=4, alpha=8.0)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([q + " " + a for q, a in QA] * 4, 400)


@pytest.fixture(scope="module")
def enc(tok):
    return encode_many(tok, [q for q, _ in QA], [a for _, a in QA], 48)


def _train(tok, enc, cfg: T.LoopCfg, adapter: LoraCfg | None = None, ckpt=None, fail_at: int | None = None):
    model = build_model(TINY, tok, 0)
    if adapter is not None:
        model = lora.wrap(model, adapter, seed=0)
    calls = {"n": 0}

    def step_loss(m, b):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise KeyboardInterrupt("simulated interruption")
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return mean_nll(logits, b["labels"], b.get("n_tokens")), {}

    log = T.train_loop(model, len(enc), lambda idx, ep: collate([enc[i] for i in idx], tok.pad_token_id), step_loss,
                       cfg, checkpoint_dir=ckpt, run_key={"lora": adapter.model_dump() if adapter else None})
    return model, log


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _logits(model, tok, enc) -> torch.Tensor:
    b = collate(enc, tok.pad_token_id)
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


CFG = T.LoopCfg(epochs=3, batch_size=2, lr=0.01, checkpoint_every=1, seed=0)


def test_only_the_adapter_trains(tok, enc):
    base = build_model(TINY, tok, 0)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model, log = _train(tok, enc, T.LoopCfg(epochs=2, batch_size=4, lr=0.01, seed=0), ADAPTER)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert log[-1]["loss"] < log[0]["loss"]
    # The base weights of the trained model are the starting weights, bit for bit.
    for name, p in model.get_base_model().named_parameters():
        key = name.replace(".base_layer", "")
        if "lora_" not in name:
            assert torch.equal(p, before[key]), name


def test_merged_model_gives_the_adapter_applied_logits(tok, enc, tmp_path):
    base_dir = tmp_path / "base"
    save_model(build_model(TINY, tok, 0), tok, base_dir)
    model, _ = _train(tok, enc, T.LoopCfg(epochs=3, batch_size=4, lr=0.02, seed=0), ADAPTER)
    model.eval()
    adapted = _logits(model, tok, enc)
    with model.disable_adapter():  # the adapter really changed the model
        assert (adapted - _logits(model, tok, enc)).abs().max() > 1e-3
    merged, write_adapter = lora.merge(model)
    assert not lora.is_lora(merged) and write_adapter is not None
    # W + (alpha/r) B A in one matrix vs W x + (alpha/r) B (A x): the same up to float32 rounding.
    assert torch.allclose(_logits(merged, tok, enc), adapted, atol=1e-5, rtol=0)
    out = tmp_path / "out"
    save_model(merged, tok, out, adapter=write_adapter)
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    # What evaluation reads (the merged directory) and the base with the saved adapter applied agree.
    reloaded, applied = load_model(out), lora.load_adapted(base_dir, out / "adapter")
    assert lora.is_lora(applied)
    assert torch.allclose(_logits(reloaded, tok, enc), _logits(applied, tok, enc), atol=1e-5, rtol=0)
    assert torch.allclose(_logits(reloaded, tok, enc), adapted, atol=1e-5, rtol=0)


def test_a_lora_checkpoint_holds_the_adapter_and_resumes_to_the_same_weights(tok, enc, tmp_path):
    full, log_full = _train(tok, enc, CFG, ADAPTER)
    with pytest.raises(KeyboardInterrupt):
        _train(tok, enc, CFG, ADAPTER, ckpt=tmp_path / "ck", fail_at=7)
    state = tmp_path / "ck" / "state"
    with safe_open(str(state / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys), keys  # no frozen base weight in the checkpoint
    n_adapter = sum(p.numel() for n, p in full.named_parameters() if p.requires_grad)
    opt = torch.load(state / "optimizer.bin", weights_only=False)
    assert sum(s["exp_avg"].numel() for s in opt["state"].values()) == n_adapter  # Adam state of the adapter only
    assert json.loads((tmp_path / "ck" / "loop_state.json").read_text())["step"] == 6
    resumed, log = _train(tok, enc, CFG, ADAPTER, ckpt=tmp_path / "ck")
    assert [e["step"] for e in log] == list(range(1, 13))
    assert [e["lr"] for e in log] == [e["lr"] for e in log_full]
    assert torch.allclose(_flat(full), _flat(resumed), atol=1e-6)
    # A full-training checkpoint is not taken for a LoRA run (the fingerprint differs), nor the reverse.
    cfg_lora = T.LoopCfg.for_stage(_Section(ADAPTER), seed=0, desc="x")
    cfg_full = T.LoopCfg.for_stage(_Section(LoraCfg()), seed=0, desc="x")
    assert any("loop.lora.enabled" in d for d in T.fingerprint_changes(
        T.run_fingerprint(cfg_full, 8, 1, None), T.run_fingerprint(cfg_lora, 8, 1, None)))


class _Section:
    """The fields of a finetune/method section that LoopCfg.for_stage reads."""

    def __init__(self, adapter: LoraCfg, gradient_checkpointing: bool = False):
        self.epochs, self.batch_size, self.lr, self.weight_decay, self.warmup_ratio, self.grad_accum = 1, 2, 0.01, 0, 0, 1
        self.lora, self.gradient_checkpointing, self.loss_chunk = adapter, gradient_checkpointing, 0


@pytest.mark.parametrize("adapter", [None, ADAPTER], ids=["full", "lora"])
def test_gradient_checkpointing_changes_no_number(tok, enc, adapter):
    plain, log_plain = _train(tok, enc, T.LoopCfg(epochs=2, batch_size=4, lr=0.01, seed=0), adapter)
    ckpt, log_ckpt = _train(tok, enc, T.LoopCfg(epochs=2, batch_size=4, lr=0.01, seed=0, gradient_checkpointing=True),
                            adapter)
    inner = ckpt.get_base_model() if adapter else ckpt
    assert inner.is_activation_checkpointing  # it really was on
    assert [e["loss"] for e in log_ckpt] == pytest.approx([e["loss"] for e in log_plain], rel=1e-6)
    assert torch.allclose(_flat(plain), _flat(ckpt), atol=1e-6)


# --------------------------------------------------------------------------- the forget stage with an adapter
def _forget(project: Path, out: Path, overrides: list[str]):
    from unlearn import stages
    from unlearn.config import load_params

    cwd = os.getcwd()
    os.chdir(project)
    try:
        return stages.forget(load_params("params.yaml", overrides), out_dir=out)
    finally:
        os.chdir(cwd)


# The stage with an adapter, end to end. How far a LoRA run forgets and keeps the retain answers against the
# full run, on a model that has memorised them, is tests/test_method_behaviour.py's
# test_lora_unlearning_moves_the_answers_like_the_full_run (the tiny project's target barely memorises).
LORA_RUN = ["method.lora.enabled=true", "method.lora.r=8", "method.lora.alpha=16", "method.lr=0.02"]


@pytest.mark.slow
def test_forget_stage_with_lora_saves_the_merged_model_and_the_adapter(tiny_project, tmp_path):
    from unlearn.benchmark import get_benchmark
    from unlearn.config import load_params

    p = load_params(tiny_project / "params.yaml")
    tok = _tok(tiny_project)
    low = _forget(tiny_project, tmp_path / "lora", LORA_RUN)
    out = tmp_path / "lora"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert not (out / "adapter_config.json").exists()  # a plain model directory for every loader
    # The saved model is the merged one, and the target with the saved adapter applied is the same model.
    enc = encode_many(tok, [q for q, _ in QA], [a for _, a in QA], 48)
    merged, applied = load_model(out), lora.load_adapted(tiny_project / "models" / "target", out / "adapter")
    assert torch.allclose(_logits(merged, tok, enc), _logits(applied, tok, enc), atol=1e-5, rtol=0)
    cwd = os.getcwd()
    os.chdir(tiny_project)  # the benchmark reads the project's splits
    try:
        memorisation = get_benchmark(p.benchmark).memorisation
        target, again = memorisation(p, load_model("models/target"), tok), memorisation(p, merged, tok)
    finally:
        os.chdir(cwd)
    assert low["lora"]["r"] == 8 and low["forget_prob"] < 0.5 * target["forget_prob"], (low, target)
    # The summary's memorisation numbers are the merged model's.
    assert again["forget_prob"] == pytest.approx(low["forget_prob"], abs=1e-6)


def _tok(project: Path):
    from unlearn.models.build import load_tokenizer

    return load_tokenizer(project / "models" / "target")
