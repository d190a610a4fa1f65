"""Sticky HDP-HMM transitions in the weak limit (model spec 3.3, 3.4, 2.5).

beta ~ Dir(gamma/S), pi_j ~ Dir(alpha * beta + kappa * e_j). The beta conditional
uses Fox et al.'s auxiliary table counts, drawn inside JAX so that a whole Gibbs
sweep is one jitted function.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .distributions import sample_log_dirichlet, uniforms

class TransitionParams(NamedTuple):
    betas: jax.Array  # (S,) global state weights
    pi: jax.Array  # (S, S) transition matrix, rows sum to one


def transition_pairs(z: jax.Array, mask: jax.Array, num_states: int) -> jax.Array:
    """Flat ids j * S + k of the transitions z_{b,t-1} = j -> z_{b,t} = k.

    z: (B, N) int labels; mask: (B, N) labels' frame mask, applied at the
    destination. Masked transitions get the out-of-range id S * S, which
    ``jax.ops.segment_sum`` drops. Transitions never cross segments.
    """
    pairs = z[:, :-1] * num_states + z[:, 1:]
    return jnp.where(mask[:, 1:] > 0, pairs, num_states**2).reshape(-1)


def transition_counts(z: jax.Array, mask: jax.Array, num_states: int) -> jax.Array:
    """n_jk = #{(b, t): z_{b,t-1} = j, z_{b,t} = k, mask_{b,t}} with the mask at the destination."""
    return counts_from_pairs(transition_pairs(z, mask, num_states), num_states)


def counts_from_pairs(pairs: jax.Array, num_states: int) -> jax.Array:
    """The (S, S) count matrix of flat transition ids (out-of-range ids ignored)."""
    ones = jnp.ones(pairs.shape, jnp.int32)
    return jax.ops.segment_sum(ones, pairs, num_segments=num_states**2).reshape(num_states, num_states)


def sample_table_counts(key: jax.Array, pairs: jax.Array, betas: jax.Array, alpha, kappa) -> jax.Array:
    """Override-corrected table counts mbar_jk (Fox et al. 2011; spec 3.4 steps 1-2), exactly.

    m_jk = sum_{i < n_jk} Bern(ab_k / (ab_k + i)) off the diagonal; on the diagonal
    the Binomial override thinning folds into mbar_jj = sum_{i < n_jj}
    Bern(ab_j / (ab_j + kappa + i)), with ab = alpha * beta. Each observed
    transition is one customer: its rank i among the transitions with the same
    (j, k) (any order will do, the terms are independent) comes from a sort, so
    the draw costs one uniform per frame and no truncation of large counts.
    """
    num_states = betas.shape[0]
    dtype = betas.dtype
    order = jnp.argsort(pairs)
    ranked = pairs[order]
    first = jnp.searchsorted(ranked, ranked, side="left")
    rank = (jnp.arange(ranked.shape[0]) - first).astype(dtype)
    valid = ranked < num_states**2
    safe = jnp.where(valid, ranked, 0)
    src, dst = safe // num_states, safe % num_states
    ab = alpha * betas[dst]
    prob = ab / (ab + jnp.where(src == dst, kappa, 0.0).astype(dtype) + rank)
    (u,) = uniforms(key, ranked.shape, dtype=dtype)
    tables = ((u < prob) & valid).astype(jnp.int32)
    flat = jax.ops.segment_sum(tables, ranked, num_segments=num_states**2)
    return flat.reshape(num_states, num_states)


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
    key: jax.Array, params: TransitionParams, pairs: jax.Array, alpha, gamma, kappa
) -> TransitionParams:
    """One draw of (beta, pi) from their conditionals given the transitions (flat ids, see ``transition_pairs``)."""
    k_m, k_beta, k_pi = jax.random.split(key, 3)
    num_states = params.betas.shape[0]
    table_counts = sample_table_counts(k_m, pairs, params.betas, alpha, kappa)
    betas = sample_betas(k_beta, table_counts, gamma, params.betas.dtype)
    pi = sample_pi(k_pi, counts_from_pairs(pairs, num_states), betas, alpha, kappa)
    return TransitionParams(betas, pi)


def init_transitions(key: jax.Array, num_states: int, alpha, gamma, kappa, dtype) -> TransitionParams:
    """Draw (beta, pi) from the prior (spec 2.5.3), then smooth pi with float32's tiny."""
    k_beta, k_pi = jax.random.split(key)
    conc = jnp.full((num_states,), gamma / num_states, dtype)
    betas = jnp.exp(sample_log_dirichlet(k_beta, conc))
    pi = sample_pi(k_pi, jnp.zeros((num_states, num_states), jnp.int32), betas, alpha, kappa)
    return TransitionParams(betas, smooth_initial_pi(pi))


@jax.jit  # one small program, also where it is called outside a compiled function
def smooth_initial_pi(pi: jax.Array) -> jax.Array:
    """pi <- (pi + tiny32) / rowsum, as the initialisation does (spec 2.5.3): no zero transition."""
    pi = pi + jnp.finfo(jnp.float32).tiny
    # floor after normalising: in float32, tiny / rowsum rounds to a (flushed) subnormal
    return jnp.maximum(pi / jnp.sum(pi, axis=-1, keepdims=True), jnp.finfo(pi.dtype).tiny)
