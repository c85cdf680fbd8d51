"""TOFU evaluation, one module per job.

``pair_stats`` (per-pair NLL and memorisation from the one teacher-forced pass,
:mod:`unlearn.models.teacher_forced`), ``generation`` (greedy answers, ROUGE-L),
``tofu_metrics`` (per-split scores, truth ratio, forget quality, model utility),
``reference_store`` (the retain model's stored truth ratios), ``loading`` (a
saved model + tokenizer for evaluation), ``runner`` (a model directory in,
``metrics.json`` and the report out) and ``report`` (Markdown/HTML/PNG).
"""

from .generation import generate_answers
from .loading import load_eval_model
from .pair_stats import PairStats, teacher_forced_stats
from .reference_store import reference_key, retain_reference
from .report import write_report
from .runner import evaluate_dir
from .tofu_metrics import EvalResult, evaluate_model

__all__ = [
    "EvalResult",
    "PairStats",
    "evaluate_dir",
    "evaluate_model",
    "generate_answers",
    "load_eval_model",
    "reference_key",
    "retain_reference",
    "teacher_forced_stats",
    "write_report",
]
