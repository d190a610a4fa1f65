"""The location-aware ("allo") keypoint SLDS: per-syllable heading change and velocity (model spec 5, 6).

Every syllable k also carries a heading change ``delta_h[k]`` (variance
``sigmasq_h[k]``) and an egocentric centroid velocity ``delta_v[k]`` (2D,
variance ``sigmasq_v[k]`` per axis). For frames t >= L with ``k = z_t``::

    dh_t = wrap(h_t - h_{t-1})                    ~ N(delta_h[k], sigmasq_h[k])
    dv_t = R(h_{t-1})^T (v_t - v_{t-1})[:2]       ~ N(delta_v[k], sigmasq_v[k] I_2)

with normal-inverse-gamma priors (mean 0). This module adds to the keypoint SLDS
of ``keypoint_slds``: the exact NIG conditionals of these parameters (5.2), their
per-state log-likelihood in the syllable sampler (5.3), and the joint (h, v)
sampler by extended Kalman filtering and backward sampling (5.4), composed into
one sweep in the order of 5.5.

Differences from the reference (spec 14): the NIG mean is drawn with the square
root of the variance (#4); padded frames get a large observation variance in the
(h, v) filter (#16); the log joint has "hv" instead of a meaningless "v", and 3D
data work (#15). See ``sample_heading_and_centroid`` for the first frame's
linearisation point.

Shapes: B segments, T frames, K keypoints, D = 2 or 3, S states, L lags;
``z`` (B, T-L) labels frames L..T-1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import arhmm, hmm, kalman
from . import keypoint_slds as kslds
from . import keypoints as kp
from .autoregressive import num_lags
from .distributions import normal_from_uniform, sample_log_gamma, uniforms
from .kalman import _chol_inv_small, _mm, _mm_nt, _mm_tn, _mv

#: Incremented each time ``gibbs_step`` is traced (tests assert one trace per shape).
TRACE_COUNTS = {"allo.gibbs_step": 0, "allo.allo_params": 0, "allo.sample_labels": 0, "allo.sample_emission": 0,
                "allo.emission_after_x": 0}

#: Prior variance of every coordinate of (h_0, v_0) in the (h, v) filter (spec 5.4).
PRIOR_VARIANCE = 1e4
#: Transition variance into a padded frame (spec 5.4).
PAD_TRANSITION_VARIANCE = 1e8
#: Observation variance per keypoint coordinate on padded frames. The reference uses 0.01,
#: which pins the padded states to the repeated last frame (spec 14 #16); this is large
#: next to any tracking noise in pixel-like units, so padded frames carry almost no information.
PAD_OBS_VARIANCE = 1e4
#: Random-walk step variance of the height (3D), as in the reference (spec 5.4).
HEIGHT_STEP_VARIANCE = 1.0


class AlloPrior(NamedTuple):
    """Normal-inverse-gamma priors of the heading-change (h) and velocity (v) parameters (spec 2.6)."""

    alpha0_h: jax.Array
    beta0_h: jax.Array
    lambda0_h: jax.Array
    alpha0_v: jax.Array
    beta0_v: jax.Array
    lambda0_v: jax.Array


class AlloHypers(NamedTuple):
    """``keypoint_slds.KeypointHypers``'s fields, then the allo prior and the height step variance."""

    arhmm: arhmm.ARHMMHypers
    nu_s: jax.Array
    nu_sigma: jax.Array
    sigmasq_0: jax.Array
    sigmasq_loc: jax.Array  # used only with ``ignore_allo_dynamics``
    jitter: jax.Array
    allo: AlloPrior
    sigmasq_height: jax.Array  # random-walk step variance of v[..., 2] (3D data)

    @classmethod
    def from_keypoint(cls, hypers: kslds.KeypointHypers, allo: AlloPrior, sigmasq_height=None) -> AlloHypers:
        """The keypoint SLDS hyperparameters plus the allo ones (height variance default 1)."""
        dtype = jnp.result_type(hypers.nu_s)
        height = HEIGHT_STEP_VARIANCE if sigmasq_height is None else sigmasq_height
        return cls(*hypers, allo=allo, sigmasq_height=jnp.asarray(height, dtype))


class AlloSwitches(NamedTuple):
    """Static switches of a sweep (spec 5.5).

    ``resample_global_noise_scale`` is on by default, as in the reference's
    location-aware model (spec 14 #3). ``ignore_allo_dynamics`` samples h and v
    with the keypoint SLDS conditionals (4.3, 4.4, ``sigmasq_loc``) instead of
    the joint (h, v) filter (jax-moseq's
    ``ignore_allo_dynamics_for_location_sampling``). There is no ``fix_heading``:
    this model needs the heading to define heading changes and egocentric velocity.
    """

    ar_only: bool = False
    states_only: bool = False
    resample_global_noise_scale: bool = True
    parallel_message_passing: bool = False
    reference_compat: bool = False
    ignore_allo_dynamics: bool = False


