"""MUSE behind the benchmark interface: forget sets of folds, chunked raw text, the reference cache without
refusals, and the rules that pair forget and retain text. (The data layer and the metrics have their own tests.)"""

from __future__ import annotations

import json

import pytest
import torch

from unlearn.benchmark import MUSE, EncodedInputs, get_benchmark
from unlearn.config import load_params
from unlearn.data.names import muse_folds, muse_retain_folds, retain_of
from unlearn.errors import UserError
from unlearn.models.build import train_tokenizer
from unlearn.models.formatting import IGNORE, encode_text, encode_text_chunks

TEXTS = ["The council of Brindlemoor approved a new bridge on Tuesday after a long debate. " * 3,
         "Short note.", "Harbour workers in Keswan voted to end the strike."]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS * 10, 320)


def test_forget_sets_and_their_retain_text():
    assert muse_folds("fold1") == ["fold1"]
    assert muse_folds("fold1-3") == ["fold1", "fold2", "fold3"]
    assert muse_retain_folds("fold1") == ["fold2", "fold3", "fold4"]
    # sustainability: fold 3 after folds 1 and 2 were forgotten keeps only what comes after it
    assert muse_retain_folds("fold3") == ["fold4"]
    assert muse_retain_folds("fold1-4") == [] and muse_retain_folds("fold4") == []
    assert retain_of("fold1-2") == "fold3+fold4+privleak_retain"
    with pytest.raises(UserError, match="fold5"):
        muse_folds("fold5")


def test_muse_params_file_selects_the_benchmark():
    p = load_params("muse/params.yaml")
    b = get_benchmark(p.benchmark)
    assert isinstance(b, MUSE)
    assert b.split_groups(p) == (["fold1"], ["fold2", "fold3", "fold4", "privleak_retain"])
    assert b.gate_metrics.forget == "privleak" and b.gate_metrics.forget_rule == "abs_max"
    assert p.tracking.registered_model == "unlearned-muse"
    # nothing of the MUSE pipeline lands where the TOFU pipeline writes
    tofu = load_params("params.yaml")
    for a, t in ((p.data.out_dir, tofu.data.out_dir), (p.model.out_dir, tofu.model.out_dir),
                 (p.cache.dir, tofu.cache.dir), (p.reports_dir, tofu.reports_dir)):
        assert a.startswith("muse/") and not a.startswith(t + "/")


def test_text_chunks_cover_every_token_exactly_once(tok):
    L = 8
    chunks = encode_text_chunks(tok, TEXTS, L)
    bos = tok.bos_token_id
    assert all(c.input_ids[0] == bos and c.labels[0] == IGNORE for c in chunks)
    assert all(len(c.input_ids) <= L and c.input_ids[1:] == c.labels[1:] for c in chunks)
    # concatenating the chunks of each text gives back its token ids, in order, nothing dropped or repeated
    flat = [t for c in chunks for t in c.input_ids[1:]]
    want = [t for text in TEXTS for t in tok(text, add_special_tokens=False)["input_ids"]]
    assert flat == want
    # no window mixes two texts: the short one is a chunk of its own
    short = tok(TEXTS[1], add_special_tokens=False)["input_ids"]
    assert any(c.input_ids[1:] == short for c in chunks)


def test_encode_text_cuts_at_max_length_and_says_so(tok):
    e = encode_text(tok, TEXTS[0], 10)
    assert len(e.input_ids) == 10 and e.truncated and e.labels[0] == IGNORE
    assert e.input_ids[1:] == tok(TEXTS[0], add_special_tokens=False)["input_ids"][:9]
    short = encode_text(tok, TEXTS[1], 64)
    assert not short.truncated and short.labels[1:] == short.input_ids[1:]


def test_cache_without_refusals_has_no_idk_tensor(tmp_path, tok):
    """A raw-text benchmark has no refusal answers: the cache holds no idk tensor, its lookup none either."""
    from unlearn import cache as C
    from unlearn.config import ArchCfg
    from unlearn.models.build import build_model, save_model

    model = build_model(ArchCfg(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                intermediate_size=64, max_position_embeddings=32), tok, seed=0)
    save_model(model, tok, tmp_path / "m")
    enc = EncodedInputs(forget=encode_text_chunks(tok, TEXTS, 16), retain=encode_text_chunks(tok, TEXTS[1:], 16), idk=[])
    c = C.ensure_cache(cache_dir=tmp_path / "c", model_dir=tmp_path / "m", tokenizer=tok, forget_rows=[],
                       retain_rows=[], refusals=[], seed=0, max_length=16, top_k=4, with_retain=False, encoded=enc)
    assert "idk_seq_logp" not in c.forget and c.forget["seq_logp"].shape == (len(enc.forget),)
    ref = c.lookup([0, 1], 16)
    assert "idk_seq_logp" not in ref
    # the cached label log-probs are the model's own on those chunks
    from unlearn.models.formatting import collate

    b = collate(enc.forget[:2], tok.pad_token_id, pad_to=16)
    with torch.no_grad():
        logp = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float().log_softmax(-1)
    lab = b["labels"][:, 1:]
    got = logp[:, :-1].gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (lab != IGNORE)
    assert torch.allclose(ref["label_logp"], got, atol=1e-5)
    # reloaded, not recomputed
    again = C.ensure_cache(cache_dir=tmp_path / "c", model_dir=tmp_path / "m", tokenizer=tok, forget_rows=[],
                           retain_rows=[], refusals=[], seed=0, max_length=16, top_k=4, with_retain=False, encoded=enc)
    assert torch.equal(again.forget["label_logp"], c.forget["label_logp"])


