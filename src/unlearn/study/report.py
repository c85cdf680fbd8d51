"""``docs/results.md`` and its charts, computed from the study's finished runs alone.

The report is the study's only published form, so it is built by code from the store and nothing else
(:func:`build_report` takes the spec and the runs :func:`store.read_runs` returned; it opens no store, reads
no clock). The same runs give byte-identical files: runs are sorted before anything is summed, the charts
are drawn with matplotlib's default style, SVG ids salted with a fixed string and no date.

Which runs count is decided the way ``unlearn study run`` decides what is done: a finished run counts when
its content key (``study.cell``) is the key of a cell the current spec plans (:mod:`plan`). A run of an
older spec or params file has another key; it is counted in the provenance and left out of every number.
The tuning choice is :func:`plan.chosen_configs` on the counted tuning runs: the report applies the
criterion, it never re-implements it, so what it says was chosen is what the test cells ran with.

Forget quality is a KS p-value spanning orders of magnitude: over seeds it is summarised by its geometric
mean and its [min, max], and methods are compared on the mean of log10 forget quality. Model utility is
summarised by its mean and sample standard deviation (ddof=1).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..fmt import fmt_number, markdown_table
from ..gate import DEFAULT_GATE
from . import plan
from .plan import Cell, Choice
from .spec import Ablation, StudySpec, Value
from .store import RunRecord

FQ_BOUND: float = DEFAULT_GATE["min_forget_quality"]
"""The forget-quality half of the registration gate (TOFU's 0.05): a seed passes with FQ at least this."""

FQ_FLOOR: float = 1e-300
"""A forget quality of 0 (a KS p-value that underflowed) is taken as this in logs, so means stay finite."""

RESOURCE_METRICS: tuple[tuple[str, str], ...] = (("wall_s", "wall s"), ("peak_memory_mb", "peak MiB"))
"""Run-cost metrics shown as extra columns of the results tables when any run logged them."""

SVG_SALT = "unlearn-study-report"
CHART_HEADINGS = {"tradeoff": "Trade-off: forget quality against model utility",
                  "sensitivity": "DiPO's sensitivity to its knobs",
                  "trajectory": "Unlearning trajectory"}
DASH = "—"


# --------------------------------------------------------------------------- numbers
def _finite(values: Iterable[float | None]) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return a[np.isfinite(a)]


def _log10_fq(fq: float) -> float:
    return math.log10(max(fq, FQ_FLOOR))


def _mean(values: Iterable[float | None]) -> float:
    a = _finite(values)
    return float(a.mean()) if a.size else math.nan


def _std(values: Iterable[float | None]) -> float:
    """Sample standard deviation (ddof=1); NaN with fewer than two values (one seed has no spread)."""
    a = _finite(values)
    return float(a.std(ddof=1)) if a.size >= 2 else math.nan


def _gmean(values: Iterable[float | None]) -> float:
    a = _finite(values)
    return float(10 ** np.mean([_log10_fq(float(v)) for v in a])) if a.size else math.nan


def _metric(run: RunRecord, name: str) -> float | None:
    v = run.metrics.get(name)
    return float(v) if v is not None and math.isfinite(float(v)) else None


@dataclass(frozen=True)
class Stats:
    """One method's runs at one split, summarised over seeds (each metric over the runs that logged it)."""

    seeds: tuple[int, ...]
    fq: dict[int, float]
    """Seed -> forget quality (the pairing of the claim)."""
    mu: dict[int, float]
    ratio: dict[int, float]
    forget_prob: float
    passes: int
    relearn_before: float
    relearn_after: float
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def fq_gmean(self) -> float:
        return _gmean(self.fq.values())

    @property
    def fq_min(self) -> float:
        return min(self.fq.values()) if self.fq else math.nan

    @property
    def fq_max(self) -> float:
        return max(self.fq.values()) if self.fq else math.nan

    @property
    def log10_fq(self) -> float:
        """Mean over seeds of log10 forget quality: what methods are ranked by."""
        return _mean(_log10_fq(v) for v in self.fq.values())

    @property
    def mu_mean(self) -> float:
        return _mean(self.mu.values())

    @property
    def mu_std(self) -> float:
        return _std(self.mu.values())

    @property
    def mu_min(self) -> float:
        return min(self.mu.values()) if self.mu else math.nan

    @property
    def mu_max(self) -> float:
        return max(self.mu.values()) if self.mu else math.nan

    @property
    def ratio_mean(self) -> float:
        return _mean(self.ratio.values())


def utility_ratio(run: RunRecord, target_mu: float | None) -> float | None:
    """The run's logged ``utility_ratio`` (the store's schema: model utility over the target's, same world and
    split); computed from the target's utility when the run did not log it."""
    r = _metric(run, "utility_ratio")
    if r is not None:
        return r
    mu = _metric(run, "model_utility")
    return mu / target_mu if mu is not None and target_mu else None


def summarise(runs: Sequence[RunRecord], target_mu: float | None, min_ratio: float) -> Stats:
    """:class:`Stats` of one method's runs at one split (one run per seed). A seed passes the gate when its
    forget quality is at least :data:`FQ_BOUND` and its utility ratio at least ``min_ratio``."""
    runs = sorted(runs, key=lambda r: (r.seed, r.run_id))
    fq = {r.seed: v for r in runs if (v := _metric(r, "forget_quality")) is not None}
    mu = {r.seed: v for r in runs if (v := _metric(r, "model_utility")) is not None}
    ratio = {r.seed: v for r in runs if (v := utility_ratio(r, target_mu)) is not None}
    passes = sum(1 for r in runs if r.seed in fq and r.seed in ratio
                 and fq[r.seed] >= FQ_BOUND and ratio[r.seed] >= min_ratio)
    resources = {name: _mean(_metric(r, name) for r in runs) for name, _ in RESOURCE_METRICS}
    return Stats(tuple(r.seed for r in runs), fq, mu, ratio,
                 _mean(_metric(r, "forget_prob") for r in runs), passes,
                 _mean(_metric(r, "relearn_forget_prob_before") for r in runs),
                 _mean(_metric(r, "relearn_forget_prob_after") for r in runs),
                 {k: v for k, v in resources.items() if math.isfinite(v)})


# --------------------------------------------------------------------------- formatting
def _f(v: float | None) -> str:
    return fmt_number(None if v is None else float(v))


def _signed(v: float) -> str:
    s = _f(v)
    return "+" + s if math.isfinite(v) and v >= 0 else s


def _fq_cell(s: Stats) -> str:
    if not s.fq:
        return fmt_number(None)
    if len(s.fq) == 1:
        return _f(s.fq_gmean)
    return f"{_f(s.fq_gmean)} [{_f(s.fq_min)}, {_f(s.fq_max)}]"


def _mu_cell(s: Stats) -> str:
    if not s.mu:
        return fmt_number(None)
    return f"{_f(s.mu_mean)} ± {DASH if len(s.mu) < 2 else _f(s.mu_std)}"


def _value(v: Value) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def config_text(config: Mapping[str, Value]) -> str:
    """``knob=value, ...`` in sorted order (``(defaults)`` for an empty configuration)."""
    return ", ".join(f"{k}={_value(v)}" for k, v in sorted(config.items())) or "(defaults)"


def _md(text: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    return markdown_table(header, [[_md(c) for c in r] for r in rows])


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seeds(seeds: Iterable[int]) -> str:
    return ", ".join(str(s) for s in sorted(seeds))


def split_size(split: str) -> float:
    """The number in a split's name (``forget10`` -> 10): what "the largest tested split" means."""
    m = re.search(r"(\d+(?:\.\d+)?)\D*$", split)
    return float(m.group(1)) if m else -math.inf


# --------------------------------------------------------------------------- the plan against the runs
@dataclass
class Coverage:
    """One phase: its planned cells (keyed), which have a finished run, and cells not planned yet because
    their method has no tuning choice (``waiting``: method -> count)."""

    phase: str
    planned: list[Cell]
    done: set[str]
    waiting: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.planned) + sum(self.waiting.values())

    @property
    def finished(self) -> int:
        return sum(1 for c in self.planned if c.key in self.done)

    @property
    def missing(self) -> list[Cell]:
        return [c for c in self.planned if c.key not in self.done]


@dataclass(frozen=True)
class Claim:
    """Whether DiPO attains the highest forget quality while keeping utility at one split."""

    split: str
    status: str
    """``holds`` | ``fails`` | ``untested`` (DiPO has no test runs) | ``no-winner`` (no method keeps utility)."""
    sentence: str
    winner: str | None = None
    dipo_rank: int | None = None
    eligible: tuple[str, ...] = ()
    rival: str | None = None
    """The best method other than DiPO among those that keep utility."""
    gap: float | None = None
    """DiPO's mean log10 forget quality minus the rival's."""
    beats: tuple[int, int] | None = None
    """(seeds DiPO's forget quality is higher than the rival's, seeds both have), paired by seed."""


@dataclass(frozen=True)
class _Chart:
    stem: str


@dataclass
class Report:
    """The report drawn in memory: Markdown blocks (chart links resolved at :meth:`write`, where the file
    name is known) and each chart's SVG text, plus what the numbers were computed from (for callers and
    tests that want them without parsing the Markdown)."""

    blocks: list[str | _Chart]
    charts: dict[str, str]
    choices: dict[str, Choice]
    stats: dict[tuple[str, str], Stats]
    """(split, method) -> test runs' :class:`Stats` (reference rows under ``target`` / ``retain``)."""
    claims: dict[str, Claim]
    coverage: dict[str, Coverage]
    partial: bool

    def markdown(self, files_dir: str) -> str:
        """The Markdown, charts linked as ``files_dir/<chart>.svg`` (a path relative to the Markdown file)."""
        out = []
        for b in self.blocks:
            if isinstance(b, _Chart):
                heading = CHART_HEADINGS[b.stem]
                out.append(f"![{heading}]({files_dir}/{b.stem}.svg)")
            else:
                out.append(b)
        return "\n\n".join(out).rstrip("\n") + "\n"

    def write(self, md_path: str | Path) -> list[Path]:
        """Write the Markdown to ``md_path`` and its charts to ``<stem>_files/<chart>.svg`` beside it (a chart
        an earlier report had and this one has not is removed, so the folder never shows stale data).
        Returns the paths written, the Markdown first."""
        md_path = Path(md_path)
        files = md_path.parent / f"{md_path.stem}_files"
        md_path.parent.mkdir(parents=True, exist_ok=True)
        written = []
        if self.charts:
            files.mkdir(parents=True, exist_ok=True)
        if files.is_dir():
            for old in sorted(files.glob("*.svg")):
                if old.stem not in self.charts:
                    old.unlink()
        md_path.write_text(self.markdown(files.name), encoding="utf8")
        written.append(md_path)
        for stem, svg in self.charts.items():
            p = files / f"{stem}.svg"
            p.write_text(svg, encoding="utf8")
            written.append(p)
        return written


class _Index:
    """The runs that count, by cell key (the latest finished run of a key), and the plan keyed."""

    def __init__(self, spec: StudySpec, runs: Sequence[RunRecord], base_text: str):
        self.spec, self.base = spec, base_text
        finished = sorted((r for r in runs if r.status == "FINISHED"), key=lambda r: (r.end_time or 0, r.run_id))
        self.finished = finished
        self.by_key: dict[str, RunRecord] = {}
        for r in finished:
            if r.key:
                self.by_key[r.key] = r

    def key(self, cell: Cell) -> Cell:
        return plan.keyed(self.spec, cell, self.base)

    def run(self, cell: Cell) -> RunRecord | None:
        return self.by_key.get(cell.key)


def build_report(spec: StudySpec, runs: Sequence[RunRecord], base_text: str | None = None) -> Report:
    """The report of ``spec`` from ``runs`` (:func:`store.read_runs`); ``base_text``: the base params file's
    text the cells were keyed with (default: read ``spec.params``, as ``unlearn study run`` does)."""
    if base_text is None:
        base_text = plan.base_text(spec)
    ix = _Index(spec, runs, base_text)
    min_ratio = spec.criterion.min_utility_ratio

    # reference runs and the targets' utility
    ref_cells = [ix.key(c) for c in plan.reference_cells(spec)]
    ref_run = {(c.world, c.split, c.method): ix.run(c) for c in ref_cells}

    def target_mu(world: str, split: str) -> float | None:
        r = ref_run.get((world, split, "target"))
        return _metric(r, "model_utility") if r is not None else None

    # tuning: the criterion is plan's
    tune_planned = [ix.key(c) for c in plan.tune_cells(spec)]
    tune_runs = [r for c in tune_planned if (r := ix.run(c)) is not None]
    val_target = target_mu("validation", spec.tuning.split)
    choices = plan.chosen_configs(
        spec, [{"method": r.method, "config": r.config, "metrics": r.metrics} for r in tune_runs], val_target)
    chosen = {m: c.config for m, c in choices.items()}

    test_planned = [ix.key(c) for c in plan.test_cells(spec, chosen)]
    abl_planned = [ix.key(c) for c in plan.ablation_cells(spec, chosen)]
    per_method_tests = len(spec.splits) * len(spec.seeds)
    coverage = {
        "reference": Coverage("reference", ref_cells, set(ix.by_key)),
        "tune": Coverage("tune", tune_planned, set(ix.by_key)),
        "test": Coverage("test", test_planned, set(ix.by_key),
                         {m: per_method_tests for m in spec.methods if m not in chosen}),
        "ablation": Coverage("ablation", abl_planned, set(ix.by_key),
                             {} if "dipo" in chosen or not spec.ablations
                             else {"dipo": len(spec.ablations) * len(spec.seeds)}),
    }
    partial = any(cv.finished < cv.total for cv in coverage.values())
    counted = {c.key: ix.by_key[c.key] for cv in coverage.values() for c in cv.planned if c.key in ix.by_key}

    # test runs: (split, method) -> Stats
    test_runs: dict[tuple[str, str], list[RunRecord]] = {}
    for c in test_planned:
        if (r := ix.run(c)) is not None:
            test_runs.setdefault((c.split, c.method), []).append(r)
    stats: dict[tuple[str, str], Stats] = {}
    for (split, m), rs in test_runs.items():
        stats[(split, m)] = summarise(rs, target_mu("test", split), min_ratio)
    for (world, split, m), r in ref_run.items():
        if world == "test" and r is not None:
            stats[(split, m)] = summarise([r], target_mu("test", split), min_ratio)
    abl_runs: dict[str, list[RunRecord]] = {}
    for c in abl_planned:
        if (r := ix.run(c)) is not None:
            abl_runs.setdefault(c.ablation, []).append(r)
    abl_stats = {name: summarise(rs, target_mu("test", spec.ablation_split), min_ratio)
                 for name, rs in abl_runs.items()}

    claims = {s: _claim(spec, s, stats) for s in spec.splits}

    charts: dict[str, str] = {}
    chart_notes: dict[str, str] = {}
    svg = plot_tradeoff(spec, stats, {s: target_mu("test", s) for s in spec.splits})
    if svg:
        charts["tradeoff"] = svg
    else:
        chart_notes["tradeoff"] = "No chart: no tested split has a finished test or reference run."
    svg, notes = plot_sensitivity(spec, choices.get("dipo"), stats.get((spec.ablation_split, "dipo")), abl_stats)
    if svg:
        charts["sensitivity"] = svg
    else:
        chart_notes["sensitivity"] = "No chart: no ablation family (`family:` in the spec) has a finished run."
    traj_split = max(spec.splits, key=lambda s: (split_size(s), spec.splits.index(s))) if spec.splits else ""
    svg = plot_trajectory(spec, traj_split, test_runs) if traj_split else ""
    if svg:
        charts["trajectory"] = svg
    else:
        chart_notes["trajectory"] = (f"No chart: no test run at {traj_split} logged a `traj_forget_prob` history"
                                     + (" (the spec's `trajectory_every` is 0)." if not spec.trajectory_every
                                        else "."))

    blocks: list[str | _Chart] = []
    blocks += _header(spec, coverage, partial)
    blocks += _provenance(spec, ix, counted)
    blocks += _coverage(spec, coverage, [m for m in spec.methods if m not in choices])
    blocks += _tuning(spec, tune_planned, ix, choices, val_target)
    blocks += _results(spec, stats)
    blocks += _claims(spec, claims, stats)
    blocks += _ablations(spec, choices, stats, abl_stats)
    blocks += _relearning(spec, stats)
    blocks += ["## Charts"]
    for stem in CHART_HEADINGS:
        blocks.append(f"### {CHART_HEADINGS[stem]}")
        if stem in charts:
            blocks.append(_CHART_CAPTIONS[stem].format(split=traj_split, ratio=_f(min_ratio), fq=_f(FQ_BOUND)))
            blocks.append(_Chart(stem))
            if stem == "sensitivity" and notes:
                blocks.append("\n".join(f"- {n}" for n in notes))
        else:
            blocks.append(chart_notes[stem])
    blocks += _not_run(spec, coverage, stats, abl_stats)
    return Report(blocks, charts, choices, stats, claims, coverage, partial)


_CHART_CAPTIONS = {
    "tradeoff": ("One panel per tested split: each method's mean model utility (x) and geometric-mean forget "
                 "quality (y, log scale), bars spanning the min-max over seeds; the target (square) and retain "
                 "(diamond) models as reference points; dashed lines at forget quality {fq} and at model utility "
                 "{ratio} x the target's."),
    "sensitivity": ("One panel per ablation family: the varied knob (x) against the geometric-mean forget "
                    "quality (left axis, log scale, bars min-max) and the mean model utility (right axis); the "
                    "star is DiPO's chosen configuration (its test runs at the ablation split)."),
    "trajectory": ("Forget probability during unlearning, test runs at {split} (the largest tested split): one "
                   "line per method, the mean over seeds at each evaluated step."),
}


# --------------------------------------------------------------------------- the claim
def _claim(spec: StudySpec, split: str, stats: Mapping[tuple[str, str], Stats]) -> Claim:
    """The paper's claim at one split, from the numbers: among the methods whose mean utility ratio reaches the
    criterion's bar, the one with the highest mean log10 forget quality (ties: the order of ``spec.methods``)."""
    r = spec.criterion.min_utility_ratio
    have = [m for m in spec.methods if (split, m) in stats and stats[(split, m)].fq]
    if "dipo" not in have:
        return Claim(split, "untested", f"**{split}**: DiPO has no test runs here, so the claim is untested.")
    eligible = [m for m in have if stats[(split, m)].ratio_mean >= r]
    ranked = sorted(eligible, key=lambda m: (-stats[(split, m)].log10_fq, spec.methods.index(m)))
    d = stats[(split, "dipo")]
    if not ranked:
        return Claim(split, "no-winner", f"**{split}**: no method keeps utility (mean utility ratio >= {_f(r)}; "
                     f"DiPO's is {_f(d.ratio_mean)}), so there is no winner and the claim does not hold.")
    others = [m for m in ranked if m != "dipo"]
    rival = others[0] if others else None
    gap = beats = None
    vs = ""
    if rival is not None:
        o = stats[(split, rival)]
        gap = d.log10_fq - o.log10_fq
        paired = sorted(set(d.fq) & set(o.fq))
        beats = (sum(1 for s in paired if d.fq[s] > o.fq[s]), len(paired))
        vs = (f"DiPO minus {rival} in mean log10 forget quality: {_signed(gap)}; DiPO's forget quality is higher "
              f"on {beats[0]} of {beats[1]} seeds (paired by seed)")
    winner = ranked[0]
    keep = f"{len(ranked)} method{'s' if len(ranked) != 1 else ''} that keep utility"
    if winner == "dipo":
        rank = 1
        text = (f"**{split}**: the claim holds. DiPO keeps utility (mean utility ratio {_f(d.ratio_mean)}) and has "
                f"the highest mean log10 forget quality ({_f(d.log10_fq)}) of the {keep}"
                + (f"; the best other is {rival} ({_f(stats[(split, rival)].log10_fq)}). {vs}."
                   if rival else "; no other method keeps utility."))
        return Claim(split, "holds", text, winner, rank, tuple(ranked), rival, gap, beats)
    w = stats[(split, winner)]
    if "dipo" in ranked:
        rank = ranked.index("dipo") + 1
        text = (f"**{split}**: the claim does not hold. Of the {keep}, {winner} has the highest mean log10 forget "
                f"quality ({_f(w.log10_fq)}); DiPO ranks {rank} of {len(ranked)} ({_f(d.log10_fq)}). {vs}.")
    else:
        rank = None
        text = (f"**{split}**: the claim does not hold. DiPO does not keep utility (mean utility ratio "
                f"{_f(d.ratio_mean)} < {_f(r)}); of the {keep}, {winner} has the highest mean log10 forget quality "
                f"({_f(w.log10_fq)}; DiPO's: {_f(d.log10_fq)}). {vs}.")
    return Claim(split, "fails", text, winner, rank, tuple(ranked), rival, gap, beats)


def _overall(claims: Mapping[str, Claim]) -> str:
    by = {k: [s for s, c in claims.items() if c.status == k] for k in ("holds", "fails", "no-winner", "untested")}
    tested = len(claims) - len(by["untested"])
    parts = [f"**Overall**: the claim holds at {len(by['holds'])} of {tested} tested split"
             f"{'s' if tested != 1 else ''}" + (f" ({', '.join(by['holds'])})" if by["holds"] else "")]
    if by["fails"] or by["no-winner"]:
        parts.append("it does not hold at " + ", ".join(by["fails"] + by["no-winner"]))
    if by["untested"]:
        parts.append("untested (no DiPO test runs) at " + ", ".join(by["untested"]))
    return "; ".join(parts) + "."


# --------------------------------------------------------------------------- sections
def _header(spec: StudySpec, coverage: Mapping[str, Coverage], partial: bool) -> list[str | _Chart]:
    out: list[str | _Chart] = [
        f"# Evidence study `{spec.name}`: DiPO against the baselines",
        "<!-- generated by `unlearn study report` from the MLflow store; do not edit -->\n"
        "_Generated by `unlearn study report` from the MLflow store; do not edit._"]
    total = sum(cv.total for cv in coverage.values())
    done = sum(cv.finished for cv in coverage.values())
    if partial:
        out.append(f"> **Partial study**: {done} of {total} planned cells have a finished run; every number below "
                   f"covers only what finished (see Coverage).")
    else:
        out.append(f"Complete: every one of the {total} planned cells has a finished run.")
    return out


def _provenance(spec: StudySpec, ix: _Index, counted: Mapping[str, RunRecord]) -> list[str | _Chart]:
    per_phase = {p: sum(1 for r in counted.values() if r.phase == p) for p in plan.PHASES}
    commits = sorted({r.tag("git_commit") for r in counted.values() if r.tag("git_commit")})
    ends = [r.end_time for r in counted.values() if r.end_time]
    stale = [r for r in ix.finished if r.key not in counted]
    stale_keys = {r.key for r in stale}
    lines = [f"- **study**: `{spec.name}` (MLflow experiment `study-{spec.name}`)",
             "- **finished runs counted**: " + ", ".join(f"{p} {n}" for p, n in per_phase.items()),
             "- **git commit(s)**: " + (", ".join(f"`{c}`" for c in commits) if commits else "none recorded")
             + (" (the runs span several commits)" if len(commits) > 1 else ""),
             "- **latest run ended**: " + (_utc(max(ends)) if ends else "no finished run")]
    if stale:
        lines.append(f"- **left out**: {len(stale)} finished run{'s' if len(stale) != 1 else ''} "
                     f"({len(stale_keys)} cell key{'s' if len(stale_keys) != 1 else ''}) "
                     f"{'match' if len(stale) != 1 else 'matches'} no cell of the "
                     "current spec and params file (an earlier spec, params file or tuning choice)")
    dup = len([r for r in ix.finished if r.key in counted]) - len(counted)
    if dup:
        lines.append(f"- **re-runs**: {dup} cell{'s' if dup != 1 else ''} finished more than once; the latest "
                     "run of each counts")
    return ["## Provenance", "\n".join(lines)]


def _missing_text(cv: Coverage) -> list[str]:
    """The missing cells of a phase, grouped (method, split, ablation or configuration) -> seeds."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for c in cv.missing:
        if cv.phase == "reference":
            key: tuple[str, ...] = (c.world, c.split, c.method)
        elif cv.phase == "tune":
            key = (c.method, config_text(c.config_dict))
        elif cv.phase == "ablation":
            key = (c.ablation,)
        else:
            key = (c.method, c.split)
        groups.setdefault(key, []).append(c.seed)
    out = []
    for key, seeds in groups.items():
        if cv.phase == "tune":
            out.append(f"{key[0]} at {key[1]}")
        elif cv.phase == "reference":
            out.append(f"{key[2]} model, {key[0]} world, {key[1]}")
        else:
            out.append(f"{' '.join(key)} seed{'s' if len(seeds) != 1 else ''} {_seeds(seeds)}")
    out += [f"{m}: all {n} cells (not tuned yet)" for m, n in cv.waiting.items()]
    return out


def _coverage(spec: StudySpec, coverage: Mapping[str, Coverage], untuned: Sequence[str]) -> list[str | _Chart]:
    rows = [[p, cv.total, cv.finished, cv.total - cv.finished] for p, cv in coverage.items()]
    out: list[str | _Chart] = ["## Coverage", _table(["phase", "planned cells", "finished", "missing"], rows)]
    lines = []
    for p, cv in coverage.items():
        missing = cv.total - cv.finished
        if missing:
            lines.append(f"- {p}: {missing} of {cv.total} cells missing: " + "; ".join(_missing_text(cv)))
    if untuned:
        lines.append("- tuning incomplete, no configuration chosen yet (so no test or ablation cells): "
                     + ", ".join(untuned))
    out.append("\n".join(lines) if lines else "Nothing is missing.")
    return out


def _tuning(spec: StudySpec, planned: Sequence[Cell], ix: _Index, choices: Mapping[str, Choice],
            val_target: float | None) -> list[str | _Chart]:
    r = spec.criterion.min_utility_ratio
    out: list[str | _Chart] = [
        "## Tuning",
        f"Criterion (`{spec.criterion.rule}`, fixed before any test number was seen; read on the validation world "
        f"at {spec.tuning.split}, seed {spec.tuning.seed_of_runs}): among the configurations whose model utility "
        f"is at least {_f(r)} x the target's, the one with the highest forget quality; when none keeps utility, "
        f"the one with the highest utility ratio (marked as failing the utility bar). Every method gets the same "
        f"budget of {spec.tuning.budget} configurations (its whole grid when smaller)."]
    if val_target is None:
        out.append(f"**No choice can be made yet**: the validation world's target model at {spec.tuning.split} "
                   "has no finished run with a model utility, so no configuration is chosen.")
    else:
        out.append(f"Validation target model utility: {_f(val_target)}.")
    rows, detail, incomplete = [], [], []
    for m in spec.methods:
        cells = [c for c in planned if c.method == m]
        got = [c for c in cells if ix.run(c) is not None]
        tried = f"{len(got)} of {len(cells)}" + (" (whole grid)" if len(cells) < spec.tuning.budget else "")
        ch = choices.get(m)
        if ch is None:
            incomplete.append(m)
            rows.append([m, tried, "no choice yet" if len(got) < len(cells) or val_target is None
                         else "no valid run", fmt_number(None), fmt_number(None), DASH])
        else:
            rows.append([m, tried, config_text(ch.config), _f(ch.forget_quality), _f(ch.utility_ratio),
                         "yes" if ch.kept_utility else f"no (no configuration reached {_f(r)})"])
        for c in cells:
            run = ix.run(c)
            mu = _metric(run, "model_utility") if run else None
            ratio = mu / val_target if mu is not None and val_target else None
            mark = "chosen" if ch is not None and ch.config == c.config_dict else ""
            detail.append([m, config_text(c.config_dict),
                           _f(_metric(run, "forget_quality")) if run else "not run",
                           _f(mu) if run else "not run", _f(ratio), mark])
    out.append(_table(["method", "configurations tried", "chosen configuration", "validation forget quality",
                       "validation utility ratio", "kept utility"], rows))
    if incomplete:
        out.append("Tuning incomplete (no choice yet, so no test or ablation cells): " + ", ".join(incomplete) + ".")
    out.append("Every tuning run:")
    out.append(_table(["method", "configuration", "forget quality", "model utility", "utility ratio", ""], detail))
    return out


def _stats_row(label: str, s: Stats, *, reference: bool, resources: Sequence[str]) -> list[str]:
    relearn = (DASH if reference or not (math.isfinite(s.relearn_before) or math.isfinite(s.relearn_after))
               else f"{_f(s.relearn_before)} → {_f(s.relearn_after)}")
    return [label, str(s.n), _fq_cell(s), _mu_cell(s), _f(s.ratio_mean), _f(s.forget_prob),
            DASH if reference else f"{s.passes}/{s.n}", relearn,
            *(_f(s.resources.get(k)) for k in resources)]


def _results(spec: StudySpec, stats: Mapping[tuple[str, str], Stats]) -> list[str | _Chart]:
    resources = [k for k, _ in RESOURCE_METRICS if any(k in s.resources for s in stats.values())]
    header = ["method", "seeds", "forget quality: geo-mean [min, max]", "model utility: mean ± std",
              "utility ratio", "forget_prob", "gate passes", "relearn forget_prob: before → after",
              *(dict(RESOURCE_METRICS)[k] for k in resources)]
    out: list[str | _Chart] = [
        "## Results",
        f"Test world, every method at its chosen configuration, seeds {_seeds(spec.seeds)}. A seed passes the gate "
        f"when its forget quality is at least {_f(FQ_BOUND)} and its utility ratio at least "
        f"{_f(spec.criterion.min_utility_ratio)}. The target and retain rows are single reference runs."]
    for split in spec.splits:
        rows = [_stats_row(m, stats[(split, m)], reference=True, resources=resources)
                for m in plan.REFERENCE_MODELS if (split, m) in stats]
        rows += [_stats_row(m, stats[(split, m)], reference=False, resources=resources)
                 for m in spec.methods if (split, m) in stats]
        out.append(f"### {split}")
        out.append(_table(header, rows) if rows else f"No finished run at {split}.")
    return out


def _claims(spec: StudySpec, claims: Mapping[str, Claim], stats: Mapping[tuple[str, str], Stats]
            ) -> list[str | _Chart]:
    r = spec.criterion.min_utility_ratio
    out: list[str | _Chart] = [
        "## Does DiPO do what the paper claims?",
        f"The claim: the highest forget quality while keeping model utility. Computed per split from the test runs "
        f"above: among the methods whose mean utility ratio is at least {_f(r)}, the one with the highest mean "
        f"log10 forget quality."]
    for split in spec.splits:
        out.append(claims[split].sentence)
        have = [m for m in spec.methods if (split, m) in stats and stats[(split, m)].fq]
        if have:
            ranked = claims[split].eligible
            rows = [[m, _f(stats[(split, m)].log10_fq), _f(stats[(split, m)].ratio_mean),
                     "yes" if m in ranked else "no", ranked.index(m) + 1 if m in ranked else DASH]
                    for m in sorted(have, key=lambda m: (m not in ranked, -stats[(split, m)].log10_fq,
                                                         spec.methods.index(m)))]
            out.append(_table(["method", "mean log10 forget quality", "mean utility ratio", "keeps utility",
                               "rank"], rows))
    out.append(_overall(claims))
    return out


def _ablations(spec: StudySpec, choices: Mapping[str, Choice], stats: Mapping[tuple[str, str], Stats],
               abl_stats: Mapping[str, Stats]) -> list[str | _Chart]:
    out: list[str | _Chart] = ["## Ablations of DiPO"]
    if not spec.ablations:
        return out + ["The spec lists no ablations."]
    out.append(f"Each variant starts from DiPO's chosen configuration"
               + (f" ({config_text(choices['dipo'].config)})" if "dipo" in choices else " (not chosen yet)")
               + f", at {spec.ablation_split}, seeds {_seeds(spec.seeds)}; the base row is DiPO's test runs there.")
    base = stats.get((spec.ablation_split, "dipo"))
    header = ["variant", "family", "changes", "seeds", "forget quality: geo-mean [min, max]",
              "model utility: mean ± std", "log10 FQ vs base"]
    rows = []
    if base is not None:
        rows.append(["base (chosen config)", "", "", base.n, _fq_cell(base), _mu_cell(base), DASH])
    else:
        rows.append(["base (chosen config)", "", "", 0, "no runs"
                     + ("" if spec.ablation_split in spec.splits else f" ({spec.ablation_split} is not a tested split)"),
                     fmt_number(None), DASH])
    for a in spec.ablations:
        s = abl_stats.get(a.name)
        changes = ", ".join([config_text(a.overrides)] * bool(a.overrides) + [f"reference={a.reference}"])
        if s is None:
            rows.append([a.name, a.family, changes, 0, "not run", fmt_number(None), DASH])
            continue
        delta = s.log10_fq - base.log10_fq if base is not None and s.fq and base.fq else math.nan
        rows.append([a.name, a.family, changes, s.n, _fq_cell(s), _mu_cell(s), _signed(delta)])
    out.append(_table(header, rows))
    return out


def _relearning(spec: StudySpec, stats: Mapping[tuple[str, str], Stats]) -> list[str | _Chart]:
    out: list[str | _Chart] = ["## Relearning attack"]
    rl = spec.relearn
    if not rl.enabled:
        return out + ["Not run: `relearn.enabled` is false in the spec."]
    out.append(f"Each tested model fine-tuned {rl.steps} steps (lr {rl.lr}, batch {rl.batch_size}) on the first "
               f"{rl.fraction:.0%} of its forget rows; forget probability of the remaining rows before and after "
               f"(means over seeds). Recovered = after - before: how much of the forgotten rest comes back.")
    for split in spec.splits:
        rows = []
        for m in spec.methods:
            s = stats.get((split, m))
            if s is None or not (math.isfinite(s.relearn_before) or math.isfinite(s.relearn_after)):
                continue
            rows.append([m, s.n, _f(s.relearn_before), _f(s.relearn_after),
                         _signed(s.relearn_after - s.relearn_before)])
        out.append(f"### {split}")
        out.append(_table(["method", "seeds", "before", "after", "recovered"], rows) if rows
                   else f"No test run at {split} logged the relearning attack.")
    return out


def _not_run(spec: StudySpec, coverage: Mapping[str, Coverage], stats: Mapping[tuple[str, str], Stats],
             abl_stats: Mapping[str, Stats]) -> list[str | _Chart]:
    lines = []
    for m in spec.methods:
        if not any((s, m) in stats for s in spec.splits):
            lines.append(f"- {m}: no test runs" + (" (not tuned yet)" if m in coverage["test"].waiting else ""))
        else:
            gone = [s for s in spec.splits if (s, m) not in stats]
            if gone:
                lines.append(f"- {m}: no test runs at {', '.join(gone)}")
    for s in spec.splits:
        for ref in plan.REFERENCE_MODELS:
            if (s, ref) not in stats:
                lines.append(f"- the {ref} model at {s}: no reference run")
    for a in spec.ablations:
        if a.name not in abl_stats:
            lines.append(f"- ablation {a.name}: no runs")
    if not spec.relearn.enabled:
        lines.append("- the relearning attack (disabled in the spec)")
    if not spec.trajectory_every:
        lines.append("- the unlearning trajectory (`trajectory_every` is 0)")
    worlds = "; ".join(f"{w} ({', '.join(f'`{o}`' for o in ovr) or 'the base params file as is'})"
                       for w, ovr in spec.worlds.items())
    lines.append(f"- anything outside this spec: the report covers only the worlds it names, {worlds}, with the "
                 f"base params file `{spec.params}`. Benchmarks and data those worlds do not select (MUSE, or the "
                 "real TOFU files unless a world's overrides select them) have no runs here.")
    return ["## Not run", "\n".join(lines)]


# --------------------------------------------------------------------------- charts
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class _Style:
    """Matplotlib's default style with text kept as text and ids from a fixed salt: the same data draws the
    same bytes whatever the user's matplotlibrc says."""

    def __enter__(self):
        import matplotlib
        import matplotlib.style

        self._style = matplotlib.style.context("default")
        self._style.__enter__()
        self._rc = matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": SVG_SALT})
        self._rc.__enter__()
        return self

    def __exit__(self, *exc):
        self._rc.__exit__(*exc)
        self._style.__exit__(*exc)
        return False


def _svg(fig) -> str:
    plt = _pyplot()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue()


_COLOURS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray",
            "gold", "navy", "teal", "maroon")


