"""Correctness of ``kpms_estimators._core.autoregressive``, ``distributions`` (MNIW and
inverse-Wishart samplers) and one ``arhmm.gibbs_step`` (model spec 3.1, 3.2, 3.5, 3.6, 6).

Reference values are computed here in plain NumPy/SciPy float64 (loops, np.linalg,
scipy.stats); the core runs under ``enable_x64(True)``. Monte Carlo checks use
20000 draws produced by one jitted, vmapped call and compare within 5 standard errors
per entry (standard errors estimated from the draws unless a closed form is used).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from kpms_estimators._compat import enable_x64
from kpms_estimators._core import arhmm, distributions
from kpms_estimators._core import autoregressive as ar

NUM_MC = 20_000


# --------------------------------------------------------------------------- #
# NumPy helpers
# --------------------------------------------------------------------------- #
def random_spd(rng, dim, scale=1.0, ridge=0.5):
    a = rng.normal(size=(dim, dim))
    return scale * (a @ a.T / dim + ridge * np.eye(dim))


def np_lagged(x: np.ndarray, n_lags: int) -> np.ndarray:
    """xbar+_t = [x_{t-L}; ...; x_{t-1}; 1] for t = L..T-1 (one segment, loops)."""
    rows = []
    for t in range(n_lags, x.shape[0]):
        rows.append(np.concatenate([x[t - n_lags + lag] for lag in range(n_lags)] + [np.ones(1)]))
    return np.array(rows)


def np_ar_loglik(x: np.ndarray, Ab: np.ndarray, Q: np.ndarray, n_lags: int) -> np.ndarray:
    """(T-L, S) log N(x_t | Ab_k xbar+_t, Q_k) with scipy."""
    xbar = np_lagged(x, n_lags)
    out = np.zeros((x.shape[0] - n_lags, Ab.shape[0]))
    for k in range(Ab.shape[0]):
        for i, t in enumerate(range(n_lags, x.shape[0])):
            out[i, k] = stats.multivariate_normal.logpdf(x[t], Ab[k] @ xbar[i], Q[k])
    return out


def np_mniw_posterior(xx, yx, yy, n, nu_0, S_0, M_0, K_0):
    """Spec 3.2, straight from the formulas with np.linalg.inv."""
    K0_inv = np.linalg.inv(K_0)
    Kn = np.linalg.inv(K0_inv + xx)
    Mn = (M_0 @ K0_inv + yx) @ Kn
    Sn = S_0 + yy + M_0 @ K0_inv @ M_0.T - Mn @ np.linalg.inv(Kn) @ Mn.T
    return nu_0 + n, Sn, Mn, Kn


def simulate_ar(rng, num_segments, num_frames, latent_dim, n_lags):
    """A stable AR(L) trajectory per segment (stationary-ish, O(1) values)."""
    x = np.zeros((num_segments, num_frames, latent_dim))
    x[:, :n_lags] = rng.normal(size=(num_segments, n_lags, latent_dim))
    coef = 0.8 / n_lags
    for t in range(n_lags, num_frames):
        x[:, t] = coef * x[:, t - n_lags : t].sum(axis=1) + 0.3 * rng.normal(size=(num_segments, latent_dim))
    return x


def mc_mean_ok(samples, expected, axis=0, k=5.0):
    """|sample mean - expected| <= k * (sample std / sqrt(N)) elementwise."""
    se = samples.std(axis=axis) / np.sqrt(samples.shape[axis])
    return np.abs(samples.mean(axis=axis) - expected) <= k * se + 1e-12


# --------------------------------------------------------------------------- #
# Deterministic pieces
# --------------------------------------------------------------------------- #
def test_lagged_features_order():
    """Oldest lag first, then the constant 1 (spec 0.1), for a batch of segments."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 3))
    with enable_x64(True):
        out = np.asarray(ar.lagged_features(jnp.asarray(x), 3))
    assert out.shape == (2, 6, 10)
    for b in range(2):
        np.testing.assert_array_equal(out[b], np_lagged(x[b], 3))


