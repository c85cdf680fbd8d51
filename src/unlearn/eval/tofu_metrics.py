"""TOFU metrics (Maini et al. 2024), numerically aligned with locuslab/open-unlearning.

Every probability comes from the one batched teacher-forced pass
(:mod:`unlearn.models.teacher_forced`, reduced by
:func:`unlearn.eval.pair_stats.teacher_forced_stats`): all (question, answer)
pairs of a split -- the answer, its paraphrase and every perturbed answer --
are flattened into one list and scored together, and exact memorisation /
extraction strength are read off the same logits (argmax vs label), so a split
costs one pass over its pairs. Generation (ROUGE-L) is
:mod:`unlearn.eval.generation`; the retain model's reference truth ratios are
:mod:`unlearn.eval.reference_store`; the directory-level runner that writes
the files is :mod:`unlearn.eval.runner`.

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
* membership inference -- forget rows (members of the target's training set) vs
  holdout rows (authors no model trained on), each scored on its answer tokens
  by the four attacks of :mod:`unlearn.eval.mia` (loss and zlib over the answer
  and EOS, Min-K% / Min-K%++ with k = :data:`MIA_K` over the answer without
  EOS, as open-unlearning); ``mia_auc_<attack>`` is MUSE's AUC (~0: the forget
  rows are recognised as members, ~0.5: they look like the holdout rows).
* privleak -- ``(AUC_model - AUC_retain) / AUC_retain * 100`` of the Min-K% AUC,
  ``AUC_retain`` the retain model's (stored by
  :func:`unlearn.eval.reference_store.retain_mia_reference`): 0 for the retain
  model, strongly negative for a model that still knows the forget set,
  positive for over-unlearning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import scipy.stats
import torch

from unlearn.config import EvalCfg
from unlearn.models.formatting import encode_many, ensure_pad
from unlearn.models.template import PLAIN, QAFormat
from unlearn.models.truncation import FIELDS, split_summary, truncation_table, truncation_warning

from .generation import generate_answers, rouge_ground_truths, rouge_l_recall
from .mia import ATTACKS, TokenStats, attack_scores, mia_auc, privleak, token_stats
from .pair_stats import teacher_forced_stats

log = logging.getLogger(__name__)

EPS = 1e-10  # open-unlearning's epsilon in every ratio
# Evaluation roles (what a split is scored as), not split names: the forget role scores forgetXX_perturbed.
FORGET_ROLE, RETAIN_ROLE, REAL_AUTHORS, WORLD_FACTS = "forget", "retain", "real_authors", "world_facts"
UTILITY_ROLES = (RETAIN_ROLE, REAL_AUTHORS, WORLD_FACTS)
# Split names looked up in ``splits`` for each non-forget role (first present wins).
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    RETAIN_ROLE: ("retain_perturbed",),
    REAL_AUTHORS: ("real_authors", "real_authors_perturbed"),
    WORLD_FACTS: ("world_facts", "world_facts_perturbed"),
}
UTILITY_PARTS = tuple(f"{role}_{m}" for role in UTILITY_ROLES for m in ("prob", "rouge", "truth_ratio"))

MIA_K = 0.4
"""Min-K% / Min-K%++: share of the lowest-scoring answer tokens averaged (open-unlearning's TOFU ``k: 0.4``)."""
PRIVLEAK_ATTACK = "min_k"
"""The attack whose AUC privleak compares with the retain model's (open-unlearning's TOFU privleak: Min-K%)."""
MIA_KEYS: dict[str, str] = {a: "mia_auc_" + a.replace("++", "_plus_plus") for a in ATTACKS}
"""Attack -> metric name. ``min_k++`` is spelled ``min_k_plus_plus`` (open-unlearning's ``mia_min_k_plus_plus``):
MLflow refuses ``+`` in a metric name, and every metric is logged at registration."""
MIA_METRICS: tuple[str, ...] = ("privleak", *MIA_KEYS.values())


def nan_to_none(x: Any) -> Any:
    """A NumPy scalar as a plain Python one, NaN as None: per-example records and metrics are JSON."""
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


def split_scores(model, tokenizer, rows: Sequence[dict], *, role: str, max_length: int, batch_size: int,
                 device: torch.device | str | None = None, progress: bool = False,
                 desc: str = "scoring", fmt: QAFormat = PLAIN) -> dict[str, np.ndarray]:
    """Teacher-forced per-row quantities for one split, from one flattened batch of pairs (in the format ``fmt``).

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
    use_para = role in (FORGET_ROLE, RETAIN_ROLE)
    for i, row in enumerate(rows):
        q = row["question"]
        ans_idx[i] = add(q, row["answer"])
        para = row.get("paraphrased_answer") if use_para else None
        corr_idx[i] = add(q, para) if para else ans_idx[i]
        for p in row.get("perturbed_answer") or []:
            pert_idx.append(add(q, p))
            pert_owner.append(i)

    st = teacher_forced_stats(model, tokenizer, questions, answers, max_length, batch_size, device,
                              progress=progress, desc=desc, fmt=fmt)
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


# --------------------------------------------------------------------------- membership inference

def mia_split_scores(model, tokenizer, rows: Sequence[dict], *, max_length: int, batch_size: int,
                     device: torch.device | str | None = None, progress: bool = False,
                     desc: str = "MIA scoring", fmt: QAFormat = PLAIN) -> dict[str, np.ndarray]:
    """Loss-like membership scores of every attack (:data:`~unlearn.eval.mia.ATTACKS`) per row of one split.

    Each row is encoded as training encodes it (``encode_many``: prompt masked,
    answer + EOS labelled, cut at ``max_length``) and goes through one batched
    pass (:func:`unlearn.eval.mia.token_stats`). As open-unlearning's TOFU MIA:
    loss and zlib average every labelled token (EOS included; zlib divides by the
    compressed length of the answer string), Min-K% and Min-K%++ leave the EOS
    prediction out. Returns ``{attack: float64 [len(rows)]}``, higher = less
    likely a member.
    """
    rows = list(rows)
    if not rows:
        return {a: np.zeros(0) for a in ATTACKS}
    enc = encode_many(tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows], max_length, fmt=fmt)
    stats = token_stats(model, enc, pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=device,
                        progress=progress, desc=desc)
    answers = [r["answer"] for r in rows]
    eos = tokenizer.eos_token_id
    no_eos = [TokenStats(s.logp[:-1], s.mu[:-1], s.sigma[:-1]) if eos is not None and e.labels[-1] == eos else s
              for s, e in zip(stats, enc)]
    with_eos, without = attack_scores(stats, answers, MIA_K), attack_scores(no_eos, answers, MIA_K)
    return {"loss": with_eos["loss"], "zlib": with_eos["zlib"], "min_k": without["min_k"], "min_k++": without["min_k++"]}


def mia_aucs(forget: Mapping[str, np.ndarray], holdout: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """MUSE's AUC (:func:`unlearn.eval.mia.mia_auc`) of each attack, forget vs holdout scores.

    Rows with a non-finite score (no scored token) are left out; an attack with
    no finite score on one side is None.
    """
    out: dict[str, float | None] = {}
    for a in ATTACKS:
        f, h = np.asarray(forget[a], dtype=np.float64), np.asarray(holdout[a], dtype=np.float64)
        f, h = f[np.isfinite(f)], h[np.isfinite(h)]
        out[a] = mia_auc(f, h) if f.size and h.size else None
    return out


def set_privleak(result: "EvalResult", retain_aucs: Mapping[str, float | None] | None, *,
                 reason: str | None = None) -> None:
    """``result.metrics["privleak"]`` from its own Min-K% AUC and the retain model's (``retain_aucs``).

    None, with ``reason`` (or the cause) in ``notes["privleak"]``, when either AUC
    is missing or the retain AUC is 0.
    """
    key = MIA_KEYS[PRIVLEAK_ATTACK]
    auc = result.metrics.get(key)
    ref = None if retain_aucs is None else retain_aucs.get(PRIVLEAK_ATTACK)
    value = None
    if auc is None:
        reason = result.notes.get(key) or reason or f"not computed: no {key}"
    elif ref is None:
        reason = reason or ("not computed: no retain-model reference AUC (privleak compares with a model trained "
                            "only on the retain split)")
    else:
        value = nan_to_none(privleak(auc, ref))
        reason = None if value is not None else f"not computed: the retain model's {key} is {ref}"
    result.metrics["privleak"] = value
    if reason is None:
        result.notes.pop("privleak", None)
    else:
        result.notes["privleak"] = reason


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
    roles = {FORGET_ROLE: forget_split}
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
    holdout_split: str | None = None,
    retain_mia_aucs: Mapping[str, float | None] | None = None,
    fmt: QAFormat = PLAIN,
) -> EvalResult:
    """All TOFU metrics of ``model`` on ``splits``, every row encoded and prompted in the format ``fmt``.

    ``splits`` maps split names to rows; the forget split is ``forget_split``,
    the utility splits are looked up as ``retain_perturbed``, ``real_authors``
    (or ``real_authors_perturbed``) and ``world_facts`` (or
    ``world_facts_perturbed``). A missing split leaves its metrics (and model
    utility) None with a note. ``retain_truth_ratios``: the retain model's raw
    per-example forget truth ratios
    (:func:`unlearn.eval.reference_store.retain_reference`); None leaves forget
    quality None with the reason in ``notes["forget_quality"]``.

    ``holdout_split``: the split of authors no model trained on (holdoutXX), the
    non-members of the membership-inference AUCs (``mia_auc_*``, forget rows vs
    holdout rows); None or absent from ``splits`` leaves them and ``privleak``
    None with a note. ``retain_mia_aucs``: the retain model's AUCs
    (:func:`unlearn.eval.reference_store.retain_mia_reference`), from which
    ``privleak`` is computed (:func:`set_privleak`); None leaves it None.

    ``notes["<role>_truncation"]`` always says how many of the split's scored
    rows (answers, paraphrases, perturbed answers) ``max_length`` cuts, because a
    cut row is scored on part of its answer; any cut row is also logged as a warning.
    """
    ensure_pad(tokenizer)
    roles = _resolve_roles(splits, forget_split)
    metrics: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    scored_fields = {name: FIELDS if role in (FORGET_ROLE, RETAIN_ROLE) else ("answer", "perturbed_answer")
                     for role, name in roles.items()}  # split_scores uses paraphrases for forget/retain only
    holdout = holdout_split if holdout_split is not None and holdout_split in splits else None
    if holdout is not None:
        scored_fields[holdout] = ("answer",)  # membership inference scores the answers only
    truncation = truncation_table(tokenizer, {name: list(splits[name]) for name in scored_fields}, max_length,
                                  scored_fields, fmt=fmt)
    warning = truncation_warning(truncation)
    if warning:
        log.warning("evaluation: %s", warning)
    per_example: dict[str, list[dict]] = {}
    cap = cfg.generation_examples

    for role in (FORGET_ROLE, *UTILITY_ROLES):
        if role not in roles:
            for m in ("prob", "rouge", "truth_ratio"):
                metrics[f"{role}_{m}"] = None
            notes[role] = f"no {role} split (looked for {', '.join(SPLIT_ALIASES[role])})"
            continue
        name = roles[role]
        rows = list(splits[name])
        notes[f"{role}_truncation"] = _truncation_note(name, truncation)
        sc = split_scores(model, tokenizer, rows, role=role, max_length=max_length, batch_size=cfg.batch_size,
                          device=device, progress=progress, desc=f"scoring {name}", fmt=fmt)
        n_gen = len(rows) if cap is None else min(len(rows), max(cap, 0))
        gens = generate_answers(model, tokenizer, [r["question"] for r in rows[:n_gen]],
                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, device=device,
                                progress=progress, desc=f"generating {name}", fmt=fmt)
        truths = rouge_ground_truths(tokenizer, [r["question"] for r in rows[:n_gen]],
                                     [r["answer"] for r in rows[:n_gen]], max_length, fmt=fmt)
        rouges = [rouge_l_recall(t, g) for t, g in zip(truths, gens)]

        prob_key = "answer_prob" if role in (FORGET_ROLE, RETAIN_ROLE) else "normalised_prob"
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
            recs.append({k: nan_to_none(v) for k, v in rec.items()})
        per_example[name] = recs

        metrics[f"{role}_prob"] = _mean(sc[prob_key])
        metrics[f"{role}_rouge"] = _mean(rouges)
        agg = closer_to_1_better if role == FORGET_ROLE else true_better
        metrics[f"{role}_truth_ratio"] = agg(sc["truth_ratio"])
        if role == FORGET_ROLE:
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
        no_para = sum(1 for r in rows if not r.get("paraphrased_answer")) if role in (FORGET_ROLE, RETAIN_ROLE) else 0
        if no_para:
            notes[f"{role}_paraphrase"] = (f"{no_para} example(s) without a paraphrased answer: "
                                           "the plain answer was used as P_correct")

    if holdout is None:
        why = (f"not computed: no holdout split ({holdout_split!r} is not among the evaluated splits; "
               "`unlearn prepare` writes holdout01/05/10)" if holdout_split is not None
               else "not computed: no holdout split (authors no model trained on) pairs with this forget split")
        for key in MIA_KEYS.values():
            metrics[key] = None
            notes[key] = why
    else:
        notes["holdout_truncation"] = _truncation_note(holdout, truncation)
        mia_f = mia_split_scores(model, tokenizer, list(splits[forget_split]), max_length=max_length,
                                 batch_size=cfg.batch_size, device=device, progress=progress,
                                 desc=f"MIA scoring {forget_split}", fmt=fmt)
        mia_h = mia_split_scores(model, tokenizer, list(splits[holdout]), max_length=max_length,
                                 batch_size=cfg.batch_size, device=device, progress=progress,
                                 desc=f"MIA scoring {holdout}", fmt=fmt)
        aucs = mia_aucs(mia_f, mia_h)
        for a, key in MIA_KEYS.items():
            metrics[key] = aucs[a]
            if aucs[a] is None:
                notes[key] = f"not computed: no finite {a} score on {forget_split} or {holdout}"
            per_key = "mia_" + a.replace("++", "_plus_plus")
            for rec, v in zip(per_example[forget_split], mia_f[a]):
                rec[per_key] = nan_to_none(v)
        per_example[holdout] = [
            {"split": holdout, "id": row.get("id", i), "author_id": row.get("author_id"), "question": row["question"],
             "answer": row["answer"],
             **{"mia_" + a.replace("++", "_plus_plus"): nan_to_none(mia_h[a][i]) for a in ATTACKS}}
            for i, row in enumerate(splits[holdout])]

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
             "forget_exact_mem", "forget_extraction_strength", *MIA_METRICS, *UTILITY_PARTS]
    metrics = {k: metrics.get(k) for k in order}
    if holdout is not None:
        roles["holdout"] = holdout
    result = EvalResult(metrics=metrics, notes=notes, per_example=per_example, forget_split=forget_split, roles=roles,
                        truncation=truncation)
    set_privleak(result, retain_mia_aucs)
    return result
