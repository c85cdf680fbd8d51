"""TOFU (Maini et al. 2024) behind the benchmark interface.

Fictitious-author QA pairs; forgetXX = the last XX % of the authors, retain(100-XX)
the rest; evaluation on the forget split's perturbed twin, the retain perturbed
split and the two general-knowledge sets (real authors, world facts), scored as
open-unlearning scores them (:mod:`unlearn.eval`). The registration gate reads
forget quality (KS test against the retain model) and model utility.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Params
from .base import ForgetInputs, GateMetrics


class TOFU:
    """The TOFU benchmark: splits, data gate, training corpus, unlearning inputs, metrics."""

    name = "tofu"
    gate_metrics = GateMetrics(forget="forget_quality", utility="model_utility")

    def load(self, p: Params) -> dict[str, Any]:
        from ..data.loaders import load_from_config

        return load_from_config(p.data)

    def validate(self, p: Params, tokenizer, tokenizer_source: str):
        from ..data.validate import run_validation

        return run_validation(p, tokenizer=tokenizer, tokenizer_source=tokenizer_source)

    def corpus_texts(self, splits: dict[str, list[dict]]) -> list[str]:
        """Questions (in the prompt template) with answers, paraphrases and perturbations."""
        from ..models.formatting import format_answer, format_prompt

        texts = []
        for rows in splits.values():
            for r in rows:
                texts.append(format_prompt(r["question"]) + format_answer(r["answer"]))
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

    def eval_splits(self, p: Params) -> tuple[str, list[str]]:
        """(the forget split scored, every split an evaluation reads)."""
        from ..data.names import RETAIN_PERTURBED, UTILITY_SPLITS, perturbed_of

        forget = perturbed_of(p.data.forget_split)
        return forget, [forget, RETAIN_PERTURBED, *UTILITY_SPLITS]

    def evaluate(self, p: Params, model_path: str | Path, name: str, *, retain_dir: Path | None,
                 target_dir: Path | None, out_dir: Path, reference_dir: Path):
        from ..eval.runner import evaluate_dir

        forget, names = self.eval_splits(p)
        return evaluate_dir(
            model_path, splits=_read(p, names), forget_split=forget, max_length=p.model.max_length,
            cfg=p.eval, retain_model_dir=retain_dir, target_model_dir=target_dir, out_dir=out_dir,
            title=f"TOFU evaluation: {name} ({forget})", reference_dir=reference_dir,
        )


def _read(p: Params, names: list[str]) -> dict[str, list[dict]]:
    """The validated splits ``names`` of ``data.out_dir`` (the data layer's one reader)."""
    from ..data.splits import read_split_dir

    return read_split_dir(Path(p.data.out_dir), names)
