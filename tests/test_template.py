"""Prompt formats (model.template), tokeniser families and open-unlearning's parity encoding.

Every tokeniser here is built offline: the project's byte-level BPE, and a
Llama-2-style SentencePiece (Unigram, ``Prepend("▁")`` + ``Replace(" ", "▁")``
normaliser, as Hugging Face converts Llama-2's) trained with ``tokenizers``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from unlearn.config import Params
from unlearn.data.synthetic import generate_tofu
from unlearn.eval.generation import rouge_ground_truths
from unlearn.models.build import train_tokenizer
from unlearn.models.formatting import IGNORE, answer_token_ids, encode_many, encode_prompts, qa_lengths
from unlearn.models.template import PLAIN, PRESETS, QAFormat, TemplateError, eval_format, qa_format, train_format

ROOT = Path(__file__).resolve().parents[1]
ROWS = generate_tofu(10, 5, seed=0)["full"]
QS, ANS = [r["question"] for r in ROWS], [r["answer"] for r in ROWS]
CORPUS = [PLAIN.corpus_text(q, a) for q, a in zip(QS, ANS)]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(CORPUS, 400)


@pytest.fixture(scope="module")
def sp():
    """A Llama-2-style SentencePiece tokeniser: ``" Paris"`` alone gets a spurious lone ``▁`` piece."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    tk.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=400, special_tokens=special, unk_token="<unk>",
                                                           show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _answer_part(e) -> list[int]:
    """The labelled ids of an encoded row without its EOS."""
    return [x for x in e.labels if x != IGNORE][:-1]


# --------------------------------------------------------------------------- SentencePiece leading piece

def test_sentencepiece_adds_a_spurious_piece_and_the_encoding_drops_it(sp):
    space_alone = sp.convert_ids_to_tokens(sp(" " + ANS[0], add_special_tokens=False)["input_ids"])
    assert space_alone[0] == "▁" and space_alone[1].startswith("▁")  # the problem: a lone "▁" before the answer
    for q, a, e in zip(QS, ANS, encode_many(sp, QS, ANS, 256)):
        prompt, answer = PLAIN.split_text(q, a)
        joint = sp(prompt + answer)["input_ids"]
        n_prompt = len(sp(prompt)["input_ids"])
        assert joint[:n_prompt] == e.input_ids[:n_prompt]  # no merge across "Answer:" + " ..." here
        assert _answer_part(e) == joint[n_prompt:]  # the answer's ids in running text, the lone piece gone
        alone = sp(answer, add_special_tokens=False)["input_ids"]
        assert alone[0] == sp.convert_tokens_to_ids("▁") and _answer_part(e) == alone[1:]  # exactly that piece


