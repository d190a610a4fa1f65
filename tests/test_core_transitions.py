"""Correctness of ``kpms_estimators._core.transitions`` (model spec 3.3, 3.4, 2.5).

Reference values are computed here in NumPy/SciPy float64: explicit loops for the
counts, exact probability mass functions (by convolution) and closed-form moments
for the sums of Bernoullis, and Dirichlet moments in closed form. The core runs
under ``enable_x64(True)`` unless a test says otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import digamma, polygamma

from kpms_estimators._compat import enable_x64
from kpms_estimators._core import transitions as tr

NUM_MC = 20_000

# Compiled once per module and shared by the tests (same shapes => a single compile).
_vmapped_table_counts = jax.jit(jax.vmap(tr.sample_table_counts, in_axes=(0, None, None, None, None)))
_vmapped_pi = jax.jit(jax.vmap(tr.sample_pi, in_axes=(0, None, None, None, None)))
_vmapped_betas = jax.jit(jax.vmap(tr.sample_betas, in_axes=(0, None, None, None)), static_argnums=3)


# --------------------------------------------------------------------------- #
# Helpers (NumPy only)
# --------------------------------------------------------------------------- #
def bernoulli_probs(numer: float, offset: float, n: int) -> np.ndarray:
    return numer / (offset + np.arange(n, dtype=np.float64))


def bernoulli_sum_pmf(probs: np.ndarray, support: int) -> np.ndarray:
    """Exact pmf of sum_i Bernoulli(p_i) on 0..support-1 by sequential convolution."""
    pmf = np.zeros(support)
    pmf[0] = 1.0
    for p in probs:
        pmf[1:] = pmf[1:] * (1 - p) + pmf[:-1] * p
        pmf[0] *= 1 - p
    return pmf


def bernoulli_sum_moments(probs: np.ndarray):
    """Mean, variance and 4th cumulant of a sum of independent Bernoullis."""
    q = probs * (1 - probs)
    return probs.sum(), q.sum(), (q * (1 - 6 * q)).sum()


def se_of_variance(var: float, kappa4: float, n: int) -> float:
    """Standard error of the sample variance: sqrt((mu4 - var^2) / n), mu4 = kappa4 + 3 var^2."""
    return np.sqrt(max(kappa4 + 2 * var**2, 0.0) / n)


def empirical_se_of_variance(samples: np.ndarray, axis=0) -> np.ndarray:
    centred = samples - samples.mean(axis=axis)
    m2 = np.mean(centred**2, axis=axis)
    m4 = np.mean(centred**4, axis=axis)
    return np.sqrt(np.maximum(m4 - m2**2, 0.0) / samples.shape[axis])


def pairs_from_counts(counts: np.ndarray, pad: int = 0) -> np.ndarray:
    """Flat transition ids realising a count matrix (and ``pad`` masked ids S*S)."""
    s = counts.shape[0]
    ids = np.repeat(np.arange(s * s), counts.reshape(-1))
    ids = np.concatenate([ids, np.full(pad, s * s)])
    return np.random.default_rng(0).permutation(ids).astype(np.int32)


# --------------------------------------------------------------------------- #
# transition_counts
# --------------------------------------------------------------------------- #
def test_transition_counts_matches_loop():
    """n_jk counts (z_{t-1} = j, z_t = k) with the mask at the destination, over
    several segments; transitions never cross segment boundaries."""
    rng = np.random.default_rng(0)
    num_states, num_segments, length = 5, 4, 40
    z = rng.integers(0, num_states, size=(num_segments, length))
    mask = (rng.random((num_segments, length)) > 0.3).astype(np.float64)
    mask[1, 25:] = 0.0  # a padded tail
    expected = np.zeros((num_states, num_states), dtype=np.int64)
    for b in range(num_segments):
        for t in range(1, length):
            if mask[b, t]:
                expected[z[b, t - 1], z[b, t]] += 1
    with enable_x64(True):
        counts = tr.transition_counts(jnp.asarray(z, jnp.int32), jnp.asarray(mask), num_states)
        np.testing.assert_array_equal(np.asarray(counts), expected)
        # a boolean mask gives the same counts
        counts_bool = tr.transition_counts(jnp.asarray(z, jnp.int32), jnp.asarray(mask > 0), num_states)
        np.testing.assert_array_equal(np.asarray(counts_bool), expected)
    # the mask of the source frame must not matter: only destination masks are used
    assert expected.sum() == int(mask[:, 1:].sum())


# --------------------------------------------------------------------------- #
# sample_table_counts (exact, one Bernoulli per observed transition)
# --------------------------------------------------------------------------- #
def _draw_table_counts(counts, betas, alpha, kappa, num, seed, pad=0):
    with enable_x64(True):
        keys = jax.random.split(jax.random.key(seed), num)
        pairs = jnp.asarray(pairs_from_counts(np.asarray(counts), pad))
        m = _vmapped_table_counts(keys, pairs, jnp.asarray(betas, jnp.float64), alpha, kappa)
        assert m.dtype == jnp.int32
        return np.asarray(m)


@pytest.mark.parametrize("kappa", [50.0, 1e6])
def test_table_counts_diagonal_and_off_diagonal(kappa):
    """mbar_jj = sum_{i<n_jj} Bern(ab_j / (ab_j + kappa + i)) and
    m_jk = sum_{i<n_jk} Bern(ab_k / (ab_k + i)), ab = alpha beta (spec 3.4).
    20000 draws (vmap over keys), with masked (out-of-range) transitions mixed in;
    each cell's mean and variance within 5 standard errors of the exact sums
    (variance SE from the exact 4th cumulant), and each cell's whole pmf within 5
    binomial standard errors of the exact pmf (sequential convolution)."""
    alpha = 5.7
    betas = np.array([0.6, 0.3, 0.1])
    counts = np.array([[200, 3, 0], [5, 100, 70], [1, 0, 300]])
    ab = alpha * betas
    s = len(betas)
    m = _draw_table_counts(counts, betas, alpha, kappa, NUM_MC, seed=4, pad=37)
    assert m.shape == (NUM_MC, s, s)
    assert np.all(m >= 0) and np.all(m <= counts)
    assert np.all(m[:, counts == 0] == 0)
    for j in range(s):
        for k in range(s):
            offset = ab[k] + (kappa if j == k else 0.0)
            probs = bernoulli_probs(ab[k], offset, counts[j, k])
            mean, var, k4 = bernoulli_sum_moments(probs)
            cell = m[:, j, k]
            assert abs(cell.mean() - mean) <= 5 * np.sqrt(var / NUM_MC) + 1e-12, (j, k, cell.mean(), mean)
            assert abs(cell.var() - var) <= 5 * se_of_variance(var, k4, NUM_MC) + 1e-12, (j, k)
            support = counts[j, k] + 1
            pmf = bernoulli_sum_pmf(probs, support)
            freq = np.bincount(cell, minlength=support)[:support] / NUM_MC
            assert np.all(np.abs(freq - pmf) <= 5 * np.sqrt(pmf * (1 - pmf) / NUM_MC) + 1e-12), (j, k)
            if j != k and counts[j, k] > 0:
                assert np.all(cell >= 1)  # the first customer always opens a table


def test_table_counts_large_counts_are_exact():
    """Large counts have no truncation: an off-diagonal CRP cell with n = 1500
    (ab = 0.5, where a Poisson tail would inflate the variance by sum_{i>=64} p_i^2)
    and a sticky diagonal with n = 20000 against kappa = 1e6 (tiny p_i). Mean and
    variance within 5 standard errors of the exact sums; the CRP mean also equals the
    digamma closed form 1 + ab (psi(ab + n) - psi(ab + 1))."""
    alpha, kappa, num = 1.0, 1e6, 4000
    betas = np.array([0.5, 0.5])
    counts = np.array([[20_000, 1_500], [0, 0]])
    m = _draw_table_counts(counts, betas, alpha, kappa, num, seed=5)
    for (j, k), offset in [((0, 1), 0.5), ((0, 0), 0.5 + kappa)]:
        probs = bernoulli_probs(0.5, offset, counts[j, k])
        mean, var, k4 = bernoulli_sum_moments(probs)
        cell = m[:, j, k]
        assert abs(cell.mean() - mean) <= 5 * np.sqrt(var / num), (j, k)
        assert abs(cell.var() - var) <= 5 * se_of_variance(var, k4, num), (j, k)
    crp = bernoulli_probs(0.5, 0.5, 1500)
    np.testing.assert_allclose(crp.sum(), 1 + 0.5 * (digamma(0.5 + 1500) - digamma(1.5)), rtol=1e-12)


def test_table_counts_zero_counts():
    """No transitions (all masked) give exactly zero tables."""
    m = _draw_table_counts(np.zeros((4, 4), int), np.full(4, 0.25), 5.7, 1e6, 100, seed=0, pad=50)
    np.testing.assert_array_equal(m, 0)


def test_transition_pairs_and_counts_agree():
    """transition_pairs drops masked destinations; counts_from_pairs inverts pairs_from_counts."""
    counts = np.array([[3, 1], [0, 2]])
    with enable_x64(True):
        np.testing.assert_array_equal(
            np.asarray(tr.counts_from_pairs(jnp.asarray(pairs_from_counts(counts, pad=5)), 2)), counts
        )
        z = jnp.asarray([[0, 0, 1, 1, 0]], jnp.int32)
        mask = jnp.asarray([[1, 1, 1, 0, 1]])
        np.testing.assert_array_equal(np.asarray(tr.transition_pairs(z, mask, 2)), [0, 1, 4, 2])


# --------------------------------------------------------------------------- #
# sample_betas / sample_pi: Dirichlet moments
# --------------------------------------------------------------------------- #
def _check_dirichlet(samples: np.ndarray, conc: np.ndarray):
    """Mean conc/c0 and variance m (1 - m) / (c0 + 1) per entry, within 5 standard
    errors (mean SE from the exact variance; variance SE from the sample 4th moment),
    and E[log X_k] = psi(a_k) - psi(a_0) within 5 standard errors of
    Var[log X_k] = psi'(a_k) - psi'(a_0)."""
    num = samples.shape[0]
    c0 = conc.sum(-1, keepdims=True)
    mean = conc / c0
    var = mean * (1 - mean) / (c0 + 1)
    np.testing.assert_allclose(samples.sum(-1), 1.0, rtol=0, atol=1e-12)
    assert np.all(np.abs(samples.mean(0) - mean) <= 5 * np.sqrt(var / num) + 1e-15)
    assert np.all(np.abs(samples.var(0) - var) <= 5 * empirical_se_of_variance(samples) + 1e-15)
    logs = np.log(samples)
    log_mean = digamma(conc) - digamma(c0)
    log_var = polygamma(1, conc) - polygamma(1, c0)
    assert np.all(np.abs(logs.mean(0) - log_mean) <= 5 * np.sqrt(log_var / num) + 1e-12)


def test_sample_betas_dirichlet_moments():
    """beta | mbar ~ Dir(gamma/S + sum_j mbar_jk)."""
    gamma = 3.0
    table_counts = np.array([[4, 0, 1, 0], [2, 7, 0, 0], [0, 1, 0, 0], [1, 0, 0, 2]])
    conc = gamma / 4 + table_counts.sum(axis=0)
    with enable_x64(True):
        keys = jax.random.split(jax.random.key(5), NUM_MC)
        samples = _vmapped_betas(keys, jnp.asarray(table_counts, jnp.int32), gamma, jnp.float64)
        assert samples.dtype == jnp.float64
        samples = np.asarray(samples)
    _check_dirichlet(samples, conc)


def test_sample_pi_dirichlet_moments():
    """pi_j | n, beta ~ Dir(n_j + alpha beta + kappa e_j), rows independent."""
    alpha, kappa = 2.0, 5.0
    betas = np.array([0.4, 0.3, 0.2, 0.1])
    counts = np.array([[10, 2, 0, 1], [0, 3, 1, 0], [4, 4, 4, 0], [0, 0, 0, 0]])
    conc = counts + alpha * betas[None, :] + kappa * np.eye(4)
    with enable_x64(True):
        keys = jax.random.split(jax.random.key(6), NUM_MC)
        samples = np.asarray(_vmapped_pi(keys, jnp.asarray(counts, jnp.int32), jnp.asarray(betas), alpha, kappa))
    for j in range(4):
        _check_dirichlet(samples[:, j], conc[j])
    # rows are independent: correlation between rows near 0 (5 SE = 5/sqrt(N))
    corr = np.corrcoef(samples[:, 0, 0], samples[:, 1, 1])[0, 1]
    assert abs(corr) <= 5 / np.sqrt(NUM_MC)


def test_sample_pi_extreme_sticky_rows():
    """kappa = 1e6 with alpha*beta ~ 0.02..0.08 off the diagonal (the reference
    defaults): off-diagonal entries are ~1e-7 * Gamma(0.05) and can be astronomically
    small, but in float64 none is zero or NaN, rows sum to 1, log entries are finite,
    and E[log pi_jk] = psi(c_jk) - psi(c_j0) within 5 standard errors."""
    alpha, kappa = 5.7, 1e6
    ab = np.array([5.5, 0.05, 0.02, 0.08])
    betas = ab / alpha
    counts = np.zeros((4, 4), dtype=np.int64)
    conc = alpha * betas[None, :] + kappa * np.eye(4)
    with enable_x64(True):
        keys = jax.random.split(jax.random.key(7), NUM_MC)
        samples = np.asarray(_vmapped_pi(keys, jnp.asarray(counts, jnp.int32), jnp.asarray(betas), alpha, kappa))
    assert not np.any(np.isnan(samples))
    assert np.all(samples > 0)
    assert np.all(np.isfinite(np.log(samples)))
    np.testing.assert_allclose(samples.sum(-1), 1.0, rtol=0, atol=1e-12)
    logs = np.log(samples)
    log_mean = digamma(conc) - digamma(conc.sum(-1, keepdims=True))
    log_var = polygamma(1, conc) - polygamma(1, conc.sum(-1, keepdims=True))
    assert np.all(np.abs(logs.mean(0) - log_mean) <= 5 * np.sqrt(log_var / NUM_MC) + 1e-12)


# --------------------------------------------------------------------------- #
# init_transitions
# --------------------------------------------------------------------------- #
_init_transitions = jax.jit(tr.init_transitions, static_argnums=(1, 5))


def test_init_transitions_float64():
    """Prior draw with the reference defaults (S = 100, alpha 5.7, gamma 1e3,
    kappa 1e6): betas and pi rows sum to 1, every entry strictly positive (the
    float32-tiny smoothing of spec 2.5.3), finite, float64, and pi strongly sticky."""
    with enable_x64(True):
        params = _init_transitions(jax.random.key(8), 100, 5.7, 1e3, 1e6, jnp.float64)
        betas, pi = np.asarray(params.betas), np.asarray(params.pi)
        assert params.pi.dtype == jnp.float64
    assert betas.shape == (100,) and pi.shape == (100, 100)
    np.testing.assert_allclose(betas.sum(), 1.0, atol=1e-12)
    np.testing.assert_allclose(pi.sum(-1), 1.0, rtol=0, atol=1e-12)
    assert np.all(betas > 0) and np.all(pi > 0)
    assert np.all(pi >= np.finfo(np.float32).tiny * (1 - 1e-6))
    assert np.all(np.isfinite(np.log(pi)))
    assert np.all(np.diag(pi) > 0.99)


def test_init_transitions_float32_strictly_positive():
    """BUG DEMONSTRATION (float32 only). The init smoothing
    pi <- (pi + eps) / rowsum with eps = float32 smallest normal (1.18e-38) divides
    eps by a row sum that is slightly above 1 in float32, which gives a subnormal;
    XLA on CPU flushes subnormals to zero, so underflowed entries stay exactly 0 and
    log pi = -inf (spec 12.3). The documented contract (strictly positive pi after
    smoothing) holds in float64 but not in float32."""
    zeros = 0
    for seed in range(5):
        params = _init_transitions(jax.random.key(seed), 100, 5.7, 1e3, 1e6, jnp.float32)
        assert params.pi.dtype == jnp.float32
        pi = np.asarray(params.pi)
        assert not np.any(np.isnan(pi))
        np.testing.assert_allclose(pi.sum(-1), 1.0, rtol=0, atol=1e-5)
        zeros += int(np.sum(pi <= 0))
    assert zeros == 0, f"{zeros} exact zeros in float32 pi after init smoothing"