def test_make_ar_prior_is_random_walk():
    """M_0 xbar+_t = x_{t-1} (prior mean: x_t = x_{t-1}), nu_0 = P + 2, S_0, K_0 scaled identities."""
    rng = np.random.default_rng(1)
    P, L = 3, 2
    x = rng.normal(size=(7, P))
    with enable_x64(True):
        prior = ar.make_ar_prior(P, L, 0.01, 10.0, jnp.float64)
        M_0 = np.asarray(prior.M_0)
        assert prior.M_0.dtype == jnp.float64
        assert ar.num_lags(prior) == L
        np.testing.assert_allclose(float(prior.nu_0), P + 2)
        np.testing.assert_allclose(np.asarray(prior.S_0), 0.01 * np.eye(P))
        np.testing.assert_allclose(np.asarray(prior.K_0), 10.0 * np.eye(L * P + 1))
    np.testing.assert_allclose(np_lagged(x, L) @ M_0.T, x[L - 1 : -1])


def test_ar_log_likelihoods_match_scipy():
    """log N(x_t | A_k xbar_t + b_k, Q_k) for every state and frame t >= L (not masked)."""
    rng = np.random.default_rng(2)
    S, P, L, T = 3, 2, 2, 8
    x = rng.normal(size=(2, T, P))
    Ab = rng.normal(scale=0.5, size=(S, P, L * P + 1))
    Q = np.stack([random_spd(rng, P, 0.3) for _ in range(S)])
    with enable_x64(True):
        out = ar.ar_log_likelihoods(jnp.asarray(x), ar.ARParams(jnp.asarray(Ab), jnp.asarray(Q)))
        assert out.dtype == jnp.float64
        out = np.asarray(out)
    assert out.shape == (2, T - L, S)
    for b in range(2):
        np.testing.assert_allclose(out[b], np_ar_loglik(x[b], Ab, Q, L), rtol=1e-10, atol=1e-10)