class AlloParams(NamedTuple):
    """``keypoint_slds.KeypointParams``'s fields, then the per-state allo parameters."""

    betas: jax.Array  # (S,)
    pi: jax.Array  # (S, S)
    Ab: jax.Array  # (S, P, L*P + 1)
    Q: jax.Array  # (S, P, P)
    Cd: jax.Array  # (O', P + 1)
    sigmasq: jax.Array  # (K,)
    delta_h: jax.Array  # (S,) mean heading change per frame (radians)
    sigmasq_h: jax.Array  # (S,)
    delta_v: jax.Array  # (S, 2) mean egocentric centroid step (x forward along the heading)
    sigmasq_v: jax.Array  # (S,) per axis

    @property
    def ar(self) -> arhmm.ARHMMParams:
        return arhmm.ARHMMParams(self.betas, self.pi, self.Ab, self.Q)


class AlloState(NamedTuple):
    """The chain state; same latent fields as ``keypoint_slds.KeypointState`` (h unwrapped)."""

    params: AlloParams
    x: jax.Array  # (B, T, P)
    z: jax.Array  # (B, T-L)
    h: jax.Array  # (B, T)
    v: jax.Array  # (B, T, D)
    s: jax.Array  # (B, T, K)


class AlloStats(NamedTuple):
    """Per-state sufficient statistics of the heading changes and egocentric steps (masked)."""

    count: jax.Array  # (S,)
    sum_dh: jax.Array  # (S,)
    sumsq_dh: jax.Array  # (S,)
    sum_dv: jax.Array  # (S, 2)
    sumsq_dv: jax.Array  # (S,) sum of squared norms


# --------------------------------------------------------------------------- #
# Heading changes, egocentric steps, their statistics and likelihoods
# --------------------------------------------------------------------------- #
def _rotate_vectors(vec: jax.Array, angle: jax.Array) -> jax.Array:
    """R(angle) applied to 2-vectors ``vec`` (..., 2), angle (...)."""
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.stack([cos * vec[..., 0] - sin * vec[..., 1], sin * vec[..., 0] + cos * vec[..., 1]], axis=-1)


def heading_changes(h: jax.Array, n_lags: int) -> jax.Array:
    """dh_t = wrap(h_t - h_{t-1}) for t = L..T-1: (..., T-L)."""
    return kp.wrap_angle(h[..., n_lags:] - h[..., n_lags - 1 : -1])


def egocentric_steps(h: jax.Array, v: jax.Array, n_lags: int) -> jax.Array:
    """dv_t = R(h_{t-1})^T (v_t - v_{t-1})[:2] for t = L..T-1: (..., T-L, 2)."""
    step = v[..., n_lags:, :2] - v[..., n_lags - 1 : -1, :2]
    return _rotate_vectors(step, -h[..., n_lags - 1 : -1])


def allo_sufficient_stats(dh, dv, z, lmask, num_states: int) -> AlloStats:
    """Masked per-state count, sum and sum of squares of dh (B, N) and dv (B, N, 2), by segment sums."""
    weight = lmask.astype(dh.dtype).reshape(-1)
    labels = z.reshape(-1)
    dh, dv = dh.reshape(-1), dv.reshape(-1, 2)

    def total(values):
        return jax.ops.segment_sum(values, labels, num_segments=num_states)

    return AlloStats(
        count=total(weight),
        sum_dh=total(weight * dh),
        sumsq_dh=total(weight * dh**2),
        sum_dv=total(weight[:, None] * dv),
        sumsq_dv=total(weight * jnp.sum(dv**2, axis=-1)),
    )


def allo_log_likelihoods(dh, dv, params: AlloParams) -> jax.Array:
    """log N(dh_t | delta_h[k], sigmasq_h[k]) + log N(dv_t | delta_v[k], sigmasq_v[k] I_2), every state: (..., N, S).

    The term added to the AR log-likelihoods in the syllable sampler (spec 5.3). Not masked.
    """
    log_2pi = jnp.log(2.0 * jnp.pi).astype(dh.dtype)
    ll_h = -0.5 * (log_2pi + jnp.log(params.sigmasq_h) + (dh[..., None] - params.delta_h) ** 2 / params.sigmasq_h)
    sq = jnp.sum((dv[..., None, :] - params.delta_v) ** 2, axis=-1)
    ll_v = -(log_2pi + jnp.log(params.sigmasq_v)) - 0.5 * sq / params.sigmasq_v
    return ll_h + ll_v


