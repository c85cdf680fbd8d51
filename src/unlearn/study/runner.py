"""Running the study: the worlds its cells share, one cell at a time, and the resumable loop over phases.

A *world* is one synthetic (or local) dataset with its tokenizer and target model, under
``<root>/<study>/<world>/``; each forget split adds its retain model, its evaluation of target and retain (the
retain model's per-example truth ratios are forget quality's reference) and its reference cache. A world is
built once and stamped with the content key of what built it (``world.json``); a stamp that does not match
the spec is an error rather than a silent reuse of other data.

A cell runs the pipeline's own stages in process: :func:`unlearn.stages.forget` into the cell's directory,
:func:`unlearn.stages.evaluate` against the world's retain and target models, the relearning attack on test
cells, and one MLflow run (:mod:`.store`). The unlearned weights are deleted after the run (the metrics and
per-example evaluation stay beside it): 170 cells of weights are not worth their disk.

Resuming: before each phase the store is read; a cell whose key has a FINISHED run is skipped. Killing the
process mid-cell leaves a FAILED (or RUNNING) run, which is redone. ``workers`` > 1 runs cells of a phase in
that many processes (spawned, one thread each).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from ..io import read_json, stable_hash, write_json
from . import plan
from .plan import Cell
from .spec import StudySpec
from .store import cell_tags, experiment_name, finished_keys, log_cell_run, read_runs

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- paths and params
def study_dir(spec: StudySpec) -> Path:
    return Path(spec.root) / spec.name


def world_dir(spec: StudySpec, world: str) -> Path:
    return study_dir(spec) / world


def path_overrides(spec: StudySpec, world: str, split: str) -> list[str]:
    """Where a world's and split's files go: data, tokenizer and target per world; retain, reports per split."""
    w = world_dir(spec, world)
    return [f"data.out_dir={w / 'data'}", f"model.out_dir={w / split / 'models'}", f"cache.dir={w / 'cache'}",
            f"reports_dir={w / split / 'reports'}"]


def cell_params(spec: StudySpec, cell: Cell):
    """The params a cell runs with: the base file, the cell's overrides, the world's paths, and for test and
    ablation cells ``method.eval_every`` of the trajectory (it is in the cell's key: :func:`plan.keyed`)."""
    from ..config import load_params

    extra = [f"method.eval_every={spec.trajectory_every}"] \
        if cell.phase in ("test", "ablation") and spec.trajectory_every else []
    return load_params(spec.params, [*plan.cell_overrides(spec, cell), *extra,
                                     *path_overrides(spec, cell.world, cell.split)])


def world_key(spec: StudySpec, world: str) -> str:
    return stable_hash({"base": stable_hash(plan.base_text(spec)), "overrides": [*spec.overrides, *spec.worlds[world]]})


# --------------------------------------------------------------------------- worlds
def _has_weights(d: Path) -> bool:
    return (d / "model.safetensors").exists()


def _link(link: Path, to: Path) -> None:
    if not link.is_symlink() and not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(to.resolve(), target_is_directory=True)


def ensure_data(spec: StudySpec, world: str) -> None:
    """Data and tokenizer of ``world``, each built only when missing; the world's stamp checked first."""
    from .. import stages

    w = world_dir(spec, world)
    stamp = w / "world.json"
    key = world_key(spec, world)
    if stamp.exists() and read_json(stamp).get("key") != key:
        raise RuntimeError(f"{w} was built for other params than the study now names (stamp {stamp}): use a new "
                           f"study name or delete {w}")
    w.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"key": key, "overrides": [*spec.overrides, *spec.worlds[world]]})
    p = cell_params(spec, Cell("reference", world, spec.splits[0], "target", 0))
    if not (w / "data" / "full.json").exists():
        stages.prepare(p)
    (w / "tokenizer").mkdir(exist_ok=True)
    _link(Path(p.model.out_dir) / "tokenizer", w / "tokenizer")
    if not (w / "tokenizer" / "tokenizer.json").exists():
        stages.tokenizer(p)  # into <split>/models/tokenizer, the link to the world's one


