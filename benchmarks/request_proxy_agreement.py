"""Does the oracle-free request gate agree with the retain-model gate? (issue 14, "validate the proxy").

``requests.oracle: none`` accepts a model for a deletion request when, under the model, the requested rows look
like the holdout authors no model trained on (:mod:`unlearn.requests.evidence`, :func:`unlearn.gate.request_gate`).
Where the oracle exists (a retain model trained without the forget authors), the benchmark's gate accepts a model
when its forget truth ratios look like the retain model's (forget quality, a KS p-value) and its utility holds
(:func:`unlearn.gate.gate_decision`). This script measures, over logged unlearning runs, how often the two agree.

Three subcommands, run in the project directory (a copy: it writes ``runs/`` and ``reports/eval/<run>``)::

    # the grid: one `unlearn forget --out runs/<name> --set ...` + `unlearn evaluate runs/<name> --name <name>`
    # per (method, seed, epochs); each run's inputs go to runs/<name>.reports/run.json
    python benchmarks/request_proxy_agreement.py run --methods dipo npo graddiff --seeds 0 1 --epochs 1 2 5

    # the request cycle's holdout evidence of each model (target, retain, every run), as `unlearn request run`
    # computes it (unlearn.requests.evidence.request_evidence_for_model): the whole forget set as one request and
    # each forget author as one -> reports/eval/<name>/request_evidence.json (skipped where it exists)
    python benchmarks/request_proxy_agreement.py evidence

    # the table, from what the runs wrote: reports/eval/<name>/{metrics.json, per_example.jsonl,
    # request_evidence.json}, runs/<name>.reports/{summary.json, run.json}, and the target's and retain model's
    python benchmarks/request_proxy_agreement.py table --md reports/proxy/agreement.md --json reports/proxy/agreement.json

Nothing is typed in: every number in the table is read from those files. Per run, and per forget author (each
author as one deletion request):

* **oracle** p-value: forget quality, the KS p-value of the run's forget truth ratios against the retain model's
  (``metrics.json``; per author, recomputed from both models' ``per_example.jsonl`` records of that author).
* **proxy** p-value: ``ks_pvalue`` of the request cycle's evidence (``request_evidence.json``: the requested
  rows against the holdout rows under the run's model), with the MIA AUCs, PrivLeak and the probability and
  ROUGE gaps.
* the two gates with the project's thresholds (``gate.*``, ``requests.gate.*``), in full (with the utility
  check, identical on both sides) and on the forget side alone; their confusion table; the Pearson and Spearman
  correlation of log10 of the two p-values; and a sweep of the proxy thresholds for the least strict set that
  accepts no model the oracle refuses, on these runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RUNS = Path("runs")
FLOOR = 1e-50  # p-values below this (scipy reports 0 for fully separated samples) count as 1e-50 in log10


# --------------------------------------------------------------------------- the grid
def run_grid(methods: list[str], seeds: list[int], epochs: list[int], unlearn: str, extra: list[str]) -> None:
    for method, seed, ep in itertools.product(methods, seeds, epochs):
        name = f"{method}-s{seed}-e{ep}"
        out = RUNS / name
        sets = [f"method.name={method}", f"seed={seed}", f"method.epochs={ep}", *extra]
        meta = RUNS / f"{name}.reports" / "run.json"
        if meta.exists() and (Path("reports/eval") / name / "per_example.jsonl").exists():
            print(f"{name}: done already", flush=True)
            continue
        t0 = time.time()
        forget = [unlearn, "forget", "--out", str(out), *[a for s in sets for a in ("--set", s)]]
        subprocess.run(forget, check=True, stdout=subprocess.DEVNULL)
        t1 = time.time()
        evaluate = [unlearn, "evaluate", str(out), "--name", name, *[a for s in extra for a in ("--set", s)]]
        subprocess.run(evaluate, check=True, stdout=subprocess.DEVNULL)
        t2 = time.time()
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"name": name, "method": method, "seed": seed, "epochs": ep, "overrides": sets,
                                    "forget_cmd": forget, "evaluate_cmd": evaluate,
                                    "forget_s": round(t1 - t0, 1), "evaluate_s": round(t2 - t1, 1)}, indent=2))
        print(f"{name}: forget {t1 - t0:.0f}s, evaluate {t2 - t1:.0f}s", flush=True)


# --------------------------------------------------------------------------- the request cycle's evidence
def models(p) -> list[tuple[str, Path, dict[str, Any]]]:
    """``(name, model dir, run inputs)``: the target, the retain model, then every run of the grid."""
    out = [("target", Path(p.model.out_dir) / "target", {"method": "(target)"}),
           ("retain", Path(p.model.out_dir) / "retain", {"method": "(retain)"})]
    for meta_file in sorted(RUNS.glob("*.reports/run.json")):
        meta = json.loads(meta_file.read_text())
        summary = json.loads((meta_file.parent / "summary.json").read_text())
        meta["steps"] = summary.get("steps")
        meta["method"] = summary.get("method", meta.get("method"))  # what the forget stage says it ran
        out.append((meta["name"], RUNS / meta["name"], meta))
    return out


def evidence(p) -> None:
    from unlearn.requests import Request
    from unlearn.requests.evidence import EVIDENCE_VERSION, request_evidence_for_model
    from unlearn.stages import read_splits

    full = read_splits(p, ["full"])["full"]
    forget = read_splits(p, [p.data.forget_split])[p.data.forget_split]
    reqs = [Request("all", "rows", json.dumps([r["id"] for r in forget]), "2024-01-01T00:00:00+00:00", "fulfilled")]
    reqs += [Request(a, "author", a, "2024-01-01T00:00:00+00:00", "fulfilled")
             for a in sorted({r["author_id"] for r in forget})]
    for name, model_dir, _ in models(p):
        out = Path(p.reports_dir) / "eval" / name / "request_evidence.json"
        if out.exists() and json.loads(out.read_text()).get("version") == EVIDENCE_VERSION:
            continue  # computed by the same evidence code: reused (another version is recomputed)
        t0 = time.time()
        ev = request_evidence_for_model(p, model_dir, reqs, full)
        out.write_text(json.dumps({"version": EVIDENCE_VERSION, "model": str(model_dir), "holdout_split": ev["holdout_split"],
                                   "per_request": ev["per_request"]}, indent=2))
        print(f"{name}: evidence {time.time() - t0:.0f}s", flush=True)


# --------------------------------------------------------------------------- reading what the runs wrote
def _records(eval_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (eval_dir / "per_example.jsonl").read_text().splitlines() if line.strip()]


def _ks(a: list[Any], b: list[Any]) -> float | None:
    import numpy as np
    import scipy.stats

    x = np.asarray([v for v in a if v is not None], dtype=float)
    y = np.asarray([v for v in b if v is not None], dtype=float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    return float(scipy.stats.ks_2samp(x, y).pvalue) if x.size and y.size else None


def _split_of(recs: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [r for r in recs if str(r.get("split", "")).startswith(prefix)]


def model_points(p, name: str, eval_dir: Path, retain_recs: list[dict[str, Any]], meta: dict[str, Any],
                 target_metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One point for the whole forget set and one per forget author, for the model evaluated in ``eval_dir``."""
    from unlearn.gate import gate_decision, request_checks, request_gate

    metrics = json.loads((eval_dir / "metrics.json").read_text())
    ev_file = eval_dir / "request_evidence.json"
    if not ev_file.exists():
        raise SystemExit(f"no {ev_file}: run `python benchmarks/request_proxy_agreement.py evidence` first")
    per_request = json.loads(ev_file.read_text())["per_request"]
    forget = _split_of(_records(eval_dir), p.data.forget_split)
    retain_tr = {r["id"]: r.get("truth_ratio") for r in _split_of(retain_recs, p.data.forget_split)}
    gate, thresholds = p.gate.model_dump(), p.requests.gate.model_dump()
    groups = [("all", forget)] + [(a, [r for r in forget if r["author_id"] == a])
                                  for a in sorted({r["author_id"] for r in forget})]
    out = []
    for who, rows in groups:
        ev = per_request[who]
        oracle_p = metrics.get("forget_quality") if who == "all" else _ks([r.get("truth_ratio") for r in rows],
                                                                          [retain_tr.get(r["id"]) for r in rows])
        oracle = gate_decision({**metrics, "forget_quality": oracle_p}, target_metrics, gate)
        proxy = request_gate({who: ev}, metrics, target_metrics, thresholds, p.gate.min_utility_ratio)
        out.append({
            "run": name, "method": meta.get("method"), "seed": meta.get("seed"), "epochs": meta.get("epochs"),
            "steps": meta.get("steps"), "unit": who, "rows": len(rows),
            "oracle_p": oracle_p, "proxy_p": ev["ks_pvalue"], "ks_on": ev["ks_on"],
            "mia_auc_loss": ev["mia_auc_loss"], "mia_auc_min_k_plus_plus": ev["mia_auc_min_k_plus_plus"],
            "privleak": ev["privleak"], "prob_gap": ev["prob_gap"], "rouge_gap": ev["rouge_gap"],
            "utility_ratio": (metrics.get("model_utility") or 0) / target_metrics["model_utility"],
            "oracle_pass": oracle.passed, "proxy_pass": proxy.passed,
            "oracle_forget_pass": oracle_p is not None and oracle_p >= gate["min_forget_quality"],
            "proxy_forget_pass": not request_checks(ev, thresholds),
            "proxy_reasons": request_checks(ev, thresholds),
        })
    return out


