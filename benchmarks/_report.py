"""Shared output of the benchmark scripts: environment fields, printing, optional JSON file."""

from __future__ import annotations

import json
import platform

import jax


def report(result: dict, json_path: str | None) -> None:
    """Add jax version, backend and machine to ``result``, print it, and write it to ``json_path``."""
    result = {**result, "jax": jax.__version__, "backend": jax.default_backend(), "machine": platform.platform()}
    print(json.dumps(result, indent=2))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=2)
