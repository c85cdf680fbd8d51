"""Content-addressed reference-model quantities.

Every reference quantity an unlearning loss needs depends only on (reference
model weights and config, its dtype, the device type and mixed precision of its
forward, the encoded token ids of the rows, top-K). It is computed once, in one
batched pass, stored under a key hashing exactly those inputs, and looked up by
row index during training, so the unlearning loop never holds the reference
model in memory.

Stored per forget row (S = max_length - 1 shifted positions):
- ``seq_logp``      [N]       sum of reference answer-token log-probs (NPO, DPO)
- ``idk_seq_logp``  [N]       same for the row's refusal answer (DPO-IdK)
- ``label_logp``    [N, S]    reference log-prob of the gold token (DiPO mask=gold)
- ``topk_ids``      [N, S, K] the K most probable reference tokens (int32)
- ``topk_logp``     [N, S, K] their log-probs (float16)
- ``lse``           [N, S]    the log-sum-exp of the raw logits (to rebuild raw logits)
and, optionally, the same tensors minus ``idk_seq_logp`` for the retain rows (``retain_loss: kl``).

Why the key hashes token ids rather than the strings and the template: the
cached values are a function of the ids the reference sees, so any change to
the encoding (template, strip, leading space, EOS, truncation) changes the key,
whatever part of :mod:`.models.formatting` it comes from.

Why precision is in the key: at theta = ref the policy's forward must give the
reference's numbers, or DiPO's Delta and NPO's log-ratio start away from 0. The
policy runs under ``accelerate``'s autocast (bf16 on a GPU), so the reference
pass runs under the same autocast (see ``docs/dipo.md``, "Reference precision").

Integrity: the safetensors metadata carries the key and a sha256 of every
tensor's bytes, and the tensor names, shapes and dtypes are checked against the
schema above; a file that is truncated, corrupt, under the wrong key or with
the wrong tensors is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .io import atomic_write, stable_hash
from .precision import MIXED_PRECISIONS, Precision, autocast_context, resolve_precision  # noqa: F401 (re-exported)
from .models import formatting
from .models.formatting import IGNORE, Encoded
from .models.template import PLAIN, QAFormat
from .models.teacher_forced import teacher_forced_pass

log = logging.getLogger("unlearn.cache")
FORMAT_VERSION = 2


# --------------------------------------------------------------------------- identities
def tokenizer_hash(tokenizer) -> str:
    """Identity of a tokenizer: its full serialised vocabulary/merges plus special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256((blob + json.dumps(specials)).encode()).hexdigest()


def model_hash(model_dir: str | Path) -> str:
    """Identity of a saved reference model: its weight files AND its ``config.json``.

    The weights alone are not enough: the config decides how they are used
    (``rope_theta``, ``rms_norm_eps``, tied embeddings, ...), so two directories
    with the same weights and different configs give different log-probs.
    The config is hashed as parsed JSON with sorted keys, so a re-serialisation
    that changes no value keeps the key.
    """
    from .models.build import weights_hash

    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no config.json in {model_dir}: not a saved model directory (save_pretrained layout)")
    config = json.loads(cfg_file.read_text(encoding="utf-8"))
    return stable_hash({"weights": weights_hash(model_dir), "config": config})


def encoding_hash(rows: Sequence[Encoded]) -> str:
    """sha256 over the ``input_ids`` and ``labels`` of every encoded row, in order.

    Each list is length-prefixed so that row boundaries are part of the hash.
    """
    h = hashlib.sha256()
    h.update(str(len(rows)).encode())
    for e in rows:
        for ids in (e.input_ids, e.labels):
            h.update(len(ids).to_bytes(4, "little"))
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def idk_answers(n: int, refusals: Sequence[str], seed: int) -> list[str]:
    """The refusal paired with each forget row (fixed by the seed so the cache can hold its log-prob)."""
    if not refusals:
        raise ValueError("the refusal list (idk) is empty: DPO-IdK needs at least one 'I don't know' answer")
    rng = random.Random(seed)
    return [rng.choice(list(refusals)) for _ in range(n)]


