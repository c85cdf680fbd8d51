"""Encoding QA rows for training, scoring and generation, in the configured prompt format.

TOFU's convention: the loss (and every probability metric) covers the answer
tokens only, EOS included, so the prompt is masked with -100 in ``labels``.
The format (``model.template``: a text template or the tokenizer's chat
template) is a :class:`~unlearn.models.template.QAFormat`; every function here
takes it as ``fmt`` (default: the plain ``Question: ...\nAnswer: ...`` format).

This project's encoding tokenises prompt and answer separately and concatenates
them, so the answer's token ids are identical whether it is scored, trained on or
generated after the prompt (a joint tokenisation could merge tokens across the
boundary). The answer is tokenised *in running text* (:func:`answer_token_ids`):
a SentencePiece tokeniser given ``" Paris"`` on its own adds a spurious leading
``▁`` piece (and a dummy-prefix ``▁`` to a word that follows a newline), pieces
the model never sees after its prompt; tokenising after a fixed anchor and
dropping the anchor's ids gives the ids the answer has in context, whatever the
tokeniser family (byte-level BPE gets exactly what it got before).

Under ``eval.parity: open-unlearning`` (``fmt.joint``) rows are encoded as
open-unlearning's ``preprocess_chat_instance`` does instead: prompt + answer
tokenised jointly (cut at ``max_length``, EOS appended if missing), the prompt's
own token count masked, so a boundary merge leaves the first answer token unscored.

An example longer than ``max_length`` is cut from the right of its answer, but
its last token stays EOS (open-unlearning re-appends EOS after cutting too): a
cut answer that lost its EOS would teach the model never to stop, and its
probability would silently cover a different token set than an uncut one.
Whether a row was cut is recorded (:attr:`Encoded.truncated`) and counted by
:mod:`unlearn.models.truncation`, so truncation is reported, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .template import PLAIN, QAFormat

IGNORE = -100
# The anchor answers are tokenised after (then its ids dropped): a newline starts a pre-token in byte-level BPE
# and SentencePiece alike, so the answer's ids are the ones it has in running text.
_ANCHOR = "\n"


@dataclass(frozen=True)
class Encoded:
    """One encoded QA example; ``truncated``: prompt + answer + EOS was longer than ``max_length`` and was cut."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def ensure_pad(tokenizer) -> None:
    """Real checkpoints (e.g. Llama) ship without a pad token: reuse EOS, as open-unlearning does."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def _ids(tokenizer, texts: Sequence[str], special: bool) -> list[list[int]]:
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=special)["input_ids"]] if texts else []


def answer_token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The token ids each text has in running text, without the pieces a tokeniser adds to a text's start.

    Tokenises ``_ANCHOR + text`` and drops the anchor's own ids. For byte-level BPE
    this is exactly ``tokenizer(text)``; for a SentencePiece tokeniser it drops the
    spurious ``▁`` piece ``" Paris"`` gets on its own (``["▁", "▁Paris"]`` becomes
    ``["▁Paris"]``, what ``"Answer: Paris"`` holds). A text whose start merges with
    the anchor (so the anchor's ids are not a prefix) falls back to plain tokenisation.
    """
    anchor = _ids(tokenizer, [_ANCHOR], False)[0]
    out = []
    for text, ids in zip(texts, _ids(tokenizer, [_ANCHOR + t for t in texts], False)):
        out.append(ids[len(anchor):] if ids[:len(anchor)] == anchor else _ids(tokenizer, [text], False)[0])
    return out


def prompt_texts(tokenizer, questions: Sequence[str], fmt: QAFormat) -> list[str]:
    """The prompt string of each question (a chat prompt ends at the assistant's turn)."""
    if fmt.is_chat:
        return [fmt.chat_prompt(tokenizer, q) for q in questions]
    return [fmt.split_text(q)[0] for q in questions]


