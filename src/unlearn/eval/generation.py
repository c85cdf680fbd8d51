"""Greedy generation in the QA format and ROUGE-L recall: the generation half of the TOFU metrics.

Batched greedy decoding with left padding (prompts end at the same position,
so new tokens line up at the right); modules without ``.generate`` (test
doubles) fall back to a plain greedy loop.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from rouge_score import rouge_scorer
from tqdm import tqdm

from unlearn.models.formatting import collate_prompts_left, encode_many, encode_prompts
from unlearn.models.template import PLAIN, QAFormat
from unlearn.models.teacher_forced import model_device

logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score's chatter


@torch.no_grad()
def _greedy_fallback(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                     eos_id: int | None, pad_id: int) -> torch.Tensor:
    """Greedy decoding for modules without ``.generate`` (test doubles); no KV cache."""
    ids, attn = input_ids, attention_mask
    done = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
    new = []
    for _ in range(max_new_tokens):
        nxt = model(input_ids=ids, attention_mask=attn).logits[:, -1, :].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        new.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        attn = torch.cat([attn, torch.ones_like(nxt)[:, None]], 1)
        if eos_id is not None:
            done |= nxt == eos_id
        if bool(done.all()):
            break
    return torch.stack(new, 1) if new else ids.new_zeros((ids.size(0), 0))


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 200,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "generating",
    fmt: QAFormat = PLAIN,
) -> list[str]:
    """Greedy answers to ``questions`` in the prompt format ``fmt``, batched with left padding.

    Decoding stops at EOS (or ``max_new_tokens``); text after the first EOS is
    dropped and the rest decoded with ``skip_special_tokens=True`` and stripped.
    ``fmt.joint`` (open-unlearning parity): its prompt ids (a template's trailing
    space included) and its decoding (``clean_up_tokenization_spaces=True``).
    """
    if not questions:
        return []
    model.eval()
    device = device or model_device(model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        pad = eos
    prompts = encode_prompts(tokenizer, questions, fmt=fmt)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        batch = collate_prompts_left([prompts[i] for i in idx], pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        if hasattr(model, "generate"):
            out = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            new = out[:, batch["input_ids"].size(1):]
        else:
            new = _greedy_fallback(model, batch["input_ids"], batch["attention_mask"], max_new_tokens, eos, pad)
        for row, i in enumerate(idx):
            ids = new[row].tolist()
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos)]
            texts[i] = _decode(tokenizer, ids, fmt).strip()
    return texts


def clean_up_tokenization(text: str) -> str:
    """transformers 4.x's ``clean_up_tokenization_spaces=True`` (which open-unlearning passes to every decode).

    transformers 5 ignores the flag for BPE tokenisers, so parity applies it here: the
    published numbers were decoded with it (it drops the space before ``.``, ``?``, ``'s``...).
    """
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _decode(tokenizer, ids: Sequence[int], fmt: QAFormat) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return clean_up_tokenization(text) if fmt.joint else text


def rouge_ground_truths(tokenizer, questions: Sequence[str], answers: Sequence[str], max_length: int,
                        fmt: QAFormat = PLAIN) -> list[str]:
    """The texts ROUGE compares generations with: the answers, or (``fmt.joint``) open-unlearning's.

    open-unlearning's ``eval_text_similarity`` decodes the whole encoded
    conversation (cut at ``max_length``), removes the decoded prompt and strips:
    a cut answer is compared in its cut form, and the text is the tokeniser's
    round trip of the answer, not the answer string.
    """
    if not fmt.joint:
        return list(answers)
    prompts = encode_prompts(tokenizer, questions, fmt=fmt)  # what generation is fed (not the joint ids' prefix)
    fulls = encode_many(tokenizer, questions, answers, max_length, fmt=fmt)
    return [_decode(tokenizer, e.input_ids, fmt).replace(_decode(tokenizer, pr, fmt), "").strip()
            for pr, e in zip(prompts, fulls)]


_SCORER: rouge_scorer.RougeScorer | None = None


def rouge_l_recall(ground_truth: str, generation: str) -> float:
    """ROUGE-L recall of ``generation`` against ``ground_truth`` (stemmed, as open-unlearning); one scorer, built once."""
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_SCORER.score(ground_truth, generation)["rougeL"].recall)
