"""Where and how a forward runs: the device and accelerate's ``mixed_precision``, decided by one rule.

The training loop (:mod:`unlearn.train`), the reference cache and the live reference
all take the pair from here, so that the reference's numbers are the policy's at
theta = ref (see docs/dipo.md, "Reference precision"). :func:`saved_dtype` is the
same rule's answer to the dtype a training stage saves its model in.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

MIXED_PRECISIONS = ("no", "bf16", "fp16")
_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision(NamedTuple):
    """Where and how a forward runs: the device and accelerate's ``mixed_precision`` ("no" | "bf16" | "fp16")."""

    device: torch.device
    mixed_precision: str


def resolve_precision(device: torch.device | str | None = None, mixed_precision: str | None = None) -> Precision:
    """The device and mixed precision the training loop uses, with ``None``/"auto" filled in by its rule.

    The one rule (``train.make_accelerator`` uses it too): a CUDA device if there is one, else
    the CPU; bf16 on a CUDA device that supports it, else no mixed precision. The
    reference cache is computed with the same pair, so that the reference's
    numbers are the policy's at theta = ref.
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    mp = mixed_precision
    if mp in (None, "auto"):
        mp = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if mp not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)} (or auto), got {mp!r}")
    if mp == "fp16" and dev.type == "cpu":
        raise ValueError("mixed_precision=fp16 needs a GPU: accelerate refuses fp16 on the CPU (use bf16 or no)")
    return Precision(dev, mp)


def autocast_context(device_type: str, mixed_precision: str):
    """The context accelerate wraps a prepared model's forward in (``get_mixed_precision_context_manager``).

    ``torch.autocast(device_type, dtype)`` with bf16/fp16, default autocast
    options; a no-op without mixed precision.
    """
    if mixed_precision == "no":
        return contextlib.nullcontext()
    if mixed_precision not in _AUTOCAST_DTYPE:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {mixed_precision!r}")
    return torch.autocast(device_type=device_type, dtype=_AUTOCAST_DTYPE[mixed_precision])


def saved_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype a training stage saves its model's weights in, for the mixed precision it trained under.

    bf16 training (a GPU run under the rule above) saves bfloat16 weights: half the disk of float32, and the
    precision the forwards ran in. Every other run (``no``: the CPU default; ``fp16``, whose range a saved
    float16 copy could overflow) saves float32, so CPU results are unchanged. The master weights the
    optimiser updated stay float32 in memory; ``save_model`` rounds them once, at the save.
    """
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {mixed_precision!r}")
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32
