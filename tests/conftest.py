"""Test configuration: JAX's persistent compilation cache, shared paths."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = REPO.parent / "shared" / "data" / "real"

# Reuse compiled XLA executables across test runs (and across processes within one run).
jax.config.update("jax_compilation_cache_dir", os.environ.get("KPMS_JAX_CACHE", str(REPO / ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The shared real recordings; tests that need them skip where ../shared is absent."""
    if not SHARED_REAL.is_dir():
        pytest.skip(f"real recordings not found at {SHARED_REAL} (needs the shared/ folder beside the repo)")
    return SHARED_REAL
