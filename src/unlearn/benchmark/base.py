"""The benchmark protocol: the seams between a benchmark's data/metrics and the generic pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..config import Params
from ..gate import GateMetrics
from ..models.formatting import Encoded


@dataclass(frozen=True)
class ForgetInputs:
    """What unlearning consumes: the rows to forget, the rows to keep, and refusal strings (DPO-IdK)."""

    forget: list[dict]
    retain: list[dict]
    refusals: list[str]


@dataclass(frozen=True)
class EncodedInputs:
    """The unlearning inputs as token ids: what the cache and the forget loop consume.

    ``forget[i]`` and ``idk[i]`` belong together (the refusal answer to forget row i,
    DPO-IdK); ``idk`` is empty for a benchmark without questions (MUSE's raw text),
    and a method that needs refusals then fails with the reason.
    """

    forget: list[Encoded]
    retain: list[Encoded]
    idk: list[Encoded]


@runtime_checkable
class Benchmark(Protocol):
    """What a benchmark provides to the stages. Every method reads the splits the prepare stage wrote."""

    name: str
    gate_metrics: GateMetrics
    eval_files: tuple[str, ...]
    """What an evaluation writes into its output directory (the stage's declared outputs)."""
    summary_columns: tuple[str, ...]
    """The columns of ``unlearn summary``."""
    validate_code: tuple[str, ...]
    """The data gate's source files."""
    extra_params: dict[str, tuple[str, ...]]
    """Params a stage reads beyond the ones every benchmark's stage reads (stage -> dotted keys, as dvc.yaml lists them)."""

    def load(self, p: Params) -> dict[str, Any]:
        """Every split from the configured source (synthetic | local | hub), validated row by row."""

    def validate(self, p: Params, tokenizer, tokenizer_source: str):
        """The data gate on the written splits (a report with ``success``, ``to_dict()`` and ``render()``)."""

    def corpus_texts(self, splits: dict[str, list[dict]], fmt: Any = None) -> list[str]:
        """Every string a model will see (the tokenizer's training corpus)."""

    def training_rows(self, p: Params, role: str) -> list[dict]:
        """The rows the ``target`` (everything) or ``retain`` (never the forget set) model trains on."""

    def forget_inputs(self, p: Params) -> ForgetInputs:
        """The unlearning inputs of the configured forget split."""

    def split_groups(self, p: Params) -> tuple[list[str], list[str]]:
        """(the splits the forget set is made of, the splits its retain set is made of): what the run's data
        hashes, forget-set identity and row count are computed from."""

    def encode_inputs(self, p: Params, tokenizer, inputs: ForgetInputs) -> EncodedInputs:
        """``inputs`` as the examples the loop trains on (QA rows: answer tokens; raw text: chunks of every token)."""

    def training_examples(self, p: Params, role: str, tokenizer) -> list[Encoded]:
        """The encoded examples the ``target`` or ``retain`` model trains on (:meth:`training_rows`, encoded)."""

    def memorisation(self, p: Params, model, tokenizer) -> dict[str, float]:
        """``forget_prob`` / ``retain_prob``: mean length-normalised probability of the forget and retain examples."""

    def slice_probes(self, p: Params, tokenizer) -> dict[str, Any]:
        """The benchmark's own statistics for evaluations during training: ``{name: probe(model) -> float}`` on
        a fixed slice of ``method.eval_rows`` rows (logged as ``eval_<name>``; a selection rule may compare one
        with the retain model's). Forget and retain probabilities are measured for every benchmark besides."""

    def evaluate(self, p: Params, model_path: str | Path, name: str, *, retain_dir: Path | None,
                 target_dir: Path | None, out_dir: Path, reference_dir: Path):
        """Evaluate a saved model; writes metrics.json and a report into ``out_dir``; returns the result."""
