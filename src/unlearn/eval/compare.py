"""The models of one pipeline run side by side: ``comparison.html`` (self-contained) and its Markdown twin.

One page per run, beside each model's own ``report.html``: every model (target,
retain, each unlearned model) in one table with the benchmark's metrics, its
utility relative to the target's and what the gate says of it; the trade-off plot
(the gate's forget metric against its utility metric, TOFU's forget quality on a log
axis, the gate's thresholds drawn in); the benchmark's histograms overlaid (TOFU:
forget truth ratios; MUSE: membership-inference scores); the loss curves; and a link
to each model's report.

Charts are inline SVG drawn by matplotlib, so the page renders with no network and
no script; the Markdown twin shows the same charts as SVG files in ``<stem>_files/``.
The charts are drawn once (:func:`build_comparison`) and the page written afterwards
(:meth:`Comparison.write`), so the register stage draws before it registers anything
and writes the page with the registration's outcome.

This module reads no files: :func:`unlearn.stages.comparison` gathers the inputs
(:func:`tofu_histograms` and :func:`muse_histograms` turn per-example records into
histogram series).
"""

from __future__ import annotations

import html
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from unlearn.fmt import fmt_number, markdown_table
from unlearn.gate import GateMetrics, as_float, gate_decision

from .report import _md_cell, html_page

