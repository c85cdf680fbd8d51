"""One QA template for training, scoring and generation.

TOFU's convention: the loss (and every probability metric) covers the answer
tokens only, EOS included, so the prompt is masked with -100 in ``labels``.
Prompt and answer are tokenised separately and concatenated, so the answer's
token ids are identical whether it is scored, trained on or generated after the
prompt (a joint tokenisation could merge tokens across the boundary).

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

IGNORE = -100
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question.strip())


def format_answer(answer: str) -> str:
    return " " + answer.strip()


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


def encode_prompt(tokenizer, question: str) -> list[int]:
    return list(tokenizer(format_prompt(question), add_special_tokens=True)["input_ids"])


def encode_answer(tokenizer, answer: str) -> list[int]:
    """The answer's token ids, without EOS (tokenised on its own: see the module docstring)."""
    return list(tokenizer(format_answer(answer), add_special_tokens=False)["input_ids"])


def encode_qa(tokenizer, question: str, answer: str, max_length: int) -> Encoded:
    """Token ids of prompt + answer + EOS, labels = answer ids (+EOS), prompt masked.

    Over-long examples are cut from the right of the answer and EOS is put back
    as the last token (``answer[:room - 1] + [eos]``), so a cut answer still
    teaches and scores the stop. At least one answer token is always kept (an
    over-long prompt is cut instead), so every example contributes an answer
    token and EOS to the loss. ``truncated`` says whether anything was cut.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one answer token and EOS), got {max_length}")
    eos = tokenizer.eos_token_id
    prompt = encode_prompt(tokenizer, question)
    answer_ids = encode_answer(tokenizer, answer)
    truncated = len(prompt) + len(answer_ids) + 1 > max_length
    if truncated:
        prompt = prompt[: max_length - 2]  # room for >= 1 answer token + EOS
        answer_ids = answer_ids[: max_length - len(prompt) - 1]
    answer_ids.append(eos)
    return Encoded(prompt + answer_ids, [IGNORE] * len(prompt) + answer_ids, truncated)


def qa_lengths(tokenizer, questions: Sequence[str], answers: Sequence[str]) -> list[int]:
    """Untruncated length of each prompt + answer + EOS, exactly as :func:`encode_qa` counts it.

    Row ``i`` is cut by ``encode_qa(..., max_length)`` iff ``qa_lengths(...)[i] > max_length``.
    Tokenises in two batched calls (fast tokenizers parallelise them), so counting a whole
    split costs far less than encoding it row by row.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if not questions:
        return []
    prompts = tokenizer([format_prompt(q) for q in questions], add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer([format_answer(a) for a in answers], add_special_tokens=False)["input_ids"]
    return [len(p) + len(a) + 1 for p, a in zip(prompts, answer_ids)]


def count_truncated(tokenizer, questions: Sequence[str], answers: Sequence[str], max_length: int) -> int:
    """How many of the (question, answer) rows :func:`encode_qa` cuts at ``max_length``."""
    return sum(1 for n in qa_lengths(tokenizer, questions, answers) if n > max_length)


def encode_many(tokenizer, questions: Sequence[str], answers: Sequence[str], max_length: int) -> list[Encoded]:
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    return [encode_qa(tokenizer, q, a, max_length) for q, a in zip(questions, answers)]


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
