"""benchmarks/request_proxy_agreement.py builds its table from what the runs wrote (no model, no training here:
the files are written by the test in the layout `unlearn forget --out` / `unlearn evaluate` / `evidence` use)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "request_proxy_agreement.py"


def load_script():
    spec = importlib.util.spec_from_file_location("request_proxy_agreement", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GOOD = {"ks_pvalue": 0.6, "ks_on": "prob", "mia_auc_loss": 0.5, "mia_auc_min_k_plus_plus": 0.52, "privleak": 4.0,
        "prob_gap": 0.01, "rouge_gap": 0.0}
BAD = {"ks_pvalue": 1e-9, "ks_on": "prob", "mia_auc_loss": 0.02, "mia_auc_min_k_plus_plus": 0.03, "privleak": -94.0,
       "prob_gap": 0.6, "rouge_gap": 0.5}


def write_model(root: Path, name: str, truth_ratio: float, fq: float, evidence: dict, utility: float = 0.6):
    d = root / "reports" / "eval" / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"forget_quality": fq, "model_utility": utility}))
    recs = [{"split": "forget10_perturbed", "id": f"{a}-q{i}", "author_id": a, "truth_ratio": truth_ratio + i / 100}
            for a in ("syn-a1", "syn-a2") for i in range(6)]
    (d / "per_example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "request_evidence.json").write_text(json.dumps({"per_request": {u: evidence for u in ("all", "syn-a1",
                                                                                               "syn-a2")}}))


def write_run(root: Path, name: str, method: str, steps: int, **kw):
    write_model(root, name, **kw)
    rep = root / "runs" / f"{name}.reports"
    rep.mkdir(parents=True)
    (rep / "summary.json").write_text(json.dumps({"method": method, "steps": steps}))
    (rep / "run.json").write_text(json.dumps({"name": name, "method": method, "seed": 0, "epochs": 1}))


def test_the_table_counts_agreement_from_the_logged_files(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 0}))
    write_model(tmp_path, "target", truth_ratio=0.1, fq=1e-8, evidence=BAD)
    write_model(tmp_path, "retain", truth_ratio=0.8, fq=1.0, evidence=GOOD)
    write_run(tmp_path, "a-forgets", "npo", 25, truth_ratio=0.8, fq=0.5, evidence=GOOD)  # both accept
    write_run(tmp_path, "b-memorises", "npo", 5, truth_ratio=0.1, fq=1e-6, evidence=BAD)  # both refuse
    write_run(tmp_path, "c-proxy-strict", "dipo", 10, truth_ratio=0.8, fq=0.3, evidence=BAD)  # oracle only
    monkeypatch.chdir(tmp_path)
    mod = load_script()
    assert mod.main(["table", "--md", "out/agreement.md", "--json", "out/agreement.json"]) == 0
    points = json.loads((tmp_path / "out" / "agreement.json").read_text())["points"]
    runs = {q["run"]: q for q in points if q["unit"] == "all"}
    assert set(runs) == {"target", "retain", "a-forgets", "b-memorises", "c-proxy-strict"}
    assert runs["c-proxy-strict"]["method"] == "dipo" and runs["c-proxy-strict"]["steps"] == 10
    assert (runs["a-forgets"]["oracle_pass"], runs["a-forgets"]["proxy_pass"]) == (True, True)
    assert (runs["c-proxy-strict"]["oracle_pass"], runs["c-proxy-strict"]["proxy_pass"]) == (True, False)
    # per author, the oracle p-value is recomputed: the run's truth ratios vs the retain model's, same rows
    per_author = [q for q in points if q["run"] == "a-forgets" and q["unit"] != "all"]
    assert len(per_author) == 2 and all(q["oracle_p"] == 1.0 for q in per_author)
    unlearned = [q for q in points if q["unit"] == "all" and not q["method"].startswith("(")]
    assert mod.confusion(unlearned, "oracle_pass", "proxy_pass") == {"both_pass": 1, "proxy_only": 0,
                                                                    "oracle_only": 1, "both_fail": 1}
    md = (tmp_path / "out" / "agreement.md").read_text()
    assert "**unlearned runs, whole forget set (3), full gate**: agreement 67%" in md
    assert "| proxy pass | 1 | 0 |" in md and "| proxy fail | 1 | 1 |" in md
    assert "Correlation of log10 p-values" in md and "Threshold sweep" in md
