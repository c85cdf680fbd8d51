"""Oracle-free evidence that a model honours a deletion request (``requests.oracle: none``).

A model that never saw a request's rows treats them like rows of authors it never saw either. The **holdout
population** is such authors: TOFU's ``holdout01/05/10`` (real files and the synthetic generator), never in
``full``, so no model (target, unlearned, retain) was trained on them. Under the model being checked, the
request's rows are compared with the holdout rows:

``ks_pvalue`` (``ks_on``)
    one-sided ``scipy.stats.ks_2samp`` p-value of "the request's rows have lower truth ratios (higher answer
    probabilities) than the holdout rows", i.e. are still known better than rows never trained on (TOFU's forget
    quality, with the holdout in the place of a retrained model, asked in the direction a deletion cares
    about): high = not known better. Over-unlearned rows (known *worse*) do not lower it.
    The truth ratio needs a paraphrase and perturbed answers, which TOFU's holdout rows (real files and the
    synthetic generator) do not have; the test is then on the rows' normalised answer probability instead
    (``ks_on: prob``), the same question asked of the one per-row statistic both populations have.
``mia_auc_<attack>``
    MUSE's membership AUC (:func:`unlearn.eval.mia.mia_auc`) of the request's rows (label 0) vs the holdout rows
    (label 1): ~0 = the rows are recognised as trained on, ~0.5 = they look like the holdout, ~1 = over-unlearned
    (they stand out by being *less* likely, which leaks too).
``privleak``
    ``(AUC_min_k - 0.5) / 0.5 * 100``: PrivLeak against the holdout (the AUC a model that never saw either set
    has); 0 = no leak, -100 = fully memorised.
``prob`` / ``holdout_prob`` / ``prob_gap``
    mean normalised answer probability of the request's rows, of the holdout rows, and their difference.
``rouge`` / ``holdout_rouge`` / ``rouge_gap``
    the same for ROUGE-L recall of the greedy answer.

No retain model is trained. :func:`unlearn.gate.request_gate` turns the evidence into a decision with
``requests.gate`` thresholds (and utility against the target, ``gate.min_utility_ratio``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Params

EVIDENCE_KEYS = ("ks_pvalue", "ks_on", "mia_auc_loss", "mia_auc_min_k_plus_plus", "privleak", "prob", "holdout_prob",
                 "prob_gap", "rouge", "holdout_rouge", "rouge_gap", "rows", "holdout_rows")
"""What :func:`holdout_evidence` returns for one request, in this order."""
EVIDENCE_VERSION = 2
"""Bump when what :func:`holdout_evidence` computes changes (2: the KS test one-sided), so stored evidence
(benchmarks/request_proxy_agreement.py) is recomputed instead of reused."""
CHANCE_AUC = 0.5
"""The membership AUC of a model that never saw either population."""


def _finite(a: Any) -> np.ndarray:
    x = np.asarray([np.nan if v is None else v for v in a], dtype=np.float64)
    return x[np.isfinite(x)]


def _mean(a: Any) -> float | None:
    x = _finite(a)
    return float(x.mean()) if x.size else None


def holdout_evidence(req: Mapping[str, Sequence[Any]], holdout: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """The evidence of one request (module docstring) from per-row scores under one model.

    Both mappings: ``truth_ratio``, ``prob``, ``rouge`` (one value per row, None/NaN where undefined) and
    ``mia_<attack>`` for each attack of :data:`unlearn.eval.mia.ATTACKS` (loss-like membership scores).
    A value that cannot be computed (no finite input on a side) is None.
    """
    import scipy.stats

    from ..eval.mia import ATTACKS, mia_auc, privleak

    tr_r, tr_h = _finite(req["truth_ratio"]), _finite(holdout["truth_ratio"])
    ks_on = "truth_ratio"
    if not (tr_r.size and tr_h.size):  # TOFU's holdout rows have no perturbed answers: the answer probability then
        tr_r, tr_h, ks_on = _finite(req["prob"]), _finite(holdout["prob"]), "prob"
    # One-sided: the question a deletion request asks is whether the model still knows these rows *better* than
    # rows it never saw (higher answer probability, lower truth ratio). Rows it knows worse (over-unlearning)
    # are reported by the AUCs and gaps but do not fail the request. scipy's alternative "less" is F_req < F_hold
    # somewhere: the request's values tend to be larger.
    alternative = "less" if ks_on == "prob" else "greater"
    out: dict[str, Any] = {"ks_pvalue": float(scipy.stats.ks_2samp(tr_r, tr_h, alternative=alternative).pvalue)
                           if tr_r.size and tr_h.size else None, "ks_on": ks_on}
    for a in ATTACKS:
        key = "mia_" + a.replace("++", "_plus_plus")
        f, h = _finite(req.get(key, [])), _finite(holdout.get(key, []))
        out["mia_auc_" + a.replace("++", "_plus_plus")] = mia_auc(f, h) if f.size and h.size else None
    auc = out.get("mia_auc_min_k")
    leak = None if auc is None else privleak(auc, CHANCE_AUC)
    out["privleak"] = None if leak is None or not math.isfinite(leak) else leak
    for k in ("prob", "rouge"):
        mine, theirs = _mean(req[k]), _mean(holdout[k])
        out[k], out[f"holdout_{k}"] = mine, theirs
        out[f"{k}_gap"] = None if mine is None or theirs is None else mine - theirs
    out["rows"], out["holdout_rows"] = len(req["prob"]), len(holdout["prob"])
    return out


def score_rows(model, tokenizer, rows: Sequence[dict], p: Params, *, device=None) -> dict[str, list[Any]]:
    """Per-row ``truth_ratio``, ``prob``, ``rouge`` and ``mia_<attack>`` of ``rows`` under ``model`` (the scores
    :func:`holdout_evidence` reads), in the evaluation's prompt format, from the same functions the TOFU
    evaluation uses (:mod:`unlearn.eval.tofu_metrics`, :mod:`unlearn.eval.generation`)."""
    from ..eval.generation import generate_answers, rouge_ground_truths, rouge_l_recall
    from ..eval.mia import ATTACKS
    from ..eval.tofu_metrics import mia_split_scores, split_scores
    from ..models.template import eval_format

    rows = list(rows)
    fmt = eval_format(p)
    ml, bs = p.model.max_length, p.eval.batch_size
    sc = split_scores(model, tokenizer, rows, role="forget", max_length=ml, batch_size=bs, device=device,
                      progress=False, desc="request evidence", fmt=fmt)
    mia = mia_split_scores(model, tokenizer, rows, max_length=ml, batch_size=bs, device=device, progress=False, fmt=fmt)
    qs = [r["question"] for r in rows]
    gens = generate_answers(model, tokenizer, qs, max_new_tokens=p.eval.max_new_tokens, batch_size=bs, device=device,
                            progress=False, desc="request evidence", fmt=fmt)
    truths = rouge_ground_truths(tokenizer, qs, [r["answer"] for r in rows], ml, fmt=fmt)

    def lst(a) -> list[Any]:
        return [None if v is None or not math.isfinite(float(v)) else float(v) for v in a]

    out = {"id": [r["id"] for r in rows], "truth_ratio": lst(sc["truth_ratio"]), "prob": lst(sc["answer_prob"]),
           "rouge": [rouge_l_recall(t, g) for t, g in zip(truths, gens)]}
    for a in ATTACKS:
        out["mia_" + a.replace("++", "_plus_plus")] = lst(mia[a])
    return out


def _subset(scores: Mapping[str, list[Any]], ids: set[str]) -> dict[str, list[Any]]:
    keep = [i for i, rid in enumerate(scores["id"]) if rid in ids]
    return {k: [v[i] for i in keep] for k, v in scores.items()}


def holdout_split_for(p: Params) -> str:
    """The holdout population of the prepared data: the largest ``holdoutXX`` split (most rows: the tightest
    test). FileNotFoundError, naming the fix, when the data have none."""
    from ..data.names import HOLDOUT_SPLITS

    for name in reversed(HOLDOUT_SPLITS):
        if (Path(p.data.out_dir) / f"{name}.json").is_file():
            return name
    raise FileNotFoundError(f"no holdout split ({', '.join(HOLDOUT_SPLITS)}) in {p.data.out_dir}: requests.oracle "
                            "none compares the requested rows with authors no model trained on; run `unlearn prepare`")


def _perturbed_rows(p: Params) -> dict[str, dict]:
    """``{row id: row}`` of every prepared split with paraphrases and perturbed answers (the synthetic ``full``
    rows carry them already; the real TOFU files keep them in ``forgetXX_perturbed`` / ``retain_perturbed``)."""
    from ..data.names import PERTURBED_SPLITS
    from ..data.splits import read_split

    out: dict[str, dict] = {}
    for name in PERTURBED_SPLITS:
        if (Path(p.data.out_dir) / f"{name}.json").is_file():
            out.update({r["id"]: r for r in read_split(p.data.out_dir, name) if r.get("perturbed_answer")})
    return out


def request_evidence_for_model(p: Params, model_dir: str | Path, requests: Sequence[Any],
                               full: Sequence[dict]) -> dict[str, Any]:
    """``{"holdout_split", "per_request": {request_id: evidence}, "scores": per-row}`` for ``model_dir``: every
    request's rows (matched in ``full``) scored once, with the holdout rows, under that model."""
    from ..data.splits import read_split
    from ..eval.loading import load_eval_model
    from .forget_set import forget_rows_for

    holdout_name = holdout_split_for(p)
    holdout_rows = read_split(p.data.out_dir, holdout_name)
    perturbed = _perturbed_rows(p)  # the truth ratio needs each row's paraphrase and perturbed answers
    per_req = {r.request_id: [perturbed.get(row["id"], row) for row in forget_rows_for([r], full)] for r in requests}
    union: dict[str, dict] = {}
    for rows in per_req.values():
        union.update({row["id"]: row for row in rows})
    model, tok = load_eval_model(model_dir)
    scores = score_rows(model, tok, list(union.values()), p)
    held = score_rows(model, tok, holdout_rows, p)
    ev = {rid: holdout_evidence(_subset(scores, {r["id"] for r in rows}), held) for rid, rows in per_req.items()}
    return {"holdout_split": holdout_name, "model": str(model_dir), "per_request": ev,
            "scores": {"requested": scores, "holdout": held}}