def cache_key(
    *, model_hash: str, tok_hash: str, encoded: Sequence[Encoded], max_length: int, top_k: int, part: str,
    dtype: torch.dtype | str, device_type: str, mixed_precision: str, idk_encoded: Sequence[Encoded] = (),
) -> str:
    """sha256 over every input the cached tensors depend on; any change gives a new key.

    ``encoded`` (and ``idk_encoded`` for the forget part's refusals) are the
    rows exactly as the reference sees them; ``dtype`` is the reference's
    parameter dtype, ``device_type``/``mixed_precision`` where and how its
    forward ran.
    """
    return stable_hash(
        {
            "v": FORMAT_VERSION, "part": part, "model": model_hash, "tokenizer": tok_hash,
            "max_length": max_length, "top_k": top_k, "rows": encoding_hash(encoded),
            "idk_rows": encoding_hash(idk_encoded), "dtype": str(dtype), "device_type": device_type,
            "mixed_precision": mixed_precision,
        }
    )


# --------------------------------------------------------------------------- storage
def expected_schema(part: str, n: int, max_length: int, top_k: int, with_idk: bool = True,
                    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a ``part`` ("forget" | "retain") cache file must hold, and no other.

    ``with_idk``: the forget part holds the refusal answers' log-probs (a benchmark without refusals has none)."""
    if part not in ("forget", "retain"):
        raise ValueError(f"part must be 'forget' or 'retain', got {part!r}")
    S = max_length - 1
    schema = {
        "seq_logp": ((n,), torch.float32),
        "label_logp": ((n, S), torch.float32),
        "topk_ids": ((n, S, top_k), torch.int32),
        "topk_logp": ((n, S, top_k), torch.float16),
        "lse": ((n, S), torch.float32),
    }
    if part == "forget" and with_idk:
        schema["idk_seq_logp"] = ((n,), torch.float32)
    return schema


def schema_problems(
    tensors: dict[str, torch.Tensor], schema: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> list[str]:
    """What is wrong with ``tensors`` against ``schema`` (missing/extra names, shapes, dtypes); empty if nothing."""
    problems = [f"missing {name}" for name in schema if name not in tensors]
    problems += [f"unexpected {name}" for name in tensors if name not in schema]
    for name, (shape, dtype) in schema.items():
        t = tensors.get(name)
        if t is None:
            continue
        if tuple(t.shape) != shape:
            problems.append(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
        if t.dtype != dtype:
            problems.append(f"{name} has dtype {t.dtype}, expected {dtype}")
    return problems


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

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"key": key, "sha256": _digest(tensors)}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=meta))


def load_tensors(
    path: Path, key: str, schema: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
) -> dict[str, torch.Tensor] | None:
    """The tensors if the file is intact, belongs to ``key`` and matches ``schema``; None (with a warning) otherwise.

    The digest only proves the bytes are the ones written; the schema check
    catches a file written by other code (or an older format) under the same
    key, which would otherwise fail later as a KeyError or a shape error mid-run.
    """
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
    if schema is not None:
        problems = schema_problems(tensors, schema)
        if problems:
            log.warning("reference cache %s does not have the expected tensors (%s): rebuilding", path,
                        "; ".join(problems))
            return None
    return tensors