ROLES = ("target", "retain", "unlearned")
STYLE = {"target": ("tab:red", "s"), "retain": ("tab:green", "D"), "unlearned": ("tab:blue", "o")}
"""Colour and marker of each role's main model; further unlearned models take the next colours of the cycle."""
_EXTRA_COLOURS = ("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


@dataclass
class ModelEntry:
    """One model of the comparison: ``role`` is target, retain or unlearned; ``group`` joins unlearned models
    into a line on the trade-off plot (a MUSE sequence); ``report``: its ``report.html``, linked."""

    name: str
    label: str
    role: str
    metrics: Mapping[str, Any]
    report: Path | None = None
    group: str | None = None


@dataclass
class Histogram:
    """One histogram panel: a series of values per model label, overlaid on shared bins."""

    title: str
    xlabel: str
    series: dict[str, np.ndarray]
    vline: float | None = None


@dataclass
class LossCurve:
    """A loss log drawn in ``panel`` (one axis per panel): ``[(step, value)]``; ``dashed`` for a component."""

    label: str
    panel: str
    points: list[tuple[float, float]]
    dashed: bool = False
    model: str | None = None
    """The label of the model it belongs to (its colour); default ``label``."""


@dataclass
class Comparison:
    """The drawn comparison: what :meth:`write` puts on the page."""

    title: str
    models: list[ModelEntry]
    columns: list[str]
    names: GateMetrics
    gate: Mapping[str, float]
    info: list[tuple[str, str]]
    charts: dict[str, tuple[str, str]] = field(default_factory=dict)
    """``{file stem: (heading, svg text)}``, in page order."""
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ rows
    def target_metrics(self) -> Mapping[str, Any] | None:
        return next((m.metrics for m in self.models if m.role == "target"), None)

    def utility_ratio(self, m: ModelEntry) -> float | None:
        t = as_float((self.target_metrics() or {}).get(self.names.utility))
        u = as_float(m.metrics.get(self.names.utility))
        return u / t if u is not None and t else None

    def gate_cell(self, m: ModelEntry) -> str:
        """``passes`` / ``fails: reasons`` for an unlearned model (the gate's pure rule), empty for the others."""
        if m.role != "unlearned":
            return ""
        d = gate_decision(m.metrics, self.target_metrics(), self.gate, self.names)
        return "passes" if d.passed else "fails: " + "; ".join(d.reasons)

    def rows(self, out_dir: Path) -> list[dict[str, Any]]:
        out = []
        for m in self.models:
            link = os.path.relpath(m.report, out_dir) if m.report is not None else None
            out.append({"model": m.label, "role": m.role, **{c: m.metrics.get(c) for c in self.columns},
                        "utility_ratio": self.utility_ratio(m), "gate": self.gate_cell(m),
                        "report": Path(link).as_posix() if link else None})
        return out

    # ------------------------------------------------------------------ files
    def write(self, out_dir: str | Path, stem: str = "comparison", *,
              registration: Mapping[str, Any] | None = None) -> dict[str, Path]:
        """Write ``<stem>.html`` (charts inline), ``<stem>.md`` and ``<stem>_files/<chart>.svg`` into ``out_dir``.

        ``registration``: the register stage's decision (``passed``, ``reasons``, ``version``, ``alias``,
        ``registered_model``, ``run_id``), shown at the top of the page; None leaves it out.
        """
        out_dir = Path(out_dir)
        files = out_dir / f"{stem}_files"
        files.mkdir(parents=True, exist_ok=True)
        for old in files.glob("*.svg"):  # a chart an earlier page had and this one has not
            if old.stem not in self.charts:
                old.unlink()
        svgs = {}
        for key, (_, svg) in self.charts.items():
            svgs[key] = files / f"{key}.svg"
            svgs[key].write_text(svg, encoding="utf8")
        rows = self.rows(out_dir)
        banner = registration_line(registration)
        md_path, html_path = out_dir / f"{stem}.md", out_dir / f"{stem}.html"
        md_path.write_text(self._markdown(rows, banner, files.name), encoding="utf8")
        html_path.write_text(self._html(rows, banner), encoding="utf8")
        return {"html": html_path, "md": md_path, **svgs}

    def _header(self) -> list[str]:
        return ["model", "role", *self.columns, "utility / target", "gate", "report"]

    def _cells(self, r: Mapping[str, Any]) -> list[str]:
        return [r["model"], r["role"], *(fmt_number(r[c]) for c in self.columns), fmt_number(r["utility_ratio"]),
                r["gate"]]

    def _markdown(self, rows: list[dict], banner: str, files: str) -> str:
        md = [f"# {_md_cell(self.title)}", ""]
        md += [f"- **{_md_cell(k)}**: {_md_cell(v)}" for k, v in self.info]
        if banner:
            md += [f"- **registration**: {_md_cell(banner)}"]
        md += ["", markdown_table(
            self._header(),
            [[*(_md_cell(c) for c in self._cells(r)), f"[report.html]({r['report']})" if r["report"] else "n/a"]
             for r in rows], pad=False), ""]
        md += [line for n in self.notes for line in (f"_{_md_cell(n)}_", "")]
        for key, (heading, _) in self.charts.items():
            md += [f"## {_md_cell(heading)}", "", f"![{_md_cell(heading)}]({files}/{key}.svg)", ""]
        return "\n".join(md)

    def _html(self, rows: list[dict], banner: str) -> str:
        esc = lambda x: html.escape("" if x is None else str(x), quote=True)  # noqa: E731
        gate_cols = {self.names.forget, self.names.utility}
        gate_th = ' class="gate"'
        head = "".join(f"<th{gate_th if h in gate_cols else ''}>{esc(h).replace('_', '_<wbr>')}</th>"
                       for h in self._header())
        body_rows = []
        for r in rows:
            cells = self._cells(r)
            tds = [f"<td>{esc(cells[0])}</td>", f"<td>{esc(cells[1])}</td>"]
            for c, v in zip(self.columns, cells[2:2 + len(self.columns)]):
                cls = "num gate" if c in gate_cols else "num"
                tds.append(f'<td class="{cls}">{esc(v)}</td>')
            tds.append(f'<td class="num">{esc(cells[-2])}</td>')
            g = cells[-1]
            cls = "pass" if g == "passes" else "fail" if g else ""
            tds.append(f'<td class="{cls}">{esc(g)}</td>')
            tds.append(f'<td><a href="{esc(r["report"])}">report.html</a></td>' if r["report"] else "<td>n/a</td>")
            body_rows.append(f'<tr class="{esc(r["role"])}">{"".join(tds)}</tr>')
        info = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in self.info)
        if banner:
            info += f"<li><b>registration</b>: {esc(banner)}</li>"
        notes = "".join(f'<p class="note">{esc(n)}</p>' for n in self.notes)
        charts = "".join(f'<h2>{esc(heading)}</h2>\n<div class="chart" id="chart-{esc(key)}">{_inline(svg)}</div>\n'
                         for key, (heading, svg) in self.charts.items())
        body = (f'<ul class="info">{info}</ul>\n<div class="wide"><table class="compare"><tr>{head}</tr>\n'
                + "\n".join(body_rows) + f"\n</table></div>\n{notes}\n{charts}")
        css = ("div.wide { overflow-x: auto; }\ntable.compare { font-size: 0.9em; }\n"
               "table.compare td.fail { max-width: 20em; }\nth.gate, td.gate { background: #f3f7ff; }\n"
               "td.pass { color: #176117; }\ntd.fail { color: #a31515; }\np.note { color: #444; font-size: 0.9em; }\n"
               "div.chart svg { max-width: 100%; height: auto; }")
        return html_page(self.title, body, max_width="90em", css=css)


