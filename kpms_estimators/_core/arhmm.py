"""The sticky HDP AR-HMM: initialisation, one Gibbs sweep, likelihoods (spec section 3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import hmm
from .autoregressive import (
    ARParams,
    ARPrior,
    ar_log_likelihoods,
    ar_sufficient_stats,
    num_lags,
    sample_ar_params,
)
from .transitions import TransitionParams, resample_transitions, smooth_initial_pi, transition_pairs

#: Incremented each time a function is traced (tests assert one trace per shape).
TRACE_COUNTS = {"arhmm.gibbs_step": 0, "arhmm.sample_labels": 0}


class ARHMMHypers(NamedTuple):
    alpha: jax.Array
    gamma: jax.Array
    kappa: jax.Array
    ar: ARPrior


class ARHMMParams(NamedTuple):
    betas: jax.Array  # (S,)
    pi: jax.Array  # (S, S)
    Ab: jax.Array  # (S, P, L*P + 1)
    Q: jax.Array  # (S, P, P)

    @property
    def ar(self) -> ARParams:
        return ARParams(self.Ab, self.Q)

    @property
    def trans(self) -> TransitionParams:
        return TransitionParams(self.betas, self.pi)


class ARHMMData(NamedTuple):
    x: jax.Array  # (B, T, P) latent trajectory
    mask: jax.Array  # (B, T) 1 on real frames


class ARHMMState(NamedTuple):
    params: ARHMMParams
    z: jax.Array  # (B, T-L) int32, z[b, i] labels frame i + L


def label_mask(mask: jax.Array, n_lags: int) -> jax.Array:
    """Mask of labelled frames L..T-1, as the data dtype."""
    return mask[:, n_lags:]


def masked_log_likes(
    data: ARHMMData, params: ARHMMParams, residual_dtype=None, time_major: bool = False, out_dtype=None,
) -> jax.Array:
    """Per-frame, per-state AR log-likelihoods, zero on padded frames: (B, T-L, S), or
    (T-L, B, S) with ``time_major`` (``residual_dtype``, ``out_dtype``: see ``ar_log_likelihoods``)."""
    n_lags = num_lags(params.ar)
    ll = ar_log_likelihoods(data.x, params.ar, residual_dtype, time_major, out_dtype)
    lmask = label_mask(data.mask, n_lags)
    return ll * (lmask.T if time_major else lmask)[..., None].astype(ll.dtype)


def sample_z(key: jax.Array, log_likes: jax.Array, pi: jax.Array, time_major: bool = False) -> tuple[jax.Array, jax.Array]:
    """z | x, params by FFBS per segment (spec 3.5). Returns (z (B, N), marginal log-lik (B,)).

    ``log_likes``: (B, N, S), or (N, B, S) with ``time_major``: then the filter scans the
    array as it is and its (N, B, S) output is the only other array of that size (at
    10 x 18000 frames and 100 states the batch-major layout needs two more 144 MB copies).
    The draws are the same in both layouts. ``log_likes`` may be stored in a narrower dtype
    than ``pi`` (float32); the filter and the uniforms use the wider one.
    """
    dtype = jnp.result_type(log_likes.dtype, pi.dtype)
    if not time_major:
        u = jax.random.uniform(key, log_likes.shape[:2], dtype)
        return jax.vmap(hmm.sample_states_from_uniforms, in_axes=(0, 0, None))(u, log_likes, pi)
    u = jax.random.uniform(key, (log_likes.shape[1], log_likes.shape[0]), dtype)
    return _sample_z_time_major(u, log_likes, pi)


def _sample_z_time_major(u: jax.Array, log_likes: jax.Array, pi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FFBS of time-major ``log_likes`` (N, B, S) driven by uniforms ``u`` (B, N): (z (B, N), marginal (B,))."""
    draw = jax.vmap(hmm.sample_states_from_uniforms, in_axes=(1, 1, None), out_axes=(1, 0))
    z, marginal = draw(u.T, log_likes, pi)
    return z.T, marginal


