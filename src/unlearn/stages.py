"""Stage functions: paths in, paths out, nothing global.

The CLI (``unlearn <stage>``), ``dvc.yaml`` and the Prefect flows all call these
same functions, so no stage logic lives anywhere else.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Params
from .io import plot_rows, read_json, write_json

log = logging.getLogger("unlearn")



def benchmark_of(p: Params):
    """The configured benchmark (``params.yaml``: ``benchmark``): its data, metrics and gate names."""
    from .benchmark import get_benchmark

    return get_benchmark(p.benchmark)


# --------------------------------------------------------------------------- paths
def tokenizer_dir(p: Params) -> Path:
    return Path(p.model.out_dir) / "tokenizer"


def model_dir(p: Params, role: str) -> Path:
    return Path(p.model.out_dir) / role


def reports_dir(p: Params) -> Path:
    return Path(p.reports_dir)


# --------------------------------------------------------------------------- data
def prepare(p: Params) -> Path:
    """Load the benchmark's configured source (synthetic | local | hub), validate, write every split under
    ``data.out_dir``."""
    from .data.splits import write_splits

    splits = benchmark_of(p).load(p)
    out = Path(p.data.out_dir)
    write_splits(splits, out)
    log.info("wrote %d splits to %s", len(splits), out)
    return out


def read_splits(p: Params, names: list[str] | None = None) -> dict[str, list[dict]]:
    """The validated splits ``names`` (default: every split but ``idk``) of ``data.out_dir``.

    ``data.out_dir`` holds the prepared TOFU splits or the splits built from
    deletion requests; both are one format, so this is the data layer's one
    reader (:func:`unlearn.data.splits.read_split_dir`: sha256, schema and the
    forget/retain rules among ``names``) with the directory taken from the params.
    FileNotFoundError when the splits are not written yet or lack one of ``names``.
    """
    from .data.names import IDK
    from .data.splits import read_manifest, read_split_dir

    out = Path(p.data.out_dir)
    return read_split_dir(out, names or [n for n in read_manifest(out) if n != IDK])


# --------------------------------------------------------------------------- models
def tokenizer(p: Params) -> Path:
    """Train the BPE tokenizer on the corpus (from-scratch model only)."""
    from .models.build import train_tokenizer

    if p.model.path:
        raise ValueError("model.path is set: the tokenizer comes with that model, there is nothing to train")
    splits = read_splits(p)
    from .models.template import train_format

    tok = train_tokenizer(benchmark_of(p).corpus_texts(splits, train_format(p)), p.model.tokenizer.vocab_size)
    out = tokenizer_dir(p)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    log.info("tokenizer (%d tokens) saved to %s", len(tok), out)
    return out


def base_model_and_tokenizer(p: Params):
    """The starting point of fine-tuning: a pretrained model at ``model.path``, or the small Llama built from config."""
    from .models.build import build_model, load_model, load_tokenizer

    if p.model.path:
        tok = load_tokenizer(p.model.path)
        model = load_model(p.model.path)
    else:
        tdir = tokenizer_dir(p)
        if not (tdir / "tokenizer.json").exists():
            tokenizer(p)
        tok = load_tokenizer(tdir)
        model = build_model(p.model.arch, tok, p.seed)
    return model, tok


def run_reports_dir(p: Params, out: Path, default_out: Path, kind: str) -> Path:
    """Where a training run's summary and loss log go: the pipeline's ``reports/<kind>`` for the default
    output, else next to the run's own output (``<out>.reports``), so an ad-hoc run never overwrites the
    pipeline's DVC metrics."""
    if out.resolve() == default_out.resolve():
        return reports_dir(p) / kind
    return out.with_name(out.name + ".reports")


def encoded_hash(enc) -> str:
    """Content address of encoded rows (token ids and labels): data, tokenizer, template and truncation at once."""
    from .io import stable_hash

    return stable_hash([[e.input_ids, e.labels] for e in enc])


