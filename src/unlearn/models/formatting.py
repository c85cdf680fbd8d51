"""One QA template for training, scoring and generation.

TOFU's convention: the loss (and every probability metric) covers the answer
tokens only, EOS included, so the prompt is masked with -100 in ``labels``.
Prompt and answer are tokenised separately and concatenated, so the answer's
token ids are identical whether it is scored, trained on or generated after the
prompt (a joint tokenisation could merge tokens across the boundary).
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
    input_ids: list[int]
    labels: list[int]


def ensure_pad(tokenizer) -> None:
    """Real checkpoints (e.g. Llama) ship without a pad token: reuse EOS, as open-unlearning does."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def encode_prompt(tokenizer, question: str) -> list[int]:
    return list(tokenizer(format_prompt(question), add_special_tokens=True)["input_ids"])


def encode_qa(tokenizer, question: str, answer: str, max_length: int) -> Encoded:
    """Token ids of prompt + answer + EOS, labels = answer ids (+EOS), prompt masked.

    Over-long examples are cut from the right of the answer; at least one answer
    token is always kept so every example contributes to the loss.
    """
    prompt = encode_prompt(tokenizer, question)
    answer_ids = list(tokenizer(format_answer(answer), add_special_tokens=False)["input_ids"])
    answer_ids.append(tokenizer.eos_token_id)
    if len(prompt) >= max_length:
        prompt = prompt[: max_length - 1]
    answer_ids = answer_ids[: max_length - len(prompt)]
    return Encoded(prompt + answer_ids, [IGNORE] * len(prompt) + answer_ids)


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