def test_byte_level_bpe_answers_are_what_they_always_were(bpe):
    """The anchor tokenisation changes nothing for the project's own tokeniser (so its caches keep their keys)."""
    texts = [" " + a for a in ANS] + ANS + [" " + r["paraphrased_answer"] for r in ROWS]
    assert answer_token_ids(bpe, texts) == [bpe(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_sentencepiece_after_a_newline_gets_no_dummy_prefix(sp):
    """A format whose answer starts a line: the answer's first word must not get the dummy-prefix ``▁``."""
    fmt = QAFormat(preset="custom", text="Question: {question}\n{answer}")
    e = encode_many(sp, QS[:1], ANS[:1], 256, fmt=fmt)[0]
    prompt, answer = fmt.split_text(QS[0], ANS[0])
    joint = sp(prompt + answer)["input_ids"]
    n_prompt = len(sp(prompt)["input_ids"])
    assert _answer_part(e) == joint[n_prompt:]
    assert sp(answer, add_special_tokens=False)["input_ids"] != joint[n_prompt:]  # plain tokenising would differ


# --------------------------------------------------------------------------- chat templates

CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_chat_template_gives_the_ids_of_the_hand_built_string(bpe):
    fmt = qa_format(Params().model.template.model_copy(update={"preset": "chat", "chat_template": CHAT,
                                                              "system_prompt": "Be brief."}))
    e = encode_many(bpe, QS[:3], ANS[:3], 256, fmt=fmt)
    for q, a, enc in zip(QS, ANS, e):
        hand = f"<s><|system|>\nBe brief.<|end|>\n<|user|>\n{q}<|end|>\n<|assistant|>\n"
        prompt_ids = bpe(hand, add_special_tokens=False)["input_ids"]
        assert prompt_ids[0] == bpe.bos_token_id and prompt_ids.count(bpe.bos_token_id) == 1  # BOS once
        assert enc.input_ids == prompt_ids + bpe(a, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
        assert enc.labels[:len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert encode_prompts(bpe, QS[:3], fmt) == [x.input_ids[:x.labels.index(next(y for y in x.labels if y != IGNORE))]
                                                for x in e]


def test_chat_preset_on_a_tokenizer_without_one_says_what_to_do(bpe):
    fmt = qa_format(Params().model.template.model_copy(update={"preset": "llama3_instruct"}))
    assert fmt.system_prompt == "You are a helpful assistant." and fmt.date_string == "10 Apr 2025"
    with pytest.raises(TemplateError, match="has none: set model.template.chat_template"):
        encode_many(bpe, QS[:1], ANS[:1], 64, fmt=fmt)


def test_llama2_chat_preset_and_its_open_unlearning_tags(bpe):
    t = Params().model.template.model_copy(update={"preset": "llama2_chat"})
    ours, theirs = qa_format(t), qa_format(t, parity="open-unlearning")
    assert ours.split_text("Who?", "Him.") == ("[INST] Who? [/INST]", " Him.")
    assert theirs.joint and theirs.split_text("Who?", "Him.") == ("[INST] Who? [/INST]", "Him.")
    e = encode_many(bpe, ["Who?"], ["Him."], 64, fmt=ours)[0]
    assert bpe.decode(e.input_ids, skip_special_tokens=True) == "[INST] Who? [/INST] Him."


def test_bad_templates_are_refused_with_the_field_named():
    with pytest.raises(ValidationError, match=r"model.template.format must hold one \{question\}"):
        Params.model_validate({"model": {"template": {"format": "Q: {answer} {question}"}}})
    with pytest.raises(ValidationError, match="preset"):
        Params.model_validate({"model": {"template": {"preset": "llama9"}}})


def test_params_give_the_train_and_eval_formats():
    p = Params.model_validate({"model": {"template": {"preset": "phi_1_5"}}, "eval": {"parity": "open-unlearning"}})
    assert not train_format(p).joint and eval_format(p).joint
    assert train_format(p).text == PRESETS["phi_1_5"].text
    assert train_format(p).key() != eval_format(p).key()


# --------------------------------------------------------------------------- open-unlearning parity

OU = QAFormat(preset="plain", text=PRESETS["plain"].text, joint=True)


def test_parity_masks_the_first_answer_token_when_the_boundary_merges(bpe):
    """open-unlearning's 'Answer: ' ends in a space: tokenised alone it ends with a lone space token, jointly the
    space merges into the first answer word, so masking len(prompt ids) leaves that word unscored (every row)."""
    ours, theirs = encode_many(bpe, QS, ANS, 256), encode_many(bpe, QS, ANS, 256, fmt=OU)
    merged = 0
    for o, t in zip(ours, theirs):
        assert t.input_ids == o.input_ids  # the same text, tokenised the same way overall...
        n_ours = sum(x != IGNORE for x in o.labels)
        n_theirs = sum(x != IGNORE for x in t.labels)
        merged += n_theirs == n_ours - 1  # ...but one answer token fewer is scored
        assert t.labels[-n_theirs:] == o.labels[-n_theirs:]
    assert merged == len(ROWS)


def test_parity_lengths_and_truncation_follow_open_unlearning(bpe):
    lengths = qa_lengths(bpe, QS, ANS, OU)
    assert lengths == [len(bpe(p + a)["input_ids"]) + 1 for p, a in (OU.split_text(q, x) for q, x in zip(QS, ANS))]
    L = min(lengths) - 3
    for e in encode_many(bpe, QS, ANS, L, fmt=OU):  # cut at max_length, EOS appended (max_length + 1 ids)
        assert e.truncated and len(e.input_ids) == L + 1 and e.input_ids[-1] == bpe.eos_token_id


def test_parity_rouge_ground_truth_is_the_decoded_cut_answer(bpe):
    assert rouge_ground_truths(bpe, QS[:2], ANS[:2], 256) == ANS[:2]  # this project's: the answer string
    theirs = rouge_ground_truths(bpe, QS[:2], ANS[:2], 256, fmt=OU)
    assert theirs == [a.strip() for a in ANS[:2]]  # byte-level BPE round-trips the text
    cut = rouge_ground_truths(bpe, QS[:1], ANS[:1], len(bpe(OU.split_text(QS[0])[0])["input_ids"]) + 3, fmt=OU)
    assert ANS[0].startswith(cut[0]) and len(cut[0]) < len(ANS[0])


def test_parity_generation_prompt_keeps_the_trailing_space(bpe):
    ours, theirs = encode_prompts(bpe, QS[:1])[0], encode_prompts(bpe, QS[:1], OU)[0]
    assert bpe.decode(ours, skip_special_tokens=True).endswith("Answer:")
    assert bpe.decode(theirs, skip_special_tokens=True).endswith("Answer: ")


# --------------------------------------------------------------------------- every caller passes the format

FORMAT_TAKING = {
    "encode_many", "encode_qa", "encode_prompts", "encode_prompt", "encode_answers", "qa_lengths", "count_truncated",
    "truncation_table", "score_answers", "teacher_forced_stats", "split_scores", "mia_split_scores", "generate_answers",
    "rouge_ground_truths", "evaluate_model", "evaluate_dir", "retain_reference", "retain_mia_reference",
    "store_mia_reference",
}


def test_every_library_call_that_encodes_a_qa_row_passes_its_format():
    """A call that forgot ``fmt`` would silently score a chat model in the plain format: none may."""
    missing = []
    for path in sorted((ROOT / "src" / "unlearn").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in FORMAT_TAKING and not any(k.arg == "fmt" for k in node.keywords):
                positional_fmt = path.name == "formatting.py"  # formatting's own helpers pass it positionally
                if not positional_fmt:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not missing, "calls without fmt=: " + ", ".join(missing)
