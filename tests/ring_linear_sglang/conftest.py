"""Fixtures for the SGLang adapter tests (they need SGLang; CI runs them in one venv per release).

SGLang's launcher-side code (config parsing, server-argument resolution) runs on a CPU-only machine when the
device is given as "cpu"; nothing here imports SGLang's GPU kernels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

RELEASED_CONFIG = Path(__file__).parents[1] / "data" / "ring-mini-linear-2.0.config.json"


@pytest.fixture(scope="session")
def sglang_registered():
    """SGLang imported and the adapter registered, as SGLang's plugin loader would."""
    pytest.importorskip("sglang")
    import ring_linear_sglang

    ring_linear_sglang.register()
    return ring_linear_sglang


@pytest.fixture(scope="session")
def released_dir(tmp_path_factory) -> Path:
    """A folder holding only the released Ring-mini-linear-2.0 `config.json` (no remote code, no weights)."""
    path = tmp_path_factory.mktemp("ring-mini")
    shutil.copy(RELEASED_CONFIG, path / "config.json")
    return path
