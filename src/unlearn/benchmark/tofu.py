"""TOFU (Maini et al. 2024) behind the benchmark interface.

Fictitious-author QA pairs; forgetXX = the last XX % of the authors, retain(100-XX)
the rest; evaluation on the forget split's perturbed twin, the retain perturbed
split and the two general-knowledge sets (real authors, world facts), scored as
open-unlearning scores them (:mod:`unlearn.eval`), and privacy leakage: membership
AUCs of the forget rows against holdoutXX, authors no model (nor the tokenizer) ever
sees, and privleak against the retain model's AUC. The registration gate reads
forget quality (KS test against the retain model) and model utility.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Params
from ..models.formatting import Encoded
from ..models.template import PLAIN, QAFormat, eval_format, train_format
from .base import EncodedInputs, ForgetInputs, GateMetrics


class TOFU:
    """The TOFU benchmark: splits, data gate, training corpus, unlearning inputs, metrics."""

    name = "tofu"
    gate_metrics = GateMetrics(forget="forget_quality", utility="model_utility")
    eval_files: tuple[str, ...] = ("per_example.jsonl", "report.md", "report.html", "truth_ratio_hist.png", "notes.json", "metrics.json")
    """What an evaluation writes into its output directory."""
    summary_columns: tuple[str, ...] = ("forget_prob", "retain_prob", "forget_quality", "model_utility", "forget_rouge",
                                         "forget_truth_ratio", "privleak")
    """The columns of ``unlearn summary`` (the README's results table)."""
    validate_code: tuple[str, ...] = ("src/unlearn/data/validate.py",)
    extra_params: dict[str, tuple[str, ...]] = {
        stage: ("model.template",) for stage in ("tokenizer", "validate", "finetune", "cache", "forget", "evaluate")
    }
    """Params a stage reads beyond the ones every benchmark's stage reads (stage -> dotted keys): every stage
    that encodes a QA row reads its prompt format (MUSE trains and scores raw text)."""

    def load(self, p: Params) -> dict[str, Any]:
        from ..data.loaders import load_from_config

        return load_from_config(p.data)

    def validate(self, p: Params, tokenizer, tokenizer_source: str):
        from ..data.validate import run_validation

        return run_validation(p, tokenizer=tokenizer, tokenizer_source=tokenizer_source)

    def corpus_texts(self, splits: dict[str, list[dict]], fmt: QAFormat = PLAIN) -> list[str]:
        """Questions (in the prompt format ``fmt``) with answers, paraphrases and perturbations.

        The holdout splits are left out: they are the non-members of the privacy-leakage
        test, so nothing a model is built from (its tokenizer included) may have seen them.
        """
        from ..data.names import HOLDOUT_SPLITS
        texts = []
        for name, rows in splits.items():
            if name in HOLDOUT_SPLITS:
                continue
            for r in rows:
                texts.append(fmt.corpus_text(r["question"], r["answer"]))
                if r.get("paraphrased_answer"):
                    texts.append(r["paraphrased_answer"])
                texts.extend(r.get("perturbed_answer") or [])
        return texts

    def training_rows(self, p: Params, role: str) -> list[dict]:
        """Target: every author row; retain: the retain split only. Plus the general-knowledge sets if configured."""
        from ..data.names import FULL, UTILITY_SPLITS

        if role not in ("target", "retain"):
            raise ValueError(f"role must be 'target' or 'retain', got {role!r}")
        main = FULL if role == "target" else p.data.retain_split
        names = [main] + (list(UTILITY_SPLITS) if p.finetune.include_general else [])
        splits = _read(p, names)
        return [r for n in names for r in splits[n]]

    def forget_inputs(self, p: Params) -> ForgetInputs:
        """The forget and retain splits, and the ``idk`` refusals where the manifest lists them.

        Request split sets carry no ``idk`` split: the built-in refusals are used then.
        """
        from ..data.names import IDK
        from ..data.splits import read_idk, read_manifest
        from ..data.synthetic import IDK_RESPONSES

        forget, retain = p.data.forget_split, p.data.retain_split
        splits = _read(p, [forget, retain])
        out = Path(p.data.out_dir)
        refusals = read_idk(out) if IDK in read_manifest(out) else list(IDK_RESPONSES)
        return ForgetInputs(splits[forget], splits[retain], refusals)

    def split_groups(self, p: Params) -> tuple[list[str], list[str]]:
        return [p.data.forget_split], [p.data.retain_split]

    def encode_inputs(self, p: Params, tokenizer, inputs: ForgetInputs) -> EncodedInputs:
        """Answer tokens labelled (prompt masked); row i's refusal drawn as :func:`unlearn.cache.idk_answers` draws it."""
        from ..cache import idk_answers
        from ..models.formatting import encode_many

        L, fq, fmt = p.model.max_length, [r["question"] for r in inputs.forget], train_format(p)
        return EncodedInputs(
            forget=encode_many(tokenizer, fq, [r["answer"] for r in inputs.forget], L, fmt=fmt),
            retain=encode_many(tokenizer, [r["question"] for r in inputs.retain], [r["answer"] for r in inputs.retain], L,
                               fmt=fmt),
            idk=encode_many(tokenizer, fq, idk_answers(len(inputs.forget), inputs.refusals, p.seed), L, fmt=fmt),
        )

    def training_examples(self, p: Params, role: str, tokenizer) -> list[Encoded]:
        from ..models.formatting import encode_many

        rows = self.training_rows(p, role)
        return encode_many(tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows], p.model.max_length,
                           fmt=train_format(p))

    def slice_probes(self, p: Params, tokenizer) -> dict[str, Any]:
        """None beyond the forget and retain probabilities (TOFU's selection rule compares the first)."""
        return {}

    def memorisation(self, p: Params, model, tokenizer) -> dict[str, float]:
        """Mean length-normalised answer probability on the forget and retain splits (400 rows at most each).

        The target must memorise its data (forget prob close to 1); the retain model
        never saw the forget authors, so its forget prob must be low.
        """
        import random

        import numpy as np

        from ..models.scoring import length_normalised_prob, score_answers

        splits = _read(p, [p.data.forget_split, p.data.retain_split])
        out = {}
        for key, name in (("forget_prob", p.data.forget_split), ("retain_prob", p.data.retain_split)):
            rows = splits[name]
            if len(rows) > 400:  # a stable subsample is enough for a summary
                rows = random.Random(0).sample(rows, 400)
            nll, n = score_answers(model, tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows],
                                   p.model.max_length, fmt=train_format(p))
            out[key] = float(np.mean(length_normalised_prob(nll, n)))
        return out

    def eval_splits(self, p: Params) -> tuple[str, list[str]]:
        """(the forget split scored, every split an evaluation reads): the holdout split paired with the
        forget split (holdoutXX, the non-members of the membership-inference AUCs) last, when there is one."""
        from ..data.names import RETAIN_PERTURBED, UTILITY_SPLITS, holdout_of, perturbed_of

        forget, holdout = perturbed_of(p.data.forget_split), holdout_of(p.data.forget_split)
        return forget, [forget, RETAIN_PERTURBED, *UTILITY_SPLITS, *([holdout] if holdout else [])]

    def evaluate(self, p: Params, model_path: str | Path, name: str, *, retain_dir: Path | None,
                 target_dir: Path | None, out_dir: Path, reference_dir: Path):
        from ..data.names import holdout_of
        from ..data.splits import read_manifest
        from ..eval.runner import evaluate_dir

        forget, names = self.eval_splits(p)
        holdout = holdout_of(p.data.forget_split)
        if holdout is not None and holdout not in read_manifest(Path(p.data.out_dir)):
            names.remove(holdout)  # splits prepared before the holdout splits existed: MIA metrics None, with a note
        return evaluate_dir(
            model_path, splits=_read(p, names), forget_split=forget, max_length=p.model.max_length,
            cfg=p.eval, retain_model_dir=retain_dir, target_model_dir=target_dir, out_dir=out_dir,
            title=f"TOFU evaluation: {name} ({forget})", reference_dir=reference_dir, holdout_split=holdout,
            fmt=eval_format(p),
        )


def _read(p: Params, names: list[str]) -> dict[str, list[dict]]:
    """The validated splits ``names`` of ``data.out_dir`` (the data layer's one reader)."""
    from ..data.splits import read_split_dir

    return read_split_dir(Path(p.data.out_dir), names)