def _build(train: Callable[[Path], Any], out: Path) -> None:
    """Train into ``<out>.building`` and rename: a killed build never looks finished."""
    if _has_weights(out):
        return
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    train(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def ensure_model(spec: StudySpec, world: str, split: str, role: str) -> None:
    """The world's target (``role`` target; one per world) or the split's retain model, when missing."""
    from .. import stages

    w = world_dir(spec, world)
    p = cell_params(spec, Cell("reference", world, split, "target", 0))
    models = Path(p.model.out_dir)
    _link(models / "tokenizer", w / "tokenizer")
    out = w / "target" if role == "target" else models / "retain"
    _build(lambda d: stages.finetune(p, role, out_dir=d), out)


def ensure_evaluations(spec: StudySpec, world: str, split: str) -> None:
    """The evaluations of the split's retain and target models (what reference runs read; the retain
    model's per-example truth ratios are forget quality's reference, so it goes first)."""
    from .. import stages

    w = world_dir(spec, world)
    p = cell_params(spec, Cell("reference", world, split, "target", 0))
    models = Path(p.model.out_dir)
    _link(models / "target", w / "target")
    rdir = Path(p.reports_dir) / "eval"
    if not (rdir / "retain" / "metrics.json").exists():
        stages.evaluate(p, models / "retain", "retain")
    if not (rdir / "target" / "metrics.json").exists():
        stages.evaluate(p, models / "target", "target")


def _world_job(spec: StudySpec, kind: str, world: str, split: str, role: str = "") -> None:
    from ..stages import set_threads

    set_threads()
    if kind == "data":
        ensure_data(spec, world)
    elif kind == "model":
        ensure_model(spec, world, split, role)
    else:
        ensure_evaluations(spec, world, split)


def ensure_worlds(spec: StudySpec, pairs: Iterable[tuple[str, str]], workers: int = 1) -> None:
    """What the cells of ``pairs`` (world, split) need, in three rounds, each in parallel: data and tokenizer
    per world; the targets (one per world) and the retain models (one per split) side by side, since neither
    needs the other; the evaluations of both."""
    pairs = list(dict.fromkeys(pairs))
    worlds = list(dict.fromkeys(w for w, _ in pairs))
    first_split = {w: next(s for ww, s in pairs if ww == w) for w in worlds}
    rounds = [[("data", w, first_split[w]) for w in worlds],
              [("model", w, first_split[w], "target") for w in worlds] + [("model", w, s, "retain") for w, s in pairs],
              [("evaluate", w, s) for w, s in pairs]]
    for jobs in rounds:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn"),
                                     initializer=_worker_init, initargs=(workers,)) as pool:
                for fut in as_completed([pool.submit(_world_job, spec, *job) for job in jobs]):
                    fut.result()
        else:
            for job in jobs:
                _world_job(spec, *job)


def _target_utility(spec: StudySpec, world: str, split: str) -> float | None:
    p = cell_params(spec, Cell("reference", world, split, "target", 0))
    f = Path(p.reports_dir) / "eval" / "target" / "metrics.json"
    return read_json(f).get("model_utility") if f.exists() else None


# --------------------------------------------------------------------------- one cell
@dataclass
class CellResult:
    metrics: dict[str, float]
    history: dict[str, list[tuple[int, float]]]


def run_cell(spec: StudySpec, cell: Cell) -> CellResult:
    """Run one cell with the pipeline's stages (the world must exist: :func:`ensure_worlds`)."""
    from .. import stages
    from ..models.build import load_model, load_tokenizer

    p = cell_params(spec, cell)
    models, reports = Path(p.model.out_dir), Path(p.reports_dir)
    target_mu = _target_utility(spec, cell.world, cell.split)
    if cell.phase == "reference":
        metrics = _numbers(read_json(reports / "eval" / cell.method / "metrics.json"))
        return CellResult(_with_ratio(metrics, target_mu), {})
    out = study_dir(spec) / "cells" / cell.key
    shutil.rmtree(out.parent / f"{cell.key}.reports", ignore_errors=True)
    summary = stages.forget(p, out_dir=out, target_dir=models / "target", reference=cell.reference)
    result = stages.evaluate(p, out, cell.label().replace("/", "_"), retain_dir=models / "retain",
                             target_dir=models / "target", out_dir=out.parent / f"{cell.key}.eval")
    metrics = _with_ratio({**_numbers(result.metrics), "steps": float(summary.get("steps", 0))}, target_mu)
    history: dict[str, list[tuple[int, float]]] = {}
    curve = out.parent / f"{cell.key}.reports" / "eval.json"
    if curve.exists():
        for row in read_json(curve):
            for k, v in row.items():
                if k != "step" and not k.startswith("retain_model_"):
                    history.setdefault(f"traj_{k}", []).append((int(row["step"]), float(v)))
    if cell.phase == "test" and spec.relearn.enabled:
        from ..benchmark import get_benchmark
        from .relearn import relearn_attack

        tok = load_tokenizer(out)
        b = get_benchmark(p.benchmark)
        forget = b.encode_inputs(p, tok, b.forget_inputs(p)).forget
        r = spec.relearn
        metrics.update(relearn_attack(load_model(out), forget, tok.pad_token_id, fraction=r.fraction,
                                      steps=r.steps, lr=r.lr, batch_size=r.batch_size, seed=cell.seed))
    for f in out.glob("*.safetensors"):  # the weights: not kept (the evaluation and its per-example files are)
        f.unlink()
    return CellResult(metrics, history)


