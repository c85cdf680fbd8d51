"""Unlearning methods: pure losses (:mod:`.losses`) and one adapter per method (:mod:`.registry`)."""

from .losses import (
    Buckets,
    build_buckets,
    dipo_delta,
    dipo_forget_loss,
    dipo_online_loss,
    dpo_loss,
    ga_loss,
    kl_retain_loss,
    nll_loss,
    npo_loss,
    online_ref_logp,
    preference_loss,
    simnpo_loss,
    undial_loss,
)
from .registry import METHODS, NEEDS, REF_KEYS, Method, get_method

__all__ = [
    "Buckets",
    "METHODS",
    "Method",
    "NEEDS",
    "REF_KEYS",
    "build_buckets",
    "dipo_delta",
    "dipo_forget_loss",
    "dipo_online_loss",
    "dpo_loss",
    "ga_loss",
    "get_method",
    "kl_retain_loss",
    "nll_loss",
    "npo_loss",
    "online_ref_logp",
    "preference_loss",
    "simnpo_loss",
    "undial_loss",
]
