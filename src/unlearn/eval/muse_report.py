"""Human-readable MUSE report: ``report.md``, a self-contained ``report.html`` and ``mia_hist.png``.

The MUSE counterpart of :mod:`unlearn.eval.report` (TOFU): the metrics table,
the notes, histograms of the membership-inference scores (forget vs holdout, one
panel per attack) and, for the first few VerbMem prompts and KnowMem questions,
the truth, the evaluated model's output and the target model's output side by side.
Numbers print through :func:`unlearn.fmt.fmt_number`, the one number format.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from unlearn.data.names import KNOWMEM_FORGET, KNOWMEM_RETAIN, VERBMEM_FORGET
from unlearn.fmt import fmt_number, markdown_table

from .mia import ATTACKS, metric_suffix
from .report import _md_cell, html_page

PLOT_NAME = "mia_hist.png"
PROMPT_CHARS = 400
"""A VerbMem prompt is shown by its last this many characters: the continuation follows from its end."""


def headline(privleak_attack: str) -> tuple[tuple[str, str], ...]:
    """(metrics.json key, label) of the report's metrics table, in order."""
    rows = [
        ("privleak", f"PrivLeak ({privleak_attack}), % vs the retain model (0 = retain; -100 = memorised; > 0 = over-unlearned)"),
        ("verbmem_forget", "VerbMem on D_f: ROUGE-L F1 of the continuations (lower = less verbatim memory)"),
        ("knowmem_forget", "KnowMem on D_f: ROUGE-L F1 of the answers (lower = more forgotten)"),
        ("knowmem_retain", "KnowMem on D_r: ROUGE-L F1 of the answers (utility; higher = kept)"),
    ]
    rows += [(f"privleak_{metric_suffix(a)}", f"  PrivLeak from {a}") for a in ATTACKS]
    rows += [(f"mia_auc_{metric_suffix(a)}", f"  MIA AUC, {a} (forget vs holdout; 0.5 = indistinguishable, 0 = forget memorised)")
             for a in ATTACKS]
    return tuple(rows)


