"""The study's MLflow store: one run per cell, written by :func:`log_cell_run`, read back by :func:`read_runs`.

The store is the study's only record: resuming asks it which cells have finished, the report reads it and
nothing else. One experiment per study, ``study-<name>``, in the tracking store the base params name
(:func:`unlearn.tracking.tracking_config`). A cell's run carries:

* tags ``study.name``, ``study.phase`` (reference | tune | test | ablation), ``study.world`` (validation |
  test), ``study.split``, ``study.method`` (the method; ``target`` / ``retain`` for reference runs),
  ``study.seed``, ``study.config`` (the tuned knobs as sorted JSON), ``study.config_id``,
  ``study.ablation`` and ``study.ablation_family`` (empty outside ablations), ``study.reference`` (cache |
  live | exact), ``study.cell`` (the content key), ``study.git_commit``;
* params: the cell's overrides;
* metrics: every number of the benchmark's evaluation (TOFU: ``forget_quality``, ``model_utility``,
  ``forget_prob`` ...), ``utility_ratio`` (model utility over the target's, same world and split),
  ``steps``, and for test runs the relearning attack's ``relearn_forget_prob_before`` /
  ``relearn_forget_prob_after``;
* metric history ``traj_<name>`` (``traj_forget_prob``, ``traj_retain_prob``) at each evaluated step.

Only runs with status FINISHED count; a crashed cell leaves a FAILED run, which is redone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .plan import Cell

TAG = "study."


@dataclass
class RunRecord:
    """One finished (or not) cell run, as the store holds it."""

    run_id: str
    status: str
    tags: dict[str, str]
    metrics: dict[str, float]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    end_time: int | None = None

    def tag(self, name: str) -> str:
        return self.tags.get(TAG + name, "")

    @property
    def phase(self) -> str:
        return self.tag("phase")

    @property
    def method(self) -> str:
        return self.tag("method")

    @property
    def split(self) -> str:
        return self.tag("split")

    @property
    def world(self) -> str:
        return self.tag("world")

    @property
    def seed(self) -> int:
        return int(self.tag("seed") or 0)

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.tag("config") or "{}")

    @property
    def ablation(self) -> str:
        return self.tag("ablation")

    @property
    def key(self) -> str:
        return self.tag("cell")


def experiment_name(study: str) -> str:
    return f"study-{study}"


def cell_tags(study: str, cell: Cell, *, family: str = "", git_commit: str = "") -> dict[str, str]:
    return {TAG + "name": study, TAG + "phase": cell.phase, TAG + "world": cell.world, TAG + "split": cell.split,
            TAG + "method": cell.method, TAG + "seed": str(cell.seed),
            TAG + "config": json.dumps(cell.config_dict, sort_keys=True), TAG + "config_id": cell.config_id,
            TAG + "ablation": cell.ablation, TAG + "ablation_family": family, TAG + "reference": cell.reference,
            TAG + "cell": cell.key, TAG + "git_commit": git_commit, "mlflow.runName": cell.label()}


def log_cell_run(client, experiment_id: str, tags: Mapping[str, str], metrics: Mapping[str, Any],
                 history: Mapping[str, list[tuple[int, float]]] | None = None,
                 params: Mapping[str, Any] | None = None) -> str:
    """One FINISHED run with these tags, final metrics (non-numbers and NaN left out) and metric histories."""
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, tags=dict(tags))
    rid = run.info.run_id
    try:
        ms = [Metric(k, float(v), 0, 0) for k, v in metrics.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for name, points in (history or {}).items():
            ms += [Metric(name, float(v), 0, int(s)) for s, v in points if math.isfinite(float(v))]
        ps = [Param(k, str(v)[:500]) for k, v in (params or {}).items()]
        for i in range(0, max(len(ms), 1), 900):  # MLflow's log_batch takes at most 1000 metrics
            client.log_batch(rid, metrics=ms[i:i + 900], params=ps if i == 0 else [])
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return rid


def read_runs(client, experiment: str, *, finished_only: bool = True, with_history: bool = True) -> list[RunRecord]:
    """Every run of the study's experiment (FINISHED ones by default), with ``traj_*`` histories."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    out, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string="", max_results=1000, page_token=token)
        for r in page:
            if finished_only and r.info.status != "FINISHED":
                continue
            history = {}
            if with_history:
                for name in r.data.metrics:
                    if name.startswith("traj_"):
                        history[name] = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, name))
            out.append(RunRecord(r.info.run_id, r.info.status, dict(r.data.tags), dict(r.data.metrics), history,
                                 r.info.end_time))
        token = page.token
        if not token:
            break
    return out


def finished_keys(runs: list[RunRecord]) -> dict[str, RunRecord]:
    """Cell key -> its finished run (the latest, should a cell have been run twice)."""
    out: dict[str, RunRecord] = {}
    for r in sorted(runs, key=lambda r: r.end_time or 0):
        if r.status == "FINISHED" and r.key:
            out[r.key] = r
    return out
