"""Human-readable TOFU report: ``report.md``, self-contained ``report.html`` and ``truth_ratio_hist.png``."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from unlearn.fmt import fmt_number

if TYPE_CHECKING:
    from .tofu_metrics import EvalResult

HEADLINE: tuple[tuple[str, str], ...] = (
    ("forget_quality", "Forget quality (KS p-value vs retain model; higher = closer to retain)"),
    ("model_utility", "Model utility (harmonic mean of the 9 values below)"),
    ("retain_prob", "  Retain: probability"),
    ("retain_rouge", "  Retain: ROUGE-L recall"),
    ("retain_truth_ratio", "  Retain: truth ratio (mean max(0, 1-R))"),
    ("real_authors_prob", "  Real authors: probability (normalised over options)"),
    ("real_authors_rouge", "  Real authors: ROUGE-L recall"),
    ("real_authors_truth_ratio", "  Real authors: truth ratio (mean max(0, 1-R))"),
    ("world_facts_prob", "  World facts: probability (normalised over options)"),
    ("world_facts_rouge", "  World facts: ROUGE-L recall"),
    ("world_facts_truth_ratio", "  World facts: truth ratio (mean max(0, 1-R))"),
    ("forget_prob", "Forget: probability (lower = more forgotten)"),
    ("forget_rouge", "Forget: ROUGE-L recall (lower = more forgotten)"),
    ("forget_truth_ratio", "Forget: truth ratio (mean min(R, 1/R))"),
    ("forget_exact_mem", "Forget: exact memorisation"),
    ("forget_extraction_strength", "Forget: extraction strength"),
    ("privleak", "PrivLeak (Min-K% AUC vs the retain model's, %; 0 = retain, < 0 = forget set still recognised)"),
    ("mia_auc_loss", "  MIA AUC forget vs holdout: loss (~0 = members, ~0.5 = like holdout)"),
    ("mia_auc_zlib", "  MIA AUC forget vs holdout: zlib"),
    ("mia_auc_min_k", "  MIA AUC forget vs holdout: Min-K%"),
    ("mia_auc_min_k_plus_plus", "  MIA AUC forget vs holdout: Min-K%++"),
)


PAGE_CSS = """body { font-family: system-ui, sans-serif; margin: 2em; max-width: %s; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; }
td.num { text-align: right; font-family: monospace; }
td.sub { padding-left: 2em; color: #444; }"""
"""The style every HTML page of the project shares (the reports, the comparison page); ``%s``: the page width."""


def html_page(title: str, body: str, *, max_width: str = "70em", css: str = "") -> str:
    """A self-contained HTML page: the shared style (:data:`PAGE_CSS`, plus ``css``), ``<h1>title</h1>``, then
    ``body`` (HTML, inserted as given). The one page shell of the TOFU and MUSE reports and the comparison page."""
    t = html.escape(title, quote=True)
    style = PAGE_CSS % max_width + ("\n" + css if css else "")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{t}</title>\n'
            f"<style>\n{style}\n</style></head><body>\n<h1>{t}</h1>\n{body}</body></html>\n")


def _md_cell(text: Any) -> str:
    s = html.escape("" if text is None else str(text), quote=False)  # Markdown renders inline HTML
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")


def _finite(a: np.ndarray | Sequence[float] | None) -> np.ndarray:
    if a is None:
        return np.zeros(0)
    a = np.asarray(a, dtype=np.float64)
    return a[np.isfinite(a) & (a > 0)]


