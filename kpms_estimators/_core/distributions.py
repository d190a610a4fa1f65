"""Exact samplers for the conjugate distributions the Gibbs sweep needs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular


def psd_cholesky(matrix: jax.Array, jitter: float = 1e-6) -> jax.Array:
    """Lower Cholesky factor of a symmetrised ``matrix`` plus ``jitter * I``."""
    sym = 0.5 * (matrix + jnp.swapaxes(matrix, -1, -2))
    eye = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
    return jnp.linalg.cholesky(sym + jitter * eye)


def psd_inv(matrix: jax.Array, jitter: float = 1e-6) -> jax.Array:
    """Inverse of a symmetric positive definite matrix through its Cholesky factor."""
    chol = psd_cholesky(matrix, jitter)
    eye = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
    chol_inv = solve_triangular(chol, eye, lower=True)
    return chol_inv.T @ chol_inv


#: Marsaglia-Tsang proposals drawn per gamma variate. For shape >= 1 each proposal is
#: accepted with probability > 0.95, so all of them are rejected with probability
#: below 0.05**16 < 2e-21 per variate (then the mode is returned; see below).
GAMMA_PROPOSALS = 16


def uniforms(key: jax.Array, *shapes: tuple[int, ...], dtype=None) -> list[jax.Array]:
    """Independent U(0, 1) arrays of the given shapes from ONE draw of ``key``.

    Values lie in [tiny, 1), so their logarithms are finite. Every sampler here
    draws its randomness through this single call: each ``jax.random`` call
    site costs about 0.1-0.2 s of XLA compile time, which dominates the compile
    time of a Gibbs sweep if draws are scattered.
    """
    dtype = dtype or jnp.zeros(()).dtype
    sizes = [math.prod(shape) for shape in shapes]
    flat = jax.random.uniform(key, (sum(sizes),), dtype, minval=jnp.finfo(dtype).tiny)
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


def normal_from_uniform(u: jax.Array) -> jax.Array:
    """Standard normal variates by inversion of the normal CDF."""
    return jax.scipy.special.ndtri(u)


def log_gamma_from_uniforms(u: jax.Array, shape_param: jax.Array) -> jax.Array:
    """log G with G ~ Gamma(shape_param, 1) from uniforms ``u`` of shape (2K+1, *shape_param.shape).

    Marsaglia-Tsang rejection for shape a + 1 (a < 1) or a (a >= 1) over K
    pre-drawn proposals (normal from ``u[:K]``, acceptance uniform from
    ``u[K:2K]``), keeping the first accepted one; then the boost
    log G(a) = log G(a + 1) + log(u[2K]) / a for a < 1, accurate for tiny shapes
    where G itself underflows. If all K proposals are rejected (probability
    < 2e-21 for K = 16) the mode's log, log(d), is returned: a truncation far below
    float64 resolution of any moment. Vectorised, loop-free and cheap to compile, unlike
    ``jax.random.gamma``'s per-element while loops.
    """
    num = (u.shape[0] - 1) // 2
    dtype = shape_param.dtype
    small = shape_param < 1.0
    a = jnp.where(small, shape_param + 1.0, shape_param)
    d = a - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)
    x = normal_from_uniform(u[:num].astype(dtype))
    v = (1.0 + c * x) ** 3
    safe_v = jnp.where(v > 0, v, 1.0)
    log_u = jnp.log(u[num : 2 * num].astype(dtype))
    accept = (v > 0) & (log_u < 0.5 * x**2 + d - d * safe_v + d * jnp.log(safe_v))
    first = jnp.argmax(accept, axis=0)
    chosen = jnp.take_along_axis(safe_v, first[None], axis=0)[0]
    log_value = jnp.log(d) + jnp.where(jnp.any(accept, axis=0), jnp.log(chosen), 0.0)
    log_boost = jnp.log(u[2 * num].astype(dtype))
    return jnp.where(small, log_value + log_boost / shape_param, log_value)


def sample_log_gamma(key: jax.Array, shape_param: jax.Array) -> jax.Array:
    """log G with G ~ Gamma(shape_param, 1), elementwise (see ``log_gamma_from_uniforms``)."""
    (u,) = uniforms(key, (2 * GAMMA_PROPOSALS + 1, *shape_param.shape), dtype=shape_param.dtype)
    return log_gamma_from_uniforms(u, shape_param)


def sample_gamma(key: jax.Array, shape_param: jax.Array) -> jax.Array:
    """G ~ Gamma(shape_param, 1), elementwise."""
    return jnp.exp(sample_log_gamma(key, shape_param))


def sample_log_dirichlet(key: jax.Array, concentration: jax.Array) -> jax.Array:
    """Log of a Dirichlet draw along the last axis, through log-gamma variates.

    Working in log space keeps tiny concentrations (``alpha * beta`` with a large
    ``kappa``) from underflowing to exact zeros (model spec 12.3).
    """
    log_gammas = sample_log_gamma(key, concentration)
    return log_gammas - jax.nn.logsumexp(log_gammas, axis=-1, keepdims=True)


def _inv_wishart_factor(u_chi: jax.Array, u_norm: jax.Array, df: jax.Array, scale: jax.Array) -> jax.Array:
    dim = scale.shape[-1]
    shapes = (df - jnp.arange(dim, dtype=scale.dtype)) / 2.0
    chi = jnp.sqrt(2.0 * jnp.exp(log_gamma_from_uniforms(u_chi, shapes)))
    normals = normal_from_uniform(u_norm)
    bartlett = jnp.tril(normals, -1) + jnp.diag(chi)
    eye = jnp.eye(dim, dtype=scale.dtype)
    bartlett_inv = solve_triangular(bartlett, eye, lower=True)
    return psd_cholesky(scale) @ bartlett_inv.T


def sample_inv_wishart_factor(key: jax.Array, df: jax.Array, scale: jax.Array) -> jax.Array:
    """A square-root factor G of Q ~ InvWishart(df, scale), so that Q = G G^T.

    Bartlett: W = A A^T ~ Wishart(df, I) with A lower triangular, diagonal
    sqrt(chi2(df - i)) and standard normal entries below; W^{-1} ~ IW(df, I) and
    C W^{-1} C^T ~ IW(df, C C^T) for C = chol(scale).
    """
    dim = scale.shape[-1]
    u_chi, u_norm = uniforms(key, (2 * GAMMA_PROPOSALS + 1, dim), (dim, dim), dtype=scale.dtype)
    return _inv_wishart_factor(u_chi, u_norm, df, scale)


def sample_mniw(
    key: jax.Array, df: jax.Array, scale: jax.Array, mean: jax.Array, col_cov: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(B, Q) ~ MNIW: Q ~ IW(df, scale), B | Q ~ MatrixNormal(mean, row cov Q, col cov col_cov)."""
    dim = scale.shape[-1]
    u_chi, u_norm, u_coef = uniforms(
        key, (2 * GAMMA_PROPOSALS + 1, dim), (dim, dim), mean.shape, dtype=mean.dtype
    )
    factor = _inv_wishart_factor(u_chi, u_norm, df, scale)
    cov = factor @ factor.T
    cov = 0.5 * (cov + cov.T)
    coef = mean + factor @ normal_from_uniform(u_coef) @ psd_cholesky(col_cov).T
    return coef, cov
