"""Evaluate a saved model directory on MUSE end to end and write its files; keep the retain model's MIA reference.

The MUSE counterpart of :mod:`unlearn.eval.runner`: loads the model
(:func:`unlearn.eval.loading.load_eval_model`), computes VerbMem and KnowMem
(:mod:`unlearn.eval.muse_metrics`) and the four membership-inference AUCs
(:mod:`unlearn.eval.mia`), turns them into PrivLeak against the retain model's
AUCs, and writes ``out_dir``:

* ``metrics.json`` -- flat floats (None when not computable): :data:`METRIC_KEYS`;
* ``notes.json`` -- why a metric is None, and what was cut (articles at
  ``max_length``, prompts at the context);
* ``per_example.jsonl`` -- one object per row with ``split`` and ``id``;
* ``report.md``, ``report.html``, ``mia_hist.png`` (:mod:`unlearn.eval.muse_report`).

PrivLeak needs the retain model's AUCs. They depend only on the retain model
(weights and tokenizer), the privleak rows, ``max_length`` and ``k``, so the
retain model's own evaluation (``is_retain=True``) stores them once in
``reference_dir/reference.json`` under a key over exactly those
(:func:`reference_key`), written atomically; every other evaluation reads them
and gets None with a note when the file is missing or its key does not match.
Unlike TOFU's truth-ratio reference (:mod:`unlearn.eval.reference_store`), the
retain model is not re-scored on demand: the retain evaluation is its own
pipeline stage (``unlearn evaluate <retain model> --name retain``), whose output
the other evaluations take as an input.

Rows: ``muse_cfg.examples`` keeps the first N rows of every evaluated split
(the few-shot ICL splits are used whole: they are the prompt, not the data).

Differences from MUSE (swj0419/muse_bench ``eval.py``) and open-unlearning
(``configs/eval/muse_metrics/privleak.yaml``, ``evals/metrics/privacy.py``):

1. The retain AUC comes from evaluating our retain model, stored with its key.
   MUSE hard-codes its retrained Llama's AUCs (``constants.AUC_RETRAIN``);
   open-unlearning reads the retain model's eval log (``retain_logs_path``) and
   falls back to an AUC of 0.5 when none is given -- here PrivLeak is then None.
2. PrivLeak is reported for all four attacks (``privleak_<attack>``), with
   ``privleak`` the one ``muse_cfg.privleak_attack`` names (Min-K%, k = 0.4, as
   MUSE's ``forget_holdout_Min-40%`` and open-unlearning's ``mia_min_k``).
3. MUSE also scores ``privleak_retain`` (all nine split pairs); PrivLeak reads
   only forget vs holdout, so only those two are scored here.
4. Articles are scored on BOS + their first ``max_length - 1`` tokens (MUSE: the
   whole article; open-unlearning: the first 2048 tokens), the count of cut ones in the notes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from unlearn.config import EvalCfg, MuseEvalCfg
from unlearn.data.names import (
    KNOWMEM_FORGET,
    KNOWMEM_FORGET_ICL,
    KNOWMEM_RETAIN,
    KNOWMEM_RETAIN_ICL,
    PRIVLEAK_FORGET,
    PRIVLEAK_HOLDOUT,
    VERBMEM_FORGET,
)
from unlearn.io import read_json, sha256_file, stable_hash, write_json
from unlearn.models.formatting import IGNORE, encode_text, ensure_pad

from .loading import load_eval_model
from .mia import ATTACKS, attack_scores, metric_suffix, mia_auc, privleak, token_stats
from .muse_metrics import MemResult, knowmem, verbmem
from .muse_report import write_muse_report
from .reference_store import TOKENIZER_FILES, weight_files
from .tofu_metrics import EvalResult, nan_to_none

log = logging.getLogger(__name__)

METRIC_KEYS: tuple[str, ...] = (
    "verbmem_forget", "knowmem_forget", "knowmem_retain",
    *(f"mia_auc_{metric_suffix(a)}" for a in ATTACKS), "privleak", *(f"privleak_{metric_suffix(a)}" for a in ATTACKS),
)
"""Every key of a MUSE ``metrics.json``, in order."""

REFERENCE_FILE = "reference.json"
REFERENCE_VERSION = 1
"""Bump when anything that changes the stored retain-model AUCs changes (the encoding, a score's definition)."""

RETAIN_HINT = "evaluate the retain model first (`unlearn evaluate <retain model> --name retain`)"


# --------------------------------------------------------------------------- the retain reference

def model_files_hash(model_dir: str | Path) -> str:
    """Content address of a saved model's weight files and tokenizer/config files (the retain model's identity)."""
    d = Path(model_dir)
    weights = weight_files(d)
    if not weights:
        raise FileNotFoundError(f"{d}: no weight files")
    files = {p.name: sha256_file(p) for p in weights}
    files.update({name: sha256_file(d / name) for name in TOKENIZER_FILES if (d / name).is_file()})
    return stable_hash(files)


def _text_rows(rows: Sequence[Mapping]) -> list[list]:
    return [[r.get("id", i), r["text"]] for i, r in enumerate(rows)]


def reference_key(retain_model: str, forget_rows: Sequence[Mapping], holdout_rows: Sequence[Mapping],
                  max_length: int, k: float) -> str:
    """sha256 over everything the retain model's AUCs depend on: ``retain_model``
    (:func:`model_files_hash`), the privleak forget and holdout rows (ids and text),
    ``max_length``, ``k`` and :data:`REFERENCE_VERSION`."""
    return stable_hash({
        "version": REFERENCE_VERSION,
        "retain_model": retain_model,
        "forget": _text_rows(forget_rows),
        "holdout": _text_rows(holdout_rows),
        "max_length": int(max_length),
        "k": float(k),
    })


def write_reference(reference_dir: str | Path, *, retain_model: str, forget_rows: Sequence[Mapping],
                    holdout_rows: Sequence[Mapping], max_length: int, k: float,
                    aucs: Mapping[str, float | None], model_dir: str | Path) -> Path:
    """Store the retain model's AUCs in ``reference_dir/reference.json`` (temp file + rename)."""
    path = Path(reference_dir) / REFERENCE_FILE
    write_json(path, {
        "key": reference_key(retain_model, forget_rows, holdout_rows, max_length, k),
        "version": REFERENCE_VERSION,
        "retain_model": retain_model,
        "model_dir": str(model_dir),
        "max_length": int(max_length),
        "k": float(k),
        "n_forget": len(forget_rows),
        "n_holdout": len(holdout_rows),
        "auc": {a: nan_to_none(aucs.get(a)) for a in ATTACKS},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return path


def read_reference(reference_dir: str | Path, *, forget_rows: Sequence[Mapping], holdout_rows: Sequence[Mapping],
                   max_length: int, k: float, retain_model: str | None = None) -> tuple[dict[str, float] | None, str]:
    """The stored retain AUCs ``{attack: auc}`` (None: unusable) and a sentence on why / what was checked.

    The key is recomputed from this evaluation's rows, ``max_length`` and ``k``
    and the retain model's identity: ``retain_model`` when the caller knows the
    retain model (it must match), else the one the file records (then only the
    data and settings are checked, and the sentence says so).
    """
    path = Path(reference_dir) / REFERENCE_FILE
    if not path.is_file():
        return None, f"no retain reference at {path}: {RETAIN_HINT}"
    try:
        data = read_json(path)
        stored_model = data["retain_model"]
        if retain_model is not None and stored_model != retain_model:
            return None, f"{path} was written for another retain model (weights changed): {RETAIN_HINT}"
        key = reference_key(retain_model or stored_model, forget_rows, holdout_rows, max_length, k)
        if data.get("key") != key:
            return None, (f"{path} does not match this evaluation (privleak rows, max_length={max_length} "
                          f"or k={k} differ): {RETAIN_HINT}")
        auc = {a: data["auc"][a] for a in ATTACKS}
        if not all(v is None or (isinstance(v, (int, float)) and 0 <= v <= 1) for v in auc.values()):
            raise ValueError("AUC values out of range")
    except Exception as e:  # noqa: BLE001 -- any defect means: not usable
        return None, f"unreadable retain reference {path} ({type(e).__name__}: {e}): {RETAIN_HINT}"
    checked = "" if retain_model is not None else " (retain weights not re-hashed: no retain model directory given)"
    return {a: (math.nan if v is None else float(v)) for a, v in auc.items()}, f"retain reference {path}{checked}"


# --------------------------------------------------------------------------- membership inference

def _mia_split(model, tokenizer, rows: Sequence[Mapping], *, max_length: int, k: float, batch_size: int,
               device, progress: bool, desc: str) -> tuple[dict[str, np.ndarray], list[dict], int]:
    """Attack scores of one privleak split (``{attack: [n]}``), its per-row records, and how many articles were cut.

    Each article is BOS + its first ``max_length - 1`` tokens, all scored. zlib is
    taken of the raw article when it was scored whole (MUSE) and of the decoded
    scored tokens when it was cut (the text the loss is over).
    """
    enc = [encode_text(tokenizer, r["text"], max_length) for r in rows]
    stats = token_stats(model, enc, pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=device,
                        progress=progress, desc=desc)
    texts = [r["text"] if not e.truncated else
             tokenizer.decode([t for t in e.labels if t != IGNORE], skip_special_tokens=True) for r, e in zip(rows, enc)]
    scores = attack_scores(stats, texts, k)
    records = [{"id": r.get("id", i), "n_tokens": len(s), "truncated": e.truncated,
                **{a: nan_to_none(scores[a][i]) for a in ATTACKS}}
               for i, (r, e, s) in enumerate(zip(rows, enc, stats))]
    return scores, records, sum(e.truncated for e in enc)


def _aucs(forget: Mapping[str, np.ndarray], holdout: Mapping[str, np.ndarray]) -> tuple[dict[str, float], str | None]:
    """``{attack: AUC}`` over the rows every attack could score; a note when rows were dropped."""
    f_ok = np.all([np.isfinite(forget[a]) for a in ATTACKS], axis=0)
    h_ok = np.all([np.isfinite(holdout[a]) for a in ATTACKS], axis=0)
    note = None
    if not f_ok.all() or not h_ok.all():
        note = (f"{int((~f_ok).sum())} forget and {int((~h_ok).sum())} holdout articles have no scored token "
                "and are left out of the AUCs")
    if not f_ok.any() or not h_ok.any():
        why = f"no AUC: {int(f_ok.sum())} scorable forget and {int(h_ok.sum())} scorable holdout articles"
        return {a: math.nan for a in ATTACKS}, why if note is None else f"{note}; {why}"
    return {a: mia_auc(forget[a][f_ok], holdout[a][h_ok]) for a in ATTACKS}, note


# --------------------------------------------------------------------------- the runner

def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return nan_to_none(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _cap(rows: Sequence[dict], n: int | None) -> list[dict]:
    return list(rows) if n is None else list(rows)[:n]


def _cut_note(split: str, res: MemResult, n_rows: int) -> str:
    note = f"{split}: {res.prompts_cut}/{n_rows} prompts cut from the left to fit the context"
    if res.prompts_cut:
        note += " -- WARNING: those rows were generated from the end of their prompt only"
    return note


def evaluate_muse_dir(
    model_dir: str | Path,
    *,
    splits: Mapping[str, Sequence[dict]],
    max_length: int,
    cfg: EvalCfg,
    muse_cfg: MuseEvalCfg,
    reference_dir: str | Path,
    is_retain: bool,
    target_model_dir: str | Path | None = None,
    out_dir: str | Path,
    title: str | None = None,
    retain_model_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate the model saved in ``model_dir`` on MUSE and write ``out_dir`` (see the module docstring).

    ``is_retain``: this model *is* the retain model; its AUCs are written to
    ``reference_dir/reference.json`` and its PrivLeak is exactly 0. Otherwise the
    reference is read from there; ``retain_model_dir`` (optional) lets the read
    check that the retain model's weights did not change since. ``target_model_dir``:
    its outputs for the report's first ``cfg.report_examples`` prompts and questions.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = muse_cfg.examples
    k = muse_cfg.mink_k
    metrics: dict[str, float | None] = {key: None for key in METRIC_KEYS}
    notes: dict[str, str] = {}
    per_example: dict[str, list[dict]] = {}
    truncation: dict[str, Any] = {"max_length": int(max_length)}

    model, tokenizer = load_eval_model(model_dir, device)
    ensure_pad(tokenizer)
    gen_kw = dict(batch_size=cfg.batch_size, device=device, progress=progress)

    # ---- VerbMem and KnowMem
    if VERBMEM_FORGET in splits:
        rows = _cap(splits[VERBMEM_FORGET], n)
        res = verbmem(model, tokenizer, rows, max_new_tokens=muse_cfg.verbmem_max_new_tokens, **gen_kw)
        metrics["verbmem_forget"] = res.score
        per_example[VERBMEM_FORGET] = res.records
        notes[f"{VERBMEM_FORGET}_truncation"] = _cut_note(VERBMEM_FORGET, res, len(rows))
        truncation[VERBMEM_FORGET] = {"prompts_cut": res.prompts_cut, "rows": len(rows)}
        if res.score is None:
            notes["verbmem_forget"] = f"not computed: {VERBMEM_FORGET} has no rows"
    else:
        notes["verbmem_forget"] = f"not computed: split {VERBMEM_FORGET} missing"
    for key, split, icl_split in (("knowmem_forget", KNOWMEM_FORGET, KNOWMEM_FORGET_ICL),
                                  ("knowmem_retain", KNOWMEM_RETAIN, KNOWMEM_RETAIN_ICL)):
        if split not in splits:
            notes[key] = f"not computed: split {split} missing"
            continue
        rows = _cap(splits[split], n)
        icl = list(splits.get(icl_split, []))
        if icl_split not in splits:
            notes[f"{key}_icl"] = f"split {icl_split} missing: {key} asked zero-shot (MUSE prepends few-shot examples)"
        res = knowmem(model, tokenizer, rows, icl, max_new_tokens=muse_cfg.knowmem_max_new_tokens, **gen_kw)
        metrics[key] = res.score
        per_example[split] = res.records
        notes[f"{split}_truncation"] = _cut_note(split, res, len(rows))
        truncation[split] = {"prompts_cut": res.prompts_cut, "rows": len(rows)}
        if res.score is None:
            notes[key] = f"not computed: {split} has no rows"

    # ---- membership inference and PrivLeak
    mia_scores: dict[str, dict[str, np.ndarray]] = {}
    aucs: dict[str, float] | None = None
    if PRIVLEAK_FORGET in splits and PRIVLEAK_HOLDOUT in splits:
        f_rows, h_rows = _cap(splits[PRIVLEAK_FORGET], n), _cap(splits[PRIVLEAK_HOLDOUT], n)
        cut_notes = []
        for side, split, rows in (("forget", PRIVLEAK_FORGET, f_rows), ("holdout", PRIVLEAK_HOLDOUT, h_rows)):
            scores, records, n_cut = _mia_split(model, tokenizer, rows, max_length=max_length, k=k,
                                                batch_size=cfg.batch_size, device=device, progress=progress,
                                                desc=f"MIA {split}")
            mia_scores[side] = scores
            per_example[split] = records
            truncation[split] = {"texts_cut": n_cut, "rows": len(rows)}
            cut_notes.append(f"{split}: {n_cut}/{len(rows)} articles cut at max_length {max_length}")
        notes["privleak_truncation"] = "; ".join(cut_notes) + (
            " (MIA scores their first max_length - 1 tokens)" if any(
                truncation[s]["texts_cut"] for s in (PRIVLEAK_FORGET, PRIVLEAK_HOLDOUT)) else "")
        aucs, drop_note = _aucs(mia_scores["forget"], mia_scores["holdout"])
        if drop_note:
            notes["mia"] = drop_note
        for a in ATTACKS:
            metrics[f"mia_auc_{metric_suffix(a)}"] = nan_to_none(aucs[a])
            if metrics[f"mia_auc_{metric_suffix(a)}"] is None:
                notes[f"mia_auc_{metric_suffix(a)}"] = f"not computed: {drop_note}"

        if is_retain:
            path = write_reference(reference_dir, retain_model=model_files_hash(model_dir), forget_rows=f_rows,
                                   holdout_rows=h_rows, max_length=max_length, k=k, aucs=aucs, model_dir=model_dir)
            log.info("retain MIA reference written to %s", path)
            ref, ref_note = aucs, f"this is the retain model: its AUCs are the reference ({path})"
        else:
            known = None
            if retain_model_dir is not None and weight_files(retain_model_dir):
                known = model_files_hash(retain_model_dir)
            ref, ref_note = read_reference(reference_dir, forget_rows=f_rows, holdout_rows=h_rows,
                                           max_length=max_length, k=k, retain_model=known)
        if ref is None:
            for a in ATTACKS:
                notes[f"privleak_{metric_suffix(a)}"] = f"not computed: {ref_note}"
        else:
            notes["privleak_reference"] = ref_note
            for a in ATTACKS:
                v = privleak(aucs[a], ref[a])
                metrics[f"privleak_{metric_suffix(a)}"] = nan_to_none(v)
                if math.isnan(v):
                    notes[f"privleak_{metric_suffix(a)}"] = (f"not computed: AUC {nan_to_none(aucs[a])} against a retain AUC of "
                                              f"{nan_to_none(ref[a])} (PrivLeak divides by it)")
    else:
        missing = [s for s in (PRIVLEAK_FORGET, PRIVLEAK_HOLDOUT) if s not in splits]
        for a in ATTACKS:
            notes[f"mia_auc_{metric_suffix(a)}"] = f"not computed: split(s) {', '.join(missing)} missing"
            notes[f"privleak_{metric_suffix(a)}"] = notes[f"mia_auc_{metric_suffix(a)}"]
    metrics["privleak"] = metrics[f"privleak_{metric_suffix(muse_cfg.privleak_attack)}"]
    if metrics["privleak"] is None:
        notes["privleak"] = notes.get(f"privleak_{metric_suffix(muse_cfg.privleak_attack)}", "not computed")
    del model

    # ---- the target model's outputs for the report
    target_outputs: dict[str, dict] | None = None
    if target_model_dir is not None and cfg.report_examples > 0:
        m = cfg.report_examples
        tmodel, ttok = load_eval_model(target_model_dir, device)
        ensure_pad(ttok)
        target_outputs = {}
        if VERBMEM_FORGET in per_example:
            res = verbmem(tmodel, ttok, _cap(splits[VERBMEM_FORGET], n)[:m],
                          max_new_tokens=muse_cfg.verbmem_max_new_tokens, **gen_kw)
            target_outputs[VERBMEM_FORGET] = {r["id"]: r["generation"] for r in res.records}
        for split, icl_split in ((KNOWMEM_FORGET, KNOWMEM_FORGET_ICL), (KNOWMEM_RETAIN, KNOWMEM_RETAIN_ICL)):
            if split in per_example:
                res = knowmem(tmodel, ttok, _cap(splits[split], n)[:m], list(splits.get(icl_split, [])),
                              max_new_tokens=muse_cfg.knowmem_max_new_tokens, **gen_kw)
                target_outputs[split] = {r["id"]: r["generation"] for r in res.records}
        del tmodel
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # ---- files
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
    (out_dir / "notes.json").write_text(json.dumps(notes, indent=2, ensure_ascii=False) + "\n")
    with open(out_dir / "per_example.jsonl", "w") as f:
        for split, recs in per_example.items():
            for rec in recs:
                f.write(json.dumps({"split": split, **rec}, ensure_ascii=False, default=_json_default) + "\n")
    write_muse_report(out_dir, title=title or f"MUSE evaluation: {Path(model_dir).name}", metrics=metrics,
                      notes=notes, privleak_attack=muse_cfg.privleak_attack, mia_scores=mia_scores,
                      per_example=per_example, target_outputs=target_outputs, n_examples=cfg.report_examples)
    roles = {s: s for s in (VERBMEM_FORGET, KNOWMEM_FORGET, KNOWMEM_RETAIN, PRIVLEAK_FORGET, PRIVLEAK_HOLDOUT)
             if s in splits}
    return EvalResult(metrics=metrics, notes=notes, per_example=per_example, forget_split=VERBMEM_FORGET,
                      roles=roles, truncation=truncation)
