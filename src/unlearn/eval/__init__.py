"""TOFU evaluation: metrics (``tofu``) and the Markdown/HTML/PNG report (``report``)."""

from .report import write_report
from .tofu import (
    EvalResult,
    PairStats,
    evaluate_dir,
    evaluate_model,
    generate_answers,
    load_model,
    reference_key,
    retain_reference,
    teacher_forced_stats,
)

__all__ = [
    "EvalResult",
    "PairStats",
    "evaluate_dir",
    "evaluate_model",
    "generate_answers",
    "load_model",
    "reference_key",
    "retain_reference",
    "teacher_forced_stats",
    "write_report",
]
