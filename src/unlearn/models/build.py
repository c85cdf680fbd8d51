"""Tokenizer training and model building/loading.

The default model is a few-million-parameter ``LlamaForCausalLM`` trained from
scratch, so that exactly the code that runs offline here also runs on a real
Hugging Face checkpoint given by ``model.path`` (a local directory or hub id).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from ..config import ArchCfg
from ..io import sha256_file, stable_hash
from .formatting import ensure_pad

SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on the corpus, wrapped for ``AutoTokenizer``.

    Byte-level means every string round-trips (no unknown characters), and the
    post-processor prepends BOS like a Llama tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(SPECIAL["bos"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", pair=f"{SPECIAL['bos']} $A $B", special_tokens=[(SPECIAL["bos"], bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        model_max_length=4096,
    )


def build_model(arch: ArchCfg, tokenizer, seed: int):
    """A fresh ``LlamaForCausalLM`` from ``params.yaml``'s ``model.arch``, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rope_theta,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _hub_hint(path: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not load a model from {path!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        "model.path must be a local directory with config.json + weights (save_pretrained layout), "
        "or a hub id reachable from this machine (offline? set HF_HUB_OFFLINE=1 and use a local directory)."
    )


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with guidance
        raise _hub_hint(str(path), e) from None
    ensure_pad(tok)
    return tok


def load_model(path: str | Path, dtype: torch.dtype | None = None):
    """``AutoModelForCausalLM`` from a directory or hub id, in eval mode."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not p.exists() and (str(path).startswith((".", "/")) or os.sep in str(path) and not _looks_like_hub_id(str(path))):
        raise FileNotFoundError(f"model directory {path} does not exist (train it first: `unlearn finetune`)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    except Exception as e:  # noqa: BLE001
        raise _hub_hint(str(path), e) from None
    model.eval()
    return model


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith(".")


def save_model(model, tokenizer, out_dir: str | Path, adapter=None, dtype: torch.dtype | None = None) -> None:
    """``save_pretrained`` (safetensors) of model and tokenizer into ``out_dir``, atomically.

    ``dtype``: the dtype of the saved floating-point weights (``unlearn.precision.saved_dtype``: bfloat16 after
    bf16 training), with ``config.json``'s ``dtype`` to match; ``None`` or the model's own dtype saves it as it
    is. The model is cast for the save and cast back, so afterwards it holds exactly the saved (rounded) weights,
    what ``load_model`` reads back (as float32), and a summary computed on it is the saved model's.

    ``adapter``: a writer of the LoRA adapter the (merged) model was trained with
    (:func:`unlearn.models.lora.merge`); it writes into ``out_dir/adapter``, where a
    directory loader never looks (``load_model`` reads the merged weights).

    Written to a sibling temp directory and renamed, so an interrupted save never
    leaves a directory that looks like a model but is not one.
    """
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    own = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    cast = dtype is not None and own is not None and dtype != own
    try:
        # The parameters only: buffers (the rotary inv_freq, not saved) must not come back bf16-rounded.
        params = [p for p in model.parameters() if p.is_floating_point()] if cast else []
        for p in params:
            p.data = p.data.to(dtype)
        if cast:
            model.config.dtype = dtype  # config.json's dtype: the saved weights'
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            for p in params:
                p.data = p.data.to(own)
            if cast:
                model.config.dtype = own
        tokenizer.save_pretrained(tmp)
        if adapter is not None:
            from .lora import ADAPTER_DIR

            adapter(tmp / ADAPTER_DIR)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def weights_hash(model_dir: str | Path) -> str:
    """sha256 over the weight files of a saved model: its identity for caches and audit.

    A content address of the ``[name, sha256]`` pair of every ``*.safetensors``
    then ``*.bin`` file, so each file is streamed through :func:`unlearn.io.sha256_file`
    (the one chunked file hash) and a renamed shard still changes the identity.
    """
    files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    return stable_hash([[f.name, sha256_file(f)] for f in files])