def plot_mia_scores(forget: Mapping[str, np.ndarray], holdout: Mapping[str, np.ndarray], path: Path,
                    title: str = "", aucs: Mapping[str, float | None] | None = None) -> Path:
    """One histogram panel per attack: the loss-like scores of forget vs holdout articles (Agg backend).

    A model that memorised the forget articles puts them to the left of the
    holdout ones; the retain model's two histograms overlap.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6), dpi=100)
    for ax, attack in zip(axes.ravel(), ATTACKS):
        f = np.asarray(forget.get(attack, []), dtype=np.float64)
        h = np.asarray(holdout.get(attack, []), dtype=np.float64)
        f, h = f[np.isfinite(f)], h[np.isfinite(h)]
        both = np.concatenate([f, h])
        if both.size:
            lo, hi = float(both.min()), float(both.max())
            if hi - lo < 1e-9:
                lo, hi = lo - 0.5, hi + 0.5
            bins = np.linspace(lo, hi, 21)
            if h.size:
                ax.hist(h, bins=bins, alpha=0.55, label=f"holdout (n={h.size})", color="tab:green")
            if f.size:
                ax.hist(f, bins=bins, alpha=0.55, label=f"forget (n={f.size})", color="tab:red")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
        auc = (aucs or {}).get(attack)
        ax.set_title(attack if auc is None else f"{attack} (AUC {fmt_number(float(auc))})", fontsize=10)
        ax.set_xlabel("score (higher = less likely a member)", fontsize=8)
    fig.suptitle(title or "Membership-inference scores")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _tail(text: str | None, n: int = PROMPT_CHARS) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= n else "…" + text[-n:]


def example_rows(per_example: Mapping[str, Sequence[dict]], n: int,
                 target: Mapping[str, Mapping] | None) -> dict[str, list[dict]]:
    """The first ``n`` rows of each generation split as ``{input, truth, evaluated, target, rouge_l}``.

    ``target``: ``{split: {id: target model's output}}`` (None: no target model).
    """
    out: dict[str, list[dict]] = {}
    for split, inp, truth in ((VERBMEM_FORGET, "prompt", "gt"), (KNOWMEM_FORGET, "question", "answer"),
                              (KNOWMEM_RETAIN, "question", "answer")):
        rows = list(per_example.get(split, []))[: max(n, 0)]
        if not rows:
            continue
        tg = (target or {}).get(split, {})
        out[split] = [{"input": _tail(r.get(inp)) if inp == "prompt" else r.get(inp), "truth": r.get(truth),
                       "evaluated": r.get("generation"), "target": tg.get(r["id"]) if target is not None else None,
                       "rouge_l": r.get("rouge_l")} for r in rows]
    return out


_EXAMPLE_TITLES = {VERBMEM_FORGET: ("VerbMem examples (forget)", "Prompt (end)", "True continuation"),
                   KNOWMEM_FORGET: ("KnowMem examples (forget)", "Question", "Gold answer"),
                   KNOWMEM_RETAIN: ("KnowMem examples (retain)", "Question", "Gold answer")}


def write_muse_report(
    out_dir: str | Path,
    *,
    title: str,
    metrics: Mapping[str, float | None],
    notes: Mapping[str, str],
    privleak_attack: str,
    mia_scores: Mapping[str, Mapping[str, np.ndarray]],
    per_example: Mapping[str, Sequence[dict]],
    target_outputs: Mapping[str, Mapping] | None,
    n_examples: int,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` (the PNG embedded as base64) and :data:`PLOT_NAME` into ``out_dir``.

    ``mia_scores``: ``{"forget": {attack: scores}, "holdout": {...}}``;
    ``target_outputs``: see :func:`example_rows`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_mia_scores(mia_scores.get("forget", {}), mia_scores.get("holdout", {}), out_dir / PLOT_NAME,
                          title="MIA scores: privleak_forget vs privleak_holdout",
                          aucs={a: metrics.get(f"mia_auc_{metric_suffix(a)}") for a in ATTACKS})
    rows = headline(privleak_attack)
    examples = example_rows(per_example, n_examples, target_outputs)
    na = lambda x: "n/a" if x is None else x  # noqa: E731

    # ---- Markdown
    md = [f"# {_md_cell(title)}", "",
          markdown_table(["Metric", "Value"], [[_md_cell(label.strip()), fmt_number(metrics.get(key))]
                                               for key, label in rows]), ""]
    if notes:
        md += ["## Notes", ""] + [f"- **{_md_cell(k)}**: {_md_cell(v)}" for k, v in notes.items()] + [""]
    md += ["## Membership-inference scores", "", f"![MIA score histograms]({PLOT_NAME})", ""]
    for split, ex in examples.items():
        head, inp, truth = _EXAMPLE_TITLES[split]
        md += [f"## {head}", "",
               markdown_table([inp, truth, "Evaluated model", "Target model", "ROUGE-L F1"],
                              [[_md_cell(e["input"]), _md_cell(e["truth"]), _md_cell(na(e["evaluated"])),
                                _md_cell(na(e["target"])), fmt_number(e["rouge_l"])] for e in ex], pad=False), ""]
    (out_dir / "report.md").write_text("\n".join(md))

    # ---- HTML (self-contained)
    esc = lambda x: html.escape("" if x is None else str(x), quote=True)  # noqa: E731
    img = base64.b64encode(png.read_bytes()).decode("ascii")
    sub = ' class="sub"'
    metric_rows = "\n".join(
        f"<tr><td{sub if label.startswith('  ') else ''}>{esc(label.strip())}</td>"
        f"<td class=\"num\">{esc(fmt_number(metrics.get(key)))}</td></tr>" for key, label in rows)
    notes_html = ("<h2>Notes</h2><ul>" + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in notes.items())
                  + "</ul>") if notes else ""
    ex_html = ""
    for split, ex in examples.items():
        head, inp, truth = _EXAMPLE_TITLES[split]
        ex_html += (f"<h2>{esc(head)}</h2><table class=\"ex\"><tr><th>{esc(inp)}</th><th>{esc(truth)}</th>"
                    "<th>Evaluated model</th><th>Target model</th><th>ROUGE-L F1</th></tr>" + "".join(
                        f"<tr><td>{esc(e['input'])}</td><td>{esc(e['truth'])}</td><td>{esc(na(e['evaluated']))}</td>"
                        f"<td>{esc(na(e['target']))}</td><td class=\"num\">{esc(fmt_number(e['rouge_l']))}</td></tr>"
                        for e in ex) + "</table>\n")
    body = f"""<table class="metrics"><tr><th>Metric</th><th>Value</th></tr>
{metric_rows}
</table>
{notes_html}
<h2>Membership-inference scores</h2>
<img alt="MIA score histograms" src="data:image/png;base64,{img}">
{ex_html}
"""
    doc = html_page(title, body, max_width="75em", css="table.ex td { max-width: 22em; white-space: pre-wrap; }")
    (out_dir / "report.html").write_text(doc)
    return {"md": out_dir / "report.md", "html": out_dir / "report.html", "png": png}