# --------------------------------------------------------------------------- the reference pass
@torch.no_grad()
def reference_pass(
    model, tokenizer, questions: Sequence[str] | None = None, answers: Sequence[str] | None = None, *,
    max_length: int, top_k: int, batch_size: int = 32, with_topk: bool = True, desc: str = "reference",
    encoded: Sequence[Encoded] | None = None, device: torch.device | str = "cpu", mixed_precision: str = "no",
    fmt: QAFormat = PLAIN,
) -> dict[str, torch.Tensor]:
    """One batched forward pass of the reference model over (question, answer) rows (or pre-``encoded`` rows).

    The pass is the shared :func:`~unlearn.models.teacher_forced.teacher_forced_pass`
    (the one scoring and evaluation use). The model is moved to ``device`` and its forward runs under
    :func:`autocast_context` (what accelerate does to the policy's forward), so
    with ``mixed_precision`` set to the training run's, the cached numbers are
    the ones the policy computes at theta = ref. Everything after the logits
    (log-softmax, top-K) is float32, as in the losses.
    """
    if encoded is None:
        if questions is None or answers is None:
            raise ValueError("reference_pass needs questions and answers, or encoded rows")
        encoded = formatting.encode_many(tokenizer, questions, answers, max_length, fmt=fmt)
    dev = torch.device(device)
    model.to(dev)
    enc = list(encoded)
    S = max_length - 1
    n = len(enc)
    out = {"seq_logp": torch.zeros(n), "label_logp": torch.zeros(n, S)}
    if with_topk:
        out.update(
            topk_ids=torch.zeros(n, S, top_k, dtype=torch.int32),
            topk_logp=torch.full((n, S, top_k), -1e4, dtype=torch.float16),
            lse=torch.zeros(n, S),
        )
    # Input order (by_length=False): the order every stored cache file was computed in.
    for b in teacher_forced_pass(model, enc, pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=dev,
                                 mixed_precision=mixed_precision, by_length=False, progress=True, desc=desc):
        lg, lb, mask = b.logits.float()[:, :-1], b.next_labels, b.answer_mask
        w, rows = lg.size(1), b.index
        lse = torch.logsumexp(lg, dim=-1)
        logp = lg - lse.unsqueeze(-1)
        lab = logp.gather(-1, lb.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1) * mask
        out["label_logp"][rows, :w] = lab.cpu()
        out["seq_logp"][rows] = lab.sum(-1).cpu()
        if with_topk:
            k = min(top_k, lg.size(-1))
            vals, ids = logp.topk(k, dim=-1)
            out["topk_ids"][rows, :w, :k] = ids.int().cpu()
            out["topk_logp"][rows, :w, :k] = vals.half().cpu()
            out["lse"][rows, :w] = lse.cpu()
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
            **({"idk_seq_logp": f["idk_seq_logp"][fi]} if "idk_seq_logp" in f else {}),
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
    model=None, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", mixed_precision: str = "no",
    encoded=None, fmt: QAFormat = PLAIN,
) -> ReferenceCache:
    """Load the cache for these inputs, or compute and store it (loading the reference model only then).

    ``encoded`` (:class:`unlearn.benchmark.EncodedInputs`): the examples as the
    benchmark encodes them (MUSE: text chunks); without it the rows are QA pairs,
    encoded here with their refusals in the format ``fmt``. The key is the encoded ids either way, so the
    format (``model.template``) is in it.

    ``dtype`` is the reference's parameter dtype (default: ``model``'s, else
    float32, what ``load_model`` gives); ``device`` and ``mixed_precision``
    ("no" | "bf16" | "fp16") say where and under which autocast the reference
    forward runs. Pass the training run's (``resolve_precision`` gives them) so
    that Delta and the NPO log-ratio are 0 at theta = ref. All three are in the key.
    """
    from .models.build import load_model

    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {mixed_precision!r}")
    if model is not None:
        model_dtype = next(model.parameters()).dtype
        if dtype is not None and dtype != model_dtype:
            raise ValueError(f"dtype={dtype} but the reference model given has {model_dtype} parameters")
        dtype = model_dtype
    dtype = dtype or torch.float32
    dev = torch.device(device)
    cache_dir = Path(cache_dir)
    mh, th = model_hash(model_dir), tokenizer_hash(tokenizer)
    common = dict(model_hash=mh, tok_hash=th, max_length=max_length, top_k=top_k, dtype=dtype,
                  device_type=dev.type, mixed_precision=mixed_precision)
    if encoded is not None:
        enc_f, enc_r, enc_i = list(encoded.forget), list(encoded.retain), list(encoded.idk)
    else:
        fq = [r["question"] for r in forget_rows]
        enc_f = formatting.encode_many(tokenizer, fq, [r["answer"] for r in forget_rows], max_length, fmt=fmt)
        enc_i = formatting.encode_many(tokenizer, fq, idk_answers(len(forget_rows), refusals, seed), max_length, fmt=fmt)
        enc_r = formatting.encode_many(tokenizer, [r["question"] for r in retain_rows],
                                       [r["answer"] for r in retain_rows], max_length, fmt=fmt) if with_retain else []
    parts = [("forget", cache_key(encoded=enc_f, idk_encoded=enc_i, part="forget", **common), enc_f)]
    if with_retain:
        parts.append(("retain", cache_key(encoded=enc_r, part="retain", **common), enc_r))
    run = dict(max_length=max_length, top_k=top_k, batch_size=batch_size, device=dev, mixed_precision=mixed_precision)
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    paths = []
    for part, key, enc in parts:
        path = cache_dir / f"{part}-{key[:24]}.safetensors"
        paths.append(path)
        tensors = load_tensors(path, key, expected_schema(part, len(enc), max_length, top_k, with_idk=bool(enc_i)))
        if tensors is None:
            if model is None:
                model = load_model(model_dir, dtype=dtype)
            log.info("computing reference %s cache (%d rows, %s, %s, mixed precision %s) -> %s", part, len(enc),
                     dtype, dev.type, mixed_precision, path)
            tensors = reference_pass(model, tokenizer, encoded=enc, desc=f"reference {part}", **run)
            if part == "forget" and enc_i:
                idk_t = reference_pass(model, tokenizer, encoded=enc_i, with_topk=False, desc="reference idk", **run)
                tensors["idk_seq_logp"] = idk_t["seq_logp"]
            save_tensors(path, tensors, key)
        loaded[part] = tensors
    return ReferenceCache(forget=loaded["forget"], retain=loaded.get("retain"), paths=paths)


