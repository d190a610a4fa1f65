"""What differs between the jax releases this package supports (``jax>=0.6.2``, pyproject.toml).

keypoint-moseq 0.8.1 pins jax 0.6.2, so people switching from it often have that release
installed; newer releases renamed or moved a few things used here. Everything version
dependent goes through this module, and ``tests/test_compat.py`` runs on whichever jax is
installed (the suite was run on 0.6.2 and 0.10.2: docs/notes.md, "Supported jax releases").
"""

from __future__ import annotations

import jax


def enable_x64(on: bool = True):
    """Context manager that sets JAX's 64-bit mode for the current thread only.

    ``jax.enable_x64`` in newer releases, ``jax.experimental.enable_x64`` in jax 0.6 (the
    same thread-local configuration state under its older name).
    """
    manager = getattr(jax, "enable_x64", None)
    if manager is None:
        from jax.experimental import enable_x64 as manager  # jax 0.6
    return manager(on)
