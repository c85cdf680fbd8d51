"""The study's cells and the tuning choice: pure functions of the spec and of finished runs' metrics.

A *cell* is one run: an unlearning run evaluated on the benchmark (phases ``tune``, ``test``,
``ablation``) or the evaluation of a reference model (``reference``: the target and the retain model of a
world and split). Its ``key`` is a content address of everything that changes its numbers: the base params
file's text, every override it runs with (study, world, split, configuration, seed, ablation), the
reference mode and, for test cells, the relearning attack's settings. A finished run with the same key is
never redone (the store is the checkpoint); a changed input gives a new key and a new run. Code changes do
not change keys: a study run on new code is a new study name.

Phases depend on each other only through :func:`choose`: test and ablation cells exist once every tuning
cell of their method has finished.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..io import stable_hash
from .spec import StudySpec, Value

PHASES = ("reference", "tune", "test", "ablation")
REFERENCE_MODELS = ("target", "retain")


@dataclass(frozen=True)
class Cell:
    """One run of the study. ``config``: the knobs tuned (``method.lr`` ...); ``extra``: an ablation's overrides."""

    phase: str
    world: str
    split: str
    method: str
    seed: int
    config: tuple[tuple[str, Value], ...] = ()
    ablation: str = ""
    extra: tuple[tuple[str, Value], ...] = ()
    reference: str = "cache"
    key: str = field(default="", compare=False)

    @property
    def config_dict(self) -> dict[str, Value]:
        return dict(self.config)

    @property
    def config_id(self) -> str:
        return stable_hash(dict(self.config))[:10]

    def overrides(self) -> list[str]:
        """The cell's own ``--set`` overrides (after the study's and the world's)."""
        out = [f"data.forget_split={self.split}", f"seed={self.seed}"]
        if self.phase != "reference":
            out.append(f"method.name={self.method}")
        out += [f"{k}={_yaml(v)}" for k, v in (*self.config, *self.extra)]
        return out

    def label(self) -> str:
        bits = [self.phase, self.world, self.split, self.method]
        if self.ablation:
            bits.append(self.ablation)
        if self.config:
            bits.append(self.config_id)
        return "/".join(bits) + f"/seed{self.seed}"


def _yaml(v: Value) -> str:
    return json.dumps(v) if isinstance(v, str) else repr(v) if isinstance(v, float) else str(v).lower() \
        if isinstance(v, bool) else str(v)


def cell_overrides(spec: StudySpec, cell: Cell) -> list[str]:
    """Every override a cell runs with, in order: the study's, the world's, then the cell's."""
    return [*spec.overrides, *spec.worlds[cell.world], *cell.overrides()]


def keyed(spec: StudySpec, cell: Cell, base_params_text: str) -> Cell:
    """``cell`` with its content key (see the module docstring)."""
    content: dict[str, Any] = {"base": stable_hash(base_params_text), "overrides": cell_overrides(spec, cell),
                               "phase": cell.phase, "reference": cell.reference}
    if cell.phase == "reference":
        content["model"] = cell.method
    if cell.phase == "test" and spec.relearn.enabled:
        content["relearn"] = spec.relearn.model_dump()
    if cell.phase in ("test", "ablation"):
        content["trajectory_every"] = spec.trajectory_every
    return Cell(**{**cell.__dict__, "key": stable_hash(content)[:16]})


