"""``unlearn study ...``: the evidence study (``configs/study.yaml``): plan it, run it (resumable), report it.

Mounted by the main CLI with ``app.add_typer(study_app, name="study")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional  # noqa: F401 - used in annotations

import typer

study_app = typer.Typer(
    help="The evidence study: every method, fairly tuned on a validation world, tested over seeds, ablations "
    "of DiPO and a relearning attack; every run in MLflow, the report written from it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

from ..cli_common import friendly_errors as _friendly  # noqa: E402

SpecOpt = Annotated[Path, typer.Option("--spec", help="the study file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a study key, e.g. --set seeds=[0]")]


def _load(spec: Path, set_: list[str] | None):
    from ..cli import _setup
    from .spec import load_spec

    _setup()
    return load_spec(spec, set_)


def _runs(s):
    from ..config import load_params
    from ..tracking import client_for, tracking_config
    from .store import experiment_name, read_runs

    client = client_for(tracking_config(load_params(s.params, list(s.overrides))))
    return read_runs(client, experiment_name(s.name))


@study_app.command("plan")
@_friendly
def plan_(spec: SpecOpt = Path("configs/study.yaml"), set_: SetOpt = None,
          json_: Annotated[bool, typer.Option("--json", help="every plannable cell as JSON lines")] = False) -> None:
    """Planned and finished cells per phase (test and ablation cells appear once tuning has chosen)."""
    from .runner import describe_plan, dump_cells

    s = _load(spec, set_)
    runs = _runs(s)
    if json_:
        typer.echo(dump_cells(s, runs))
        return
    for phase, planned, finished in describe_plan(s, runs):
        typer.echo(f"{phase:<10} {finished:>4} of {planned:>4} finished")


@study_app.command("run")
@_friendly
def run(
    spec: SpecOpt = Path("configs/study.yaml"), set_: SetOpt = None,
    phase: Annotated[Optional[list[str]], typer.Option(help="only these phases (reference, tune, test, ablation)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="cells run side by side (processes; cores are split)")] = 1,
    max_cells: Annotated[Optional[int], typer.Option(min=1, help="stop after this many new cells")] = None,
) -> None:
    """Run every cell the MLflow store does not hold yet (a finished cell is never redone; a failed one is)."""
    from .plan import PHASES
    from .runner import run_study

    s = _load(spec, set_)
    bad = sorted(set(phase or []) - set(PHASES))
    if bad:
        raise typer.BadParameter(f"unknown phase(s) {bad}; phases: {', '.join(PHASES)}")

    def say(p):
        typer.echo(f"{p.phase}: {p.done} run, {p.skipped} already finished, {len(p.failed)} failed")
        for f in p.failed:
            typer.echo(f"  failed {f}")

    res = run_study(s, phases=phase or PHASES, workers=workers, max_cells=max_cells, on_phase=say)
    if any(p.failed for p in res):
        raise typer.Exit(1)


@study_app.command("report")
@_friendly
def report(spec: SpecOpt = Path("configs/study.yaml"), set_: SetOpt = None,
           out: Annotated[Path, typer.Option(help="the Markdown page (charts beside it in <stem>_files/)")] =
           Path("docs/results.md")) -> None:
    """Write the study's results page from the MLflow store alone (tables, claim check, charts)."""
    from .report import build_report

    s = _load(spec, set_)
    files = build_report(s, _runs(s)).write(out)
    typer.echo(f"wrote {out} and {len(files) - 1} chart(s)" if files else f"wrote {out}")