def test_ar_path_and_time_major_log_likelihoods_match_scipy():
    """Along a state path: log N(x_t | A_{z_t} xbar_t + b, Q_{z_t}); and the time-major layout
    of the all-states log-likelihoods is the transpose of the batch-major one."""
    rng = np.random.default_rng(5)
    S, P, L, T = 4, 3, 2, 9
    x = rng.normal(size=(2, T, P))
    z = rng.integers(0, S, size=(2, T - L))
    Ab = rng.normal(scale=0.5, size=(S, P, L * P + 1))
    Q = np.stack([random_spd(rng, P, 0.3) for _ in range(S)])
    with enable_x64(True):
        params = ar.ARParams(jnp.asarray(Ab), jnp.asarray(Q))
        path = np.asarray(ar.ar_path_log_likelihoods(jnp.asarray(x), jnp.asarray(z, jnp.int32), params))
        both = [np.asarray(ar.ar_log_likelihoods(jnp.asarray(x), params, time_major=tm)) for tm in (False, True)]
    assert path.shape == (2, T - L)
    for b in range(2):
        expected = np_ar_loglik(x[b], Ab, Q, L)
        np.testing.assert_allclose(path[b], expected[np.arange(T - L), z[b]], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(both[1], np.swapaxes(both[0], 0, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [2048, 7, 54], ids=["one-block", "blocks-padded", "blocks-exact"])
def test_ar_sufficient_stats_match_loop(chunk, monkeypatch):
    """Per-state sums over frames t >= L with mask_t = 1 and z_t = k; masked frames
    (whatever their label) are excluded. Also in blocks of ``chunk`` frames (54 = 3 x 18
    frames: one exact block; 7: blocks with a zero-weight padded tail)."""
    monkeypatch.setattr(ar, "STATS_CHUNK", chunk)
    rng = np.random.default_rng(3)
    B, T, P, L, S = 3, 20, 2, 2, 4
    x = rng.normal(size=(B, T, P))
    z = rng.integers(0, S - 1, size=(B, T - L))  # state S-1 never used
    mask = (rng.random((B, T)) > 0.25).astype(np.float64)
    mask[2, 12:] = 0.0
    xx = np.zeros((S, L * P + 1, L * P + 1))
    yx = np.zeros((S, P, L * P + 1))
    yy = np.zeros((S, P, P))
    n = np.zeros(S)
    for b in range(B):
        xbar = np_lagged(x[b], L)
        for t in range(L, T):
            if mask[b, t]:
                k = z[b, t - L]
                xx[k] += np.outer(xbar[t - L], xbar[t - L])
                yx[k] += np.outer(x[b, t], xbar[t - L])
                yy[k] += np.outer(x[b, t], x[b, t])
                n[k] += 1
    with enable_x64(True):
        st = ar.ar_sufficient_stats(jnp.asarray(x), jnp.asarray(z, jnp.int32), jnp.asarray(mask), S, L)
        np.testing.assert_allclose(np.asarray(st.xx), xx, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(st.yx), yx, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(st.yy), yy, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(st.n), n)
    assert n[S - 1] == 0


def _random_stats_and_prior(rng, S, P, L, frames_per_state, nu_extra=2.0):
    """Sufficient statistics from simulated data, computed in NumPy (not by the core)."""
    A1 = L * P + 1
    x = simulate_ar(rng, 1, sum(frames_per_state) + L, P, L)[0]
    xbar = np_lagged(x, L)
    y = x[L:]
    xx, yx, yy, n = np.zeros((S, A1, A1)), np.zeros((S, P, A1)), np.zeros((S, P, P)), np.zeros(S)
    start = 0
    for k, count in enumerate(frames_per_state):
        sl = slice(start, start + count)
        xx[k], yx[k], yy[k], n[k] = xbar[sl].T @ xbar[sl], y[sl].T @ xbar[sl], y[sl].T @ y[sl], count
        start += count
    prior = dict(
        nu_0=P + nu_extra,
        S_0=random_spd(rng, P, 0.05),
        M_0=rng.normal(scale=0.3, size=(P, A1)),
        K_0=random_spd(rng, A1, 2.0),
    )
    return (xx, yx, yy, n), prior


def _to_jax(stats_np, prior_np):
    xx, yx, yy, n = stats_np
    st = ar.ARStats(jnp.asarray(xx), jnp.asarray(yx), jnp.asarray(yy), jnp.asarray(n))
    pr = ar.ARPrior(
        jnp.asarray(prior_np["nu_0"], jnp.float64),
        jnp.asarray(prior_np["S_0"]),
        jnp.asarray(prior_np["M_0"]),
        jnp.asarray(prior_np["K_0"]),
    )
    return st, pr


def test_mniw_posterior_matches_numpy():
    """(nu_n, S_n, M_n, K_n) of spec 3.2 for states with 60, 7 and 0 frames.

    Tolerance: relative 1e-5 of each matrix's largest entry. The core inverts through
    a Cholesky of (matrix + 1e-6 I) (the reference's psd helper, spec 3.2 [REF]);
    with the eigenvalues here (>= ~0.1) that jitter moves results by ~1e-6 relative.
    A state with no frames gets the prior back (nu_0, S_0, M_0, K_0)."""
    rng = np.random.default_rng(4)
    S, P, L = 3, 2, 2
    stats_np, prior_np = _random_stats_and_prior(rng, S, P, L, [60, 7, 0])
    with enable_x64(True):
        st, pr = _to_jax(stats_np, prior_np)
        nun, Sn, Mn, Kn = (np.asarray(a) for a in ar.mniw_posterior(st, pr))
    for k in range(S):
        ref = np_mniw_posterior(*(s[k] for s in stats_np), **prior_np)
        for got, want in zip((nun[k], Sn[k], Mn[k], Kn[k]), ref):
            # K_n errors scale like 1e-6 * lambda_max(K_n)^2, hence relative to the largest entry
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.max(np.abs(want)))
        np.testing.assert_allclose(Sn[k], Sn[k].T, atol=1e-10)
        assert np.all(np.linalg.eigvalsh(Sn[k]) > 0)
    # empty state: the prior itself
    np.testing.assert_allclose(Mn[2], prior_np["M_0"], atol=1e-5)
    np.testing.assert_allclose(Kn[2], prior_np["K_0"], atol=1e-5 * np.max(np.abs(prior_np["K_0"])))
    np.testing.assert_allclose(Sn[2], prior_np["S_0"], atol=1e-6)
    assert nun[2] == prior_np["nu_0"]


# --------------------------------------------------------------------------- #
# Monte Carlo: MNIW and inverse-Wishart samplers
# --------------------------------------------------------------------------- #
# One compiled sampler per function, shared by the tests (same shapes => one compile).
_vmapped_ar_params = jax.jit(jax.vmap(ar.sample_ar_params, in_axes=(0, None, None)))
_vmapped_iw_factor = jax.jit(jax.vmap(distributions.sample_inv_wishart_factor, in_axes=(0, None, None)))
_vmapped_mniw = jax.jit(jax.vmap(distributions.sample_mniw, in_axes=(0, None, None, None, None)))


def _draw_ar_params(st, pr, seed):
    keys = jax.random.split(jax.random.key(seed), NUM_MC)
    out = _vmapped_ar_params(keys, st, pr)
    assert out.Ab.dtype == jnp.float64 and out.Q.dtype == jnp.float64
    return np.asarray(out.Ab), np.asarray(out.Q)


def test_sample_ar_params_moments():
    """20000 draws of (Ab_k, Q_k) ~ MNIW posterior for a state with 50 frames and an
    empty state (prior with nu_0 = P + 8, so that the fourth moments needed for the
    standard errors exist). Against the NumPy posterior of spec 3.2:
      E[Q] = S_n / (nu_n - P - 1), E[Ab] = M_n, Cov(vec_row Ab) = E[Q] kron K_n
    (row covariance Q, column covariance K_n), each entry within 5 standard errors
    estimated from the draws (about 230 entries: a correct sampler fails with
    probability ~ 1e-4; a swapped row/column covariance, a missing factor or a wrong
    IW degree of freedom moves entries by tens of standard errors)."""
    rng = np.random.default_rng(5)
    S, P, L = 2, 2, 2
    stats_np, prior_np = _random_stats_and_prior(rng, S, P, L, [50, 0], nu_extra=8.0)
    with enable_x64(True):
        Ab, Q = _draw_ar_params(*_to_jax(stats_np, prior_np), seed=6)
    assert Ab.shape == (NUM_MC, S, P, L * P + 1) and Q.shape == (NUM_MC, S, P, P)
    assert np.all(np.isfinite(Ab)) and np.all(np.isfinite(Q))
    np.testing.assert_allclose(Q, np.swapaxes(Q, -1, -2), atol=1e-12)
    for k in range(S):
        nun, Sn, Mn, Kn = np_mniw_posterior(*(s[k] for s in stats_np), **prior_np)
        EQ = Sn / (nun - P - 1)
        assert np.all(mc_mean_ok(Q[:, k], EQ)), (k, Q[:, k].mean(0), EQ)
        assert np.all(mc_mean_ok(Ab[:, k], Mn)), (k, Ab[:, k].mean(0), Mn)
        vec = Ab[:, k].reshape(NUM_MC, -1)  # row-major vec: index (i, a) -> i * (A+1) + a
        centred = vec - Mn.reshape(-1)
        products = centred[:, :, None] * centred[:, None, :]
        assert np.all(mc_mean_ok(products, np.kron(EQ, Kn))), k
        assert np.all(np.linalg.eigvalsh(Q[:, k]) > 0)


def test_sample_ar_params_empty_state_reference_prior():
    """An empty state draws from the reference prior (nu_0 = P + 2, S_0 = 0.01 I,
    K_0 = 10 I, M_0 = random walk). The IW diagonal then has infinite variance, so:
      * exact law: Q_ii ~ InvGamma((nu_0 - P + 1)/2, scale (S_0)_ii / 2) (the 1x1
        marginal of IW(nu_0, S_0)); Kolmogorov-Smirnov p-value > 1e-4;
      * E[Q_ii] = (S_0)_ii / (nu_0 - P - 1) roughly: 25 % (sample means of a tail
        index 1.5 law fluctuate like N^(-1/3) ~ 4 %, times a constant);
      * E[Ab] = M_0 within 5 standard errors (Ab has finite variance S_0 kron K_0)."""
    S, P, L = 2, 2, 2
    with enable_x64(True):
        prior = ar.make_ar_prior(P, L, 0.01, 10.0, jnp.float64)
        zeros = ar.ARStats(
            jnp.zeros((S, L * P + 1, L * P + 1)), jnp.zeros((S, P, L * P + 1)), jnp.zeros((S, P, P)), jnp.zeros(S)
        )
        Ab, Q = _draw_ar_params(zeros, prior, seed=9)
        Ab, Q = Ab[:, 0], Q[:, 0]
        M_0 = np.asarray(prior.M_0)
    nu_0, s = P + 2.0, 0.01
    for i in range(P):
        pvalue = stats.kstest(Q[:, i, i], stats.invgamma(a=(nu_0 - P + 1) / 2, scale=s / 2).cdf).pvalue
        assert pvalue > 1e-4, (i, pvalue)
        np.testing.assert_allclose(Q[:, i, i].mean(), s / (nu_0 - P - 1), rtol=0.25)
    assert np.all(mc_mean_ok(Ab, M_0))


@pytest.mark.parametrize("extra_df", [20.0, 2.0])
def test_sample_inv_wishart_factor(extra_df):
    """G G^T ~ IW(df, scale) for P = 3 and a random scale S.

    df = P + 20 (all moments used exist):
      * E[G G^T] = S / (df - P - 1) and E[(G G^T)^{-1}] = df S^{-1} (the Wishart mean
        of the inverse), each entry within 5 standard errors from the draws;
      * Var(Q_ij) = ((df-P+1) S_ij^2 + (df-P-1) S_ii S_jj) / ((df-P)(df-P-1)^2(df-P-3)),
        within 5 standard errors of the sample variance (from the sample 4th moment).
    df = P + 2 (the reference nu_0; infinite variance): KS test of each diagonal entry
    against InvGamma((df - P + 1)/2, S_ii / 2), p-value > 1e-4."""
    rng = np.random.default_rng(10)
    P = 3
    scale = random_spd(rng, P, 0.7)
    df = P + extra_df
    with enable_x64(True):
        keys = jax.random.split(jax.random.key(11), NUM_MC)
        G = np.asarray(_vmapped_iw_factor(keys, jnp.asarray(df), jnp.asarray(scale)))
    Q = G @ np.swapaxes(G, -1, -2)
    assert np.all(np.isfinite(Q))
    if extra_df == 2.0:
        for i in range(P):
            pvalue = stats.kstest(Q[:, i, i], stats.invgamma(a=(df - P + 1) / 2, scale=scale[i, i] / 2).cdf).pvalue
            assert pvalue > 1e-4, (i, pvalue)
        return
    assert np.all(mc_mean_ok(Q, scale / (df - P - 1)))
    assert np.all(mc_mean_ok(np.linalg.inv(Q), df * np.linalg.inv(scale)))
    d = df - P
    diag = np.diag(scale)
    var = ((d + 1) * scale**2 + (d - 1) * np.outer(diag, diag)) / (d * (d - 1) ** 2 * (d - 3))
    centred = Q - Q.mean(0)
    m2, m4 = np.mean(centred**2, 0), np.mean(centred**4, 0)
    se = np.sqrt((m4 - m2**2) / NUM_MC)
    assert np.all(np.abs(m2 - var) <= 5 * se), (m2, var)


def test_sample_mniw_matches_inputs():
    """distributions.sample_mniw directly (P = 2, 3 columns): E[B] = M, E[Q] = S/(df-P-1)
    and Cov(vec_row B) = E[Q] kron V, within 5 standard errors from 20000 draws."""
    rng = np.random.default_rng(12)
    P, C = 2, 3
    df, scale, mean, col = P + 10.0, random_spd(rng, P), rng.normal(size=(P, C)), random_spd(rng, C, 0.5)
    with enable_x64(True):
        keys = jax.random.split(jax.random.key(13), NUM_MC)
        out = _vmapped_mniw(keys, jnp.asarray(df), jnp.asarray(scale), jnp.asarray(mean), jnp.asarray(col))
        B, Q = (np.asarray(a) for a in out)
    EQ = scale / (df - P - 1)
    assert np.all(mc_mean_ok(Q, EQ))
    assert np.all(mc_mean_ok(B, mean))
    centred = (B - mean).reshape(NUM_MC, -1)
    assert np.all(mc_mean_ok(centred[:, :, None] * centred[:, None, :], np.kron(EQ, col)))
    # given Q, B is matrix normal with row covariance Q: E[(B - M) V^{-1} (B - M)^T | Q] = C Q
    white = np.einsum("nia,ab,njb->nij", B - mean, np.linalg.inv(col), B - mean)
    assert np.all(mc_mean_ok(white - C * Q, np.zeros((P, P))))


# --------------------------------------------------------------------------- #
# One ARHMM Gibbs sweep
# --------------------------------------------------------------------------- #
def _np_forward_logmarginal(log_likes: np.ndarray, pi: np.ndarray) -> float:
    """log p(x) of one segment by the log-space forward recursion, uniform start."""
    log_pi = np.log(pi)
    alpha = -np.log(pi.shape[0]) + log_likes[0]
    for t in range(1, log_likes.shape[0]):
        alpha = logsumexp(alpha[:, None] + log_pi, axis=0) + log_likes[t]
    return float(logsumexp(alpha))


def _arhmm_problem(dtype):
    """Data, hyperparameters and a hand-built starting state (NumPy draws), so the
    test does not need to compile ``init_state`` as well."""
    rng = np.random.default_rng(14)
    B, T, P, L, S = 2, 30, 2, 2, 4
    x = simulate_ar(rng, B, T, P, L)
    mask = np.ones((B, T))
    mask[1, 24:] = 0.0
    x[1, 24:] = 0.0  # padding
    data = arhmm.ARHMMData(jnp.asarray(x, dtype), jnp.asarray(mask, dtype))
    hypers = arhmm.ARHMMHypers(
        alpha=jnp.asarray(5.7, dtype),
        gamma=jnp.asarray(1e3, dtype),
        kappa=jnp.asarray(100.0, dtype),
        ar=ar.make_ar_prior(P, L, 0.01, 10.0, dtype),
    )
    betas = rng.dirichlet(np.ones(S))
    pi = rng.dirichlet(np.ones(S) + 20 * np.eye(S)[0], size=S)
    Ab = np.asarray(hypers.ar.M_0)[None] + 0.05 * rng.normal(size=(S, P, L * P + 1))
    Q = np.tile(0.1 * np.eye(P), (S, 1, 1))
    params = arhmm.ARHMMParams(*(jnp.asarray(a, dtype) for a in (betas, pi, Ab, Q)))
    z = jnp.asarray(rng.integers(0, S, size=(B, T - L)), jnp.int32)
    return x, mask, data, hypers, arhmm.ARHMMState(params, z), (B, T, P, L, S)


def test_gibbs_step_outputs_and_info_terms():
    """Two jitted sweeps on small random data (2 segments, one with a padded tail).
    Shapes/dtypes of the new state; info keys {"z", "x", "marginal", "n_used"} finite;
    and, for the returned state, against NumPy/SciPy:
      "x" = sum_{b, t>=L} mask log N(x_t | A_{z_t} xbar_t + b_{z_t}, Q_{z_t}),
      "z" = sum_{b, t>=L+1} mask_t log pi[z_{t-1}, z_t] (destination mask),
      "marginal" = sum_b log p(x_b) by a log-space forward recursion (padded frames
      contribute log-likelihood 0), "n_used" = number of states on real frames.
    Tolerance: relative 1e-9 (float64 rounding only)."""
    with enable_x64(True):
        x, mask, data, hypers, state, (B, T, P, L, S) = _arhmm_problem(jnp.float64)
        step = jax.jit(arhmm.gibbs_step)
        for seed in (16, 17):
            state, info = step(jax.random.key(seed), state, data, hypers)
        params = state.params
        assert params.betas.shape == (S,) and params.pi.shape == (S, S)
        assert params.Ab.shape == (S, P, L * P + 1) and params.Q.shape == (S, P, P)
        assert state.z.shape == (B, T - L) and state.z.dtype == jnp.int32
        for leaf in params:
            assert leaf.dtype == jnp.float64
        assert set(info) == {"z", "x", "marginal", "n_used"}
        info = {k: np.asarray(v) for k, v in info.items()}
        z, betas, pi, Ab, Q = (np.asarray(a) for a in (state.z, params.betas, params.pi, params.Ab, params.Q))
    assert all(np.all(np.isfinite(v)) for v in info.values())
    assert z.min() >= 0 and z.max() < S
    np.testing.assert_allclose(pi.sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(betas.sum(), 1.0, atol=1e-12)

    lmask = mask[:, L:]
    x_term = z_term = marginal = 0.0
    for b in range(B):
        ll = np_ar_loglik(x[b], Ab, Q, L) * lmask[b][:, None]
        x_term += sum(lmask[b, i] * ll[i, z[b, i]] for i in range(T - L))
        z_term += sum(lmask[b, i] * np.log(pi[z[b, i - 1], z[b, i]]) for i in range(1, T - L))
        marginal += _np_forward_logmarginal(ll, pi)
    np.testing.assert_allclose(info["x"], x_term, rtol=1e-9)
    np.testing.assert_allclose(info["z"], z_term, rtol=1e-9)
    np.testing.assert_allclose(info["marginal"], marginal, rtol=1e-9)
    assert int(info["n_used"]) == len(np.unique(z[lmask > 0]))


def test_gibbs_step_float32_dtypes():
    """The core is dtype-agnostic: with x64 off a sweep keeps float32 parameters and
    info terms and int32 labels (checked by abstract evaluation, no compile)."""
    _, _, data, hypers, state, (B, T, P, L, S) = _arhmm_problem(jnp.float32)
    new_state, info = jax.eval_shape(arhmm.gibbs_step, jax.random.key(19), state, data, hypers)
    for leaf in new_state.params:
        assert leaf.dtype == jnp.float32
    assert new_state.z.dtype == jnp.int32 and new_state.z.shape == (B, T - L)
    for key in ("z", "x", "marginal"):
        assert info[key].dtype == jnp.float32 and info[key].shape == ()