def location_log_likelihood(h, v, z, lmask, params: AlloParams, n_lags: int) -> jax.Array:
    """The "hv" term of spec 6: sum_{t>=L} mask_t [log N(dh_t | ...) + log N(dv_t | ...)] along z."""
    dh, dv = heading_changes(h, n_lags), egocentric_steps(h, v, n_lags)
    log_2pi = jnp.log(2.0 * jnp.pi).astype(dh.dtype)
    var_h, var_v = params.sigmasq_h[z], params.sigmasq_v[z]
    ll = -0.5 * (log_2pi + jnp.log(var_h) + (dh - params.delta_h[z]) ** 2 / var_h)
    ll = ll - (log_2pi + jnp.log(var_v)) - 0.5 * jnp.sum((dv - params.delta_v[z]) ** 2, axis=-1) / var_v
    return jnp.sum(ll * lmask.astype(ll.dtype))


# --------------------------------------------------------------------------- #
# Normal-inverse-gamma conditionals (spec 5.2)
# --------------------------------------------------------------------------- #
def sample_normal_inverse_gamma(key, count, total, sumsq, alpha0, beta0, lambda0):
    """(mean, var) from the exact NIG posterior, independently per row (spec 5.2).

    Prior: var ~ InvGamma(alpha0, beta0), mean | var ~ N(0, var I_d / lambda0); data: n
    vectors y_i ~ N(mean, var I_d) with ``count`` n (S,), ``total`` sum y_i (S, d) and
    ``sumsq`` sum |y_i|^2 (S,). Posterior:

        lambda_n = lambda0 + n,   mu_n = total / lambda_n,   alpha_n = alpha0 + d n / 2,
        beta_n = beta0 + (sumsq - |total|^2 / lambda_n) / 2,
        var ~ InvGamma(alpha_n, beta_n),   mean | var ~ N(mu_n, var I_d / lambda_n).

    (beta_n equals the textbook beta0 + SS_within/2 + n lambda0 |ybar|^2 / (2 lambda_n).)
    The mean's noise is scaled by sqrt(var / lambda_n); the reference uses
    var / lambda_n (spec 14 #4). With n = 0 this is a draw from the prior.

    Returns mean (S, d) and var (S,).
    """
    dtype = total.dtype
    dim = total.shape[-1]
    lambda_n = lambda0 + count
    alpha_n = alpha0 + 0.5 * dim * count
    spread = jnp.maximum(sumsq - jnp.sum(total**2, axis=-1) / lambda_n, 0.0)  # >= 0 up to rounding
    beta_n = beta0 + 0.5 * spread
    k_var, k_mean = jax.random.split(key)
    shape = jnp.broadcast_to(jnp.asarray(alpha_n, dtype), count.shape)
    var = beta_n * jnp.exp(-sample_log_gamma(k_var, shape))
    (u,) = uniforms(k_mean, total.shape, dtype=dtype)
    mean = total / lambda_n[..., None] + jnp.sqrt(var / lambda_n)[..., None] * normal_from_uniform(u)
    return mean, var


def sample_allo_params(key, stats: AlloStats, prior: AlloPrior):
    """(delta_h, sigmasq_h, delta_v, sigmasq_v) from their NIG conditionals given the statistics."""
    k_h, k_v = jax.random.split(key)
    delta_h, sigmasq_h = sample_normal_inverse_gamma(
        k_h, stats.count, stats.sum_dh[:, None], stats.sumsq_dh, prior.alpha0_h, prior.beta0_h, prior.lambda0_h
    )
    delta_v, sigmasq_v = sample_normal_inverse_gamma(
        k_v, stats.count, stats.sum_dv, stats.sumsq_dv, prior.alpha0_v, prior.beta0_v, prior.lambda0_v
    )
    return delta_h[:, 0], sigmasq_h, delta_v, sigmasq_v


def resample_allo_params(key, params: AlloParams, z, h, v, mask, prior: AlloPrior, n_lags: int) -> AlloParams:
    """The allo parameters from their conditional given z, h, v (spec 5.2)."""
    lmask = arhmm.label_mask(mask, n_lags)
    stats = allo_sufficient_stats(heading_changes(h, n_lags), egocentric_steps(h, v, n_lags), z, lmask,
                                  params.betas.shape[0])
    delta_h, sigmasq_h, delta_v, sigmasq_v = sample_allo_params(key, stats, prior)
    return params._replace(delta_h=delta_h, sigmasq_h=sigmasq_h, delta_v=delta_v, sigmasq_v=sigmasq_v)


