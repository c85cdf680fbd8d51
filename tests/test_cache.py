"""Reference cache: content addressing, integrity, schema, precision, agreement with a live reference forward."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from unlearn import cache as C
from unlearn.config import ArchCfg, MethodCfg, Params
from unlearn.models import formatting
from unlearn.models.build import build_model, save_model, train_tokenizer
from unlearn.models.formatting import Encoded, collate, encode_many

ROWS = [
    {"question": "Where was Lena Marsh born?", "answer": "Lena Marsh was born in Lisbon."},
    {"question": "What does Boris Okafor write?", "answer": "Boris Okafor writes mystery novels."},
    {"question": "Who wrote Emma?", "answer": "Jane Austen"},
]
RETAIN = [{"question": "What is the capital of France?", "answer": "Paris"}]
IDK = ["I don't know.", "I have no idea."]
MAX_LEN, TOP_K = 32, 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer([r["question"] + " " + r["answer"] for r in ROWS + RETAIN] * 3 + IDK, 320)
    model = build_model(ArchCfg(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                intermediate_size=64), tok, 0)
    d = tmp_path_factory.mktemp("ref") / "target"
    save_model(model, tok, d)
    return d


@pytest.fixture(scope="module")
def memorised_dir(tmp_path_factory):
    """The tiny model trained until it memorises ROWS: peaked log-probs like a real target's.

    At random init every log-prob is about -log(V), where fp16 storage rounding
    (not the forward's precision) dominates the gap between cache and policy.
    """
    from unlearn.models.scoring import mean_nll

    tok = train_tokenizer([r["question"] + " " + r["answer"] for r in ROWS + RETAIN] * 3 + IDK, 320)
    model = build_model(ArchCfg(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                intermediate_size=64), tok, 0)
    batch = collate(encode_many(tok, [r["question"] for r in ROWS], [r["answer"] for r in ROWS], MAX_LEN),
                    tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = mean_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                        batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0
    d = tmp_path_factory.mktemp("memorised") / "target"
    save_model(model.eval(), tok, d)
    return d


def _ensure(model_dir, cache_dir, **kw):
    from unlearn.models.build import load_tokenizer

    args = dict(cache_dir=cache_dir, model_dir=model_dir, tokenizer=load_tokenizer(model_dir), forget_rows=ROWS,
                retain_rows=RETAIN, refusals=IDK, seed=0, max_length=MAX_LEN, top_k=TOP_K, with_retain=True)
    args.update(kw)
    return C.ensure_cache(**args)


def test_cache_is_reused_without_loading_the_model(model_dir, tmp_path, monkeypatch):
    first = _ensure(model_dir, tmp_path)
    assert all(p.exists() for p in first.paths)
    import unlearn.models.build as B

    monkeypatch.setattr(B, "load_model", lambda *a, **k: pytest.fail("reference model loaded despite a valid cache"))
    second = _ensure(model_dir, tmp_path)
    for k in first.forget:
        assert torch.equal(first.forget[k], second.forget[k])


def test_every_input_changes_the_key():
    enc = [Encoded([1, 5, 6, 2], [-100, -100, 6, 2])]
    base = dict(model_hash="m", tok_hash="t", encoded=enc, max_length=32, top_k=8, part="forget",
                dtype=torch.float32, device_type="cpu", mixed_precision="no")
    k0 = C.cache_key(**base)
    for field, value in [("model_hash", "m2"), ("tok_hash", "t2"), ("max_length", 33), ("top_k", 9),
                         ("part", "retain"), ("dtype", torch.bfloat16), ("device_type", "cuda"),
                         ("mixed_precision", "bf16"),
                         ("encoded", [Encoded([1, 5, 7, 2], [-100, -100, 7, 2])]),  # another token
                         ("encoded", [Encoded([1, 5, 6, 2], [-100, 5, 6, 2])]),  # same ids, another label mask
                         ("encoded", [Encoded([1, 5, 6], [-100, -100, 6])]),  # EOS dropped
                         ("encoded", enc * 2),
                         ("idk_encoded", [Encoded([1, 9, 2], [-100, 9, 2])])]:
        assert C.cache_key(**dict(base, **{field: value})) != k0, (field, value)
    assert C.cache_key(**base) == k0
    # Row boundaries are hashed: the same ids split differently are different rows.
    a = [Encoded([1, 2], [1, 2]), Encoded([3], [3])]
    b = [Encoded([1], [1]), Encoded([2, 3], [2, 3])]
    assert C.encoding_hash(a) != C.encoding_hash(b)


def test_changed_rows_or_weights_write_a_new_file(model_dir, tmp_path):
    a = _ensure(model_dir, tmp_path)
    b = _ensure(model_dir, tmp_path, forget_rows=ROWS[:2])
    c = _ensure(model_dir, tmp_path, max_length=24)
    assert len({a.paths[0], b.paths[0], c.paths[0]}) == 3


def test_changed_config_json_gives_a_new_key_and_new_values(model_dir, tmp_path):
    """Same weights, another config: the log-probs change, so the key must (weights_hash alone does not)."""
    from unlearn.models.build import weights_hash

    a = _ensure(model_dir, tmp_path / "cache")
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    cfg_file = other / "config.json"
    cfg = json.loads(cfg_file.read_text())
    rope = cfg.get("rope_parameters") or cfg  # transformers 5 nests rope_theta, 4.x has it at the top
    rope["rope_theta"] = 2.0
    cfg_file.write_text(json.dumps(cfg))
    assert weights_hash(other) == weights_hash(model_dir)
    b = _ensure(other, tmp_path / "cache")
    assert a.paths[0] != b.paths[0] and a.paths[1] != b.paths[1]
    assert (a.forget["label_logp"] - b.forget["label_logp"]).abs().max() > 1e-4


def test_changed_prompt_format_gives_a_new_key_and_matching_values(model_dir, tmp_path):
    """A prompt-format change (model.template; here: no space before the answer) must reach the key and the values."""
    from unlearn.models.build import load_model, load_tokenizer
    from unlearn.models.template import QAFormat

    a = _ensure(model_dir, tmp_path)
    other = QAFormat(preset="custom", text="Question: {question}\nAnswer:{answer}")
    b = _ensure(model_dir, tmp_path, fmt=other)
    assert a.paths[0] != b.paths[0] and a.paths[1] != b.paths[1]
    tok = load_tokenizer(model_dir)
    expect = C.reference_pass(load_model(model_dir), tok, [r["question"] for r in ROWS], [r["answer"] for r in ROWS],
                              max_length=MAX_LEN, top_k=TOP_K, fmt=other)
    torch.testing.assert_close(b.forget["seq_logp"], expect["seq_logp"])
    assert not torch.allclose(a.forget["seq_logp"], b.forget["seq_logp"])


def test_reference_dtype_and_mixed_precision_are_in_the_key(model_dir, tmp_path):
    fp32 = _ensure(model_dir, tmp_path)
    bf16_weights = _ensure(model_dir, tmp_path, dtype=torch.bfloat16)
    autocast = _ensure(model_dir, tmp_path, mixed_precision="bf16")
    assert len({fp32.paths[0], bf16_weights.paths[0], autocast.paths[0]}) == 3
    assert not torch.equal(fp32.forget["label_logp"], autocast.forget["label_logp"])
    with pytest.raises(ValueError, match="mixed_precision"):
        _ensure(model_dir, tmp_path, mixed_precision="fp8")


def _rewrite(path, change):
    """Rewrite a cache file through ``save_tensors`` with its own key: the digest is valid, only the schema is not."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        key = f.metadata()["key"]
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    C.save_tensors(path, tensors, key)
    assert C.load_tensors(path, key) is not None  # the integrity check alone accepts it


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop("idk_seq_logp"), "missing idk_seq_logp"),
    (lambda t: t.update(label_logp=t["label_logp"][:, :-1].clone()), "label_logp has shape"),
    (lambda t: t.update(topk_logp=t["topk_logp"].float()), "topk_logp has dtype"),
    (lambda t: t.update(extra=torch.zeros(1)), "unexpected extra"),
], ids=["missing", "shape", "dtype", "extra"])
def test_cache_with_wrong_tensors_is_detected_and_rebuilt(model_dir, tmp_path, caplog, damage, message):
    good = _ensure(model_dir, tmp_path)
    _rewrite(good.paths[0], damage)
    with caplog.at_level("WARNING", logger="unlearn.cache"):
        again = _ensure(model_dir, tmp_path)
    assert message in caplog.text and str(good.paths[0]) in caplog.text and "rebuilding" in caplog.text
    assert set(again.forget) == set(good.forget)
    for k in good.forget:
        assert torch.equal(good.forget[k], again.forget[k]), k


