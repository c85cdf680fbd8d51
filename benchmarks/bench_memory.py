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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

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
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
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
                    print(f"| {method} | {size} ({r['params'] / 1e6:.1f}M) | {vocab} | {setting} | "
                          f"{r['trainable'] / 1e6:.2f}M | {r['peak_mib']:.0f} | {r['step_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
