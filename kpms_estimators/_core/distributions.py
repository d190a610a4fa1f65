"""Exact samplers for the conjugate distributions the Gibbs sweep needs."""

from __future__ import annotations

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


def sample_log_gamma(key: jax.Array, shape_param: jax.Array) -> jax.Array:
    """log G with G ~ Gamma(shape_param, 1), elementwise; exact.

    Marsaglia-Tsang rejection sampling for shape a + 1 (a < 1) or a (a >= 1), run
    as one vectorised while-loop until every element has accepted (about 1.05
    proposals per element on average), then the boost log G(a) = log G(a + 1) +
    log(U) / a for a < 1, which stays accurate for tiny shapes where G itself
    underflows. Compiles far faster than ``jax.random.gamma``/``loggamma``, whose
    per-element loops cost seconds of XLA compile time each.
    """
    dtype = shape_param.dtype
    small = shape_param < 1.0
    a = jnp.where(small, shape_param + 1.0, shape_param)
    d = a - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)

    def propose(carry):
        key, done, log_value = carry
        key, k_norm, k_unif = jax.random.split(key, 3)
        x = jax.random.normal(k_norm, a.shape, dtype)
        v = (1.0 + c * x) ** 3
        log_u = jnp.log(jax.random.uniform(k_unif, a.shape, dtype))
        safe_v = jnp.where(v > 0, v, 1.0)
        accept = (v > 0) & (log_u < 0.5 * x**2 + d - d * safe_v + d * jnp.log(safe_v))
        new = accept & ~done
        log_value = jnp.where(new, jnp.log(d) + jnp.log(safe_v), log_value)
        return key, done | accept, log_value

    key, k_loop, k_boost = jax.random.split(key, 3)
    init = (k_loop, jnp.zeros(a.shape, bool), jnp.zeros(a.shape, dtype))
    _, _, log_value = jax.lax.while_loop(lambda carry: ~jnp.all(carry[1]), propose, init)
    log_u = jnp.log(jax.random.uniform(k_boost, a.shape, dtype, minval=jnp.finfo(dtype).tiny))
    return jnp.where(small, log_value + log_u / shape_param, log_value)


def sample_gamma(key: jax.Array, shape_param: jax.Array) -> jax.Array:
    """G ~ Gamma(shape_param, 1), elementwise (see ``sample_log_gamma``)."""
    return jnp.exp(sample_log_gamma(key, shape_param))


#: Support truncation of ``sample_poisson``; P(Poisson(60) > 160) < 1e-20.
POISSON_MAX_COUNT = 160


def sample_poisson(key: jax.Array, rate: jax.Array) -> jax.Array:
    """N ~ Poisson(rate) elementwise by inversion of the CDF, for rates up to about 60.

    Works with every PRNG implementation (``jax.random.poisson`` needs threefry)
    and compiles to a few vectorised ops. The support is truncated at
    ``POISSON_MAX_COUNT``, which loses less than 1e-20 of probability for the
    table-count tails it serves (rates of order alpha * log(frames)).
    """
    dtype = rate.dtype
    k = jnp.arange(POISSON_MAX_COUNT, dtype=dtype)
    safe_rate = jnp.maximum(rate, jnp.finfo(dtype).tiny)[..., None]
    log_pmf = k * jnp.log(safe_rate) - safe_rate - jax.scipy.special.gammaln(k + 1.0)
    cdf = jnp.cumsum(jnp.exp(log_pmf), axis=-1)
    u = jax.random.uniform(key, rate.shape, dtype)
    draws = jnp.sum(cdf < u[..., None], axis=-1)
    return jnp.where(rate > 0, draws, 0).astype(jnp.int32)


def sample_log_dirichlet(key: jax.Array, concentration: jax.Array) -> jax.Array:
    """Log of a Dirichlet draw along the last axis, through log-gamma variates.

    Working in log space keeps tiny concentrations (``alpha * beta`` with a large
    ``kappa``) from underflowing to exact zeros (model spec 12.3).
    """
    log_gammas = sample_log_gamma(key, concentration)
    return log_gammas - jax.nn.logsumexp(log_gammas, axis=-1, keepdims=True)


def sample_inv_wishart_factor(key: jax.Array, df: jax.Array, scale: jax.Array) -> jax.Array:
    """A square-root factor G of Q ~ InvWishart(df, scale), so that Q = G G^T.

    Bartlett: W = A A^T ~ Wishart(df, I) with A lower triangular, diagonal
    sqrt(chi2(df - i)) and standard normal entries below; W^{-1} ~ IW(df, I) and
    C W^{-1} C^T ~ IW(df, C C^T) for C = chol(scale).
    """
    dim = scale.shape[-1]
    k_chi, k_norm = jax.random.split(key)
    shapes = (df - jnp.arange(dim, dtype=scale.dtype)) / 2.0
    chi = jnp.sqrt(2.0 * sample_gamma(k_chi, shapes))
    normals = jax.random.normal(k_norm, (dim, dim), dtype=scale.dtype)
    bartlett = jnp.tril(normals, -1) + jnp.diag(chi)
    eye = jnp.eye(dim, dtype=scale.dtype)
    bartlett_inv = solve_triangular(bartlett, eye, lower=True)
    return psd_cholesky(scale) @ bartlett_inv.T


def sample_mniw(
    key: jax.Array, df: jax.Array, scale: jax.Array, mean: jax.Array, col_cov: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(B, Q) ~ MNIW: Q ~ IW(df, scale), B | Q ~ MatrixNormal(mean, row cov Q, col cov col_cov)."""
    k_q, k_b = jax.random.split(key)
    factor = sample_inv_wishart_factor(k_q, df, scale)
    cov = factor @ factor.T
    cov = 0.5 * (cov + cov.T)
    normals = jax.random.normal(k_b, mean.shape, dtype=mean.dtype)
    coef = mean + factor @ normals @ psd_cholesky(col_cov).T
    return coef, cov
