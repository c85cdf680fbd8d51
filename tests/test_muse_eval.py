"""MUSE's generation metrics (unlearn.eval.muse_metrics) and the directory runner (unlearn.eval.muse_runner)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from rouge_score import rouge_scorer

from unlearn.config import ArchCfg, EvalCfg, MuseEvalCfg
from unlearn.data.names import (
    KNOWMEM_FORGET,
    KNOWMEM_FORGET_ICL,
    KNOWMEM_RETAIN,
    KNOWMEM_RETAIN_ICL,
    PRIVLEAK_FORGET,
    PRIVLEAK_HOLDOUT,
    PRIVLEAK_RETAIN,
    VERBMEM_FORGET,
)
from unlearn.eval.mia import metric_suffix, privleak
from unlearn.eval.muse_metrics import (
    cut_knowmem_answer,
    fit_prompt,
    knowmem,
    knowmem_prompt,
    rouge_l,
    truncate_to_tokens,
    verbmem,
)
from unlearn.eval.muse_runner import METRIC_KEYS, REFERENCE_FILE, evaluate_muse_dir
from unlearn.models.build import build_model, save_model, train_tokenizer

WORDS = ("river bank city council mayor election storm harbour bridge school teacher market price farmer "
         "museum painting train station doctor hospital festival music garden winter summer ship").split()


def _article(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [_article(rng, 60) for _ in range(40)] + ["Question: who?\nAnswer: the mayor\n\n"] * 5
    return train_tokenizer(texts, 300)


# ----------------------------------------------------------------------------- pure helpers

def test_rouge_l_is_unstemmed_f1():
    ref, pred = "the mayor opened the new bridge", "the mayor opened"
    s = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(ref, pred)["rougeL"]
    assert rouge_l(ref, pred) == pytest.approx(s.fmeasure)
    assert s.fmeasure != pytest.approx(s.recall)  # F1, not recall (the TOFU metric)
    # No stemming: "opened bridges" and "open bridge" share no unstemmed token.
    assert rouge_l("opened bridges", "open bridge") == 0.0
    assert rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score("opened bridges", "open bridge")[
        "rougeL"].fmeasure == 1.0


def test_cut_knowmem_answer():
    assert cut_knowmem_answer(" the mayor\n\nQuestion: who else?") == "the mayor"
    assert cut_knowmem_answer(" the mayor\nQuestion: who else?") == "the mayor"
    assert cut_knowmem_answer(" the mayor Question: who else?") == "the mayor"
    assert cut_knowmem_answer(" the mayor\nof the city") == "the mayor\nof the city"  # one newline is no cut
    assert cut_knowmem_answer("\n\nthe mayor") == ""  # MUSE: an answer that starts with a blank line is empty
    assert cut_knowmem_answer("Questions remain\n\nmore") == "Questions remain"  # "Question" alone is no cut


def test_knowmem_prompt():
    icl = [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
    assert knowmem_prompt(icl, "Q3?") == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q3?\nAnswer:"
    assert knowmem_prompt([], "Q?") == "Question: Q?\nAnswer:"


def test_truncate_to_tokens(tok):
    gt = _article(random.Random(1), 400)
    ids = tok(gt, add_special_tokens=False)["input_ids"]
    assert len(ids) > 300
    cut = truncate_to_tokens(tok, gt, 128)
    assert cut == tok.decode(ids[:128], skip_special_tokens=True)
    assert gt.startswith(cut) and len(cut) < len(gt)
    assert truncate_to_tokens(tok, "a short one", 128) == "a short one"


def test_fit_prompt_cuts_from_the_left_keeping_bos():
    assert fit_prompt([1, 5, 6, 7, 8], 3, bos_id=1) == ([1, 7, 8], True)
    assert fit_prompt([5, 6, 7, 8], 3, bos_id=1) == ([6, 7, 8], True)
    assert fit_prompt([1, 5, 6], 3, bos_id=1) == ([1, 5, 6], False)
    assert fit_prompt([1, 5, 6], None, bos_id=1) == ([1, 5, 6], False)
    assert fit_prompt([1, 5, 6], 1, bos_id=1) == ([1], True)


# ----------------------------------------------------------------------------- VerbMem / KnowMem with a scripted model

class Scripted(torch.nn.Module):
    """A 'model' whose greedy continuation of every prompt is a fixed list of token ids (cut at max_new_tokens)."""

    def __init__(self, continuation: list[int], ctx: int = 4096):
        super().__init__()
        self.continuation = continuation
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"max_position_embeddings": ctx})()
        self.seen: list[list[int]] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        self.seen += [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
        new = torch.tensor([self.continuation[:max_new_tokens]] * input_ids.size(0), dtype=torch.long)
        return torch.cat([input_ids, new], 1)


def test_verbmem_scores_against_the_first_n_tokens_of_the_truth(tok):
    gt = _article(random.Random(2), 400)
    ids = tok(gt, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 300
    model = Scripted(ids)  # continues with the truth itself
    res = verbmem(model, tok, [{"id": "v0", "prompt": "river bank", "gt": gt}], max_new_tokens=128, device="cpu")
    rec = res.records[0]
    # The continuation is the truth's first 128 tokens; scored against the truth cut to 128 tokens: F1 = 1.
    assert res.score == pytest.approx(1.0) and rec["rouge_l"] == pytest.approx(1.0)
    assert rec["gt"] == truncate_to_tokens(tok, gt, 128)
    # Against the whole truth the same continuation would score far lower.
    assert rouge_l(gt, rec["generation"]) < 0.7
    assert res.prompts_cut == 0 and rec["prompt_cut"] is False


def test_knowmem_cuts_answers_and_prompts(tok):
    answer_ids = tok(" the mayor\n\nQuestion: what", add_special_tokens=False)["input_ids"]
    model = Scripted(answer_ids + [tok.eos_token_id, 7, 7])
    icl = [{"question": "who ran?", "answer": "the farmer"}]
    rows = [{"id": "k0", "question": "who won?", "answer": "the mayor"},
            {"id": "k1", "question": "who lost?", "answer": "the teacher"}]
    res = knowmem(model, tok, rows, icl, max_new_tokens=32, device="cpu")
    assert [r["generation"] for r in res.records] == ["the mayor", "the mayor"]
    assert [r["rouge_l"] for r in res.records] == pytest.approx([1.0, 0.5])
    assert res.score == pytest.approx(0.75)
    assert tok.decode(model.seen[0], skip_special_tokens=True) == knowmem_prompt(icl, "who won?")
    # A context too small for the prompt: cut from the left, BOS kept, counted.
    small = Scripted(answer_ids, ctx=40)
    res = knowmem(small, tok, rows, icl * 10, max_new_tokens=32, device="cpu")
    assert res.prompts_cut == 2 and all(r["prompt_cut"] for r in res.records)
    assert all(len(s) == 8 and s[0] == tok.bos_token_id for s in small.seen)
    assert tok.decode(small.seen[0]).endswith("\nAnswer:")


# ----------------------------------------------------------------------------- end to end on a tiny Llama

TINY = ArchCfg(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=160)


def _splits() -> dict[str, list[dict]]:
    rng = random.Random(3)
    art = lambda i, n=4: {"id": f"a{i}", "text": _article(rng, n)}  # noqa: E731
    qa = lambda p, i: {"id": f"{p}{i}", "question": f"who opened the {rng.choice(WORDS)}?",  # noqa: E731
                       "answer": f"the {rng.choice(WORDS)}"}
    return {
        PRIVLEAK_FORGET: [art(i, 60 if i == 0 else 4) for i in range(5)],  # a0 is cut at max_length
        PRIVLEAK_HOLDOUT: [art(10 + i) for i in range(5)],
        PRIVLEAK_RETAIN: [art(20 + i) for i in range(3)],
        VERBMEM_FORGET: [{"id": "v0", "prompt": _article(rng, 10), "gt": _article(rng, 20)},
                         {"id": "v1", "prompt": _article(rng, 80), "gt": _article(rng, 20)}],  # v1: over the context
        KNOWMEM_FORGET: [qa("kf", i) for i in range(3)],
        KNOWMEM_FORGET_ICL: [qa("kfi", i) for i in range(2)],
        KNOWMEM_RETAIN: [qa("kr", i) for i in range(3)],
        KNOWMEM_RETAIN_ICL: [qa("kri", i) for i in range(2)],
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("muse_models")
    for name, seed in (("retain", 0), ("other", 1)):
        save_model(build_model(TINY, tok, seed), tok, d / name)
    return d


def test_evaluate_muse_dir(tmp_path, models):
    splits = _splits()
    cfg = EvalCfg(batch_size=4, report_examples=2)
    muse_cfg = MuseEvalCfg(verbmem_max_new_tokens=8, knowmem_max_new_tokens=6, mink_k=0.4, privleak_attack="min_k")
    ref_dir = tmp_path / "reference"
    common = dict(splits=splits, max_length=64, cfg=cfg, muse_cfg=muse_cfg, reference_dir=ref_dir, progress=False,
                  device="cpu")

    # The retain model: writes the reference, its PrivLeak is exactly 0.
    out_r = tmp_path / "retain"
    res_r = evaluate_muse_dir(models / "retain", is_retain=True, out_dir=out_r, title="retain", **common)
    m_r = json.loads((out_r / "metrics.json").read_text())
    assert list(m_r) == list(METRIC_KEYS)
    assert set(METRIC_KEYS) == {"verbmem_forget", "knowmem_forget", "knowmem_retain", "mia_auc_loss", "mia_auc_zlib",
                                "mia_auc_min_k", "mia_auc_min_k_plus_plus", "privleak", "privleak_loss", "privleak_zlib",
                                "privleak_min_k", "privleak_min_k_plus_plus"}
    assert all(isinstance(v, float) for v in m_r.values()), m_r
    assert all(m_r[k] == 0.0 for k in METRIC_KEYS if k.startswith("privleak"))
    assert all(0.0 <= m_r[f"mia_auc_{metric_suffix(a)}"] <= 1.0 for a in ("loss", "zlib", "min_k", "min_k++"))
    ref = json.loads((ref_dir / REFERENCE_FILE).read_text())
    assert ref["auc"] == {a: m_r[f"mia_auc_{metric_suffix(a)}"] for a in ("loss", "zlib", "min_k", "min_k++")}
    assert ref["max_length"] == 64 and ref["k"] == 0.4 and len(ref["key"]) == 64
    assert res_r.metrics == m_r

    # Another model, with the retain model as the report's target: PrivLeak from the stored AUCs.
    out_o = tmp_path / "other"
    res = evaluate_muse_dir(models / "other", is_retain=False, target_model_dir=models / "retain", out_dir=out_o,
                            title="other model", retain_model_dir=models / "retain", **common)
    m = json.loads((out_o / "metrics.json").read_text())
    assert list(m) == list(METRIC_KEYS)
    for a in ("loss", "zlib", "min_k", "min_k++"):
        assert m[f"privleak_{metric_suffix(a)}"] == pytest.approx(privleak(m[f"mia_auc_{metric_suffix(a)}"], ref["auc"][a]))
    assert m["privleak"] == m["privleak_min_k"]
    for f in ("metrics.json", "notes.json", "per_example.jsonl", "report.md", "report.html", "mia_hist.png"):
        assert (out_o / f).is_file(), f
    recs = [json.loads(x) for x in (out_o / "per_example.jsonl").read_text().splitlines()]
    evaluated = (VERBMEM_FORGET, KNOWMEM_FORGET, KNOWMEM_RETAIN, PRIVLEAK_FORGET, PRIVLEAK_HOLDOUT)
    assert len(recs) == sum(len(splits[s]) for s in evaluated)
    assert {r["split"] for r in recs} == set(evaluated) and all("id" in r for r in recs)
    pf = {r["id"]: r for r in recs if r["split"] == PRIVLEAK_FORGET}
    assert pf["a0"]["truncated"] and pf["a0"]["n_tokens"] == 63 and not pf["a1"]["truncated"]
    notes = json.loads((out_o / "notes.json").read_text())
    assert notes["privleak_truncation"].startswith(f"{PRIVLEAK_FORGET}: 1/5 articles cut at max_length 64")
    assert notes[f"{VERBMEM_FORGET}_truncation"].startswith(f"{VERBMEM_FORGET}: 1/2 prompts cut")
    assert res.truncation[VERBMEM_FORGET]["prompts_cut"] == 1
    md = (out_o / "report.md").read_text()
    html = (out_o / "report.html").read_text()
    assert "PrivLeak" in md and "data:image/png;base64," in html
    # The target's (retain model's) answers appear beside this model's.
    target_rows = [r for r in res_r.per_example[KNOWMEM_FORGET][:2]]
    assert all(r["generation"] in html for r in target_rows if r["generation"])

    # A different max_length: the stored reference does not apply.
    out_x = tmp_path / "other_len"
    evaluate_muse_dir(models / "other", is_retain=False, out_dir=out_x, title="x", **{**common, "max_length": 48})
    mx = json.loads((out_x / "metrics.json").read_text())
    assert mx["privleak"] is None and mx["mia_auc_min_k"] is not None
    nx = json.loads((out_x / "notes.json").read_text())
    assert "unlearn evaluate <retain model> --name retain" in nx["privleak"]

    # No reference at all.
    out_n = tmp_path / "no_ref"
    evaluate_muse_dir(models / "other", is_retain=False, out_dir=out_n, title="n",
                      **{**common, "reference_dir": tmp_path / "nowhere"})
    nn = json.loads((out_n / "notes.json").read_text())
    assert json.loads((out_n / "metrics.json").read_text())["privleak_loss"] is None
    assert "evaluate the retain model first" in nn["privleak_loss"]
    assert "n/a" in (out_n / "report.md").read_text()