@pytest.fixture(scope="module")
def muse_project(tmp_path_factory):
    """A tiny MUSE run: 2 articles per fold, a one-layer model trained 2 epochs on the chunks of every fold."""
    from unlearn import stages

    d = tmp_path_factory.mktemp("muse")
    arch = "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2, " \
           "intermediate_size: 64, max_position_embeddings: 256}"
    ov = [f"data.out_dir={d}/data", f"model.out_dir={d}/models", f"cache.dir={d}/cache", f"reports_dir={d}/reports",
          "muse.synthetic.articles_per_fold=2", "muse.synthetic.retain_articles=2", "muse.synthetic.holdout_articles=2",
          "muse.synthetic.sentences_per_article=4", "model.max_length=64", f"model.arch={arch}",
          "model.tokenizer.vocab_size=400", "finetune.epochs=2", "method.epochs=1", "method.batch_size=2"]
    p = load_params("muse/params.yaml", ov)
    stages.prepare(p)
    stages.tokenizer(p)
    stages.finetune(p, "target")
    return p, ov


def test_forget_runs_on_text_chunks(muse_project):
    """Every method but DPO-IdK runs unchanged on MUSE: its forget rows are the chunks of the forgotten folds."""
    from unlearn import stages
    from unlearn.models.build import load_tokenizer

    p, ov = muse_project
    tok = load_tokenizer(stages.model_dir(p, "target"))
    b = get_benchmark("muse")
    enc = b.encode_inputs(p, tok, b.forget_inputs(p))
    fold1 = stages.read_splits(p, ["fold1"])["fold1"]
    assert len(enc.forget) >= len(fold1) and enc.idk == []
    assert [t for e in enc.forget for t in e.input_ids[1:]] == \
        [t for r in fold1 for t in tok(r["text"], add_special_tokens=False)["input_ids"]]
    s = stages.forget(load_params("muse/params.yaml", [*ov, "method.name=graddiff"]))
    assert s["method"] == "graddiff" and s["steps"] == -(-len(enc.forget) // 2)
    assert (stages.model_dir(p, "unlearned") / "model.safetensors").exists()
    assert 0 <= s["forget_prob"] <= 1 and 0 <= s["retain_prob"] <= 1


def test_knowmem_selection_keeps_the_step_muses_rule_names(muse_project, tmp_path):
    """``method.select=knowmem_at_retain``: KnowMem on the first ``eval_rows`` forget questions is logged at
    every evaluation; the kept step is the first whose value is at or below the retain model's, both measured
    as the evaluation measures KnowMem (checked by calling it on the saved models)."""
    from unlearn import stages
    from unlearn.data.names import KNOWMEM_FORGET, KNOWMEM_FORGET_ICL
    from unlearn.eval.muse_metrics import knowmem
    from unlearn.models.build import load_model, load_tokenizer

    p, ov = muse_project
    stages.finetune(p, "retain")
    over = [*ov, "method.name=graddiff", "method.eval_every=1", "method.eval_rows=3", "method.epochs=2"]
    full = stages.forget(load_params("muse/params.yaml", over), out_dir=tmp_path / "last")
    picked = stages.forget(load_params("muse/params.yaml", [*over, "method.select=knowmem_at_retain"]),
                           out_dir=tmp_path / "picked")
    log = json.loads((tmp_path / "last.reports" / "loss.json").read_text())
    splits = stages.read_splits(p, [KNOWMEM_FORGET, KNOWMEM_FORGET_ICL])
    tok = load_tokenizer(stages.model_dir(p, "target"))

    def km(model_dir):
        return knowmem(load_model(model_dir), tok, splits[KNOWMEM_FORGET][:3], splits[KNOWMEM_FORGET_ICL],
                       max_new_tokens=p.muse.eval.knowmem_max_new_tokens).score

    retain_value = picked["retain_model_knowmem_forget"]
    assert retain_value == pytest.approx(km(stages.model_dir(p, "retain")), abs=1e-12)
    assert log[-1]["eval_knowmem_forget"] == pytest.approx(km(tmp_path / "last"), abs=1e-12)  # the saved model's
    first = next(e["step"] for e in log if e["eval_knowmem_forget"] <= retain_value)
    assert picked["select"] == "knowmem_at_retain" and picked["selected_step"] == first == picked["steps"]
    assert full["steps"] == len(log) >= first
    curve = json.loads((tmp_path / "picked.reports" / "eval.json").read_text())
    assert {"knowmem_forget", "retain_model_knowmem_forget"} <= set(curve[-1])


def test_refusal_methods_fail_clearly_on_raw_text(muse_project):
    """DPO-IdK prefers a refusal to the forget answer; MUSE's forget set has no questions to refuse."""
    from unlearn import stages

    _, ov = muse_project
    with pytest.raises(ValueError, match="dpo_idk needs refusal answers.*raw text"):
        stages.forget(load_params("muse/params.yaml", [*ov, "method.name=dpo_idk"]))