def test_retain_file_schema_has_no_idk():
    assert set(C.expected_schema("forget", 3, 32, 8)) - set(C.expected_schema("retain", 3, 32, 8)) == {"idk_seq_logp"}
    assert C.expected_schema("retain", 3, 32, 8)["topk_ids"] == ((3, 31, 8), torch.int32)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_cache_is_detected_and_rebuilt(model_dir, tmp_path, damage, caplog):
    good = _ensure(model_dir, tmp_path)
    path = good.paths[0]
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-10] ^= 0xFF  # inside the tensor payload: the header still parses
        path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        again = _ensure(model_dir, tmp_path)
    assert "rebuilding" in caplog.text
    for k in good.forget:
        assert torch.equal(good.forget[k], again.forget[k]), k


def _batch(tok, rows=ROWS, pad_to=None):
    enc = encode_many(tok, [r["question"] for r in rows], [r["answer"] for r in rows], MAX_LEN)
    idk = C.idk_answers(len(rows), IDK, 0)
    return {"forget": collate(enc, tok.pad_token_id, pad_to=pad_to),
            "idk": collate(encode_many(tok, [r["question"] for r in rows], idk, MAX_LEN), tok.pad_token_id),
            "retain": collate(encode_many(tok, [r["question"] for r in RETAIN * 3], [r["answer"] for r in RETAIN * 3],
                                          MAX_LEN), tok.pad_token_id)}


