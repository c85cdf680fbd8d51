"""Unlearning step throughput and peak memory, through the real ``unlearn forget`` code path.

    python benchmarks/bench_unlearn.py                       # params.yaml, models/target, 20 steps
    python benchmarks/bench_unlearn.py --steps 40 --set method.batch_size=32

Prints ONE table, measured in one run on one machine:

* for each reference-using configuration in ``PAIRS`` (DiPO with retain NLL,
  DiPO with retain KL, DiPO-Forget, NPO), a step with the reference cache
  (``reference="cache"``) and one with a live reference forward every step
  (``live``, top-K like the cache, only the forwards the method needs), the
  measured live/cache ratio and the ratio the arithmetic predicts;
* DiPO with the exact full-vocabulary live reference (``exact``);
* every other registered method (``METHODS``) with the cache (methods that need
  no reference quantity run without one).

The prediction: a forward costs about 1/3 of a forward + backward, so with
F = 3 units per batch part the policy trains on (forget, plus retain / idk when
the method ``needs`` them) and R = 1 unit per reference forward the method needs
(:func:`unlearn.cache.reference_forward_parts`), live/cache = (F + R) / F. It
leaves out what is not a forward: the optimizer step and the loss arithmetic
(cheap on the cache path; a full-vocabulary log-softmax + top-K on the live one).

Each variant runs in a fresh subprocess (this script with ``--variant``) so
that its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, a per-process
high-water mark) is its own. The subprocess calls ``stages.forget`` exactly as
``unlearn forget`` does: same batches (``make_batch``), same loss adapters,
same ``train_loop``. An ``on_log`` callback timestamps every optimizer step (wall
clock and the process's CPU time, ``time.process_time``: on a shared machine the
CPU time leaves out the waits for a core, so its ratios are the steadier) and
stops the run (by raising) once ``--steps`` step intervals are measured, so
nothing is saved. Intervals that cross an epoch boundary (they include the
per-epoch checkpoint) are not counted, nor is the first step (warm-up). The
reference caches are built (or verified) once in the parent before any timing,
so no variant pays for them. Output model, checkpoints and reports go to a
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

from unlearn.fmt import markdown_table
from unlearn.methods.registry import REF_KEYS


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


# (row label, method, params overrides): each runs with the cache and live.
PAIRS: list[tuple[str, str, tuple[str, ...]]] = [
    ("dipo", "dipo", ()),
    ("dipo (retain kl)", "dipo", ("method.retain_loss=kl", "cache.retain=true")),
    ("dipo_forget", "dipo_forget", ()),
    ("npo", "npo", ()),
]


def policy_parts(needs: frozenset[str]) -> tuple[str, ...]:
    """The batch parts the policy runs forward + backward on: forget always, retain / idk when needed."""
    return ("forget",) + tuple(part for part in ("retain", "idk") if part in needs)


def predicted_live_over_cache(needs: frozenset[str]) -> float:
    """(F + R) / F with F = 3 units per policy part (forward + backward) and R = 1 per reference forward."""
    from unlearn.cache import reference_forward_parts

    f = 3 * len(policy_parts(needs))
    return (f + len(reference_forward_parts(needs))) / f


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
    needs = get_method(method).needs_for(p.method)
    needs_ref = bool(needs & set(REF_KEYS))

    stamps: list[tuple[float, float, int]] = []
    intervals: list[float] = []
    cpu_intervals: list[float] = []
    peak_at_stop: list[float] = []

    def on_log(entry: dict) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if stamps and stamps[-1][2] == entry["epoch"]:
            intervals.append(now - stamps[-1][0])
            cpu_intervals.append(cpu - stamps[-1][1])
        stamps.append((now, cpu, entry["epoch"]))
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
        "batch_size": p.method.batch_size, "intervals_s": intervals, "cpu_intervals_s": cpu_intervals,
        "step_cpu_ms_median": 1e3 * statistics.median(cpu_intervals), "needs": sorted(needs),
        "predicted_live_over_cache": predicted_live_over_cache(needs),
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


def warm_caches(args, variants) -> None:
    """Build/verify every reference cache a variant will look up, before any timing."""
    from unlearn import stages
    from unlearn.methods.registry import METHODS

    done = set()
    for _, method, reference, extra in variants:
        if reference != "cache":
            continue
        p = _params(args, [f"method.name={method}", *extra])
        needs = METHODS[method].needs_for(p.method)
        if not needs & set(REF_KEYS):
            continue
        with_retain = stages._needs_retain_topk(p, needs) or p.cache.retain
        if with_retain not in done:
            stages.cache(p, args.model, with_retain=with_retain)
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
    # (label, method, reference, extra overrides)
    variants = [(label, m, ref, extra) for label, m, extra in PAIRS for ref in ("cache", "live")]
    variants.append(("dipo", "dipo", "exact", ()))
    paired = {m for _, m, extra in PAIRS if not extra}
    variants += [(m, m, "cache", ()) for m in methods if m not in paired]
    warm_caches(args, variants)

    runs: dict[tuple[str, str], list[dict]] = {(label, ref): [] for label, _, ref, _ in variants}
    with tempfile.TemporaryDirectory() as td:
        # Round-robin over the variants, so that a burst of load on a shared machine hits them alike.
        for rnd, (label, method, ref, extra) in ((r, v) for r in range(args.rounds) for v in variants):
            out = Path(td) / f"{len(os.listdir(td))}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", f"{method}:{ref}", "--out", str(out),
                   "--params", args.params, "--model", args.model, "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            for s in list(args.set or []) + list(extra):
                cmd += ["--set", s]
            print(f"round {rnd + 1}/{args.rounds}: {label} [{ref}] ...", file=sys.stderr, flush=True)
            res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {label}:{ref} failed ({res.returncode})")
            runs[(label, ref)].append(dict(json.loads(out.read_text()), label=label))

    rows = []
    for rs in runs.values():
        iv = [x for r in rs for x in r["intervals_s"]]
        cpu_iv = [x for r in rs for x in r["cpu_intervals_s"]]
        med = statistics.median(iv)
        rows.append(dict(rs[0], intervals_s=iv, cpu_intervals_s=cpu_iv, steps=len(iv), step_ms_median=1e3 * med,
                         step_ms_mean=1e3 * statistics.fmean(iv), step_ms_min=1e3 * min(iv), steps_per_s=1.0 / med,
                         step_cpu_ms_median=1e3 * statistics.median(cpu_iv),
                         peak_rss_mib=max(r["peak_rss_mib"] for r in rs),
                         rss_before_mib=statistics.median(r["rss_before_mib"] for r in rs)))

    cached = {r["label"]: r for r in rows if r["reference"] == "cache"}
    base = rows[0]["step_ms_median"]
    head = ("method", "reference", "steps", "step ms (median)", "step CPU ms (median)", "steps/s", "x dipo/cache",
            "live/cache wall", "live/cache CPU", "live/cache predicted", "peak RSS MiB", "delta RSS MiB")
    ref_name = {"cache": "cache (top-K)", "live": "live top-K", "exact": "live exact (full V)", "-": "- (none needed)"}
    table = []
    for r in rows:
        live = r["reference"] in ("live", "exact") and r["label"] in cached
        c = cached.get(r["label"])
        ratio_wall = f"{r['step_ms_median'] / c['step_ms_median']:.2f}" if live else ""
        ratio_cpu = f"{r['step_cpu_ms_median'] / c['step_cpu_ms_median']:.2f}" if live else ""
        predicted = f"{r['predicted_live_over_cache']:.2f}" if live else ""
        table.append((r["label"], ref_name[r["reference"]], str(r["steps"]), f"{r['step_ms_median']:.1f}",
                      f"{r['step_cpu_ms_median']:.1f}", f"{r['steps_per_s']:.2f}", f"{r['step_ms_median'] / base:.2f}",
                      ratio_wall, ratio_cpu, predicted, f"{r['peak_rss_mib']:.0f}",
                      f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f}"))
    print()
    for line in header:
        print(line)
    print(f"torch threads in the runs: {rows[0]['torch_threads']}")
    print("live/cache wall | CPU: the row's median step time over the same configuration's cache row, in wall-clock "
          "time and in this process's CPU time (time.process_time: on a shared machine it leaves out the time the "
          "process waited for a core)")
    print("live/cache predicted = (F + R) / F: F = 3 x policy batch parts (forward + backward), "
          "R = reference forwards the method needs")
    print()
    print(markdown_table(head, table))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
