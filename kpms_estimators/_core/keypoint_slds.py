"""The keypoint SLDS (keypoint-MoSeq): state, one Gibbs sweep, log-likelihood terms (spec 4, 6).

The AR-HMM part (beta, pi, Ab, Q, z) reuses ``arhmm``; this module adds the
keypoint emission conditionals: latent pose x (Kalman FFBS), heading h,
centroid v, local noise scales s and the global scales sigmasq.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import arhmm, kalman
from . import keypoints as kp
from .autoregressive import ARParams, ar_path_log_likelihoods, num_lags

#: Incremented each time a sweep is traced (tests assert one trace per shape).
TRACE_COUNTS = {"keypoint_slds.gibbs_step": 0, "keypoint_slds.sample_labels": 0, "keypoint_slds.sample_emission": 0,
                "keypoint_slds.emission_x": 0, "keypoint_slds.param_stats": 0}


#: Dtype of the whitened AR residuals when sampling z (``ar_log_likelihoods``): float32 makes
#: their (frames x states x P x (L P + 1)) product 4x faster on the CPU (18 -> 4 ms at 12000
#: frames, 100 states) and changes the sampled labels on fewer than 1 frame in 10^4 for the
#: same uniforms (tests/test_keypoint_slds.py, synthetic and real data). Everything else, the
#: reported log-likelihoods, marginals and scores included, stays in float64.
LABEL_RESIDUAL_DTYPE = jnp.float32
#: Dtype in which the label draw stores its (frames x segments x states) log-likelihoods, the largest
#: array of the label program (144 MB in float64 at 10 x 18000 frames, 100 states); the HMM filter
#: widens them to float64 one frame at a time. Their error is already that of the float32 residuals
#: (above); same test.
LABEL_LOG_LIKE_DTYPE = jnp.float32

#: Segments sampled together by the serial latent-pose Kalman sampler (``sample_x``, the CPU path).
#: One at a time is fastest on the CPU: 4 x 3030 frames 148 -> 120-129 ms, 8 x 3030 284 -> 248 ms
#: against chunks of 4 (same process, alternating calls); a vmap over all segments is slower
#: still once they outgrow the caches.
KALMAN_SEGMENT_CHUNK = 1


class KeypointHypers(NamedTuple):
    arhmm: arhmm.ARHMMHypers
    nu_s: jax.Array
    nu_sigma: jax.Array
    sigmasq_0: jax.Array
    sigmasq_loc: jax.Array
    jitter: jax.Array


class Switches(NamedTuple):
    """Static (trace-time) switches of a sweep (spec 4.7)."""

    ar_only: bool = False
    states_only: bool = False
    fix_heading: bool = False
    resample_global_noise_scale: bool = False
    parallel_message_passing: bool = False
    reference_compat: bool = False


class KeypointParams(NamedTuple):
    betas: jax.Array  # (S,)
    pi: jax.Array  # (S, S)
    Ab: jax.Array  # (S, P, L*P + 1)
    Q: jax.Array  # (S, P, P)
    Cd: jax.Array  # (O', P + 1), fixed during fitting
    sigmasq: jax.Array  # (K,)

    @property
    def ar(self) -> arhmm.ARHMMParams:
        return arhmm.ARHMMParams(self.betas, self.pi, self.Ab, self.Q)


class KeypointData(NamedTuple):
    Y: jax.Array  # (B, T, K, D)
    conf: jax.Array  # (B, T, K) confidences incl. the pseudocount
    mask: jax.Array  # (B, T)
    s0: jax.Array  # (B, T, K) noise prior
    Gamma: jax.Array  # (K, K-1) centring embedding


class KeypointState(NamedTuple):
    params: KeypointParams
    x: jax.Array  # (B, T, P)
    z: jax.Array  # (B, T-L)
    h: jax.Array  # (B, T)
    v: jax.Array  # (B, T, D)
    s: jax.Array  # (B, T, K)


def _with_ar(params: KeypointParams, ar: arhmm.ARHMMParams) -> KeypointParams:
    return params._replace(betas=ar.betas, pi=ar.pi, Ab=ar.Ab, Q=ar.Q)


def segment_rows(state, data: KeypointData, start, size: int):
    """``state`` and ``data`` cut to segments ``start .. start + size - 1`` (``start`` may be traced)."""
    rows = arhmm.segment_window((state.x, state.z, state.h, state.v, state.s, data.Y, data.conf, data.mask, data.s0),
                                start, size)
    x, z, h, v, s, Y, conf, mask, s0 = rows
    return state._replace(x=x, z=z, h=h, v=v, s=s), data._replace(Y=Y, conf=conf, mask=mask, s0=s0)


def sample_x(key, state: KeypointState, data: KeypointData, hypers: KeypointHypers, parallel: bool, window=None):
    """x | z, h, v, s, params by Kalman FFBS in the lifted AR state, per segment (spec 4.2).

    ``window=(start, size)`` samples only segments ``start .. start + size - 1`` (``start`` may
    be traced) with the keys they get in the whole batch: the same draws as those rows of x
    over all segments, so that groups of segments can run side by side (``sample_emission``).
    """
    params = state.params
    num_dims = data.Y.shape[-1]
    keys = jax.random.split(key, data.Y.shape[0])
    Y, v, h, s, mask, z = data.Y, state.v, state.h, state.s, data.mask, state.z
    if window is not None:
        keys, Y, v, h, s, mask, z = arhmm.segment_window((keys, Y, v, h, s, mask, z), *window)
    ytil = kp.rotate(Y - v[..., None, :], -h)
    ytil = ytil.reshape(ytil.shape[:2] + (-1,))
    obs_var = jnp.repeat(s * params.sigmasq, num_dims, axis=-1)
    Ctil, dtil = kp.lifted_emission(params.Cd, data.Gamma, num_dims)

    def one(k, y, r, m, z):
        return kalman.sample_latent_x(k, y, r, m, z, params.Ab, params.Q, Ctil, dtil, hypers.jitter, parallel)

    args = (keys, ytil, obs_var, mask, z)
    if parallel:
        return jax.vmap(one)(*args)[0]
    # serial sampler: segments one at a time (or in chunks), so that the per-step filter arrays
    # stay in cache and the cost per frame does not grow with the number of segments (spec 12.4).
    # One at a time is a plain map: ``batch_size=1`` would trace the sampler and then vmap that
    # trace again (0.37 instead of 1.1 s of tracing, 0.24 instead of 0.73 s of lowering at 4 x 3000)
    batch = KALMAN_SEGMENT_CHUNK if KALMAN_SEGMENT_CHUNK > 1 else None
    return jax.lax.map(lambda a: one(*a)[0], args, batch_size=batch)


def sample_v(key, state: KeypointState, data: KeypointData, hypers: KeypointHypers, parallel: bool):
    """v | x, h, s, params: random-walk Kalman FFBS on per-frame pseudo-observations (spec 4.4)."""
    params = state.params
    mu, g = kp.centroid_pseudo_obs(data.Y, state.x, state.h, state.s, params.sigmasq, data.mask, params.Cd, data.Gamma)
    keys = jax.random.split(key, data.Y.shape[0])

    def one(k, m, var, msk):
        return kalman.sample_random_walk(k, m, var, msk, hypers.sigmasq_loc, parallel=parallel)

    return jax.vmap(one)(keys, mu, g, data.mask)


def log_likelihood_terms(state: KeypointState, data: KeypointData, hypers: KeypointHypers) -> dict:
    """Per-term log joint of spec 6: "z", "x", "Y", "s", "v"."""
    params = state.params
    lmask = arhmm.label_mask(data.mask, num_lags(hypers.arhmm.ar)).astype(data.Y.dtype)
    terms = {
        "z": arhmm.transition_log_likelihood(state.z, params.pi, lmask),
        "x": jnp.sum(ar_path_log_likelihoods(state.x, state.z, ARParams(params.Ab, params.Q)) * lmask),
    }
    errors = kp.squared_errors(data.Y, state.x, state.h, state.v, params.Cd, data.Gamma)
    terms["Y"] = kp.emission_log_likelihood(errors, state.s, params.sigmasq, data.mask, data.Y.shape[-1])
    terms["s"] = kp.scale_log_prior(state.s, data.s0, hypers.nu_s, data.mask)
    terms["v"] = kp.centroid_log_prior(state.v, data.mask, hypers.sigmasq_loc)
    return terms


def param_stats(state: KeypointState, data: KeypointData, hypers: KeypointHypers):
    """(transition ids, AR statistics) of the current z and x: what the parameter draw needs."""
    TRACE_COUNTS["keypoint_slds.param_stats"] += 1
    return arhmm.param_stats(state.z, state.x, data.mask, state.params.betas.shape[0], num_lags(hypers.arhmm.ar))


def sample_labels(key, state: KeypointState, data: KeypointData, window=None) -> jax.Array:
    """z | x, params by FFBS per segment (spec 3.5); ``window=(start, size)``: only those segments,
    with the uniforms they get in the whole batch (``arhmm.sample_labels_grouped``)."""
    TRACE_COUNTS["keypoint_slds.sample_labels"] += 1
    data = arhmm.ARHMMData(state.x, data.mask)
    return arhmm.sample_labels_grouped(key, data, state.params.ar, LABEL_RESIDUAL_DTYPE, LABEL_LOG_LIKE_DTYPE,
                                       window=window)


def emission_switches(switches: Switches) -> Switches:
    """The switches the emission part depends on, so that fitting and applying share one compiled program
    (a states-only sweep differs from a full one only by not resampling sigmasq)."""
    resample_sigmasq = switches.resample_global_noise_scale and not switches.states_only
    return switches._replace(ar_only=False, states_only=False, resample_global_noise_scale=resample_sigmasq)


def sample_emission(key, state: KeypointState, data: KeypointData, hypers: KeypointHypers, switches: Switches):
    """Steps 3-7 of a sweep: sigmasq (if resample_global_noise_scale), x, h (unless fix_heading), v, s.

    The three pieces below, in one program; ``emission_x`` can also run per group of
    segments (the estimators run the groups side by side on the CPU's cores)."""
    state = emission_sigmasq(key, state, data, hypers, switches)
    state = state._replace(x=emission_x(key, state, data, hypers, switches))
    return emission_after_x(key, state, data, hypers, switches)


def emission_keys(key):
    """(sigmasq, x, h, v, s) keys of the emission step."""
    return jax.random.split(key, 5)


def emission_sigmasq(key, state: KeypointState, data: KeypointData, hypers: KeypointHypers, switches: Switches):
    """Step 3: sigmasq | s, x, h, v if resample_global_noise_scale (else ``state`` as is)."""
    if not switches.resample_global_noise_scale:
        return state
    params = state.params
    dof = kp.noise_dof(data.Y.shape[-1], switches.reference_compat)
    errors = kp.squared_errors(data.Y, state.x, state.h, state.v, params.Cd, data.Gamma)
    sigmasq = kp.sample_global_scales(emission_keys(key)[0], errors, state.s, data.mask, hypers.nu_sigma,
                                      hypers.sigmasq_0, dof)
    return state._replace(params=params._replace(sigmasq=sigmasq))


def emission_x(key, state: KeypointState, data: KeypointData, hypers: KeypointHypers, switches: Switches,
               window=None):
    """Step 4: x of all segments, or of ``window=(start, size)`` of them (same draws, ``sample_x``)."""
    TRACE_COUNTS["keypoint_slds.emission_x"] += 1
    return sample_x(emission_keys(key)[1], state, data, hypers, switches.parallel_message_passing, window)


def emission_after_x(key, state: KeypointState, data: KeypointData, hypers: KeypointHypers, switches: Switches):
    """Steps 5-7 given the new x: h (unless fix_heading), v, s."""
    TRACE_COUNTS["keypoint_slds.sample_emission"] += 1
    _, _, k_h, k_v, k_s = emission_keys(key)
    params = state.params
    dof = kp.noise_dof(data.Y.shape[-1], switches.reference_compat)
    if not switches.fix_heading:
        h = kp.sample_heading(k_h, data.Y, state.x, state.v, state.s, state.params.sigmasq, params.Cd, data.Gamma)
        state = state._replace(h=h)
    state = state._replace(v=sample_v(k_v, state, data, hypers, switches.parallel_message_passing))
    errors = kp.squared_errors(data.Y, state.x, state.h, state.v, params.Cd, data.Gamma)
    return state._replace(s=kp.sample_local_scales(k_s, errors, data.s0, state.params.sigmasq, hypers.nu_s, dof))


def sweep_info(state: KeypointState, data: KeypointData, hypers: KeypointHypers) -> dict:
    """The per-term log-likelihoods of a state (spec 6) and the number of states used."""
    info = log_likelihood_terms(state, data, hypers)
    lmask = arhmm.label_mask(data.mask, num_lags(hypers.arhmm.ar))
    info["n_used"] = arhmm.num_states_used(state.z, lmask, state.params.betas.shape[0])
    return info


class SweepParts(NamedTuple):
    """The pieces a sweep and the initialisation are made of. ``PARTS`` holds the plain
    functions; the estimator passes separately compiled ones, so that the AR-only and the
    full sweep, the initialisation and the states-only sweeps of ``apply`` share compiled
    programs instead of each compiling the whole (design: compile once per shape)."""

    param_stats: Callable  # (state, data, hypers) -> (pairs, stats)
    params_given_stats: Callable  # (key, betas, pairs, stats, arhmm hypers) -> ARHMMParams
    labels: Callable  # (key, state, data) -> z
    emission: Callable  # (key, state, data, hypers, switches) -> state
    info: Callable  # (state, data, hypers) -> dict
    noise_scales: Callable  # (key, state, data, hypers, reference_compat) -> state


def sweep(key, state: KeypointState, data: KeypointData, hypers: KeypointHypers, switches: Switches, parts):
    """One sweep in the order of spec 4.7 from ``parts`` (see ``gibbs_step``)."""
    k_params, k_z, k_emission = jax.random.split(key, 3)
    if not switches.states_only:
        pairs, stats = parts.param_stats(state, data, hypers)
        ar = parts.params_given_stats(k_params, state.params.betas, pairs, stats, hypers.arhmm)
        state = state._replace(params=_with_ar(state.params, ar))
    state = state._replace(z=parts.labels(k_z, state, data))
    if not switches.ar_only:
        state = parts.emission(k_emission, state, data, hypers, switches=emission_switches(switches))
    return state, parts.info(state, data, hypers)


def gibbs_step(
    key: jax.Array, state: KeypointState, data: KeypointData, hypers: KeypointHypers, switches: Switches
) -> tuple[KeypointState, dict]:
    """One sweep in the order of spec 4.7; ``switches`` is static.

    1. beta, pi, Ab, Q (unless states_only); 2. z; [ar_only stops here]
    3. sigmasq (if resample_global_noise_scale and not states_only); 4. x;
    5. h (unless fix_heading); 6. v; 7. s.
    ``info`` holds the per-term log-likelihoods of the new state and the number of
    states used.
    """
    TRACE_COUNTS["keypoint_slds.gibbs_step"] += 1
    return sweep(key, state, data, hypers, switches, PARTS)


def resample_noise_scales(key, state: KeypointState, data: KeypointData, hypers: KeypointHypers, reference_compat: bool):
    """s from its conditional given everything else (init step 2.5.7)."""
    params = state.params
    dof = kp.noise_dof(data.Y.shape[-1], reference_compat)
    errors = kp.squared_errors(data.Y, state.x, state.h, state.v, params.Cd, data.Gamma)
    return state._replace(s=kp.sample_local_scales(key, errors, data.s0, params.sigmasq, hypers.nu_s, dof))


def init_state(
    key, x0, h0, v0, data: KeypointData, hypers: KeypointHypers, Cd, num_states: int, reference_compat: bool,
    parts=None,
) -> KeypointState:
    """Transitions and AR from the prior, z by FFBS given x0, sigmasq = 1, then s (spec 2.5).

    The prior draw is the parameter conditional given no data (every transition
    masked, zero statistics), so it runs the sweep's compiled program; pi is then
    smoothed with float32's tiny as the reference's initialisation does.
    """
    parts = PARTS if parts is None else parts
    k_ar, k_z, k_s = jax.random.split(key, 3)
    dtype = data.Y.dtype
    n_lags = num_lags(hypers.arhmm.ar)
    # placeholders on the host (NumPy): no device op, hence no small compile, outside the parts
    betas = np.full((num_states,), 1.0 / num_states, dtype)
    sigmasq = np.ones(data.Y.shape[-2], dtype)
    z = arhmm.placeholder_labels(data.mask, n_lags)
    ar_shape = arhmm.ARHMMParams(betas, np.eye(num_states, dtype=dtype), *_ar_prior_shapes(hypers, num_states, dtype))
    params = KeypointParams(*ar_shape, Cd, sigmasq)
    state = KeypointState(params, x0, z, h0, v0, np.ones(data.s0.shape, data.s0.dtype))
    pairs, stats = parts.param_stats(state, data._replace(mask=np.zeros(data.mask.shape, data.mask.dtype)), hypers)
    ar = arhmm.prior_params(k_ar, pairs, stats, hypers.arhmm, parts.params_given_stats)
    state = state._replace(params=_with_ar(params, ar))
    state = state._replace(z=parts.labels(k_z, state, data))
    return parts.noise_scales(k_s, state, data, hypers, reference_compat=reference_compat)


def _ar_prior_shapes(hypers: KeypointHypers, num_states: int, dtype):
    """Placeholder (Ab, Q) of the right shapes (S, P, L*P + 1), (S, P, P) for the prior draw."""
    prior = hypers.arhmm.ar
    return (np.zeros((num_states,) + prior.M_0.shape, dtype), np.zeros((num_states,) + prior.S_0.shape, dtype))


def init_states_given_params(
    key, x0, h0, v0, data: KeypointData, hypers: KeypointHypers, params: KeypointParams, reference_compat: bool,
    parts=None,
) -> KeypointState:
    """States for new data under fitted parameters: z by FFBS given x0, then s (spec 7 step 1)."""
    parts = PARTS if parts is None else parts
    k_z, k_s = jax.random.split(key)
    z = arhmm.placeholder_labels(data.mask, num_lags(params.ar))
    state = KeypointState(params, x0, z, h0, v0, np.ones(data.s0.shape, data.s0.dtype))
    state = state._replace(z=parts.labels(k_z, state, data))
    return parts.noise_scales(k_s, state, data, hypers, reference_compat=reference_compat)


def posterior_marginals(state: KeypointState, data: KeypointData) -> jax.Array:
    """p(z_t | x, Ab, Q, pi) given the current latent trajectory: (B, T-L, S) (spec 8)."""
    return arhmm.posterior_marginals(arhmm.ARHMMData(state.x, data.mask), state.params.ar)


def predictive_log_likelihoods(state: KeypointState, data: KeypointData) -> jax.Array:
    """log p(x_t | x_{<t}) per labelled frame with z summed out (spec 9's quantity): (B, T-L)."""
    return arhmm.predictive_log_likelihoods(arhmm.ARHMMData(state.x, data.mask), state.params.ar)


PARTS = SweepParts(param_stats, arhmm.sample_params_given_stats, sample_labels, sample_emission, sweep_info,
                   resample_noise_scales)