def registration_line(d: Mapping[str, Any] | None) -> str:
    """One line on what the register stage did: the version and alias it registered, or why the gate refused."""
    if not d:
        return ""
    run = f" (MLflow run {d['run_id']})" if d.get("run_id") else ""
    if d.get("passed") and d.get("version") is not None:
        aliases = ", ".join(d.get("aliases") or [d.get("alias") or ""])
        return f"registered as {d.get('registered_model')} version {d['version']} ({aliases}){run}"
    reasons = "; ".join(d.get("reasons") or []) or "not registered"
    return f"not registered, the gate refused: {reasons}{run}"


def _inline(svg: str) -> str:
    """An SVG document as an element to put in HTML (no XML declaration or DOCTYPE)."""
    return re.sub(r"^\s*(<\?xml[^>]*\?>\s*)?(<!DOCTYPE[^>]*>\s*)?", "", svg)


# --------------------------------------------------------------------------- charts
def _svg(fig, salt: str) -> str:
    """The figure as SVG text: text kept as text, no date and ids from ``salt``, so the same data draws the
    same file (the docs' copy diffs cleanly)."""
    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(models: Sequence[ModelEntry]) -> dict[str, tuple[str, str]]:
    """Colour and marker per model name: the role's for the first model of each role, then the cycle."""
    out, seen, extra = {}, set(), iter(_EXTRA_COLOURS * 4)
    groups: dict[str, str] = {}
    for m in models:
        if m.role in STYLE and m.role not in seen:
            out[m.name] = STYLE[m.role]
            seen.add(m.role)
        elif m.group is not None:
            if m.group not in groups:
                groups[m.group] = next(extra)
            out[m.name] = (groups[m.group], "^")
        else:
            out[m.name] = (next(extra), "v")
    return out