def encode_prompts(tokenizer, questions: Sequence[str], fmt: QAFormat = PLAIN) -> list[list[int]]:
    """The prompt token ids of each question, exactly as :func:`encode_qa` starts (generation feeds them).

    Text templates get the tokenizer's special tokens (BOS); a rendered chat template
    carries its own, so it is tokenised without them (else BOS would appear twice).
    """
    if fmt.is_chat:
        if fmt.joint:
            return [fmt.chat_ids(tokenizer, q) for q in questions]
        return _ids(tokenizer, prompt_texts(tokenizer, questions, fmt), False)
    return _ids(tokenizer, prompt_texts(tokenizer, questions, fmt), True)


def encode_prompt(tokenizer, question: str, fmt: QAFormat = PLAIN) -> list[int]:
    return encode_prompts(tokenizer, [question], fmt)[0]


def encode_answers(tokenizer, answers: Sequence[str], fmt: QAFormat = PLAIN) -> list[list[int]]:
    """The answers' token ids without EOS, as they follow the prompt (this project's encoding, not joint)."""
    if fmt.is_chat:
        return answer_token_ids(tokenizer, [a.strip() for a in answers])
    return answer_token_ids(tokenizer, [fmt.split_text("", a)[1] for a in answers])


def _joint(tokenizer, questions: Sequence[str], answers: Sequence[str], fmt: QAFormat,
           max_length: int | None) -> list[tuple[list[int], list[int], int]]:
    """open-unlearning's (prompt ids, whole-conversation ids, untruncated length) per row (``fmt.joint``)."""
    eos = tokenizer.eos_token_id
    out = []
    if fmt.is_chat:
        for q, a in zip(questions, answers):
            full = fmt.chat_ids(tokenizer, q, a)
            prompt = fmt.chat_ids(tokenizer, q)
            n = len(full) + (full[-1:] != [eos])
            out.append((prompt, full + [eos] if full[-1:] != [eos] else full, n))
        return out
    wrapped = [fmt.split_text(q, a) for q, a in zip(questions, answers)]
    prompts = _ids(tokenizer, [w for w, _ in wrapped], True)
    fulls = _ids(tokenizer, [w + a for w, a in wrapped], True)
    for prompt, full in zip(prompts, fulls):
        n = len(full) + (full[-1:] != [eos])
        if max_length is not None:  # open-unlearning: truncation=True at max_length, then EOS re-appended
            full, prompt = full[:max_length], prompt[:max_length]
        out.append((prompt, full + [eos] if full[-1:] != [eos] else full, n))
    return out


def encode_many(tokenizer, questions: Sequence[str], answers: Sequence[str], max_length: int,
                fmt: QAFormat = PLAIN) -> list[Encoded]:
    """Token ids of prompt + answer + EOS per row, labels = answer ids (+EOS), prompt masked.

    Over-long examples are cut from the right of the answer and EOS is put back
    as the last token (``answer[:room - 1] + [eos]``), so a cut answer still
    teaches and scores the stop. At least one answer token is always kept (an
    over-long prompt is cut instead), so every example contributes an answer
    token and EOS to the loss. ``truncated`` says whether anything was cut.
    ``fmt.joint``: open-unlearning's encoding (module docstring).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one answer token and EOS), got {max_length}")
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if fmt.joint:
        return [Encoded(full, [IGNORE] * len(prompt) + full[len(prompt):], n > max_length)
                for prompt, full, n in _joint(tokenizer, questions, answers, fmt, max_length)]
    eos = tokenizer.eos_token_id
    out = []
    for prompt, answer_ids in zip(encode_prompts(tokenizer, questions, fmt), encode_answers(tokenizer, answers, fmt)):
        truncated = len(prompt) + len(answer_ids) + 1 > max_length
        if truncated:
            prompt = prompt[: max_length - 2]  # room for >= 1 answer token + EOS
            answer_ids = answer_ids[: max_length - len(prompt) - 1]
        answer_ids = answer_ids + [eos]
        out.append(Encoded(prompt + answer_ids, [IGNORE] * len(prompt) + answer_ids, truncated))
    return out


def encode_qa(tokenizer, question: str, answer: str, max_length: int, fmt: QAFormat = PLAIN) -> Encoded:
    """One row of :func:`encode_many`."""
    return encode_many(tokenizer, [question], [answer], max_length, fmt)[0]


def qa_lengths(tokenizer, questions: Sequence[str], answers: Sequence[str], fmt: QAFormat = PLAIN) -> list[int]:
    """Untruncated length of each prompt + answer + EOS, exactly as :func:`encode_many` counts it.

    Row ``i`` is cut by ``encode_many(..., max_length)`` iff ``qa_lengths(...)[i] > max_length``.
    Tokenises in batched calls (fast tokenizers parallelise them), so counting a whole
    split costs far less than encoding it row by row.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if not questions:
        return []
    if fmt.joint:
        return [n for _, _, n in _joint(tokenizer, questions, answers, fmt, None)]
    prompts = encode_prompts(tokenizer, questions, fmt)
    return [len(p) + len(a) + 1 for p, a in zip(prompts, encode_answers(tokenizer, answers, fmt))]