def plot_truth_ratios(eval_tr: np.ndarray, retain_tr: np.ndarray | None, path: Path, title: str = "") -> Path:
    """Histogram of log10 forget truth ratios, evaluated model vs retain model (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.log10(_finite(eval_tr))
    b = np.log10(_finite(retain_tr)) if retain_tr is not None else np.zeros(0)
    both = np.concatenate([a, b])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if both.size:
        lo, hi = float(both.min()), float(both.max())
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 31)
        if b.size:
            ax.hist(b, bins=bins, alpha=0.55, label=f"retain model (n={b.size})", color="tab:green")
        if a.size:
            ax.hist(a, bins=bins, alpha=0.55, label=f"evaluated model (n={a.size})", color="tab:blue")
        ax.axvline(0.0, color="k", lw=0.8, ls="--")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no truth ratios", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("log10 truth ratio  R = P(perturbed) / P(paraphrased)   (0: R = 1)")
    ax.set_ylabel("forget examples")
    ax.set_title(title or "Forget-split truth ratios")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _examples(result: "EvalResult", n: int, target_generations: Mapping | Sequence | None) -> list[dict]:
    rows = result.per_example.get(result.forget_split, [])[: max(n, 0)]
    out = []
    for i, r in enumerate(rows):
        target = None
        if isinstance(target_generations, Mapping):
            target = target_generations.get(r["id"])
        elif target_generations is not None and i < len(target_generations):
            target = target_generations[i]
        out.append({"id": r["id"], "question": r["question"], "truth": r["answer"], "target": target,
                    "evaluated": r.get("generation"), "rouge": r.get("rouge"), "prob": r.get("prob"),
                    "truth_ratio": r.get("truth_ratio")})
    return out


def write_report(
    result: "EvalResult",
    out_dir: str | Path,
    *,
    title: str,
    retain_truth_ratios: np.ndarray | None,
    target_generations: Mapping | Sequence[str] | None,
    n_examples: int = 5,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` (PNG embedded as base64) and ``truth_ratio_hist.png``.

    ``target_generations``: the target (pre-unlearning) model's answers to the
    report's forget questions, as ``{id: text}`` or a list aligned with the
    first forget rows; None leaves the column empty. The number of examples is
    ``n_examples`` (``evaluate_dir`` passes ``cfg.report_examples``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_truth_ratios(result.truth_ratios(), retain_truth_ratios, out_dir / "truth_ratio_hist.png",
                            title=f"Forget-split truth ratios ({result.forget_split})")
    m = result.metrics
    examples = _examples(result, n_examples, target_generations)

    # ---- Markdown
    md = [f"# {_md_cell(title)}", "", f"Forget split: `{result.forget_split}`", "", "| Metric | Value |", "|---|---|"]
    for key, label in HEADLINE:
        md.append(f"| {_md_cell(label.strip())} | {fmt_number(m.get(key))} |")
    if result.notes:
        md += ["", "## Notes", ""]
        md += [f"- **{_md_cell(k)}**: {_md_cell(v)}" for k, v in result.notes.items()]
    md += ["", "## Forget truth ratios", "", "![truth ratio histogram](truth_ratio_hist.png)", ""]
    if examples:
        md += ["## Forget examples", "",
               "| Question | Target model | Evaluated model | Ground truth | ROUGE-L |", "|---|---|---|---|---|"]
        for e in examples:
            md.append(f"| {_md_cell(e['question'])} | {_md_cell(e['target'] if e['target'] is not None else 'n/a')} | "
                      f"{_md_cell(e['evaluated'] if e['evaluated'] is not None else 'n/a')} | "
                      f"{_md_cell(e['truth'])} | {fmt_number(e['rouge'])} |")
    (out_dir / "report.md").write_text("\n".join(md) + "\n")

    # ---- HTML (self-contained)
    esc = lambda x: html.escape("" if x is None else str(x), quote=True)  # noqa: E731
    img = base64.b64encode(png.read_bytes()).decode("ascii")
    sub = ' class="sub"'
    rows_html = "\n".join(
        f"<tr><td{sub if label.startswith('  ') else ''}>{esc(label.strip())}</td>"
        f"<td class=\"num\">{esc(fmt_number(m.get(key)))}</td></tr>"
        for key, label in HEADLINE)
    notes_html = ""
    if result.notes:
        notes_html = "<h2>Notes</h2><ul>" + "".join(
            f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in result.notes.items()) + "</ul>"
    ex_html = ""
    if examples:
        ex_html = ("<h2>Forget examples</h2><table class=\"ex\"><tr><th>Question</th><th>Target model</th>"
                   "<th>Evaluated model</th><th>Ground truth</th><th>ROUGE-L</th></tr>" + "".join(
                       f"<tr><td>{esc(e['question'])}</td><td>{esc(e['target'] if e['target'] is not None else 'n/a')}</td>"
                       f"<td>{esc(e['evaluated'] if e['evaluated'] is not None else 'n/a')}</td>"
                       f"<td>{esc(e['truth'])}</td><td class=\"num\">{esc(fmt_number(e['rouge']))}</td></tr>"
                       for e in examples) + "</table>")
    body = f"""<p>Forget split: <code>{esc(result.forget_split)}</code></p>
<table class="metrics"><tr><th>Metric</th><th>Value</th></tr>
{rows_html}
</table>
{notes_html}
<h2>Forget truth ratios</h2>
<img alt="truth ratio histogram" src="data:image/png;base64,{img}">
{ex_html}
"""
    doc = html_page(title, body, css="table.ex td { max-width: 22em; }")
    (out_dir / "report.html").write_text(doc)
    return {"md": out_dir / "report.md", "html": out_dir / "report.html", "png": png}