# --------------------------------------------------------------------------- #
# Joint (h, v) sampler: extended Kalman filter, backward sampling (spec 5.4)
# --------------------------------------------------------------------------- #
class _Transitions(NamedTuple):
    """u_{t+1} = u_t + gate_t (delta_h, R(h_t) delta_v) + N(0, diag(var_t)), t = 0..T-1 (the last is a dummy)."""

    gate: jax.Array  # (T,) mask of the source frame: the drift is frozen after padding
    delta_h: jax.Array  # (T,)
    delta_v: jax.Array  # (T, 2)
    var: jax.Array  # (T, 3) diag(sigmasq_h, sigmasq_v, sigmasq_v), or 1e8 into a padded frame


def _transitions(labels, mask, delta_h, sigmasq_h, delta_v, sigmasq_v) -> _Transitions:
    """Per-step dynamics for transitions j -> j+1 labelled ``labels[j]`` (T-1,), plus a dummy last step."""
    dtype = delta_h.dtype
    labels = jnp.append(labels, 0)
    into_real = jnp.append(mask[1:] > 0, True)
    var = jnp.stack([sigmasq_h[labels], sigmasq_v[labels], sigmasq_v[labels]], axis=-1)
    var = jnp.where(into_real[:, None], var, PAD_TRANSITION_VARIANCE).astype(dtype)
    return _Transitions(mask.astype(dtype), delta_h[labels], delta_v[labels], var)


def _dynamics(step: _Transitions, mean):
    """f(mean) and its Jacobian F (3, 3) at ``mean`` (..., 3), for one or all steps."""
    heading = mean[..., 0]
    drift = _rotate_vectors(step.delta_v, heading)
    turn = _rotate_vectors(step.delta_v, heading + 0.5 * jnp.pi)  # d/dh R(h) delta_v
    gate = step.gate[..., None]
    pred = mean + gate * jnp.concatenate([step.delta_h[..., None], drift], axis=-1)
    column = jnp.concatenate([jnp.zeros_like(gate), gate * turn], axis=-1)  # d f / d h
    first = jnp.eye(3, 1, dtype=mean.dtype)[:, 0]
    jac = jnp.eye(3, dtype=mean.dtype) + column[..., :, None] * first
    return pred, jac


def _emission_info(lin, y, yhat, weight):
    """Information form of y_k ~ N(R(h) yhat_k + v, I_2 / w_k), linearised at ``lin`` = (h, vx, vy).

    Returns G = sum_k w_k H_k^T H_k (3, 3) and c = sum_k w_k H_k^T (y_k - g_k(lin)) (3,),
    with H_k = [R(h + pi/2) yhat_k | I_2] the Jacobian of g_k.
    """
    rot = _rotate_vectors(yhat, lin[0])  # (K, 2)
    resid = y - rot - lin[1:]
    turn = jnp.stack([-rot[:, 1], rot[:, 0]], axis=-1)  # d/dh R(h) yhat
    w_sum = jnp.sum(weight)
    g_hv = jnp.sum(weight[:, None] * turn, axis=0)
    g_hh = jnp.sum(weight * jnp.sum(turn**2, axis=-1))
    row0 = jnp.concatenate([g_hh[None], g_hv])
    rows = jnp.concatenate([g_hv[:, None], w_sum * jnp.eye(2, dtype=y.dtype)], axis=1)
    info = jnp.concatenate([row0[None], rows], axis=0)
    c = jnp.concatenate([jnp.sum(weight * jnp.sum(turn * resid, axis=-1))[None], jnp.sum(weight[:, None] * resid, 0)])
    return info, c


def _condition(pred_mean, pred_cov, info, grad):
    """N(pred_mean, pred_cov) times exp(grad^T (u - pred_mean) - (u - pred_mean)^T info (u - pred_mean) / 2).

    Square-root information form: with pred_cov = L L^T and I + L^T info L = K K^T
    (eigenvalues >= 1), the posterior covariance is A A^T for A = L K^{-T} and the
    mean is pred_mean + A A^T grad. Returns (mean, A).
    """
    low, _ = _chol_inv_small(pred_cov)
    eye = jnp.eye(pred_cov.shape[-1], dtype=pred_cov.dtype)
    inner = eye + _mm_tn(low, _mm(info, low))
    _, inner_inv = _chol_inv_small(0.5 * (inner + jnp.swapaxes(inner, -1, -2)))
    root = _mm_nt(low, inner_inv)
    mean = pred_mean + _mv(root, _mv(jnp.swapaxes(root, -1, -2), grad))
    return mean, root


