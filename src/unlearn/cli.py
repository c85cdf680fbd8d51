"""``unlearn``: the command-line face of the stage functions in :mod:`unlearn.stages`.

Each subcommand reads ``params.yaml`` (``--params``) with ``--set a.b=value``
overrides, calls one stage function and prints what it wrote. Errors in input
data or parameters are printed as one readable message (exit code 2), not as a
traceback wall.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

app = typer.Typer(
    help="dipo-unlearn: make a language model forget specific training data (DiPO and baselines), "
    "evaluate it on TOFU, and track it. Every subcommand reads params.yaml; override any value with "
    "--set key.sub=value (repeatable).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

from .cli_common import ParamsOpt, SetOpt, friendly_errors  # noqa: E402


def _params(params: Path, overrides: list[str] | None):
    from .config import load_params

    return load_params(params, overrides)


_VERBOSE = {"on": False}


@app.callback()
def _global_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", envvar="UNLEARN_VERBOSE",
                                          help="also show the libraries' INFO logs and progress bars (accelerate, "
                                               "transformers, mlflow...); by default only this project's messages, "
                                               "its progress bars and every library's warnings")] = False,
) -> None:
    _VERBOSE["on"] = verbose


class _TiedWeightsNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def configure_logging(verbose: bool = False) -> None:
    """Quiet by default: this project's loggers (``unlearn.*``) at INFO, every library at WARNING, and
    transformers' own weight-loading bars off, so a run's console shows our progress bars and what matters.
    ``--verbose`` (or ``UNLEARN_VERBOSE=1``) brings the libraries' INFO lines and bars back."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("unlearn").setLevel(logging.DEBUG if verbose else logging.INFO)
    # Libraries that set their own logger level on import (mlflow: INFO) or are chatty even at INFO.
    for noisy in ("mlflow", "alembic", "accelerate", "datasets", "great_expectations", "absl", "httpx", "urllib3",
                  "filelock"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    # accelerate warns at every checkpoint that it dropped lm_head.weight: expected with tied embeddings
    # (the tiny Llama's default), and the reloaded model is checked against the saved one in the tests.
    other = logging.getLogger("accelerate.utils.other")
    for f in [f for f in other.filters if isinstance(f, _TiedWeightsNote)]:
        other.removeFilter(f)
    if not verbose:
        other.addFilter(_TiedWeightsNote())
    try:
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if verbose else hf_logging.disable_progress_bar)()
        hf_logging.set_verbosity_info() if verbose else hf_logging.set_verbosity_warning()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _setup(verbose: bool | None = None) -> None:
    from .stages import set_threads
    from .train import distributed_state

    # Before anything else asks "which rank am I": the first state made in a process decides the world size.
    distributed_state()
    configure_logging(_VERBOSE["on"] if verbose is None else verbose)
    set_threads()


