"""How close the top-K reference cache is to the exact full-vocabulary reference, on the real model.

    python benchmarks/measure_cache.py                         # params.yaml, models/target, K = 8 16 64 256
    python benchmarks/measure_cache.py --ks 64 --epochs 1 --noise 0.05

For the default target model and the default forget split, computes each
distribution-level loss and its gradient with respect to every model parameter
(flattened into one vector) twice:

* exact: ``ref_ids=None`` and ``ref_logp`` = the full-vocabulary log-softmax of
  the frozen reference (the target model), i.e. ``LiveReference(top_k=None)``;
* cached: the top-K reference exactly as the trainer sees it, i.e.
  ``ReferenceCache.lookup`` on tensors from ``cache.reference_pass`` (for
  ``K == cache.top_k`` the real on-disk cache from ``stages.cache``).

The losses go through the registry adapters, as in training: DiPO (``dipo_forget``
with ``method.dipo``, mask topk and gold), UNDIAL (``undial`` with alpha = 0) and
the KL retain term (``retain_loss: kl``, on as many retain rows as there are
forget rows). Batches are ``method.batch_size`` rows in split order, built as
``stages.forget`` builds them; the reported loss/gradient is the mean over those
batches (the average training-step loss/gradient).

Policies theta: the reference itself (theta = ref, step 0), the model after
``stages.forget`` with ``method.name=dipo`` for each ``--epochs`` value (a
complete run of that many epochs, the default config otherwise), and optionally
theta = ref + noise (``--noise s``: every tensor plus s * its std * N(0, 1)).

Columns: mean reference tail mass outside the top-K over answer positions;
exact and cached loss; rel. err = |cached - exact| / |exact|; grad cos = cosine
of the two parameter gradients; grad rel. err = ||g_cached - g_exact|| / ||g_exact||;
norm ratio = ||g_cached|| / ||g_exact||.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from unlearn.fmt import markdown_table

os.environ.setdefault("TQDM_DISABLE", "1")  # before torch, which imports tqdm: no progress bars in the output

import torch

# --------------------------------------------------------------------------- batches and references


def _params(args, extra=()):
    from unlearn.config import load_params

    return load_params(args.params, overrides=list(args.set or []) + list(extra))


def build_batches(p, tok, n_retain: int):
    """Forget/retain batches of method.batch_size rows, in split order, collated as stages.forget does."""
    from unlearn import stages
    from unlearn.models.formatting import collate, encode_many

    inputs = stages.forget_inputs(p)
    forget_rows, retain_rows = inputs.forget, inputs.retain
    retain_rows = retain_rows[:n_retain]
    L = p.model.max_length
    enc_f = encode_many(tok, [r["question"] for r in forget_rows], [r["answer"] for r in forget_rows], L)
    enc_r = encode_many(tok, [r["question"] for r in retain_rows], [r["answer"] for r in retain_rows], L)
    bs = p.method.batch_size
    batches = []
    for s in range(0, len(enc_f), bs):
        idx = list(range(s, min(s + bs, len(enc_f))))
        r_idx = [i % len(enc_r) for i in idx]
        batches.append({
            "idx": idx, "r_idx": r_idx,
            "forget": collate([enc_f[i] for i in idx], tok.pad_token_id),
            "retain": collate([enc_r[i] for i in r_idx], tok.pad_token_id),
        })
    return forget_rows, retain_rows, batches


def exact_refs(ref_model, batches):
    """Full-vocabulary reference per batch (LiveReference with top_k=None)."""
    from unlearn.cache import LiveReference

    live = LiveReference(ref_model, top_k=None)
    return [live({"forget": b["forget"], "retain": b["retain"]}) for b in batches]


def cached_refs(p, args, tok, ref_model, forget_rows, retain_rows, batches, k: int):
    """The batch["ref"] dicts the trainer would get from a top-K cache with K = k."""
    from unlearn import stages
    from unlearn.cache import ReferenceCache, reference_pass

    L = p.model.max_length
    if k == p.cache.top_k:
        forget = stages.cache(p, args.model, with_retain=False).forget  # the real on-disk cache
    else:
        forget = reference_pass(ref_model, tok, [r["question"] for r in forget_rows],
                                [r["answer"] for r in forget_rows], max_length=L, top_k=k)
        forget["idk_seq_logp"] = torch.zeros_like(forget["seq_logp"])  # not used by these losses
    retain = reference_pass(ref_model, tok, [r["question"] for r in retain_rows], [r["answer"] for r in retain_rows],
                            max_length=L, top_k=k)
    cache = ReferenceCache(forget=forget, retain=retain, paths=[])
    return [cache.lookup(b["idx"], b["forget"]["input_ids"].size(1), b["r_idx"], b["retain"]["input_ids"].size(1))
            for b in batches]


def tail_mass(exact: list[dict], batches, k: int, part: str) -> float:
    """Mean over answer positions of the reference probability outside its top-k."""
    tot, n = 0.0, 0
    for ref, b in zip(exact, batches):
        logp = ref["topk_logp"] if part == "forget" else ref["retain_topk_logp"]
        mask = b[part]["labels"][:, 1:] != -100
        kk = min(k, logp.size(-1))
        tail = 1.0 - logp.topk(kk, -1).values.double().exp().sum(-1)
        tot += float(tail[mask].sum())
        n += int(mask.sum())
    return tot / max(n, 1)


# --------------------------------------------------------------------------- losses via the registry


def loss_fns(p):
    from unlearn.methods import registry

    m = p.method
    cfg_topk = m.model_copy(update={"dipo": m.dipo.model_copy(update={"mask": "topk", "reference": "fixed"})})
    cfg_gold = m.model_copy(update={"dipo": m.dipo.model_copy(update={"mask": "gold", "reference": "fixed"})})
    cfg_undial = m.model_copy(update={"alpha": 0.0})
    cfg_kl = m.model_copy(update={"alpha": 1.0, "retain_loss": "kl"})
    d, u = m.dipo, m.undial
    return {
        f"DiPO (k={d.k}, topk)": ("forget", lambda mod, b: registry.METHODS["dipo_forget"].compute(mod, b, cfg_topk)[0]),
        "DiPO (gold)": ("forget", lambda mod, b: registry.METHODS["dipo_forget"].compute(mod, b, cfg_gold)[0]),
        f"UNDIAL (β={u.beta:g})": ("forget", lambda mod, b: registry.METHODS["undial"].compute(mod, b, cfg_undial)[0]),
        "KL retain": ("retain", lambda mod, b: registry._retain_term(mod, b, cfg_kl)),
    }


def loss_and_grad(model, fn, batches, refs) -> tuple[float, torch.Tensor]:
    """Mean over batches of the loss and of its gradient w.r.t. every parameter, flattened (float64)."""
    params = [x for x in model.parameters() if x.requires_grad]
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b, ref in zip(batches, refs):
        batch = {"forget": b["forget"], "retain": b["retain"], "ref": ref}
        loss = fn(model, batch) / len(batches)
        loss.backward()
        total += float(loss.detach())
    g = torch.cat([(x.grad if x.grad is not None else torch.zeros_like(x)).reshape(-1).double() for x in params])
    model.zero_grad(set_to_none=True)
    return total, g


# --------------------------------------------------------------------------- policies


def policies(p, args, tmp: Path):
    """(label, model directory or (dir, noise)) for every theta to measure at."""
    from unlearn import stages

    out = [("θ = ref (step 0)", args.model, 0.0)]
    for e in args.epochs:
        d = tmp / f"dipo_e{e}"
        pe = _params(args, ["method.name=dipo", f"method.epochs={e}", f"reports_dir={tmp / 'reports'}"])
        t0 = time.perf_counter()
        s = stages.forget(pe, out_dir=d, target_dir=args.model, reference="cache")
        print(f"[dipo {e} epoch(s): {s['steps']} steps in {time.perf_counter() - t0:.0f}s, forget_prob "
              f"{s['forget_prob']:.3f}, retain_prob {s['retain_prob']:.3f}]", flush=True)
        out.append((f"dipo, {e} epoch{'s' if e > 1 else ''} ({s['steps']} steps)", str(d), 0.0))
    if args.noise > 0:
        out.append((f"θ = ref + {args.noise:g}·std·N(0,1)", args.model, args.noise))
    return out


def load_policy(path: str, noise: float, seed: int):
    from unlearn.models.build import load_model

    model = load_model(path)
    if noise > 0:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for x in model.parameters():
                if x.numel() > 1:
                    x.add_(noise * x.std() * torch.randn(x.shape, generator=g))
    model.eval()  # no dropout: both paths see the same forward
    return model


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (default params.yaml); its paths are "
                    "relative to the directory it is in")
    ap.add_argument("--model", default="models/target", help="target (= reference) model (default models/target)")
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 64, 256], help="cache top-K values (default 8 16 64 256)")
    ap.add_argument("--epochs", type=int, nargs="*", default=[1, 5],
                    help="perturbed thetas: the model after `forget` with dipo for this many epochs (default 1 5)")
    ap.add_argument("--noise", type=float, default=0.0, help="also theta = ref + noise * std * N(0,1) per tensor")
    ap.add_argument("--losses", nargs="*", help="subset of the losses (default all), e.g. 'KL retain'")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine; "
                    "0 = os.cpu_count(), as the CLI)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="params override, repeatable")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    args = ap.parse_args()
    args.params = str(Path(args.params).resolve())
    args.model = str(Path(args.model).resolve())
    os.chdir(Path(args.params).parent)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    from unlearn import stages
    from unlearn.models.build import load_model, load_tokenizer

    torch.set_num_threads(args.threads) if args.threads else stages.set_threads()
    torch.manual_seed(0)
    p = _params(args)
    tok = load_tokenizer(args.model)
    ref_model = load_model(args.model)
    vocab = ref_model.get_output_embeddings().weight.size(0)
    ks = [k for k in args.ks if k < vocab]
    n_forget = len(stages.read_splits(p, [p.data.forget_split])[p.data.forget_split])
    forget_rows, retain_rows, batches = build_batches(p, tok, n_forget)
    fns = loss_fns(p)
    if args.losses:
        fns = {k: v for k, v in fns.items() if k in args.losses}
    t_start = time.perf_counter()
    exact = exact_refs(ref_model, batches)
    cached = {k: cached_refs(p, args, tok, ref_model, forget_rows, retain_rows, batches, k) for k in ks}
    tails = {(k, part): tail_mass(exact, batches, k, part) for k in ks for part in ("forget", "retain")}

    n_params = sum(x.numel() for x in ref_model.parameters())
    print(f"machine: {platform.node()} {platform.machine()}, os.cpu_count()={os.cpu_count()}, torch threads="
          f"{torch.get_num_threads()}, device=cpu, torch {torch.__version__}")
    from unlearn.models.build import weights_hash

    print(f"model: {args.model} (weights sha256 {weights_hash(args.model)[:12]}, {n_params / 1e6:.2f}M parameters, "
          f"vocab {vocab}); forget split {p.data.forget_split} "
          f"({len(forget_rows)} rows, {len(batches)} batches of {p.method.batch_size}); KL retain on the first "
          f"{len(retain_rows)} rows of {p.data.retain_split}; max_length {p.model.max_length}")
    d = p.method.dipo
    print(f"DiPO: k={d.k}, gamma={d.gamma}, beta={d.beta} (value at θ = ref: (2/β) log 2 = "
          f"{2 / d.beta * torch.log(torch.tensor(2.0)).item():.4f}); UNDIAL beta={p.method.undial.beta}; "
          f"perturbed θ: forget with method.name=dipo, lr {p.method.lr}, alpha {p.method.alpha}, "
          f"retain_loss {p.method.retain_loss}, batch {p.method.batch_size}")

    rows = []
    with tempfile.TemporaryDirectory() as td:
        for label, path, noise in policies(p, args, Path(td)):
            model = load_policy(path, noise, p.seed)
            for name, (part, fn) in fns.items():
                le, ge = loss_and_grad(model, fn, batches, exact)
                for k in ks:
                    lc, gc = loss_and_grad(model, fn, batches, cached[k])
                    ne, nc = ge.norm().item(), gc.norm().item()
                    # A loss whose exact value is 0 (KL retain at θ = ref) has a zero exact gradient too: the
                    # cached one is fp16 rounding noise, so relative errors and cosines are not defined.
                    trivial = abs(le) < 1e-6
                    nan = float("nan")
                    rows.append({
                        "loss": name, "theta": label, "K": k, "tail": tails[(k, part)], "exact": le, "cached": lc,
                        "rel_err": nan if trivial else abs(lc - le) / abs(le),
                        "grad_cos": nan if trivial else float(torch.nn.functional.cosine_similarity(ge, gc, 0)),
                        "grad_rel_err": nan if trivial else (gc - ge).norm().item() / ne,
                        "norm_ratio": nan if trivial else nc / ne, "grad_norm_exact": ne, "grad_norm_cached": nc,
                    })
                    r = rows[-1]
                    print(f"  {name:18s} {label:28s} K={k:<4d} exact {le:.6g} cached {lc:.6g} rel.err "
                          f"{r['rel_err']:.2e} cos {r['grad_cos']:.6f}", flush=True)
    print(f"[{time.perf_counter() - t_start:.0f}s]")

    head = ("loss", "θ", "K", "mean ref tail mass", "exact loss", "cached loss", "rel. err", "grad cos",
            "grad rel. err", "norm ratio")
    def pct(x: float) -> str:
        return "n/a" if x != x else f"{100 * x:.3g}%"

    table = [(r["loss"], r["theta"], str(r["K"]), f"{100 * r['tail']:.2f}%", f"{r['exact']:.5g}", f"{r['cached']:.5g}",
              pct(r["rel_err"]), "n/a" if r["grad_cos"] != r["grad_cos"] else f"{r['grad_cos']:.5f}",
              pct(r["grad_rel_err"]), "n/a" if r["norm_ratio"] != r["norm_ratio"] else f"{r['norm_ratio']:.4f}")
             for r in rows]
    print()
    print(markdown_table(head, table))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