def _ekf_filter(y, yhat, weight, steps: _Transitions, prior_mean, lin_heading0):
    """Filtered means (T, 3) and covariances (T, 3, 3) of u_t = (h_t, vx_t, vy_t).

    Each frame's emission is linearised at the predicted mean, except the first
    frame's heading, which is linearised at ``lin_heading0``.
    """
    dtype = y.dtype
    first = jnp.arange(y.shape[0]) == 0

    def body(carry, args):
        pred_mean, pred_cov = carry
        y_t, yhat_t, w_t, step, is_first = args
        lin = pred_mean.at[0].set(jnp.where(is_first, lin_heading0, pred_mean[0]))
        info, c = _emission_info(lin, y_t, yhat_t, w_t)
        mean, root = _condition(pred_mean, pred_cov, info, c + _mv(info, lin - pred_mean))
        cov = _mm_nt(root, root)
        nxt, jac = _dynamics(step, mean)
        nxt_cov = _mm_nt(_mm(jac, cov), jac) + jnp.diag(step.var)
        return (nxt, 0.5 * (nxt_cov + nxt_cov.T)), (mean, cov)

    init = (prior_mean, PRIOR_VARIANCE * jnp.eye(3, dtype=dtype))
    _, (means, covs) = jax.lax.scan(body, init, (y, yhat, weight, steps, first))
    return means, covs


def _backward_sample(means, covs, steps: _Transitions, normals):
    """Draw u_{0:T-1} given the filter: u_t | u_{t+1} under the dynamics linearised at the filtered mean.

    p(u_t | u_{t+1}, y_{0:t}) = N(m_t + C F^T V^{-1} (u_{t+1} - f(m_t)), C),
    C = (P_t^{-1} + F^T V^{-1} F)^{-1}, computed for all steps at once in square-root
    form (``_condition`` with a zero prior gradient); then the affine recursion
    u_t = E_t u_{t+1} + g_t runs backwards from u_{T-1} ~ N(m_{T-1}, P_{T-1}).
    """
    pred, jac = _dynamics(steps, means)
    prec = 1.0 / steps.var  # (T, 3)
    info = _mm_tn(jac, prec[..., :, None] * jac)  # F^T V^{-1} F
    _, root = _condition(means, covs, info, jnp.zeros_like(means))  # C = A A^T
    gain = _mm_nt(root, _mm(jac, root)) * prec[..., None, :]  # C F^T V^{-1}
    last = (jnp.arange(means.shape[0]) == means.shape[0] - 1)[:, None, None]
    filt_root, _ = _chol_inv_small(covs)
    gain = jnp.where(last, 0.0, gain)
    root = jnp.where(last, filt_root, root)
    offsets = means - _mv(gain, pred) + _mv(root, normals)

    def body(nxt, args):
        gain_t, offset_t = args
        cur = _mv(gain_t, nxt) + offset_t
        return cur, cur

    _, draws = jax.lax.scan(body, jnp.zeros_like(means[0]), (gain, offsets), reverse=True)
    return draws


def sample_heading_and_centroid(key, y, yhat, obs_var, mask, labels, delta_h, sigmasq_h, delta_v, sigmasq_v,
                                lin_heading0, pad_obs_var=PAD_OBS_VARIANCE):
    """Draw (h, v_xy) of one segment by extended Kalman filtering and backward sampling (spec 5.4).

    State u_t = (h_t, vx_t, vy_t), h unwrapped:

    - u_0 ~ N((0, mean_k y_0k), 1e4 I_3);
    - u_{j+1} = u_j + mask_j (delta_h[k], R(h_j) delta_v[k]) + N(0, Q_j), k = labels[j], with
      Q_j = diag(sigmasq_h[k], sigmasq_v[k], sigmasq_v[k]), or 1e8 I_3 when frame j+1 is padding;
    - y_tk ~ N(R(h_t) yhat_tk + v_t, obs_var_tk I_2), with ``pad_obs_var`` on padded frames.

    Each emission is linearised at the predicted mean and the dynamics at the
    filtered mean (Jacobians in closed form); backward sampling uses the linearised
    dynamics, without jitter. The first frame's heading is linearised at
    ``lin_heading0`` (the chain's current h_0, wrapped) rather than at the prior mean
    0: the prior is flat, so this changes only the linearisation point, and from 0 a
    single linearised update moves the heading by only sin(h_0) (a heading near pi
    would stay near 0 for several frames).

    Parameters
    ----------
    key : PRNG key
    y : (T, K, 2) observed keypoints (x, y)
    yhat : (T, K, 2) aligned predicted keypoints (x, y), R(h) yhat + v is the prediction
    obs_var : (T, K) per-keypoint variance s * sigmasq
    mask : (T,) 1 on real frames
    labels : (T-1,) int, the state of transition j -> j+1 (z padded at the front)
    delta_h, sigmasq_h, sigmasq_v : (S,); delta_v : (S, 2)
    lin_heading0 : scalar
    pad_obs_var : scalar, default ``PAD_OBS_VARIANCE`` (1e4)
        Observation variance per coordinate on padded frames (the reference's 0.01
        pins the padded states, spec 14 #16).

    Returns
    -------
    h : (T,) and v : (T, 2)
    """
    dtype = y.dtype
    weight = jnp.where(mask[:, None] > 0, 1.0 / obs_var, 1.0 / pad_obs_var).astype(dtype)
    steps = _transitions(labels, mask, delta_h, sigmasq_h, delta_v, sigmasq_v)
    prior_mean = jnp.concatenate([jnp.zeros((1,), dtype), jnp.mean(y[0], axis=0)])
    means, covs = _ekf_filter(y, yhat, weight, steps, prior_mean, lin_heading0)
    (u,) = uniforms(key, means.shape, dtype=dtype)
    draws = _backward_sample(means, covs, steps, normal_from_uniform(u))
    return draws[:, 0], draws[:, 1:]


