"""TOFU metrics against hand computations on a model whose token probabilities are known.

``TableLM`` returns logits ``log P[current token]`` for a fixed row-stochastic
matrix ``P``: the next-token distribution depends only on the current token, so
every answer probability is a product of table entries, computed here directly
from ``P`` and the word list (never through the code under test).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch
from rouge_score import rouge_scorer
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from unlearn.config import EvalCfg
from unlearn.eval import (
    evaluate_dir,
    evaluate_model,
    generate_answers,
    reference_key,
    retain_reference,
    teacher_forced_stats,
    write_report,
)
from unlearn.eval.reference_store import REFERENCE_DIRNAME
from unlearn.models.template import PLAIN
from unlearn.models.scoring import score_answers

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
WORDS = ["Question", ":", "?", "Answer", "Who", "is", "what", "the", "author", "<b>&",
         "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
V = len(VOCAB)
EOS = VOCAB["[EOS]"]
# Greedy successor of each token (probability 0.6; the rest spread at random).
NEXT = {":": "alpha", "alpha": "beta", "beta": "gamma", "gamma": "[EOS]", "delta": "beta"}


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(":", behavior="isolated"), pre_tokenizers.WhitespaceSplit()])
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", VOCAB["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]")


def make_table(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    P = np.zeros((V, V))
    for w, i in VOCAB.items():
        rest = rng.dirichlet(np.ones(V - 1)) * 0.4
        j = VOCAB[NEXT.get(w, "[EOS]")]
        P[i, np.arange(V) != j] = rest
        P[i, j] = 0.6
    return P


class TableLM(torch.nn.Module):
    """HF-causal-LM-shaped module: ``logits[b, t] = log P[input_ids[b, t]]``."""

    def __init__(self, P: np.ndarray):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(np.log(P), dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


FORGET = [
    {"id": 0, "author_id": 0, "question": "Who is the author ?", "answer": "alpha beta gamma",
     "paraphrased_answer": "beta gamma", "perturbed_answer": ["delta beta", "gamma alpha", "epsilon"]},
    {"id": 1, "author_id": 0, "question": "what is <b>& ?", "answer": "delta beta gamma",
     "paraphrased_answer": "alpha beta", "perturbed_answer": ["zeta eta", "theta"]},
    {"id": 2, "author_id": 1, "question": "Who is alpha ?", "answer": "alpha beta delta",
     "paraphrased_answer": "gamma", "perturbed_answer": ["alpha", "beta beta", "delta delta delta", "eta", "zeta"]},
    {"id": 3, "author_id": 1, "question": "what is the author ?", "answer": "delta gamma alpha",
     "paraphrased_answer": "delta gamma", "perturbed_answer": ["alpha beta gamma", "epsilon zeta"]},
]
RETAIN = [
    {"id": 10, "author_id": 2, "question": "Who is beta ?", "answer": "alpha beta",
     "paraphrased_answer": "alpha gamma", "perturbed_answer": ["eta", "theta theta", "zeta"]},
    {"id": 11, "author_id": 2, "question": "what is gamma ?", "answer": "epsilon zeta",
     "paraphrased_answer": "epsilon", "perturbed_answer": ["alpha beta gamma", "alpha"]},
]
REAL = [
    {"id": 20, "author_id": None, "question": "Who is the author ?", "answer": "alpha beta",
     "paraphrased_answer": None, "perturbed_answer": ["delta", "eta theta", "zeta"]},
    {"id": 21, "author_id": None, "question": "what is the author ?", "answer": "theta",
     "paraphrased_answer": None, "perturbed_answer": ["alpha", "alpha beta gamma", "beta"]},
]
WORLD = [
    {"id": 30, "author_id": None, "question": "what is alpha ?", "answer": "gamma delta",
     "paraphrased_answer": None, "perturbed_answer": ["alpha beta", "eta", "epsilon"]},
    {"id": 31, "author_id": None, "question": "what is beta ?", "answer": "alpha beta gamma",
     "paraphrased_answer": None, "perturbed_answer": ["zeta", "theta eta", "delta"]},
]
# Questions space their '?' so the whitespace tokenizer keeps words whole.
SPLITS = {"forget10_perturbed": FORGET, "retain_perturbed": RETAIN, "real_authors": REAL, "world_facts": WORLD}
PREFIX = {"forget10_perturbed": "forget", "retain_perturbed": "retain", "real_authors": "real_authors",
          "world_facts": "world_facts"}
GENERATION = "alpha beta gamma"  # greedy chain from ':' under NEXT, for every question
# Authors no model trained on: the non-members of the membership-inference AUCs (question/answer only, as TOFU's).
HOLDOUT = [
    {"id": 40, "author_id": 5, "question": "Who is eta ?", "answer": "eta theta zeta",
     "paraphrased_answer": None, "perturbed_answer": None},
    {"id": 41, "author_id": 5, "question": "what is zeta ?", "answer": "theta alpha",
     "paraphrased_answer": None, "perturbed_answer": None},
    {"id": 42, "author_id": 6, "question": "Who is theta ?", "answer": "zeta eta delta",
     "paraphrased_answer": None, "perturbed_answer": None},
]


# ----------------------------------------------------------------- independent (by hand) computations

def hand_nll(P: np.ndarray, answer: str) -> tuple[float, int]:
    """Summed NLL and length of answer + EOS; the prompt ends with ':' (template '...Answer:')."""
    toks = [":"] + answer.split() + ["[EOS]"]
    nll = -sum(math.log(P[VOCAB[a], VOCAB[b]]) for a, b in zip(toks, toks[1:]))
    return nll, len(toks) - 1


def hand_prob(P, answer):
    nll, n = hand_nll(P, answer)
    return math.exp(-nll / n)


def hand_truth_ratio(P, row, correct_key):
    p_correct = hand_prob(P, row[correct_key])
    mean_nll = np.mean([hand_nll(P, a)[0] / hand_nll(P, a)[1] for a in row["perturbed_answer"]])
    return math.exp(-mean_nll) / p_correct


def hand_normalised(P, row):
    p = hand_prob(P, row["answer"])
    return p / (p + sum(hand_prob(P, a) for a in row["perturbed_answer"]))


def rouge_direct(truth, gen):
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(truth, gen)["rougeL"].recall


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def P():
    return make_table()


@pytest.fixture(scope="module")
def model(P):
    return TableLM(P)


CFG = EvalCfg(batch_size=3, max_new_tokens=10, report_examples=3)
MAXLEN = 64


@pytest.fixture(scope="module")
def result(model, tok):
    return evaluate_model(model, tok, SPLITS, forget_split="forget10_perturbed", max_length=MAXLEN, cfg=CFG,
                          retain_truth_ratios=None, progress=False)


# ----------------------------------------------------------------- tests

def test_template_assumption():
    assert PLAIN.split_text("Who?", "Him.") == ("Question: Who?\nAnswer:", " Him.")


def test_tokenizer_layout(tok):
    ids = tok("Question: Who is ?\nAnswer:", add_special_tokens=True)["input_ids"]
    assert ids[0] == VOCAB["[BOS]"] and ids[-1] == VOCAB[":"]


def test_teacher_forced_matches_score_answers(model, tok, P):
    qs = [r["question"] for r in FORGET]
    ans = [r["answer"] for r in FORGET]
    st = teacher_forced_stats(model, tok, qs, ans, MAXLEN, batch_size=2)
    nll, n = score_answers(model, tok, qs, ans, MAXLEN, batch_size=3)
    np.testing.assert_allclose(st.nll_sum, nll, rtol=1e-12)
    np.testing.assert_array_equal(st.n_tokens, n)
    for i, a in enumerate(ans):
        h, hn = hand_nll(P, a)
        assert st.n_tokens[i] == hn
        assert st.nll_sum[i] == pytest.approx(h, rel=1e-6)


def test_probability(result, P):
    per = result.per_example["forget10_perturbed"]
    for rec, row in zip(per, FORGET):
        assert rec["prob"] == pytest.approx(hand_prob(P, row["answer"]), rel=1e-6)
    assert result.metrics["forget_prob"] == pytest.approx(np.mean([hand_prob(P, r["answer"]) for r in FORGET]))
    assert result.metrics["retain_prob"] == pytest.approx(np.mean([hand_prob(P, r["answer"]) for r in RETAIN]))


def test_real_authors_normalised_probability(result, P):
    for split, rows in (("real_authors", REAL), ("world_facts", WORLD)):
        per = result.per_example[split]
        for rec, row in zip(per, rows):
            assert rec["prob"] == pytest.approx(hand_normalised(P, row), rel=1e-6)
        assert result.metrics[f"{split}_prob"] == pytest.approx(np.mean([hand_normalised(P, r) for r in rows]))


def test_truth_ratio(result, P):
    tr = [hand_truth_ratio(P, r, "paraphrased_answer") for r in FORGET]
    np.testing.assert_allclose(result.truth_ratios(), tr, rtol=1e-6)
    assert result.metrics["forget_truth_ratio"] == pytest.approx(np.mean([min(x, 1 / x) for x in tr]), rel=1e-6)
    tr_ret = [hand_truth_ratio(P, r, "paraphrased_answer") for r in RETAIN]
    assert result.metrics["retain_truth_ratio"] == pytest.approx(np.mean([max(0, 1 - x) for x in tr_ret]), abs=1e-6)
    for split, rows in (("real_authors", REAL), ("world_facts", WORLD)):
        t = [hand_truth_ratio(P, r, "answer") for r in rows]  # plain answer is P_correct
        np.testing.assert_allclose(result.truth_ratios(split), t, rtol=1e-6)
        assert result.metrics[f"{split}_truth_ratio"] == pytest.approx(np.mean([max(0, 1 - x) for x in t]), abs=1e-6)


def test_rouge_and_generation(result):
    for split, rows in SPLITS.items():
        per = result.per_example[split]
        for rec, row in zip(per, rows):
            assert rec["generation"] == GENERATION
            assert rec["rouge"] == pytest.approx(rouge_direct(row["answer"], GENERATION))
        expected = np.mean([rouge_direct(r["answer"], GENERATION) for r in rows])
        assert result.metrics[f"{PREFIX[split]}_rouge"] == pytest.approx(expected)


def test_exact_memorisation_and_extraction_strength(result):
    # Greedy successors: ':'->alpha, alpha->beta, beta->gamma, gamma->EOS, delta->beta.
    # alpha beta gamma : all right                      -> EM 1,   k=0 -> ES 1
    # delta beta gamma : first wrong, rest right        -> EM 2/3, k=1 -> ES 2/3
    # alpha beta delta : last wrong (EOS not counted)   -> EM 2/3, k=3 -> ES 0
    # delta gamma alpha: all wrong                      -> EM 0,   k=3 -> ES 0
    per = result.per_example["forget10_perturbed"]
    assert [r["exact_mem"] for r in per] == pytest.approx([1, 2 / 3, 2 / 3, 0])
    assert [r["extraction_strength"] for r in per] == pytest.approx([1, 2 / 3, 0, 0])
    assert result.metrics["forget_exact_mem"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 4)
    assert result.metrics["forget_extraction_strength"] == pytest.approx((1 + 2 / 3) / 4)


def test_model_utility_is_hmean(result):
    parts = [result.metrics[f"{s}_{m}"] for s in ("retain", "real_authors", "world_facts")
             for m in ("prob", "rouge", "truth_ratio")]
    assert all(p is not None for p in parts)
    assert result.metrics["model_utility"] == pytest.approx(scipy.stats.hmean(parts))


def test_forget_quality_none_without_reference(result):
    assert result.metrics["forget_quality"] is None
    assert "retain" in result.notes["forget_quality"]


def test_forget_quality_is_ks_pvalue(model, tok, P):
    ref = np.array([0.3, 0.9, 1.7, 2.5, 0.05])
    res = evaluate_model(model, tok, SPLITS, forget_split="forget10_perturbed", max_length=MAXLEN, cfg=CFG,
                         retain_truth_ratios=ref, progress=False)
    tr = [hand_truth_ratio(P, r, "paraphrased_answer") for r in FORGET]
    assert res.metrics["forget_quality"] == pytest.approx(scipy.stats.ks_2samp(tr, ref).pvalue)


def _fake_retain_dir(tmp_path, content=b"weights-v1"):
    d = tmp_path / "retain"
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").write_bytes(content)
    return d


def test_retain_reference_cache(tmp_path, model, tok, P):
    d = _fake_retain_dir(tmp_path)
    calls = []

    def loader(path):
        calls.append(path)
        return model, tok

    kw = dict(forget_split="forget10_perturbed", max_length=MAXLEN, cfg=CFG, loader=loader, progress=False)
    r1 = retain_reference(d, SPLITS, **kw)
    assert len(calls) == 1
    np.testing.assert_allclose(r1, [hand_truth_ratio(P, r, "paraphrased_answer") for r in FORGET], rtol=1e-6)
    key = reference_key(d, FORGET, MAXLEN)
    path = d / REFERENCE_DIRNAME / f"{key}.json"
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    # Second call loads, no model.
    r2 = retain_reference(d, SPLITS, **kw)
    assert len(calls) == 1
    np.testing.assert_array_equal(r1, r2)
    # Corrupt (truncated) file -> recomputed and rewritten.
    path.write_text(path.read_text()[:40])
    r3 = retain_reference(d, SPLITS, **kw)
    assert len(calls) == 2
    np.testing.assert_array_equal(r1, r3)
    json.loads(path.read_text())
    # Tampered value (valid JSON) -> checksum mismatch -> recomputed.
    data = json.loads(path.read_text())
    data["truth_ratios"][0] = 123.0
    path.write_text(json.dumps(data))
    r4 = retain_reference(d, SPLITS, **kw)
    assert len(calls) == 3
    np.testing.assert_array_equal(r1, r4)
    # Different weights / max_length / rows -> different key.
    assert reference_key(d, FORGET, MAXLEN + 1) != key
    assert reference_key(d, FORGET[:-1], MAXLEN) != key
    (d / "model.safetensors").write_bytes(b"weights-v2")
    assert reference_key(d, FORGET, MAXLEN) != key
    retain_reference(d, SPLITS, **kw)
    assert len(calls) == 4


def test_retain_model_against_itself_has_forget_quality_one(tmp_path, model, tok):
    d = _fake_retain_dir(tmp_path)
    ref = retain_reference(d, SPLITS, forget_split="forget10_perturbed", max_length=MAXLEN, cfg=CFG,
                           loader=lambda _: (model, tok), progress=False)
    res = evaluate_model(model, tok, SPLITS, forget_split="forget10_perturbed", max_length=MAXLEN, cfg=CFG,
                         retain_truth_ratios=ref, progress=False)
    assert res.metrics["forget_quality"] == 1.0


def test_missing_split_and_generation_cap(model, tok):
    cfg = EvalCfg(batch_size=4, max_new_tokens=5, generation_examples=1)
    res = evaluate_model(model, tok, {"forget10_perturbed": FORGET, "retain_perturbed": RETAIN},
                         forget_split="forget10_perturbed", max_length=MAXLEN, cfg=cfg,
                         retain_truth_ratios=None, progress=False)
    assert res.metrics["model_utility"] is None and "real_authors_prob" in res.notes["model_utility"]
    per = res.per_example["forget10_perturbed"]
    assert per[0]["generation"] is not None and per[1]["generation"] is None
    assert "first 1 of 4" in res.notes["forget_rouge"]


def hand_len(question: str, text: str) -> int:
    """Tokens of '[BOS] Question : <question words> Answer : <text words> [EOS]' under the word-level tokenizer."""
    return 5 + len(question.split()) + len(text.split()) + 1


def hand_cut(rows, fields, max_length):
    """{field: (rows, rows longer than max_length)} counted by hand."""
    out = {}
    for f in fields:
        pairs = [(r["question"], t) for r in rows
                 for t in ((r.get(f) or []) if f == "perturbed_answer" else [r.get(f)]) if t]
        if pairs:
            out[f] = (len(pairs), sum(hand_len(q, t) > max_length for q, t in pairs))
    return out


def test_notes_carry_truncation_counts(result):
    """Every evaluation says, per split, how many scored rows max_length cut (here: none)."""
    for role, name in result.roles.items():
        assert result.notes[f"{role}_truncation"].startswith(f"{name} at max_length {MAXLEN}: answer 0/")
        assert "WARNING" not in result.notes[f"{role}_truncation"]
    assert result.truncation["max_length"] == MAXLEN and result.truncation["truncated"] == 0


def test_truncated_rows_are_counted_warned_and_keep_eos(model, tok, P, caplog):
    L = 13  # cuts the 14-token forget answers of rows 0 and 3, and longer paraphrases / perturbed answers
    with caplog.at_level("WARNING", logger="unlearn"):
        res = evaluate_model(model, tok, SPLITS, forget_split="forget10_perturbed", max_length=L, cfg=CFG,
                             retain_truth_ratios=None, progress=False)
    full_fields = ("answer", "paraphrased_answer", "perturbed_answer")
    for name, rows in SPLITS.items():
        fields = full_fields if name in ("forget10_perturbed", "retain_perturbed") else ("answer", "perturbed_answer")
        got = {f: (c["rows"], c["truncated"]) for f, c in res.truncation["splits"][name].items()}
        assert got == hand_cut(rows, fields, L), name
    forget = res.truncation["splits"]["forget10_perturbed"]
    assert forget["answer"]["truncated"] == 2 and forget["answer"]["percent"] == 50.0
    note = res.notes["forget_truncation"]
    assert note.startswith(f"forget10_perturbed at max_length {L}: answer 2/4 cut (50.00 %)") and "WARNING" in note
    n_all = sum(n for name, rows in SPLITS.items() for n, _ in hand_cut(rows, full_fields, 10**6).values())
    assert res.truncation["rows"] == n_all
    warned = [r.getMessage() for r in caplog.records if r.levelno == 30]
    assert len(warned) == 1 and "forget10_perturbed answer 50.00 % (2/4)" in warned[0], warned
    longest = max(hand_len(r["question"], t) for rows in SPLITS.values() for r in rows
                  for t in [r["answer"], r.get("paraphrased_answer") or "", *r["perturbed_answer"]])
    assert res.truncation["suggested_max_length"] == longest  # < 100 rows per field: only 0 cut is under 1 %
    # Row 0 (prompt 10 tokens, room 3): scored on 'alpha beta' + EOS, not on 'alpha beta gamma' without EOS.
    rec = res.per_example["forget10_perturbed"][0]
    assert rec["answer_prob"] == pytest.approx(hand_prob(P, "alpha beta"), rel=1e-6)
    assert res.per_example["forget10_perturbed"][1]["answer_prob"] == pytest.approx(
        hand_prob(P, FORGET[1]["answer"]), rel=1e-6)  # 13 tokens: fits exactly, not cut


def test_report(tmp_path, result):
    files = write_report(result, tmp_path, title="Test <report>", retain_truth_ratios=np.array([0.5, 1.0, 2.0]),
                         target_generations={0: "target <says> & so", 1: "x"}, n_examples=3)
    for k in ("md", "html", "png"):
        assert files[k].exists() and files[k].stat().st_size > 0
    html_text = files["html"].read_text()
    assert "<table" in html_text and "Forget quality" in html_text and "Model utility" in html_text
    assert "data:image/png;base64," in html_text
    assert "what is &lt;b&gt;&amp; ?" in html_text and "<b>&" not in html_text
    assert "target &lt;says&gt; &amp; so" in html_text and "Test &lt;report&gt;" in html_text
    md = files["md"].read_text()
    assert "| Forget quality" in md and "truth_ratio_hist.png" in md
    assert "&lt;b&gt;&amp;" in md and "<b>&" not in md


# ----------------------------------------------------------------- real HF model (tiny Llama)

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=128,
                      bos_token_id=VOCAB["[BOS]"], eos_token_id=EOS, pad_token_id=VOCAB["[PAD]"])
    m = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("llama")
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_hf_batched_generation_matches_unbatched(llama_dir):
    from unlearn.eval.loading import load_eval_model

    m, t = load_eval_model(llama_dir, "cpu")
    qs = [r["question"] for r in FORGET + RETAIN + WORLD]
    batched = generate_answers(m, t, qs, max_new_tokens=6, batch_size=8)
    single = generate_answers(m, t, qs, max_new_tokens=6, batch_size=1)
    assert batched == single


def test_evaluate_dir(tmp_path, llama_dir):
    out = tmp_path / "eval"
    cfg = EvalCfg(batch_size=4, max_new_tokens=6, report_examples=2)
    splits = {**SPLITS, "holdout10": HOLDOUT}
    res = evaluate_dir(llama_dir, splits=splits, forget_split="forget10_perturbed", max_length=MAXLEN, cfg=cfg,
                       retain_model_dir=llama_dir, target_model_dir=llama_dir, out_dir=out, progress=False,
                       holdout_split="holdout10")
    assert res.metrics["forget_quality"] == 1.0  # retain model == evaluated model
    assert res.metrics["privleak"] == 0.0  # likewise
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"forget_quality", "model_utility", "forget_prob", "forget_rouge", "forget_truth_ratio",
                            "forget_exact_mem", "forget_extraction_strength", "world_facts_truth_ratio", "privleak",
                            "mia_auc_loss", "mia_auc_zlib", "mia_auc_min_k", "mia_auc_min_k_plus_plus"}
    assert all(isinstance(v, float) for v in metrics.values())
    lines = (out / "per_example.jsonl").read_text().splitlines()
    assert len(lines) == sum(len(v) for v in splits.values())
    assert {json.loads(x)["split"] for x in lines} == set(splits)
    for f in ("report.md", "report.html", "truth_ratio_hist.png", "notes.json"):
        assert (out / f).exists()
    assert list((llama_dir / REFERENCE_DIRNAME).glob("*.json"))
    notes = json.loads((out / "notes.json").read_text())
    assert notes["forget_truncation"] == res.notes["forget_truncation"]
    assert notes["forget_truncation"].startswith(f"forget10_perturbed at max_length {MAXLEN}: answer 0/4 cut")
    assert "forget_truncation" in (out / "report.md").read_text()
    assert "forget10_perturbed at max_length" in (out / "report.html").read_text()
    # No retain model: forget quality None, with the reason written out.
    out2 = tmp_path / "eval2"
    res2 = evaluate_dir(llama_dir, splits=SPLITS, forget_split="forget10_perturbed", max_length=MAXLEN, cfg=cfg,
                        out_dir=out2, progress=False)
    assert res2.metrics["forget_quality"] is None
    assert json.loads((out2 / "metrics.json").read_text())["forget_quality"] is None
    assert "retain" in json.loads((out2 / "notes.json").read_text())["forget_quality"]
    assert "n/a" in (out2 / "report.md").read_text()