def method_grid(spec: StudySpec, method: str) -> list[dict[str, Value]]:
    """Every configuration of ``method``'s search space: the shared knobs x its strength knobs, in a fixed order."""
    space = {**spec.tuning.shared, **spec.tuning.strength.get(method, {})}
    keys = sorted(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def tuning_configs(spec: StudySpec, method: str) -> list[dict[str, Value]]:
    """The ``tuning.budget`` configurations ``method`` is tried with: its whole grid when that is no larger,
    else a draw without replacement seeded by ``tuning.seed`` and the method's name (reproducible, and
    independent of which other methods the study lists)."""
    grid = method_grid(spec, method)
    if len(grid) <= spec.tuning.budget:
        return grid
    picks = sorted(random.Random(f"{spec.tuning.seed}:{method}").sample(range(len(grid)), spec.tuning.budget))
    return [grid[i] for i in picks]


def _items(config: Mapping[str, Value]) -> tuple[tuple[str, Value], ...]:
    return tuple(sorted(config.items()))


def reference_cells(spec: StudySpec) -> list[Cell]:
    """The target and retain model of the validation world's tuning split and of every tested split."""
    pairs = [] if spec.tuning.from_spec else [("validation", spec.tuning.split)]
    pairs += [("test", s) for s in spec.splits]
    if spec.ablations and spec.ablation_split not in spec.splits:
        pairs.append(("test", spec.ablation_split))
    return [Cell("reference", w, s, m, 0) for w, s in dict.fromkeys(pairs) for m in REFERENCE_MODELS]


def tune_cells(spec: StudySpec) -> list[Cell]:
    """Every method's tuning configurations in the validation world (none when the choice is reused)."""
    if spec.tuning.from_spec:
        return []
    return [Cell("tune", "validation", spec.tuning.split, m, spec.tuning.seed_of_runs, _items(c))
            for m in spec.methods for c in tuning_configs(spec, m)]


def test_cells(spec: StudySpec, chosen: Mapping[str, Mapping[str, Value]]) -> list[Cell]:
    """Every method at its chosen configuration, on every tested split and seed (methods not chosen yet: none)."""
    return [Cell("test", "test", s, m, seed, _items(chosen[m]))
            for m in spec.methods if m in chosen for s in spec.splits for seed in spec.seeds]


def ablation_cells(spec: StudySpec, chosen: Mapping[str, Mapping[str, Value]]) -> list[Cell]:
    """DiPO's variants, each from DiPO's chosen configuration, on ``ablation_split``, every seed."""
    if "dipo" not in chosen:
        return []
    return [Cell("ablation", "test", spec.ablation_split, "dipo", seed, _items(chosen["dipo"]), a.name,
                 _items(a.overrides), a.reference)
            for a in spec.ablations for seed in spec.seeds]


# --------------------------------------------------------------------------- the tuning choice
@dataclass(frozen=True)
class Choice:
    """A method's chosen configuration and why: its validation numbers and whether it kept utility."""

    config: dict[str, Value]
    forget_quality: float
    utility_ratio: float
    kept_utility: bool
    tried: int


def choose(results: Sequence[tuple[Mapping[str, Value], Mapping[str, float]]], target_utility: float,
           min_utility_ratio: float) -> Choice | None:
    """The ``gate`` criterion on validation results ``[(config, metrics)]`` (see :class:`spec.Criterion`).

    Ties are broken by the higher utility ratio, then by the configuration's order in the grid (the first).
    Configurations whose forget quality or utility is missing (NaN) are never chosen while another is valid.
    """
    rows = []
    for i, (config, m) in enumerate(results):
        fq, mu = m.get("forget_quality"), m.get("model_utility")
        if fq is None or mu is None or not math.isfinite(fq) or not math.isfinite(mu):
            continue
        ratio = mu / target_utility if target_utility else float("nan")
        rows.append((i, dict(config), float(fq), float(ratio) if math.isfinite(ratio) else float("-inf")))
    if not rows:
        return None
    keep = [r for r in rows if r[3] >= min_utility_ratio]
    if keep:
        best = max(keep, key=lambda r: (r[2], r[3], -r[0]))
    else:
        best = max(rows, key=lambda r: (r[3], r[2], -r[0]))
    return Choice(best[1], best[2], best[3], bool(keep), len(results))


def chosen_configs(spec: StudySpec, tune_runs: Iterable[Mapping[str, Any]],
                   target_utility: float | None) -> dict[str, Choice]:
    """Each method's :class:`Choice` from its finished tuning runs; only methods whose every tuning cell has
    finished are chosen (a partial search would not be the budget every method gets).

    ``tune_runs``: ``{"method", "config": {...}, "metrics": {...}}`` per finished tuning run.
    """
    if target_utility is None:
        return {}
    by_method: dict[str, list[tuple[dict, dict]]] = {}
    for r in tune_runs:
        by_method.setdefault(r["method"], []).append((dict(r["config"]), dict(r["metrics"])))
    out = {}
    for m in spec.methods:
        planned = tuning_configs(spec, m)
        got = {_items(c): met for c, met in by_method.get(m, [])}
        if not all(_items(c) in got for c in planned):
            continue
        choice = choose([(c, got[_items(c)]) for c in planned], target_utility, spec.criterion.min_utility_ratio)
        if choice is not None:
            out[m] = choice
    return out


def base_text(spec: StudySpec) -> str:
    path = Path(spec.params)
    return path.read_text() if path.exists() else ""
