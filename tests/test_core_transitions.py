"""Correctness of ``kpms_estimators._core.transitions`` (model spec 3.3, 3.4, 2.5).

Reference values are computed here in NumPy/SciPy float64: explicit loops for the
counts, exact probability mass functions (by convolution) and closed-form moments
for the sums of Bernoullis, and Dirichlet moments in closed form. The core runs
under ``jax.enable_x64(True)`` unless a test says otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import digamma, polygamma

from kpms_estimators._core import transitions as tr

NUM_MC = 20_000
NUM_BERN = 100_000  # draws per sample_bernoulli_sum case (one call on length-NUM_BERN arrays)

# Compiled once per module and shared by the tests (same shapes => a single compile).
_bernoulli_sum = jax.jit(tr.sample_bernoulli_sum)
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


def bernoulli_sum_pmf_tiny(probs: np.ndarray, support: int, size: int = 128) -> np.ndarray:
    """Exact pmf of a sum of many Bernoullis with tiny p_i (max p_i < 1e-4) on
    0..support-1, by inverting the generating function at ``size`` roots of unity:
    log prod_i (1 - p_i + p_i w) = sum_r (-1)^(r+1) (sum_i p_i^r) (w - 1)^r / r,
    truncated at r = 6 (remainder below (2 max p)^6 sum p, i.e. negligible)."""
    assert probs.max() < 1e-4
    w = np.exp(2j * np.pi * np.arange(size) / size)
    log_gf = sum((-1) ** (r + 1) * np.sum(probs**r) * (w - 1) ** r / r for r in range(1, 7))
    pmf = np.fft.fft(np.exp(log_gf)).real / size  # sum_m G(w_m) w_m^{-k} / size
    return np.clip(pmf[:support], 0.0, 1.0)  # FFT rounding leaves |error| ~ 1e-17


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


def draw_bernoulli_sum(numer: float, offset: float, n: int, num: int, seed: int) -> np.ndarray:
    """num independent draws from the core: the sampler is elementwise, so one call
    on arrays of length num gives num independent draws."""
    assert num == NUM_BERN
    with jax.enable_x64(True):
        out = _bernoulli_sum(
            jax.random.key(seed),
            jnp.full((num,), numer, jnp.float64),
            jnp.full((num,), offset, jnp.float64),
            jnp.full((num,), n, jnp.int32),
        )
        assert out.dtype == jnp.int32
        return np.asarray(out)


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
    with jax.enable_x64(True):
        counts = tr.transition_counts(jnp.asarray(z, jnp.int32), jnp.asarray(mask), num_states)
        np.testing.assert_array_equal(np.asarray(counts), expected)
        # a boolean mask gives the same counts
        counts_bool = tr.transition_counts(jnp.asarray(z, jnp.int32), jnp.asarray(mask > 0), num_states)
        np.testing.assert_array_equal(np.asarray(counts_bool), expected)
    # the mask of the source frame must not matter: only destination masks are used
    assert expected.sum() == int(mask[:, 1:].sum())


# --------------------------------------------------------------------------- #
# sample_bernoulli_sum
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "numer, offset, n",
    [
        (0.5, 0.5, 1),  # p_0 = 1: always exactly 1
        (0.5, 0.5, 40),  # off-diagonal CRP form, exact path
        (2.0, 2.0, 63),
        (3.0, 5.0, 64),  # boundary: all 64 terms exact, no tail
        (0.5, 0.5, 65),  # boundary: one tail term
    ],
)
def test_bernoulli_sum_exact_path_distribution(numer, offset, n):
    """n <= 64 is drawn exactly: the whole pmf of 100000 draws matches the exact pmf
    (sequential convolution) within 5 binomial standard errors per value, and mean /
    variance match sum p_i and sum p_i (1 - p_i) within 5 standard errors. (n = 65 has
    one Poisson tail term of mean 0.5/64.5; its total-variation error p^2 = 6e-5 is
    added to the pmf tolerance.)"""
    num = NUM_BERN
    draws = draw_bernoulli_sum(numer, offset, n, num, seed=n)
    probs = bernoulli_probs(numer, offset, n)
    support = n + 2
    assert draws.min() >= 0 and draws.max() <= n
    tv = float(np.sum(probs[tr.EXACT_TABLE_TERMS :] ** 2))
    pmf = bernoulli_sum_pmf(probs, support)
    freq = np.bincount(draws, minlength=support)[:support] / num
    se = np.sqrt(pmf * (1 - pmf) / num)
    assert np.all(np.abs(freq - pmf) <= 5 * se + tv + 1e-12)
    mean, var, k4 = bernoulli_sum_moments(probs)
    assert abs(draws.mean() - mean) <= 5 * np.sqrt(var / num) + 1e-12
    assert abs(draws.var() - var) <= 5 * se_of_variance(var, k4, num) + 2 * tv + 1e-12


def test_bernoulli_sum_sticky_tail():
    """n >> 64 with kappa-like offset 1e6 (diagonal table counts): every p_i is
    below 6e-6, so the Poisson tail is accurate to total variation sum p_i^2 < 1e-4.
    numer = 5 and n = 2e6 make the tail carry almost all of the mean (5 log 3).
    Mean within 5 standard errors of sum p_i; variance within 5 standard errors
    (from the exact 4th cumulant) of sum p_i (1 - p_i); pmf within 5 binomial
    standard errors plus the total-variation bound."""
    numer, offset, n, num = 5.0, 5.0 + 1e6, 2_000_000, NUM_BERN
    probs = bernoulli_probs(numer, offset, n)
    mean, var, k4 = bernoulli_sum_moments(probs)
    tv = float(np.sum(probs**2))
    assert tv < 1e-4
    draws = draw_bernoulli_sum(numer, offset, n, num, seed=1)
    assert abs(draws.mean() - mean) <= 5 * np.sqrt(var / num)
    assert abs(draws.var() - var) <= 5 * se_of_variance(var, k4, num) + 2 * tv  # Poisson var bias = sum p^2
    support = 40
    pmf = bernoulli_sum_pmf_tiny(probs, support)
    np.testing.assert_allclose(pmf @ np.arange(support), mean, rtol=1e-9)
    freq = np.bincount(draws, minlength=support)[:support] / num
    assert np.all(np.abs(freq - pmf) <= 5 * np.sqrt(pmf * (1 - pmf) / num) + tv + 1e-12)


def test_bernoulli_sum_tiny_probabilities():
    """alpha*beta ~ 0.05 against kappa = 1e6 (the realistic diagonal case): mean
    0.05 (psi(1e6 + 1e5) - psi(1e6)) ~ 4.8e-3. Mean and variance within 5 standard
    errors of the exact sums."""
    numer, offset, n, num = 0.05, 0.05 + 1e6, 100_000, NUM_BERN
    probs = bernoulli_probs(numer, offset, n)
    mean, var, k4 = bernoulli_sum_moments(probs)
    draws = draw_bernoulli_sum(numer, offset, n, num, seed=2)
    assert abs(draws.mean() - mean) <= 5 * np.sqrt(var / num)
    assert abs(draws.var() - var) <= 5 * se_of_variance(var, k4, num)


def test_bernoulli_sum_crp_tail_is_approximate():
    """Off-diagonal CRP case numer = offset = 0.5, n = 1000. Terms i >= 64 are drawn
    as one Poisson with the same mean, so:
      * the mean is exact: checked within 5 standard errors of sum p_i;
      * the variance is only approximate: Poisson variance exceeds the Bernoulli
        variance by sum_{i>=64} p_i^2 (~3.7e-3 of a total ~3.2); checked loosely,
        within 5 standard errors plus twice that known bias.
    Also the numpy exact sampler (Bernoulli matrix) agrees with the closed forms,
    which validates the reference itself."""
    numer, offset, n, num = 0.5, 0.5, 1000, NUM_BERN
    probs = bernoulli_probs(numer, offset, n)
    mean, var, k4 = bernoulli_sum_moments(probs)
    np.testing.assert_allclose(mean, 1 + numer * (digamma(offset + n) - digamma(offset + 1)), rtol=1e-12)
    bias = float(np.sum(probs[tr.EXACT_TABLE_TERMS :] ** 2))
    draws = draw_bernoulli_sum(numer, offset, n, num, seed=3)
    assert abs(draws.mean() - mean) <= 5 * np.sqrt(var / num)
    assert abs(draws.var() - var) <= 5 * se_of_variance(var, k4, num) + 2 * bias

    rng = np.random.default_rng(3)
    exact = np.zeros(20_000, dtype=np.int64)
    for start in range(0, 20_000, 2_000):
        exact[start : start + 2_000] = (rng.random((2_000, n)) < probs).sum(axis=1)
    assert abs(exact.mean() - mean) <= 5 * np.sqrt(var / exact.size)
    assert abs(draws.mean() - exact.mean()) <= 5 * np.sqrt(var / num + var / exact.size)


def test_bernoulli_sum_zero_counts():
    """n = 0 gives exactly 0 for every numer/offset (including a tail-sized offset)."""
    with jax.enable_x64(True):
        numer = jnp.tile(jnp.array([0.5, 3.0, 1e-3, 5.0]), NUM_BERN // 4)
        offset = jnp.tile(jnp.array([0.5, 3.0 + 1e6, 1e-3, 5.0]), NUM_BERN // 4)
        out = _bernoulli_sum(jax.random.key(0), numer, offset, jnp.zeros(NUM_BERN, jnp.int32))
        np.testing.assert_array_equal(np.asarray(out), 0)


# --------------------------------------------------------------------------- #
# sample_table_counts
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kappa", [50.0, 1e6])
def test_table_counts_diagonal_and_off_diagonal(kappa):
    """mbar_jj = sum_{i<n_jj} Bern(ab_j / (ab_j + kappa + i)) and
    m_jk = sum_{i<n_jk} Bern(ab_k / (ab_k + i)), ab = alpha beta (spec 3.4).
    20000 draws (vmap over keys); each cell's mean and variance within 5 standard
    errors of the exact sums (variance SE from the exact 4th cumulant)."""
    alpha = 5.7
    betas = np.array([0.6, 0.3, 0.1])
    counts = np.array([[200, 3, 0], [5, 100, 70], [1, 0, 300]])
    ab = alpha * betas
    s = len(betas)
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(4), NUM_MC)
        m = _vmapped_table_counts(keys, jnp.asarray(counts, jnp.int32), jnp.asarray(betas), alpha, kappa)
        assert m.shape == (NUM_MC, s, s)
        m = np.asarray(m)
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
            if j != k and counts[j, k] > 0:
                assert np.all(cell >= 1)  # the first customer always opens a table


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
    with jax.enable_x64(True):
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
    with jax.enable_x64(True):
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
    with jax.enable_x64(True):
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
    with jax.enable_x64(True):
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
