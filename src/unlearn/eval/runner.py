"""Evaluate a saved model directory end to end and write its files: metrics, notes, per-example records, report.

The one place that loads models from disk for evaluation (the evaluated model,
the retain model through :mod:`unlearn.eval.reference_store`, the target model
for the report's side-by-side generations) and writes ``out_dir``; the metrics
themselves are :mod:`unlearn.eval.tofu_metrics`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from unlearn.config import EvalCfg
from unlearn.models.template import PLAIN, QAFormat

from .generation import generate_answers
from .loading import load_eval_model
from .mia import ATTACKS
from .reference_store import retain_mia_reference, retain_reference, store_mia_reference, weight_files
from .report import write_report
from .tofu_metrics import MIA_KEYS, EvalResult, evaluate_model, nan_to_none, set_privleak


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return nan_to_none(o)
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
    holdout_split: str | None = None,
    fmt: QAFormat = PLAIN,
) -> EvalResult:
    """Evaluate the model saved in ``model_dir`` in the prompt format ``fmt`` and write ``out_dir``:

    ``metrics.json`` (flat, DVC metrics), ``notes.json`` (why any metric is
    None), ``per_example.jsonl`` (one JSON object per example, with ``split``),
    ``report.md``, ``report.html``, ``truth_ratio_hist.png``.
    The retain reference comes from :func:`~unlearn.eval.reference_store.retain_reference`; target-model
    generations (report only) for the first ``cfg.report_examples`` forget questions.

    ``holdout_split`` (in ``splits``): the non-members of the membership-inference
    AUCs. privleak compares the Min-K% AUC with the retain model's, read by
    :func:`~unlearn.eval.reference_store.retain_mia_reference`; when ``model_dir``
    *is* the retain model, its own AUCs become that reference (written with
    :func:`~unlearn.eval.reference_store.store_mia_reference`), so its privleak is 0.
    """
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
                               cfg=cfg, device=device, progress=progress, reference_dir=reference_dir, fmt=fmt)

    mia_ref: dict | None = None
    own_mia_ref = False  # the evaluated model is the retain model: its AUCs are the reference
    has_holdout = holdout_split is not None and holdout_split in splits
    if has_holdout and fq_reason is None:
        if Path(model_dir).resolve() == Path(retain_model_dir).resolve():
            own_mia_ref = True
        else:
            mia_ref = retain_mia_reference(retain_model_dir, splits, forget_split=forget_split,
                                           holdout_split=holdout_split, max_length=max_length, cfg=cfg, device=device,
                                           progress=progress, reference_dir=reference_dir, fmt=fmt)

    model, tokenizer = load_eval_model(model_dir, device)
    result = evaluate_model(model, tokenizer, splits, forget_split=forget_split, max_length=max_length, cfg=cfg,
                            retain_truth_ratios=ref, progress=progress, device=device, holdout_split=holdout_split,
                            retain_mia_aucs=mia_ref, fmt=fmt)
    del model
    if fq_reason is not None:
        result.notes["forget_quality"] = fq_reason
        if has_holdout:
            set_privleak(result, None, reason=fq_reason)
    if own_mia_ref:
        own = {a: result.metrics[MIA_KEYS[a]] for a in ATTACKS}
        store_mia_reference(retain_model_dir, splits, own, forget_split=forget_split, holdout_split=holdout_split,
                            max_length=max_length, reference_dir=reference_dir, fmt=fmt)
        set_privleak(result, own)

    target_generations: dict | None = None
    if target_model_dir is not None and cfg.report_examples > 0:
        rows = list(splits[forget_split])[: cfg.report_examples]
        tmodel, ttok = load_eval_model(target_model_dir, device)
        gens = generate_answers(tmodel, ttok, [r["question"] for r in rows], max_new_tokens=cfg.max_new_tokens,
                                batch_size=cfg.batch_size, device=device, progress=progress,
                                desc="generating target", fmt=fmt)
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
