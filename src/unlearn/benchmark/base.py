"""The benchmark protocol: the seams between a benchmark's data/metrics and the generic pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..config import Params
from ..gate import GateMetrics


@dataclass(frozen=True)
class ForgetInputs:
    """What unlearning consumes: the rows to forget, the rows to keep, and refusal strings (DPO-IdK)."""

    forget: list[dict]
    retain: list[dict]
    refusals: list[str]


@runtime_checkable
class Benchmark(Protocol):
    """What a benchmark provides to the stages. Every method reads the splits the prepare stage wrote."""

    name: str
    gate_metrics: GateMetrics

    def load(self, p: Params) -> dict[str, Any]:
        """Every split from the configured source (synthetic | local | hub), validated row by row."""

    def validate(self, p: Params, tokenizer, tokenizer_source: str):
        """The data gate on the written splits (a report with ``success``, ``to_dict()`` and ``render()``)."""

    def corpus_texts(self, splits: dict[str, list[dict]]) -> list[str]:
        """Every string a model will see (the tokenizer's training corpus)."""

    def training_rows(self, p: Params, role: str) -> list[dict]:
        """The rows the ``target`` (everything) or ``retain`` (never the forget set) model trains on."""

    def forget_inputs(self, p: Params) -> ForgetInputs:
        """The unlearning inputs of the configured forget split."""

    def evaluate(self, p: Params, model_path: str | Path, name: str, *, retain_dir: Path | None,
                 target_dir: Path | None, out_dir: Path, reference_dir: Path):
        """Evaluate a saved model; writes metrics.json and a report into ``out_dir``; returns the result."""
