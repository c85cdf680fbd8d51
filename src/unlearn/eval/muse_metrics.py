"""MUSE's generation metrics (Shi et al. 2024): VerbMem on the forget set, KnowMem on forget and retain QA.

* **VerbMem(D_f)**: greedy continuation (``max_new_tokens``, 128 in MUSE) of each
  prompt cut from a forget article; the true continuation ``gt`` is cut to its
  first ``max_new_tokens`` tokens and decoded; score = ROUGE-L F1 of the
  continuation against it; mean over rows.
* **KnowMem(D_f), KnowMem(D_r)**: each ICL pair as ``Question: {q}\\nAnswer: {a}\\n\\n``,
  then ``Question: {q}\\nAnswer:``; greedy answer of at most ``max_new_tokens``
  (32) tokens, cut before the first ``"\\n\\n"``, then before ``"\\nQuestion"``,
  then before ``"Question:"`` (MUSE's ``get_prefix_before_words_occur``); score =
  ROUGE-L F1 against the gold answer; mean over rows.

What was checked in swj0419/muse_bench (fcd6651): ``metrics/logger.py`` builds
``RougeScorer([...], use_stemmer=False)`` and the aggregate keys ``mean_rougeL``
read ``score(gt, output)['rougeL'].fmeasure`` (F1); ``metrics/verbmem.py`` cuts
``gt`` with ``tokenizer(gt)...input_ids[:, :max_new_tokens]`` and decodes both
strings with ``skip_special_tokens=True, clean_up_tokenization_spaces=True``;
``metrics/knowmem.py`` builds the prompt and cuts at
``["\\n\\n", "\\nQuestion", "Question:"]``; ``eval.py`` reports ``mean_rougeL * 100``.

Differences from MUSE
---------------------
1. Scores are fractions in [0, 1]; MUSE reports them x100.
2. The truth is cut to ``max_new_tokens`` *text* tokens (``add_special_tokens=False``):
   MUSE tokenises ``gt`` with special tokens, so on Llama-2 its BOS is one of the
   128 and the truth keeps 127 text tokens against a 128-token continuation.
3. The KnowMem prompt ends in ``Answer:``, not MUSE's ``Answer: `` (trailing space):
   with a byte-level BPE a trailing space becomes a token of its own that never
   precedes a word in training text (the model learnt ``Answer:`` + `` word``, the
   project's QA template), so the answer would start from an unseen state.
4. Generation is batched with left padding (MUSE: one prompt at a time); greedy,
   so equal up to floating point, and the continuation is cut at the first EOS
   (what batch-1 ``generate`` stops at). Outputs are stripped of surrounding
   whitespace (KnowMem's after the cut), which ROUGE (its tokenizer splits on
   non-alphanumerics) never sees.
5. A prompt longer than the model's context minus ``max_new_tokens`` is cut from
   the left (BOS kept, the end kept) and counted; MUSE would overflow the context.
6. Decoding leaves ``clean_up_tokenization_spaces`` to the tokenizer: MUSE passes
   ``True``, which transformers 5 ignores (with a warning on every call) for BPE
   tokenizers, Llama's included, because the clean-up deletes real spaces before
   punctuation. Truth and continuation are decoded alike either way.

Differences from open-unlearning (d3d7cf9, ``configs/eval/muse_metrics/*_ROUGE.yaml``,
``evals/metrics/utils.py::eval_text_similarity``)
------------------------------------------------------------------------------
1. ``use_stemmer=False`` (MUSE); open-unlearning stems (``use_stemmer=True``).
2. VerbMem's truth is cut to ``max_new_tokens`` tokens (MUSE); open-unlearning
   scores against the whole ``gt`` (up to 2048 tokens), tokenised jointly with the
   prompt (``prompt + " " + gt``) and decoded back.
3. Over-long prompts are cut from the left; open-unlearning's ``truncation=True``
   at ``max_length`` (512 for KnowMem) cuts from the right, dropping the question.
4. No stop-string criterion during generation: the full budget is generated and
   cut afterwards (MUSE's way); greedy decoding makes the cut text the same.
5. The KnowMem prompt has no trailing space (difference 3 above; open-unlearning's
   ``asst_start_tag`` is ``"Answer: "`` as MUSE's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from unlearn.models.formatting import collate_prompts_left
from unlearn.models.teacher_forced import model_device

logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score's chatter

KNOWMEM_STOPS: tuple[str, ...] = ("\n\n", "\nQuestion", "Question:")
"""MUSE's cut strings for KnowMem answers, applied in this order (``metrics/knowmem.py``)."""

_SCORER: rouge_scorer.RougeScorer | None = None


# --------------------------------------------------------------------------- pure helpers

def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference``, without stemming (MUSE's ``mean_rougeL``)."""
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_SCORER.score(reference, prediction)["rougeL"].fmeasure)


def cut_knowmem_answer(text: str) -> str:
    """The answer before the first blank line, the next ``"\\nQuestion"`` or ``"Question:"``, stripped.

    MUSE's rule: a few-shot prompt teaches the model to follow its answer with a
    blank line and the next question; whatever comes after is not the answer.
    """
    for stop in KNOWMEM_STOPS:
        text = text.split(stop)[0]
    return text.strip()