def _with_ratio(metrics: dict[str, float], target_mu: float | None) -> dict[str, float]:
    """``utility_ratio``: model utility over the target's (undefined, so absent, when the target's is 0)."""
    if target_mu and metrics.get("model_utility") is not None:
        metrics["utility_ratio"] = metrics["model_utility"] / target_mu
    return metrics


def _numbers(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _run_and_log(spec: StudySpec, cell: Cell, uri: str, experiment_id: str, git: str,
                 family: str) -> str:
    """Worker entry: run one cell and log it (also called in process when workers == 1)."""
    from mlflow import MlflowClient

    from ..stages import set_threads

    set_threads()
    start = time.perf_counter()
    res = run_cell(spec, cell)
    client = MlflowClient(tracking_uri=uri)
    tags = {**cell_tags(spec.name, cell, family=family, git_commit=git), "study.machine": machine()}
    return log_cell_run(client, experiment_id, tags, {**res.metrics, "wall_s": time.perf_counter() - start},
                        res.history, params={"overrides": " ".join(plan.cell_overrides(spec, cell))})


def machine() -> str:
    """Where a cell ran: host, architecture, the cores it shared, the torch build (GPU name when there is one)."""
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {gpu}, " \
           f"{torch.get_num_threads()} thread(s)"


# --------------------------------------------------------------------------- the study
@dataclass
class Progress:
    phase: str
    done: int
    skipped: int
    failed: list[str]


def run_study(spec: StudySpec, *, phases: Iterable[str] = plan.PHASES, workers: int = 1,
              max_cells: int | None = None, on_phase: Callable[[Progress], None] | None = None,
              executor: Callable[..., str] | None = None) -> list[Progress]:
    """Run every planned cell the store does not hold yet, phase by phase; returns what each phase did.

    ``executor`` (tests): replaces :func:`_run_and_log` with the same signature.
    """
    from ..config import load_params
    from ..tracking import client_for, ensure_experiment, git_commit, tracking_config

    base = load_params(spec.params, list(spec.overrides))
    tc = tracking_config(base)
    client = client_for(tc)
    exp_id = ensure_experiment(client, experiment_name(spec.name), tc.artifact_location)
    git = git_commit()
    text = plan.base_text(spec)
    run = executor or _run_and_log
    families = {a.name: a.family for a in spec.ablations}
    budget = [max_cells if max_cells is not None else 10**9]
    out: list[Progress] = []
    for phase in plan.PHASES:
        if phase not in set(phases):
            continue
        runs = read_runs(client, experiment_name(spec.name), with_history=False)
        done = finished_keys(runs)
        cells = [plan.keyed(spec, c, text) for c in _phase_cells(spec, phase, runs)]
        todo = [c for c in cells if c.key not in done]
        todo = todo[:budget[0]]
        budget[0] -= len(todo)
        if executor is None and todo:
            ensure_worlds(spec, ((c.world, c.split) for c in todo), workers)
        prog = Progress(phase, 0, len(cells) - len(todo), [])
        args = [(spec, c, tc.uri, exp_id, git, families.get(c.ablation, "")) for c in todo]
        if workers > 1 and len(todo) > 1 and executor is None:
            import multiprocessing as mp

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                     initargs=(workers,)) as pool:
                futures = {pool.submit(run, *a): a[1] for a in args}
                for fut in tqdm(as_completed(futures), total=len(futures), desc=f"study {phase}"):
                    _settle(fut, futures[fut], prog, client, exp_id, spec, git)
        else:
            for a in tqdm(args, desc=f"study {phase}", disable=len(args) < 2):
                try:
                    run(*a)
                    prog.done += 1
                except Exception as e:  # a failed cell is recorded and the study goes on; rerun redoes it
                    _record_failure(client, exp_id, spec, a[1], git, e)
                    prog.failed.append(f"{a[1].label()}: {e}")
        out.append(prog)
        if on_phase:
            on_phase(prog)
        if budget[0] <= 0:
            break
    return out


