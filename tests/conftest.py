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