def collect(p) -> list[dict[str, Any]]:
    rdir = Path(p.reports_dir) / "eval"
    target_metrics = json.loads((rdir / "target" / "metrics.json").read_text())
    retain_recs = _records(rdir / "retain")
    points = []
    for name, _, meta in models(p):
        points += model_points(p, name, rdir / name, retain_recs, meta, target_metrics)
    return points


# --------------------------------------------------------------------------- the table
def _log(p: float | None) -> float | None:
    return None if p is None else math.log10(max(p, FLOOR))


def correlations(points: list[dict[str, Any]]) -> dict[str, Any]:
    import scipy.stats

    pairs = [(_log(q["oracle_p"]), _log(q["proxy_p"])) for q in points
             if q["oracle_p"] is not None and q["proxy_p"] is not None]
    if len(pairs) < 3:
        return {"n": len(pairs), "pearson_log10": None, "spearman": None}
    x, y = zip(*pairs)
    return {"n": len(pairs), "pearson_log10": float(scipy.stats.pearsonr(x, y)[0]),
            "spearman": float(scipy.stats.spearmanr(x, y)[0])}


def confusion(points: list[dict[str, Any]], oracle_key: str, proxy_key: str) -> dict[str, int]:
    c = {"both_pass": 0, "proxy_only": 0, "oracle_only": 0, "both_fail": 0}
    for q in points:
        o, x = q[oracle_key], q[proxy_key]
        c["both_pass" if o and x else "proxy_only" if x else "oracle_only" if o else "both_fail"] += 1
    return c


