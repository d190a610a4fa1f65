"""Correctness of ``kpms_estimators._core.kalman`` (model spec 4.2, 4.4) against dense Gaussians.

Every reference is built here in plain NumPy float64 from the generative
description alone: the joint Gaussian of the whole lifted trajectory (prior,
transitions with the 0.01 copy noise and the padded-source rule, emissions with
the prior-conditioning frames and padded-frame variance 10), conditioned on the
observations by dense linear algebra. The core runs under ``jax.enable_x64(True)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from kpms_estimators._core import kalman

NUM_DRAWS = 20_000
NUM_SE = 5.0  # Monte Carlo tolerance, in standard errors


# --------------------------------------------------------------------------- #
# Dense NumPy references
# --------------------------------------------------------------------------- #
def _problem(seed, num_lags, num_frames=11, latent_dim=2, num_states=3, num_keypoints=3, dim=2, pad=(9, 10)):
    rng = np.random.default_rng(seed)
    obs_dim = num_keypoints * dim
    lifted = num_lags * latent_dim
    Ab = rng.normal(0, 0.4 / np.sqrt(lifted), (num_states, latent_dim, lifted + 1))
    Ab[:, :, lifted - latent_dim : lifted] += 0.8 * np.eye(latent_dim)  # newest lag
    Q = np.stack([(lambda m: m @ m.T + 0.1 * np.eye(latent_dim))(rng.normal(0, 0.4, (latent_dim, latent_dim))) for _ in range(num_states)])
    mask = np.ones(num_frames)
    mask[list(pad)] = 0
    return dict(
        ytil=rng.normal(0, 1.5, (num_frames, obs_dim)),
        obs_var=rng.uniform(0.2, 2.0, (num_frames, obs_dim)),
        mask=mask,
        z=rng.integers(0, num_states, num_frames - num_lags),
        Ab=Ab,
        Q=Q,
        Ctil=rng.normal(0, 1.0, (obs_dim, latent_dim)),
        dtil=rng.normal(0, 0.5, obs_dim),
    )


def dense_latent_posterior(ytil, obs_var, mask, z, Ab, Q, Ctil, dtil):
    """Exact posterior of the unpacked x (T*P mean and covariance), the posterior of the
    lifted stack (N*A), and log p(ytil) of the lifted model, by dense conditioning."""
    num_frames, obs_dim = ytil.shape
    latent_dim = Ab.shape[1]
    lifted = Ab.shape[2] - 1
    num_lags = lifted // latent_dim
    num_steps = num_frames - num_lags + 1
    newest = slice(lifted - latent_dim, lifted)
    # prior of the stack X_0..X_{N-1}
    mean = np.zeros(num_steps * lifted)
    cov = np.zeros((num_steps * lifted,) * 2)
    blk = lambda t: slice(t * lifted, (t + 1) * lifted)  # noqa: E731
    cov[blk(0), blk(0)] = 10.0 * np.eye(lifted)
    for t in range(num_steps - 1):
        F = np.zeros((lifted, lifted))
        if mask[t + num_lags - 1]:
            F[: lifted - latent_dim, latent_dim:] = np.eye(lifted - latent_dim)
            F[newest] = Ab[z[t], :, :lifted]
            b = np.concatenate([np.zeros(lifted - latent_dim), Ab[z[t], :, lifted]])
            noise = np.zeros((lifted, lifted))
            noise[: lifted - latent_dim, : lifted - latent_dim] = 0.01 * np.eye(lifted - latent_dim)
            noise[newest, newest] = Q[z[t]]
        else:
            F[newest, newest] = np.eye(latent_dim)
            b = np.zeros(lifted)
            noise = 10.0 * np.eye(lifted)
        mean[blk(t + 1)] = F @ mean[blk(t)] + b
        cross = F @ cov[blk(t), : (t + 1) * lifted]
        cov[blk(t + 1), : (t + 1) * lifted] = cross
        cov[: (t + 1) * lifted, blk(t + 1)] = cross.T
        cov[blk(t + 1), blk(t + 1)] = F @ cov[blk(t), blk(t)] @ F.T + noise
    # which lifted coordinates each frame's x is (also the emission's selection)
    select = np.zeros((num_frames * latent_dim, num_steps * lifted))
    variances = np.array(obs_var, float).copy()
    for tau in range(num_frames):
        rows = slice(tau * latent_dim, (tau + 1) * latent_dim)
        if tau < num_lags - 1:
            cols = slice(tau * latent_dim, (tau + 1) * latent_dim)  # block tau of X_0, true variance
        else:
            step = tau - num_lags + 1
            cols = slice(step * lifted + lifted - latent_dim, (step + 1) * lifted)
            if not mask[tau]:
                variances[tau] = 10.0
        select[rows, cols] = np.eye(latent_dim)
    H = np.kron(np.eye(num_frames), Ctil) @ select
    y = ytil.reshape(-1) - np.tile(dtil, num_frames)
    y_cov = H @ cov @ H.T + np.diag(variances.reshape(-1))
    log_evidence = stats.multivariate_normal(H @ mean, y_cov).logpdf(y)
    gain = np.linalg.solve(y_cov, H @ cov).T
    post_mean = mean + gain @ (y - H @ mean)
    post_cov = cov - gain @ H @ cov
    post_cov = 0.5 * (post_cov + post_cov.T)
    return select @ post_mean, select @ post_cov @ select.T, post_cov, select, log_evidence


def jitter_inflation(post_cov, lifted, jitter):
    """Covariance of the extra term a backward sampler with ``jitter`` adds to the lifted stack.

    Drawing X_t | X_{t+1} from N(m, P + jitter I) equals the exact draw plus independent
    N(0, jitter I) noise pushed backward by the posterior regression coefficients
    G_t = Cov(X_t, X_{t+1} | y) Cov(X_{t+1} | y)^{-1}: D_t = G_t D_{t+1} + delta_t, D_{N-1} = 0.
    """
    num_steps = post_cov.shape[0] // lifted
    blk = lambda t: slice(t * lifted, (t + 1) * lifted)  # noqa: E731
    load = np.zeros((num_steps * lifted, (num_steps - 1) * lifted))  # D = load @ delta
    for t in range(num_steps - 2, -1, -1):
        G = np.linalg.solve(post_cov[blk(t + 1), blk(t + 1)], post_cov[blk(t + 1), blk(t)]).T
        load[blk(t)] = G @ load[blk(t + 1)]
        load[blk(t), blk(t)] += np.eye(lifted)
    return jitter * load @ load.T


def dense_random_walk_posterior(obs_mean, obs_var, mask, sigmasq_loc, prior_var):
    """Exact posterior mean (T, D) and per-coordinate covariance (T, T) of the random walk."""
    num_frames = obs_mean.shape[0]
    steps = np.array([prior_var] + [sigmasq_loc * (1.0 if mask[t - 1] else 10.0) for t in range(1, num_frames)])
    cum = np.cumsum(steps)
    cov = cum[np.minimum.outer(np.arange(num_frames), np.arange(num_frames))]
    gain = np.linalg.solve(cov + np.diag(obs_var), cov).T
    return gain @ obs_mean, cov - gain @ cov


def assert_moments(samples, mean, cov, num_se=NUM_SE):
    """Sample mean within ``num_se`` standard errors; every sample covariance entry within
    ``num_se`` standard errors sqrt((C_ii C_jj + C_ij^2) / n) of the Gaussian estimator."""
    n = samples.shape[0]
    var = np.diag(cov)
    np.testing.assert_array_less(np.abs(samples.mean(0) - mean), num_se * np.sqrt(var / n) + 1e-12)
    se = np.sqrt((np.outer(var, var) + cov**2) / n)
    np.testing.assert_array_less(np.abs(np.cov(samples, rowvar=False) - cov), num_se * se + 1e-12)
