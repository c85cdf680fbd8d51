"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def shared_tofu_dir() -> Path:
    """The real TOFU files (``../shared/data/tofu`` next to the repo); skips the test when they are absent."""
    path = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tofu").resolve()
    if not (path / "full.json").is_file():
        pytest.skip(f"real TOFU files not found at {path} (see ../shared/data/SOURCES.md)")
    return path


# A tiny project, trained once per test session and shared by every test that needs a target to unlearn
# (distributed runs, launcher invariance, resume): 30 synthetic authors x 8 QA (forget10 = 3 authors = 24 rows),
# a 2-layer Llama of ~50k parameters. Tests copy what they write into their own directories.
TINY_PARAMS = """\
seed: 0
data:
  synthetic: {n_authors: 30, qa_per_author: 8}
model:
  max_length: 64
  tokenizer: {vocab_size: 512}
  arch: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 2,
         intermediate_size: 64, max_position_embeddings: 128}
finetune: {epochs: 4, batch_size: 16, lr: 0.01}
method: {name: dipo, epochs: 2, batch_size: 16, lr: 0.002, warmup_ratio: 0.25}
cache: {top_k: 16}
eval: {batch_size: 32, max_new_tokens: 12, generation_examples: 8, report_examples: 1}
"""


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A project directory with params.yaml, prepared splits, trained target + retain models and the DiPO cache."""
    import os

    from unlearn import stages
    from unlearn.config import load_params

    root = tmp_path_factory.mktemp("tiny_project")
    (root / "params.yaml").write_text(TINY_PARAMS)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        p = load_params("params.yaml")
        stages.prepare(p)
        stages.tokenizer(p)
        stages.finetune(p, "target")
        stages.finetune(p, "retain")
        stages.cache(p)
    finally:
        os.chdir(cwd)
    return root
