"""The comparison page (unlearn.eval.compare) on small hand-made inputs, and offline rendering in a real browser:
the comparison page, and `dvc plots show` with the project's offline template on every plot both pipelines
declare. The end-to-end versions (the default pipeline's own page and plots) are in test_e2e.py."""

from __future__ import annotations

import json
import os
from html import unescape
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from browser import charts, drawn, render
from helpers import ROOT, env
from unlearn.eval import compare as C
from unlearn.eval.offline_plots import TEMPLATE_PATH, check_template, offline_template
from unlearn.gate import GateMetrics

TOFU = GateMetrics()
MUSE = GateMetrics(forget="privleak", utility="knowmem_retain", forget_rule="abs_max")
GATE = {"min_forget_quality": 0.05, "min_utility_ratio": 0.9, "max_abs_privleak": 25.0}


def _tofu_models(tmp_path: Path) -> list[C.ModelEntry]:
    reports = {}
    for name in ("target", "retain", "unlearned"):
        reports[name] = tmp_path / "reports" / "eval" / name / "report.html"
        reports[name].parent.mkdir(parents=True, exist_ok=True)
        reports[name].write_text("<html></html>")
    return [
        C.ModelEntry("target", "target", "target", {"forget_quality": 4e-8, "model_utility": 0.71, "forget_prob": 0.96},
                     reports["target"]),
        C.ModelEntry("retain", "retain", "retain", {"forget_quality": 1.0, "model_utility": 0.72, "forget_prob": 0.07},
                     reports["retain"]),
        C.ModelEntry("unlearned", "unlearned (dipo)", "unlearned",
                     {"forget_quality": 0.24, "model_utility": 0.69, "forget_prob": 0.02}, reports["unlearned"]),
        C.ModelEntry("eval/npo", "npo", "unlearned", {"forget_quality": 0.01, "model_utility": 0.70, "forget_prob": 0.1}),
    ]


def _tofu_page(tmp_path: Path) -> C.Comparison:
    rng = np.random.default_rng(0)
    records = {label: [{"split": "forget10_perturbed", "truth_ratio": float(v)} for v in rng.lognormal(mu, 0.3, 40)]
                      + [{"split": "retain_perturbed", "truth_ratio": 5.0}]
               for label, mu in (("target", -0.6), ("retain", 0.0), ("unlearned (dipo)", 0.05))}
    loss = [{"step": i + 1, "loss": 10 / (i + 1), "forget_loss": 9 / (i + 1), "retain_loss": 0.1} for i in range(20)]
    losses = [C.LossCurve("target", "fine-tuning", [(i, 7 / (i + 1)) for i in range(50)]),
              C.LossCurve("unlearned (dipo): loss", "unlearning", C.loss_points(loss), model="unlearned (dipo)"),
              C.LossCurve("unlearned (dipo): forget_loss", "unlearning", C.loss_points(loss, "forget_loss"),
                          dashed=True, model="unlearned (dipo)")]
    return C.build_comparison(
        title="TOFU comparison: forget10, dipo", models=_tofu_models(tmp_path),
        columns=["forget_prob", "retain_prob", "forget_quality", "model_utility"], names=TOFU, gate=GATE,
        histograms=C.tofu_histograms(records, "forget10"), losses=losses, info=[("method", "dipo")])


