"""benchmarks/bench_memory.py's memory model: the fit recovers known coefficients, the projection adds them to
the analytic static part and names the largest target each GPU holds, and --from-json reruns only that (no
model is built or trained here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


COEF = {"params": 3.0, "BTV": 4.0, "BTHL": 20.0, "const": 300e6}
GRID = [(h, l, v, n, b, t) for (h, l, n) in ((128, 4, 5e6), (256, 6, 13e6), (512, 8, 40e6))
        for v in (2048, 32000) for (b, t) in ((4, 256), (2, 128))]


def _points(bench, coef, noise=0.0):
    pts = []
    for i, (h, l, v, n, b, t) in enumerate(GRID):
        x = bench.features(n, b, t, v, h, l)
        y = sum(coef[f] * xi for f, xi in zip(bench.FEATURES, x)) * (1 + noise * (-1) ** i)
        pts.append(dict(params=n, batch=b, seq=t, vocab=v, hidden=h, layers=l, bytes=y))
    return pts


def test_the_fit_recovers_known_coefficients(bench):
    fit = bench.fit_memory_model(_points(bench, COEF))
    for k, v in COEF.items():
        assert fit["coef"][k] == pytest.approx(v, rel=1e-6), k
    assert fit["identified"] == list(bench.FEATURES) and fit["rms"] < 1.0
    # 1 % alternating noise: the dominant terms stay within 10 %, and the fit stays within the noise.
    pts = _points(bench, COEF, noise=0.01)
    noisy = bench.fit_memory_model(pts)
    for k in ("BTV", "const"):
        assert noisy["coef"][k] == pytest.approx(COEF[k], rel=0.1), k
    mean = sum(p["bytes"] for p in pts) / len(pts)
    assert noisy["rms"] < 0.01 * mean


def test_the_fit_is_non_negative_and_names_what_the_points_do_not_determine(bench):
    # A true model without the params term, plus a negative pull: least squares would go below 0, NNLS stays at 0.
    coef = dict(COEF, params=0.0)
    pts = _points(bench, coef)
    for p in pts:
        p["bytes"] -= 0.5 * p["params"]
    fit = bench.fit_memory_model(pts)
    assert all(v >= 0 for v in fit["coef"].values()) and fit["coef"]["params"] == 0.0
    # One vocabulary only (and one batch shape): B*T*V is a constant, not separable from d.
    one_vocab = [p for p in _points(bench, COEF) if p["vocab"] == 32000 and p["batch"] == 4]
    assert "BTV" not in bench.fit_memory_model(one_vocab)["identified"]


def test_the_projection_adds_the_static_part_and_picks_the_largest_model_that_fits(bench):
    n7 = bench.llama_params(**bench.TARGETS["7B (Llama-2-7b)"])
    assert n7 == pytest.approx(6.74e9, rel=2e-3)  # Llama-2-7b's published count
    assert bench.llama_params(**bench.TARGETS["8B (Llama-3.1-8B)"]) == pytest.approx(8.03e9, rel=2e-3)
    assert bench.llama_params(**bench.TARGETS["1B (Llama-3.2-1B)"]) == pytest.approx(1.236e9, rel=2e-3)
    fit = {"coef": dict(COEF), "rms": 0.0, "n": 12, "identified": list(bench.FEATURES)}
    zero = {"coef": dict.fromkeys(bench.FEATURES, 0.0), "rms": 0.0, "n": 12, "identified": []}
    rows = {r["key"]: r for r in bench.project({"dipo/full": fit, "dipo/lora": zero}, batch=8, seq=512)}
    full = rows["dipo/full"]["targets"]["7B (Llama-2-7b)"]
    t = bench.TARGETS["7B (Llama-2-7b)"]
    act = 3.0 * n7 + 4.0 * 8 * 512 * t["vocab"] + 20.0 * 8 * 512 * t["hidden"] * t["layers"] + 300e6
    assert full["static_fp32"] == 16 * n7 and full["static_bf16"] == 14 * n7
    assert full["activations"] == pytest.approx(act) and full["total_fp32"] == pytest.approx(16 * n7 + act)
    lora7 = rows["dipo/lora"]["targets"]["7B (Llama-2-7b)"]
    assert lora7["trainable"] == bench.lora_params(**t) and lora7["total_bf16"] == 2 * n7 + 12 * lora7["trainable"]
    # With no activations, LoRA on a bf16 base holds every target on 40 GB; full fp32 training does not.
    assert rows["dipo/lora"]["largest_bf16"][40] == "8B (Llama-3.1-8B)"
    totals = {n: r["total_fp32"] for n, r in rows["dipo/full"]["targets"].items()}
    for gb in bench.GPUS_GB:
        fitting = [n for n, v in totals.items() if v <= gb * 1e9]
        assert rows["dipo/full"]["largest_fp32"][gb] == (fitting[-1] if fitting else None)


def test_from_json_reruns_the_fit_and_the_projection(bench, tmp_path):
    measured = []
    for (h, l, v, n, b, t) in GRID:
        for setting, trainable in (("full", n), ("lora", n / 30)):
            size = {128: "S", 256: "M", 512: "L"}[h]
            act = sum(COEF[f] * x for f, x in zip(bench.FEATURES, bench.features(n, b, t, v, h, l)))
            measured.append(dict(method="npo", size=size, vocab=v, setting=setting, batch=b, seq=t, steps=3,
                                 hidden=h, layers=l, params=n, trainable=trainable, step_s=1.0,
                                 peak_mib=(act + 12 * trainable) / 2 ** 20))
    fits = bench.fits_from_measurements(measured)
    assert fits["npo/lora"]["coef"]["BTHL"] == pytest.approx(20.0, rel=1e-6)  # the optimiser state taken out
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"measurements": measured}))
    out = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert "| npo/full | 12 | 3.00 | 4.00 | 20.00 | 286 |" in out  # 300e6 bytes = 286 MiB
    assert "largest on 141 GB" in out and "7B (Llama-2-7b)" in out
