"""MUSE (Shi et al. 2024, "Machine Unlearning Six-Way Evaluation") behind the benchmark interface.

MUSE unlearns raw text (news articles) instead of QA pairs. The prepared dataset
holds four disjoint folds of articles (fold1 is the forget set of the plain run),
the membership-inference sets (``privleak_forget`` ⊂ fold1, ``privleak_retain``
always trained on, ``privleak_holdout`` never), continuation prompts cut from
forget articles (VerbMem) and QA about forget and retain articles (KnowMem).

* The target trains on every fold plus ``privleak_retain``; the retain model on
  the retain text of the configured forget set: the folds after the last one
  forgotten, plus ``privleak_retain`` (:func:`unlearn.data.names.muse_retain_folds`).
  MUSE's raw retain corpora are not public, so later folds stand in for them.
* Every model and unlearning run trains on text chunks of ``model.max_length``
  tokens (:func:`unlearn.models.formatting.encode_text_chunks`): every token is an
  "answer" token, so every method (but DPO-IdK, which needs questions) runs unchanged.
* ``privleak_holdout`` is in no training set (the tokenizer's corpus has it: :meth:`MUSE.corpus_texts`).
* The registration gate reads PrivLeak (``|privleak| <= gate.max_abs_privleak``)
  and KnowMem on the retain QA (``>= gate.min_utility_ratio`` x the target's).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ..config import Params
from ..data.names import (
    KNOWMEM_FORGET,
    KNOWMEM_FORGET_ICL,
    KNOWMEM_RETAIN,
    KNOWMEM_RETAIN_ICL,
    MUSE_FOLDS,
    PRIVLEAK_FORGET,
    PRIVLEAK_HOLDOUT,
    PRIVLEAK_RETAIN,
    VERBMEM_FORGET,
    muse_folds,
    muse_retain_folds,
)
from ..models.formatting import Encoded
from .base import EncodedInputs, ForgetInputs, GateMetrics

EVAL_SPLITS: tuple[str, ...] = (VERBMEM_FORGET, KNOWMEM_FORGET, KNOWMEM_FORGET_ICL, KNOWMEM_RETAIN, KNOWMEM_RETAIN_ICL,
                                PRIVLEAK_FORGET, PRIVLEAK_HOLDOUT, PRIVLEAK_RETAIN)
"""Every split a MUSE evaluation reads."""

MEMORISATION_CHUNKS = 400
"""At most this many chunks per side are scored for the forget/retain probability summary (a stable sample)."""


class MUSE:
    """The MUSE-News benchmark: article folds, the MUSE data gate, chunked training text, MUSE's metrics."""

    name = "muse"
    gate_metrics = GateMetrics(forget="privleak", utility="knowmem_retain", forget_rule="abs_max")
    eval_files: tuple[str, ...] = ("per_example.jsonl", "report.md", "report.html", "mia_hist.png", "notes.json", "metrics.json")
    """What an evaluation writes into its output directory."""
    summary_columns: tuple[str, ...] = ("forget_prob", "retain_prob", "verbmem_forget", "knowmem_forget",
                                         "knowmem_retain", "privleak", "mia_auc_min_k")
    """The columns of ``unlearn summary`` (the README's results table)."""
    validate_code: tuple[str, ...] = ("src/unlearn/data/validate.py", "src/unlearn/data/muse_validate.py")
    extra_params: dict[str, tuple[str, ...]] = {
        "prepare": ("muse.synthetic",), "validate": ("muse.eval.verbmem_max_new_tokens",), "evaluate": ("muse.eval",),
    }
    """Params a stage reads beyond the ones every benchmark's stage reads (stage -> dotted keys)."""

    def load(self, p: Params) -> dict[str, Any]:
        from ..data.muse_loaders import load_muse

        return load_muse(p.data, p.muse.synthetic, p.muse.max_articles)

    def validate(self, p: Params, tokenizer, tokenizer_source: str):
        from ..data.muse_validate import run_muse_validation

        return run_muse_validation(p, tokenizer=tokenizer, tokenizer_source=tokenizer_source)

    def corpus_texts(self, splits: dict[str, list[dict]], fmt: Any = None) -> list[str]:
        """Every article, the holdout ones included, and the KnowMem QA (in the prompt template).

        The tokenizer is a fixed vocabulary, like a pretrained model's: fitted on the
        members only, it would cut the holdout articles into more, rarer tokens, and a
        membership-inference attack would then measure the tokenizer rather than the
        model (measured: the retain model, which saw neither set, scored AUC 0.19
        instead of about 0.5). No *model* ever trains on the holdout articles.
        """
        texts: list[str] = []
        for rows in splits.values():
            for r in rows:
                if "text" in r:
                    texts.append(r["text"])
                elif "question" in r:
                    texts.append(f"Question: {r['question']}\nAnswer: {r['answer']}")
        return texts

    # ------------------------------------------------------------------ what each model trains on
    def split_groups(self, p: Params) -> tuple[list[str], list[str]]:
        fs = p.data.forget_split
        return muse_folds(fs), [*muse_retain_folds(fs), PRIVLEAK_RETAIN]

    def training_rows(self, p: Params, role: str) -> list[dict]:
        """Target: every fold and ``privleak_retain``; retain: the retain text of ``data.forget_split``."""
        if role not in ("target", "retain"):
            raise ValueError(f"role must be 'target' or 'retain', got {role!r}")
        names = [*MUSE_FOLDS, PRIVLEAK_RETAIN] if role == "target" else self.split_groups(p)[1]
        splits = _read(p, names)
        return [r for n in names for r in splits[n]]

    def training_examples(self, p: Params, role: str, tokenizer) -> list[Encoded]:
        from ..models.formatting import encode_text_chunks

        return encode_text_chunks(tokenizer, [r["text"] for r in self.training_rows(p, role)], p.model.max_length)

    def forget_inputs(self, p: Params) -> ForgetInputs:
        """The articles of the forgotten fold(s) and the retain text; raw text has no refusal answers."""
        forget_names, retain_names = self.split_groups(p)
        splits = _read(p, [*forget_names, *retain_names])
        return ForgetInputs([r for n in forget_names for r in splits[n]], [r for n in retain_names for r in splits[n]], [])

    def encode_inputs(self, p: Params, tokenizer, inputs: ForgetInputs) -> EncodedInputs:
        from ..models.formatting import encode_text_chunks

        L = p.model.max_length
        return EncodedInputs(forget=encode_text_chunks(tokenizer, [r["text"] for r in inputs.forget], L),
                             retain=encode_text_chunks(tokenizer, [r["text"] for r in inputs.retain], L), idk=[])

    def slice_probes(self, p: Params, tokenizer) -> dict[str, Any]:
        """``knowmem_forget``: KnowMem (the evaluation's metric, its few-shot prompt and answer cut) on the first
        ``method.eval_rows`` forget questions; what ``method.select=knowmem_at_retain`` compares."""
        from ..eval.muse_metrics import knowmem

        splits = _read(p, [KNOWMEM_FORGET, KNOWMEM_FORGET_ICL])
        rows, icl = splits[KNOWMEM_FORGET][:p.method.eval_rows], splits[KNOWMEM_FORGET_ICL]

        def knowmem_forget(model) -> float:
            res = knowmem(model, tokenizer, rows, icl, max_new_tokens=p.muse.eval.knowmem_max_new_tokens,
                          batch_size=p.eval.batch_size, device=next(model.parameters()).device)
            return float("nan") if res.score is None else float(res.score)

        return {"knowmem_forget": knowmem_forget}

    def memorisation(self, p: Params, model, tokenizer) -> dict[str, float]:
        """Mean per-chunk length-normalised probability of the forget and the retain text."""
        import numpy as np

        from ..models.scoring import length_normalised_prob, score_encoded

        enc = self.encode_inputs(p, tokenizer, self.forget_inputs(p))
        out = {}
        for key, chunks in (("forget_prob", enc.forget), ("retain_prob", enc.retain)):
            if len(chunks) > MEMORISATION_CHUNKS:
                chunks = random.Random(0).sample(chunks, MEMORISATION_CHUNKS)
            if not chunks:
                out[key] = None
                continue
            nll, n = score_encoded(model, chunks, tokenizer.pad_token_id)
            out[key] = float(np.mean(length_normalised_prob(nll, n)))
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, p: Params, model_path: str | Path, name: str, *, retain_dir: Path | None,
                 target_dir: Path | None, out_dir: Path, reference_dir: Path):
        from ..eval.muse_runner import evaluate_muse_dir

        is_retain = retain_dir is not None and Path(model_path).resolve() == Path(retain_dir).resolve()
        return evaluate_muse_dir(
            model_path, splits=_read(p, list(EVAL_SPLITS)), max_length=p.model.max_length, cfg=p.eval,
            muse_cfg=p.muse.eval, reference_dir=reference_dir, is_retain=is_retain, target_model_dir=target_dir,
            retain_model_dir=retain_dir,
            out_dir=out_dir, title=f"MUSE evaluation: {name} (forget {p.data.forget_split})",
        )


def _read(p: Params, names: list[str]) -> dict[str, list[dict]]:
    """The validated splits ``names`` of ``data.out_dir`` (the data layer's one reader)."""
    from ..data.splits import read_split_dir

    return read_split_dir(Path(p.data.out_dir), names)
