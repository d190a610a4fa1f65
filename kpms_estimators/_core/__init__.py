"""Functional JAX core: pure functions over NamedTuple pytrees with explicit PRNG keys.

Nothing here does I/O or keeps state; the estimators and the functional API call
these functions. See ``docs/`` and the model specification for the math.
"""