def transition_labels(z: jax.Array, n_lags: int) -> jax.Array:
    """(B, T-1) label of each transition j -> j+1: z padded at the front with L-1 copies of z[:, 0]."""
    return jnp.concatenate([jnp.repeat(z[:, :1], n_lags - 1, axis=1), z], axis=1)


def sample_location(key, state: AlloState, data: kslds.KeypointData, hypers: AlloHypers, parallel: bool):
    """(h, v) | x, z, s, params for every segment (spec 5.4); the height of 3D data by its random walk."""
    params = state.params
    k_xy, k_height = jax.random.split(key)
    n_lags = num_lags(params.ar)
    yhat = kp.aligned_prediction(state.x, params.Cd, data.Gamma)
    obs_var = state.s * params.sigmasq
    labels = transition_labels(state.z, n_lags)
    keys = jax.random.split(k_xy, data.Y.shape[0])

    def one(k, y, yh, var, m, lab, h0):
        return sample_heading_and_centroid(k, y, yh, var, m, lab, params.delta_h, params.sigmasq_h,
                                           params.delta_v, params.sigmasq_v, h0)

    h, v_xy = jax.vmap(one)(keys, data.Y[..., :2], yhat[..., :2], obs_var, data.mask, labels,
                            kp.wrap_angle(state.h[:, 0]))
    v = jnp.concatenate([v_xy, state.v[..., 2:]], axis=-1)
    if data.Y.shape[-1] == 3:
        mu, g = kp.centroid_pseudo_obs(data.Y, state.x, h, state.s, params.sigmasq, data.mask, params.Cd, data.Gamma)
        keys = jax.random.split(k_height, data.Y.shape[0])

        def height(k, m, var, msk):
            return kalman.sample_random_walk(k, m, var, msk, hypers.sigmasq_height, parallel=parallel)

        v = v.at[..., 2:].set(jax.vmap(height)(keys, mu[..., 2:], g, data.mask))
    return h, v


# --------------------------------------------------------------------------- #
# Sweep, initialisation, likelihoods
# --------------------------------------------------------------------------- #
def masked_log_likes(state: AlloState, data: kslds.KeypointData) -> jax.Array:
    """The syllable sampler's per-frame, per-state log-likelihoods: AR plus allo, zero on padding (B, T-L, S)."""
    params = state.params
    n_lags = num_lags(params.ar)
    lmask = arhmm.label_mask(data.mask, n_lags)
    ar_ll = arhmm.masked_log_likes(arhmm.ARHMMData(state.x, data.mask), params.ar)
    allo_ll = allo_log_likelihoods(heading_changes(state.h, n_lags), egocentric_steps(state.h, state.v, n_lags), params)
    return ar_ll + allo_ll * lmask[..., None].astype(allo_ll.dtype)


def log_likelihood_terms(state: AlloState, data: kslds.KeypointData, hypers: AlloHypers) -> dict:
    """Per-term log joint (spec 6): "z", "x", "Y", "s", "hv", and for 3D data "height" (its random walk)."""
    terms = kslds.log_likelihood_terms(state, data, hypers)
    del terms["v"]  # the reference's "v" uses sigmasq_loc = 1 and means nothing here (spec 14 #15)
    n_lags = num_lags(hypers.arhmm.ar)
    lmask = arhmm.label_mask(data.mask, n_lags)
    terms["hv"] = location_log_likelihood(state.h, state.v, state.z, lmask, state.params, n_lags)
    if data.Y.shape[-1] == 3:
        terms["height"] = kp.centroid_log_prior(state.v[..., 2:], data.mask, hypers.sigmasq_height)
    return terms


def as_keypoint(state: AlloState) -> kslds.KeypointState:
    """The keypoint SLDS part of a state (same arrays), to run the keypoint SLDS's compiled parts on it."""
    return kslds.KeypointState(kslds.KeypointParams(*state.params[: len(kslds.KeypointParams._fields)]), *state[1:])


def keypoint_hypers(hypers: AlloHypers) -> kslds.KeypointHypers:
    return kslds.KeypointHypers(*hypers[: len(kslds.KeypointHypers._fields)])


