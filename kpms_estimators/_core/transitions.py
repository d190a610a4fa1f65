"""Sticky HDP-HMM transitions in the weak limit (model spec 3.3, 3.4, 2.5).

beta ~ Dir(gamma/S), pi_j ~ Dir(alpha * beta + kappa * e_j). The beta conditional
uses Fox et al.'s auxiliary table counts, drawn inside JAX so that a whole Gibbs
sweep is one jitted function.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma

from .distributions import sample_log_dirichlet, sample_poisson

#: Bernoulli terms of a table count drawn exactly; the rest by a Poisson whose
#: total-variation error is below (alpha*beta)^2 * trigamma(b + EXACT_TABLE_TERMS).
EXACT_TABLE_TERMS = 64


class TransitionParams(NamedTuple):
    betas: jax.Array  # (S,) global state weights
    pi: jax.Array  # (S, S) transition matrix, rows sum to one


def transition_counts(z: jax.Array, mask: jax.Array, num_states: int) -> jax.Array:
    """n_jk = #{(b, t): z_{b,t-1} = j, z_{b,t} = k, mask_{b,t}} with the mask at the destination.

    z: (B, N) int labels; mask: (B, N) labels' frame mask.
    """
    src = z[:, :-1].reshape(-1)
    dst = z[:, 1:].reshape(-1)
    weight = mask[:, 1:].reshape(-1).astype(jnp.int32)
    flat = jax.ops.segment_sum(weight, src * num_states + dst, num_segments=num_states**2)
    return flat.reshape(num_states, num_states)


def sample_bernoulli_sum(
    key: jax.Array, numer: jax.Array, offset: jax.Array, counts: jax.Array
) -> jax.Array:
    """Draw sum_{i < n} Bernoulli(numer / (offset + i)), elementwise over arrays.

    The first ``EXACT_TABLE_TERMS`` terms are drawn exactly; the sum of the remaining
    terms (rare, tiny probabilities) is drawn as a Poisson with the same mean,
    numer * (digamma(offset + n) - digamma(offset + cap)).
    """
    k_exact, k_tail = jax.random.split(key)
    dtype = numer.dtype
    i = jnp.arange(EXACT_TABLE_TERMS, dtype=dtype)
    probs = numer[..., None] / (offset[..., None] + i)
    u = jax.random.uniform(k_exact, probs.shape, dtype=dtype)
    active = i < counts[..., None]
    exact = jnp.sum((u < probs) & active, axis=-1)
    has_tail = counts > EXACT_TABLE_TERMS
    safe_n = jnp.where(has_tail, counts, EXACT_TABLE_TERMS + 1).astype(dtype)
    tail_mean = numer * (digamma(offset + safe_n) - digamma(offset + EXACT_TABLE_TERMS))
    tail_mean = jnp.where(has_tail, jnp.maximum(tail_mean, 0.0), 0.0)
    tail = sample_poisson(k_tail, tail_mean)
    return exact.astype(jnp.int32) + jnp.where(has_tail, tail, 0)


def sample_table_counts(
    key: jax.Array, counts: jax.Array, betas: jax.Array, alpha, kappa
) -> jax.Array:
    """Override-corrected table counts mbar_jk (Fox et al. 2011; spec 3.4 steps 1-2).

    Off the diagonal m_jk = sum_{i<n_jk} Bern(ab_k / (ab_k + i)). On the diagonal the
    Binomial override thinning folds into the same form:
    mbar_jj = sum_{i<n_jj} Bern(ab_j / (ab_j + kappa + i)), with ab = alpha * beta.
    """
    num_states = betas.shape[0]
    ab = alpha * betas
    eye = jnp.eye(num_states, dtype=bool)
    numer = jnp.broadcast_to(ab[None, :], (num_states, num_states))
    offset = numer + jnp.where(eye, kappa, 0.0).astype(betas.dtype)
    return sample_bernoulli_sum(key, numer, offset, counts)


def sample_betas(key: jax.Array, table_counts: jax.Array, gamma, dtype) -> jax.Array:
    """beta | mbar ~ Dir(gamma/S + sum_j mbar_jk)."""
    num_states = table_counts.shape[0]
    conc = gamma / num_states + jnp.sum(table_counts, axis=0).astype(dtype)
    return jnp.exp(sample_log_dirichlet(key, conc))


def sample_pi(key: jax.Array, counts: jax.Array, betas: jax.Array, alpha, kappa) -> jax.Array:
    """pi_j | n, beta ~ Dir(n_j + alpha * beta + kappa * e_j), rows independent."""
    num_states = betas.shape[0]
    conc = counts.astype(betas.dtype) + alpha * betas[None, :] + kappa * jnp.eye(
        num_states, dtype=betas.dtype
    )
    return jnp.exp(sample_log_dirichlet(key, conc))


def resample_transitions(
    key: jax.Array, params: TransitionParams, counts: jax.Array, alpha, gamma, kappa
) -> TransitionParams:
    """One draw of (beta, pi) from their conditionals given transition counts n_jk."""
    k_m, k_beta, k_pi = jax.random.split(key, 3)
    table_counts = sample_table_counts(k_m, counts, params.betas, alpha, kappa)
    betas = sample_betas(k_beta, table_counts, gamma, params.betas.dtype)
    pi = sample_pi(k_pi, counts, betas, alpha, kappa)
    return TransitionParams(betas, pi)


def init_transitions(key: jax.Array, num_states: int, alpha, gamma, kappa, dtype) -> TransitionParams:
    """Draw (beta, pi) from the prior (spec 2.5.3), then smooth pi with float32's tiny."""
    k_init, k_sweep = jax.random.split(key)
    conc = jnp.full((num_states,), gamma / num_states, dtype)
    betas = jnp.exp(sample_log_dirichlet(k_init, conc))
    zeros = jnp.zeros((num_states, num_states), jnp.int32)
    params = resample_transitions(k_sweep, TransitionParams(betas, betas), zeros, alpha, gamma, kappa)
    pi = params.pi + jnp.finfo(jnp.float32).tiny
    # floor after normalising: in float32, tiny / rowsum rounds to a (flushed) subnormal
    pi = jnp.maximum(pi / jnp.sum(pi, axis=-1, keepdims=True), jnp.finfo(dtype).tiny)
    return TransitionParams(params.betas, pi)