def sweep(points: list[dict[str, Any]], base: dict[str, float]) -> list[dict[str, Any]]:
    """Proxy threshold sets (each knob on a grid around the configured one) by false accepts (proxy passes,
    oracle's forget side fails), then by how many oracle-accepted points the proxy also accepts."""
    from unlearn.gate import request_checks

    grid = {"min_ks_pvalue": [1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1],
            "max_mia_auc_gap": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4],
            "max_prob_gap": [0.02, 0.05, 0.1, 0.2, 0.3], "max_rouge_gap": [0.05, 0.1, 0.2, 0.3]}
    out = []
    for values in itertools.product(*grid.values()):
        th = dict(zip(grid, values))
        ok = [not request_checks(_ev(q), th) for q in points]
        fa = sum(1 for q, a in zip(points, ok) if a and not q["oracle_forget_pass"])
        ta = sum(1 for q, a in zip(points, ok) if a and q["oracle_forget_pass"])
        out.append({**th, "false_accepts": fa, "true_accepts": ta,
                    "oracle_accepts": sum(q["oracle_forget_pass"] for q in points),
                    "distance": sum(abs(math.log(th[k] / base[k])) for k in th)})
    out.sort(key=lambda r: (r["false_accepts"], -r["true_accepts"], r["distance"]))
    return out


