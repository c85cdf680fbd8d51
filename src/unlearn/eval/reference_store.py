"""The retain model's reference values, computed once per (weights, rows, max_length, template).

Forget quality compares the evaluated model's per-example forget truth ratios
with a model trained only on the retain split; privleak compares its Min-K%
membership AUC (forget vs holdout rows) with the retain model's. Those
reference values depend only on the retain model and the rows scored, so they
are stored beside the retain model (or in ``reference_dir``) under a content
key and reused by every evaluation; a stored file that does not match its key,
rows or checksum is recomputed, never used. Truth ratios are ``<key>.json``
(:func:`retain_reference`), membership AUCs ``mia-<key>.json``
(:func:`retain_mia_reference`; the retain model's own evaluation writes them,
:func:`store_mia_reference`).
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
from unlearn.models.formatting import ensure_pad
from unlearn.models.template import PLAIN, QAFormat

from .loading import load_eval_model
from .mia import ATTACKS
from .tofu_metrics import FORGET_ROLE, MIA_K, mia_aucs, mia_split_scores, split_scores

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


def _model_files(retain_model_dir: str | Path) -> dict[str, str]:
    """sha256 of each weight, tokenizer and config file of a saved model: its identity in every reference key."""
    d = Path(retain_model_dir)
    weights = weight_files(d)
    if not weights:
        raise FileNotFoundError(f"{d}: no weight files ({', '.join(WEIGHT_PATTERNS)})")
    files = {p.name: sha256_file(p) for p in weights}
    files.update({name: sha256_file(d / name) for name in TOKENIZER_FILES if (d / name).is_file()})
    return files


def reference_key(retain_model_dir: str | Path, forget_rows: Sequence[dict], max_length: int,
                  fmt: QAFormat = PLAIN) -> str:
    """sha256 over the retain model's weight (and tokenizer/config) file hashes, the
    forget rows, ``max_length``, the QA format (``fmt.key()``) and :data:`REFERENCE_VERSION`."""
    files = _model_files(retain_model_dir)
    payload = {
        "version": REFERENCE_VERSION,
        "files": files,
        "rows": _canonical_rows(forget_rows),
        "max_length": int(max_length),
        "format": fmt.key(),
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
    fmt: QAFormat = PLAIN,
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
    key = reference_key(retain_model_dir, rows, max_length, fmt)
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
                      device=device, progress=progress, desc=f"retain reference {forget_split}", fmt=fmt)
    tr = sc["truth_ratio"]
    vals = [None if math.isnan(v) else float(v) for v in tr]
    write_json(path, {
        "key": key,
        "version": REFERENCE_VERSION,
        "forget_split": forget_split,
        "max_length": int(max_length),
        "format": fmt.describe(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ids": [r.get("id", i) for i, r in enumerate(rows)],
        "truth_ratios": vals,
        "checksum": _values_checksum(vals),
    })
    log.info("retain reference written to %s", path)
    return np.asarray(tr, dtype=np.float64)


# --------------------------------------------------------------------------- membership-inference AUCs (privleak)

# Bump when anything that changes the stored retain-model AUCs changes (the attacks, which tokens they score).
MIA_REFERENCE_VERSION = 1


def _mia_rows(rows: Sequence[dict]) -> list[dict]:
    return [{k: r.get(k) for k in ("id", "question", "answer")} for r in rows]


def mia_reference_key(retain_model_dir: str | Path, forget_rows: Sequence[dict], holdout_rows: Sequence[dict],
                      max_length: int, k: float = MIA_K, fmt: QAFormat = PLAIN) -> str:
    """sha256 over everything the retain model's membership AUCs depend on: its weight, tokenizer and config
    files, the forget and the holdout rows (id, question, answer), ``max_length``, the QA format, the attacks,
    Min-K%'s ``k`` and :data:`MIA_REFERENCE_VERSION`."""
    payload = {
        "kind": "mia",
        "version": MIA_REFERENCE_VERSION,
        "files": _model_files(retain_model_dir),
        "forget": _mia_rows(forget_rows),
        "holdout": _mia_rows(holdout_rows),
        "max_length": int(max_length),
        "format": fmt.key(),
        "attacks": list(ATTACKS),
        "k": float(k),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def mia_reference_path(folder: str | Path, key: str) -> Path:
    return Path(folder) / f"mia-{key}.json"


def _load_mia_reference(path: Path, key: str, forget_rows: Sequence[dict],
                        holdout_rows: Sequence[dict]) -> dict[str, float | None] | None:
    """The stored AUCs, or None (with a warning) if the file is missing or invalid in any way."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        aucs = data["aucs"]
        ok = (
            data.get("key") == key
            and isinstance(aucs, dict) and set(aucs) == set(ATTACKS)
            and all(v is None or (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1)
                    for v in aucs.values())
            and data.get("forget_ids") == [r.get("id", i) for i, r in enumerate(forget_rows)]
            and data.get("holdout_ids") == [r.get("id", i) for i, r in enumerate(holdout_rows)]
            and data.get("checksum") == _values_checksum([aucs[a] for a in ATTACKS])
        )
        if not ok:
            raise ValueError("content does not match its key, rows or checksum")
        return {a: None if aucs[a] is None else float(aucs[a]) for a in ATTACKS}
    except Exception as e:  # noqa: BLE001 -- any defect means: recompute
        log.warning("ignoring corrupt retain MIA reference %s (%s); recomputing", path, e)
        return None


def store_mia_reference(
    retain_model_dir: str | Path,
    splits: Mapping[str, Sequence[dict]],
    aucs: Mapping[str, float | None],
    *,
    forget_split: str,
    holdout_split: str,
    max_length: int,
    reference_dir: str | Path | None = None,
    fmt: QAFormat = PLAIN,
) -> Path:
    """Write the retain model's membership AUCs (``{attack: AUC}``, as its own evaluation computed them)
    under their key (atomically); every later evaluation's privleak reads them back."""
    forget, holdout = list(splits[forget_split]), list(splits[holdout_split])
    key = mia_reference_key(retain_model_dir, forget, holdout, max_length, fmt=fmt)
    folder = Path(reference_dir) if reference_dir is not None else Path(retain_model_dir) / REFERENCE_DIRNAME
    return _write_mia_reference(mia_reference_path(folder, key), key, aucs, forget, holdout, forget_split=forget_split,
                                holdout_split=holdout_split, max_length=max_length, fmt=fmt)


def _write_mia_reference(path: Path, key: str, aucs: Mapping[str, float | None], forget: Sequence[dict],
                         holdout: Sequence[dict], *, forget_split: str, holdout_split: str, max_length: int,
                         fmt: QAFormat) -> Path:
    vals = {a: None if aucs.get(a) is None else float(aucs[a]) for a in ATTACKS}
    write_json(path, {
        "key": key,
        "kind": "mia",
        "version": MIA_REFERENCE_VERSION,
        "forget_split": forget_split,
        "holdout_split": holdout_split,
        "max_length": int(max_length),
        "k": MIA_K,
        "format": fmt.describe(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "forget_ids": [r.get("id", i) for i, r in enumerate(forget)],
        "holdout_ids": [r.get("id", i) for i, r in enumerate(holdout)],
        "aucs": vals,
        "checksum": _values_checksum([vals[a] for a in ATTACKS]),
    })
    log.info("retain MIA reference written to %s", path)
    return path


def retain_mia_reference(
    retain_model_dir: str | Path,
    splits: Mapping[str, Sequence[dict]],
    *,
    forget_split: str,
    holdout_split: str,
    max_length: int,
    cfg: EvalCfg,
    loader: Callable[[str | Path], tuple[Any, Any]] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    reference_dir: str | Path | None = None,
    fmt: QAFormat = PLAIN,
) -> dict[str, float | None]:
    """The retain model's membership AUCs, forget vs holdout rows (``{attack: AUC}``), computed once.

    Stored in ``<retain_model_dir>/eval_reference/mia-<key>.json`` (key:
    :func:`mia_reference_key`), normally by the retain model's own evaluation
    (:func:`store_mia_reference`); when missing, unreadable or inconsistent the
    retain model is loaded (``loader(dir) -> (model, tokenizer)``), scored exactly
    as an evaluation scores (:func:`unlearn.eval.tofu_metrics.mia_split_scores`)
    and the file written. ``reference_dir`` overrides the storage folder.
    """
    forget, holdout = list(splits[forget_split]), list(splits[holdout_split])
    key = mia_reference_key(retain_model_dir, forget, holdout, max_length, fmt=fmt)
    folder = Path(reference_dir) if reference_dir is not None else Path(retain_model_dir) / REFERENCE_DIRNAME
    cached = _load_mia_reference(mia_reference_path(folder, key), key, forget, holdout)
    if cached is not None:
        log.info("retain MIA reference loaded from %s", mia_reference_path(folder, key))
        return cached
    loader = loader or (lambda d: load_eval_model(d, device))
    model, tokenizer = loader(retain_model_dir)
    ensure_pad(tokenizer)
    kw = dict(max_length=max_length, batch_size=cfg.batch_size, device=device, progress=progress)
    aucs = mia_aucs(mia_split_scores(model, tokenizer, forget, desc=f"retain MIA {forget_split}", fmt=fmt, **kw),
                    mia_split_scores(model, tokenizer, holdout, desc=f"retain MIA {holdout_split}", fmt=fmt, **kw))
    _write_mia_reference(mia_reference_path(folder, key), key, aucs, forget, holdout, forget_split=forget_split,
                         holdout_split=holdout_split, max_length=max_length, fmt=fmt)
    return aucs