#: Frames per group of segments in ``sample_labels_grouped``: the label draw's (frames x segments x
#: states) arrays are made for one group at a time, so their memory stops growing with the data
#: beyond this many frames (100 states: ~1.3 KB per frame, ~330 MB per group). Grouping costs some
#: speed (the filter re-reads the transition matrix per group and step): at 20 x 10 030 frames the
#: label draw took 378 ms for all segments at once, 405 ms in 2 groups and 435 ms in 4, with
#: temporaries of 258, 130 and 66 MB (same labels; benchmarks/README.md, session 9). Hence a budget
#: above the benchmark's 10 x 18 000 frames: grouping only starts where memory starts to matter.
LABEL_GROUP_FRAMES = 250_000


def group_size(num_segments: int, num_frames: int, group_frames: int = LABEL_GROUP_FRAMES) -> int:
    """Segments per group for ``sample_labels_grouped``: all of them when they hold at most
    ``group_frames`` frames, else the largest divisor of ``num_segments`` whose groups hold at most
    that many and at least half of it (no remainder group, hence one traced copy of the draw),
    else equal groups as near that size as possible (the last one smaller)."""
    most = max(1, group_frames // max(num_frames, 1))
    if most >= num_segments:
        return num_segments
    for size in range(most, 0, -1):
        if num_segments % size == 0 and 2 * size >= most:
            return size
    return -(-num_segments // -(-num_segments // most))


def segment_window(tree, start, size: int):
    """Rows ``start .. start + size - 1`` of every array in ``tree`` (``start`` may be traced)."""
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=0), tree)


def sample_labels_grouped(key, data: ARHMMData, params: ARHMMParams, residual_dtype=None, out_dtype=None,
                          group_frames: int = LABEL_GROUP_FRAMES, window=None) -> jax.Array:
    """z | x, params by FFBS (spec 3.5), the segments in groups of at most ``group_frames`` frames
    (``group_size``): the same uniforms per segment and the same arithmetic as ``sample_z`` of
    ``masked_log_likes`` over all segments at once (time-major), so the same labels, with the
    (frames x segments x states) arrays of one group at a time. Returns z (B, T-L).

    ``window=(start, size)`` draws only segments ``start .. start + size - 1`` (``start`` may be
    traced), with the uniforms they get in the whole batch: (size, T-L), the same labels as
    those rows of the draw over all segments."""
    num_segments, num_frames = data.mask.shape
    n_lags = num_lags(params.ar)
    ll_dtype = jnp.dtype(out_dtype) if out_dtype is not None else data.x.dtype
    u = jax.random.uniform(key, (num_segments, num_frames - n_lags), jnp.result_type(ll_dtype, params.pi.dtype))
    if window is not None:
        data, u = segment_window((data, u), *window)
        num_segments = window[1]

    def draw(x, mask, u):
        log_likes = masked_log_likes(ARHMMData(x, mask), params, residual_dtype, time_major=True, out_dtype=out_dtype)
        return _sample_z_time_major(u, log_likes, params.pi)[0]

    size = group_size(num_segments, num_frames, group_frames)
    if size == num_segments:
        return draw(data.x, data.mask, u)
    n_full = num_segments // size
    grouped = [a[: n_full * size].reshape((n_full, size) + a.shape[1:]) for a in (data.x, data.mask, u)]
    z = jax.lax.map(lambda args: draw(*args), tuple(grouped)).reshape((n_full * size,) + u.shape[1:])
    if n_full * size < num_segments:
        rest = n_full * size
        z = jnp.concatenate([z, draw(data.x[rest:], data.mask[rest:], u[rest:])])
    return z


def log_likelihood_terms(z: jax.Array, log_likes: jax.Array, pi: jax.Array, mask: jax.Array,
                         time_major: bool = False) -> dict:
    """The reference's "z" and "x" terms (spec section 6) for a state path.

    z: sum_{t >= L+1} mask_t log pi[z_{t-1}, z_t];  x: sum_{t >= L} mask_t log N(x_t | AR_{z_t}).
    z and mask are (B, N); ``log_likes`` (B, N, S), or (N, B, S) with ``time_major``.
    """
    lmask = mask.astype(log_likes.dtype)
    path, path_mask = (z.T, lmask.T) if time_major else (z, lmask)
    x_term = jnp.sum(jnp.take_along_axis(log_likes, path[..., None], axis=-1)[..., 0] * path_mask)
    return {"z": transition_log_likelihood(z, pi, lmask), "x": x_term}