def test_tofu_page_has_every_model_the_gate_and_the_charts(tmp_path):
    page = _tofu_page(tmp_path)
    out = tmp_path / "reports" / "compare"
    files = page.write(out, registration={"passed": True, "version": "2", "aliases": ["champion"],
                                          "registered_model": "unlearned-tofu", "run_id": "r1"})
    assert set(files) == {"html", "md", "tradeoff", "histograms", "loss"}
    md = files["md"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == ["target", "retain", "unlearned (dipo)", "npo"]
    # the gate: DiPO passes (0.24 >= 0.05, 0.69 >= 0.9 x 0.71); NPO's forget quality fails; target/retain not gated
    assert "| passes |" in rows[2] and "fails: forget_quality" in rows[3] and "| 1.0000 |  | [report" in rows[0]
    assert "0.9718" in rows[2]  # utility / target = 0.69 / 0.71
    assert "retain_prob" not in md.splitlines()[md.splitlines().index(next(r for r in md.splitlines()
                                                                              if r.startswith("| model")))]
    # links to each model's report, relative to the page, that resolve; none for a model without one
    links = re.findall(r"\[report\.html\]\(([^)]+)\)", md)
    assert links == ["../eval/target/report.html", "../eval/retain/report.html", "../eval/unlearned/report.html"]
    assert all((out / link).is_file() for link in links) and rows[3].endswith("| n/a |")
    for key in ("tradeoff", "histograms", "loss"):
        assert f"](comparison_files/{key}.svg)" in md and files[key].read_text().lstrip().startswith("<?xml")
    assert "registered as unlearned-tofu version 2 (champion)" in md
    html = files["html"].read_text()
    # self-contained: inline SVG, no script, nothing loaded from anywhere
    assert html.count("<svg") == 3 and "<script" not in html and not re.search(r"(src|href)=[\"']?(https?:)?//", html)
    assert html.count('<a href="../eval/') == 3 and "<title>TOFU comparison: forget10, dipo</title>" in html
    # TOFU's forget quality is a p-value: a log axis
    assert "log scale" in files["tradeoff"].read_text()
    # the same inputs draw the same files (fixed SVG ids, no date)
    again = _tofu_page(tmp_path).write(tmp_path / "again")
    assert again["tradeoff"].read_text() == files["tradeoff"].read_text()


def test_truth_ratio_histograms_keep_the_forget_split_only():
    recs = {"a": [{"split": "forget10_perturbed", "truth_ratio": 10.0}, {"split": "forget10_perturbed", "truth_ratio": None},
                  {"split": "forget10_perturbed", "truth_ratio": 0.0}, {"split": "retain_perturbed", "truth_ratio": 0.1}],
            "b": [{"split": "holdout10", "truth_ratio": 1.0}]}
    (h,) = C.tofu_histograms(recs, "forget10")
    assert list(h.series) == ["a"] and h.series["a"].tolist() == [1.0]  # log10, undefined and <= 0 left out
    assert C.tofu_histograms({"b": recs["b"]}, "forget10") == []


def test_muse_page_uses_privleak_linear_and_joins_the_sequences(tmp_path):
    target = {"privleak": -100.0, "knowmem_retain": 0.76, "verbmem_forget": 0.95}
    models = [C.ModelEntry("target", "target", "target", target),
              C.ModelEntry("retain", "retain", "retain", {"privleak": 0.0, "knowmem_retain": 0.63}),
              C.ModelEntry("unlearned", "unlearned (dipo)", "unlearned", {"privleak": -54.9, "knowmem_retain": 0.69})]
    models += [C.ModelEntry(f"sustainability/{f}", f"sustainability: {f}", "unlearned",
                            {"privleak": pl, "knowmem_retain": u}, group="sustainability")
               for f, pl, u in (("fold1", -54.9, 0.69), ("fold2", -72.5, 0.68), ("fold3", 10.0, 0.70))]
    recs = {m.label: [{"split": "privleak_forget", "min_k": float(v)} for v in np.linspace(0, 1, 12) + i]
            + [{"split": "privleak_holdout", "min_k": 3.0 + i}] for i, m in enumerate(models[:3])}
    hists = C.muse_histograms(recs, "min_k")
    assert [h.title.split(": ")[1] for h in hists] == ["forget articles", "holdout articles (never trained on)"]
    page = C.build_comparison(title="MUSE comparison", models=models, columns=["verbmem_forget", "privleak"],
                              names=MUSE, gate=GATE, histograms=hists)
    files = page.write(tmp_path / "out", registration={"passed": False, "reasons": ["|privleak| 54.9 > 25"],
                                                       "run_id": "r2"})
    md = files["md"].read_text()
    assert "not registered, the gate refused: |privleak| 54.9 > 25 (MLflow run r2)" in unescape(md).replace("\\|", "|")
    assert md.count("fails: ") == 3 and md.count("| passes |") == 1  # fold3: |10| <= 25, 0.70 >= 0.9 x 0.76
    assert "knowmem_retain" in md.splitlines()[md.splitlines().index(next(
        r for r in md.splitlines() if r.startswith("| model")))]  # the gate's metrics are always columns
    svg = files["tradeoff"].read_text()
    assert "log scale" not in svg and "closer to 0 is better" in svg and "sustainability" in svg


def test_a_comparison_without_histograms_or_losses_draws_the_tradeoff_only(tmp_path):
    models = [C.ModelEntry("target", "target", "target", {"forget_quality": None, "model_utility": None})]
    files = C.build_comparison(title="t", models=models, columns=[], names=TOFU, gate=GATE).write(tmp_path)
    assert set(files) == {"html", "md", "tradeoff"} and "no model has both metrics" in files["tradeoff"].read_text()


# --------------------------------------------------------------------------- a real browser, no network
def test_the_comparison_page_draws_its_charts_offline(tmp_path):
    files = _tofu_page(tmp_path).write(tmp_path / "reports" / "compare")
    dom = render(files["html"], screenshot=tmp_path / "page.png")
    got = {c.div: c for c in drawn(dom)}
    assert set(got) == {"chart-tradeoff", "chart-histograms", "chart-loss"}, charts(dom)
    assert got["chart-tradeoff"].marks >= 4  # a marker per model with both metrics
    assert got["chart-histograms"].marks >= 3 and got["chart-loss"].marks >= 2


def test_the_browser_check_finds_nothing_on_an_empty_chart(tmp_path):
    """The check bites: an empty axes, or an SVG with only grid lines, is not a drawn chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.grid(True)
    page = tmp_path / "empty.html"
    page.write_text(f"<html><body><div id='x'>{C._inline(C._svg(fig, 'e'))}</div></body></html>")
    dom = render(page)
    assert len(charts(dom)) == 1 and drawn(dom) == []


def test_the_offline_template_is_what_dvc_needs():
    text = (ROOT / TEMPLATE_PATH).read_text(encoding="utf8")
    assert check_template(text) == []
    assert "html_template = plots_offline.html" in (ROOT / ".dvc" / "config").read_text()
    with pytest.raises(ValueError, match="</script"):
        offline_template("x = '</script>'")
    assert check_template("<html>{scripts}<script src='https://cdn.jsdelivr.net/npm/vega@5'></script></html>") == [
        "no {plot_divs} placeholder (DVC refuses the template)",
        "a {scripts} placeholder: DVC puts its CDN <script src=...> tags there",
        "loads from the network: <script src='https://",
        "no inlined vega-embed (window.vegaEmbed is never set)"]


# --------------------------------------------------------------------------- every declared DVC plot, offline
def _declared_plots() -> dict[str, tuple[Path, set[str]]]:
    """Every plot of dvc.yaml and muse/dvc.yaml: ``{plot id: (data file, its fields)}``, a stage's plot paths
    relative to the stage's wdir and top-level plots' paths relative to the dvc.yaml's directory, as DVC has them."""
    out: dict[str, tuple[Path, set[str]]] = {}
    for dvcfile in ("dvc.yaml", "muse/dvc.yaml"):
        spec = yaml.safe_load((ROOT / dvcfile).read_text())
        base = Path(dvcfile).parent
        for stage in spec["stages"].values():
            wdir = base / stage.get("wdir", ".")
            for entry in stage.get("plots") or []:
                path, props = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
                file = Path(os.path.normpath(wdir / path))
                out[str(file)] = (file, {props.get("x", "step"), props.get("y", "loss")})
        for entry in spec.get("plots") or []:
            name, props = next(iter(entry.items()))
            for path, ys in props["y"].items():
                out[name] = (Path(os.path.normpath(base / path)), {props["x"], *ys})
    return out


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory):
    """A git + DVC repository with the project's two pipelines, its .dvc/config and offline template, and
    synthetic data at every declared plot's path (the pipelines themselves are not run)."""
    repo = tmp_path_factory.mktemp("plots_repo")
    for f in ("dvc.yaml", "muse/dvc.yaml", ".dvc/config", str(TEMPLATE_PATH), ".dvcignore"):
        if (ROOT / f).exists():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    files: dict[Path, set[str]] = {}
    for path, fields in _declared_plots().values():
        files.setdefault(path, set()).update(fields)
    for path, fields in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        rows = [{f: (i if f in ("step", "requests", "forget_articles") else 0.5 + 0.1 * np.sin(i + len(f)))
                 for f in sorted(fields)} | {"model": f"m{i}"} for i in range(6)]
        (repo / path).write_text(json.dumps(rows))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "plots"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    return repo


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(["dvc", *args], cwd=repo, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_every_declared_dvc_plot_draws_offline(plots_repo):
    """`dvc plots show` (the README's command: both pipelines' plots) with the project's template: the page loads
    nothing from the network and every plot DVC declares is a drawn chart."""
    shown = json.loads(_dvc(plots_repo, "plots", "show", "--json").stdout)
    assert shown.get("errors", []) == [], shown["errors"]  # every declared path resolves (no muse/muse/...)
    ids = {re.sub(r"[^a-zA-Z0-9]", "_", k) for k, v in shown["data"].items() if v}
    assert ids == {re.sub(r"[^a-zA-Z0-9]", "_", k) for k in _declared_plots()}  # each declared plot has data
    _dvc(plots_repo, "plots", "show", "-o", "dvc_plots")
    page = plots_repo / "dvc_plots" / "index.html"
    text = page.read_text()
    assert "cdn.jsdelivr" not in text and not re.search(r"<(script|link)\b[^>]*(src|href)\s*=\s*[\"']?(https?:)?//", text)
    dom = render(page, screenshot=plots_repo / "dvc_plots.png")
    got = {c.div for c in drawn(dom)}
    assert got == ids, (sorted(ids - got), charts(dom))


def test_dvcs_own_page_is_blank_offline(plots_repo, tmp_path):
    """Without the template DVC's page loads Vega from a CDN: offline it draws nothing (what the template fixes,
    and proof that the browser check fails on a page that draws nothing)."""
    out = tmp_path / "cdn"
    _dvc(plots_repo, "plots", "show", "--html-template", str(_default_template(tmp_path)), "-o", str(out))
    text = (out / "index.html").read_text()
    assert "cdn.jsdelivr.net/npm/vega" in text
    assert drawn(render(out / "index.html")) == []


def _default_template(tmp_path: Path) -> Path:
    from dvc_render.html import PAGE_HTML

    path = tmp_path / "dvc_default.html"
    path.write_text(PAGE_HTML)
    return path


# --------------------------------------------------------------------------- what the register stage reads
def test_the_stage_gathers_muse_models_sequences_and_mia_scores(tmp_path, monkeypatch):
    """unlearn.stages.comparison on a MUSE reports directory written by hand: the three models (with the
    memorisation summaries' probabilities), every sequence step, the PrivLeak attack's scores, the loss logs."""
    from unlearn import stages
    from unlearn.config import load_params
    from unlearn.io import write_json

    monkeypatch.chdir(tmp_path)
    p = load_params(ROOT / "muse" / "params.yaml")
    p.reports_dir, p.model.out_dir = "r", "m"
    attack = p.muse.eval.privleak_attack
    for i, name in enumerate(("target", "retain", "unlearned")):
        write_json(Path("r/eval") / name / "metrics.json", {"privleak": [-100.0, 0.0, -40.0][i], "knowmem_retain": 0.7,
                                                            "verbmem_forget": 0.5})
        (Path("r/eval") / name / "per_example.jsonl").write_text("".join(
            json.dumps({"split": split, "id": j, attack: float(j + i)}) + "\n"
            for split in ("privleak_forget", "privleak_holdout", "verbmem_forget") for j in range(5)))
        (Path("r/eval") / name / "report.html").write_text("<html></html>")
    write_json(Path("r/finetune/target.json"), {"forget_prob": 0.97, "retain_prob": 0.96})
    write_json(Path("r/finetune/target_loss.json"), [{"step": s, "loss": 5.0 / s} for s in range(1, 9)])
    write_json(Path("r/forget/loss.json"), [{"step": s, "loss": 3.0 / s, "forget_loss": 2.0 / s} for s in range(1, 6)])
    for kind, steps in (("sustainability", ["fold1", "fold2"]), ("scalability", ["fold1", "fold1-2"])):
        write_json(Path("r/sequences") / f"{kind}.json",
                   [{"step": 0, "forget_set": "none (target)", "privleak": -100.0, "knowmem_retain": 0.7}]
                   + [{"step": i + 1, "forget_set": fs, "requests": i + 1, "privleak": -30.0 * (i + 1),
                       "knowmem_retain": 0.66} for i, fs in enumerate(steps)])
    page = stages.comparison(p)
    labels = [m.label for m in page.models]
    assert labels == ["target", "retain", f"unlearned ({p.method.name})", "sustainability: fold1",
                      "sustainability: then fold2", "scalability: fold1", "scalability: fold1-2"]
    assert page.models[0].metrics["forget_prob"] == 0.97 and page.columns[0] == "forget_prob"
    assert set(page.charts) == {"tradeoff", "histograms", "loss"}
    files = page.write(stages.comparison_dir(p), stages.COMPARISON_STEM)
    md = files["md"].read_text()
    assert md.count("[report.html](../eval/") == 3 and "MIA scores" in md and "| fails: " in md
    assert files["html"] == Path("r/compare/comparison.html")
    io = stages.stage_io("register", p)
    assert Path("r/compare") in io.outputs and Path("r/sequences/scalability.json") in io.inputs
