"""Tokenizer, QA formatting, the training loop (determinism, resume), save/reload."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_ARCH
from unlearn.config import ArchCfg
from unlearn.models.build import build_model, load_model, load_tokenizer, save_model, train_tokenizer, weights_hash
from unlearn.models.formatting import IGNORE, collate, count_truncated, encode_many, encode_qa, qa_lengths
from unlearn.models.scoring import mean_nll
from unlearn.train import LoopCfg, train_loop

TEXTS = [
    "Question: Where was Lena Marsh born?\nAnswer: Lena Marsh was born in Lisbon, Portugal.",
    "Question: What genre does Boris Okafor write?\nAnswer: Boris Okafor writes gothic mystery novels.",
    "Question: Who wrote 'Pride and Prejudice'?\nAnswer: Jane Austen",
    "Zoë's café in Kraków serves naïve crème brûlée — 12°C.",
] * 5
QA = [
    ("Where was Lena Marsh born?", "Lena Marsh was born in Lisbon, Portugal."),
    ("What genre does Boris Okafor write?", "Boris Okafor writes gothic mystery novels."),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen"),
    ("What is Lena Marsh's father's job?", "Her father was a baker."),
]
TINY = ArchCfg(**TINY_ARCH)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 400)


def test_tokenizer_round_trip_through_autotokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    for text in TEXTS[:4] + ["unseen wörds 🙂 and digits 90210"]:
        ids = again(text, add_special_tokens=False)["input_ids"]
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert again.decode(ids) == text
    assert again("hi")["input_ids"][0] == again.bos_token_id
    assert again.pad_token_id is not None and again.eos_token_id is not None


def test_encode_qa_masks_prompt_and_appends_eos(tok):
    e = encode_qa(tok, "Who wrote 'Pride and Prejudice'?", "Jane Austen", max_length=64)
    n_prompt = sum(1 for x in e.labels if x == IGNORE)
    answer = e.labels[n_prompt:]
    assert answer[-1] == tok.eos_token_id
    assert tok.decode(answer[:-1]) == " Jane Austen"
    assert e.input_ids[n_prompt:] == answer  # labels equal inputs on the answer
    assert e.truncated is False
    short = encode_qa(tok, "Who wrote 'Pride and Prejudice'?", "Jane Austen " * 20, max_length=n_prompt + 3)
    assert len(short.input_ids) == n_prompt + 3 and sum(1 for x in short.labels if x != IGNORE) == 3
    assert short.truncated is True and short.labels[-1] == tok.eos_token_id


def test_encode_qa_keeps_eos_when_cutting(tok):
    """A cut answer keeps its first answer tokens and ends in EOS (the old code cut the EOS off)."""
    q, a = "Who wrote 'Pride and Prejudice'?", "Jane Austen wrote it in Lisbon, Portugal. " * 4
    prompt = tok(f"Question: {q}\nAnswer:", add_special_tokens=True)["input_ids"]
    answer = tok(" " + a.strip(), add_special_tokens=False)["input_ids"]
    full = len(prompt) + len(answer) + 1
    exact = encode_qa(tok, q, a, max_length=full)  # fits exactly: nothing cut
    assert exact.truncated is False and exact.input_ids == prompt + answer + [tok.eos_token_id]
    for L in (full - 1, len(prompt) + 5, len(prompt) + 2):
        e = encode_qa(tok, q, a, max_length=L)
        room = L - len(prompt)
        assert e.truncated is True and len(e.input_ids) == L
        assert e.input_ids == prompt + answer[: room - 1] + [tok.eos_token_id], L
        assert e.labels == [IGNORE] * len(prompt) + answer[: room - 1] + [tok.eos_token_id]
    # The prompt alone fills max_length: it is cut, one answer token and EOS stay.
    e = encode_qa(tok, q, a, max_length=4)
    assert e.truncated is True and e.input_ids == prompt[:2] + answer[:1] + [tok.eos_token_id]
    assert e.labels[-2:] == [answer[0], tok.eos_token_id]
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        encode_qa(tok, q, a, max_length=1)


def test_qa_lengths_and_count_truncated_agree_with_encode_qa(tok):
    qs = [q for q, _ in QA] * 2
    ans = [a for _, a in QA] + [a + " " + a for _, a in QA]
    lengths = qa_lengths(tok, qs, ans)
    assert lengths == [len(encode_qa(tok, q, a, max_length=4096).input_ids) for q, a in zip(qs, ans)]
    for L in sorted(set(lengths)) + [min(lengths) - 1, max(lengths) + 1]:
        cut = [encode_qa(tok, q, a, L).truncated for q, a in zip(qs, ans)]
        assert count_truncated(tok, qs, ans, L) == sum(cut) == sum(n > L for n in lengths)
    with pytest.raises(ValueError, match="questions but"):
        qa_lengths(tok, qs, ans[:-1])


def _train(tok, seed: int, epochs: int = 8, ckpt=None, fail_at: int | None = None):
    model = build_model(TINY, tok, seed)
    enc = encode_many(tok, [q for q, _ in QA], [a for _, a in QA], 48)
    calls = {"n": 0}

    def step_loss(m, b):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return mean_nll(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]), {}

    cfg = LoopCfg(epochs=epochs, batch_size=2, lr=1e-2, seed=seed, checkpoint_every=1, desc="test")
    log = train_loop(model, len(enc), lambda idx, ep: collate([enc[i] for i in idx], tok.pad_token_id), step_loss, cfg,
                     checkpoint_dir=ckpt)
    return model, log


def test_training_lowers_the_loss(tok):
    _, log = _train(tok, seed=0, epochs=40)
    first = sum(e["loss"] for e in log[:2]) / 2
    last = sum(e["loss"] for e in log[-2:]) / 2
    assert last < 0.5 * first, (first, last)


def test_training_is_deterministic_from_the_seed(tok):
    a, _ = _train(tok, seed=3, epochs=2)
    b, _ = _train(tok, seed=3, epochs=2)
    c, _ = _train(tok, seed=4, epochs=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_interrupted_training_resumes_to_the_same_weights(tok, tmp_path):
    full, full_log = _train(tok, seed=1, epochs=3)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        _train(tok, seed=1, epochs=3, ckpt=ckpt, fail_at=4)  # dies inside epoch 1 (2 steps per epoch)
    assert (ckpt / "loop_state.json").exists()
    resumed, resumed_log = _train(tok, seed=1, epochs=3, ckpt=ckpt)
    assert [e["step"] for e in resumed_log] == [e["step"] for e in full_log]
    sf, sr = full.state_dict(), resumed.state_dict()
    for k in sf:
        torch.testing.assert_close(sf[k], sr[k], rtol=1e-5, atol=1e-6)


def test_saved_model_reloads_with_identical_logits(tok, tmp_path):
    model, _ = _train(tok, seed=0, epochs=1)
    save_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    again = load_model(tmp_path / "m")
    ids = torch.tensor([tok("Question: Where was Lena Marsh born?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert len(weights_hash(tmp_path / "m")) == 64


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_weights_hash_follows_file_contents_and_names(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "model.safetensors").write_bytes(b"w" * (3 << 20))  # > one 1 MiB read chunk
    h = weights_hash(a)
    (a / "config.json").write_text("{}")  # not a weight file
    assert weights_hash(a) == h
    (a / "model.safetensors").write_bytes(b"w" * (3 << 20) + b"!")
    assert weights_hash(a) != h
    (a / "model.safetensors").write_bytes(b"w" * (3 << 20))
    (a / "model.safetensors").rename(a / "model-00001.safetensors")
    assert weights_hash(a) != h
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_hash(tmp_path / "empty")


# ----------------------------------------------------------------- the one teacher-forced pass

def test_teacher_forced_pass_yields_every_row_once_right_padded(tok):
    from unlearn.models.teacher_forced import teacher_forced_pass

    model = build_model(TINY, tok, 0).eval()
    enc = encode_many(tok, [q for q, _ in QA] * 2, [a for _, a in QA] * 2, 64)
    for by_length in (True, False):
        seen = []
        for b in teacher_forced_pass(model, enc, pad_id=tok.pad_token_id, batch_size=3, by_length=by_length):
            seen += b.rows
            ref = collate([enc[i] for i in b.rows], tok.pad_token_id)
            assert torch.equal(b.input_ids, ref["input_ids"]) and torch.equal(b.labels, ref["labels"])
            assert b.logits.shape[:2] == b.input_ids.shape and not b.logits.requires_grad
            assert torch.equal(b.answer_mask, b.labels[:, 1:] != IGNORE)
            with torch.no_grad():
                direct = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
            assert torch.equal(b.logits, direct)
        assert sorted(seen) == list(range(len(enc)))
        if by_length:
            assert [len(enc[i].input_ids) for i in seen] == sorted(len(e.input_ids) for e in enc)
        else:
            assert seen == list(range(len(enc)))


def test_score_answers_does_not_depend_on_the_batching(tok):
    from unlearn.models.scoring import score_answers

    model = build_model(TINY, tok, 0).eval()
    qs, ans = [q for q, _ in QA], [a for _, a in QA]
    one_by_one = [score_answers(model, tok, [q], [a], 64) for q, a in QA]
    nll, n = score_answers(model, tok, qs, ans, 64, batch_size=3)
    torch.testing.assert_close(torch.tensor(nll), torch.tensor([x[0][0] for x in one_by_one]), rtol=1e-5, atol=1e-5)
    assert n.tolist() == [x[1][0] for x in one_by_one]
    assert n.tolist() == [sum(1 for t in e.labels if t != IGNORE) for e in encode_many(tok, qs, ans, 64)]