def transition_log_likelihood(z: jax.Array, pi: jax.Array, lmask: jax.Array) -> jax.Array:
    """sum_{t >= L+1} mask_t log pi[z_{t-1}, z_t] (the "z" term of spec 6)."""
    return jnp.sum(jnp.log(pi)[z[:, :-1], z[:, 1:]] * lmask[:, 1:])


def num_states_used(z: jax.Array, mask: jax.Array, num_states: int) -> jax.Array:
    """Number of states labelling at least one real frame."""
    usage = jax.ops.segment_sum(mask.reshape(-1).astype(jnp.int32), z.reshape(-1), num_segments=num_states)
    return jnp.sum(usage > 0)


def param_stats(z: jax.Array, x: jax.Array, mask: jax.Array, num_states: int, n_lags: int):
    """What (beta, pi) and (Ab, Q) depend on: the flat transition ids (``transition_pairs``)
    and the per-state regression statistics (``ar_sufficient_stats``)."""
    lmask = label_mask(mask, n_lags)
    return transition_pairs(z, lmask, num_states), ar_sufficient_stats(x, z, mask, num_states, n_lags)


def sample_params_given_stats(key: jax.Array, betas: jax.Array, pairs: jax.Array, stats, hypers: ARHMMHypers) -> ARHMMParams:
    """(beta, pi) then (Ab, Q) from their conditionals given ``param_stats`` (spec 3.6).

    ``betas`` are the current global weights (the table counts depend on them). With
    every pair masked and zero statistics this is a draw from the prior (spec 2.5.3-4):
    no tables, beta ~ Dir(gamma/S), pi_j ~ Dir(alpha beta + kappa e_j), (Ab, Q) ~ MNIW_0.
    """
    k_trans, k_ar = jax.random.split(key)
    current = TransitionParams(betas, jnp.zeros((betas.shape[0],) * 2, betas.dtype))
    trans = resample_transitions(k_trans, current, pairs, hypers.alpha, hypers.gamma, hypers.kappa)
    ar = sample_ar_params(k_ar, stats, hypers.ar)
    return ARHMMParams(trans.betas, trans.pi, ar.Ab, ar.Q)


def resample_params(key: jax.Array, state: ARHMMState, x: jax.Array, mask: jax.Array, hypers: ARHMMHypers) -> ARHMMParams:
    """(beta, pi) then (Ab, Q) from their conditionals given the current z and x (spec 3.6)."""
    num_states = state.params.betas.shape[0]
    pairs, stats = param_stats(state.z, x, mask, num_states, num_lags(hypers.ar))
    return sample_params_given_stats(key, state.params.betas, pairs, stats, hypers)


def sample_labels(key: jax.Array, params: ARHMMParams, data: ARHMMData) -> tuple[jax.Array, dict]:
    """z | x, params by FFBS, and the sweep's ``info`` for the new state: the per-term
    log-likelihoods ("z", "x"), the marginal log-likelihood of x with z summed out
    ("marginal") and the number of states used ("n_used")."""
    TRACE_COUNTS["arhmm.sample_labels"] += 1
    log_likes = masked_log_likes(data, params, time_major=True)
    z, marginal = sample_z(key, log_likes, params.pi, time_major=True)
    lmask = label_mask(data.mask, num_lags(params.ar))
    info = log_likelihood_terms(z, log_likes, params.pi, lmask, time_major=True)
    info["marginal"] = jnp.sum(marginal)
    info["n_used"] = num_states_used(z, lmask, params.betas.shape[0])
    return z, info


class SweepParts(NamedTuple):
    """The pieces an AR-HMM sweep and its initialisation are made of. ``PARTS`` holds the plain
    functions; the estimator passes separately compiled ones, so that the initialisation, the
    sweeps and the labels of new data share compiled programs (and the parameter draw is the
    same program as the keypoint SLDS's, for the same numbers of states, dimensions and lags)."""

    param_stats: Callable  # (z, x, mask, num_states, n_lags) -> (pairs, stats); the last two static
    params_given_stats: Callable  # (key, betas, pairs, stats, hypers) -> ARHMMParams
    labels: Callable  # (key, params, data) -> (z, info)


