"""Every registered method runs end to end on a tiny random Llama with a hand-built batch."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn.config import MethodCfg
from unlearn.methods import METHODS, NEEDS, REF_KEYS, get_method
from unlearn.methods.registry import Method

V, K = 32, 8
EXPECTED = {"ga", "graddiff", "npo", "npo_rt", "simnpo", "dpo_idk", "undial", "dipo", "dipo_forget"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    return LlamaForCausalLM(cfg)


def _part(prompts, answers, T):
    """Right-padded input_ids / attention_mask / labels (prompt masked with -100)."""
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    att = torch.zeros_like(ids)
    lab = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        att[i, : len(seq)] = 1
        lab[i, len(p) : len(seq)] = torch.tensor(a)
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


@torch.no_grad()
def _ref_entries(model, part, prefix="", full_vocab=False):
    from unlearn.models.scoring import sequence_logprob

    logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
    logp = logits[:, :-1].float().log_softmax(-1)
    lab = part["labels"][:, 1:].clamp(min=0)
    out = {
        f"{prefix}label_logp": logp.gather(-1, lab[..., None])[..., 0],
        "_seq": sequence_logprob(logits, part["labels"])[0],
    }
    if full_vocab:
        out[f"{prefix}topk_ids"], out[f"{prefix}topk_logp"] = None, logp
    else:
        tk = logp.topk(K, -1)
        out[f"{prefix}topk_ids"], out[f"{prefix}topk_logp"] = tk.indices, tk.values.half()  # fp16 like a cache
    return out


def make_batch(model, needs, full_vocab=False):
    q = [[1, 5, 6, 7], [1, 9, 10]]
    forget = _part(q, [[11, 12, 13, 2], [14, 15, 2]], T=8)
    idk = _part(q, [[20, 21, 2], [20, 22, 23, 24, 2]], T=9)
    retain = _part([[1, 3, 4], [1, 25, 26, 27]], [[28, 29, 2], [30, 31, 2]], T=7)
    f = _ref_entries(model, forget, full_vocab=full_vocab)
    r = _ref_entries(model, retain, prefix="retain_", full_vocab=full_vocab)
    every = {
        "seq_logp": f["_seq"],
        "idk_seq_logp": _ref_entries(model, idk)["_seq"],
        **{k: v for k, v in f.items() if not k.startswith("_")},
        **{k: v for k, v in r.items() if not k.startswith("_")},
    }
    # Give the method ONLY what it declared, so an undeclared dependency fails loudly.
    ref = {key: every[key] for need in needs for key in REF_KEYS.get(need, ())}
    batch = {"forget": forget, "ref": ref}
    if "retain" in needs:
        batch["retain"] = retain
    if "idk" in needs:
        batch["idk"] = idk
    return batch


def test_registry_contents():
    assert set(METHODS) == EXPECTED
    for name, m in METHODS.items():
        assert m.name == name and m.needs <= NEEDS and callable(m.compute)


def test_unknown_method_lists_known_names():
    with pytest.raises(ValueError) as e:
        get_method("gradient_descent_please")
    for name in EXPECTED:
        assert name in str(e.value)


def test_unknown_need_is_rejected():
    with pytest.raises(ValueError, match="unknown needs"):
        Method("x", lambda *a: None, frozenset({"ref_everything"}))


CONFIGS = {
    "default": {},
    "kl_retain": {"retain_loss": "kl"},
    "no_retain": {"alpha": 0.0},
    "gold": {"dipo": {"mask": "gold", "k": 1}},
    "k2": {"dipo": {"k": 2}},
    "online": {"dipo": {"reference": "online"}},
}


CASES = [
    (name, variant)
    for name in sorted(EXPECTED)
    for variant in CONFIGS
    if name.startswith("dipo") or variant in {"default", "kl_retain", "no_retain"}
]


@pytest.mark.parametrize("name,variant", CASES)
def test_compute_runs_and_backpropagates(model, name, variant):
    cfg = MethodCfg(name=name, **CONFIGS[variant])
    method = get_method(name)
    needs = method.needs_for(cfg)
    assert needs <= method.needs
    batch = make_batch(model, needs)
    model.zero_grad()
    loss, logs = method.compute(model, batch, cfg)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert {"forget_loss", "loss"} <= set(logs) and all(isinstance(v, float) and math.isfinite(v) for v in logs.values())
    assert logs["loss"] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("name", ["dipo", "undial"])
def test_full_vocab_reference(model, name):
    """topk_ids = None: topk_logp is the full-vocabulary log-softmax (the exact computation)."""
    cfg = MethodCfg(name=name)
    method = get_method(name)
    loss, _ = method.compute(model, make_batch(model, method.needs_for(cfg), full_vocab=True), cfg)
    assert torch.isfinite(loss)


def test_needs_for_trims_by_config():
    dipo = get_method("dipo")
    assert dipo.needs_for(MethodCfg()) == {"ref_topk", "retain"}
    assert dipo.needs_for(MethodCfg(retain_loss="kl")) == {"ref_topk", "retain", "ref_retain_topk"}
    assert dipo.needs_for(MethodCfg(dipo={"reference": "online"})) == {"retain"}
    assert dipo.needs_for(MethodCfg(alpha=0)) == {"ref_topk"}
    assert get_method("ga").needs_for(MethodCfg()) == frozenset()
    assert get_method("dpo_idk").needs_for(MethodCfg()) == {"ref_seq", "ref_idk_seq", "idk", "retain"}


def test_combinations(model):
    """loss = forget_weight * forget + alpha * retain, with the right retain term."""
    cfg = MethodCfg(alpha=0.7)
    for name, w in [("graddiff", 1.0), ("npo_rt", 1.0), ("simnpo", cfg.simnpo.forget_weight), ("dpo_idk", 1.0),
                    ("undial", 1.0), ("dipo", 1.0)]:
        m = get_method(name)
        _, logs = m.compute(model, make_batch(model, m.needs_for(cfg)), cfg)
        assert logs["loss"] == pytest.approx(w * logs["forget_loss"] + 0.7 * logs["retain_loss"], rel=1e-5), name
    for name in ["ga", "npo", "dipo_forget"]:
        m = get_method(name)
        _, logs = m.compute(model, make_batch(model, m.needs_for(cfg)), cfg)
        assert "retain_loss" not in logs and logs["loss"] == pytest.approx(logs["forget_loss"], rel=1e-6), name


def test_at_reference_values(model):
    """The batch's reference is the model itself, so the preference losses sit at their theta = ref values."""
    cfg = MethodCfg()
    two_log2 = lambda beta: 2 / beta * math.log(2)  # noqa: E731
    for name, beta, tol in [("npo", cfg.npo.beta, 1e-5), ("dipo_forget", cfg.dipo.beta, 1e-4)]:
        m = get_method(name)
        _, logs = m.compute(model, make_batch(model, m.needs_for(cfg)), cfg)
        assert logs["forget_loss"] == pytest.approx(two_log2(beta), rel=tol), name
    # fp16-cached top-K is not bit-identical to the policy, so DiPO's Delta is ~0, not exactly 0
    online = MethodCfg(dipo={"reference": "online"})
    m = get_method("dipo_forget")
    _, logs = m.compute(model, make_batch(model, m.needs_for(online)), online)
    assert logs["forget_loss"] == pytest.approx(two_log2(online.dipo.beta), rel=1e-6)
    # GA is minus the retain-style NLL of the forget answers
    ga, _ = get_method("ga").compute(model, make_batch(model, frozenset()), cfg)
    assert ga.item() < 0