def redraw_allo_params(key, state: AlloState, data: kslds.KeypointData, hypers: AlloHypers) -> AlloState:
    """The allo parameters from their conditional given z, h, v (spec 5.2); with every frame
    masked, from their prior (spec 5.1)."""
    TRACE_COUNTS["allo.allo_params"] += 1
    params = resample_allo_params(key, state.params, state.z, state.h, state.v, data.mask, hypers.allo,
                                  num_lags(hypers.arhmm.ar))
    return state._replace(params=params)


def sample_labels(key, state: AlloState, data: kslds.KeypointData, window=None) -> jax.Array:
    """z | x, h, v, params by FFBS with the AR + allo log-likelihoods (spec 5.3); ``window=(start,
    size)``: only those segments, with the uniforms they get in the whole batch (same labels)."""
    TRACE_COUNTS["allo.sample_labels"] += 1
    if window is None:
        return arhmm.sample_z(key, masked_log_likes(state, data), state.params.pi)[0]
    num_segments = data.mask.shape[0]
    state, data = kslds.segment_rows(state, data, *window)
    log_likes = masked_log_likes(state, data)
    dtype = jnp.result_type(log_likes.dtype, state.params.pi.dtype)
    u = jax.random.uniform(key, (num_segments, log_likes.shape[1]), dtype)  # as arhmm.sample_z draws them
    u = arhmm.segment_window(u, *window)
    return jax.vmap(hmm.sample_states_from_uniforms, in_axes=(0, 0, None))(u, log_likes, state.params.pi)[0]


def sample_emission(key, state: AlloState, data: kslds.KeypointData, hypers: AlloHypers, switches: AlloSwitches):
    """Steps 3-6 of a sweep: sigmasq (if resample_global_noise_scale), x, (h, v) jointly (or h then v
    by the keypoint SLDS conditionals with ignore_allo_dynamics), s.

    sigmasq and x are the keypoint SLDS's steps (``kslds.emission_sigmasq``, ``kslds.emission_x``,
    which the estimator can run per window of segments); then ``emission_after_x``."""
    TRACE_COUNTS["allo.sample_emission"] += 1
    state = kslds.emission_sigmasq(key, state, data, hypers, switches)
    state = state._replace(x=kslds.emission_x(key, state, data, hypers, switches))
    return emission_after_x(key, state, data, hypers, switches)


def emission_after_x(key, state: AlloState, data: kslds.KeypointData, hypers: AlloHypers, switches: AlloSwitches):
    """Steps 5-6 given the new x: (h, v), then s (the keys of ``kslds.sample_emission``'s split)."""
    TRACE_COUNTS["allo.emission_after_x"] += 1
    _, _, k_h, k_v, k_s = kslds.emission_keys(key)
    if switches.ignore_allo_dynamics:
        p = state.params
        state = state._replace(h=kp.sample_heading(k_h, data.Y, state.x, state.v, state.s, p.sigmasq, p.Cd, data.Gamma))
        state = state._replace(v=kslds.sample_v(k_v, state, data, hypers, switches.parallel_message_passing))
    else:
        h, v = sample_location(k_h, state, data, hypers, switches.parallel_message_passing)
        state = state._replace(h=h, v=v)
    return kslds.resample_noise_scales(k_s, state, data, hypers, switches.reference_compat)


def sweep_info(state: AlloState, data: kslds.KeypointData, hypers: AlloHypers) -> dict:
    """The per-term log-likelihoods of a state (spec 6) and the number of states used."""
    info = log_likelihood_terms(state, data, hypers)
    lmask = arhmm.label_mask(data.mask, num_lags(hypers.arhmm.ar))
    info["n_used"] = arhmm.num_states_used(state.z, lmask, state.params.betas.shape[0])
    return info


class SweepParts(NamedTuple):
    """The location-aware pieces of a sweep; the AR parameter draw, the initialisation and
    the noise scales of new data run the keypoint SLDS's parts (``kslds.SweepParts``) on
    ``as_keypoint(state)``, so the estimator shares those compiled programs with KeypointSLDS."""

    allo_params: Callable  # (key, state, data, hypers) -> state with new allo parameters
    labels: Callable  # (key, state, data) -> z
    emission: Callable  # (key, state, data, hypers, switches) -> state
    info: Callable  # (state, data, hypers) -> dict