def sweep(key: jax.Array, state: ARHMMState, data: ARHMMData, hypers: ARHMMHypers, parts) -> tuple[ARHMMState, dict]:
    """One AR-HMM sweep from ``parts``: parameters from the previous z, then z by FFBS (spec 3.6)."""
    k_params, k_z = jax.random.split(key)
    pairs, stats = parts.param_stats(state.z, data.x, data.mask, state.params.betas.shape[0], num_lags(hypers.ar))
    params = parts.params_given_stats(k_params, state.params.betas, pairs, stats, hypers)
    z, info = parts.labels(k_z, params, data)
    return ARHMMState(params, z), info


def gibbs_step(
    key: jax.Array, state: ARHMMState, data: ARHMMData, hypers: ARHMMHypers
) -> tuple[ARHMMState, dict]:
    """One AR-HMM sweep: parameters from the previous z, then z by FFBS.

    ``info`` holds the per-term log-likelihoods of the new state ("z", "x"), the
    marginal log-likelihood of x with z summed out ("marginal") and the number of
    states used ("n_used").
    """
    TRACE_COUNTS["arhmm.gibbs_step"] += 1
    return sweep(key, state, data, hypers, PARTS)


def prior_params(key: jax.Array, pairs, stats, hypers: ARHMMHypers, params_given_stats=None) -> ARHMMParams:
    """Transitions and AR parameters from the prior (spec 2.5.3-4), then pi smoothed as the
    initialisation does. ``pairs`` and ``stats`` are ``param_stats`` of data with every frame
    masked (no transitions, zero statistics), so the draw is the parameter conditional's
    program: beta ~ Dir(gamma/S), pi_j ~ Dir(alpha beta + kappa e_j), (Ab, Q) ~ MNIW_0."""
    params_given_stats = sample_params_given_stats if params_given_stats is None else params_given_stats
    num_states = stats.n.shape[0]
    betas = np.full((num_states,), 1.0 / num_states, stats.yy.dtype)
    params = params_given_stats(key, betas, pairs, stats, hypers)
    return params._replace(pi=smooth_initial_pi(params.pi))


def placeholder_labels(mask, n_lags: int) -> np.ndarray:
    """All-zero labels (B, T-L) for a (B, T) frame mask, on the host: no device op, hence no
    small compile of its own, before a compiled part overwrites them."""
    return np.zeros((mask.shape[0], mask.shape[1] - n_lags), np.int32)


def init_state(key: jax.Array, data: ARHMMData, hypers: ARHMMHypers, num_states: int, parts=None) -> ARHMMState:
    """Transitions and AR parameters from the prior, then z by FFBS (spec 2.5), with split keys."""
    parts = PARTS if parts is None else parts
    k_params, k_z = jax.random.split(key)
    n_lags = num_lags(hypers.ar)
    z = placeholder_labels(data.mask, n_lags)
    pairs, stats = parts.param_stats(z, data.x, np.zeros(data.mask.shape, data.mask.dtype), num_states, n_lags)
    params = prior_params(k_params, pairs, stats, hypers, parts.params_given_stats)
    z, _ = parts.labels(k_z, params, data)
    return ARHMMState(params, z)


def posterior_marginals(data: ARHMMData, params: ARHMMParams) -> jax.Array:
    """Exact p(z_t | x) per segment given the parameters: (B, T-L, S)."""
    log_likes = masked_log_likes(data, params)
    return jax.vmap(hmm.smoothed_probs, in_axes=(0, None))(log_likes, params.pi)


def predictive_log_likelihoods(data: ARHMMData, params: ARHMMParams) -> jax.Array:
    """log p(x_t | x_{<t}) per labelled frame of each segment (B, T-L); zero on padding."""
    log_likes = masked_log_likes(data, params)
    filt = jax.vmap(hmm.forward_filter, in_axes=(0, None))(log_likes, params.pi)
    n_lags = num_lags(params.ar)
    return filt.log_normalizers * label_mask(data.mask, n_lags).astype(log_likes.dtype)


PARTS = SweepParts(param_stats, sample_params_given_stats, sample_labels)