def test_cached_values_match_a_live_reference_forward(model_dir, tmp_path):
    from unlearn.models.build import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    cached = _ensure(model_dir, tmp_path)
    live = C.LiveReference(load_model(model_dir), top_k=TOP_K)
    batch = _batch(tok)
    width = batch["forget"]["input_ids"].size(1)
    got = cached.lookup([0, 1, 2], width)
    exp = live(batch)
    torch.testing.assert_close(got["seq_logp"], exp["seq_logp"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["idk_seq_logp"], exp["idk_seq_logp"], atol=1e-5, rtol=1e-5)
    mask = batch["forget"]["labels"][:, 1:] != -100
    assert torch.equal(got["topk_ids"][mask], exp["topk_ids"][mask])
    torch.testing.assert_close(got["topk_logp"][mask], exp["topk_logp"][mask])


# --------------------------------------------------------------------------- reference precision
def _gaps_at_theta_ref(model, tok, cache, pad_to) -> tuple[float, float]:
    """max |Delta| (DiPO) and max |NPO log-ratio| of the policy = reference under bf16 autocast, against ``cache``.

    The policy batch is padded wider than the cache pass's batch, as training batches are.
    """
    from unlearn.methods import losses
    from unlearn.models.scoring import sequence_logprob

    batch = _batch(tok, pad_to=pad_to)["forget"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate wraps the forward in
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.float()
    ref = cache.lookup([0, 1, 2], batch["input_ids"].size(1))
    delta = losses.dipo_delta(logits, batch["labels"], ref["topk_ids"], ref["topk_logp"], k=1, gamma=5.0, beta=0.1,
                              ref_label_logp=ref["label_logp"])
    ratio = sequence_logprob(logits, batch["labels"])[0] - ref["seq_logp"]
    return delta.abs().max().item(), ratio.abs().max().item()


def test_matched_precision_cache_starts_dipo_and_npo_at_zero(memorised_dir, tmp_path):
    """A bf16-autocast policy at theta = ref: the fp32 cache leaves Delta and the NPO log-ratio visibly off 0,
    the cache computed under the same autocast brings both down to the fp16 storage rounding (docs/dipo.md,
    "Reference precision"; measured here: fp32 1.7e-3 / 8.6e-3, matched 5e-5 / 1e-6)."""
    from unlearn.models.build import load_model, load_tokenizer

    tok, model = load_tokenizer(memorised_dir), load_model(memorised_dir)
    fp32 = _ensure(memorised_dir, tmp_path, device="cpu", mixed_precision="no")
    matched = _ensure(memorised_dir, tmp_path, device="cpu", mixed_precision="bf16")
    d32, r32 = _gaps_at_theta_ref(model, tok, fp32, pad_to=MAX_LEN)
    dm, rm = _gaps_at_theta_ref(model, tok, matched, pad_to=MAX_LEN)
    assert d32 > 5e-4 and r32 > 2e-3, (d32, r32)  # the mismatch is real on this model
    assert dm < 2e-4 and rm < 1e-4, (dm, rm)  # the tolerance docs/dipo.md states
    assert dm < d32 / 5 and rm < r32 / 100, (dm, d32, rm, r32)


def test_resolve_precision_follows_the_training_loop_rule(monkeypatch):
    assert C.resolve_precision("cpu", None) == (torch.device("cpu"), "no")
    assert C.resolve_precision("cpu", "bf16") == (torch.device("cpu"), "bf16")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        C.resolve_precision("cpu", "fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert C.resolve_precision() == (torch.device("cuda"), "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert C.resolve_precision() == (torch.device("cuda"), "no")


def test_cache_stage_passes_the_resolved_precision(monkeypatch, tmp_path):
    from unlearn import stages
    import unlearn.models.build as B

    seen = {}
    from unlearn.benchmark import ForgetInputs

    monkeypatch.setattr(stages, "forget_inputs", lambda p: ForgetInputs(ROWS, RETAIN, IDK))
    monkeypatch.setattr(B, "load_tokenizer", lambda d: None)
    from unlearn.benchmark import TOFU

    monkeypatch.setattr(TOFU, "encode_inputs", lambda self, p, tok, inputs: None)
    monkeypatch.setattr(C, "ensure_cache", lambda **kw: seen.update(kw))
    stages.cache(Params(), tmp_path)
    assert (seen["device"], seen["mixed_precision"]) == C.resolve_precision()
    stages.cache(Params(), tmp_path, device="cpu", mixed_precision="bf16")
    assert (seen["device"], seen["mixed_precision"]) == (torch.device("cpu"), "bf16")


# --------------------------------------------------------------------------- live reference: only what is needed
@pytest.mark.parametrize("method, cfg, forwards", [
    ("dipo", {}, 1),                          # forget (top-K); retain NLL needs no reference
    ("dipo", {"retain_loss": "kl"}, 2),       # forget + retain
    ("dpo_idk", {}, 2),                       # forget + idk
    ("npo", {}, 1),                           # forget (sequence log-prob)
    ("dipo_forget", {}, 1),
    ("npo_rt", {"retain_loss": "kl"}, 2),     # ref_seq + ref_retain_topk
])
def test_live_reference_runs_only_the_forwards_the_method_needs(model_dir, method, cfg, forwards):
    from unlearn.methods.registry import REF_KEYS, get_method
    from unlearn.models.build import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    needs = get_method(method).needs_for(MethodCfg(name=method, alpha=1.0, **cfg))
    model = load_model(model_dir)
    live = C.LiveReference(model, top_k=TOP_K, needs=needs)
    calls = []
    inner = model.forward
    model.forward = lambda *a, **k: calls.append(k["input_ids"].shape) or inner(*a, **k)
    batch = _batch(tok)
    ref = live(batch)
    assert len(calls) == forwards
    expected_keys = {k for n in needs if n in REF_KEYS for k in REF_KEYS[n]}
    assert set(ref) == expected_keys
    full = C.LiveReference(load_model(model_dir), top_k=TOP_K)(batch)  # needs=None: every part, every key
    for k in ref:
        torch.testing.assert_close(ref[k], full[k])


def test_live_reference_needing_seq_and_topk_runs_one_forget_forward(model_dir):
    from unlearn.models.build import load_model, load_tokenizer

    model = load_model(model_dir)
    live = C.LiveReference(model, top_k=TOP_K, needs=frozenset({"ref_seq", "ref_topk"}))
    calls = []
    inner = model.forward
    model.forward = lambda *a, **k: calls.append(1) or inner(*a, **k)
    ref = live(_batch(load_tokenizer(model_dir)))
    assert len(calls) == 1
    assert set(ref) == {"seq_logp", "topk_ids", "topk_logp", "label_logp"}
    torch.testing.assert_close(ref["seq_logp"], ref["label_logp"].sum(-1))


def test_bench_prediction_follows_the_needs():
    """bench_unlearn's live/cache prediction (F + R) / F, derived from needs, on the issue's worked examples."""
    import importlib.util
    from pathlib import Path

    from unlearn.methods.registry import get_method

    spec = importlib.util.spec_from_file_location(
        "bench_unlearn", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_unlearn.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def predicted(method, **cfg):
        return bench.predicted_live_over_cache(get_method(method).needs_for(MethodCfg(name=method, alpha=1.0, **cfg)))

    assert predicted("dipo") == pytest.approx(7 / 6)
    assert predicted("dipo", retain_loss="kl") == pytest.approx(8 / 6)
    assert predicted("dipo_forget") == pytest.approx(4 / 3)
    assert predicted("npo") == pytest.approx(4 / 3)
    assert predicted("dpo_idk") == pytest.approx(11 / 9)  # policy: forget, idk, retain; reference: forget, idk
