"""Correctness of ``kpms_estimators._core.allo`` (model spec 5, 6) against closed forms and dense Gaussians.

References are computed here in plain NumPy float64 from the generative
description: the normal-inverse-gamma posterior in its textbook form, and the
Gaussian (Laplace) approximation of the joint (h, v) posterior at its mode,
found by Gauss-Newton on the full nonlinear model. The core runs under
``enable_x64(True)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from kpms_estimators._compat import enable_x64
from kpms_estimators._core import allo
from kpms_estimators._core.keypoints import wrap_angle

NUM_SE = 5.0  # Monte Carlo tolerance, in standard errors


@pytest.fixture(autouse=True)
def _float64():
    with enable_x64(True):
        yield


def _rotate(vec, angle):
    cos, sin = np.cos(angle)[..., None], np.sin(angle)[..., None]
    return np.concatenate([cos * vec[..., :1] - sin * vec[..., 1:2], sin * vec[..., :1] + cos * vec[..., 1:2]], -1)


# --------------------------------------------------------------------------- #
# Normal-inverse-gamma conditionals (spec 5.2)
# --------------------------------------------------------------------------- #
PRIOR = dict(alpha0=10.0, beta0=0.1, lambda0=1.0)
_sample_nig = jax.jit(allo.sample_normal_inverse_gamma)


def _nig_posterior(data, alpha0, beta0, lambda0):
    """Textbook NIG posterior (prior mean 0) of n vectors ``data`` (n, d): mu_n, lambda_n, alpha_n, beta_n."""
    n, dim = data.shape
    if n == 0:
        return np.zeros(dim), lambda0, alpha0, beta0
    ybar = data.mean(0)
    lambda_n = lambda0 + n
    within = np.sum((data - ybar) ** 2)
    beta_n = beta0 + 0.5 * within + n * lambda0 * np.sum(ybar**2) / (2 * lambda_n)
    return n * ybar / lambda_n, lambda_n, alpha0 + dim * n / 2, beta_n


@pytest.fixture(scope="module")
def allo_data():
    """Heading changes and egocentric steps of 3 segments with padding, labelled by 4 states (state 3 unused)."""
    rng = np.random.default_rng(0)
    num_segments, num_frames, n_lags = 3, 40, 2
    h = np.cumsum(rng.normal(0.2, 0.5, (num_segments, num_frames)), axis=1)  # unwrapped, many turns
    v = np.cumsum(rng.normal(0, 2.0, (num_segments, num_frames, 2)), axis=1)
    mask = np.ones((num_segments, num_frames))
    mask[1, 30:] = 0
    mask[2, 25:] = 0
    z = rng.integers(0, 3, (num_segments, num_frames - n_lags))
    return dict(h=h, v=v, mask=mask, z=z, n_lags=n_lags)


def _numpy_changes(h, v, mask, z, n_lags):
    """Per-state lists of dh (n,) and dv (n, 2) over labelled real frames, from the definitions (spec 5.1)."""
    dh, dv = {}, {}
    for b in range(h.shape[0]):
        for t in range(n_lags, h.shape[1]):
            if mask[b, t]:
                k = z[b, t - n_lags]
                dh.setdefault(k, []).append(np.angle(np.exp(1j * (h[b, t] - h[b, t - 1]))))
                step = v[b, t] - v[b, t - 1]
                c, s = np.cos(h[b, t - 1]), np.sin(h[b, t - 1])
                dv.setdefault(k, []).append([c * step[0] + s * step[1], -s * step[0] + c * step[1]])
    return dh, dv


def test_sufficient_stats_match_definitions(allo_data):
    d = allo_data
    lmask = d["mask"][:, d["n_lags"] :]
    got = allo.allo_sufficient_stats(
        allo.heading_changes(jnp.asarray(d["h"]), d["n_lags"]),
        allo.egocentric_steps(jnp.asarray(d["h"]), jnp.asarray(d["v"]), d["n_lags"]),
        jnp.asarray(d["z"]), jnp.asarray(lmask), 4,
    )
    dh, dv = _numpy_changes(**d)
    for k in range(4):
        h_k, v_k = np.asarray(dh.get(k, [])), np.asarray(dv.get(k, np.zeros((0, 2))))
        np.testing.assert_allclose(got.count[k], len(h_k))
        np.testing.assert_allclose(got.sum_dh[k], h_k.sum(), atol=1e-12)
        np.testing.assert_allclose(got.sumsq_dh[k], np.sum(h_k**2), atol=1e-12)
        np.testing.assert_allclose(got.sum_dv[k], v_k.sum(0), atol=1e-10)
        np.testing.assert_allclose(got.sumsq_dv[k], np.sum(v_k**2), atol=1e-9)
    assert got.count[3] == 0


@pytest.mark.parametrize("which", ["heading", "velocity"])
def test_nig_conditional_matches_closed_form_posterior(allo_data, which):
    """Draws of (mean, var) per state against the exact NIG posterior moments (textbook form, NumPy float64):
    E[var] = beta_n/(alpha_n-1), Var[var] = E[var]^2/(alpha_n-2), E[mean] = mu_n,
    Var[mean] = E[var]/lambda_n (per axis), and mean | var has variance var/lambda_n
    (the reference's var/lambda_n noise scale fails this)."""
    d = allo_data
    dh, dv = _numpy_changes(**d)
    groups = dh if which == "heading" else dv
    num_draws, num_states = 20_000, 4
    data = [np.asarray(groups.get(k, [])).reshape(-1, 1 if which == "heading" else 2) for k in range(num_states)]
    count = np.repeat([len(a) for a in data], num_draws).astype(float)
    total = np.repeat([a.sum(0) if len(a) else np.zeros(a.shape[1]) for a in data], num_draws, axis=0)
    sumsq = np.repeat([np.sum(a**2) for a in data], num_draws)
    mean, var = _sample_nig(jax.random.key(1), jnp.asarray(count), jnp.asarray(total), jnp.asarray(sumsq),
                            *PRIOR.values())
    mean = np.asarray(mean).reshape(num_states, num_draws, -1)
    var = np.asarray(var).reshape(num_states, num_draws)
    for k in range(num_states):
        mu_n, lambda_n, alpha_n, beta_n = _nig_posterior(data[k], **PRIOR)
        e_var = beta_n / (alpha_n - 1)
        sd_var = e_var / np.sqrt(alpha_n - 2)
        assert abs(var[k].mean() - e_var) < NUM_SE * sd_var / np.sqrt(num_draws)
        np.testing.assert_allclose(var[k].std(), sd_var, rtol=0.06)
        sd_mean = np.sqrt(e_var / lambda_n)
        assert np.all(np.abs(mean[k].mean(0) - mu_n) < NUM_SE * sd_mean / np.sqrt(num_draws))
        np.testing.assert_allclose(mean[k].std(0), sd_mean, rtol=0.03)
        # conditional scale: (mean - mu_n) * sqrt(lambda_n / var) is standard normal given var
        white = (mean[k] - mu_n) * np.sqrt(lambda_n / var[k])[:, None]
        assert stats.kstest(white.ravel(), "norm").pvalue > 1e-3
        assert abs(np.corrcoef(np.abs(white[:, 0]), var[k])[0, 1]) < 0.03


def test_allo_log_likelihoods_match_scipy(allo_data):
    d = allo_data
    rng = np.random.default_rng(3)
    num_states = 4
    params = allo.AlloParams(*(np.zeros(1),) * 6, delta_h=rng.normal(0, 0.2, num_states),
                             sigmasq_h=rng.uniform(0.05, 0.3, num_states), delta_v=rng.normal(0, 1, (num_states, 2)),
                             sigmasq_v=rng.uniform(0.5, 4, num_states))
    dh = np.asarray(allo.heading_changes(jnp.asarray(d["h"]), d["n_lags"]))
    dv = np.asarray(allo.egocentric_steps(jnp.asarray(d["h"]), jnp.asarray(d["v"]), d["n_lags"]))
    got = np.asarray(allo.allo_log_likelihoods(jnp.asarray(dh), jnp.asarray(dv), params))
    expected = stats.norm.logpdf(dh[..., None], params.delta_h, np.sqrt(params.sigmasq_h)) + np.sum(
        stats.norm.logpdf(dv[..., None, :], params.delta_v, np.sqrt(params.sigmasq_v)[:, None]), axis=-1)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    lmask = d["mask"][:, d["n_lags"] :]
    hv = allo.location_log_likelihood(jnp.asarray(d["h"]), jnp.asarray(d["v"]), jnp.asarray(d["z"]),
                                      jnp.asarray(lmask), params, d["n_lags"])
    path = np.take_along_axis(expected, d["z"][..., None], -1)[..., 0]
    np.testing.assert_allclose(float(hv), np.sum(path * lmask), rtol=1e-12)


# --------------------------------------------------------------------------- #
# Joint (h, v) sampler (spec 5.4)
# --------------------------------------------------------------------------- #
def _toy(seed, num_frames, num_keypoints, *, delta_h, delta_v, sigmasq_h, sigmasq_v, obs_var, heading0=0.3,
         spread=5.0):
    """A trajectory and observations drawn from the (h, v) model with fixed aligned predictions yhat."""
    rng = np.random.default_rng(seed)
    delta_h, delta_v = np.asarray(delta_h, float), np.asarray(delta_v, float)
    sigmasq_h, sigmasq_v = np.asarray(sigmasq_h, float), np.asarray(sigmasq_v, float)
    num_states = len(delta_h)
    labels = rng.integers(0, num_states, num_frames - 1)
    yhat = rng.normal(0, spread, (num_frames, num_keypoints, 2))
    yhat -= yhat.mean(1, keepdims=True)
    h = np.empty(num_frames)
    v = np.empty((num_frames, 2))
    h[0], v[0] = heading0, rng.normal(0, 20, 2)
    for j in range(num_frames - 1):
        k = labels[j]
        h[j + 1] = h[j] + delta_h[k] + np.sqrt(sigmasq_h[k]) * rng.normal()
        v[j + 1] = v[j] + _rotate(delta_v[k], h[j]) + np.sqrt(sigmasq_v[k]) * rng.normal(size=2)
    var = np.full((num_frames, num_keypoints), obs_var) * rng.uniform(0.5, 1.5, (num_frames, num_keypoints))
    y = _rotate(yhat, h[:, None]) + v[:, None] + np.sqrt(var)[..., None] * rng.normal(size=yhat.shape)
    params = dict(delta_h=delta_h, sigmasq_h=sigmasq_h, delta_v=delta_v, sigmasq_v=sigmasq_v)
    return dict(y=y, yhat=yhat, obs_var=var, mask=np.ones(num_frames), labels=labels, **params), h, v


#: One shape for every sampler test (one compilation): frames, keypoints, draws.
NUM_FRAMES, NUM_KEYPOINTS, NUM_DRAWS = 40, 5, 20_000
_SAMPLE = jax.jit(jax.vmap(allo.sample_heading_and_centroid, in_axes=(0,) + (None,) * 11))


def _draws(problem, lin_heading0, seed=0, pad_obs_var=allo.PAD_OBS_VARIANCE):
    keys = jax.random.split(jax.random.key(seed), NUM_DRAWS)
    names = ("y", "yhat", "obs_var", "mask", "labels", "delta_h", "sigmasq_h", "delta_v", "sigmasq_v")
    h, v = _SAMPLE(keys, *(jnp.asarray(problem[n]) for n in names), jnp.asarray(lin_heading0),
                   jnp.asarray(pad_obs_var))
    return np.concatenate([np.asarray(h)[..., None], np.asarray(v)], axis=-1)  # (draws, T, 3)


def dense_laplace(y, yhat, obs_var, mask, labels, delta_h, sigmasq_h, delta_v, sigmasq_v, start):
    """Mode (T, 3) and covariance (3T, 3T) of the Gaussian (Laplace) approximation of p(h, v | y) of the
    full nonlinear model, by Gauss-Newton from ``start``. Residuals, whitened:
    prior (u_0 - (0, mean_k y_0k)) / 100; dynamics (u_{j+1} - u_j - mask_j (dh, R(h_j) dv)) / sqrt(q_j);
    emission sqrt(w_tk) (y_tk - R(h_t) yhat_tk - v_t), w = 1/obs_var on real frames, 1e-4 on padding."""
    num_frames, num_keypoints = obs_var.shape
    weight = np.where(mask[:, None] > 0, 1 / obs_var, 1 / allo.PAD_OBS_VARIANCE)
    prior_mean = np.concatenate([[0.0], y[0].mean(0)])
    n = 3 * num_frames

    def residual_and_jacobian(u):
        rows, jac = [], []
        first = np.zeros((3, n))
        first[:, :3] = np.eye(3) / 100.0
        rows.append((u[0] - prior_mean) / 100.0)
        jac.append(first)
        for j in range(num_frames - 1):
            k = labels[j]
            q = np.array([sigmasq_h[k], sigmasq_v[k], sigmasq_v[k]]) if mask[j + 1] else np.full(3, 1e8)
            drift = mask[j] * np.concatenate([[delta_h[k]], _rotate(delta_v[k], u[j, 0])])
            rows.append((u[j + 1] - u[j] - drift) / np.sqrt(q))
            block = np.zeros((3, n))
            d_prev = -np.eye(3)
            d_prev[1:, 0] -= mask[j] * _rotate(delta_v[k], u[j, 0] + np.pi / 2)
            block[:, 3 * j : 3 * j + 3] = d_prev / np.sqrt(q)[:, None]
            block[:, 3 * j + 3 : 3 * j + 6] = np.eye(3) / np.sqrt(q)[:, None]
            jac.append(block)
        for t in range(num_frames):
            root = np.sqrt(weight[t])[:, None]
            rows.append((root * (y[t] - _rotate(yhat[t], u[t, 0]) - u[t, 1:])).ravel())
            block = np.zeros((num_keypoints, 2, n))
            block[:, :, 3 * t] = -root * _rotate(yhat[t], u[t, 0] + np.pi / 2)
            block[:, :, 3 * t + 1 : 3 * t + 3] = -root[..., None] * np.eye(2)
            jac.append(block.reshape(-1, n))
        return np.concatenate(rows), np.concatenate(jac)

    u = np.array(start, float)
    for _ in range(50):
        res, jac = residual_and_jacobian(u)
        step = np.linalg.lstsq(jac, -res, rcond=None)[0]
        u = u + step.reshape(num_frames, 3)
        if np.max(np.abs(step)) < 1e-12:
            break
    _, jac = residual_and_jacobian(u)
    return u, np.linalg.inv(jac.T @ jac)


def test_sampler_matches_dense_gaussian_when_nearly_linear():
    """Small heading changes and precise keypoints: the posterior is Gaussian to high accuracy, and the
    sampler's mean and covariance (40 frames x (h, vx, vy), 20000 draws) match the dense Laplace ones:
    mean within 5 standard errors (+1e-4 for the remaining nonlinearity), every standard deviation within
    4%, and the whole covariance: whitened by the dense one, all eigenvalues within [0.8, 1.2]."""
    problem, h_true, v_true = _toy(1, NUM_FRAMES, NUM_KEYPOINTS, delta_h=[0.02, -0.01], sigmasq_h=[4e-4, 1e-4],
                                   delta_v=[[1.0, 0.2], [0.0, -0.5]], sigmasq_v=[0.3, 0.1], obs_var=0.5)
    draws = _draws(problem, lin_heading0=h_true[0] + 0.05)
    mode, cov = dense_laplace(**problem, start=np.column_stack([h_true, v_true]))
    flat = draws.reshape(NUM_DRAWS, -1)
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_array_less(np.abs(flat.mean(0) - mode.ravel()), NUM_SE * sd / np.sqrt(NUM_DRAWS) + 1e-4)
    np.testing.assert_allclose(flat.std(0), sd, rtol=0.04)
    # whitened by the dense covariance, the draws have identity covariance: with n = 120 dimensions and
    # N draws, sampling noise alone spreads its eigenvalues over (1 +- sqrt(n/N))^2 = [0.85, 1.16]
    white = np.linalg.solve(np.linalg.cholesky(cov), (flat - flat.mean(0)).T)
    eig = np.linalg.eigvalsh(white @ white.T / (NUM_DRAWS - 1))
    assert 0.8 < eig.min() and eig.max() < 1.2, (eig.min(), eig.max())


def test_sampler_tracks_a_strongly_rotating_heading():
    """0.5 rad per frame (a full turn every 12.6 frames, 3 turns) from a start near pi, where a filter
    linearised at 0 would be stuck. The posterior sd of the heading is 0.03-0.05 rad (dense Laplace);
    over 20000 draws x 40 frames: 99.9% of the draws within 0.2 rad of the true heading, median error
    < 0.05 rad, and 99.9% of the centroid draws within 1.5 units (posterior sd <= 0.35). The draws agree
    with the dense Laplace posterior: every mean within 5 sd / sqrt(draws) + 0.01 of its mode."""
    problem, h_true, v_true = _toy(2, NUM_FRAMES, NUM_KEYPOINTS, delta_h=[0.5, 0.45], sigmasq_h=[1e-3, 1e-3],
                                   delta_v=[[2.0, 0.0], [1.0, 0.5]], sigmasq_v=[0.2, 0.2], obs_var=1.0,
                                   heading0=3.0)
    draws = _draws(problem, lin_heading0=float(wrap_angle(jnp.asarray(h_true[0] + 0.2))))
    err = np.abs(np.angle(np.exp(1j * (draws[..., 0] - h_true))))
    assert np.quantile(err, 0.999) < 0.2, np.quantile(err, 0.999)
    assert np.median(err) < 0.05, np.median(err)
    assert np.quantile(np.abs(draws[..., 1:] - v_true), 0.999) < 1.5
    # unwrapped: the heading accumulates the turns instead of jumping by 2 pi
    assert np.all(np.abs(np.diff(draws[..., 0], axis=1)) < 1.0)
    mode, cov = dense_laplace(**problem, start=np.column_stack([h_true, v_true]))
    diff = draws.mean(0) - mode
    diff[:, 0] = np.angle(np.exp(1j * diff[:, 0]))
    sd = np.sqrt(np.diag(cov)).reshape(NUM_FRAMES, 3)
    np.testing.assert_array_less(np.abs(diff), NUM_SE * sd / np.sqrt(NUM_DRAWS) + 0.01)


def test_padded_frames_do_not_pin_the_state():
    """The last 8 of 40 frames are padding (the last real frame repeated). Real frames are unaffected by
    what the padded frames hold (same key: draws agree to 1e-6), and padded frames are left loose:
    their centroid spread across draws is > 10x that of real frames. With the reference's padded
    variance of 0.01 (spec 14 #16) they would be pinned to the repeated frame."""
    problem, h_true, _ = _toy(3, NUM_FRAMES, NUM_KEYPOINTS, delta_h=[0.1], sigmasq_h=[1e-3],
                              delta_v=[[1.0, 0.0]], sigmasq_v=[0.3], obs_var=0.5)
    problem["mask"][32:] = 0
    problem["y"][32:] = problem["y"][31]
    problem["obs_var"][32:] = problem["obs_var"][31]
    lin = float(h_true[0])
    draws = _draws(problem, lin)
    other = dict(problem, y=problem["y"].copy())
    other["y"][32:] += 300.0
    np.testing.assert_allclose(_draws(other, lin)[:, :32], draws[:, :32], atol=1e-6)
    spread_real = draws[:, :32, 1:].std(0).mean()
    spread_pad = draws[:, 33:, 1:].std(0).mean()
    assert spread_pad > 10 * spread_real, (spread_pad, spread_real)
    # the test discriminates: the reference's tiny padded variance pins the padded frames
    pinned = _draws(problem, lin, seed=1, pad_obs_var=0.01)
    assert pinned[:, 33:, 1:].std(0).mean() < 2 * spread_real


def test_transition_labels_and_changes():
    z = jnp.asarray([[4, 5, 6], [1, 1, 2]])
    np.testing.assert_array_equal(allo.transition_labels(z, 3), [[4, 4, 4, 5, 6], [1, 1, 1, 1, 2]])
    np.testing.assert_array_equal(allo.transition_labels(z, 1), z)
    h = jnp.asarray([[0.0, 3.0, -3.0]])
    np.testing.assert_allclose(allo.heading_changes(h, 1), [[3.0, 2 * np.pi - 6.0]])


# --------------------------------------------------------------------------- #
# Composed pieces: syllable likelihoods and 3D locations
# --------------------------------------------------------------------------- #
def _tiny_state(num_dims, seed=0, num_segments=2, num_frames=60, num_keypoints=4, n_lags=2, num_states=3):
    """A small chain state and data drawn from the location-aware model (pose fixed: latent_dim 1, C = 0)."""
    from kpms_estimators._core import keypoint_slds as kslds
    from kpms_estimators._core.keypoints import centring_embedding

    rng = np.random.default_rng(seed)
    gamma = centring_embedding(num_keypoints)
    template = rng.normal(0, 5, (num_keypoints, num_dims))
    template -= template.mean(0)
    Cd = np.concatenate([np.zeros(((num_keypoints - 1) * num_dims, 1)), (gamma.T @ template).reshape(-1, 1)], 1)
    z = rng.integers(0, num_states, (num_segments, num_frames - n_lags))
    h = np.cumsum(rng.normal(0.1, 0.05, (num_segments, num_frames)), axis=1)
    v = np.cumsum(rng.normal(0, 0.7, (num_segments, num_frames, num_dims)), axis=1)
    world = np.concatenate([_rotate(template[None, None, :, :2], h[..., None]),
                            np.broadcast_to(template[..., 2:], (num_segments, num_frames) + template[..., 2:].shape)],
                           axis=-1)
    Y = world + v[:, :, None] + 0.3 * rng.normal(size=world.shape)
    mask = np.ones((num_segments, num_frames))
    mask[1, -5:] = 0
    latent = 1
    Ab = np.zeros((num_states, latent, n_lags * latent + 1))
    Ab[:, :, n_lags * latent - 1] = 0.9
    params = allo.AlloParams(
        betas=np.full(num_states, 1 / num_states), pi=np.full((num_states,) * 2, 1 / num_states), Ab=Ab,
        Q=np.ones((num_states, 1, 1)), Cd=Cd, sigmasq=np.ones(num_keypoints),
        delta_h=rng.normal(0.1, 0.05, num_states), sigmasq_h=np.full(num_states, 0.01),
        delta_v=rng.normal(0, 0.5, (num_states, 2)), sigmasq_v=np.full(num_states, 0.5))
    state = allo.AlloState(params, x=rng.normal(size=(num_segments, num_frames, latent)), z=z, h=h, v=v,
                           s=np.full((num_segments, num_frames, num_keypoints), 0.09))
    data = kslds.KeypointData(Y=Y, conf=np.ones(mask.shape + (num_keypoints,)), mask=mask,
                              s0=np.full(mask.shape + (num_keypoints,), 0.09), Gamma=gamma)
    return jax.tree_util.tree_map(jnp.asarray, (state, data))


def test_syllable_log_likelihoods_and_marginals_include_the_allo_term():
    from kpms_estimators._core import arhmm, hmm

    state, data = _tiny_state(2)
    n_lags = 2
    got = np.asarray(allo.masked_log_likes(state, data))
    ar = np.asarray(arhmm.masked_log_likes(arhmm.ARHMMData(state.x, data.mask), state.params.ar))
    dh = allo.heading_changes(state.h, n_lags)
    dv = allo.egocentric_steps(state.h, state.v, n_lags)
    extra = np.asarray(allo.allo_log_likelihoods(dh, dv, state.params)) * np.asarray(data.mask)[:, n_lags:, None]
    np.testing.assert_allclose(got, ar + extra, rtol=1e-12)
    marginals = np.asarray(allo.posterior_marginals(state, data))
    for b in range(2):
        np.testing.assert_allclose(marginals[b], hmm.smoothed_probs(jnp.asarray(ar + extra)[b], state.params.pi),
                                   rtol=1e-10)
    predictive = np.asarray(allo.predictive_log_likelihoods(state, data))
    filt = hmm.forward_filter(jnp.asarray(ar + extra)[0], state.params.pi)
    np.testing.assert_allclose(predictive[0], filt.log_normalizers, rtol=1e-12)
    assert np.all(predictive[1, -5:] == 0)


def test_three_dimensional_locations_and_terms():
    """3D: (h, x, y) by the EKF, the height by its random walk of variance 1 (spec 5.4); the log joint has
    "hv" and "height" and no "v" (spec 14 #15)."""
    from kpms_estimators._core import arhmm
    from kpms_estimators._core import keypoints as kp
    from kpms_estimators._core.autoregressive import make_ar_prior

    state, data = _tiny_state(3)
    ar = arhmm.ARHMMHypers(None, None, None, make_ar_prior(1, 2, 0.01, 10.0, jnp.float64))
    hypers = allo.AlloHypers(ar, nu_s=jnp.asarray(5.0), nu_sigma=None, sigmasq_0=None, sigmasq_loc=jnp.asarray(0.5),
                             jitter=None, allo=None, sigmasq_height=jnp.asarray(1.0))
    h, v = jax.jit(allo.sample_location, static_argnums=4)(jax.random.key(0), state, data, hypers, False)
    real = np.asarray(data.mask) > 0
    true_h, true_v = np.asarray(state.h), np.asarray(state.v)
    assert np.max(np.abs(np.angle(np.exp(1j * (np.asarray(h) - true_h))))[real]) < 0.2
    assert np.max(np.abs(np.asarray(v) - true_v)[real]) < 1.0  # noise sd 0.3 per keypoint, 4 keypoints
    state = state._replace(h=h, v=v)
    terms = allo.log_likelihood_terms(state, data, hypers)
    assert set(terms) == {"z", "x", "Y", "s", "hv", "height"}
    np.testing.assert_allclose(terms["height"], kp.centroid_log_prior(v[..., 2:], data.mask, 1.0), rtol=1e-12)
    lmask = np.asarray(data.mask)[:, 2:]
    np.testing.assert_allclose(terms["hv"], allo.location_log_likelihood(h, v, state.z, lmask, state.params, 2))