def reference_forward_parts(needs: frozenset[str]) -> tuple[str, ...]:
    """The batch parts a live reference runs a forward on for a method's ``needs`` (``Method.needs_for``).

    ``forget`` once for ``ref_seq`` and/or ``ref_topk`` (both come from the same
    logits), ``idk`` for ``ref_idk_seq``, ``retain`` for ``ref_retain_topk``.
    :class:`LiveReference` runs exactly these, and ``benchmarks/bench_unlearn.py``
    predicts the live/cache step-time ratio from them.
    """
    parts = []
    if needs & {"ref_seq", "ref_topk"}:
        parts.append("forget")
    if "ref_idk_seq" in needs:
        parts.append("idk")
    if "ref_retain_topk" in needs:
        parts.append("retain")
    return tuple(parts)


class LiveReference:
    """The same ``batch["ref"]`` dict computed by a live reference forward each step (no cache).

    ``top_k=None`` gives the exact full-vocabulary log-probs (``topk_ids=None``),
    against which the cached top-K approximation is measured.

    ``needs`` (``Method.needs_for(cfg)``) decides which forwards run, so that
    the live baseline costs what a live reference really costs for that method:
    the forget batch once if ``ref_seq`` or ``ref_topk`` is needed (one forward
    for both), the idk batch if ``ref_idk_seq``, the retain batch if
    ``ref_retain_topk``; only the keys of those needs are returned.
    ``needs=None`` runs a forward on every part the batch has (forget, idk,
    retain) and returns every key, for callers that want all reference quantities.

    ``mixed_precision`` ("auto" | "no" | "bf16" | "fp16") is the autocast the
    forward runs under, on the batch's device; "auto" is the training loop's
    rule (:func:`resolve_precision`), so the live reference matches the policy.
    """

    def __init__(self, model, top_k: int | None, needs: frozenset[str] | None = None, mixed_precision: str = "auto"):
        self.model = model.eval()
        self.top_k = top_k
        self.needs = None if needs is None else frozenset(needs)
        self.mixed_precision = mixed_precision
        for prm in self.model.parameters():
            prm.requires_grad_(False)

    @torch.no_grad()
    def _one(self, batch: dict, *, topk: bool = True) -> dict[str, torch.Tensor]:
        dev = batch["input_ids"].device
        if next(self.model.parameters()).device != dev:  # accelerate moved the batch (e.g. to a GPU)
            self.model.to(dev)
        mp = resolve_precision(dev, self.mixed_precision).mixed_precision
        with autocast_context(dev.type, mp):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lg, lb = logits.float()[:, :-1], batch["labels"][:, 1:]
        logp = torch.log_softmax(lg, -1)
        mask = lb != IGNORE
        lab = logp.gather(-1, lb.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1) * mask
        out = {"label_logp": lab, "seq_logp": lab.sum(-1)}
        if not topk:
            return out
        if self.top_k is None:
            return dict(out, topk_ids=None, topk_logp=logp)
        vals, ids = logp.topk(self.top_k, -1)
        return dict(out, topk_ids=ids, topk_logp=vals.half().float())

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        # needs=None: every reference quantity of every part the batch has.
        need = self.needs if self.needs is not None else frozenset(
            {"ref_seq", "ref_topk"} | ({"ref_idk_seq"} if "idk" in batch else set())
            | ({"ref_retain_topk"} if "retain" in batch else set()))
        parts = reference_forward_parts(need)
        ref: dict[str, torch.Tensor] = {}
        if "forget" in parts:
            f = self._one(batch["forget"], topk="ref_topk" in need)
            if "ref_seq" in need:
                ref["seq_logp"] = f["seq_logp"]
            if "ref_topk" in need:
                ref.update(topk_ids=f["topk_ids"], topk_logp=f["topk_logp"], label_logp=f["label_logp"])
        if "idk" in parts:
            ref["idk_seq_logp"] = self._one(batch["idk"], topk=False)["seq_logp"]
        if "retain" in parts:
            r = self._one(batch["retain"])
            ref.update(retain_topk_ids=r["topk_ids"], retain_topk_logp=r["topk_logp"], retain_label_logp=r["label_logp"])
        return ref
