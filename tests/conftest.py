"""Test configuration: JAX's persistent compilation cache, shared paths."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = REPO.parent / "shared" / "data" / "real"

# JAX's persistent compilation cache is opt-in (KPMS_JAX_CACHE=/some/dir): jaxlib 0.10.2 aborted the
# whole pytest process (SIGABRT inside executable.serialize() while writing a cache entry) in one CI run,
# and a fresh CI machine starts with an empty cache anyway.
JAX_CACHE = os.environ.get("KPMS_JAX_CACHE", "")
if JAX_CACHE:
    jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The shared real recordings; tests that need them skip where ../shared is absent."""
    if not SHARED_REAL.is_dir():
        pytest.skip(f"real recordings not found at {SHARED_REAL} (needs the shared/ folder beside the repo)")
    return SHARED_REAL
