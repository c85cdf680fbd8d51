"""Unlearning step throughput and peak memory, through the real ``unlearn forget`` code path.

    python benchmarks/bench_unlearn.py                       # params.yaml, models/target, 20 steps
    python benchmarks/bench_unlearn.py --steps 40 --set method.batch_size=32

Prints ONE table, measured in one run on one machine:

* DiPO with the reference cache (``reference="cache"``), without it (a live
  reference forward every step, top-K like the cache: ``live``), and with the
  exact full-vocabulary live reference (``exact``);
* every registered method (``METHODS``) with the cache (methods that need no
  reference quantity run without one).

Each variant runs in a fresh subprocess (this script with ``--variant``) so
that its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, a per-process
high-water mark) is its own. The subprocess calls ``stages.forget`` exactly as
``unlearn forget`` does: same batches (``make_batch``), same loss adapters,
same ``train_loop``. An ``on_log`` callback timestamps every optimizer step and
stops the run (by raising) once ``--steps`` step intervals are measured, so
nothing is saved. Intervals that cross an epoch boundary (they include the
per-epoch checkpoint) are not counted, nor is the first step (warm-up). The
reference cache is built (or verified) once in the parent before any timing,
so no variant pays for it. Output model, checkpoints and reports go to a
temporary directory, never to ``models/`` or ``reports/``.

Numbers are comparative within one run: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mib() -> float:
    """Current resident set size in MiB (psutil if installed, else /proc, else the high-water mark)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _peak_mib()


def _peak_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024  # bytes on macOS, KiB on Linux


def _params(args, extra: list[str] = ()):
    from unlearn.config import load_params

    return load_params(args.params, overrides=list(args.set or []) + list(extra))


class _Done(Exception):
    """Raised from on_log once enough steps are timed: ends the run before any save."""


# --------------------------------------------------------------------------- child: one variant
def run_variant(args) -> dict:
    import torch

    from unlearn import stages
    from unlearn.methods.registry import get_method

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        stages.set_threads()  # what the CLI does
    method, reference = args.variant.split(":")
    tmp = Path(tempfile.mkdtemp(prefix="bench_unlearn_"))
    p0 = _params(args)
    n_forget = len(stages.read_splits(p0, [p0.data.forget_split])[p0.data.forget_split])
    per_epoch = math.ceil(n_forget / p0.method.batch_size)
    if per_epoch < 2:
        raise SystemExit(f"only {per_epoch} step per epoch: no in-epoch step interval to time (lower batch_size)")
    epochs = math.ceil(args.steps / (per_epoch - 1)) + 1
    p = _params(args, [f"method.name={method}", f"method.epochs={epochs}", "method.checkpoint_every=0",
                       f"reports_dir={tmp / 'reports'}"])
    needs_ref = bool(get_method(method).needs_for(p.method) & stages.REF_NEEDS)

    stamps: list[tuple[float, int]] = []
    intervals: list[float] = []
    peak_at_stop: list[float] = []

    def on_log(entry: dict) -> None:
        now = time.perf_counter()
        if stamps and stamps[-1][1] == entry["epoch"]:
            intervals.append(now - stamps[-1][0])
        stamps.append((now, entry["epoch"]))
        if len(intervals) >= args.steps:
            peak_at_stop.append(_peak_mib())
            raise _Done

    rss0 = _rss_mib()
    peak0 = _peak_mib()
    t0 = time.perf_counter()
    try:
        stages.forget(p, out_dir=tmp / "unlearned", target_dir=args.model, reference=reference, on_log=on_log)
    except _Done:
        pass
    wall = time.perf_counter() - t0
    if not intervals:
        raise SystemExit("no step interval was timed")
    med = statistics.median(intervals)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "method": method, "reference": reference if needs_ref else "-", "steps": len(intervals),
        "step_ms_median": 1e3 * med, "step_ms_mean": 1e3 * statistics.fmean(intervals),
        "step_ms_min": 1e3 * min(intervals), "steps_per_s": 1.0 / med,
        "peak_rss_mib": peak_at_stop[0] if peak_at_stop else _peak_mib(), "rss_before_mib": rss0,
        "peak_before_mib": peak0, "wall_s": wall, "torch_threads": torch.get_num_threads(),
        "batch_size": p.method.batch_size, "intervals_s": intervals,
    }


# --------------------------------------------------------------------------- parent: the table
def machine_header(args) -> list[str]:
    import torch

    from unlearn.models.build import load_model, load_tokenizer, weights_hash

    p = _params(args)
    model = load_model(args.model)
    n_params = sum(x.numel() for x in model.parameters())
    tok = load_tokenizer(args.model)
    dev = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    threads = args.threads or f"{os.cpu_count()} (os.cpu_count(), as the CLI)"
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return [
        f"machine: {platform.node()} {platform.machine()}, os.cpu_count()={os.cpu_count()}, usable cpus={affinity}, "
        f"torch threads={threads}, device={dev}, torch {torch.__version__}, python {platform.python_version()}",
        f"load average at start: {load} (shared machine: compare rows of this table only)",
        f"model: {args.model} (weights sha256 {weights_hash(args.model)[:12]}, {n_params / 1e6:.2f}M parameters, "
        f"vocab {len(tok)}), max_length {p.model.max_length}, "
        f"forget split {p.data.forget_split}, method.batch_size {p.method.batch_size}, cache.top_k {p.cache.top_k}, "
        f"alpha {p.method.alpha}, retain_loss {p.method.retain_loss}",
        f"timing: median of {args.steps} x {args.rounds} round(s) in-epoch optimizer-step intervals per variant "
        "(first step and epoch "
        "boundaries excluded); peak RSS = ru_maxrss of a fresh process per variant at the last timed step; "
        "delta = peak - RSS just before stages.forget()",
    ]


