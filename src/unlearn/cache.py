"""Content-addressed reference-model quantities.

Every reference quantity an unlearning loss needs depends only on (reference
model, tokenizer, rows, max length, template, top-K). It is computed once, in
one batched pass, stored under a key hashing exactly those inputs, and looked
up by row index during training, so the unlearning loop never holds the
reference model in memory.

Stored per forget row (S = max_length - 1 shifted positions):
- ``seq_logp``      [N]       sum of reference answer-token log-probs (NPO, DPO)
- ``idk_seq_logp``  [N]       same for the row's refusal answer (DPO-IdK)
- ``label_logp``    [N, S]    reference log-prob of the gold token (DiPO mask=gold)
- ``topk_ids``      [N, S, K] the K most probable reference tokens (int32)
- ``topk_logp``     [N, S, K] their log-probs (float16)
- ``lse``           [N, S]    the log-sum-exp of the raw logits (to rebuild raw logits)
and, optionally, the same top-K/label tensors for the retain rows (``retain_loss: kl``).

Integrity: the safetensors metadata carries the key and a sha256 of every
tensor's bytes; a file that is truncated, corrupt or under the wrong key is
rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .io import stable_hash
from .models.formatting import PROMPT_TEMPLATE, IGNORE, collate, encode_many

log = logging.getLogger("unlearn.cache")
FORMAT_VERSION = 1


def tokenizer_hash(tokenizer) -> str:
    """Identity of a tokenizer: its full serialised vocabulary/merges plus special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256((blob + json.dumps(specials)).encode()).hexdigest()


def idk_answers(n: int, refusals: Sequence[str], seed: int) -> list[str]:
    """The refusal paired with each forget row (fixed by the seed so the cache can hold its log-prob)."""
    if not refusals:
        raise ValueError("the refusal list (idk) is empty: DPO-IdK needs at least one 'I don't know' answer")
    rng = random.Random(seed)
    return [rng.choice(list(refusals)) for _ in range(n)]


