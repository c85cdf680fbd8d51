"""Benchmarks behind one interface: what the pipeline needs from TOFU and MUSE.

The stages (:mod:`unlearn.stages`) are benchmark-agnostic: they ask the configured
benchmark (``params.yaml``: ``benchmark``) for its splits, its validation, the rows
each model trains on, the unlearning inputs, the evaluation and the names of the
metrics the registration gate reads. A second benchmark is a new module here and
one line in :data:`BENCHMARKS`, not ``if benchmark == ...`` branches in the stages.
"""

from __future__ import annotations

from ..gate import GateMetrics
from .base import Benchmark, EncodedInputs, ForgetInputs
from .muse import MUSE
from .tofu import TOFU

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (TOFU(), MUSE())}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered under ``name`` (a ConfigError naming the known ones otherwise)."""
    from ..config import ConfigError

    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ConfigError(f"benchmark: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None


__all__ = ["BENCHMARKS", "Benchmark", "EncodedInputs", "ForgetInputs", "GateMetrics", "MUSE", "TOFU", "get_benchmark"]
