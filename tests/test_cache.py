"""Reference cache: content addressing, integrity, agreement with a live reference forward."""

from __future__ import annotations

import pytest
import torch

from unlearn import cache as C
from unlearn.config import ArchCfg
from unlearn.models.build import build_model, save_model, train_tokenizer
from unlearn.models.formatting import collate, encode_many

ROWS = [
    {"question": "Where was Lena Marsh born?", "answer": "Lena Marsh was born in Lisbon."},
    {"question": "What does Boris Okafor write?", "answer": "Boris Okafor writes mystery novels."},
    {"question": "Who wrote Emma?", "answer": "Jane Austen"},
]
RETAIN = [{"question": "What is the capital of France?", "answer": "Paris"}]
IDK = ["I don't know.", "I have no idea."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer([r["question"] + " " + r["answer"] for r in ROWS + RETAIN] * 3 + IDK, 320)
    model = build_model(ArchCfg(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                intermediate_size=64), tok, 0)
    d = tmp_path_factory.mktemp("ref") / "target"
    save_model(model, tok, d)
    return d


def _ensure(model_dir, cache_dir, **kw):
    from unlearn.models.build import load_tokenizer

    args = dict(cache_dir=cache_dir, model_dir=model_dir, tokenizer=load_tokenizer(model_dir), forget_rows=ROWS,
                retain_rows=RETAIN, refusals=IDK, seed=0, max_length=32, top_k=8, with_retain=True)
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
    base = dict(model_hash="m", tok_hash="t", questions=["q"], answers=["a"], max_length=32, top_k=8, part="forget")
    k0 = C.cache_key(**base)
    for field, value in [("model_hash", "m2"), ("tok_hash", "t2"), ("questions", ["q2"]), ("answers", ["a2"]),
                         ("max_length", 33), ("top_k", 9), ("part", "retain")]:
        assert C.cache_key(**dict(base, **{field: value})) != k0, field
    assert C.cache_key(**dict(base, extra=["I don't know."])) != k0
    assert C.cache_key(**base) == k0


def test_changed_rows_or_weights_write_a_new_file(model_dir, tmp_path):
    a = _ensure(model_dir, tmp_path)
    b = _ensure(model_dir, tmp_path, forget_rows=ROWS[:2])
    c = _ensure(model_dir, tmp_path, max_length=24)
    assert len({a.paths[0], b.paths[0], c.paths[0]}) == 3


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


def test_cached_values_match_a_live_reference_forward(model_dir, tmp_path):
    from unlearn.models.build import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    cached = _ensure(model_dir, tmp_path)
    live = C.LiveReference(load_model(model_dir), top_k=8)
    enc = encode_many(tok, [r["question"] for r in ROWS], [r["answer"] for r in ROWS], 32)
    idk = C.idk_answers(len(ROWS), IDK, 0)
    batch = {"forget": collate(enc, tok.pad_token_id),
             "idk": collate(encode_many(tok, [r["question"] for r in ROWS], idk, 32), tok.pad_token_id)}
    width = batch["forget"]["input_ids"].size(1)
    got = cached.lookup([0, 1, 2], width)
    exp = live(batch)
    torch.testing.assert_close(got["seq_logp"], exp["seq_logp"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["idk_seq_logp"], exp["idk_seq_logp"], atol=1e-5, rtol=1e-5)
    mask = batch["forget"]["labels"][:, 1:] != -100
    assert torch.equal(got["topk_ids"][mask], exp["topk_ids"][mask])
    torch.testing.assert_close(got["topk_logp"][mask], exp["topk_logp"][mask])
