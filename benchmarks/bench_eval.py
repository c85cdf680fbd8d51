"""Throughput of the TOFU evaluation: probability metrics (teacher-forced) and generation.

    python benchmarks/bench_eval.py                      # small random Llama, synthetic rows
    python benchmarks/bench_eval.py --model models/target --n 200 --batch-size 64

Prints examples/s for (a) the probability metrics of one forget-style split
(answer + paraphrase + N perturbed answers per example, all through one batched
scoring pass) and (b) greedy generation (ROUGE-L's input).
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def synthetic_rows(n: int, n_perturbed: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ("author born city novel award mother father wrote genre published family years first book "
             "story prize early life known work themes writing style series").split()

    def sent(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."

    return [{"id": i, "author_id": i // 20, "question": sent(rng.randint(8, 14))[:-1] + "?",
             "answer": sent(rng.randint(15, 30)), "paraphrased_answer": sent(rng.randint(15, 30)),
             "perturbed_answer": [sent(rng.randint(15, 30)) for _ in range(n_perturbed)]} for i in range(n)]


def build_model(args, device):
    if args.model:
        from unlearn.eval.loading import load_eval_model

        return load_eval_model(args.model, device)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from unlearn.models.template import PLAIN

    rows = synthetic_rows(200, 5, seed=1)
    corpus = [PLAIN.corpus_text(r["question"], r["answer"]) for r in rows]
    tk = Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                  unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=3 * args.hidden,
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).to(device).eval(), tok


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="saved model directory (tokenizer beside it); default: random small Llama")
    ap.add_argument("--n", type=int, default=200, help="synthetic forget examples (default 200)")
    ap.add_argument("--n-perturbed", type=int, default=5, help="perturbed answers per example (default 5)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--gen-n", type=int, default=64, help="examples to generate for (default 64)")
    ap.add_argument("--hidden", type=int, default=192, help="random model: hidden size")
    ap.add_argument("--layers", type=int, default=4, help="random model: layers")
    ap.add_argument("--vocab", type=int, default=2048, help="random model: BPE vocabulary size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from unlearn.eval.generation import generate_answers
    from unlearn.eval.tofu_metrics import FORGET_ROLE, split_scores
    from unlearn.models.formatting import ensure_pad

    model, tok = build_model(args, args.device)
    ensure_pad(tok)
    rows = synthetic_rows(args.n, args.n_perturbed)
    n_pairs = args.n * (2 + args.n_perturbed)
    print(f"device={args.device} params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"examples={args.n} pairs={n_pairs} batch={args.batch_size}")

    kw = dict(role=FORGET_ROLE, max_length=args.max_length, batch_size=args.batch_size, device=args.device)
    split_scores(model, tok, rows[: min(8, len(rows))], **kw)  # warm-up
    sync(args.device)
    t = time.perf_counter()
    split_scores(model, tok, rows, **kw)
    sync(args.device)
    dt = time.perf_counter() - t
    print(f"probability metrics: {args.n / dt:8.1f} examples/s  ({n_pairs / dt:.1f} scored pairs/s, {dt:.2f}s)")

    qs = [r["question"] for r in rows[: args.gen_n]]
    generate_answers(model, tok, qs[:2], max_new_tokens=4, batch_size=args.batch_size, device=args.device)
    sync(args.device)
    t = time.perf_counter()
    gens = generate_answers(model, tok, qs, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            device=args.device)
    sync(args.device)
    dt = time.perf_counter() - t
    n_tok = sum(len(tok(g, add_special_tokens=False)["input_ids"]) for g in gens)
    print(f"generation:          {len(qs) / dt:8.1f} examples/s  (~{n_tok / dt:.0f} new tokens/s, "
          f"max_new_tokens={args.max_new_tokens}, {dt:.2f}s)")


if __name__ == "__main__":
    main()
