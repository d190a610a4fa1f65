"""Correctness of ``kpms_estimators._core.kalman`` (model spec 4.2, 4.4) against dense Gaussians.

Every reference is built here in plain NumPy float64 from the generative
description alone: the joint Gaussian of the whole lifted trajectory (prior,
transitions with the 0.01 copy noise and the padded-source rule, emissions with
the prior-conditioning frames and padded-frame variance 10), conditioned on the
observations by dense linear algebra. The core runs under ``enable_x64(True)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from kpms_estimators._compat import enable_x64
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
    roots = rng.normal(0, 0.4, (num_states, latent_dim, latent_dim))
    Q = roots @ np.swapaxes(roots, -1, -2) + 0.1 * np.eye(latent_dim)
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


# --------------------------------------------------------------------------- #
# Samplers under test
# --------------------------------------------------------------------------- #
def _as_jax(problem):
    return {name: jnp.asarray(value) for name, value in problem.items()}


@functools.lru_cache(maxsize=None)
def _latent_draws(parallel):
    """jit(vmap over keys) of sample_latent_x; the problem and jitter are traced arguments."""

    def one(key, problem, jitter):
        return kalman.sample_latent_x(key, **problem, jitter=jitter, parallel=parallel)

    return jax.jit(jax.vmap(one, in_axes=(0, None, None)))


def _draw_latent(problem, parallel=False, jitter=0.0, seed=1):
    keys = jax.random.split(jax.random.key(seed), NUM_DRAWS)
    x, log_norm = _latent_draws(parallel)(keys, _as_jax(problem), jnp.asarray(jitter))
    return np.asarray(x).reshape(NUM_DRAWS, -1), np.asarray(log_norm)


#: (n_lags, padded frames): a padded tail as in a real batch, and padded leading frames,
#: which for L >= 2 are prior-conditioning frames (true variance, mask ignored) and for
#: L = 1 give the t' = 0 emission variance 10 and a padded-source first transition.
CASES = [(1, (9, 10)), (2, (9, 10)), (3, (9, 10)), (1, (0, 10)), (3, (0, 1, 10))]


# --------------------------------------------------------------------------- #
# sample_latent_x (spec 4.2)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n_lags,pad", CASES)
def test_latent_x_matches_dense_posterior(n_lags, pad):
    """Serial FFBS with jitter = 0: draws of the unpacked x have the dense posterior's mean
    (within 5 standard errors) and covariance (every entry within 5 standard errors of the
    Gaussian sample-covariance estimator); the log-normaliser is the dense log evidence."""
    problem = _problem(seed=10 + n_lags, num_lags=n_lags, pad=pad)
    mean, cov, _, _, log_evidence = dense_latent_posterior(**problem)
    with enable_x64(True):
        x, log_norm = _draw_latent(problem)
    assert x.shape == (NUM_DRAWS, problem["ytil"].shape[0] * problem["Ab"].shape[1])
    assert_moments(x, mean, cov)
    np.testing.assert_allclose(log_norm, log_evidence, rtol=1e-8)


@pytest.mark.parametrize("n_lags", [1, 3])
def test_parallel_sampler_matches_serial(n_lags):
    """The associative-scan sampler draws from the same distribution (dense moments, with and
    without jitter) and returns the serial log-normaliser."""
    problem = _problem(seed=20 + n_lags, num_lags=n_lags)
    mean, cov, post_lifted, select, _ = dense_latent_posterior(**problem)
    with enable_x64(True):
        x_par, log_par = _draw_latent(problem, parallel=True, seed=2)
        _, log_ser = _draw_latent(problem, parallel=False, seed=3)
        x_jit, _ = _draw_latent(problem, parallel=True, jitter=0.05, seed=4)
    assert_moments(x_par, mean, cov)
    np.testing.assert_allclose(log_par, log_ser, rtol=1e-10)
    lifted = n_lags * problem["Ab"].shape[1]
    assert_moments(x_jit, mean, cov + select @ jitter_inflation(post_lifted, lifted, 0.05) @ select.T)


@pytest.mark.parametrize("block", [1, 3, 4, 8])
def test_blocked_backward_pass_gives_the_same_draws(monkeypatch, block):
    """The serial sampler's backward pass in blocks of ``block`` steps (N = 9 here: blocks that
    divide N, that don't, so the first block overlaps the next, and single steps) draws exactly
    what one block of all steps draws, for the same key, with jitter and padding."""
    key = jax.random.key(7)

    def draw(problem):
        fun = jax.jit(lambda k, p: kalman.sample_latent_x(k, **p, jitter=jnp.asarray(0.05)))
        return np.asarray(fun(key, problem)[0])

    with enable_x64(True):
        # the arrays are made inside the block: made outside they would be float32 (jax 0.6.2's
        # float32 draws differed between blockings by ~3e-8, below any float64 tolerance)
        problem = _as_jax(_problem(seed=31, num_lags=3))
        whole = draw(problem)
        monkeypatch.setattr(kalman, "BACKWARD_BLOCK", block)
        blocked = draw(problem)
    assert whole.dtype == np.float64 and np.all(np.isfinite(whole))
    np.testing.assert_allclose(blocked, whole, rtol=1e-12, atol=1e-12)


def test_jitter_inflates_backward_conditionals():
    """Drawing each X_t' | X_{t'+1} from N(m, C + jitter I) leaves the mean alone and adds the
    covariance of D_t' = G_t' D_{t'+1} + N(0, jitter I) (see ``jitter_inflation``); the
    added variance is many standard errors large, so the check has power."""
    jitter = 0.05
    problem = _problem(seed=12, num_lags=2)
    mean, cov, post_lifted, select, _ = dense_latent_posterior(**problem)
    inflated = cov + select @ jitter_inflation(post_lifted, 2 * problem["Ab"].shape[1], jitter) @ select.T
    se = np.sqrt(2 * np.diag(cov) ** 2 / NUM_DRAWS)
    assert np.max((np.diag(inflated) - np.diag(cov)) / se) > 20
    with enable_x64(True):
        x, _ = _draw_latent(problem, jitter=jitter, seed=5)
    assert np.all(np.isfinite(x))
    assert_moments(x, mean, inflated)


# --------------------------------------------------------------------------- #
# sample_random_walk (spec 4.4)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("parallel", [False, True])
def test_random_walk_matches_dense(parallel):
    """v draws against dense conditioning, with padded frames inside (their outgoing steps have
    variance 10 * sigmasq_loc): per-coordinate means and the full (T*D) covariance."""
    rng = np.random.default_rng(7)
    num_frames, dim, sigmasq_loc, prior_var = 10, 2, 0.3, 1e4
    mask = np.ones(num_frames)
    mask[[3, 4, 8]] = 0
    obs_mean = rng.normal(0, 2.0, (num_frames, dim))
    obs_var = np.where(mask > 0, rng.uniform(0.1, 1.0, num_frames), 5.0)
    mean, cov = dense_random_walk_posterior(obs_mean, obs_var, mask, sigmasq_loc, prior_var)
    with enable_x64(True):
        draw = jax.jit(
            jax.vmap(
                lambda key: kalman.sample_random_walk(
                    key, *map(jnp.asarray, (obs_mean, obs_var, mask)), sigmasq_loc, prior_var, parallel
                )
            )
        )
        v = np.asarray(draw(jax.random.split(jax.random.key(8), NUM_DRAWS)))
    assert v.shape == (NUM_DRAWS, num_frames, dim)
    full_cov = np.kron(cov, np.eye(dim))  # rows (t, d): coordinates independent, same covariance
    assert_moments(v.reshape(NUM_DRAWS, -1), mean.reshape(-1), full_cov)


# --------------------------------------------------------------------------- #
# Shapes, dtypes, vmap over segments, float32, one trace
# --------------------------------------------------------------------------- #
def _segments(num_segments=3, num_frames=20, num_lags=2, dtype=np.float64):
    """Per-segment problems (a padded tail each) sharing one set of parameters."""
    sizes = dict(num_frames=num_frames, latent_dim=3, num_states=5, pad=(num_frames - 2, num_frames - 1))
    problems = [_problem(30 + b, num_lags, **sizes) for b in range(num_segments)]
    shared = {name: jnp.asarray(problems[0][name], dtype) for name in ("Ab", "Q", "Ctil", "dtil")}
    per_segment = {
        name: jnp.asarray(np.stack([p[name] for p in problems]), dtype if name != "z" else None)
        for name in ("ytil", "obs_var", "mask", "z")
    }
    return per_segment, shared


def _walk(key, seg, parallel=False):
    """A random-walk problem made from a latent-x problem's arrays (shapes only matter)."""
    return kalman.sample_random_walk(key, seg["ytil"][:, :2], seg["obs_var"][:, 0], seg["mask"], 0.5, parallel=parallel)


def test_vmap_over_segments_shapes_dtypes_and_one_trace():
    traces = []

    @jax.jit
    def sweep(key, per_segment, shared, jitter):
        traces.append(1)
        keys = jax.random.split(key, per_segment["ytil"].shape[0])
        x, log_norm = jax.vmap(lambda k, seg: kalman.sample_latent_x(k, **seg, **shared, jitter=jitter))(
            keys, per_segment
        )
        v = jax.vmap(_walk)(keys, per_segment)
        return x, log_norm, v

    with enable_x64(True):
        per_segment, shared = _segments()
        x, log_norm, v = sweep(jax.random.key(0), per_segment, shared, 1e-3)
        per_segment["ytil"] = per_segment["ytil"] + 1.0
        sweep(jax.random.key(1), per_segment, shared, 1e-2)
    assert len(traces) == 1
    assert x.shape == (3, 20, 3) and x.dtype == jnp.float64
    assert log_norm.shape == (3,) and log_norm.dtype == jnp.float64
    assert v.shape == (3, 20, 2) and v.dtype == jnp.float64
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(log_norm)) and np.all(np.isfinite(v))


@pytest.mark.parametrize("parallel", [False, True])
def test_float32_traces_and_is_finite(parallel):
    """With x64 off, float32 inputs give float32, finite draws."""
    per_segment, shared = _segments(num_segments=1, num_frames=12, num_lags=3, dtype=np.float32)
    seg = {name: value[0] for name, value in per_segment.items()}

    @jax.jit
    def run(seg, shared):
        x, log_norm = kalman.sample_latent_x(jax.random.key(0), **seg, **shared, jitter=1e-3, parallel=parallel)
        v = _walk(jax.random.key(1), seg, parallel)
        return x, log_norm, v

    x, log_norm, v = run(seg, shared)
    assert x.dtype == jnp.float32 and log_norm.dtype == jnp.float32 and v.dtype == jnp.float32
    assert np.all(np.isfinite(x)) and np.isfinite(log_norm) and np.all(np.isfinite(v))
