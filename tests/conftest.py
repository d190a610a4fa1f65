"""Test configuration: JAX's persistent compilation cache, memory maps of compiled programs, shared paths."""

from __future__ import annotations

import gc
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


#: Each XLA:CPU executable holds memory maps (one KeypointSLDS fit + predict: ~3000, measured with
#: /proc/self/maps), and they are only released with the compiled program. One pytest process running the
#: whole suite reached 50690 maps by the middle of the suite; past vm.max_map_count (65530 by default)
#: the process aborts inside XLA (the CI failure of 2026-11-26: SIGABRT while serializing an executable).
MAX_MAPS = 30_000


def _map_count() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: nothing to watch
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """After a test, drop JAX's compiled programs if this process holds more than MAX_MAPS memory maps.

    ``jax.clear_caches()`` + ``gc.collect()`` gives the maps back (measured: 4510 -> 1546 after a fit);
    later tests recompile what they need.
    """
    yield
    if _map_count() > MAX_MAPS:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The shared real recordings; tests that need them skip where ../shared is absent."""
    if not SHARED_REAL.is_dir():
        pytest.skip(f"real recordings not found at {SHARED_REAL} (needs the shared/ folder beside the repo)")
    return SHARED_REAL
