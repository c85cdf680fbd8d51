"""``--reference live`` with LoRA: the frozen base, run with the adapter disabled, is the reference.

* its reference quantities equal those of a separate copy of the target, after the adapter has moved;
* the adapter keeps training (not frozen by the reference) and the model keeps its training mode;
* the forget stage loads the target once (no second copy for the reference).
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import TINY_ARCH
from unlearn.cache import LiveReference
from unlearn.config import ArchCfg, LoraCfg
from unlearn.models import lora
from unlearn.models.build import build_model, train_tokenizer
from unlearn.models.formatting import collate, encode_many

QA = [
    ("Where was Lena Marsh born?", "Lena Marsh was born in Lisbon, Portugal."),
    ("What genre does Boris Okafor write?", "Gothic mystery."),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen"),
    ("What is the capital of France?", "Paris"),
]
NEEDS = frozenset({"ref_seq", "ref_topk"})


def test_live_reference_under_the_disabled_adapter_is_the_target():
    tok = train_tokenizer([q + " " + a for q, a in QA] * 4, 400)
    batch = collate(encode_many(tok, [q for q, _ in QA], [a for _, a in QA], 32), tok.pad_token_id)
    target = build_model(ArchCfg(**TINY_ARCH), tok, 0)  # a separate copy of the target
    model = lora.wrap(build_model(ArchCfg(**TINY_ARCH), tok, 0), LoraCfg(enabled=True, r=4, alpha=8.0, dropout=0.1))
    with torch.no_grad():  # an adapter that has moved: B != 0, so the adapter-applied model is not the target
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.5)
    model.train()
    ref = LiveReference(lora.FrozenBase(model), top_k=8, needs=NEEDS, mixed_precision="no")
    exact = LiveReference(lora.FrozenBase(model), top_k=None, needs=NEEDS, mixed_precision="no")
    got, got_exact = ref({"forget": batch}), exact({"forget": batch})
    want = LiveReference(target, top_k=8, needs=NEEDS, mixed_precision="no")({"forget": batch})
    want_exact = LiveReference(target, top_k=None, needs=NEEDS, mixed_precision="no")({"forget": batch})
    for k in ("seq_logp", "label_logp", "topk_logp", "topk_ids"):
        assert torch.allclose(got[k].float(), want[k].float(), atol=1e-6, rtol=0), k
    assert torch.allclose(got_exact["topk_logp"], want_exact["topk_logp"], atol=1e-6, rtol=0)
    # The adapter really changes the policy, so the equality above is the disabled adapter's doing.
    adapted = LiveReference(_Plain(model), top_k=8, needs=NEEDS, mixed_precision="no")({"forget": batch})
    assert (adapted["seq_logp"] - want["seq_logp"]).abs().max() > 1e-2
    # The reference froze nothing that trains and left the model in training mode.
    assert model.training
    trainable = [n for n, prm in model.named_parameters() if prm.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(TypeError):
        lora.FrozenBase(target)


class _Plain:
    """The adapter-applied model, in eval mode, for LiveReference without touching requires_grad."""

    def __init__(self, model):
        self.model = model

    def eval(self):
        return self

    def parameters(self):
        return iter(list(self.model.parameters())[:1])

    def __call__(self, **kw):
        was = self.model.training
        self.model.eval()
        try:
            return self.model(**kw)
        finally:
            self.model.train(was)


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_forget_with_lora_and_a_live_reference_loads_the_target_once(tiny_project, tmp_path, monkeypatch, use_lora):
    from unlearn import stages
    from unlearn.config import load_params
    from unlearn.models import build

    calls: list[str] = []
    real = build.load_model

    def counting(path, *a, **k):
        calls.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(build, "load_model", counting)
    overrides = ["method.name=dipo", "method.epochs=1"]
    if use_lora:
        overrides += ["method.lora.enabled=true", "method.lora.r=4", "method.lora.alpha=8"]
    cwd = os.getcwd()
    os.chdir(tiny_project)
    try:
        summary = stages.forget(load_params("params.yaml", overrides), out_dir=tmp_path / "out", reference="live")
    finally:
        os.chdir(cwd)
    assert summary["reference"] == "live" and summary["steps"] > 0
    # LoRA: the policy's own frozen base is the reference; a full run needs the second copy.
    assert len(calls) == (1 if use_lora else 2), calls
