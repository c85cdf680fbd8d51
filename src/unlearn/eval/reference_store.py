"""The retain model's reference truth ratios, computed once per (weights, forget rows, max_length, template).

Forget quality compares the evaluated model's per-example forget truth ratios
with a model trained only on the retain split. Those reference ratios depend
only on the retain model and the forget rows, so they are stored beside the
retain model (or in ``reference_dir``) under a content key and reused by every
evaluation; a stored file that does not match its key, rows or checksum is
recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from unlearn.config import EvalCfg
from unlearn.io import sha256_file, write_json
from unlearn.models.formatting import PROMPT_TEMPLATE, ensure_pad, format_answer

from .loading import load_eval_model
from .tofu_metrics import FORGET_ROLE, split_scores

log = logging.getLogger(__name__)

# Bump when anything that changes the stored retain-model truth ratios changes.
# 2: a cut answer keeps its EOS (encode_qa), which changes the scores of truncated rows.
REFERENCE_VERSION = 2
REFERENCE_DIRNAME = "eval_reference"
WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin", "*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a saved model (first glob pattern that matches wins)."""
    model_dir = Path(model_dir)
    for pat in WEIGHT_PATTERNS:
        found = sorted(p for p in model_dir.glob(pat) if p.is_file())
        if found:
            return found
    return []


def _canonical_rows(rows: Sequence[dict]) -> list[dict]:
    keys = ("id", "question", "answer", "paraphrased_answer", "perturbed_answer")
    return [{k: r.get(k) for k in keys} for r in rows]


def reference_key(retain_model_dir: str | Path, forget_rows: Sequence[dict], max_length: int) -> str:
    """sha256 over the retain model's weight (and tokenizer/config) file hashes, the
    forget rows, ``max_length``, the QA template and :data:`REFERENCE_VERSION`."""
    d = Path(retain_model_dir)
    weights = weight_files(d)
    if not weights:
        raise FileNotFoundError(f"{d}: no weight files ({', '.join(WEIGHT_PATTERNS)})")
    files = {p.name: sha256_file(p) for p in weights}
    files.update({name: sha256_file(d / name) for name in TOKENIZER_FILES if (d / name).is_file()})
    payload = {
        "version": REFERENCE_VERSION,
        "files": files,
        "rows": _canonical_rows(forget_rows),
        "max_length": int(max_length),
        "template": PROMPT_TEMPLATE,
        "answer_format": format_answer("x"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _values_checksum(values: list) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def _load_reference(path: Path, key: str, rows: Sequence[dict]) -> np.ndarray | None:
    """The stored truth ratios, or None (with a warning) if the file is missing or invalid in any way."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        vals = data["truth_ratios"]
        ok = (
            data.get("key") == key
            and isinstance(vals, list)
            and len(vals) == len(rows)
            and data.get("ids") == [r.get("id", i) for i, r in enumerate(rows)]
            and all(v is None or (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0) for v in vals)
            and data.get("checksum") == _values_checksum(vals)
        )
        if not ok:
            raise ValueError("content does not match its key, rows or checksum")
        return np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
    except Exception as e:  # noqa: BLE001 -- any defect means: recompute
        log.warning("ignoring corrupt retain reference %s (%s); recomputing", path, e)
        return None


def retain_reference(
    retain_model_dir: str | Path,
    splits: Mapping[str, Sequence[dict]],
    *,
    forget_split: str,
    max_length: int,
    cfg: EvalCfg,
    loader: Callable[[str | Path], tuple[Any, Any]] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    reference_dir: str | Path | None = None,
) -> np.ndarray:
    """The retain model's raw per-example forget truth ratios, computed once.

    Stored in ``<retain_model_dir>/eval_reference/<key>.json`` (key:
    :func:`reference_key`) and reused while the weights, the forget rows,
    ``max_length`` and the template are unchanged. A missing, unreadable or
    inconsistent file is recomputed (the model is only loaded then) and
    rewritten atomically. ``loader(dir) -> (model, tokenizer)`` defaults to
    :func:`unlearn.eval.loading.load_eval_model`. ``reference_dir`` overrides
    the storage folder (e.g. to keep a DVC-tracked model directory unmodified).
    """
    rows = list(splits[forget_split])
    key = reference_key(retain_model_dir, rows, max_length)
    folder = Path(reference_dir) if reference_dir is not None else Path(retain_model_dir) / REFERENCE_DIRNAME
    path = folder / f"{key}.json"
    cached = _load_reference(path, key, rows)
    if cached is not None:
        log.info("retain reference loaded from %s", path)
        return cached
    loader = loader or (lambda d: load_eval_model(d, device))
    model, tokenizer = loader(retain_model_dir)
    ensure_pad(tokenizer)
    sc = split_scores(model, tokenizer, rows, role=FORGET_ROLE, max_length=max_length, batch_size=cfg.batch_size,
                      device=device, progress=progress, desc=f"retain reference {forget_split}")
    tr = sc["truth_ratio"]
    vals = [None if math.isnan(v) else float(v) for v in tr]
    write_json(path, {
        "key": key,
        "version": REFERENCE_VERSION,
        "forget_split": forget_split,
        "max_length": int(max_length),
        "template": PROMPT_TEMPLATE,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ids": [r.get("id", i) for i, r in enumerate(rows)],
        "truth_ratios": vals,
        "checksum": _values_checksum(vals),
    })
    log.info("retain reference written to %s", path)
    return np.asarray(tr, dtype=np.float64)