def knowmem_prompt(icl_rows: Sequence[Mapping[str, str]], question: str) -> str:
    """The few-shot prompt: ``Question: {q}\\nAnswer: {a}\\n\\n`` per ICL row, then ``Question: {question}\\nAnswer:``."""
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl_rows)
    return f"{shots}Question: {question}\nAnswer:"


def truncate_to_tokens(tokenizer, text: str, n: int) -> str:
    """``text`` cut to its first ``n`` tokens (no special tokens) and decoded as the continuations are.

    VerbMem compares a continuation of ``n`` new tokens with the truth: a longer
    truth would cap the recall of even a perfect continuation.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:n]
    return tokenizer.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------- generation

@dataclass
class Generations:
    """Greedy continuations in the order of the prompts; ``prompt_cut[i]``: prompt i was cut from the left."""

    texts: list[str]
    prompt_cut: list[bool]

    @property
    def n_cut(self) -> int:
        return sum(self.prompt_cut)


def context_length(model) -> int | None:
    """The longest sequence the model takes (``config.max_position_embeddings``), None when it does not say."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def fit_prompt(ids: list[int], limit: int | None, bos_id: int | None) -> tuple[list[int], bool]:
    """``ids`` cut from the left to at most ``limit`` tokens, its leading BOS kept; and whether it was cut.

    The end of a prompt is what the continuation depends on (the question, the
    last words of the passage); the BOS stays because the model always saw it first.
    """
    if limit is None or len(ids) <= limit:
        return ids, False
    if limit < 1:
        raise ValueError(f"no room for a prompt: limit {limit}")
    if bos_id is not None and ids and ids[0] == bos_id:
        keep = limit - 1
        return [bos_id] + (ids[len(ids) - keep:] if keep > 0 else []), True
    return ids[len(ids) - limit:], True


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "generating",
) -> Generations:
    """Greedy continuations of raw ``prompts`` (tokenised with special tokens, i.e. BOS first), batched with left padding.

    Not :func:`unlearn.eval.generation.generate_answers`: that wraps each input in
    the QA template, while MUSE continues raw text and its own few-shot prompt.
    A prompt longer than the model's context minus ``max_new_tokens`` is cut from
    the left (:func:`fit_prompt`) and flagged. Each continuation stops at EOS and
    is decoded without special tokens (see difference 6 in the module docstring on
    ``clean_up_tokenization_spaces``), not stripped: KnowMem's cut rule looks at leading blank lines.
    """
    if not prompts:
        return Generations([], [])
    model.eval()
    device = device or model_device(model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        pad = eos
    ctx = context_length(model)
    limit = None if ctx is None else ctx - max_new_tokens
    if limit is not None and limit < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {ctx}")
    encoded = [fit_prompt(list(tokenizer(p, add_special_tokens=True)["input_ids"]), limit, tokenizer.bos_token_id)
               for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    texts = [""] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_prompts_left([encoded[i][0] for i in idx], pad).items()}
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=eos, pad_token_id=pad)
        new = out[:, batch["input_ids"].size(1):]
        for row, i in enumerate(idx):
            ids = new[row].tolist()
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos)]
            texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return Generations(texts, [cut for _, cut in encoded])


# --------------------------------------------------------------------------- the metrics

@dataclass
class MemResult:
    """One MUSE generation metric: ``score`` (mean ROUGE-L F1, None without rows), one record per row
    (``id``, inputs, ``generation``, ``rouge_l``, ``prompt_cut``), and how many prompts were cut."""

    score: float | None
    records: list[dict] = field(default_factory=list)
    prompts_cut: int = 0


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def verbmem(
    model,
    tokenizer,
    rows: Sequence[Mapping[str, str]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> MemResult:
    """VerbMem over ``{id, prompt, gt}`` rows: mean ROUGE-L F1 of the greedy continuation against the truth cut
    to ``max_new_tokens`` tokens (:func:`truncate_to_tokens`)."""
    gens = generate_greedy(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, device=device, progress=progress, desc="VerbMem")
    records = []
    for i, (r, g, cut) in enumerate(zip(rows, gens.texts, gens.prompt_cut)):
        gt = truncate_to_tokens(tokenizer, r["gt"], max_new_tokens)
        g = g.strip()
        records.append({"id": r.get("id", i), "prompt": r["prompt"], "gt": gt, "generation": g,
                        "rouge_l": rouge_l(gt, g), "prompt_cut": cut})
    return MemResult(_mean([x["rouge_l"] for x in records]), records, gens.n_cut)


def knowmem(
    model,
    tokenizer,
    rows: Sequence[Mapping[str, str]],
    icl_rows: Sequence[Mapping[str, str]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> MemResult:
    """KnowMem over ``{id, question, answer}`` rows with ``icl_rows`` as few-shot examples: mean ROUGE-L F1 of
    the greedy answer, cut by :func:`cut_knowmem_answer`, against the gold answer."""
    prompts = [knowmem_prompt(icl_rows, r["question"]) for r in rows]
    gens = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           device=device, progress=progress, desc="KnowMem")
    records = []
    for i, (r, raw, cut) in enumerate(zip(rows, gens.texts, gens.prompt_cut)):
        answer = cut_knowmem_answer(raw)
        records.append({"id": r.get("id", i), "question": r["question"], "answer": r["answer"],
                        "generation": answer, "raw_generation": raw, "rouge_l": rouge_l(r["answer"], answer),
                        "prompt_cut": cut})
    return MemResult(_mean([x["rouge_l"] for x in records]), records, gens.n_cut)