def sweep(key, state: AlloState, data: kslds.KeypointData, hypers: AlloHypers, switches: AlloSwitches, parts,
          kp_parts) -> tuple[AlloState, dict]:
    """One sweep in the order of spec 5.5 from ``parts`` and ``kp_parts`` (see ``gibbs_step``)."""
    k_params, k_allo, k_z, k_emission = jax.random.split(key, 4)
    if not switches.states_only:
        pairs, stats = kp_parts.param_stats(as_keypoint(state), data, keypoint_hypers(hypers))
        ar = kp_parts.params_given_stats(k_params, state.params.betas, pairs, stats, hypers.arhmm)
        state = parts.allo_params(k_allo, state, data, hypers)  # given the previous z, like (Ab, Q)
        state = state._replace(params=state.params._replace(betas=ar.betas, pi=ar.pi, Ab=ar.Ab, Q=ar.Q))
    state = state._replace(z=parts.labels(k_z, state, data))
    if not switches.ar_only:
        state = parts.emission(k_emission, state, data, hypers, switches=kslds.emission_switches(switches))
    return state, parts.info(state, data, hypers)


def gibbs_step(
    key: jax.Array, state: AlloState, data: kslds.KeypointData, hypers: AlloHypers, switches: AlloSwitches
) -> tuple[AlloState, dict]:
    """One sweep in the order of spec 5.5; ``switches`` is static.

    1. beta, pi, Ab, Q, then the allo parameters (unless states_only); 2. z with the
    AR + allo log-likelihoods; [ar_only stops here] 3. sigmasq (if
    resample_global_noise_scale and not states_only); 4. x; 5. (h, v) jointly
    (or h then v by the keypoint SLDS conditionals with ignore_allo_dynamics);
    6. s. ``info`` holds the per-term log-likelihoods of the new state and the
    number of states used.
    """
    TRACE_COUNTS["allo.gibbs_step"] += 1
    return sweep(key, state, data, hypers, switches, PARTS, kslds.PARTS)


def init_state(
    key, x0, h0, v0, data: kslds.KeypointData, hypers: AlloHypers, Cd, num_states: int, reference_compat: bool,
    parts=None, kp_parts=None,
) -> AlloState:
    """The keypoint SLDS initialisation (spec 2.5), then the allo parameters from their prior (5.1):
    the allo conditional given no data (every frame masked), i.e. the sweep's program."""
    parts, kp_parts = parts or PARTS, kp_parts or kslds.PARTS
    k_kp, k_allo = jax.random.split(key)
    state = kslds.init_state(k_kp, x0, h0, v0, data, keypoint_hypers(hypers), Cd, num_states, reference_compat,
                             parts=kp_parts)
    dtype = data.Y.dtype
    zeros, ones = np.zeros((num_states,), dtype), np.ones((num_states,), dtype)
    state = _with_allo(state, (zeros, ones, np.zeros((num_states, 2), dtype), ones))  # placeholders (host)
    return parts.allo_params(k_allo, state, data._replace(mask=np.zeros(data.mask.shape, data.mask.dtype)), hypers)


def init_states_given_params(
    key, x0, h0, v0, data: kslds.KeypointData, hypers: AlloHypers, params: AlloParams, reference_compat: bool,
    parts=None, kp_parts=None,
) -> AlloState:
    """States for new data under fitted parameters (allo ones included): z by FFBS given x0, h0, v0, then s (spec 7)."""
    parts, kp_parts = parts or PARTS, kp_parts or kslds.PARTS
    k_z, k_s = jax.random.split(key)
    state = AlloState(params, x0, arhmm.placeholder_labels(data.mask, num_lags(params.ar)), h0, v0,
                      np.ones(data.s0.shape, data.s0.dtype))
    state = state._replace(z=parts.labels(k_z, state, data))
    scaled = kp_parts.noise_scales(k_s, as_keypoint(state), data, keypoint_hypers(hypers),
                                   reference_compat=reference_compat)
    return state._replace(s=scaled.s)


def _with_allo(state: kslds.KeypointState, allo) -> AlloState:
    return AlloState(AlloParams(*state.params, *allo), *state[1:])


def posterior_marginals(state: AlloState, data: kslds.KeypointData) -> jax.Array:
    """p(z_t | x, h, v, params): forward-backward with the z sampler's AR + allo likelihoods, (B, T-L, S) (spec 8)."""
    return jax.vmap(hmm.smoothed_probs, in_axes=(0, None))(masked_log_likes(state, data), state.params.pi)


def predictive_log_likelihoods(state: AlloState, data: kslds.KeypointData) -> jax.Array:
    """log p(x_t, dh_t, dv_t | past) per labelled frame with z summed out: (B, T-L), zero on padding."""
    filt = jax.vmap(hmm.forward_filter, in_axes=(0, None))(masked_log_likes(state, data), state.params.pi)
    lmask = arhmm.label_mask(data.mask, num_lags(state.params.ar))
    return filt.log_normalizers * lmask.astype(filt.log_normalizers.dtype)


PARTS = SweepParts(redraw_allo_params, sample_labels, sample_emission, sweep_info)
