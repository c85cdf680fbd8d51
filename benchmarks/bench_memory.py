"""Peak memory and step time of unlearning steps, side by side: full training vs LoRA vs LoRA + gradient
checkpointing, with and without the chunked loss path, for DiPO (top-K cache), NPO and GradDiff.

Each configuration runs in a fresh process (so one's allocations never count for the next): it builds a
from-scratch Llama of the given size, runs ``--steps`` optimizer steps of ``unlearn.train.train_loop`` on random
token batches (forget + retain, ``--batch`` rows of ``--seq`` tokens, the second half of each row the answer) with a
random reference of the method's needs, and reports

* peak: the process's peak resident memory during training minus its resident memory just before (Linux
  ``VmHWM`` after resetting it through ``/proc/self/clear_refs``): the model's gradients, the AdamW state,
  activations and the loss's intermediates (the weights themselves are allocated before);
* step: the median wall time of the steps after the first.

    .venv/bin/python benchmarks/bench_memory.py                  # the default grid (about 10 minutes, 1 thread)
    .venv/bin/python benchmarks/bench_memory.py --sizes L --vocabs 32000 --methods dipo

CPU only here (float32, 1 thread); the numbers are relative: what a knob saves, not what a GPU needs.

After the measured table, the same run fits a memory model per (method, setting) to the measured points and
projects it to Llama-style 1B, 3B, 7B and 8B configurations (:data:`TARGETS`) against 40, 80 and 141 GB GPUs
(:func:`fit_memory_model`, :func:`project`). The measurements are written to ``--json`` on every run, and
``--from-json`` reruns only the fit and the projection from such a file (no measuring):

    .venv/bin/python benchmarks/bench_memory.py --from-json benchmarks/bench_memory.json

The model: the measured peak (above the weights) minus the analytic gradients + AdamW state of the trainable
parameters (12 bytes each, float32: gradient, exp_avg, exp_avg_sq) is fitted as

    activation bytes = a * params + b * (batch * seq * vocab) + c * (batch * seq * hidden * layers) + d

by non-negative least squares; the projection adds it to the analytic weights + gradients + AdamW state of the
target configuration (stated separately, float32 and with a bfloat16 base).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # name -> (hidden, layers, heads, intermediate)
    "S": (128, 4, 4, 384),
    "M": (256, 6, 4, 768),
    "L": (512, 8, 8, 1536),
}
SETTINGS = {  # name -> (lora, gradient checkpointing, loss chunk)
    "full": (False, False, 0),
    "full+chunk": (False, False, 32),
    "lora": (True, False, 0),
    "lora+gc": (True, True, 0),
    "lora+gc+chunk": (True, True, 32),
}


# Llama-style targets of the projection: hidden, layers, vocab, intermediate, heads, kv heads, tied embeddings.
TARGETS = {
    "1B (Llama-3.2-1B)": dict(hidden=2048, layers=16, vocab=128256, inter=8192, heads=32, kv=8, tied=True),
    "3B (Llama-3.2-3B)": dict(hidden=3072, layers=28, vocab=128256, inter=8192, heads=24, kv=8, tied=True),
    "7B (Llama-2-7b)": dict(hidden=4096, layers=32, vocab=32000, inter=11008, heads=32, kv=32, tied=False),
    "8B (Llama-3.1-8B)": dict(hidden=4096, layers=32, vocab=128256, inter=14336, heads=32, kv=8, tied=False),
}
GPUS_GB = (40, 80, 141)
LORA_R = 16  # the benchmark's adapter: r = 16 on every linear layer of the decoder (peft's all-linear)
FEATURES = ("params", "BTV", "BTHL", "const")
OPTIM_BYTES = 12  # float32 gradient + AdamW exp_avg + exp_avg_sq per trainable parameter (above the weights)


def llama_params(hidden: int, layers: int, vocab: int, inter: int, heads: int, kv: int, tied: bool) -> int:
    """Parameters of a Llama decoder: embeddings (and an untied head), attention with GQA, SwiGLU MLP, norms."""
    kv_dim = hidden * kv // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def lora_params(hidden: int, layers: int, inter: int, heads: int, kv: int, r: int = LORA_R, **_) -> int:
    """Adapter parameters of rank ``r`` on q, k, v, o, gate, up and down of every layer: r * (in + out) each."""
    kv_dim = hidden * kv // heads
    per_layer = r * (2 * (hidden + hidden) + 2 * (hidden + kv_dim) + 3 * (hidden + inter))
    return layers * per_layer


def features(params: float, batch: int, seq: int, vocab: int, hidden: int, layers: int) -> list[float]:
    """The memory model's regressors of one configuration, in :data:`FEATURES` order."""
    return [float(params), float(batch * seq * vocab), float(batch * seq * hidden * layers), 1.0]