def count_truncated(tokenizer, questions: Sequence[str], answers: Sequence[str], max_length: int,
                    fmt: QAFormat = PLAIN) -> int:
    """How many of the (question, answer) rows :func:`encode_many` cuts at ``max_length``."""
    return sum(1 for n in qa_lengths(tokenizer, questions, answers, fmt) if n > max_length)


def collate(examples: Sequence[Encoded], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (padding labelled -100).

    Right padding keeps position t of every row aligned with position t of the
    reference cache, which stores per-position quantities for the same layout.
    """
    width = max(len(e.input_ids) for e in examples)
    if pad_to is not None:
        width = max(width, pad_to)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e.input_ids)
        input_ids[i, :L] = torch.tensor(e.input_ids)
        labels[i, :L] = torch.tensor(e.labels)
        attn[i, :L] = 1
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels}


def collate_prompts_left(prompts: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for batched generation (new tokens then line up at the right)."""
    width = max(len(p) for p in prompts)
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": attn}


# --------------------------------------------------------------------------- raw text (MUSE)
def _bos(tokenizer) -> list[int]:
    """The tokenizer's BOS as a one-token prefix (nothing when it has none): the context of a text's first token."""
    bos = tokenizer.bos_token_id
    return [] if bos is None else [bos]


def encode_text(tokenizer, text: str, max_length: int) -> Encoded:
    """One text as a causal-LM example: BOS + its first ``max_length - 1`` tokens, every text token labelled.

    MUSE scores an article (membership inference) on its beginning, as far as the
    model's context goes; nothing is masked, since every token of raw text is an
    "answer" token. ``truncated``: the text was longer and was cut.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (BOS and one token), got {max_length}")
    bos = _bos(tokenizer)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    room = max_length - len(bos)
    return Encoded(bos + ids[:room], [IGNORE] * len(bos) + ids[:room], len(ids) > room)


def encode_text_chunks(tokenizer, texts: Sequence[str], max_length: int) -> list[Encoded]:
    """Every text cut into consecutive windows of ``max_length`` tokens (BOS + ``max_length - 1`` text tokens).

    The training examples of a raw-text corpus (MUSE's target, retain and unlearning
    runs): each article is tokenised once and split without overlap, so every token
    is trained on exactly once per epoch and no window mixes two articles. Windows
    are labelled in full (BOS aside) and never marked truncated: nothing is dropped.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (BOS and one token), got {max_length}")
    bos = _bos(tokenizer)
    room = max_length - len(bos)
    out: list[Encoded] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []:
        for start in range(0, len(ids), room):
            piece = list(ids[start:start + room])
            out.append(Encoded(bos + piece, [IGNORE] * len(bos) + piece))
    return out
