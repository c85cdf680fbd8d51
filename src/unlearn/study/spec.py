"""The evidence study's specification (``configs/study.yaml``): what is compared, how it is tuned, and on what.

A study is fixed before any of its test numbers are seen: the methods, the search space and budget each
method gets (the same count of configurations for every method), the criterion that picks a method's
configuration (read on the *validation* world, a different synthetic world than the one tested), the seeds,
the ablations of DiPO and the relearning attack. ``unlearn study run`` runs what the store does not hold
yet; ``unlearn study report`` writes ``docs/results.md`` from the store alone.

Every cell's params are the base params file plus, in order: the study's ``overrides``, the world's, the
split, the cell's configuration and its seed. Typed (pydantic, strict): an unknown key names itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UserError

Value = float | int | str | bool


class StudyError(UserError):
    """A bad study file: the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tuning(_Strict):
    """The search: each method's grid is ``shared`` x its ``strength`` knobs; ``budget`` configurations are
    drawn from it (the whole grid when smaller), the same count for every method, with ``seed``."""

    budget: int = Field(6, ge=1, description="configurations tried per method (the same for every method)")
    seed: int = Field(0, description="the draw of configurations from each grid")
    split: str = Field("forget10", description="the forget split tuning runs on (in the validation world)")
    seed_of_runs: int = Field(0, description="the training seed of every tuning run")
    shared: dict[str, list[Value]] = Field(default_factory=dict, description="knob -> values, every method")
    strength: dict[str, dict[str, list[Value]]] = Field(
        default_factory=dict, description="method -> knob -> values: the method's own strength knobs")
    from_spec: str | None = Field(
        None, description="another study file whose chosen configurations this study reuses (no tuning runs "
        "here: e.g. real data, where no second world exists to tune on)")


class Criterion(_Strict):
    """How a configuration is chosen, from its validation run only.

    ``gate``: among configurations whose model utility is at least ``min_utility_ratio`` x the target's
    (the registration gate's utility rule), the highest forget quality; when none keeps utility, the one
    with the highest utility ratio (the least damaging; the report says it failed the utility bar).
    """

    rule: Literal["gate"] = "gate"
    min_utility_ratio: float = Field(0.9, gt=0, le=1.5)


class Ablation(_Strict):
    """One DiPO variant, run from DiPO's chosen configuration with these overrides (and ``reference``)."""

    name: str
    overrides: dict[str, Value] = Field(default_factory=dict)
    reference: Literal["cache", "live", "exact"] = "cache"
    family: str = Field("", description="groups variants into one sensitivity curve (e.g. gamma)")


class Relearn(_Strict):
    """The relearning attack on every tested model: fine-tune ``steps`` optimizer steps on the first
    ``fraction`` of the forget rows (plain NLL, batch ``batch_size``, ``lr``), then measure the forget
    probability of the remaining rows (never trained on in the attack) before and after."""

    enabled: bool = True
    fraction: float = Field(0.5, gt=0, lt=1)
    steps: int = Field(5, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)


class StudySpec(_Strict):
    name: str = Field(description="the study's name: the MLflow experiment is study-<name>")
    params: str = Field("params.yaml", description="the base params file of every cell")
    root: str = Field("studies", description="where worlds (data, target, retain, caches) and cell outputs go")
    overrides: list[str] = Field(default_factory=list, description="--set overrides of every cell")
    worlds: dict[str, list[str]] = Field(
        default_factory=lambda: {"validation": ["data.synthetic.seed=1"], "test": []},
        description="world name -> overrides; tuning runs in 'validation', tests in 'test'")
    splits: list[str] = Field(default_factory=lambda: ["forget10"], description="tested forget splits")
    methods: list[str]
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    tuning: Tuning = Field(default_factory=Tuning)
    criterion: Criterion = Field(default_factory=Criterion)
    trajectory_every: int = Field(0, ge=0, description="method.eval_every of the test runs (0: no trajectory)")
    ablations: list[Ablation] = Field(default_factory=list)
    ablation_split: str = "forget10"
    relearn: Relearn = Field(default_factory=Relearn)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        from ..methods.registry import METHODS

        bad = [m for m in v if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
        if len(set(v)) != len(v):
            raise ValueError("a method is listed twice")
        return v

    @model_validator(mode="after")
    def _worlds_and_names(self) -> "StudySpec":
        missing = {"validation", "test"} - set(self.worlds)
        if missing:
            raise ValueError(f"worlds must name {sorted(missing)} (tuning runs in validation, tests in test)")
        extra = set(self.tuning.strength) - set(self.methods)
        if extra:
            raise ValueError(f"tuning.strength names methods not in the study: {sorted(extra)}")
        names = [a.name for a in self.ablations]
        if len(set(names)) != len(names):
            raise ValueError("two ablations share a name")
        if self.ablations and "dipo" not in self.methods:
            raise ValueError("ablations vary DiPO's chosen configuration: list dipo in methods")
        if self.ablations and self.ablation_split not in self.splits:
            raise ValueError(f"ablation_split {self.ablation_split} is not a tested split: the ablations are "
                             "compared with DiPO's test runs there")
        if not self.splits or not self.seeds:
            raise ValueError("splits and seeds must not be empty")
        return self


def load_spec(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """The study file, with ``key=value`` overrides (dotted keys, YAML values: ``seeds=[0]``)."""
    path = Path(path)
    if not path.exists():
        raise StudyError(f"study file {path} does not exist")
    try:
        tree: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise StudyError(f"{path} is not valid YAML: {e}") from None
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise StudyError(f"override {item!r} is not key=value")
        node = tree
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(raw)
    try:
        return StudySpec(**tree)
    except ValidationError as e:
        lines = [f"{'.'.join(str(x) for x in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()]
        raise StudyError(f"{path}: " + "; ".join(lines)) from None