def _print_table(title: str, rows: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    typer.echo(f"\n{title}\n" + "-" * (width + 14))
    for k, v in rows:
        val = f"{v:.4f}" if isinstance(v, float) else ("n/a" if v is None else str(v))
        typer.echo(f"{k.ljust(width)}  {val}")


@app.command()
@friendly_errors
def prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Load the benchmark's data from data.source (synthetic | local | hub), validate it, and write every split as
    JSON under data.out_dir. TOFU: full, forgetXX, retainXX, holdoutXX, *_perturbed, real_authors, world_facts;
    MUSE (--params muse/params.yaml): fold1..4, privleak_*, verbmem_forget, knowmem_*."""
    _setup()
    from . import stages

    p = _params(params, set_)
    out = stages.prepare(p)
    manifest = json.loads((out / "manifest.json").read_text())
    _print_table(f"splits in {out}", [(k, f"{v['rows']} rows" + (f", {v['authors']} authors" if v.get("authors") else ""))
                                        for k, v in manifest.items()])


@app.command()
@friendly_errors
def tokenizer(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Train the byte-level BPE tokenizer (model.tokenizer.vocab_size) on the prepared splits and save it
    in Hugging Face format under <model.out_dir>/tokenizer (AutoTokenizer.from_pretrained loads it)."""
    _setup()
    from . import stages

    out = stages.tokenizer(_params(params, set_))
    typer.echo(f"tokenizer saved to {out}")


@app.command()
@friendly_errors
def finetune(
    role: Annotated[str, typer.Option(help="target: train on every author (full); retain: on the retain split only")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="output directory (default <model.out_dir>/<role>)")] = None,
) -> None:
    """Fine-tune the target or the retain model (from model.path, or the small Llama built from model.arch) on
    QA pairs, loss on answer tokens only, through accelerate. Resumes from its checkpoint if interrupted.
    Prints the mean length-normalised answer probability on the forget and retain splits."""
    _setup()
    from . import stages

    if role not in ("target", "retain"):
        raise typer.BadParameter("--role must be 'target' or 'retain'")
    s = stages.finetune(_params(params, set_), role, out)
    _print_table(f"{role} model", list(s.items()))