def _ev(q: dict[str, Any]) -> dict[str, Any]:
    return {k: q[k] for k in ("mia_auc_loss", "mia_auc_min_k_plus_plus", "prob_gap", "rouge_gap")} | {
        "ks_pvalue": q["proxy_p"]}


def fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "pass" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and abs(v) < 1e-3 else f"{v:.3f}"
    return str(v)


def markdown(points: list[dict[str, Any]], p, project: str) -> str:
    runs = [q for q in points if q["unit"] == "all"]
    unlearned = [q for q in runs if not str(q["method"]).startswith("(")]
    authors = [q for q in points if q["unit"] != "all" and not str(q["method"]).startswith("(")]
    lines = [f"Generated by `python benchmarks/request_proxy_agreement.py table` in `{project}` from "
             "`reports/eval/<run>/{metrics.json, per_example.jsonl, request_evidence.json}` and "
             "`runs/<run>.reports/{summary,run}.json`. p-values of 0 count as 1e-50 in log10.",
             f"Oracle gate: forget_quality >= {p.gate.min_forget_quality} and utility >= "
             f"{p.gate.min_utility_ratio} x target. Proxy gate (`requests.gate`): " + ", ".join(
                 f"{k}={v}" for k, v in p.requests.gate.model_dump().items()) + " and the same utility check.", ""]
    lines += ["| run | method | seed | steps | oracle p (FQ) | proxy p (KS vs holdout) | MIA AUC loss | MIA AUC "
              "min-k++ | prob gap | ROUGE gap | utility/target | oracle | proxy |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for q in runs:
        lines.append("| " + " | ".join(fmt(q[k]) for k in (
            "run", "method", "seed", "steps", "oracle_p", "proxy_p", "mia_auc_loss", "mia_auc_min_k_plus_plus",
            "prob_gap", "rouge_gap", "utility_ratio", "oracle_pass", "proxy_pass")) + " |")
    lines.append("")
    for label, pts in ((f"unlearned runs, whole forget set ({len(unlearned)})", unlearned),
                       (f"unlearned runs x forget author ({len(authors)})", authors)):
        for what, ok, xk in (("full gate", "oracle_pass", "proxy_pass"),
                             ("forget side only", "oracle_forget_pass", "proxy_forget_pass")):
            c = confusion(pts, ok, xk)
            agree = (c["both_pass"] + c["both_fail"]) / max(1, len(pts))
            lines += [f"**{label}, {what}**: agreement {agree:.0%}", "",
                      "| | oracle pass | oracle fail |", "|---|---|---|",
                      f"| proxy pass | {c['both_pass']} | {c['proxy_only']} |",
                      f"| proxy fail | {c['oracle_only']} | {c['both_fail']} |", ""]
        cor = correlations(pts)
        lines += [f"Correlation of log10 p-values ({label}, n={cor['n']}): Pearson {fmt(cor['pearson_log10'])}, "
                  f"Spearman {fmt(cor['spearman'])}.", ""]
    pts = unlearned + authors
    conf = p.requests.gate.model_dump()
    sw = sweep(pts, conf)
    keys = ("min_ks_pvalue", "max_mia_auc_gap", "max_prob_gap", "max_rouge_gap")
    retain = [q for q in points if q["method"] == "(retain)"]
    lines += [f"Threshold sweep over the {len(pts)} unlearned points (runs and run x author), forget side "
              f"({len(sw)} threshold sets; a false accept = the proxy passes, the oracle's forget side fails). The "
              f"configured thresholds: {_count_fa(pts, conf)} false accept(s), {_count_ta(pts, conf)} of "
              f"{sw[0]['oracle_accepts']} oracle accepts kept; the retain model itself passes "
              f"{sum(_passes(q, conf) for q in retain)} of {len(retain)} of its units (whole set + authors). "
              "Best sets (fewest false accepts, then most true accepts, then closest to the configured):", "",
              "| " + " | ".join(keys) + " | false accepts | true accepts | retain units passing |",
              "|" + "---|" * (len(keys) + 3)]
    for row in sw[:8]:
        th = {k: row[k] for k in keys}
        lines.append("| " + " | ".join(str(row[k]) for k in keys) + f" | {row['false_accepts']} | "
                     f"{row['true_accepts']} of {row['oracle_accepts']} | "
                     f"{sum(_passes(q, th) for q in retain)} of {len(retain)} |")
    lines.append("")
    whole = next((q for q in retain if q["unit"] == "all"), None)
    if whole is not None:
        cal = [row for row in sw if _passes(whole, {k: row[k] for k in keys})]
        lines += [f"Of those sets, {len(cal)} also pass the retain model's own evidence on the whole forget set (a "
                  "model that never saw the forget authors); the best of them:", "",
                  "| " + " | ".join(keys) + " | false accepts | true accepts | retain units passing |",
                  "|" + "---|" * (len(keys) + 3)]
        for row in cal[:3]:
            th = {k: row[k] for k in keys}
            lines.append("| " + " | ".join(str(row[k]) for k in keys) + f" | {row['false_accepts']} | "
                         f"{row['true_accepts']} of {row['oracle_accepts']} | "
                         f"{sum(_passes(q, th) for q in retain)} of {len(retain)} |")
        lines.append("")
    return "\n".join(lines)


def _passes(q: dict[str, Any], th: dict[str, float]) -> bool:
    from unlearn.gate import request_checks

    return not request_checks(_ev(q), th)


def _count_fa(points: list[dict[str, Any]], th: dict[str, float]) -> int:
    return sum(1 for q in points if _passes(q, th) and not q["oracle_forget_pass"])


def _count_ta(points: list[dict[str, Any]], th: dict[str, float]) -> int:
    return sum(1 for q in points if _passes(q, th) and q["oracle_forget_pass"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="unlearn + evaluate one model per (method, seed, epochs)")
    r.add_argument("--methods", nargs="+", default=["dipo", "npo"])
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    r.add_argument("--epochs", nargs="+", type=int, default=[1, 2, 5])
    r.add_argument("--unlearn", default=str(Path(sys.executable).with_name("unlearn")))
    r.add_argument("--set", dest="extra", action="append", default=[], help="one more override for every run")
    e = sub.add_parser("evidence", help="the request cycle's holdout evidence of every model (cached)")
    e.add_argument("--params", default="params.yaml")
    t = sub.add_parser("table", help="the agreement table, from what the runs wrote")
    t.add_argument("--params", default="params.yaml")
    t.add_argument("--md", type=Path)
    t.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "run":
        run_grid(a.methods, a.seeds, a.epochs, a.unlearn, a.extra)
        return 0
    from unlearn.config import load_params

    p = load_params(a.params)
    if a.cmd == "evidence":
        evidence(p)
        return 0
    points = collect(p)
    md = markdown(points, p, str(Path.cwd()))
    print(md)
    for path, text in ((a.md, md), (a.json, json.dumps({"points": points}, indent=2, default=str))):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
