"""LoRA adapters (``peft``) and gradient checkpointing: how a stage makes a big model trainable in less memory.

* :func:`wrap` puts a LoRA adapter (``finetune.lora`` / ``method.lora``) on a model and freezes every base
  weight: the optimiser (``train.train_loop`` builds it over the parameters that require a gradient) then holds
  the adapter's state only, and so do the loop's checkpoints (frozen parameters are not checkpointed: the stage
  rebuilds them from the starting model).
* :func:`merge` folds the trained adapter into the base weights (``merge_and_unload``) and returns the merged
  model with a writer of the adapter: the stage saves the merged model (what evaluation, the cache and
  registration read, a plain ``save_pretrained`` directory) with the adapter beside it in ``<out>/adapter``
  (``PeftModel.from_pretrained(base, <out>/adapter)`` applies it to the base again).
* :func:`enable_gradient_checkpointing` is the one switch of the ``gradient_checkpointing`` knobs.

For unlearning the frozen base IS the target, the reference of every method, so the reference cache computed
on the target stays exact for a LoRA run, and a live reference (``--reference live``/``exact``) needs no second
copy of the target: :class:`FrozenBase` runs the trained model itself with its adapter disabled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..config import LoraCfg

ADAPTER_DIR = "adapter"  # <model dir>/adapter: adapter_config.json + adapter_model.safetensors


def is_lora(model) -> bool:
    """True for a ``peft`` model (an adapter is attached)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def target_modules(cfg: LoraCfg) -> str | list[str]:
    """``all-linear`` as peft spells it, else the comma-separated names as a list."""
    names = [n.strip() for n in cfg.target_modules.split(",") if n.strip()]
    if not names:
        raise ValueError("lora.target_modules is empty: name the modules (q_proj,v_proj) or say all-linear")
    return "all-linear" if names == ["all-linear"] else names


def wrap(model, cfg: LoraCfg, seed: int = 0):
    """``model`` with a fresh LoRA adapter (A random, seeded; B = 0, so the wrapped model starts as ``model``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the adapter's initial A: part of the run, like the model's own init
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=target_modules(cfg), bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module the model does not have
        raise ValueError(f"lora.target_modules={cfg.target_modules!r}: {e}") from None


def maybe_wrap(model, cfg: LoraCfg, seed: int = 0):
    """:func:`wrap` when ``cfg.enabled``, else ``model`` unchanged."""
    return wrap(model, cfg, seed) if cfg.enabled else model


def merge(model) -> tuple[torch.nn.Module, Callable[[Path], None] | None]:
    """The model to save and a writer of its adapter (``None`` without one).

    With an adapter: the adapter's weights and config are taken first, then the adapter is merged into the
    base (``merge_and_unload``: a plain ``PreTrainedModel`` again, whose logits are the adapter-applied
    model's up to float rounding). The writer puts ``adapter_config.json`` and ``adapter_model.safetensors``
    into the directory it is given.
    """
    if not is_lora(model):
        return model, None
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    config = model.peft_config["default"]
    merged = model.merge_and_unload()

    def write(directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(directory))
        save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})

    return merged, write


def load_adapted(base_dir: str | Path, adapter_dir: str | Path):
    """The base model at ``base_dir`` with the adapter at ``adapter_dir`` applied (not merged), in eval mode."""
    from peft import PeftModel

    from .build import load_model

    model = PeftModel.from_pretrained(load_model(base_dir), str(adapter_dir))
    model.eval()
    return model


class FrozenBase:
    """The frozen base of a ``peft`` model as a reference model: the same module, run with the adapter disabled.

    What :class:`unlearn.cache.LiveReference` needs of a model, without a second copy of the target in memory:
    a call runs ``model(**inputs)`` inside peft's ``disable_adapter()`` (every LoRA layer returns its base
    layer's output: the target's numbers exactly, whatever the adapter has learnt) and in eval mode, the
    model's training mode restored afterwards (the loop keeps training it). ``eval`` and ``to`` leave the
    trained model alone (accelerate places it); ``parameters`` yields the frozen base weights only, so freezing
    them (``LiveReference`` does) never freezes the adapter. The model is read at each call, so a model the
    loop shards or moves in place is still the one run.
    """

    def __init__(self, model):
        if not is_lora(model):
            raise TypeError("FrozenBase needs a peft model (an adapter to disable)")
        self.model = model

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self

    def parameters(self):
        return (p for p in self.model.parameters() if not p.requires_grad)

    def __call__(self, *args, **kwargs):
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.model(*args, **kwargs)
        finally:
            self.model.train(was_training)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass (Hugging Face's own checkpointing).

    Non-reentrant checkpointing, so the frozen embeddings of a LoRA model need no ``requires_grad`` trick, and
    the gradients are those of the plain backward pass. It acts in training mode only (no KV cache is built
    there: the training forwards pass no ``past_key_values``) and changes nothing that is saved.
    """
    target = model.get_base_model() if is_lora(model) else model
    enable = getattr(target, "activation_checkpointing_enable", None)  # transformers >= 5.x; the older name before
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
