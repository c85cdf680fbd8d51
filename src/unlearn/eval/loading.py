"""Load a saved model and its tokenizer for evaluation: on the evaluation device, in the evaluation dtype, eval mode.

Not :func:`unlearn.models.build.load_model` (one model, float32 by default, on
the CPU): evaluation also needs the tokenizer saved beside the model and puts
the model on the device it runs on, in bfloat16 on a GPU (TOFU-scale models fit
and generate faster; the metrics are probabilities, not training signals).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unlearn.models.build import load_model, load_tokenizer


def load_eval_model(model_dir: str | Path, device: torch.device | str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a saved directory (tokenizer saved beside the model), in eval mode.

    ``device`` defaults to CUDA when available, else the CPU; the model is bfloat16
    on CUDA and float32 otherwise.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    return model, tokenizer
