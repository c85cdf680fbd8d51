"""TOFU metrics (Maini et al. 2024), numerically aligned with locuslab/open-unlearning.

Every probability comes from batched teacher-forced forward passes: all
(question, answer) pairs of a split -- the answer, its paraphrase and every
perturbed answer -- are flattened into one list and scored together, and exact
memorisation / extraction strength are read off the same logits (argmax vs
label), so a split costs one pass over its pairs. Generation (ROUGE-L) is
batched greedy decoding with left padding.

Definitions (P(a|q) is the product of answer-token probabilities, EOS included,
under the QA template of :mod:`unlearn.models.formatting`; "normalised" means
``exp(-mean answer-token NLL)``):

* probability -- forget/retain: mean normalised P(answer|q); real authors and
  world facts: mean of ``p_true / (p_true + sum p_wrong + 1e-10)``.
* truth ratio -- ``R = P_wrong / (P_correct + 1e-10)`` with ``P_correct`` the
  normalised probability of the paraphrase (plain answer for real authors /
  world facts) and ``P_wrong = exp(-mean_j meanNLL(perturbed_j))``. Forget:
  ``mean(min(R, 1/(R+1e-10)))``; other splits: ``mean(max(0, 1-R))``.
* forget quality -- ``scipy.stats.ks_2samp(R_eval, R_retain).pvalue`` on raw
  per-example forget-split truth ratios.
* model utility -- ``scipy.stats.hmean`` of {probability, ROUGE-L, truth ratio}
  x {retain, real authors, world facts}.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import scipy.stats
import torch
from rouge_score import rouge_scorer
from tqdm import tqdm

from unlearn.config import EvalCfg
from unlearn.io import sha256_file, write_json
from unlearn.models.formatting import (
    PROMPT_TEMPLATE,
    collate,
    collate_prompts_left,
    encode_many,
    encode_prompt,
    ensure_pad,
    format_answer,
)
from unlearn.models.scoring import token_logprobs
from unlearn.models.truncation import FIELDS, split_summary, truncation_table, truncation_warning

log = logging.getLogger(__name__)
logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score's chatter

EPS = 1e-10  # open-unlearning's epsilon in every ratio
FORGET, RETAIN, REAL_AUTHORS, WORLD_FACTS = "forget", "retain", "real_authors", "world_facts"
UTILITY_ROLES = (RETAIN, REAL_AUTHORS, WORLD_FACTS)
# Split names looked up in ``splits`` for each non-forget role (first present wins).
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    RETAIN: ("retain_perturbed",),
    REAL_AUTHORS: ("real_authors", "real_authors_perturbed"),
    WORLD_FACTS: ("world_facts", "world_facts_perturbed"),
}
UTILITY_PARTS = tuple(f"{role}_{m}" for role in UTILITY_ROLES for m in ("prob", "rouge", "truth_ratio"))
# Bump when anything that changes the stored retain-model truth ratios changes.
# 2: a cut answer keeps its EOS (encode_qa), which changes the scores of truncated rows.
REFERENCE_VERSION = 2
REFERENCE_DIRNAME = "eval_reference"
WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin", "*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------- teacher-forced scoring

@dataclass
class PairStats:
    """Per (question, answer) pair statistics from one teacher-forced pass.

    ``nll_sum``/``n_tokens`` cover the answer tokens *and* EOS (the probability
    metrics); ``em_hits``/``em_n``/``es_k`` cover the answer tokens *without* EOS
    (open-unlearning drops the EOS prediction for memorisation metrics).
    ``es_k`` is the first answer position from which every greedy (argmax)
    prediction equals the label (``em_n`` when the last token is wrong).
    """

    nll_sum: np.ndarray
    n_tokens: np.ndarray
    em_hits: np.ndarray
    em_n: np.ndarray
    es_k: np.ndarray

    @property
    def mean_nll(self) -> np.ndarray:
        return self.nll_sum / np.maximum(self.n_tokens, 1)

    @property
    def prob(self) -> np.ndarray:
        """Length-normalised P(a|q) = exp(-mean token NLL)."""
        return np.exp(-self.mean_nll)

    @property
    def exact_mem(self) -> np.ndarray:
        """Share of answer tokens whose argmax equals the label (NaN without answer tokens)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.em_n > 0, self.em_hits / np.maximum(self.em_n, 1), np.nan)

    @property
    def extraction_strength(self) -> np.ndarray:
        """``1 - k/n``; 0 without answer tokens (as open-unlearning)."""
        return np.where(self.em_n > 0, 1.0 - self.es_k / np.maximum(self.em_n, 1), 0.0)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_forced_stats(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    max_length: int,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> PairStats:
    """Batched version of :func:`unlearn.models.scoring.score_answers` that also
    returns argmax-match statistics (exact memorisation, extraction strength).

    Same encoding, padding and log-prob primitive as ``score_answers`` (so the
    NLLs are identical); one forward pass per batch, everything else vectorised.
    """
    model.eval()
    device = device or _model_device(model)
    enc = encode_many(tokenizer, questions, answers, max_length)
    n = len(enc)
    out = PairStats(
        nll_sum=np.zeros(n, dtype=np.float64),
        n_tokens=np.zeros(n, dtype=np.int64),
        em_hits=np.zeros(n, dtype=np.int64),
        em_n=np.zeros(n, dtype=np.int64),
        es_k=np.zeros(n, dtype=np.int64),
    )
    eos = tokenizer.eos_token_id
    order = sorted(range(n), key=lambda i: len(enc[i].input_ids))
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        batch = collate([enc[i] for i in idx], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp, mask = token_logprobs(logits, batch["labels"])  # [B, T-1]
        labels = batch["labels"][:, 1:]
        pred = logits[:, :-1, :].argmax(-1)
        em_mask = mask if eos is None else mask & (labels != eos)
        match = (pred == labels) & em_mask
        mismatch = em_mask & ~match
        pos = em_mask.long().cumsum(-1) - 1  # index of each answer token within the answer
        last_mismatch = torch.where(mismatch, pos, torch.full_like(pos, -1)).max(-1).values
        out.nll_sum[idx] = (-logp.sum(-1)).double().cpu().numpy()
        out.n_tokens[idx] = mask.sum(-1).cpu().numpy()
        out.em_hits[idx] = match.sum(-1).cpu().numpy()
        out.em_n[idx] = em_mask.sum(-1).cpu().numpy()
        out.es_k[idx] = (last_mismatch + 1).cpu().numpy()
    return out


# --------------------------------------------------------------------------- generation

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
) -> list[str]:
    """Greedy answers to ``questions`` under the QA template, batched with left padding.

    Decoding stops at EOS (or ``max_new_tokens``); text after the first EOS is
    dropped and the rest decoded with ``skip_special_tokens=True`` and stripped.
    """
    if not questions:
        return []
    model.eval()
    device = device or _model_device(model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        pad = eos
    prompts = [encode_prompt(tokenizer, q) for q in questions]
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
            texts[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return texts


_SCORER = None


def rouge_l_recall(ground_truth: str, generation: str) -> float:
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_SCORER.score(ground_truth, generation)["rougeL"].recall)


# --------------------------------------------------------------------------- per-split evaluation

def _nan_to_none(x: Any) -> Any:
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return None if math.isnan(x) else x
    if isinstance(x, np.integer):
        return int(x)
    return x


def _mean(values: Iterable[float | None]) -> float | None:
    arr = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    return float(arr.mean()) if arr.size else None


def closer_to_1_better(r: np.ndarray) -> float | None:
    """Forget truth-ratio aggregate: ``mean(min(R, 1/R))`` (open-unlearning's epsilon kept)."""
    r = r[~np.isnan(r)]
    return float(np.mean(np.minimum(r, 1.0 / (r + EPS)))) if r.size else None


def true_better(r: np.ndarray) -> float | None:
    """Retain / real-authors / world-facts truth-ratio aggregate: ``mean(max(0, 1-R))``."""
    r = r[~np.isnan(r)]
    return float(np.mean(np.maximum(0.0, 1.0 - r))) if r.size else None


def _split_scores(model, tokenizer, rows: Sequence[dict], *, role: str, max_length: int, batch_size: int,
                  device=None, progress: bool = False, desc: str = "scoring") -> dict[str, np.ndarray]:
    """Teacher-forced per-row quantities for one split, from one flattened batch of pairs.

    Returns arrays of length ``len(rows)``: ``answer_prob``, ``answer_mean_nll``,
    ``correct_prob`` (paraphrase for forget/retain, answer otherwise),
    ``wrong_prob`` (exp of minus the mean over perturbed answers of their mean
    NLL), ``n_perturbed``, ``truth_ratio`` (raw, NaN without perturbed answers),
    ``normalised_prob`` (p_true / (p_true + sum p_wrong), real authors / world
    facts), ``exact_mem``, ``extraction_strength``.
    """
    questions: list[str] = []
    answers: list[str] = []

    def add(q: str, a: str) -> int:
        questions.append(q)
        answers.append(a)
        return len(answers) - 1

    N = len(rows)
    ans_idx = np.zeros(N, dtype=np.int64)
    corr_idx = np.zeros(N, dtype=np.int64)
    pert_idx: list[int] = []
    pert_owner: list[int] = []
    use_para = role in (FORGET, RETAIN)
    for i, row in enumerate(rows):
        q = row["question"]
        ans_idx[i] = add(q, row["answer"])
        para = row.get("paraphrased_answer") if use_para else None
        corr_idx[i] = add(q, para) if para else ans_idx[i]
        for p in row.get("perturbed_answer") or []:
            pert_idx.append(add(q, p))
            pert_owner.append(i)

    if answers:
        st = teacher_forced_stats(model, tokenizer, questions, answers, max_length, batch_size, device,
                                  progress=progress, desc=desc)
    else:
        empty = np.zeros(0)
        st = PairStats(empty, empty.astype(np.int64), empty.astype(np.int64), empty.astype(np.int64),
                       empty.astype(np.int64))
    mean_nll, prob = st.mean_nll, st.prob
    pert_idx_a = np.asarray(pert_idx, dtype=np.int64)
    owner = np.asarray(pert_owner, dtype=np.int64)
    n_pert = np.bincount(owner, minlength=N).astype(np.int64) if owner.size else np.zeros(N, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        pert_nll_sum = np.bincount(owner, weights=mean_nll[pert_idx_a], minlength=N) if owner.size else np.zeros(N)
        pert_mean_nll = np.where(n_pert > 0, pert_nll_sum / np.maximum(n_pert, 1), np.nan)
        wrong_prob = np.exp(-pert_mean_nll)
        correct_prob = prob[corr_idx] if N else np.zeros(0)
        truth_ratio = wrong_prob / (correct_prob + EPS)
        pert_prob_sum = np.bincount(owner, weights=prob[pert_idx_a], minlength=N) if owner.size else np.zeros(N)
        answer_prob = prob[ans_idx] if N else np.zeros(0)
        normalised = np.where(n_pert > 0, answer_prob / (answer_prob + pert_prob_sum + EPS), np.nan)
    return {
        "answer_prob": answer_prob,
        "answer_mean_nll": mean_nll[ans_idx] if N else np.zeros(0),
        "correct_prob": correct_prob,
        "wrong_prob": wrong_prob,
        "n_perturbed": n_pert,
        "truth_ratio": truth_ratio,
        "normalised_prob": normalised,
        "exact_mem": st.exact_mem[ans_idx] if N else np.zeros(0),
        "extraction_strength": st.extraction_strength[ans_idx] if N else np.zeros(0),
    }


# --------------------------------------------------------------------------- result

@dataclass
class EvalResult:
    """``metrics``: flat name -> value (None when not computable, reason in ``notes``).
    ``per_example``: split name -> one dict per row. ``roles``: role -> split name.
    ``truncation``: rows cut at ``max_length`` per split and scored field
    (:func:`unlearn.models.truncation.truncation_table`); also summarised in
    ``notes["<role>_truncation"]``."""

    metrics: dict[str, float | None]
    notes: dict[str, str] = field(default_factory=dict)
    per_example: dict[str, list[dict]] = field(default_factory=dict)
    forget_split: str = ""
    roles: dict[str, str] = field(default_factory=dict)
    truncation: dict[str, Any] = field(default_factory=dict)

    def truth_ratios(self, split: str | None = None) -> np.ndarray:
        """Raw per-example truth ratios of ``split`` (default: the forget split), NaN where undefined."""
        rows = self.per_example.get(split or self.forget_split, [])
        return np.array([np.nan if r.get("truth_ratio") is None else r["truth_ratio"] for r in rows], dtype=np.float64)

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "notes": self.notes, "forget_split": self.forget_split,
                "roles": self.roles, "per_example": self.per_example, "truncation": self.truncation}


def _resolve_roles(splits: Mapping[str, Any], forget_split: str) -> dict[str, str]:
    if forget_split not in splits:
        raise KeyError(f"forget split {forget_split!r} not in splits (have: {sorted(splits)})")
    roles = {FORGET: forget_split}
    for role, names in SPLIT_ALIASES.items():
        for name in names:
            if name in splits:
                roles[role] = name
                break
    return roles


def _truncation_note(name: str, truncation: Mapping[str, Any]) -> str:
    """The note on split ``name``'s cut rows: counts per field, and a warning with the fix when any is cut."""
    per = truncation["splits"].get(name, {})
    note = split_summary(name, per, truncation["max_length"])
    if any(c["truncated"] for c in per.values()):
        note += " -- WARNING: cut rows are scored on part of their answer (EOS kept)"
        if truncation["suggested_max_length"] > truncation["max_length"]:
            note += f"; model.max_length={truncation['suggested_max_length']} would cut under 1 % of every split's rows"
    return note


def forget_quality(eval_truth_ratios: np.ndarray, retain_truth_ratios: np.ndarray) -> float:
    """KS-test p-value between raw forget truth ratios of the evaluated and the retain model."""
    a = np.asarray(eval_truth_ratios, dtype=np.float64)
    b = np.asarray(retain_truth_ratios, dtype=np.float64)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    return float(scipy.stats.ks_2samp(a, b).pvalue)


def evaluate_model(
    model,
    tokenizer,
    splits: Mapping[str, Sequence[dict]],
    *,
    forget_split: str,
    max_length: int,
    cfg: EvalCfg,
    retain_truth_ratios: np.ndarray | None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> EvalResult:
    """All TOFU metrics of ``model`` on ``splits``.

    ``splits`` maps split names to rows; the forget split is ``forget_split``,
    the utility splits are looked up as ``retain_perturbed``, ``real_authors``
    (or ``real_authors_perturbed``) and ``world_facts`` (or
    ``world_facts_perturbed``). A missing split leaves its metrics (and model
    utility) None with a note. ``retain_truth_ratios``: the retain model's raw
    per-example forget truth ratios (:func:`retain_reference`); None leaves
    forget quality None with the reason in ``notes["forget_quality"]``.

    ``notes["<role>_truncation"]`` always says how many of the split's scored
    rows (answers, paraphrases, perturbed answers) ``max_length`` cuts, because a
    cut row is scored on part of its answer; any cut row is also logged as a warning.
    """
    ensure_pad(tokenizer)
    roles = _resolve_roles(splits, forget_split)
    metrics: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    scored_fields = {name: FIELDS if role in (FORGET, RETAIN) else ("answer", "perturbed_answer")
                     for role, name in roles.items()}  # _split_scores uses paraphrases for forget/retain only
    truncation = truncation_table(tokenizer, {name: list(splits[name]) for name in roles.values()}, max_length,
                                  scored_fields)
    warning = truncation_warning(truncation)
    if warning:
        log.warning("evaluation: %s", warning)
    per_example: dict[str, list[dict]] = {}
    cap = cfg.generation_examples

    for role in (FORGET, *UTILITY_ROLES):
        if role not in roles:
            for m in ("prob", "rouge", "truth_ratio"):
                metrics[f"{role}_{m}"] = None
            notes[role] = f"no {role} split (looked for {', '.join(SPLIT_ALIASES[role])})"
            continue
        name = roles[role]
        rows = list(splits[name])
        notes[f"{role}_truncation"] = _truncation_note(name, truncation)
        sc = _split_scores(model, tokenizer, rows, role=role, max_length=max_length, batch_size=cfg.batch_size,
                           device=device, progress=progress, desc=f"scoring {name}")
        n_gen = len(rows) if cap is None else min(len(rows), max(cap, 0))
        gens = generate_answers(model, tokenizer, [r["question"] for r in rows[:n_gen]],
                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, device=device,
                                progress=progress, desc=f"generating {name}")
        rouges = [rouge_l_recall(r["answer"], g) for r, g in zip(rows, gens)]

        prob_key = "answer_prob" if role in (FORGET, RETAIN) else "normalised_prob"
        recs = []
        for i, row in enumerate(rows):
            rec = {
                "split": name,
                "id": row.get("id", i),
                "author_id": row.get("author_id"),
                "question": row["question"],
                "answer": row["answer"],
                "prob": sc[prob_key][i],
                "answer_prob": sc["answer_prob"][i],
                "answer_mean_nll": sc["answer_mean_nll"][i],
                "correct_prob": sc["correct_prob"][i],
                "wrong_prob": sc["wrong_prob"][i],
                "n_perturbed": sc["n_perturbed"][i],
                "truth_ratio": sc["truth_ratio"][i],
                "exact_mem": sc["exact_mem"][i],
                "extraction_strength": sc["extraction_strength"][i],
                "rouge": rouges[i] if i < n_gen else None,
                "generation": gens[i] if i < n_gen else None,
            }
            recs.append({k: _nan_to_none(v) for k, v in rec.items()})
        per_example[name] = recs

        metrics[f"{role}_prob"] = _mean(sc[prob_key])
        metrics[f"{role}_rouge"] = _mean(rouges)
        agg = closer_to_1_better if role == FORGET else true_better
        metrics[f"{role}_truth_ratio"] = agg(sc["truth_ratio"])
        if role == FORGET:
            metrics["forget_exact_mem"] = _mean(sc["exact_mem"])
            metrics["forget_extraction_strength"] = _mean(sc["extraction_strength"]) if rows else None
        if not rows:
            notes[role] = f"split {name!r} is empty"
        elif n_gen == 0:
            notes[f"{role}_rouge"] = "no generations (eval.generation_examples = 0)"
        elif n_gen < len(rows):
            notes[f"{role}_rouge"] = f"ROUGE-L over the first {n_gen} of {len(rows)} examples (eval.generation_examples)"
        missing = int(np.sum(sc["n_perturbed"] == 0))
        if missing:
            notes[f"{role}_truth_ratio"] = f"{missing} example(s) without perturbed answers were skipped"
        no_para = sum(1 for r in rows if not r.get("paraphrased_answer")) if role in (FORGET, RETAIN) else 0
        if no_para:
            notes[f"{role}_paraphrase"] = (f"{no_para} example(s) without a paraphrased answer: "
                                           "the plain answer was used as P_correct")

    parts = [metrics.get(k) for k in UTILITY_PARTS]
    if any(v is None for v in parts):
        metrics["model_utility"] = None
        notes["model_utility"] = "missing part(s): " + ", ".join(k for k, v in zip(UTILITY_PARTS, parts) if v is None)
    else:
        metrics["model_utility"] = float(scipy.stats.hmean(parts))

    forget_tr = np.array([np.nan if r["truth_ratio"] is None else r["truth_ratio"]
                          for r in per_example[forget_split]], dtype=np.float64)
    if retain_truth_ratios is None:
        metrics["forget_quality"] = None
        notes["forget_quality"] = ("not computed: no retain-model reference truth ratios "
                                   "(forget quality needs a model trained only on the retain split)")
    else:
        ref = np.asarray(retain_truth_ratios, dtype=np.float64)
        if np.sum(~np.isnan(forget_tr)) == 0 or np.sum(~np.isnan(ref)) == 0:
            metrics["forget_quality"] = None
            notes["forget_quality"] = "not computed: no forget examples with perturbed answers"
        else:
            metrics["forget_quality"] = forget_quality(forget_tr, ref)
            if ref.size != forget_tr.size:
                notes["forget_quality"] = (f"retain reference has {ref.size} truth ratios, "
                                           f"the forget split {forget_tr.size}")
    order = ["forget_quality", "model_utility", "forget_prob", "forget_rouge", "forget_truth_ratio",
             "forget_exact_mem", "forget_extraction_strength", *UTILITY_PARTS]
    metrics = {k: metrics.get(k) for k in order}
    return EvalResult(metrics=metrics, notes=notes, per_example=per_example, forget_split=forget_split, roles=roles,
                      truncation=truncation)


# --------------------------------------------------------------------------- retain-model reference

def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a saved model (first glob pattern that matches wins)."""
    model_dir = Path(model_dir)
    for pat in WEIGHT_PATTERNS:
        found = sorted(p for p in model_dir.glob(pat) if p.is_file())
        if found:
            return found
    return []


def _canonical_rows(rows: Sequence[dict]) -> list[dict]:
    keys = ("id", "question", "answer", "paraphrased_answer", "perturbed_answer")
    return [{k: r.get(k) for k in keys} for r in rows]


def reference_key(retain_model_dir: str | Path, forget_rows: Sequence[dict], max_length: int) -> str:
    """sha256 over the retain model's weight (and tokenizer/config) file hashes, the
    forget rows, ``max_length``, the QA template and :data:`REFERENCE_VERSION`."""
    d = Path(retain_model_dir)
    weights = weight_files(d)
    if not weights:
        raise FileNotFoundError(f"{d}: no weight files ({', '.join(WEIGHT_PATTERNS)})")
    files = {p.name: sha256_file(p) for p in weights}
    files.update({name: sha256_file(d / name) for name in TOKENIZER_FILES if (d / name).is_file()})
    payload = {
        "version": REFERENCE_VERSION,
        "files": files,
        "rows": _canonical_rows(forget_rows),
        "max_length": int(max_length),
        "template": PROMPT_TEMPLATE,
        "answer_format": format_answer("x"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _values_checksum(values: list) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def _load_reference(path: Path, key: str, rows: Sequence[dict]) -> np.ndarray | None:
    """The stored truth ratios, or None (with a warning) if the file is missing or invalid in any way."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        vals = data["truth_ratios"]
        ok = (
            data.get("key") == key
            and isinstance(vals, list)
            and len(vals) == len(rows)
            and data.get("ids") == [r.get("id", i) for i, r in enumerate(rows)]
            and all(v is None or (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0) for v in vals)
            and data.get("checksum") == _values_checksum(vals)
        )
        if not ok:
            raise ValueError("content does not match its key, rows or checksum")
        return np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
    except Exception as e:  # noqa: BLE001 -- any defect means: recompute
        log.warning("ignoring corrupt retain reference %s (%s); recomputing", path, e)
        return None


def load_model(model_dir: str | Path, device: torch.device | str | None = None):
    """``(model, tokenizer)`` from a saved directory (tokenizer saved beside the model), in eval mode."""
    from ..models.build import load_model as _load_model
    from ..models.build import load_tokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(model_dir)
    model = _load_model(model_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    return model, tokenizer


def retain_reference(
    retain_model_dir: str | Path,
    splits: Mapping[str, Sequence[dict]],
    *,
    forget_split: str,
    max_length: int,
    cfg: EvalCfg,
    loader: Callable[[str | Path], tuple[Any, Any]] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    reference_dir: str | Path | None = None,
) -> np.ndarray:
    """The retain model's raw per-example forget truth ratios, computed once.

    Stored in ``<retain_model_dir>/eval_reference/<key>.json`` (key:
    :func:`reference_key`) and reused while the weights, the forget rows,
    ``max_length`` and the template are unchanged. A missing, unreadable or
    inconsistent file is recomputed (the model is only loaded then) and
    rewritten atomically. ``loader(dir) -> (model, tokenizer)`` defaults to
    :func:`load_model`. ``reference_dir`` overrides the storage folder (e.g. to
    keep a DVC-tracked model directory unmodified).
    """
    rows = list(splits[forget_split])
    key = reference_key(retain_model_dir, rows, max_length)
    folder = Path(reference_dir) if reference_dir is not None else Path(retain_model_dir) / REFERENCE_DIRNAME
    path = folder / f"{key}.json"
    cached = _load_reference(path, key, rows)
    if cached is not None:
        log.info("retain reference loaded from %s", path)
        return cached
    loader = loader or (lambda d: load_model(d, device))
    model, tokenizer = loader(retain_model_dir)
    ensure_pad(tokenizer)
    sc = _split_scores(model, tokenizer, rows, role=FORGET, max_length=max_length, batch_size=cfg.batch_size,
                       device=device, progress=progress, desc=f"retain reference {forget_split}")
    tr = sc["truth_ratio"]
    vals = [None if math.isnan(v) else float(v) for v in tr]
    write_json(path, {
        "key": key,
        "version": REFERENCE_VERSION,
        "forget_split": forget_split,
        "max_length": int(max_length),
        "template": PROMPT_TEMPLATE,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ids": [r.get("id", i) for i, r in enumerate(rows)],
        "truth_ratios": vals,
        "checksum": _values_checksum(vals),
    })
    log.info("retain reference written to %s", path)
    return np.asarray(tr, dtype=np.float64)


# --------------------------------------------------------------------------- directory-level entry point

def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return _nan_to_none(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def evaluate_dir(
    model_dir: str | Path,
    *,
    splits: Mapping[str, Sequence[dict]],
    forget_split: str,
    max_length: int,
    cfg: EvalCfg,
    retain_model_dir: str | Path | None = None,
    target_model_dir: str | Path | None = None,
    out_dir: str | Path,
    title: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    reference_dir: str | Path | None = None,
) -> EvalResult:
    """Evaluate the model saved in ``model_dir`` and write ``out_dir``:

    ``metrics.json`` (flat, DVC metrics), ``notes.json`` (why any metric is
    None), ``per_example.jsonl`` (one JSON object per example, with ``split``),
    ``report.md``, ``report.html``, ``truth_ratio_hist.png``.
    The retain reference comes from :func:`retain_reference`; target-model
    generations (report only) for the first ``cfg.report_examples`` forget questions.
    """
    from .report import write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref: np.ndarray | None = None
    fq_reason = None
    if retain_model_dir is None:
        fq_reason = "not computed: no retain model given (retain_model_dir=None)"
    elif not Path(retain_model_dir).is_dir() or not weight_files(retain_model_dir):
        fq_reason = f"not computed: retain model {retain_model_dir} not found (no weight files)"
    else:
        ref = retain_reference(retain_model_dir, splits, forget_split=forget_split, max_length=max_length,
                               cfg=cfg, device=device, progress=progress, reference_dir=reference_dir)

    model, tokenizer = load_model(model_dir, device)
    result = evaluate_model(model, tokenizer, splits, forget_split=forget_split, max_length=max_length, cfg=cfg,
                            retain_truth_ratios=ref, progress=progress, device=device)
    del model
    if fq_reason is not None:
        result.notes["forget_quality"] = fq_reason

    target_generations: dict | None = None
    if target_model_dir is not None and cfg.report_examples > 0:
        rows = list(splits[forget_split])[: cfg.report_examples]
        tmodel, ttok = load_model(target_model_dir, device)
        gens = generate_answers(tmodel, ttok, [r["question"] for r in rows], max_new_tokens=cfg.max_new_tokens,
                                batch_size=cfg.batch_size, device=device, progress=progress,
                                desc="generating target")
        target_generations = {r.get("id", i): g for i, (r, g) in enumerate(zip(rows, gens))}
        del tmodel
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    (out_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2, default=_json_default) + "\n")
    (out_dir / "notes.json").write_text(json.dumps(result.notes, indent=2) + "\n")
    with open(out_dir / "per_example.jsonl", "w") as f:
        for recs in result.per_example.values():
            for rec in recs:
                f.write(json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n")
    write_report(result, out_dir, title=title or f"TOFU evaluation: {Path(model_dir).name}",
                 retain_truth_ratios=ref, target_generations=target_generations,
                 n_examples=cfg.report_examples)
    return result