def fit_memory_model(points: list[dict]) -> dict:
    """Non-negative least squares of ``bytes`` on :func:`features` over ``points``.

    Each point: ``params``, ``batch``, ``seq``, ``vocab``, ``hidden``, ``layers`` and ``bytes`` (the measured
    activation bytes: peak minus the analytic optimiser state). Exact NNLS for 4 unknowns: every subset of
    the regressors is solved by ``numpy.linalg.lstsq`` and the non-negative solution of least residual is kept.
    A regressor the points do not vary (a rank-deficient subset) cannot be told apart from the others: the
    result's ``identified`` lists the ones the points determine. Returns ``coef`` (name -> bytes per unit),
    ``rms`` (bytes) and ``n``.
    """
    import numpy as np

    X = np.array([features(p["params"], p["batch"], p["seq"], p["vocab"], p["hidden"], p["layers"]) for p in points])
    y = np.array([float(p["bytes"]) for p in points])
    scale = np.abs(X).max(0)
    scale[scale == 0] = 1.0
    Xs = X / scale
    best = None
    for k in range(1, len(FEATURES) + 1):
        for cols in itertools.combinations(range(len(FEATURES)), k):
            sub = Xs[:, cols]
            if np.linalg.matrix_rank(sub) < len(cols):
                continue
            sol, *_ = np.linalg.lstsq(sub, y, rcond=None)
            if (sol < 0).any():
                continue
            res = float(np.sum((sub @ sol - y) ** 2))
            if best is None or res < best[0] - 1e-9 * max(1.0, float(y @ y)):
                best = (res, cols, sol)
    coef = dict.fromkeys(FEATURES, 0.0)
    if best is None:  # no non-negative solution at all (all measurements <= 0): a zero model
        return {"coef": coef, "rms": float(np.sqrt(np.mean(y ** 2))) if len(y) else 0.0, "n": len(y),
                "identified": []}
    res, cols, sol = best
    for c, v in zip(cols, sol):
        coef[FEATURES[c]] = float(v / scale[c])
    rank = int(np.linalg.matrix_rank(Xs)) if len(y) else 0
    identified = [f for i, f in enumerate(FEATURES)
                  if np.linalg.matrix_rank(np.delete(Xs, i, axis=1)) < rank]  # dropping it loses rank
    return {"coef": coef, "rms": float(np.sqrt(res / len(y))), "n": len(y), "identified": identified}


def static_bytes(n_params: int, n_trainable: int, weight_bytes: int) -> int:
    """Weights (``weight_bytes`` each) + float32 gradient and AdamW state (12 bytes) of the trainable ones."""
    return weight_bytes * n_params + OPTIM_BYTES * n_trainable


def project(fits: dict[str, dict], batch: int, seq: int, targets: dict = TARGETS, gpus=GPUS_GB) -> list[dict]:
    """The projection of each fitted setting (``fits``: "method/setting" -> :func:`fit_memory_model`) to ``targets``.

    Per target: its parameters, the LoRA adapter's (settings whose name starts with ``lora``), the analytic
    static bytes with float32 weights (what the loop loads today: ``load_model`` reads float32; accelerate's
    bf16 autocast keeps float32 master weights) and with bfloat16 weights (a frozen bf16 base under LoRA;
    for full training, bf16 weights with float32 AdamW state), the fitted activation bytes, the totals, and for
    each GPU size (GB = 1e9 bytes) the largest target whose float32 total fits (``None``: none does).
    """
    rows = []
    for key, fit in fits.items():
        setting = key.split("/", 1)[1]
        use_lora = setting.startswith("lora")
        row = {"key": key, "targets": {}, "largest_fp32": {}, "largest_bf16": {}}
        for name, t in targets.items():
            n = llama_params(**t)
            n_train = lora_params(**t) if use_lora else n
            act = sum(fit["coef"][f] * x for f, x in zip(FEATURES, features(n, batch, seq, t["vocab"], t["hidden"],
                                                                                t["layers"])))
            s32, s16 = static_bytes(n, n_train, 4), static_bytes(n, n_train, 2)
            row["targets"][name] = dict(params=n, trainable=n_train, static_fp32=s32, static_bf16=s16,
                                        activations=act, total_fp32=s32 + act, total_bf16=s16 + act)
        for gb in gpus:
            for kind in ("fp32", "bf16"):
                fits_in = [name for name, r in row["targets"].items() if r[f"total_{kind}"] <= gb * 1e9]
                row[f"largest_{kind}"][gb] = fits_in[-1] if fits_in else None
        rows.append(row)
    return rows