@app.command()
@friendly_errors
def cache(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    target: Annotated[Optional[Path], typer.Option(help="reference model directory (default <model.out_dir>/target)")] = None,
    retain: Annotated[bool, typer.Option(help="also cache top-K on the retain split (retain_loss: kl)")] = False,
) -> None:
    """Compute the reference-model cache (sequence log-probs, top-K log-probs per answer position) of the target
    model on the forget/retain splits, content-addressed under cache.dir; reused by every later `unlearn forget`."""
    _setup()
    from . import stages

    p = _params(params, set_)
    c = stages.cache(p, target, with_retain=True if retain else None)
    for path in c.paths:
        typer.echo(f"reference cache: {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command()
@friendly_errors
def forget(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    target: Annotated[Optional[Path], typer.Option(help="model to unlearn from (default <model.out_dir>/target)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output directory (default <model.out_dir>/unlearned)")] = None,
    reference: Annotated[str, typer.Option(help="cache (default) | live (reference forward each step, top-K) | "
                                                "exact (live, full vocabulary)")] = "cache",
) -> None:
    """Unlearn the forget split (data.forget_split) from the target model with method.name (dipo, dipo_forget,
    ga, graddiff, npo, npo_rt, simnpo, dpo_idk, undial), keeping the retain split; saves the unlearned model."""
    _setup()
    from . import stages

    if reference not in ("cache", "live", "exact"):
        raise typer.BadParameter("--reference must be cache, live or exact")
    s = stages.forget(_params(params, set_), out, target, reference=reference)
    if s:
        _print_table("unlearned model", list(s.items()))


@app.command("evaluate")
@friendly_errors
def evaluate(
    model: Annotated[Path, typer.Argument(help="model directory to evaluate (target, retain, unlearned, any HF dir)")],
    name: Annotated[Optional[str], typer.Option(help="report name (default: the directory name)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    retain: Annotated[Optional[Path], typer.Option(help="retain model for forget quality (default <model.out_dir>/retain)")] = None,
    target: Annotated[Optional[Path], typer.Option(help="target model, for side-by-side answers in the report")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output directory (default reports/eval/<name>)")] = None,
) -> None:
    """Evaluate a model on the configured benchmark. TOFU: forget quality (KS test against the retain model),
    model utility (hmean of 9 parts), probabilities, ROUGE-L, truth ratios, exact memorisation, extraction
    strength, MIA AUCs and privacy leakage. MUSE (--params muse/params.yaml): VerbMem, KnowMem on forget and
    retain QA, MIA AUCs (loss, zlib, Min-K%, Min-K%++) and PrivLeak against the retain model. Writes
    metrics.json, per_example.jsonl and report.md/.html with a plot."""
    _setup()
    from . import stages

    p = _params(params, set_)
    res = stages.evaluate(p, model, name or model.name, retain, target, out)
    _print_table(f"{p.benchmark.upper()} metrics: {model}", list(res.metrics.items()))
    for k, v in res.notes.items():
        typer.echo(f"note [{k}]: {v}")


@app.command()
@friendly_errors
def sequence(
    kind: Annotated[str, typer.Argument(help="sustainability | scalability")],
    params: ParamsOpt = Path("muse/params.yaml"),
    set_: SetOpt = None,
) -> None:
    """MUSE's sequences with method.name: sustainability (unlearn fold 1, then fold 2 from that model, ... fold 4)
    or scalability (unlearn fold 1, folds 1-2, folds 1-3, each from the target). Evaluates every step; writes
    <reports_dir>/sequences/<kind>.json and <kind>.png (every metric against requests / forget-set size). Needs
    the target, its evaluation and the retain model's evaluation (`dvc repro muse/dvc.yaml` builds them)."""
    _setup()
    from . import stages

    if kind not in stages.SEQUENCES:
        raise typer.BadParameter(f"KIND must be one of {', '.join(stages.SEQUENCES)}")
    points = stages.sequence(_params(params, set_), kind)
    keys = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak")
    _print_table(f"MUSE {kind}", [(pt["forget_set"], "  ".join(f"{k}={pt.get(k)}" for k in keys)) for pt in points])


@app.command()
@friendly_errors
def validate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Data validation gate (Great Expectations): check the splits of data.forget_split in data.out_dir (required
    columns not null, unique ids, forget/retain disjoint by row and author, sizes as in manifest.json, 5 (or 3)
    perturbed answers, answer lengths) and count the QA rows the model's tokenizer cuts at model.max_length (a
    warning, not a failure). Writes <reports_dir>/validation/result.json; exit code 2 on failure."""
    _setup()
    from . import stages
    from .data.validate import ValidationFailed, result_path

    p = _params(params, set_)
    try:
        res = stages.validate(p)
    except ValidationFailed as e:
        typer.echo(e.report.render(), err=True)
        typer.echo(f"result: {result_path(p)}", err=True)
        raise typer.Exit(2) from None
    _print_table(
        f"data validation passed ({res['n_expectations']} expectations)",
        [(k, f"{v['rows']} rows, {v['expectations']} expectations") for k, v in res["checked"].items()]
        + [("truncation", _truncation_line(res.get("truncation"))), ("result", str(result_path(p)))],
    )


def _truncation_line(t: dict | None) -> str:
    """One line for the validation table: rows cut at model.max_length (the warning itself is logged)."""
    if not t:
        return "n/a"
    if not t.get("computed", True):
        return f"not counted ({t.get('reason')})"
    if "truncated" not in t:  # MUSE: rows over the length, per split, in the result file
        return f"{t.get('over', 0)} of {t['rows']} rows over their length limit at model.max_length={t['max_length']}"
    line = f"{t['truncated']} of {t['rows']} QA rows cut at model.max_length={t['max_length']}"
    if t["truncated"] and t["suggested_max_length"] > t["max_length"]:
        line += f" (WARNING: model.max_length={t['suggested_max_length']} would cut under 1 %)"
    return line


@app.command()
@friendly_errors
def register(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    model: Annotated[Optional[Path], typer.Option(help="unlearned model directory (default <model.out_dir>/unlearned)")] = None,
    request_id: Annotated[
        Optional[list[str]], typer.Option("--request-id", help="deletion request id this model serves (repeatable)")
    ] = None,
    strict: Annotated[bool, typer.Option(help="exit with code 1 when the gate fails (default: 0, the decision "
                                              "file records it)")] = False,
) -> None:
    """Gate the unlearned model (gate.min_forget_quality, gate.min_utility_ratio x the target's utility), log the
    run to MLflow (params, per-step losses, metrics, eval report, model) and, if it passed, register it under
    tracking.registered_model as champion (at least as good as the current champion of the same forget set on
    forget quality and utility) or challenger. Writes reports/register/decision.json."""
    _setup()
    from . import stages, tracking

    p = _params(params, set_)
    d = stages.register(p, model, request_id)
    rows = [("gate", "passed" if d["passed"] else "failed")] + [("reason", r) for r in d["reasons"]]
    rows += [("run_id", d["run_id"]), ("registered_model", d["registered_model"] if d["passed"] else None),
             ("version", d["version"]), ("alias", ", ".join(d["aliases"]) if d["aliases"] else None)]
    if d.get("displaced_version"):
        rows.append(("previous champion", d["displaced_version"]))
    _print_table("registration", rows)
    uri = tracking.tracking_config(p).uri
    if uri == f"sqlite:///{Path.cwd().absolute() / 'mlflow.db'}":
        uri = "sqlite:///mlflow.db"
    typer.echo(f"\nbrowse runs and models: mlflow ui --backend-store-uri {uri}  (from the project root)")
    if strict and not d["passed"]:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def audit(
    request_id: Annotated[Optional[str], typer.Argument(help="a deletion request id")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="a registered version number or alias (champion)")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="recompute the ledger's hash chain and every registered "
                                         "version's weights and forget-set hashes; exit 1 on any mismatch")] = False,
    certificate: Annotated[Optional[Path], typer.Option("--certificate", help="with REQUEST_ID: write its "
                                                        "fulfilment certificate (JSON) to this file")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Audit trail. `unlearn audit REQUEST_ID`: which registered model versions honour the request, with the
    evidence (forget quality, the request's rows' answer probability before and after). `unlearn audit --model
    VERSION`: which requests, data hashes, params and commit produced that version. `unlearn audit --verify`:
    recompute the tamper-evident trail and name any edited ledger row, deleted event or swapped model file.
    `unlearn audit REQUEST_ID --certificate FILE`: the request's certificate (JSON)."""
    from . import stages

    if verify:
        if request_id is not None or model is not None or certificate is not None:
            raise typer.BadParameter("--verify takes no REQUEST_ID, --model or --certificate")
        rep = stages.verify_audit_trail(_params(params, set_))
        typer.echo(rep.render())
        if not rep.ok:
            raise typer.Exit(1)
        return
    if (request_id is None) == (model is None):
        raise typer.BadParameter("give exactly one of REQUEST_ID or --model VERSION (or --verify)")
    if certificate is not None:
        if request_id is None:
            raise typer.BadParameter("--certificate needs a REQUEST_ID")
        from .requests.certificate import write_certificate

        typer.echo(write_certificate(_params(params, set_), request_id, certificate))
        return
    typer.echo(stages.audit(_params(params, set_), request_id, model))


@app.command()
@friendly_errors
def summary(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    markdown: Annotated[bool, typer.Option(help="print a Markdown table (for a README or a PR)")] = False,
) -> None:
    """Print the results table of every model trained/evaluated so far (from reports/)."""
    from . import stages

    p = _params(params, set_)
    rows = stages.summary_rows(p)
    if not rows:
        typer.echo("no results yet: run `dvc repro` (or `make run`) first")
        raise typer.Exit(1)
    cols = [c for c in stages.benchmark_of(p).summary_columns if any(r.get(c) is not None for r in rows)]
    header = ["model"] + cols
    table = [header] + [[r["model"]] + [_fmt(r.get(c)) for c in cols] for r in rows]
    if markdown:
        from .fmt import markdown_table

        typer.echo(markdown_table(header, table[1:], pad=False))
        return
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    typer.echo("")
    for j, line in enumerate(table):
        typer.echo("  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(line, widths))))
        if j == 0:
            typer.echo("  ".join("-" * w for w in widths))


@app.command()
@friendly_errors
def compare(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="output directory (default <reports_dir>/compare-all; the "
                                                     "register stage writes the pipeline's page to <reports_dir>/compare)")] = None,
    pipeline_only: Annotated[bool, typer.Option("--pipeline-only", help="only the pipeline's models (target, retain, "
                                                "unlearned, MUSE's sequence steps), as the register stage's page; by "
                                                "default every other evaluation under <reports_dir>/eval/ too")] = False,
    model: Annotated[Optional[Path], typer.Option(help="the unlearned model whose loss log to draw (default "
                                                       "<model.out_dir>/unlearned)")] = None,
) -> None:
    """Write the comparison page of the evaluated models: comparison.html (self-contained, charts inline, no
    network), its Markdown twin comparison.md and comparison_files/*.svg. One table with every model's metrics and
    the gate's verdict, the forget/utility trade-off (TOFU: forget quality on a log axis), the histograms overlaid
    (TOFU: forget truth ratios; MUSE: MIA scores), the loss curves and links to each model's report.html."""
    from . import stages
    from .io import read_json

    p = _params(params, set_)
    page = stages.comparison(p, model, discover=not pipeline_only)
    if not page.models:
        typer.echo("no evaluations yet: run `dvc repro` (or `unlearn evaluate ...`) first")
        raise typer.Exit(1)
    decision = stages.reports_dir(p) / "register" / "decision.json"
    written = page.write(out or stages.reports_dir(p) / "compare-all", stages.COMPARISON_STEM,
                         registration=read_json(decision) if decision.exists() else None)
    typer.echo(f"{len(page.models)} models compared: {written['html']} (Markdown: {written['md']})")


@app.command("plots-template")
@friendly_errors
def plots_template(
    out: Annotated[Path, typer.Option(help="where to write it (.dvc/config: plots.html_template, relative to .dvc/)")]
    = Path(".dvc/plots_offline.html"),
) -> None:
    """Write the offline HTML template of `dvc plots show` / `dvc plots diff`: Vega, Vega-Lite and Vega-Embed
    inlined (from vl-convert-python), no CDN, so the plots render on a machine with no network. The project keeps
    the result in git and .dvc/config points plots.html_template at it; rerun this after upgrading vl-convert."""
    from .eval.offline_plots import check_template, write_template

    path = write_template(out)
    problems = check_template(path.read_text(encoding="utf8"))
    if problems:
        raise typer.BadParameter("; ".join(problems))
    typer.echo(f"offline DVC plots template written to {path} ({path.stat().st_size // 1024} KiB)")


def _fmt(v: object) -> str:
    """The summary table's cells: the project's one number format (:func:`unlearn.fmt.fmt_number`)."""
    from .fmt import fmt_number

    return fmt_number(v)


@app.command("params")
@friendly_errors
def params_(
    names: Annotated[Optional[list[str]], typer.Argument(help="only these knobs or sections, e.g. method.dipo or "
                                                              "seed (default: all)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    markdown: Annotated[bool, typer.Option(help="print the Markdown reference instead (docs/params.md is "
                                                "`unlearn params --markdown`)")] = False,
) -> None:
    """Print every knob of params.yaml: its dotted name (as --set takes it), type and bounds, the code's default,
    the value --params/--set give it, and what it does. Fails, naming the key, if the parameters are invalid."""
    from .config import knobs, knobs_table, params_markdown, select_knobs

    p = _params(params, set_)
    rows = select_knobs(knobs(p), names)
    if markdown:
        typer.echo(params_markdown(p, rows, source=str(params) + (" + --set" if set_ else "")), nl=False)
    else:
        typer.echo(knobs_table(rows))


def _mount_subapps() -> None:
    from .requests.cli import request_app

    app.add_typer(request_app, name="request", help="Deletion requests: add, list, ingest the inbox, show one.")
    from .study.cli import study_app

    app.add_typer(study_app, name="study", help="The evidence study: plan, run (resumable), report from MLflow.")


_mount_subapps()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