def _colour(spec: StudySpec, method: str) -> str:
    return _COLOURS[spec.methods.index(method) % len(_COLOURS)]


def _span(centre: float, lo: float, hi: float) -> list[list[float]]:
    return [[max(centre - lo, 0.0)], [max(hi - centre, 0.0)]]


def plot_tradeoff(spec: StudySpec, stats: Mapping[tuple[str, str], Stats],
                  target_mu: Mapping[str, float | None]) -> str:
    """One panel per tested split with data (empty string when none has any)."""
    splits = [s for s in spec.splits if any((s, m) in stats for m in (*plan.REFERENCE_MODELS, *spec.methods))]
    if not splits:
        return ""
    plt = _pyplot()
    with _Style():
        fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4.6), dpi=100, squeeze=False)
        ref_style = {"target": ("tab:red", "s"), "retain": ("tab:green", "D")}
        for ax, split in zip(axes[0], splits):
            ys: list[float] = []
            for m in (*plan.REFERENCE_MODELS, *spec.methods):
                s = stats.get((split, m))
                if s is None or not s.fq or not s.mu:
                    continue
                x, y = s.mu_mean, max(s.fq_gmean, FQ_FLOOR)
                ys += [max(s.fq_min, FQ_FLOOR), max(s.fq_max, FQ_FLOOR)]
                if m in ref_style:
                    colour, marker = ref_style[m]
                    ax.scatter([x], [y], color=colour, marker=marker, s=70, zorder=3, edgecolors="black",
                               linewidths=0.5, label=m)
                else:
                    ax.errorbar([x], [y], xerr=_span(x, s.mu_min, s.mu_max),
                                yerr=_span(y, max(s.fq_min, FQ_FLOOR), max(s.fq_max, FQ_FLOOR)),
                                fmt="*" if m == "dipo" else "o", ms=12 if m == "dipo" else 7,
                                color=_colour(spec, m), capsize=3, zorder=2, label=m)
                ax.annotate(m, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
            ax.set_yscale("log")
            ax.axhline(FQ_BOUND, color="grey", ls="--", lw=0.8)
            t = target_mu.get(split)
            if t is not None:
                ax.axvline(spec.criterion.min_utility_ratio * t, color="grey", ls="--", lw=0.8)
            if ys:
                ax.set_ylim(min(min(ys), FQ_BOUND) / 10, max(max(ys) * 3, 2.0))
            ax.set_title(split)
            ax.set_xlabel("model utility (higher is better)")
            ax.set_ylabel("forget quality (log scale; higher is better)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        return _svg(fig)


def _family_knob(members: Sequence[Ablation]) -> str | None:
    """The one knob every variant of a family overrides (None when they do not share exactly one)."""
    keys = {tuple(sorted(a.overrides)) for a in members}
    if len(keys) == 1:
        (k,) = keys
        if len(k) == 1:
            return k[0]
    return None


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def plot_sensitivity(spec: StudySpec, dipo: Choice | None, base: Stats | None,
                     abl_stats: Mapping[str, Stats]) -> tuple[str, list[str]]:
    """One panel per ablation family with a finished run: the knob's value against forget quality (log) and
    model utility (twin axis), the base point at DiPO's chosen value. Returns (svg or "", notes)."""
    families: dict[str, list[Ablation]] = {}
    for a in spec.ablations:
        if a.family:
            families.setdefault(a.family, []).append(a)
    panels, notes = [], []
    for fam, members in families.items():
        knob = _family_knob(members)
        if knob is None:
            notes.append(f"family {fam}: its variants do not override exactly one shared knob; not drawn")
            continue
        pts: list[tuple[float, Stats, bool]] = []
        for a in members:
            x = _number(a.overrides[knob])
            if a.name in abl_stats and x is not None:
                pts.append((x, abl_stats[a.name], False))
        if not pts:
            continue
        bx = _number(dipo.config.get(knob)) if dipo is not None else None
        if bx is not None and base is not None:
            pts.append((bx, base, True))
        else:
            notes.append(f"family {fam}: no base point ("
                         + (f"`{knob}` is not a tuned knob of DiPO, so its base value is not in the store"
                            if dipo is not None and knob not in dipo.config else "no DiPO test runs at the ablation split")
                         + ")")
        panels.append((fam, knob, sorted(pts, key=lambda p: (p[0], p[2]))))
    if not panels:
        return "", notes
    plt = _pyplot()
    with _Style():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.0), dpi=100, squeeze=False)
        for ax, (fam, knob, pts) in zip(axes[0], panels):
            ok = [p for p in pts if p[1].fq]
            xs = [p[0] for p in ok]
            fq = [max(p[1].fq_gmean, FQ_FLOOR) for p in ok]
            ax.plot(xs, fq, "-", color="tab:blue", lw=1)
            for (x, s, is_base), y in zip(ok, fq):
                ax.errorbar([x], [y], yerr=_span(y, max(s.fq_min, FQ_FLOOR), max(s.fq_max, FQ_FLOOR)),
                            fmt="*" if is_base else "o", ms=12 if is_base else 6, color="tab:blue", capsize=3)
            ax.set_yscale("log")
            ax.set_xlabel(knob)
            ax.set_ylabel("forget quality (geo-mean, log)", color="tab:blue")
            ax.set_title(f"family {fam}")
            ax.grid(alpha=0.3)
            ax2 = ax.twinx()
            mu = [(p[0], p[1].mu_mean, p[2]) for p in pts if p[1].mu]
            ax2.plot([m[0] for m in mu], [m[1] for m in mu], "--", color="tab:orange", lw=1)
            for x, y, is_base in mu:
                ax2.plot([x], [y], "*" if is_base else "s", ms=12 if is_base else 6, color="tab:orange")
            ax2.set_ylabel("model utility (mean)", color="tab:orange")
        fig.tight_layout()
        return _svg(fig), notes


def plot_trajectory(spec: StudySpec, split: str, test_runs: Mapping[tuple[str, str], Sequence[RunRecord]]) -> str:
    """``traj_forget_prob`` against step at ``split``, one line per method (mean over seeds at each step)."""
    lines = []
    for m in spec.methods:
        by_step: dict[int, list[float]] = {}
        for r in sorted(test_runs.get((split, m), []), key=lambda r: (r.seed, r.run_id)):
            for step, v in r.history.get("traj_forget_prob", []):
                if math.isfinite(v):
                    by_step.setdefault(int(step), []).append(float(v))
        if by_step:
            steps = sorted(by_step)
            lines.append((m, steps, [float(np.mean(by_step[s])) for s in steps]))
    if not lines:
        return ""
    plt = _pyplot()
    with _Style():
        fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=100)
        for m, steps, ys in lines:
            ax.plot(steps, ys, "-o", ms=3, lw=2 if m == "dipo" else 1.2, color=_colour(spec, m), label=m)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("forget probability (mean over seeds)")
        ax.set_title(f"Trajectory at {split}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return _svg(fig)