def plot_tradeoff(models: Sequence[ModelEntry], names: GateMetrics, gate: Mapping[str, float], *,
                  log_forget: bool) -> str:
    """The gate's forget metric (y; log axis when ``log_forget``) against its utility metric (x), one labelled
    point per model, unlearned models of one group joined in order, the region the gate accepts shaded."""
    plt = _pyplot()
    styles = _styles(models)
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=100)
    pts = {m.name: (as_float(m.metrics.get(names.utility)), as_float(m.metrics.get(names.forget))) for m in models}
    if log_forget:
        pts = {k: (x, y if y is None or y > 0 else None) for k, (x, y) in pts.items()}
    drawn = {k: v for k, v in pts.items() if v[0] is not None and v[1] is not None}
    groups: dict[str, list[str]] = {}
    for m in models:
        if m.group is not None and m.name in drawn:
            groups.setdefault(m.group, []).append(m.name)
    for g, members in groups.items():
        colour = styles[members[0]][0]
        ax.plot([drawn[n][0] for n in members], [drawn[n][1] for n in members], color=colour, lw=1, alpha=0.6,
                zorder=1)
    for m in models:
        if m.name not in drawn:
            continue
        x, y = drawn[m.name]
        colour, marker = styles[m.name]
        ax.scatter([x], [y], color=colour, marker=marker, s=60 if m.group is None else 36, zorder=3,
                   label=m.label if m.group is None else None, edgecolors="black", linewidths=0.5)
        ax.annotate(m.label, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
    for g, members in groups.items():
        ax.scatter([], [], color=styles[members[0]][0], marker="^", label=g)
    if log_forget:
        ax.set_yscale("log")
    # the gate: utility at least min_utility_ratio x the target's; the forget bound
    target = next((m for m in models if m.role == "target"), None)
    t_util = as_float(target.metrics.get(names.utility)) if target is not None else None
    ratio = gate.get("min_utility_ratio")
    util_bound = t_util * ratio if t_util is not None and ratio is not None else None
    if drawn:
        xs = [v[0] for v in drawn.values()] + ([util_bound] if util_bound is not None else [])
        ys = [v[1] for v in drawn.values()]
        lo_x, hi_x = min(xs), max(xs)
        pad = max((hi_x - lo_x) * 0.15, 0.02)
        ax.set_xlim(lo_x - pad, hi_x + pad * 2)
        if log_forget:
            ax.set_ylim(min(ys) / 10, max(max(ys) * 3, 2.0))
        else:
            span = max(max(ys) - min(ys), 1.0)
            ax.set_ylim(min(min(ys), 0) - 0.15 * span, max(max(ys), 0) + 0.15 * span)
    elif log_forget:
        ax.set_ylim(1e-8, 2.0)  # nothing to place (no forget quality without a retain model): an empty log axis
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    if util_bound is not None:
        ax.axvline(util_bound, color="grey", ls="--", lw=0.8)
    if names.forget_rule == "min" and gate.get(names.forget_bound) is not None:
        fb = gate[names.forget_bound]
        ax.axhline(fb, color="grey", ls="--", lw=0.8)
        ax.fill_between([util_bound if util_bound is not None else x0, x1], fb, y1, color="tab:green", alpha=0.07,
                        zorder=0, label="the gate accepts")
    elif names.forget_rule == "abs_max" and gate.get(names.forget_bound) is not None:
        fb = gate[names.forget_bound]
        ax.axhline(0, color="black", lw=0.6)
        ax.fill_between([util_bound if util_bound is not None else x0, x1], -fb, fb, color="tab:green", alpha=0.07,
                        zorder=0, label="the gate accepts")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel(f"{names.utility} (utility; higher is better)")
    better = "higher is better" if names.forget_rule == "min" else "closer to 0 is better"
    ax.set_ylabel(f"{names.forget} ({'log scale; ' if log_forget else ''}{better})")
    ax.grid(alpha=0.3, which="both" if not log_forget else "major")
    if not drawn:
        ax.text(0.5, 0.5, "no model has both metrics", ha="center", va="center", transform=ax.transAxes)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"Trade-off: {names.forget} vs {names.utility}")
    fig.tight_layout()
    return _svg(fig, "tradeoff")


def plot_histograms(hists: Sequence[Histogram], colours: Mapping[str, str]) -> str:
    """One panel per histogram, every model's values overlaid on shared bins (outlined, lightly filled)."""
    plt = _pyplot()
    n = max(len(hists), 1)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.0), dpi=100, squeeze=False)
    for ax, h in zip(axes[0], hists):
        vals = {k: np.asarray(v, dtype=np.float64) for k, v in h.series.items()}
        vals = {k: v[np.isfinite(v)] for k, v in vals.items()}
        vals = {k: v for k, v in vals.items() if v.size}
        both = np.concatenate(list(vals.values())) if vals else np.zeros(0)
        if both.size:
            lo, hi = float(both.min()), float(both.max())
            if hi - lo < 1e-9:
                lo, hi = lo - 0.5, hi + 0.5
            bins = np.linspace(lo, hi, 31)
            for k, v in vals.items():
                c = colours.get(k)
                ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.15, color=c)
                ax.hist(v, bins=bins, histtype="step", lw=1.6, color=c, label=f"{k} (n={v.size})")
            if h.vline is not None:
                ax.axvline(h.vline, color="k", lw=0.8, ls="--")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(h.title, fontsize=10)
        ax.set_xlabel(h.xlabel, fontsize=9)
        ax.set_ylabel("examples", fontsize=9)
    fig.tight_layout()
    return _svg(fig, "histograms")


def plot_losses(curves: Sequence[LossCurve], colours: Mapping[str, str]) -> str:
    """One axis per panel (fine-tuning, unlearning), each curve against its optimizer step."""
    plt = _pyplot()
    panels = list(dict.fromkeys(c.panel for c in curves)) or ["loss"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.8), dpi=100, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        mine = [c for c in curves if c.panel == panel and c.points]
        for c in mine:
            xs, ys = zip(*c.points)
            ax.plot(xs, ys, lw=1.0 if c.dashed else 1.5, ls="--" if c.dashed else "-",
                    color=colours.get(c.model or c.label), label=c.label, alpha=0.9)
        if mine:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no loss log", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.set_ylabel("loss", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _svg(fig, "loss")