def finetune(p: Params, role: str, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Train the target (all authors) or retain (retain split only) model; save it; return a summary."""
    import shutil

    from .methods.losses import nll_loss
    from .models import lora
    from .models.build import save_model
    from .models.formatting import collate
    from .precision import saved_dtype
    from .train import LoopCfg, consolidate, make_accelerator, train_loop

    ft = p.finetune
    cfg = LoopCfg.for_stage(ft, seed=p.seed, desc=f"finetune {role}")
    acc = make_accelerator(cfg)  # first: it fixes the distributed state for everything below
    default_out = model_dir(p, role)
    out = Path(out_dir) if out_dir else default_out
    model, tok = base_model_and_tokenizer(p)
    n_params = sum(x.numel() for x in model.parameters())
    model = lora.maybe_wrap(model, ft.lora, p.seed)  # finetune.lora: an adapter on the frozen base
    enc = benchmark_of(p).training_examples(p, role, tok)

    def step_loss(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return nll_loss(logits, batch["labels"], batch.get("n_tokens"), chunk=ft.loss_chunk), {}

    log.info("fine-tuning %s: %d examples, %.2fM parameters, %d process(es)", role, len(enc), n_params / 1e6,
             acc.num_processes)
    run_key = {"stage": "finetune", "role": role, "model": p.model.path or p.model.arch.model_dump(),
               "rows": encoded_hash(enc)}
    ckpt = out.with_name(out.name + ".ckpt")
    loss_log = train_loop(
        model, len(enc), lambda idx, epoch: collate([enc[i] for i in idx], tok.pad_token_id), step_loss, cfg,
        checkpoint_dir=ckpt, accelerator=acc, run_key=run_key,
    )
    # Sharded (accelerate's FSDP / DeepSpeed plugins): gathered whole on the main process; otherwise the model.
    model = consolidate(acc, model, lambda: lora.maybe_wrap(base_model_and_tokenizer(p)[0], ft.lora, p.seed))
    if not acc.is_main_process:
        return {}
    model, adapter = lora.merge(model)  # the merged model is what every later stage reads; the adapter beside it
    save_model(model, tok, out, adapter=adapter, dtype=saved_dtype(acc.mixed_precision))  # bf16 run: bf16 weights
    shutil.rmtree(ckpt, ignore_errors=True)
    summary = memorisation_summary(p, model, tok)
    if ft.lora.enabled:
        summary["lora"] = ft.lora.model_dump()
    summary.update(role=role, rows=len(enc), parameters=n_params, world_size=acc.num_processes,
                   final_loss=loss_log[-1]["loss"] if loss_log else None)
    rdir = run_reports_dir(p, out, default_out, "finetune")
    write_json(rdir / f"{role}.json", summary)
    write_json(rdir / f"{role}_loss.json", [{"step": e["step"], "loss": e["loss"]} for e in loss_log])
    return summary


def memorisation_summary(p: Params, model, tok) -> dict[str, float]:
    """``forget_prob`` / ``retain_prob`` of ``model``: the benchmark's measure of what it memorised."""
    return benchmark_of(p).memorisation(p, model, tok)


def set_threads() -> None:
    """Use every core for intra-op parallelism, unless OMP_NUM_THREADS / UNLEARN_THREADS says otherwise.

    On a busy shared machine fewer threads than cores can be much faster (see benchmarks/bench_unlearn.py).
    """
    import os

    # Under a launcher, the cores are shared by the local ranks: 2 ranks x all cores would oversubscribe.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    default = max(1, (os.cpu_count() or 1) // max(local_world, 1))
    n = int(os.environ.get("UNLEARN_THREADS") or os.environ.get("OMP_NUM_THREADS") or default)
    torch.set_num_threads(max(1, n))


# --------------------------------------------------------------------------- reference cache + unlearning


def _needs_retain_topk(p: Params, needs: frozenset[str]) -> bool:
    return "ref_retain_topk" in needs


def forget_inputs(p: Params):
    """The benchmark's unlearning inputs (:class:`~unlearn.benchmark.ForgetInputs`: forget rows, retain rows,
    refusals) for the configured forget split."""
    return benchmark_of(p).forget_inputs(p)


def cache(
    p: Params, target_dir: str | Path | None = None, with_retain: bool | None = None,
    device: torch.device | str | None = None, mixed_precision: str | None = None,
):
    """Compute (or verify and reuse) the reference cache of the target model on the forget/retain splits.

    ``device`` / ``mixed_precision`` are where and under which autocast the
    reference forward runs; the forget stage passes its accelerator's, and when
    they are not given the training loop's rule fills them in
    (``cache.resolve_precision``: CUDA + bf16 where available, else CPU + fp32),
    so the cache stage builds the very file the forget stage then looks up.
    """
    from .cache import ensure_cache, resolve_precision
    from .methods.registry import get_method
    from .models.build import load_tokenizer

    target_dir = Path(target_dir or model_dir(p, "target"))
    inputs = forget_inputs(p)
    forget_rows, retain_rows, refusals = inputs.forget, inputs.retain, inputs.refusals
    if with_retain is None:
        with_retain = p.cache.retain
    needed = _needs_retain_topk(p, get_method(p.method.name).needs_for(p.method))
    if needed and not with_retain:
        raise ValueError(
            f"method {p.method.name} with retain_loss={p.method.retain_loss} needs reference top-K on the retain "
            "split: set cache.retain=true (e.g. --set cache.retain=true) so the cache stage computes it"
        )
    prec = resolve_precision(device, mixed_precision)
    tok = load_tokenizer(target_dir)
    return ensure_cache(
        cache_dir=p.cache.dir, model_dir=target_dir, tokenizer=tok, forget_rows=forget_rows,
        retain_rows=retain_rows, refusals=refusals, seed=p.seed, max_length=p.model.max_length, top_k=p.cache.top_k,
        with_retain=with_retain, device=prec.device, mixed_precision=prec.mixed_precision,
        encoded=benchmark_of(p).encode_inputs(p, tok, inputs),  # in the benchmark's format (model.template)
    )


def forget(
    p: Params, out_dir: str | Path | None = None, target_dir: str | Path | None = None, reference: str = "cache",
    on_log=None,
) -> dict[str, Any]:
    """Unlearn the forget split from the target model with ``method.name``; save the unlearned model.

    ``reference``: ``cache`` (default; reference quantities from the content-addressed
    cache), ``live`` (a reference forward every step, only the forwards the method
    needs, top-K like the cache) or ``exact`` (live, full vocabulary). The last two
    exist to measure the cache.

    Runs the same on any number of processes (see :mod:`unlearn.train`): the
    summary records the world size and the loss log the rows each rank took.
    """
    import shutil

    from .cache import LiveReference
    from .methods.registry import get_method
    from .methods.selection import STATISTIC, eval_curve, select_step
    from .models import lora
    from .models.build import load_model, load_tokenizer, save_model, weights_hash
    from .models.formatting import collate
    from .precision import saved_dtype
    from .train import LoopCfg, consolidate, main_process_first, make_accelerator, train_loop

    m = p.method
    cfg = LoopCfg.for_stage(m, seed=p.seed, checkpoint_every=m.checkpoint_every, eval_every=m.eval_every,
                             desc=f"forget [{m.name}]")
    acc = make_accelerator(cfg)  # first: it fixes the distributed state for everything below
    method = get_method(m.name)
    target_dir = Path(target_dir or model_dir(p, "target"))
    default_out = model_dir(p, "unlearned")
    out = Path(out_dir) if out_dir else default_out
    tok = load_tokenizer(target_dir)
    model = load_model(target_dir)
    encoded = benchmark_of(p).encode_inputs(p, tok, forget_inputs(p))
    enc_f, enc_r, enc_i = encoded.forget, encoded.retain, encoded.idk

    needs = method.needs_for(m)
    if not enc_i and "idk" in needs:
        raise ValueError(f"method {method.name} needs refusal answers to the forget questions, which benchmark "
                         f"{p.benchmark} does not have (its forget set is raw text): choose another method")
    from .methods.registry import REF_KEYS

    needs_ref = bool(needs & set(REF_KEYS))  # a reference quantity, not only batch parts (retain, idk)
    ref_cache = live = None
    if needs_ref and reference == "cache":
        with main_process_first():  # rank 0 builds a missing cache, the others then load it
            # The reference runs where and how the policy runs, so Delta/log-ratios are 0 at theta = ref.
            ref_cache = cache(p, target_dir, device=acc.device, mixed_precision=acc.mixed_precision)
    elif needs_ref and not m.lora.enabled:
        live = LiveReference(load_model(target_dir), top_k=None if reference == "exact" else p.cache.top_k,
                             needs=needs, mixed_precision=acc.mixed_precision)

    n_f, n_r = len(enc_f), len(enc_r)
    if n_r == 0 and "retain" in needs:
        raise ValueError(f"method {method.name} needs retain rows but split {p.data.retain_split} is empty")
    evaluate, stop, retain_value = _training_evaluation(p, tok, enc_f, enc_r)
    # method.lora: an adapter on the frozen target. The target stays the reference (the cache is computed on it).
    model = lora.maybe_wrap(model, m.lora, p.seed)
    if needs_ref and reference != "cache" and m.lora.enabled:  # live: the base with the adapter off, no 2nd copy
        live = LiveReference(lora.FrozenBase(model), top_k=None if reference == "exact" else p.cache.top_k,
                             needs=needs, mixed_precision=acc.mixed_precision)

    def make_batch(idx: list[int], epoch: int) -> dict:
        # Forget rows are shuffled by the loop; each gets a retain partner from a
        # per-epoch permutation, so every retain row is visited over the epochs.
        perm = torch.randperm(max(n_r, 1), generator=torch.Generator().manual_seed(p.seed * 1000 + epoch))
        r_idx = [int(perm[(epoch * n_f + i) % max(n_r, 1)]) for i in idx] if n_r else []
        width = max(max(len(enc_f[i].input_ids), len(enc_i[i].input_ids) if enc_i else 0) for i in idx)
        batch = {"forget": collate([enc_f[i] for i in idx], tok.pad_token_id, pad_to=width)}
        if enc_i:
            batch["idk"] = collate([enc_i[i] for i in idx], tok.pad_token_id, pad_to=width)
        if n_r:
            batch["retain"] = collate([enc_r[i] for i in r_idx], tok.pad_token_id)
        if ref_cache is not None:
            rw = batch["retain"]["input_ids"].size(1) if n_r else 0
            batch["ref"] = ref_cache.lookup(idx, width, r_idx if ref_cache.retain is not None else None, rw)
        return batch

    def step_loss(model, batch):
        if live is not None:
            batch = dict(batch, ref=live(batch))
        return method.compute(model, batch, m)

    run_key = {
        "stage": "forget", "method": m.model_dump(exclude={"checkpoint_every"}), "reference": reference,
        "target": weights_hash(target_dir), "forget": encoded_hash(enc_f), "retain": encoded_hash(enc_r),
        "idk": encoded_hash(enc_i), "cache_top_k": p.cache.top_k, "cache_retain": p.cache.retain,
    }
    ckpt = out.with_name(out.name + ".ckpt")
    loss_log = train_loop(model, n_f, make_batch, step_loss, cfg, checkpoint_dir=ckpt, accelerator=acc,
                          on_log=on_log, run_key=run_key, evaluate=evaluate, stop=stop)
    model = consolidate(acc, model, lambda: lora.maybe_wrap(load_model(target_dir), m.lora, p.seed))  # see finetune
    if not acc.is_main_process:
        return {}
    picked = select_step(loss_log, m.select, retain_value)
    if m.select != "last":
        kept = picked["step"] if picked else loss_log[-1]["step"] if loss_log else 0
        log.info("method.select=%s kept step %d of %d%s", m.select, kept, len(loss_log),
                 "" if picked else " (the rule never held: the last step)")
    model, adapter = lora.merge(model)  # saved and evaluated: the merged model; the adapter beside it
    save_model(model, tok, out, adapter=adapter, dtype=saved_dtype(acc.mixed_precision))  # bf16 run: bf16 weights
    shutil.rmtree(ckpt, ignore_errors=True)
    summary = memorisation_summary(p, model, tok)
    summary.update(method=m.name, steps=len(loss_log), reference=reference, world_size=acc.num_processes,
                   global_batch=m.batch_size * acc.num_processes * m.grad_accum)
    if m.lora.enabled:
        summary["lora"] = m.lora.model_dump()
    if m.select != "last":
        summary.update({"select": m.select, "selected_step": picked["step"] if picked else None,
                        f"retain_model_{STATISTIC[m.select]}": retain_value})
    rdir = run_reports_dir(p, out, default_out, "forget")
    write_json(rdir / "summary.json", summary)
    write_json(rdir / "loss.json", plot_rows(loss_log))  # a DVC plot: the same keys in every row
    write_json(rdir / "eval.json", eval_curve(loss_log, retain_value, m.select))  # the DVC plot of the evaluations
    return summary


def _training_evaluation(p: Params, tok, enc_f, enc_r):
    """``(evaluate, stop, retain_value)`` of ``method.eval_every`` / ``method.select`` for the forget stage.

    ``evaluate(model)``: mean length-normalised answer probability (the memorisation summary's measure) on
    the first ``method.eval_rows`` forget and retain rows, the fixed slice, plus the benchmark's own slice
    statistics (:meth:`Benchmark.slice_probes`; MUSE: KnowMem on the forget QA). With a selection rule,
    ``retain_value`` is the retain model's value of the rule's statistic on the same slice (its model
    directory must exist: ``unlearn finetune --role retain``) and ``stop(history)`` holds once the rule
    picks a step.
    """
    from .methods.selection import STATISTIC, select_step
    from .models.build import load_model
    from .models.scoring import length_normalised_prob, score_encoded

    m = p.method
    if not m.eval_every:
        return None, None, None
    slice_f, slice_r = enc_f[:m.eval_rows], enc_r[:m.eval_rows]

    def prob(model, rows) -> float:
        if not rows:
            return float("nan")
        nll, n = score_encoded(model, rows, tok.pad_token_id, batch_size=p.eval.batch_size)
        return float(length_normalised_prob(nll, n).mean())

    probes = {"forget_prob": lambda model: prob(model, slice_f), "retain_prob": lambda model: prob(model, slice_r),
              **benchmark_of(p).slice_probes(p, tok)}

    def evaluate(model) -> dict[str, float]:
        return {name: probe(model) for name, probe in probes.items()}

    if m.select == "last":
        return evaluate, None, None
    retain_dir = model_dir(p, "retain")
    if not retain_dir.exists():
        raise FileNotFoundError(f"method.select={m.select} compares with the retain model, but {retain_dir} does "
                                "not exist: run `unlearn finetune --role retain` first")
    retain_value = probes[STATISTIC[m.select]](load_model(retain_dir))
    return evaluate, (lambda history: select_step(history, m.select, retain_value) is not None), retain_value


# --------------------------------------------------------------------------- summary
def summary_rows(p: Params) -> list[dict[str, Any]]:
    """One row per model that has reports: its memorisation summary and evaluation metrics, if any."""
    rdir = reports_dir(p)
    rows = []
    for name, ft, ev in (
        ("target", rdir / "finetune" / "target.json", rdir / "eval" / "target" / "metrics.json"),
        ("retain", rdir / "finetune" / "retain.json", rdir / "eval" / "retain" / "metrics.json"),
        ("unlearned", rdir / "forget" / "summary.json", rdir / "eval" / "unlearned" / "metrics.json"),
    ):
        if not ft.exists() and not ev.exists():
            continue
        row: dict[str, Any] = {"model": name}
        if ft.exists():
            s = read_json(ft)
            row.update(forget_prob=s.get("forget_prob"), retain_prob=s.get("retain_prob"))
        if ev.exists():
            row.update(read_json(ev))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- evaluation
def eval_reference_dir(p: Params) -> Path:
    """Where the retain model's per-example forget truth ratios live: inside the retain model's eval output."""
    return reports_dir(p) / "eval" / "retain" / "reference"


def evaluate(
    p: Params, model_path: str | Path, name: str, retain_dir: str | Path | None = None,
    target_dir: str | Path | None = None, out_dir: str | Path | None = None,
):
    """Evaluate a saved model on the benchmark: metrics.json, per_example.jsonl and a report under
    reports/eval/<name>.

    Evaluating ``unlearned`` also writes ``reports/eval/tradeoff.json``: forget
    quality vs model utility of target, retain and unlearned (a DVC plot).
    """
    retain_dir = Path(retain_dir) if retain_dir is not None else model_dir(p, "retain")
    target_dir = Path(target_dir) if target_dir is not None else model_dir(p, "target")
    result = benchmark_of(p).evaluate(
        p, model_path, name, retain_dir=retain_dir if retain_dir.exists() else None,
        target_dir=target_dir if target_dir.exists() and Path(model_path) != target_dir else None,
        out_dir=Path(out_dir) if out_dir else reports_dir(p) / "eval" / name, reference_dir=eval_reference_dir(p),
    )
    if name == "unlearned":
        write_tradeoff(p, {"unlearned": result.metrics})
    return result


def write_tradeoff(p: Params, extra: dict[str, dict] | None = None) -> Path:
    """The benchmark's forget metric vs its utility for every evaluated model: the trade-off plot's data.

    TOFU: forget quality vs model utility; MUSE: PrivLeak vs KnowMem on the retain QA (the gate's two metrics).
    """
    names = benchmark_of(p).gate_metrics
    points = []
    metrics = {}
    for name in ("target", "retain"):
        f = reports_dir(p) / "eval" / name / "metrics.json"
        if f.exists():
            metrics[name] = read_json(f)
    metrics.update(extra or {})
    for name, m in metrics.items():
        label = f"{name} ({p.method.name})" if name == "unlearned" else name
        point = {"model": label, names.forget: m.get(names.forget), names.utility: m.get(names.utility)}
        if "forget_prob" in m:
            point["forget_prob"] = m.get("forget_prob")
        points.append(point)
    out = reports_dir(p) / "eval" / "tradeoff.json"
    write_json(out, points)
    return out


# --------------------------------------------------------------------------- MUSE's request sequences
SEQUENCES = ("sustainability", "scalability")
"""MUSE's two sequences: unlearning requests one after another, and forget sets of growing size."""


def sequence_steps(kind: str) -> list[str]:
    """The forget sets of a sequence, in order: each fold after the previous model (sustainability), or nested
    unions of folds, each from the target (scalability; MUSE's scal/forget_1..3 are not public)."""
    if kind == "sustainability":
        return ["fold1", "fold2", "fold3", "fold4"]
    if kind == "scalability":
        return ["fold1", "fold1-2", "fold1-3"]
    raise ValueError(f"unknown sequence {kind!r}: expected one of {', '.join(SEQUENCES)}")


def sequence_dir(p: Params, kind: str) -> Path:
    """Where a sequence's models go (``<model.out_dir>/<kind>/<forget set>``)."""
    return Path(p.model.out_dir) / kind


def sequence_reports(p: Params, kind: str) -> Path:
    return reports_dir(p) / "sequences" / kind


def sequence(p: Params, kind: str, *, on_step=None) -> list[dict[str, Any]]:
    """Run MUSE's ``kind`` sequence with ``method``: unlearn, evaluate and record every step; returns the curve.

    Sustainability unlearns fold 1, then fold 2 from that model, and so on, each run's
    reference being the model it starts from; scalability unlearns fold 1, folds 1-2
    and folds 1-3, each from the target. Every model is evaluated against the same
    retain reference (the retain model of ``data.forget_split``, evaluated first) and
    its utility is relative to the target's. Writes ``<reports>/sequences/<kind>.json``
    (one point per step, every metric) and ``<kind>.png`` (every metric against the
    number of requests / the forget-set size).
    """
    from .data.names import muse_folds

    if p.benchmark != "muse":
        raise ValueError(f"the {kind} sequence is MUSE's (benchmark: muse); this configuration runs {p.benchmark}")
    target = model_dir(p, "target")
    target_metrics_path = reports_dir(p) / "eval" / "target" / "metrics.json"
    for need, cmd in ((target, "unlearn finetune --role target"), (target_metrics_path, "unlearn evaluate <target>"),
                      (eval_reference_dir(p), "unlearn evaluate <retain> --name retain")):
        if not Path(need).exists():
            raise FileNotFoundError(f"no {need}: run `{cmd}` (or `dvc repro`) first")
    target_metrics = read_json(target_metrics_path)
    start = target
    manifest = read_json(Path(p.data.out_dir) / "manifest.json")
    util = benchmark_of(p).gate_metrics.utility
    points = [{"step": 0, "forget_set": "none (target)", "requests": 0, "forget_articles": 0, **target_metrics,
               **({"utility_ratio": 1.0} if target_metrics.get(util) else {})}]
    for i, fs in enumerate(sequence_steps(kind), start=1):
        # The sequence's reference caches live with its models: the cache stage's directory is another stage's output.
        step_p = p.model_copy(update={"data": p.data.model_copy(update={"forget_split": fs}),
                                      "cache": p.cache.model_copy(update={"dir": str(sequence_dir(p, kind) / "cache")})})
        out = sequence_dir(p, kind) / fs
        log.info("%s step %d: forget %s from %s", kind, i, fs, start)
        forget(step_p, out, start)
        result = evaluate(step_p, out, f"{kind}-{fs}", retain_dir=model_dir(p, "retain"), target_dir=target,
                          out_dir=sequence_reports(p, kind) / fs)
        m = dict(result.metrics)
        if m.get(util) is not None and target_metrics.get(util):
            m["utility_ratio"] = m[util] / target_metrics[util]
        point = {"step": i, "forget_set": fs, "requests": i,
                 "forget_articles": sum(manifest[f]["rows"] for f in muse_folds(fs)), **m}
        points.append(point)
        if on_step is not None:
            on_step(point)
        if kind == "sustainability":
            start = out
    rdir = sequence_reports(p, kind)
    write_json(rdir.with_suffix(".json"), points)
    plot_sequence(points, kind, rdir.with_suffix(".png"))
    return points


def plot_sequence(points: list[dict[str, Any]], kind: str, path: Path) -> Path:
    """Every metric of a sequence against its x axis (requests so far, or forget-set size in articles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, x_label = (("requests", "unlearning requests so far") if kind == "sustainability"
                      else ("forget_articles", "forget-set size (articles)"))
    metrics = [k for k in ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak", "utility_ratio")
               if any(isinstance(pt.get(k), (int, float)) for pt in points)]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(3.2 * max(len(metrics), 1), 3.0), squeeze=False)
    for ax, k in zip(axes[0], metrics):
        xs = [pt[x_key] for pt in points if isinstance(pt.get(k), (int, float))]
        ys = [pt[k] for pt in points if isinstance(pt.get(k), (int, float))]
        ax.plot(xs, ys, marker="o")
        ax.set_title(k, fontsize=10)
        ax.set_xlabel(x_label, fontsize=8)
        ax.grid(alpha=0.3)
        if k == "privleak":
            ax.axhline(0, color="grey", lw=0.8, ls="--")
    fig.suptitle(f"MUSE {kind} (step 0 = the target model)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- data validation gate
def validate(p: Params) -> dict[str, Any]:
    """Run the Great Expectations gate on the splits in ``data.out_dir``; writes ``<reports_dir>/validation/result.json``.

    Raises :class:`~unlearn.data.validate.ValidationFailed` (its message is the readable report)
    when any expectation fails, so nothing downstream runs. Returns the report as a dict.

    The result also counts the QA rows the model's tokenizer (:func:`model_tokenizer`) cuts
    at ``model.max_length`` (its ``truncation`` section; a warning when any is cut, not a
    failure). That is why the tokenizer stage runs before this one.
    """
    from .data.validate import ValidationFailed

    tok, source = model_tokenizer(p)
    report = benchmark_of(p).validate(p, tok, source)
    if not report.success:
        raise ValidationFailed(report)
    return report.to_dict()


# --------------------------------------------------------------------------- tracking + gated registration
def register(p: Params, model_path: str | Path | None = None, request_ids=None,
             request_gate: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gate the unlearned model on its evaluation, log it to MLflow and register it if it passed.

    Reads ``reports/eval/unlearned/metrics.json``, ``reports/eval/target/metrics.json`` and
    the run's loss log (optional: ``reports/forget/loss.json``, or ``<model>.reports/loss.json`` for a model
    written with ``--out``); writes ``reports/register/decision.json``
    (passed, reasons, version, alias, run_id, ...) and returns it. See :mod:`unlearn.tracking`.

    Linear on purpose: everything the version will carry (the run's inputs, the
    per-request evidence, the requests its audit page lists) is gathered first, then
    :func:`unlearn.tracking.register_if_passing` gates, logs and registers in one pass
    (the version created with all its tags, the page rendered from what was written).

    ``request_gate``: deletion requests without an oracle (``requests.oracle: none``): ``{"per_request":
    {request_id: holdout evidence}, "earlier": [...], "holdout_split", "mode"?, "base"?}``
    (:mod:`unlearn.requests.evidence`). The model is then gated by :func:`unlearn.gate.request_gate` instead of
    forget quality, each request's evidence goes onto the version (``request.<id>.<key>``; every request it claims,
    the earlier ones included), the champion rule compares the weakest request's KS p-value, and ``mode`` / ``base``
    (``requests.mode: sequential``: the version it was unlearned from) become the tags ``request_mode``,
    ``request_base_model``, ``request_base_version`` and ``request_base_weights_sha256``.
    """
    from . import tracking
    from .requests import audit_html, parse_request_ids, request_tag

    rdir = reports_dir(p)
    model_path = Path(model_path) if model_path else model_dir(p, "unlearned")
    eval_dir = rdir / "eval" / "unlearned"
    need = {
        "unlearned-model metrics": (eval_dir / "metrics.json", "unlearn evaluate models/unlearned --name unlearned"),
        "target-model metrics": (rdir / "eval" / "target" / "metrics.json", "unlearn evaluate models/target --name target"),
    }
    for what, (path, cmd) in need.items():
        if not path.exists():
            raise FileNotFoundError(f"no {what} at {path}: run `{cmd}` (or `dvc repro`) first")
    if not model_path.is_dir():
        raise FileNotFoundError(f"no model directory at {model_path}: run `unlearn forget` first")
    # The loss log of the run that wrote this model (reports/forget for the pipeline's, <model>.reports otherwise).
    loss_path = run_reports_dir(p, model_path, model_dir(p, "unlearned"), "forget") / "loss.json"
    requests = _ledger_requests(p, parse_request_ids(request_ids))
    chain = _ledger_chain_head(p) if requests else {}  # the ledger's hash-chain head: `audit --verify` anchors on it
    evidence = request_evidence(p, requests)
    row_tags = forget_row_tags(p)  # the forget set row by row: what tells a later request it is already honoured
    metrics, target_metrics = read_json(eval_dir / "metrics.json"), read_json(rdir / "eval" / "target" / "metrics.json")
    gate_override, names, req_tags = _request_gate(p, request_gate, metrics, target_metrics)
    if request_gate is not None:
        metrics = {**metrics, **_request_gate_metrics(request_gate)}
        write_json(eval_dir / "request_evidence.json", request_gate)  # logged with the run's eval artifacts
    run = tracking.UnlearningRun(
        model_dir=model_path, metrics=metrics,
        target_metrics=target_metrics,
        loss_log=read_json(loss_path) if loss_path.exists() else [], report_dir=eval_dir,
        data_hashes=tracking.data_hashes(p), git_commit=tracking.git_commit(), request_ids=request_ids,
        forget_rows=tracking.forget_row_count(p),
    )
    # The comparison page's charts are drawn before anything is registered (a failure stops the stage first);
    # the page is written with the outcome and logged to the run, whether the gate passed or refused.
    page = comparison(p, model_path)
    reg = tracking.register_if_passing(
        p, run,
        extra_version_tags={**row_tags, **chain, **req_tags,
                            **{request_tag(rid, k): v for rid, ev in evidence.items() for k, v in ev.items() if v is not None}},
        audit_page=lambda info: audit_html(info, requests),
        decision=gate_override, names=names,
    )
    decision = reg.as_dict()
    if request_gate is not None:
        decision["oracle"] = "none"
        decision["metrics"] = {k: metrics.get(k) for k in _request_gate_metrics(request_gate)} | {
            k: metrics.get(k) for k in ("model_utility",)}
    if reg.version is not None:
        decision["request_evidence"] = evidence
    written = page.write(comparison_dir(p), COMPARISON_STEM, registration=decision)
    tracking.client_for(tracking.tracking_config(p)).log_artifacts(reg.run_id, str(comparison_dir(p)),
                                                                   COMPARISON_ARTIFACT_PATH)
    decision["comparison"] = str(written["html"])
    decision["comparison_artifact"] = f"{COMPARISON_ARTIFACT_PATH}/{written['html'].name}"
    write_json(rdir / "register" / "decision.json", decision)
    return decision


# --------------------------------------------------------------------------- the comparison page
COMPARISON_STEM = "comparison"
"""``<reports_dir>/compare/comparison.html``, ``comparison.md`` and ``comparison_files/``."""
COMPARISON_ARTIFACT_PATH = "compare"
"""Where the comparison page goes among the registration run's MLflow artifacts."""


def comparison_dir(p: Params) -> Path:
    """Where the register stage writes the comparison page of the run's models."""
    return reports_dir(p) / "compare"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _comparison_models(p: Params, discover: bool) -> list[Any]:
    """Target, retain and unlearned (:func:`summary_rows`: evaluation metrics, the memorisation summary where the
    evaluation has none), then MUSE's sequence steps, then (``discover``) every other ``<reports>/eval/<name>``."""
    from .eval.compare import ModelEntry

    rdir = reports_dir(p)
    models = []
    for row in summary_rows(p):
        name = row.pop("model")
        if not (rdir / "eval" / name / "metrics.json").exists():
            continue
        report = rdir / "eval" / name / "report.html"
        models.append(ModelEntry(name=name, label=f"unlearned ({p.method.name})" if name == "unlearned" else name,
                                 role=name, metrics=row, report=report if report.exists() else None))
    for kind in SEQUENCES if p.benchmark == "muse" else ():
        curve = sequence_reports(p, kind).with_suffix(".json")
        for point in read_json(curve) if curve.exists() else []:
            if not point.get("step"):
                continue  # step 0 is the target
            report = sequence_reports(p, kind) / point["forget_set"] / "report.html"
            then = "then " if kind == "sustainability" and point["step"] > 1 else ""
            models.append(ModelEntry(name=f"{kind}/{point['forget_set']}", label=f"{kind}: {then}{point['forget_set']}",
                                     role="unlearned", metrics=point, report=report if report.exists() else None,
                                     group=kind))
    if discover:
        for f in sorted((rdir / "eval").glob("*/metrics.json")):
            if f.parent.name not in ("target", "retain", "unlearned"):
                report = f.parent / "report.html"
                models.append(ModelEntry(name=f"eval/{f.parent.name}", label=f.parent.name, role="unlearned",
                                         metrics=read_json(f), report=report if report.exists() else None))
    return models


def comparison(p: Params, model_path: str | Path | None = None, *, discover: bool = False):
    """Draw the comparison of the run's models (:mod:`unlearn.eval.compare`) from what the stages wrote under
    ``reports_dir``: their metrics, the benchmark's per-example histograms (TOFU: forget truth ratios; MUSE: the
    PrivLeak attack's MIA scores), the fine-tuning and unlearning loss logs. Missing files are left out.

    ``model_path``: the unlearned model, as for :func:`register` (its loss log is ``<model>.reports/loss.json``
    for a model written with ``--out``). ``discover``: also every other evaluation under ``<reports>/eval/``
    (``unlearn evaluate runs/npo --name npo``), which the pipeline's page leaves out. Returns a
    :class:`~unlearn.eval.compare.Comparison`, whose ``write`` writes the page.
    """
    from . import tracking
    from .eval.compare import LossCurve, build_comparison, loss_points, muse_histograms, tofu_histograms

    bench = benchmark_of(p)
    rdir = reports_dir(p)
    models = _comparison_models(p, discover)
    records = {m.label: _read_jsonl(rdir / m.name / "per_example.jsonl" if m.name.startswith("eval/")
                                    else rdir / "eval" / m.name / "per_example.jsonl")
               for m in models if m.group is None}
    if p.benchmark == "muse":
        hists = muse_histograms(records, p.muse.eval.privleak_attack)
    else:
        hists = tofu_histograms(records, p.data.forget_split)
    losses = []
    for role in ("target", "retain"):
        f = rdir / "finetune" / f"{role}_loss.json"
        if f.exists():
            losses.append(LossCurve(role, "fine-tuning", loss_points(read_json(f)), model=role))
    model = Path(model_path) if model_path else model_dir(p, "unlearned")
    f = run_reports_dir(p, model, model_dir(p, "unlearned"), "forget") / "loss.json"
    if f.exists():
        entries = read_json(f)
        who = f"unlearned ({p.method.name})"
        panel = f"unlearning ({p.method.name} on {p.data.forget_split})"
        losses.append(LossCurve(f"{who}: loss", panel, loss_points(entries), model=who))
        for key in ("forget_loss", "retain_loss"):
            if any(key in e for e in entries):
                losses.append(LossCurve(f"{who}: {key}", panel, loss_points(entries, key), dashed=True, model=who))
    names, gate = bench.gate_metrics, tracking.gate_config(p)
    rule = ">=" if names.forget_rule == "min" else "|x| <="
    info = [("benchmark", p.benchmark), ("forget set", p.data.forget_split), ("method", p.method.name),
            ("gate", f"{names.forget} {rule} {gate.get(names.forget_bound)} and {names.utility} >= "
                     f"{gate.get('min_utility_ratio')} x the target's"),
            ("commit", tracking.git_commit())]
    notes = ["The gate column applies the registration gate to every unlearned model; only the pipeline's "
             "unlearned model is registered. `dvc plots show` draws the loss logs and the trade-off data too."]
    return build_comparison(
        title=f"{bench.name.upper()} comparison: {p.data.forget_split}, {p.method.name}", models=models,
        columns=list(bench.summary_columns), names=names, gate=gate, histograms=hists, losses=losses, info=info,
        notes=notes)


def _ledger_requests(p: Params, ids: list[str]) -> list[Any]:
    """The ledger's records of ``ids`` (ids the ledger does not know are left out), in ``ids``' order.

    Read once per registration, for both the evidence and the audit page. No ids: the
    ledger is not opened (the plain TOFU pipeline has no requests and needs no ledger).
    """
    from .requests import Ledger, requests_settings

    if not ids:
        return []
    with Ledger(requests_settings(p).url) as ledger:
        return [r for r in (ledger.get(i) for i in ids) if r is not None]


REQUEST_EVIDENCE_TAGS = ("ks_pvalue", "mia_auc_loss", "mia_auc_min_k_plus_plus", "privleak", "prob", "holdout_prob",
                         "rouge", "holdout_rouge")
"""The per-request holdout evidence a version carries as ``request.<id>.<key>`` (``requests.oracle: none``)."""


def _request_gate(p: Params, request_gate: dict[str, Any] | None, metrics, target_metrics):
    """(gate decision, champion-rule metrics, version tags) of an oracle-free request registration; all None/{}
    without one (the benchmark's gate then)."""
    from .gate import GateMetrics
    from .gate import request_gate as gate_fn
    from .requests import request_tag

    if request_gate is None:
        return None, None, {}
    names = benchmark_of(p).gate_metrics
    decision = gate_fn(request_gate["per_request"], metrics, target_metrics, p.requests.gate.model_dump(),
                       p.gate.min_utility_ratio, names, earlier=tuple(request_gate.get("earlier") or ()))
    tags = {"request_oracle": "none", "request_holdout_split": str(request_gate.get("holdout_split")),
            "request_mode": str(request_gate.get("mode") or "union"),
            "request_earlier": ",".join(request_gate.get("earlier") or ())}
    base = request_gate.get("base")  # requests.mode sequential: the registered version this model was unlearned from
    if base:
        tags.update(request_base_model=str(base["name"]), request_base_version=str(base["version"]),
                    request_base_weights_sha256=str(base["weights_sha256"]))
    for rid, ev in request_gate["per_request"].items():
        tags.update({request_tag(rid, k): repr(float(ev[k])) for k in REQUEST_EVIDENCE_TAGS if ev.get(k) is not None})
    return decision, GateMetrics(forget="request_ks_pvalue", utility=names.utility), tags


def _request_gate_metrics(request_gate: dict[str, Any]) -> dict[str, float | None]:
    """The run metrics of an oracle-free registration: the weakest request's evidence (what the gate bounds)."""
    per = list(request_gate["per_request"].values())

    def worst(key, fn):
        vals = [ev.get(key) for ev in per]
        return None if not vals or any(v is None for v in vals) else float(fn(vals))

    return {"request_ks_pvalue": worst("ks_pvalue", min), "request_max_prob_gap": worst("prob_gap", max),
            "request_max_rouge_gap": worst("rouge_gap", max),
            "request_max_mia_auc_gap": worst("mia_auc_min_k_plus_plus", lambda v: max(abs(x - 0.5) for x in v))}


def _ledger_chain_head(p: Params) -> dict[str, str]:
    """``{"ledger_chain_head": <hash>}``: the head of the ledger's hash chain when the version is registered."""
    from .requests import Ledger, requests_settings
    from .requests.verify import TAG_CHAIN_HEAD

    with Ledger(requests_settings(p).url) as ledger:
        return {TAG_CHAIN_HEAD: ledger.chain_head()}


def request_evidence(p: Params, requests: list[Any]) -> dict[str, dict[str, float | None]]:
    """Per deletion request: mean answer probability of its rows before (target) and after (unlearned).

    Read from the evaluations' per-example records, so nothing is recomputed.
    ``requests``: the ledger records (:class:`unlearn.requests.Request`) of the requests the model honours.
    A request whose rows are not in this forget split (``requests.mode: sequential``: an earlier request, which
    the model it started from already honoured) gets None: its evidence is the holdout evidence alone.
    """
    from .requests import RequestError, forget_rows_for

    if not requests:
        return {}
    probs = _forget_probs(p)
    forget_rows = read_splits(p, [p.data.forget_split])[p.data.forget_split]
    out: dict[str, dict[str, float | None]] = {}
    for req in requests:
        try:
            rows = forget_rows_for([req], forget_rows)
        except RequestError:  # not unlearned here (sequential: an earlier request); a rows request: the ones here
            ids = set(req.row_ids or ())
            rows = [r for r in forget_rows if r["id"] in ids]
        ev = {}
        for key, name in (("prob_before", "target"), ("prob_after", "unlearned")):
            vals = [probs[name].get(r["id"]) for r in rows]
            vals = [v for v in vals if v is not None]
            ev[key] = float(np.mean(vals)) if vals else None
        out[req.request_id] = ev
    return out


def _forget_probs(p: Params) -> dict[str, dict[str, float | None]]:
    """``{"target" | "unlearned": {forget row id: answer probability}}`` from the evaluations' per-example records."""
    probs = {}
    for name in ("target", "unlearned"):
        f = reports_dir(p) / "eval" / name / "per_example.jsonl"
        recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []
        probs[name] = {r["id"]: r.get("prob") for r in recs if r.get("split", "").startswith(p.data.forget_split)}
    return probs


def forget_row_tags(p: Params) -> dict[str, str]:
    """The version tags ``forget_row_evidence.*``: every forget row's id with its answer probability before (target)
    and after (unlearned), which :mod:`unlearn.requests.coverage` reads to tell a new deletion request that this
    version already honours it. TOFU only (requests name authors or QA rows): ``{}`` for another benchmark, or
    without the forget split file (as :func:`unlearn.tracking.data_hashes` then records no ``forget_set_hash``)."""
    from .requests.coverage import forget_row_evidence_tags

    if p.benchmark != "tofu" or not (Path(p.data.out_dir) / f"{p.data.forget_split}.json").is_file():
        return {}
    probs = _forget_probs(p)
    rows = read_splits(p, [p.data.forget_split])[p.data.forget_split]
    return forget_row_evidence_tags({r["id"]: (probs["target"].get(r["id"]), probs["unlearned"].get(r["id"])) for r in rows})


def verify_audit_trail(p: Params):
    """``unlearn audit --verify``: the ledger's hash chain, and every registered version's weight files, forget
    set and chain anchor, recomputed (:func:`unlearn.requests.verify.verify_store`). Returns its report."""
    from . import tracking
    from .requests import Ledger, requests_settings
    from .requests.verify import verify_store

    with Ledger(requests_settings(p).url) as ledger:
        return verify_store(ledger, tracking.registered_versions(p),
                            model_files=lambda info: tracking.version_model_dir(p, info))


def audit(p: Params, request_id: str | None = None, model_version: str | None = None) -> str:
    """``unlearn audit``: which versions honour a request, or what produced a version (rendered text)."""
    from . import tracking
    from .requests import Ledger, audit_model, audit_request, render_audit_model, render_audit_request, requests_settings

    with Ledger(requests_settings(p).url) as ledger:
        if model_version is not None:
            return render_audit_model(audit_model(tracking.model_version_info(p, model_version), ledger))
        if request_id is None:
            raise ValueError("give a REQUEST_ID or --model VERSION")
        return render_audit_request(
            audit_request(ledger, request_id, versions_lookup=lambda rid: tracking.versions_for_request(p, rid))
        )


# --------------------------------------------------------------------------- tokenizer for truncation counts
def model_tokenizer(p: Params):
    """``(tokenizer, where it came from)`` of the models this configuration trains, or ``(None, why not)``.

    With ``model.path`` set (a real checkpoint) the tokenizer is that checkpoint's (a
    load failure is raised: the configuration names a model that cannot be read);
    otherwise the one the tokenizer stage saved under ``<model.out_dir>/tokenizer``.
    Used by :func:`validate` to count truncated rows at ``model.max_length``.
    """
    from .models.build import load_tokenizer

    if p.model.path:
        return load_tokenizer(p.model.path), str(p.model.path)
    tdir = tokenizer_dir(p)
    if not (tdir / "tokenizer.json").exists():
        return None, f"no tokenizer at {tdir}: run `unlearn tokenizer` (or `dvc repro tokenizer`) first"
    return load_tokenizer(tdir), str(tdir)


# --------------------------------------------------------------------------- what each stage reads and writes
@dataclass(frozen=True)
class StageIO:
    """What one stage reads and writes: declared once, here, for every face that needs it.

    The Prefect flows key their cache on it (:func:`stage_key`) and rerun a stage whose
    outputs are gone; ``tests/test_stage_io.py`` checks it against ``dvc.yaml``'s
    deps/outs/params for the default parameters, so the two declarations cannot drift.
    """

    inputs: list[Path]
    """Artifacts whose content the outputs depend on (dvc.yaml's deps outside src/, or files inside them)."""
    outputs: list[Path]
    """Everything the stage writes (dvc.yaml's outs, metrics and plots)."""
    params: dict[str, Any]
    """The params.yaml keys it reads, as dvc.yaml's ``params:`` lists them, with their values."""
    code: list[str] = field(default_factory=list)
    """The library source it runs (dvc.yaml's deps under src/). Not part of :func:`stage_key`."""
    after: list[Path] = field(default_factory=list)
    """Files that must exist before it runs (the validation gate's result) without changing its outputs."""


def eval_files(p: Params) -> tuple[str, ...]:
    """What :func:`evaluate` writes into its output directory (the benchmark's report files)."""
    return benchmark_of(p).eval_files


def _param_values(p: Params, keys: list[str]) -> dict[str, Any]:
    """``{"model.arch": {...}, "seed": 0}``: the values of dotted params.yaml keys (JSON-ready)."""
    tree = p.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def _extra_params(p: Params, stage: str) -> tuple[str, ...]:
    """The params ``stage`` reads that only this benchmark has (MUSE's generator and metrics)."""
    return benchmark_of(p).extra_params.get(stage, ())


def _tokenizer_input(p: Params) -> list[Path]:
    """The trained tokenizer a stage reads (none with model.path: the checkpoint's own comes with it)."""
    return [] if p.model.path else [tokenizer_dir(p) / "tokenizer.json"]


def _io_prepare(p: Params) -> StageIO:
    inputs = [Path(p.data.local_dir)] if p.data.source == "local" else []
    return StageIO(inputs, [Path(p.data.out_dir)], _param_values(p, ["benchmark", "data", *_extra_params(p, "prepare")]),
                   code=["src/unlearn/benchmark", "src/unlearn/data"])


def _io_tokenizer(p: Params) -> StageIO:
    return StageIO([Path(p.data.out_dir)], [] if p.model.path else [tokenizer_dir(p)],
                   _param_values(p, ["benchmark", "model.tokenizer", *_extra_params(p, "tokenizer")]),
                   code=["src/unlearn/benchmark", "src/unlearn/models/build.py", "src/unlearn/models/template.py"])


def _io_validate(p: Params) -> StageIO:
    from .data.validate import result_path

    return StageIO([Path(p.data.out_dir), *_tokenizer_input(p)], [result_path(p)],
                   _param_values(p, ["benchmark", "data.forget_split", "model.max_length", "model.path",
                                     *_extra_params(p, "validate")]),
                   code=["src/unlearn/benchmark", *benchmark_of(p).validate_code, "src/unlearn/models/formatting.py",
                         "src/unlearn/models/template.py", "src/unlearn/models/truncation.py"])


def _io_finetune(p: Params, *, role: str, out_dir: str | Path | None = None) -> StageIO:
    from .data.validate import result_path

    if role not in ("target", "retain"):
        raise ValueError(f"role must be 'target' or 'retain', got {role!r}")
    default = model_dir(p, role)
    out = Path(out_dir) if out_dir else default
    rdir = run_reports_dir(p, out, default, "finetune")
    return StageIO(
        [Path(p.data.out_dir), *_tokenizer_input(p)], [out, rdir / f"{role}.json", rdir / f"{role}_loss.json"],
        _param_values(p, ["benchmark", "seed", "model.arch", "model.max_length", "model.path", "finetune",
                          "data.forget_split", *_extra_params(p, "finetune")]),
        code=["src/unlearn/benchmark", "src/unlearn/models", "src/unlearn/train.py"], after=[result_path(p)],
    )


def _io_cache(p: Params, *, target_dir: str | Path | None = None) -> StageIO:
    target = Path(target_dir) if target_dir else model_dir(p, "target")
    return StageIO([Path(p.data.out_dir), target], [Path(p.cache.dir)],
                   _param_values(p, ["benchmark", "seed", "model.max_length", "data.forget_split", "cache",
                                     *_extra_params(p, "cache")]),
                   code=["src/unlearn/benchmark", "src/unlearn/cache.py", "src/unlearn/precision.py",
                         "src/unlearn/models/build.py", "src/unlearn/models/formatting.py",
                         "src/unlearn/models/template.py", "src/unlearn/models/teacher_forced.py"])


def _io_forget(p: Params, *, out_dir: str | Path | None = None, target_dir: str | Path | None = None,
               reference: str = "cache") -> StageIO:
    target = Path(target_dir) if target_dir else model_dir(p, "target")
    default = model_dir(p, "unlearned")
    out = Path(out_dir) if out_dir else default
    rdir = run_reports_dir(p, out, default, "forget")
    cached = [Path(p.cache.dir)] if reference == "cache" else []  # live/exact: a reference forward instead
    # method.select compares with the retain model (dvc.yaml leaves it out: the default, select: last, does not).
    retain = [model_dir(p, "retain")] if p.method.select != "last" else []
    return StageIO([Path(p.data.out_dir), target, *cached, *retain],
                   [out, rdir / "summary.json", rdir / "loss.json", rdir / "eval.json"],
                   _param_values(p, ["benchmark", "seed", "model.max_length", "data.forget_split", "method", "cache",
                                     *_extra_params(p, "forget")]),
                   code=["src/unlearn/benchmark", "src/unlearn/methods", "src/unlearn/train.py",
                         "src/unlearn/models/formatting.py", "src/unlearn/models/template.py",
                         "src/unlearn/models/lora.py"])


def _io_evaluate(p: Params, *, model_path: str | Path, name: str, retain_dir: str | Path | None = None,
                 target_dir: str | Path | None = None, out_dir: str | Path | None = None) -> StageIO:
    """``retain_dir`` adds no input: the other evaluations read the retain model through its reference (the
    retain evaluation's output, an input of theirs). The target model is an input of the unlearned model's
    evaluation (side-by-side answers) with the target's metrics (the trade-off plot); the retain model's report
    also shows target answers when the target exists, which dvc.yaml leaves out as report-only."""
    out = Path(out_dir) if out_dir else reports_dir(p) / "eval" / name
    ref = eval_reference_dir(p)
    inputs, outputs = [Path(p.data.out_dir), Path(model_path)], [out / f for f in eval_files(p)]
    if name == "retain":
        outputs.append(ref)
    else:
        inputs.append(ref)
    if name == "unlearned":
        target = Path(target_dir) if target_dir is not None else model_dir(p, "target")
        inputs += [target, reports_dir(p) / "eval" / "target" / "metrics.json"]
        outputs.append(reports_dir(p) / "eval" / "tradeoff.json")
    return StageIO(inputs, outputs, _param_values(p, ["benchmark", "eval", "model.max_length", "data.forget_split",
                                                      *_extra_params(p, "evaluate")]),
                   code=["src/unlearn/benchmark", "src/unlearn/eval", "src/unlearn/models"])


def _io_register(p: Params, *, model_path: str | Path | None = None) -> StageIO:
    model = Path(model_path) if model_path else model_dir(p, "unlearned")
    rdir = reports_dir(p)
    loss = run_reports_dir(p, model, model_dir(p, "unlearned"), "forget") / "loss.json"
    # The comparison page (comparison_dir) reads every model's metrics and per-example records, the memorisation
    # summaries and loss logs, and MUSE's sequences (their steps are models of the run too).
    compared = [rdir / "eval" / "retain" / "metrics.json",
                *(rdir / "eval" / m / "per_example.jsonl" for m in ("retain", "target", "unlearned")),
                *(rdir / "finetune" / f for f in ("target.json", "retain.json", "target_loss.json", "retain_loss.json")),
                rdir / "forget" / "summary.json",
                *(sequence_reports(p, k).with_suffix(".json") for k in (SEQUENCES if p.benchmark == "muse" else ()))]
    return StageIO(
        [model, rdir / "eval" / "unlearned" / "metrics.json", rdir / "eval" / "target" / "metrics.json", loss,
         Path(p.data.out_dir) / "manifest.json", *compared],
        [rdir / "register" / "decision.json", comparison_dir(p)], _param_values(p, ["benchmark", "gate", "tracking"]),
        code=["src/unlearn/benchmark", "src/unlearn/tracking.py", "src/unlearn/gate.py", "src/unlearn/eval/compare.py",
              "src/unlearn/eval/report.py"],
    )


def _io_sequence(p: Params, *, kind: str) -> StageIO:
    """A MUSE sequence reads the data, the target (and its metrics) and the retain reference; it writes its models
    and its reports (every step's evaluation, the curve and its plot)."""
    rdir = sequence_reports(p, kind)
    return StageIO(
        [Path(p.data.out_dir), model_dir(p, "target"), reports_dir(p) / "eval" / "target" / "metrics.json",
         eval_reference_dir(p)],
        [sequence_dir(p, kind), rdir, rdir.with_suffix(".json"), rdir.with_suffix(".png")],
        _param_values(p, ["benchmark", "seed", "model.max_length", "method", "cache", "eval", *_extra_params(p, "evaluate")]),
        code=["src/unlearn/benchmark", "src/unlearn/methods", "src/unlearn/train.py", "src/unlearn/eval",
              "src/unlearn/models"],
    )


_STAGE_IO = {
    "prepare": _io_prepare, "tokenizer": _io_tokenizer, "validate": _io_validate, "finetune": _io_finetune,
    "cache": _io_cache, "forget": _io_forget, "evaluate": _io_evaluate, "register": _io_register,
    "sequence": _io_sequence,
}
STAGES: tuple[str, ...] = tuple(_STAGE_IO)
"""The stage names :func:`stage_io` knows: one per stage function (``finetune`` covers target and retain)."""


def stage_io(stage: str, p: Params, /, **kwargs: Any) -> StageIO:
    """Inputs, outputs, params and code of ``stage`` run with ``p`` and the stage function's own keyword
    arguments (``role=``, ``out_dir=``, ``target_dir=``, ``model_path=``, ``name=``...), named, never guessed
    from position: an unknown keyword is a TypeError naming it."""
    try:
        declare = _STAGE_IO[stage]
    except KeyError:
        raise KeyError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}") from None
    return declare(p, **kwargs)