def warm_caches(args) -> None:
    """Build/verify every reference cache a variant will look up, before any timing."""
    from unlearn import stages
    from unlearn.methods.registry import METHODS

    done = set()
    for name in METHODS:
        p = _params(args, [f"method.name={name}"])
        needs = METHODS[name].needs_for(p.method)
        if not needs & stages.REF_NEEDS:
            continue
        with_retain = stages._needs_retain_topk(p, needs)
        if with_retain not in done:
            stages.build_cache(p, args.model, with_retain=with_retain)
            done.add(with_retain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (default params.yaml); its paths are "
                    "relative to the directory it is in")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant (default 20)")
    ap.add_argument("--model", default="models/target", help="target model directory (default models/target)")
    ap.add_argument("--methods", nargs="*", help="methods to time with the cache (default: every registered method)")
    ap.add_argument("--rounds", type=int, default=1, help="round-robin repetitions of every variant, intervals "
                    "pooled (default 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per run (default 1; 0 = os.cpu_count(), as the CLI's set_threads). On a "
                    "shared machine every thread count above the free cores makes OpenMP barriers stall: with 2 "
                    "threads on 2 busy cores, steps measured 0.3 to 6 s instead of a stable 0.15 s with 1")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="params override, repeatable")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: METHOD:REFERENCE, run in this process
    ap.add_argument("--out", help=argparse.SUPPRESS)  # internal: where --variant writes its result
    args = ap.parse_args()
    if args.steps < 1 or args.rounds < 1:
        ap.error("--steps and --rounds must be >= 1")
    args.params = str(Path(args.params).resolve())
    args.model = str(Path(args.model).resolve())
    os.chdir(Path(args.params).parent)  # data.out_dir, cache.dir are relative to the params file
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.variant:
        import logging

        logging.basicConfig(level=logging.WARNING)
        res = run_variant(args)
        Path(args.out).write_text(json.dumps(res))
        return

    import logging

    from unlearn.methods.registry import METHODS

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not Path(args.model, "config.json").exists():
        raise SystemExit(f"no model in {args.model}: run `unlearn prepare && unlearn tokenizer && "
                         "unlearn finetune --role target` first")
    methods = args.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    header = machine_header(args)
    warm_caches(args)
    variants = [("dipo", "cache"), ("dipo", "live"), ("dipo", "exact")]
    variants += [(m, "cache") for m in methods if m != "dipo"]

    runs: dict[tuple[str, str], list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as td:
        # Round-robin over the variants, so that a burst of load on a shared machine hits them alike.
        for rnd, (method, ref) in ((r, v) for r in range(args.rounds) for v in variants):
            out = Path(td) / f"{method}-{ref}-{rnd}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", f"{method}:{ref}", "--out", str(out),
                   "--params", args.params, "--model", args.model, "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            for s in args.set or []:
                cmd += ["--set", s]
            print(f"round {rnd + 1}/{args.rounds}: {method} [{ref}] ...", file=sys.stderr, flush=True)
            res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {method}:{ref} failed ({res.returncode})")
            runs[(method, ref)].append(json.loads(out.read_text()))

    rows = []
    for rs in runs.values():
        iv = [x for r in rs for x in r["intervals_s"]]
        med = statistics.median(iv)
        rows.append(dict(rs[0], steps=len(iv), step_ms_median=1e3 * med, step_ms_mean=1e3 * statistics.fmean(iv),
                         step_ms_min=1e3 * min(iv), steps_per_s=1.0 / med,
                         peak_rss_mib=max(r["peak_rss_mib"] for r in rs),
                         rss_before_mib=statistics.median(r["rss_before_mib"] for r in rs)))

    base = rows[0]["step_ms_median"]
    head = ("method", "reference", "steps", "step ms (median)", "step ms (min)", "steps/s", "x dipo/cache",
            "peak RSS MiB", "delta RSS MiB")
    ref_name = {"cache": "cache (top-K)", "live": "live top-K", "exact": "live exact (full V)", "-": "- (none needed)"}
    table = []
    for r in rows:
        table.append((r["method"], ref_name[r["reference"]], str(r["steps"]), f"{r['step_ms_median']:.1f}",
                      f"{r['step_ms_min']:.1f}", f"{r['steps_per_s']:.2f}", f"{r['step_ms_median'] / base:.2f}",
                      f"{r['peak_rss_mib']:.0f}", f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f}"))
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    print()
    for line in header:
        print(line)
    print(f"torch threads in the runs: {rows[0]['torch_threads']}")
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for t in table:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(t, widths)) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
