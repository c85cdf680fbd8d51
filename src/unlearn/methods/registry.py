"""One adapter per unlearning method: the trainer never knows which method runs.

A method is a ``compute(model, batch, cfg) -> (loss, logs)`` function plus the
set of things it ``needs`` precomputed. Adding a method = one loss function in
:mod:`.losses` + one ``Method(...)`` line in ``METHODS`` below.

The batch passed to ``compute``:

* ``batch["forget"]``, ``batch["retain"]``, ``batch["idk"]``: dicts of
  ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` (right padded, HF
  labels). ``idk`` is row-aligned with ``forget`` (same questions, refusal answer).
* ``batch["ref"]``: only what ``needs`` asked for (keys per need in ``REF_KEYS``):
  ``seq_logp`` [B], ``idk_seq_logp`` [B], ``topk_ids`` [B, T-1, K] long or None,
  ``topk_logp`` [B, T-1, K] (full vocabulary [B, T-1, V] if ``topk_ids`` is None),
  ``label_logp`` [B, T-1], and ``retain_topk_ids`` / ``retain_topk_logp`` /
  ``retain_label_logp`` for the retain batch.

``needs`` is the static superset a method may use; :meth:`Method.needs_for`
trims it for a given config (no retain pass when ``alpha == 0``, no retain
top-K unless ``retain_loss == "kl"``, no reference cache for online DiPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import MethodCfg
from . import losses

NEEDS = frozenset({"ref_seq", "ref_idk_seq", "ref_topk", "ref_retain_topk", "retain", "idk"})

# Which batch["ref"] keys each need provides ("retain"/"idk" are batch parts, not ref keys).
REF_KEYS: dict[str, tuple[str, ...]] = {
    "ref_seq": ("seq_logp",),
    "ref_idk_seq": ("idk_seq_logp",),
    "ref_topk": ("topk_ids", "topk_logp", "label_logp"),
    "ref_retain_topk": ("retain_topk_ids", "retain_topk_logp", "retain_label_logp"),
}

Compute = Callable[[Any, dict, MethodCfg], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Method:
    name: str
    compute: Compute
    needs: frozenset[str]
    description: str = ""
    # Optional hook: further trim ``needs`` for a config (e.g. online DiPO drops the reference cache).
    refine: Callable[[frozenset[str], MethodCfg], frozenset[str]] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.needs) - NEEDS
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")

    def needs_for(self, cfg: MethodCfg) -> frozenset[str]:
        """What the cache/loader must provide for this config (a subset of ``needs``)."""
        n = set(self.needs)
        if cfg.alpha == 0:
            n -= {"retain", "ref_retain_topk"}
        if cfg.retain_loss != "kl":
            n.discard("ref_retain_topk")
        out = frozenset(n)
        return self.refine(out, cfg) if self.refine else out


# --------------------------------------------------------------------------- #
# Shared pieces
# --------------------------------------------------------------------------- #


def _logits(model, part: dict) -> torch.Tensor:
    return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits


def _ref(batch: dict, key: str, device: torch.device, *, optional: bool = False) -> torch.Tensor | None:
    ref = batch.get("ref") or {}
    if key not in ref:
        if optional:
            return None
        raise KeyError(f"batch['ref'][{key!r}] is missing: the method's needs must include the matching cache entry")
    t = ref[key]
    return None if t is None else t.to(device)


def _retain_term(model, batch: dict, cfg: MethodCfg) -> torch.Tensor | None:
    """``None`` when alpha == 0 (no forward pass); else NLL or KL(ref || policy) on the retain batch."""
    if cfg.alpha == 0:
        return None
    part = batch["retain"]
    logits = _logits(model, part)
    if cfg.retain_loss == "nll":
        return losses.nll_loss(logits, part["labels"], part.get("n_tokens"), chunk=cfg.loss_chunk)
    dev = logits.device
    return losses.kl_retain_loss(
        logits,
        part["labels"],
        _ref(batch, "retain_topk_ids", dev),
        _ref(batch, "retain_topk_logp", dev),
        _ref(batch, "retain_label_logp", dev, optional=True),
        n_tokens=part.get("n_tokens"),
        chunk=cfg.loss_chunk,
    )


def _finish(
    forget: torch.Tensor,
    retain: torch.Tensor | None,
    cfg: MethodCfg,
    forget_weight: float = 1.0,
    extra: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """loss = forget_weight * forget + alpha * retain, and the logs (one device sync)."""
    loss = forget_weight * forget
    named = {"forget_loss": forget}
    if retain is not None:
        loss = loss + cfg.alpha * retain
        named["retain_loss"] = retain
    named["loss"] = loss
    named.update(extra or {})
    values = torch.stack([v.detach().float().reshape(()) for v in named.values()]).tolist()
    return loss, dict(zip(named, values))


def _forget_seq_logp(model, batch: dict, cfg: MethodCfg) -> tuple[torch.Tensor, torch.Tensor]:
    part = batch["forget"]
    return losses.sequence_logp(_logits(model, part), part["labels"], cfg.loss_chunk)


# --------------------------------------------------------------------------- #
# Adapters
# --------------------------------------------------------------------------- #


def _rows(batch: dict) -> float | None:
    """Rows of the global forget batch (the loop's denominator; None outside the loop = local mean)."""
    return batch["forget"].get("n_rows")


def _ga(model, batch, cfg):
    part = batch["forget"]
    return _finish(losses.ga_loss(_logits(model, part), part["labels"], part.get("n_tokens"), cfg.loss_chunk), None, cfg)


def _graddiff(model, batch, cfg):
    part = batch["forget"]
    forget = losses.ga_loss(_logits(model, part), part["labels"], part.get("n_tokens"), cfg.loss_chunk)
    return _finish(forget, _retain_term(model, batch, cfg), cfg)


def _npo_forget(model, batch, cfg):
    pol, _ = _forget_seq_logp(model, batch, cfg)
    return losses.npo_loss(pol, _ref(batch, "seq_logp", pol.device), cfg.npo.beta, _rows(batch))


def _npo(model, batch, cfg):
    return _finish(_npo_forget(model, batch, cfg), None, cfg)


def _npo_rt(model, batch, cfg):
    return _finish(_npo_forget(model, batch, cfg), _retain_term(model, batch, cfg), cfg)


def _simnpo(model, batch, cfg):
    pol, n = _forget_seq_logp(model, batch, cfg)
    forget = losses.simnpo_loss(pol, n, cfg.simnpo.beta, cfg.simnpo.delta, _rows(batch))
    return _finish(forget, _retain_term(model, batch, cfg), cfg, forget_weight=cfg.simnpo.forget_weight)


def _dpo_idk(model, batch, cfg):
    idk = batch["idk"]
    pol_c, _ = losses.sequence_logp(_logits(model, idk), idk["labels"], cfg.loss_chunk)
    pol_r, _ = _forget_seq_logp(model, batch, cfg)
    dev = pol_r.device
    forget = losses.dpo_loss(
        pol_c, pol_r, _ref(batch, "idk_seq_logp", dev), _ref(batch, "seq_logp", dev), cfg.dpo.beta, _rows(batch)
    )
    return _finish(forget, _retain_term(model, batch, cfg), cfg)


def _undial(model, batch, cfg):
    part = batch["forget"]
    logits = _logits(model, part)
    dev = logits.device
    forget = losses.undial_loss(
        logits,
        part["labels"],
        _ref(batch, "topk_ids", dev),
        _ref(batch, "topk_logp", dev),
        cfg.undial.beta,
        _ref(batch, "label_logp", dev, optional=True),
        n_tokens=part.get("n_tokens"),
        chunk=cfg.loss_chunk,
    )
    return _finish(forget, _retain_term(model, batch, cfg), cfg)


def _dipo_forget_term(model, batch, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    part = batch["forget"]
    logits = _logits(model, part)
    d = cfg.dipo
    if d.reference == "online":
        ids, ref_logp, ref_label = None, None, None  # the detached policy, built chunk by chunk
    else:
        dev = logits.device
        ids = _ref(batch, "topk_ids", dev)
        ref_logp = _ref(batch, "topk_logp", dev)
        ref_label = _ref(batch, "label_logp", dev, optional=(d.mask != "gold" or ids is None))
    delta = losses.dipo_delta(
        logits, part["labels"], ids, ref_logp, k=d.k, gamma=d.gamma, beta=d.beta, mask=d.mask, ref_label_logp=ref_label,
        chunk=cfg.loss_chunk,
    )
    forget = losses.preference_loss(delta, d.beta, _rows(batch))
    return forget, {"dipo_delta": losses.batch_mean(delta, _rows(batch))}


def _dipo(model, batch, cfg):
    forget, extra = _dipo_forget_term(model, batch, cfg)
    return _finish(forget, _retain_term(model, batch, cfg), cfg, extra=extra)


def _dipo_forget(model, batch, cfg):
    forget, extra = _dipo_forget_term(model, batch, cfg)
    return _finish(forget, None, cfg, extra=extra)


def _dipo_refine(needs: frozenset[str], cfg: MethodCfg) -> frozenset[str]:
    return needs - {"ref_topk"} if cfg.dipo.reference == "online" else needs


_RETAIN = frozenset({"retain", "ref_retain_topk"})

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("ga", _ga, frozenset(), "gradient ascent on the forget answers"),
        Method("graddiff", _graddiff, _RETAIN, "GA + alpha * retain loss"),
        Method("npo", _npo, frozenset({"ref_seq"}), "NPO alone"),
        Method("npo_rt", _npo_rt, frozenset({"ref_seq"}) | _RETAIN, "NPO + alpha * retain loss (open-unlearning NPO)"),
        Method("simnpo", _simnpo, _RETAIN, "forget_weight * SimNPO + alpha * retain loss"),
        Method(
            "dpo_idk",
            _dpo_idk,
            frozenset({"ref_seq", "ref_idk_seq", "idk"}) | _RETAIN,
            "DPO: refusal preferred over the true answer, + alpha * retain loss",
        ),
        Method("undial", _undial, frozenset({"ref_topk"}) | _RETAIN, "UNDIAL self-distillation + alpha * retain loss"),
        Method(
            "dipo", _dipo, frozenset({"ref_topk"}) | _RETAIN, "DiPO + alpha * retain loss", refine=_dipo_refine
        ),
        Method("dipo_forget", _dipo_forget, frozenset({"ref_topk"}), "DiPO forget loss alone", refine=_dipo_refine),
    ]
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown unlearning method {name!r}; known methods: {', '.join(METHODS)}") from None