def cache_key(
    *, model_hash: str, tok_hash: str, questions: Sequence[str], answers: Sequence[str], max_length: int,
    top_k: int, part: str, extra: Sequence[str] = (),
) -> str:
    """sha256 over every input the cached tensors depend on; any change gives a new key."""
    return stable_hash(
        {
            "v": FORMAT_VERSION, "part": part, "model": model_hash, "tokenizer": tok_hash,
            "template": PROMPT_TEMPLATE, "max_length": max_length, "top_k": top_k,
            "rows": [[q, a] for q, a in zip(questions, answers)], "extra": list(extra),
        }
    )


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], key: str) -> None:
    """Atomic safetensors write with the key and a content digest in the metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"key": key, "sha256": _digest(tensors)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors if the file is intact and belongs to ``key``; None (with a log line) otherwise."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any read failure means "rebuild"
        log.warning("reference cache %s is unreadable (%s): rebuilding", path, e)
        return None
    if meta.get("key") != key or meta.get("sha256") != _digest(tensors):
        log.warning("reference cache %s failed its integrity check: rebuilding", path)
        return None
    return tensors


@torch.no_grad()
def reference_pass(
    model, tokenizer, questions: Sequence[str], answers: Sequence[str], *, max_length: int, top_k: int,
    batch_size: int = 32, with_topk: bool = True, desc: str = "reference",
) -> dict[str, torch.Tensor]:
    """One batched forward pass of the reference model over (question, answer) rows."""
    device = next(model.parameters()).device
    model.eval()
    enc = encode_many(tokenizer, questions, answers, max_length)
    S = max_length - 1
    n = len(enc)
    out = {"seq_logp": torch.zeros(n), "label_logp": torch.zeros(n, S)}
    if with_topk:
        out.update(
            topk_ids=torch.zeros(n, S, top_k, dtype=torch.int32),
            topk_logp=torch.full((n, S, top_k), -1e4, dtype=torch.float16),
            lse=torch.zeros(n, S),
        )
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
        batch = collate(enc[start:start + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        lg, lb = logits[:, :-1], batch["labels"][:, 1:]
        w = lg.size(1)
        lse = torch.logsumexp(lg, dim=-1)
        logp = lg - lse.unsqueeze(-1)
        mask = lb != IGNORE
        lab = logp.gather(-1, lb.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1) * mask
        sl = slice(start, start + lg.size(0))
        out["label_logp"][sl, :w] = lab.cpu()
        out["seq_logp"][sl] = lab.sum(-1).cpu()
        if with_topk:
            k = min(top_k, lg.size(-1))
            vals, ids = logp.topk(k, dim=-1)
            out["topk_ids"][sl, :w, :k] = ids.int().cpu()
            out["topk_logp"][sl, :w, :k] = vals.half().cpu()
            out["lse"][sl, :w] = lse.cpu()
    return out


@dataclass
class ReferenceCache:
    """Cached reference tensors for one (forget rows, retain rows) pair, looked up by row index."""

    forget: dict[str, torch.Tensor]
    retain: dict[str, torch.Tensor] | None
    paths: list[Path]

    def lookup(
        self, forget_idx: Sequence[int], width: int, retain_idx: Sequence[int] | None = None, retain_width: int = 0
    ) -> dict:
        """The ``batch["ref"]`` dict for the rows of right-padded batches ``width`` (forget) and ``retain_width`` wide."""
        fi = torch.as_tensor(list(forget_idx), dtype=torch.long)
        S = width - 1
        f = self.forget
        ref = {
            "seq_logp": f["seq_logp"][fi],
            "idk_seq_logp": f["idk_seq_logp"][fi],
            "label_logp": f["label_logp"][fi, :S],
            "topk_ids": f["topk_ids"][fi, :S].long(),
            "topk_logp": f["topk_logp"][fi, :S].float(),
        }
        if self.retain is not None and retain_idx is not None:
            ri = torch.as_tensor(list(retain_idx), dtype=torch.long)
            R = retain_width - 1
            ref.update(
                retain_topk_ids=self.retain["topk_ids"][ri, :R].long(),
                retain_topk_logp=self.retain["topk_logp"][ri, :R].float(),
                retain_label_logp=self.retain["label_logp"][ri, :R],
            )
        return ref


def ensure_cache(
    *, cache_dir: str | Path, model_dir: str | Path, tokenizer, forget_rows: Sequence[dict], retain_rows: Sequence[dict],
    refusals: Sequence[str], seed: int, max_length: int, top_k: int, with_retain: bool, batch_size: int = 32,
    model=None,
) -> ReferenceCache:
    """Load the cache for these inputs, or compute and store it (loading the reference model only then)."""
    from .models.build import load_model, weights_hash

    cache_dir = Path(cache_dir)
    mh, th = weights_hash(model_dir), tokenizer_hash(tokenizer)
    fq = [r["question"] for r in forget_rows]
    fa = [r["answer"] for r in forget_rows]
    idk = idk_answers(len(forget_rows), refusals, seed)
    fkey = cache_key(model_hash=mh, tok_hash=th, questions=fq, answers=fa, max_length=max_length, top_k=top_k,
                     part="forget", extra=idk)
    parts = [("forget", fkey, fq, fa)]
    if with_retain:
        rq = [r["question"] for r in retain_rows]
        ra = [r["answer"] for r in retain_rows]
        rkey = cache_key(model_hash=mh, tok_hash=th, questions=rq, answers=ra, max_length=max_length, top_k=top_k,
                         part="retain")
        parts.append(("retain", rkey, rq, ra))
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    paths = []
    for part, key, q, a in parts:
        path = cache_dir / f"{part}-{key[:24]}.safetensors"
        paths.append(path)
        tensors = load_tensors(path, key)
        if tensors is None:
            if model is None:
                model = load_model(model_dir)
            log.info("computing reference %s cache (%d rows) -> %s", part, len(q), path)
            tensors = reference_pass(model, tokenizer, q, a, max_length=max_length, top_k=top_k,
                                     batch_size=batch_size, desc=f"reference {part}")
            if part == "forget":
                idk_t = reference_pass(model, tokenizer, q, idk, max_length=max_length, top_k=top_k,
                                       batch_size=batch_size, with_topk=False, desc="reference idk")
                tensors["idk_seq_logp"] = idk_t["seq_logp"]
            save_tensors(path, tensors, key)
        loaded[part] = tensors
    return ReferenceCache(forget=loaded["forget"], retain=loaded.get("retain"), paths=paths)


class LiveReference:
    """The same ``batch["ref"]`` dict computed by a live reference forward each step (no cache).

    ``top_k=None`` gives the exact full-vocabulary log-probs (``topk_ids=None``),
    against which the cached top-K approximation is measured.
    """

    def __init__(self, model, top_k: int | None):
        self.model = model.eval()
        self.top_k = top_k
        for prm in self.model.parameters():
            prm.requires_grad_(False)

    @torch.no_grad()
    def _one(self, batch: dict) -> dict[str, torch.Tensor]:
        dev = batch["input_ids"].device
        if next(self.model.parameters()).device != dev:  # accelerate moved the batch (e.g. to a GPU)
            self.model.to(dev)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        lg, lb = logits[:, :-1], batch["labels"][:, 1:]
        logp = torch.log_softmax(lg, -1)
        mask = lb != IGNORE
        lab = logp.gather(-1, lb.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1) * mask
        if self.top_k is None:
            return {"label_logp": lab, "seq_logp": lab.sum(-1), "topk_ids": None, "topk_logp": logp}
        vals, ids = logp.topk(self.top_k, -1)
        return {"label_logp": lab, "seq_logp": lab.sum(-1), "topk_ids": ids, "topk_logp": vals.half().float()}

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        f = self._one(batch["forget"])
        ref = dict(f)
        if "idk" in batch:
            ref["idk_seq_logp"] = self._one(batch["idk"])["seq_logp"]
        if "retain" in batch:
            r = self._one(batch["retain"])
            ref.update(retain_topk_ids=r["topk_ids"], retain_topk_logp=r["topk_logp"], retain_label_logp=r["label_logp"])
        return ref