def build_comparison(
    *,
    title: str,
    models: Sequence[ModelEntry],
    columns: Sequence[str],
    names: GateMetrics,
    gate: Mapping[str, float],
    histograms: Sequence[Histogram] = (),
    losses: Sequence[LossCurve] = (),
    info: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
) -> Comparison:
    """Draw the charts of a comparison (trade-off, histograms if any, loss curves if any); nothing is written.

    ``columns``: the metrics of the table, in order (those no model has are left out). TOFU's forget metric
    (``forget_rule`` ``min``: a p-value) is drawn on a log axis, MUSE's PrivLeak on a linear one.
    """
    models = list(models)
    cols = [c for c in columns if any(m.metrics.get(c) is not None for m in models)]
    for c in (names.forget, names.utility):
        if c not in cols:
            cols.append(c)
    notes = [f"utility / target: {names.utility} over the target model's (the gate's utility rule).", *notes]
    comp = Comparison(title=title, models=models, columns=cols, names=names, gate=dict(gate), info=list(info),
                      notes=notes)
    styles = _styles(models)
    colours = {m.label: styles[m.name][0] for m in models}
    log_forget = names.forget_rule == "min"
    comp.charts["tradeoff"] = (
        f"Trade-off: {names.forget}{' (log axis)' if log_forget else ''} vs {names.utility}",
        plot_tradeoff(models, names, gate, log_forget=log_forget))
    if histograms:
        comp.charts["histograms"] = ("; ".join(dict.fromkeys(h.title.split(":")[0] for h in histograms)),
                                     plot_histograms(histograms, colours))
    if any(c.points for c in losses):
        comp.charts["loss"] = ("Loss curves", plot_losses(losses, colours))
    return comp


# --------------------------------------------------------------------------- inputs from per-example records
def tofu_histograms(records: Mapping[str, Sequence[Mapping[str, Any]]], forget_split: str) -> list[Histogram]:
    """TOFU: log10 of the forget split's truth ratios (R = P(perturbed) / P(paraphrased)) per model label
    (``records``: ``{label: per_example.jsonl rows}``); the forget rows are those of split ``forget_split`` or
    its evaluation split (``forget10_perturbed``); rows without a positive finite ratio are left out."""
    series = {}
    ours = lambda s: s == forget_split or str(s).startswith(forget_split + "_")  # noqa: E731
    for label, rows in records.items():
        vals = [as_float(r.get("truth_ratio")) for r in rows if ours(r.get("split", ""))]
        vals = [math.log10(v) for v in vals if v is not None and v > 0]
        if vals:
            series[label] = np.asarray(vals)
    if not series:
        return []
    return [Histogram(title=f"Forget truth ratios: {forget_split}",
                      xlabel="log10 truth ratio R = P(perturbed) / P(paraphrased)   (0: R = 1)", series=series,
                      vline=0.0)]


def muse_histograms(records: Mapping[str, Sequence[Mapping[str, Any]]], attack: str, *,
                    forget_split: str = "privleak_forget", holdout_split: str = "privleak_holdout") -> list[Histogram]:
    """MUSE: the PrivLeak attack's membership-inference scores of the forget articles, and of the never-trained
    holdout articles, each model's overlaid (one panel each; a memorised forget set sits left of the holdout)."""
    out = []
    for split, what in ((forget_split, "forget articles"), (holdout_split, "holdout articles (never trained on)")):
        series = {}
        for label, rows in records.items():
            vals = [as_float(r.get(attack)) for r in rows if r.get("split") == split]
            vals = [v for v in vals if v is not None]
            if vals:
                series[label] = np.asarray(vals)
        if series:
            out.append(Histogram(title=f"MIA scores ({attack}): {what}",
                                 xlabel=f"{attack} score (higher = less likely a member)", series=series))
    return out


def loss_points(log: Sequence[Mapping[str, Any]], key: str = "loss") -> list[tuple[float, float]]:
    """``[(step, value)]`` of a loss log's ``key`` (entries without a finite value are skipped)."""
    out = []
    for i, e in enumerate(log or []):
        v = as_float(e.get(key))
        if v is not None:
            out.append((float(e.get("step", i)), v))
    return out