def input_fingerprint(path: str | Path) -> str:
    """Content identity of a stage input: a data directory's manifest, a model's weights and config, a file's
    sha256, any other directory's files; ``missing`` when it does not exist (yet)."""
    from .cache import model_hash
    from .io import sha256_file, stable_hash

    path = Path(path)
    if path.is_dir() and (path / "manifest.json").exists():
        return stable_hash(read_json(path / "manifest.json"))
    if path.is_dir() and (list(path.glob("*.safetensors")) or list(path.glob("*.bin"))):
        return model_hash(path)  # weights and config.json
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return stable_hash({str(f.relative_to(path)): sha256_file(f) for f in sorted(path.rglob("*")) if f.is_file()})
    return "missing"


def stage_key(stage: str, p: Params, /, **kwargs: Any) -> str:
    """``<stage>-<hash>``: one run of a stage, by its params and keyword arguments, the content of its inputs and
    where its outputs go. Two runs with the same key write the same outputs, so an orchestrator may reuse the
    first (the Prefect flows' cache key). Source code is not part of it: ``dvc repro`` tracks that."""
    from .io import stable_hash

    io = stage_io(stage, p, **kwargs)
    return f"{stage}-" + stable_hash({
        "params": io.params,
        "kwargs": {k: None if v is None else str(v) for k, v in sorted(kwargs.items())},
        "inputs": {str(i): input_fingerprint(i) for i in io.inputs},
        "outputs": [str(o) for o in io.outputs],
    })[:32]
