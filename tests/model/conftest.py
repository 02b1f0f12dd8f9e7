"""Model tests share the session's tiny checkpoint (tests/conftest.py writes it once)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint
