"""The version-dependent helpers of ``kpms_estimators._compat``, on whichever jax is installed.

The package declares ``jax>=0.6.2`` (the release keypoint-moseq 0.8.1 pins); the suite
was run on 0.6.2 and on the newest release available (docs/notes.md, "Supported jax releases").
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

from kpms_estimators._compat import enable_x64


def test_enable_x64_is_scoped_to_the_block_and_the_thread():
    outside = bool(jax.config.jax_enable_x64)
    seen = {}

    def other_thread():
        seen["dtype"] = jnp.asarray(np.float64(1.0)).dtype

    with enable_x64(True):
        assert jnp.asarray(np.float64(1.0)).dtype == jnp.float64
        assert jnp.zeros(2).dtype == jnp.float64
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        with enable_x64(False):
            assert jnp.asarray(np.float64(1.0)).dtype == jnp.float32
        assert jnp.asarray(np.float64(1.0)).dtype == jnp.float64
    assert bool(jax.config.jax_enable_x64) == outside
    # the other thread ran with the process's setting, not the block's
    assert seen["dtype"] == (jnp.float64 if outside else jnp.float32)