def fits_from_measurements(measured: list[dict]) -> dict[str, dict]:
    """One fit per method/setting over the measured rows (``peak_mib``, ``trainable`` and the configuration)."""
    groups: dict[str, list[dict]] = {}
    for r in measured:
        if "peak_mib" not in r:
            continue
        hidden, layers = r.get("hidden"), r.get("layers")
        if hidden is None:
            hidden, layers = SIZES[r["size"]][:2]
        groups.setdefault(f"{r['method']}/{r['setting']}", []).append(dict(
            params=r["params"], batch=r["batch"], seq=r["seq"], vocab=r["vocab"], hidden=hidden, layers=layers,
            bytes=r["peak_mib"] * 2 ** 20 - OPTIM_BYTES * r["trainable"]))
    return {k: fit_memory_model(v) for k, v in groups.items()}


def print_projection(measured: list[dict], batch: int, seq: int) -> None:
    """The fits and the projection tables, in markdown."""
    fits = fits_from_measurements(measured)
    if not fits:
        print("no measurements to fit")
        return
    print(f"\nMemory model per method/setting (non-negative least squares on the measured points; activation bytes "
          f"= a*params + b*B*T*V + c*B*T*H*L + d, B and T of each part, forget + retain):")
    print("| method/setting | points | a (B/param) | b (B/(B*T*V)) | c (B/(B*T*H*L)) | d (MiB) | rms (MiB) | determined |")
    print("|---|---|---|---|---|---|---|---|")
    for k, f in fits.items():
        c = f["coef"]
        print(f"| {k} | {f['n']} | {c['params']:.2f} | {c['BTV']:.2f} | {c['BTHL']:.2f} | {c['const'] / 2**20:.0f} | "
              f"{f['rms'] / 2**20:.0f} | {', '.join(f['identified']) or 'none'} |")
    rows = project(fits, batch, seq)
    print(f"\nStatic part (analytic, GB = 1e9 bytes): weights + float32 gradients + AdamW state of the trainable "
          f"parameters; LoRA r = {LORA_R} on every decoder linear layer")
    print("| target | params | full fp32 | full bf16 weights | LoRA trainable | LoRA fp32 base | LoRA bf16 base |")
    print("|---|---|---|---|---|---|---|")
    for name, t in TARGETS.items():
        n, nl = llama_params(**t), lora_params(**t)
        print(f"| {name} | {n / 1e9:.2f}B | {static_bytes(n, n, 4) / 1e9:.1f} | {static_bytes(n, n, 2) / 1e9:.1f} | "
              f"{nl / 1e6:.1f}M | {static_bytes(n, nl, 4) / 1e9:.1f} | {static_bytes(n, nl, 2) / 1e9:.1f} |")
    print(f"\nProjected peak (GB) at batch {batch} x {seq} tokens (forget + retain): static (fp32 weights / bf16 "
          f"weights) + fitted activations (float32, as measured on the CPU)")
    names = list(TARGETS)
    print("| method/setting | " + " | ".join(f"{n.split()[0]} act / fp32 / bf16" for n in names)
          + " | " + " | ".join(f"largest on {g} GB (fp32 / bf16)" for g in GPUS_GB) + " |")
    print("|---|" + "---|" * (len(names) + len(GPUS_GB)))
    for r in rows:
        cells = [f"{r['targets'][n]['activations'] / 1e9:.0f} / {r['targets'][n]['total_fp32'] / 1e9:.0f} / "
                 f"{r['targets'][n]['total_bf16'] / 1e9:.0f}" for n in names]
        fit = [f"{(r['largest_fp32'][g] or 'none').split()[0]} / {(r['largest_bf16'][g] or 'none').split()[0]}"
               for g in GPUS_GB]
        print(f"| {r['key']} | " + " | ".join(cells) + " | " + " | ".join(fit) + " |")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(spec: dict) -> dict:
    """One configuration, in this process: returns peak (MiB above the start) and the median step time (s)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from unlearn.config import LoraCfg, MethodCfg
    from unlearn.methods.registry import REF_KEYS, get_method
    from unlearn.models import lora as L
    from unlearn.train import LoopCfg, train_loop

    torch.set_num_threads(1)
    torch.manual_seed(0)
    hidden, layers, heads, inter = SIZES[spec["size"]]
    V, B, T = spec["vocab"], spec["batch"], spec["seq"]
    use_lora, gc, chunk = SETTINGS[spec["setting"]]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, num_key_value_heads=heads,
                                         intermediate_size=inter, max_position_embeddings=T,
                                         tie_word_embeddings=True))
    n_params = sum(p.numel() for p in model.parameters())
    cfg = MethodCfg(name=spec["method"], lora=LoraCfg(enabled=use_lora, r=16, alpha=32.0),
                    gradient_checkpointing=gc, loss_chunk=chunk, alpha=1.0)
    model = L.maybe_wrap(model, cfg.lora)
    method = get_method(cfg.name)
    needs = method.needs_for(cfg)
    K = 64

    def part():
        ids = torch.randint(4, V, (B, T))
        labels = ids.clone()
        labels[:, : T // 2] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def make_batch(idx, epoch):
        batch = {"forget": part(), "retain": part()}
        ref = {}
        if "ref_seq" in needs:
            ref["seq_logp"] = -torch.rand(B) * 50
        if "ref_topk" in needs:
            logp = torch.randn(B, T - 1, K).sort(-1, descending=True).values.log_softmax(-1) - 0.01
            ref.update(topk_ids=torch.randint(0, V, (B, T - 1, K)), topk_logp=logp,
                       label_logp=torch.full((B, T - 1), -3.0))
        batch["ref"] = {k: v for k, v in ref.items() if any(k in REF_KEYS[n] for n in needs if n in REF_KEYS)}
        return batch

    times: list[float] = []
    last = [time.perf_counter()]

    def on_log(entry):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    loop = LoopCfg(epochs=1, batch_size=1, lr=1e-4, seed=0, gradient_checkpointing=gc, loss_chunk=chunk,
                   desc=spec["setting"])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    start = _rss_kb("VmRSS")
    last[0] = time.perf_counter()
    train_loop(model, spec["steps"], make_batch, lambda m, b: method.compute(m, b, cfg), loop, on_log=on_log)
    peak = _rss_kb("VmHWM") - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": n_params, "trainable": trainable, "peak_mib": peak / 1024,
            "step_s": statistics.median(times[1:] or times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["S", "M"], choices=list(SIZES))
    ap.add_argument("--vocabs", nargs="+", type=int, default=[2048, 32000])
    ap.add_argument("--methods", nargs="+", default=["dipo", "npo", "graddiff"])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path(__file__).with_name("bench_memory.json"),
                    help="where the measurements are written (every measuring run)")
    ap.add_argument("--from-json", type=Path, help="no measuring: fit and project the measurements in this file")
    ap.add_argument("--project-batch", type=int, default=8, help="batch of the projection (rows per part)")
    ap.add_argument("--project-seq", type=int, default=512, help="tokens per row of the projection")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.from_json:
        print_projection(json.loads(args.from_json.read_text())["measurements"], args.project_batch, args.project_seq)
        return
    measured: list[dict] = []
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    print(f"batch {args.batch} x {args.seq} tokens (forget + retain), {args.steps} steps, float32 on the CPU, 1 thread")
    print("| method | model | vocab | setting | trainable | peak above start (MiB) | step (s) |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        for size in args.sizes:
            for vocab in args.vocabs:
                for setting in args.settings:
                    spec = dict(method=method, size=size, vocab=vocab, setting=setting, batch=args.batch,
                                seq=args.seq, steps=args.steps)
                    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                         capture_output=True, text=True)
                    if res.returncode != 0:
                        print(f"| {method} | {size} | {vocab} | {setting} | failed: "
                              f"{res.stderr.strip().splitlines()[-1][:80]} | | |")
                        continue
                    r = json.loads(res.stdout.strip().splitlines()[-1])
                    hidden, layers = SIZES[size][:2]
                    measured.append(dict(spec, hidden=hidden, layers=layers, **r))
                    print(f"| {method} | {size} ({r['params'] / 1e6:.1f}M) | {vocab} | {setting} | "
                          f"{r['trainable'] / 1e6:.2f}M | {r['peak_mib']:.0f} | {r['step_s']:.2f} |", flush=True)
    args.json.write_text(json.dumps({"argv": sys.argv[1:], "measurements": measured}, indent=1) + "\n")
    print(f"\nmeasurements written to {args.json}")
    print_projection(measured, args.project_batch, args.project_seq)


if __name__ == "__main__":
    main()