def _worker_init(workers: int = 1) -> None:
    """A worker's share of the cores, quiet logs, and no progress bars (the parent shows one per phase)."""
    os.environ["UNLEARN_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(workers, 1)))
    os.environ["TQDM_DISABLE"] = "1"
    from ..cli import configure_logging

    configure_logging(False)


def _settle(fut, cell: Cell, prog: Progress, client, exp_id: str, spec: StudySpec, git: str) -> None:
    try:
        fut.result()
        prog.done += 1
    except Exception as e:
        _record_failure(client, exp_id, spec, cell, git, e)
        prog.failed.append(f"{cell.label()}: {e}")


def _record_failure(client, exp_id: str, spec: StudySpec, cell: Cell, git: str, err: Exception) -> None:
    log.warning("cell %s failed: %s", cell.label(), err)
    run = client.create_run(exp_id, tags={**cell_tags(spec.name, cell, git_commit=git), "study.error": str(err)[:4000]})
    client.set_terminated(run.info.run_id, "FAILED")


def _phase_cells(spec: StudySpec, phase: str, runs) -> list[Cell]:
    if phase == "reference":
        return plan.reference_cells(spec)
    if phase == "tune":
        return plan.tune_cells(spec)
    chosen = {m: c.config for m, c in current_choices(spec, runs).items()}
    return plan.test_cells(spec, chosen) if phase == "test" else plan.ablation_cells(spec, chosen)


def current_choices(spec: StudySpec, runs) -> dict[str, plan.Choice]:
    """Each method's chosen configuration from the finished tuning runs in ``runs`` (see :func:`plan.chosen_configs`);
    with ``tuning.from_spec``, the other study's choices, read from its own runs in the same store."""
    if spec.tuning.from_spec:
        from .spec import load_spec

        other = load_spec(spec.tuning.from_spec)
        got = current_choices(other, _store_runs(other))
        return {m: c for m, c in got.items() if m in spec.methods}
    target = [r for r in runs if r.phase == "reference" and r.method == "target" and r.world == "validation"
              and r.split == spec.tuning.split]
    mu = target[-1].metrics.get("model_utility") if target else None
    tune = [{"method": r.method, "config": r.config, "metrics": r.metrics} for r in runs if r.phase == "tune"]
    return plan.chosen_configs(spec, tune, mu)


def _store_runs(spec: StudySpec):
    from ..config import load_params
    from ..tracking import client_for, tracking_config

    return read_runs(client_for(tracking_config(load_params(spec.params, list(spec.overrides)))),
                     experiment_name(spec.name), with_history=False)


def describe_plan(spec: StudySpec, runs) -> list[tuple[str, int, int]]:
    """(phase, planned cells, finished cells) for the phases that can be planned now."""
    text = plan.base_text(spec)
    done = finished_keys(runs)
    rows = []
    for phase in plan.PHASES:
        cells = [plan.keyed(spec, c, text) for c in _phase_cells(spec, phase, runs)]
        rows.append((phase, len(cells), sum(c.key in done for c in cells)))
    return rows


def dump_cells(spec: StudySpec, runs) -> str:
    """Every plannable cell as JSON lines (``unlearn study plan --json``)."""
    text = plan.base_text(spec)
    done = finished_keys(runs)
    lines = []
    for phase in plan.PHASES:
        for c in _phase_cells(spec, phase, runs):
            c = plan.keyed(spec, c, text)
            lines.append(json.dumps({"key": c.key, "label": c.label(), "finished": c.key in done,
                                     "overrides": plan.cell_overrides(spec, c)}))
    return "\n".join(lines)
