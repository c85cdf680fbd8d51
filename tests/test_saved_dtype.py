"""The saved dtype: bfloat16 weights after bf16 training, float32 otherwise (the CPU default, unchanged).

bf16 tensors work on the CPU, so the bf16 save and its load are tested here without a GPU.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from helpers import TINY_ARCH
from unlearn.config import ArchCfg
from unlearn.models.build import build_model, load_model, save_model, train_tokenizer
from unlearn.models.formatting import collate, encode_many
from unlearn.precision import saved_dtype

QA = [("Where was Lena Marsh born?", "In Lisbon."), ("What is the capital of France?", "Paris")]


def _dtypes(model_dir) -> set[torch.dtype]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_the_rule():
    assert saved_dtype("bf16") == torch.bfloat16
    assert saved_dtype("no") == torch.float32 and saved_dtype("fp16") == torch.float32
    with pytest.raises(ValueError):
        saved_dtype("auto")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([q + " " + a for q, a in QA] * 8, 300)


def _logits(model, tok):
    b = collate(encode_many(tok, [q for q, _ in QA], [a for _, a in QA], 24), tok.pad_token_id)
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def test_bf16_save_loads_back_and_the_model_in_memory_is_the_saved_one(tok, tmp_path):
    model = build_model(ArchCfg(**TINY_ARCH), tok, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_model(model, tok, tmp_path / "bf16", dtype=torch.bfloat16)
    assert _dtypes(tmp_path / "bf16") == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # After the save the model is float32 again, holding the bf16-rounded weights: what load_model reads back.
    assert all(p.dtype == torch.float32 for p in model.parameters()) and model.config.dtype == torch.float32
    loaded = load_model(tmp_path / "bf16")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for n, p in loaded.named_parameters():
        assert torch.equal(p, before[n].to(torch.bfloat16).float()), n
        assert torch.equal(p, dict(model.named_parameters())[n]), n
    assert torch.equal(_logits(loaded, tok), _logits(model, tok))
    assert loaded(**{"input_ids": torch.tensor([[1, 5, 6]])}).logits.isfinite().all()


def test_the_default_save_is_float32_and_unchanged(tok, tmp_path):
    model = build_model(ArchCfg(**TINY_ARCH), tok, 0)
    before = [p.detach().clone() for p in model.parameters()]
    save_model(model, tok, tmp_path / "plain")
    save_model(model, tok, tmp_path / "fp32", dtype=saved_dtype("no"))
    for d in ("plain", "fp32"):
        assert _dtypes(tmp_path / d) == {torch.float32}
        assert json.loads((tmp_path / d / "config.json").read_text())["dtype"] == "float32"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "fp32" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_bf16_forget_run_saves_bf16_weights(tiny_project, tmp_path, monkeypatch):
    """The stage passes its accelerator's mixed precision to the rule: bf16 autocast on the CPU stands in for a GPU."""
    from unlearn import stages, train
    from unlearn.config import load_params

    from accelerate.state import AcceleratorState

    real = train.make_accelerator

    def bf16_accelerator(cfg=None, mixed_precision=None):
        AcceleratorState._reset_state()  # the state is a process-wide singleton: another test's "no" is set
        return real(cfg, "bf16")

    monkeypatch.setattr(train, "make_accelerator", bf16_accelerator)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # accelerate records the mixed precision in the environment
    overrides = ["method.epochs=1", "method.lora.enabled=true", "method.lora.r=4", "method.lora.alpha=8"]
    cwd = os.getcwd()
    os.chdir(tiny_project)
    try:
        summary = stages.forget(load_params("params.yaml", overrides), out_dir=tmp_path / "out", reference="live")
    finally:
        os.chdir(cwd)
        AcceleratorState._reset_state()  # the next test's accelerator starts afresh
    out = tmp_path / "out"
    assert _dtypes(out) == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert summary["steps"] > 0 and load_model(out) is not None
