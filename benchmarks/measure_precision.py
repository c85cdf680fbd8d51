"""DiPO Delta and NPO log-ratio at theta = ref: a float32 reference cache vs one under the policy's autocast.

    python benchmarks/measure_precision.py                 # params.yaml, models/target, bf16 on the CPU

At theta = ref both quantities are 0 by definition; what is left is the
numerical gap between the reference cache and the policy's forward. The policy
is the target model prepared by a real ``accelerate.Accelerator`` with
``mixed_precision`` (bf16 by default, on this machine's device), run on the
forget batches exactly as the forget stage builds them (``method.batch_size``,
shuffled, forget padded to the width of its idk partner), so its padding widths
differ from the cache pass's. The caches are built by ``cache.ensure_cache``
into a temporary directory, once with ``mixed_precision="no"`` (float32, what
every cache was before) and once with the policy's. See docs/dipo.md,
"Reference precision".
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/target")
    ap.add_argument("--mixed-precision", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.params = str(Path(args.params).resolve())
    args.model = str(Path(args.model).resolve())
    os.chdir(Path(args.params).parent)

    import torch
    from accelerate import Accelerator

    from unlearn import cache as C
    from unlearn import stages
    from unlearn.config import load_params
    from unlearn.methods import losses
    from unlearn.models.build import load_model, load_tokenizer, weights_hash
    from unlearn.models.formatting import collate, encode_many
    from unlearn.models.scoring import sequence_logprob

    torch.set_num_threads(args.threads)
    p = load_params(args.params)
    tok = load_tokenizer(args.model)
    inputs = stages.forget_inputs(p)
    forget_rows, retain_rows, refusals = inputs.forget, inputs.retain, inputs.refusals
    L = p.model.max_length
    acc = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
    policy = acc.prepare(load_model(args.model))
    with tempfile.TemporaryDirectory() as td:
        caches = {
            mp: C.ensure_cache(cache_dir=td, model_dir=args.model, tokenizer=tok, forget_rows=forget_rows,
                               retain_rows=retain_rows, refusals=refusals, seed=p.seed, max_length=L,
                               top_k=p.cache.top_k, with_retain=False, device=acc.device, mixed_precision=mp)
            for mp in ("no", acc.mixed_precision)
        }
    enc_f = encode_many(tok, [r["question"] for r in forget_rows], [r["answer"] for r in forget_rows], L)
    enc_i = encode_many(tok, [r["question"] for r in forget_rows], C.idk_answers(len(forget_rows), refusals, p.seed), L)
    perm = torch.randperm(len(enc_f), generator=torch.Generator().manual_seed(p.seed)).tolist()
    B, d = p.method.batch_size, p.method.dipo
    print(f"model {args.model} (weights sha256 {weights_hash(args.model)[:12]}), split {p.data.forget_split} "
          f"({len(enc_f)} rows, batches of {B}), device {acc.device}, torch {torch.__version__}, "
          f"DiPO k={d.k} gamma={d.gamma} beta={d.beta} mask={d.mask}, cache.top_k {p.cache.top_k}")
    print("| policy forward | cache | max abs Delta | mean abs Delta | max abs NPO log-ratio (nats) | mean abs |")
    print("|---|---|---|---|---|---|")
    plain = load_model(args.model).to(acc.device)  # its own copy: unwrap_model would strip policy's autocast in place
    for pol_name, model in (("float32", plain),
                            (f"{acc.mixed_precision} autocast (accelerate)", policy)):
        for cache_mp, cache in caches.items():
            deltas, ratios = [], []
            for s in range(0, len(perm), B):
                idx = perm[s:s + B]
                width = max(max(len(enc_f[i].input_ids), len(enc_i[i].input_ids)) for i in idx)
                fb = {k: v.to(acc.device) for k, v in
                      collate([enc_f[i] for i in idx], tok.pad_token_id, pad_to=width).items()}
                with torch.no_grad():
                    logits = model(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"]).logits.float()
                ref = {k: v.to(acc.device) for k, v in cache.lookup(idx, width).items()}
                ratios.append(sequence_logprob(logits, fb["labels"])[0] - ref["seq_logp"])
                deltas.append(losses.dipo_delta(logits, fb["labels"], ref["topk_ids"], ref["topk_logp"], k=d.k,
                                                gamma=d.gamma, beta=d.beta, mask=d.mask,
                                                ref_label_logp=ref["label_logp"]))
            dl, rt = torch.cat(deltas).abs(), torch.cat(ratios).abs()
            name = "float32" if cache_mp == "no" else f"{cache_mp} autocast"
            print(f"| {pol_name} | {name} | {dl.max():.2e} | {dl.mean():.2e} | {rt.max():.2e} | {rt.mean():.2e} |")


if __name__ == "__main__":
    main()
