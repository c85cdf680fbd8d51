"""Truncation counts (unlearn.models.truncation): hand-counted lengths, the suggested max_length, the
pipeline wiring that lets the gate count them, and the real-TOFU configuration's max_length."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from unlearn.models.formatting import encode_qa
from unlearn.models.truncation import (
    FIELDS,
    field_pairs,
    min_length_for,
    truncation_table,
    truncation_warning,
)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["Question", ":", "Answer", "q", "a", "b", "c"]


@pytest.fixture(scope="module")
def tok():
    """Word-level: every word and ':' is one token, BOS is prepended: lengths are known by hand."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]", *WORDS])}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(":", behavior="isolated"),
                                               pre_tokenizers.WhitespaceSplit()])
    t.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]")


def hand_len(question: str, text: str) -> int:
    """[BOS] Question : <question> Answer : <text> [EOS]"""
    return 1 + 2 + len(question.split()) + 2 + len(text.split()) + 1


def row(n_q: int, n_a: int, n_para: int | None = None, n_pert: tuple[int, ...] = ()) -> dict:
    r = {"question": " ".join(["q"] * n_q), "answer": " ".join(["a"] * n_a)}
    if n_para is not None:
        r["paraphrased_answer"] = " ".join(["b"] * n_para)
    if n_pert:
        r["perturbed_answer"] = [" ".join(["c"] * k) for k in n_pert]
    return r


def test_lengths_are_what_the_hand_count_says(tok):
    for n_q, n_a in ((1, 1), (3, 7), (10, 2)):
        r = row(n_q, n_a)
        assert len(encode_qa(tok, r["question"], r["answer"], 4096).input_ids) == hand_len(r["question"], r["answer"])


def test_table_counts_per_split_and_field(tok):
    # question of 2 words: prompt 7 tokens; answer of k words: 7 + k + 1 tokens.
    splits = {
        "forget": [row(2, 2, 4, (1, 5, 9)), row(2, 6, 2, (3,)), row(2, 1, None, ())],
        "full": [row(2, 3), row(2, 8)],
    }
    L = 13  # cut: answers of > 5 words
    t = truncation_table(tok, splits, L)
    assert t["max_length"] == L
    assert t["splits"]["forget"] == {
        "answer": {"rows": 3, "truncated": 1, "percent": 33.33, "max_tokens": 14},
        "paraphrased_answer": {"rows": 2, "truncated": 0, "percent": 0.0, "max_tokens": 12},
        "perturbed_answer": {"rows": 4, "truncated": 1, "percent": 25.0, "max_tokens": 17},
    }
    assert t["splits"]["full"] == {"answer": {"rows": 2, "truncated": 1, "percent": 50.0, "max_tokens": 16}}
    assert (t["rows"], t["truncated"]) == (11, 3)
    assert t["suggested_max_length"] == 17  # fewer than 100 rows per field: under 1 % means none cut
    only = truncation_table(tok, splits, L, {"forget": ("answer",)})
    assert set(only["splits"]["forget"]) == {"answer"} and set(only["splits"]["full"]) == set(FIELDS) & {"answer"}


def test_min_length_for_cuts_under_one_percent():
    assert min_length_for([]) == 0
    assert min_length_for(list(range(1, 101))) == 100  # 1 of 100 cut would be 1 %, not under it
    assert min_length_for(list(range(1, 201))) == 199  # 1 of 200 (0.5 %) may be cut
    lengths = [10] * 990 + [50] * 9 + [99]
    assert min_length_for(lengths) == 50  # the single 99-token row is the 0.1 % that may be cut
    for L in (49, 50):
        cut = sum(n > L for n in lengths)
        assert (cut < 0.01 * len(lengths)) == (L == 50)


def test_bad_rows_are_skipped_not_fatal(tok):
    rows = [row(1, 1, 1, (1, 1)), {"question": None, "answer": "a"}, "not a row",
            {"question": "q", "answer": None, "paraphrased_answer": "", "perturbed_answer": "c"}]
    assert field_pairs(rows, "answer") == (["q"], ["a"])
    assert field_pairs(rows, "paraphrased_answer") == (["q"], ["b"])
    assert field_pairs(rows, "perturbed_answer") == (["q", "q"], ["c", "c"])
    t = truncation_table(tok, {"x": rows, "not_a_split": None}, 8)
    assert list(t["splits"]) == ["x"] and t["splits"]["x"]["answer"]["rows"] == 1


def test_warning_names_splits_percentages_and_the_fix(tok):
    splits = {"forget10": [row(2, 2), row(2, 9)], "world_facts": [row(2, 1)]}
    assert truncation_warning(truncation_table(tok, splits, 64)) is None
    msg = truncation_warning(truncation_table(tok, splits, 12))
    assert "1 of 3 QA rows" in msg and "model.max_length=12" in msg
    assert "forget10 answer 50.00 % (1/2)" in msg and "world_facts" not in msg
    assert f"model.max_length={hand_len('q q', 'a ' * 9)} would cut under 1 %" in msg


# ----------------------------------------------------------------- pipeline wiring
def test_dvc_runs_the_tokenizer_before_the_gate_and_the_gate_before_training():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    names = list(stages)
    assert names.index("tokenizer") < names.index("validate") < names.index("finetune_target")
    assert "reports/validation/result.json" not in stages["tokenizer"]["deps"]
    assert {"data/tofu", "models/tokenizer"} <= set(stages["validate"]["deps"])
    assert {"model.max_length", "model.path"} <= set(stages["validate"]["params"])
    for s in ("finetune_target", "finetune_retain"):
        assert "reports/validation/result.json" in stages[s]["deps"]  # the gate still stops all training


# test_flow_cache_keys_cover_the_tokenizer moved to tests/test_stage_io.py with the declaration it tests.


# ----------------------------------------------------------------- real TOFU
def test_real_tofu_config_cuts_under_one_percent(shared_tofu_dir, tmp_path):
    """configs/tofu_real.yaml's max_length, with the tokenizer that configuration trains, on the real files."""
    from unlearn import stages
    from unlearn.config import load_params
    from unlearn.data.validate import TRUNCATION_FIELDS, _kind, gate_splits

    p = load_params(ROOT / "configs" / "tofu_real.yaml", [
        f"data.local_dir={shared_tofu_dir}", f"data.out_dir={tmp_path / 'data'}", f"model.out_dir={tmp_path / 'm'}"])
    assert p.model.arch.max_position_embeddings >= p.model.max_length
    stages.prepare(p)
    stages.tokenizer(p)
    tok, _ = stages.model_tokenizer(p)
    splits = stages.read_splits(p, gate_splits(p.data.forget_split))
    fields = {n: TRUNCATION_FIELDS[_kind(n)] for n in splits}
    t = truncation_table(tok, splits, p.model.max_length, fields)
    worst = {(n, f): c["percent"] for n, per in t["splits"].items() for f, c in per.items()}
    assert all(c["truncated"] < 0.01 * c["rows"] for per in t["splits"].values() for c in per.values()), worst
    assert t["suggested_max_length"] <= p.model.max_length
    old = truncation_table(tok, splits, 96, fields)
    assert old["splits"]["forget10_perturbed"]["perturbed_answer"]["percent"] > 5  # why 96 was not enough
