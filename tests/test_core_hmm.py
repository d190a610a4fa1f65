"""Correctness of ``kpms_estimators._core.hmm`` (model spec 3.5) against brute force.

Every reference value is computed here in plain NumPy/SciPy float64 by enumerating
all S**T state paths of a tiny HMM (S = 3 states, T = 6 frames, 729 paths) with a
uniform initial distribution. The core runs under ``enable_x64(True)``.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from kpms_estimators._compat import enable_x64
from kpms_estimators._core import hmm

NUM_STATES = 3
NUM_FRAMES = 6
NUM_PATHS = 20_000  # Monte Carlo draws of whole paths
ATOL = 1e-6


# --------------------------------------------------------------------------- #
# Independent brute-force reference (NumPy float64)
# --------------------------------------------------------------------------- #
def _problem(seed: int, low: float = -3.0, high: float = 0.0, pad_frames=()):
    rng = np.random.default_rng(seed)
    log_likes = rng.uniform(low, high, size=(NUM_FRAMES, NUM_STATES))
    log_likes[list(pad_frames)] = 0.0
    trans = rng.uniform(0.05, 1.0, size=(NUM_STATES, NUM_STATES))
    trans /= trans.sum(axis=1, keepdims=True)
    return log_likes, trans


class BruteForce:
    """Exact posterior quantities of a tiny HMM by enumerating every path."""

    def __init__(self, log_likes: np.ndarray, trans: np.ndarray):
        num_frames, num_states = log_likes.shape
        self.paths = np.array(list(itertools.product(range(num_states), repeat=num_frames)))
        with np.errstate(divide="ignore"):
            log_trans = np.log(trans)
        frames = np.arange(num_frames)
        # cumulative log joint of the prefix z_{0:t}: log(1/S) + sum_{s<=t} ll + sum log pi
        emit = log_likes[frames[None, :], self.paths]  # (paths, T)
        move = np.zeros_like(emit)
        move[:, 1:] = log_trans[self.paths[:, :-1], self.paths[:, 1:]]
        self.prefix = -np.log(num_states) + np.cumsum(emit + move, axis=1)  # (paths, T)
        self.num_frames, self.num_states = num_frames, num_states

    def log_evidence_prefix(self, t: int) -> float:
        """log p(x_{0:t}); each prefix appears S**(T-1-t) times among the full paths."""
        return logsumexp(self.prefix[:, t]) - (self.num_frames - 1 - t) * np.log(self.num_states)

    @property
    def log_marginal(self) -> float:
        return self.log_evidence_prefix(self.num_frames - 1)

    def log_normalizers(self) -> np.ndarray:
        evid = np.array([self.log_evidence_prefix(t) for t in range(self.num_frames)])
        return np.diff(np.concatenate([[0.0], evid]))

    def _marginal(self, log_weights: np.ndarray, t: int) -> np.ndarray:
        w = np.exp(log_weights - logsumexp(log_weights))
        return np.bincount(self.paths[:, t], weights=w, minlength=self.num_states)

    def filtered(self) -> np.ndarray:
        """p(z_t | x_{0:t}) for every t."""
        return np.stack([self._marginal(self.prefix[:, t], t) for t in range(self.num_frames)])

    def smoothed(self) -> np.ndarray:
        """p(z_t | x_{0:T-1}) for every t."""
        return np.stack([self._marginal(self.prefix[:, -1], t) for t in range(self.num_frames)])

    def path_probs(self) -> np.ndarray:
        lw = self.prefix[:, -1]
        return np.exp(lw - logsumexp(lw))

    def pair(self, t: int) -> np.ndarray:
        """p(z_t, z_{t+1} | x) as an (S, S) matrix."""
        idx = self.paths[:, t] * self.num_states + self.paths[:, t + 1]
        joint = np.bincount(idx, weights=self.path_probs(), minlength=self.num_states**2)
        return joint.reshape(self.num_states, self.num_states)


# --------------------------------------------------------------------------- #
# Exact quantities
# --------------------------------------------------------------------------- #
CASES = {
    "plain": dict(seed=0),
    "padding": dict(seed=1, pad_frames=(0, 2, 3)),  # all-zero rows: transitions only
    "padding_tail": dict(seed=2, pad_frames=(4, 5)),
    "large_magnitude": dict(seed=3, low=-500.0, high=0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_filter_and_smoother_match_brute_force(case):
    """Filtered probs, per-frame log normalisers, their sum and smoothed probs match
    exhaustive enumeration to 1e-6 (absolute). The 'large_magnitude' case uses
    log-likelihoods in [-500, 0], which would underflow without per-frame scaling."""
    log_likes, trans = _problem(**CASES[case])
    ref = BruteForce(log_likes, trans)
    with enable_x64(True):
        ll, pi = jnp.asarray(log_likes), jnp.asarray(trans)
        filt = hmm.forward_filter(ll, pi)
        smoothed = hmm.smoothed_probs(ll, pi)
        assert filt.filtered_probs.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(filt.filtered_probs), ref.filtered(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(np.asarray(filt.log_normalizers), ref.log_normalizers(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(float(jnp.sum(filt.log_normalizers)), ref.log_marginal, rtol=0, atol=ATOL)
        np.testing.assert_allclose(np.asarray(smoothed), ref.smoothed(), rtol=0, atol=ATOL)
        # the marginal returned by sample_states is the same sum
        _, marginal = hmm.sample_states(jax.random.key(0), ll, pi)
        np.testing.assert_allclose(float(marginal), ref.log_marginal, rtol=0, atol=ATOL)


def test_padding_frames_follow_the_transitions():
    """With every frame padded (all-zero log-likelihoods) the filter is the prior chain:
    filtered_t = uniform @ pi^t, and the marginal log-likelihood is exactly 0."""
    _, trans = _problem(seed=4)
    expected = [np.full(NUM_STATES, 1.0 / NUM_STATES)]
    for _ in range(NUM_FRAMES - 1):
        expected.append(expected[-1] @ trans)
    with enable_x64(True):
        filt = hmm.forward_filter(jnp.zeros((NUM_FRAMES, NUM_STATES)), jnp.asarray(trans))
        np.testing.assert_allclose(np.asarray(filt.filtered_probs), np.stack(expected), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(filt.log_normalizers), 0.0, rtol=0, atol=1e-12)


def test_zero_transition_probabilities():
    """Exact zeros in pi (underflowed sticky rows): the filter stays finite and still
    matches enumeration (the internal floor at the smallest normal float moves results
    by ~1e-308 only), and sampled paths never take a zero-probability transition."""
    log_likes, _ = _problem(seed=5)
    trans = np.array([[0.7, 0.3, 0.0], [0.0, 0.6, 0.4], [0.5, 0.0, 0.5]])
    ref = BruteForce(log_likes, trans)
    with enable_x64(True):
        ll, pi = jnp.asarray(log_likes), jnp.asarray(trans)
        filt = hmm.forward_filter(ll, pi)
        np.testing.assert_allclose(np.asarray(filt.filtered_probs), ref.filtered(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(float(jnp.sum(filt.log_normalizers)), ref.log_marginal, rtol=0, atol=ATOL)
        np.testing.assert_allclose(np.asarray(hmm.smoothed_probs(ll, pi)), ref.smoothed(), rtol=0, atol=ATOL)
        keys = jax.random.split(jax.random.key(11), 2000)
        paths = np.asarray(jax.jit(jax.vmap(hmm.sample_states, in_axes=(0, None, None)))(keys, ll, pi)[0])
    assert np.all(trans[paths[:, :-1], paths[:, 1:]] > 0)


def test_float32_large_magnitude_is_finite_and_close():
    """float32 (x64 off) on log-likelihoods in [-500, 0]: finite and within float32
    rounding (relative 1e-5) of the float64 brute-force marginal."""
    log_likes, trans = _problem(seed=3, low=-500.0, high=0.0)
    ref = BruteForce(log_likes, trans)
    filt = hmm.forward_filter(jnp.asarray(log_likes, jnp.float32), jnp.asarray(trans, jnp.float32))
    assert filt.filtered_probs.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(filt.filtered_probs)))
    np.testing.assert_allclose(float(jnp.sum(filt.log_normalizers)), ref.log_marginal, rtol=1e-5)


# --------------------------------------------------------------------------- #
# Monte Carlo: backward sampling
# --------------------------------------------------------------------------- #
def _draw_paths(log_likes, trans, seed, use_sample_states):
    with enable_x64(True):
        ll, pi = jnp.asarray(log_likes), jnp.asarray(trans)
        keys = jax.random.split(jax.random.key(seed), NUM_PATHS)
        if use_sample_states:
            draw = jax.jit(jax.vmap(lambda k: hmm.sample_states(k, ll, pi)[0]))
        else:
            filt = hmm.forward_filter(ll, pi).filtered_probs
            draw = jax.jit(jax.vmap(lambda k: hmm.backward_sample(k, filt, pi)))
        paths = draw(keys)
        assert paths.dtype == jnp.int32
        return np.asarray(paths)


@pytest.mark.parametrize("use_sample_states", [False, True], ids=["backward_sample", "sample_states"])
@pytest.mark.parametrize("case", ["plain", "padding"])
def test_backward_sampling_marginals(case, use_sample_states):
    """20000 sampled paths: per-frame state frequencies match p(z_t | x) and the
    (z_2, z_3) joint frequencies match the brute-force pairwise marginal.

    Tolerance: 5 binomial standard errors, sqrt(p (1 - p) / N), per cell (plus 1e-12).
    With 18 + 9 cells and fixed seeds, a correct sampler fails with probability
    below 1e-5; a wrong conditional (e.g. forward instead of backward transition
    column) moves cells by many standard errors.
    """
    log_likes, trans = _problem(**CASES[case])
    ref = BruteForce(log_likes, trans)
    paths = _draw_paths(log_likes, trans, seed=7, use_sample_states=use_sample_states)
    assert paths.shape == (NUM_PATHS, NUM_FRAMES)
    assert paths.min() >= 0 and paths.max() < NUM_STATES

    freq = np.stack([np.bincount(paths[:, t], minlength=NUM_STATES) for t in range(NUM_FRAMES)]) / NUM_PATHS
    exact = ref.smoothed()
    se = np.sqrt(exact * (1 - exact) / NUM_PATHS)
    assert np.all(np.abs(freq - exact) <= 5 * se + 1e-12), (freq, exact)

    t = 2
    pair_freq = np.bincount(paths[:, t] * NUM_STATES + paths[:, t + 1], minlength=NUM_STATES**2)
    pair_freq = pair_freq.reshape(NUM_STATES, NUM_STATES) / NUM_PATHS
    pair_exact = ref.pair(t)
    pair_se = np.sqrt(pair_exact * (1 - pair_exact) / NUM_PATHS)
    assert np.all(np.abs(pair_freq - pair_exact) <= 5 * pair_se + 1e-12), (pair_freq, pair_exact)


def test_backward_sampling_whole_path_distribution():
    """Joint law of whole paths: chi-square goodness of fit of 20000 sampled paths
    against the 729 exact path probabilities (paths with expected count < 5 pooled).
    Threshold p > 1e-4: a correct sampler fails with probability 1e-4 (fixed seed,
    so deterministic); any error in the backward conditionals gives p ~ 0."""
    log_likes, trans = _problem(seed=0)
    ref = BruteForce(log_likes, trans)
    paths = _draw_paths(log_likes, trans, seed=8, use_sample_states=True)
    index = np.ravel_multi_index(paths.T, (NUM_STATES,) * NUM_FRAMES)
    # enumeration order of itertools.product is the same row-major order
    observed = np.bincount(index, minlength=NUM_STATES**NUM_FRAMES).astype(float)
    expected = ref.path_probs() * NUM_PATHS
    big = expected >= 5
    obs = np.concatenate([observed[big], [observed[~big].sum()]])
    exp = np.concatenate([expected[big], [expected[~big].sum()]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    pvalue = stats.chisquare(obs, exp).pvalue
    assert pvalue > 1e-4, pvalue


@pytest.mark.parametrize("num", [1, 2, 3, 7, 10, 17, 100])
def test_categorical_inversion_matches_the_cumulative_sum(num):
    """The two-level inversion returns searchsorted(cdf, u * total, 'right') of the float64 cdf
    (away from rounding-level ties), never a zero-weight index, for state counts that are and are
    not perfect squares, with zero weights inside, at the ends and in whole blocks."""
    rng = np.random.default_rng(num)
    weights = rng.uniform(0.0, 1.0, size=num)
    if num >= 3:
        weights[rng.choice(num, size=num // 3, replace=False)] = 0.0
        weights[-1] = 0.0
        weights[0] = max(weights[0], 0.1)
    if num >= 17:
        weights[5:10] = 0.0  # a whole block of 5 (size ceil(sqrt(17)) = 5)
    u = np.concatenate([rng.uniform(size=4000), [0.0, 1.0 - 2.0**-53]])
    with enable_x64(True):
        draw = jax.jit(jax.vmap(hmm._categorical_from_uniform, in_axes=(0, None)))
        got = np.asarray(draw(jnp.asarray(u), jnp.asarray(weights)))
    cdf = np.cumsum(weights)
    expected = np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), num - 1)
    near_tie = np.min(np.abs(cdf[None, :] - (u * cdf[-1])[:, None]), axis=1) < 1e-12
    np.testing.assert_array_equal(got[~near_tie], expected[~near_tie])
    assert np.all(weights[got] > 0)
    # frequencies match the normalised weights (chi-square on 20000 uniforms)
    u = rng.uniform(size=20_000)
    with enable_x64(True):
        counts = np.bincount(np.asarray(draw(jnp.asarray(u), jnp.asarray(weights))), minlength=num)
    support = weights > 0
    if support.sum() > 1:
        p = stats.chisquare(counts[support], 20_000 * weights[support] / weights.sum()).pvalue
        assert p > 1e-4, p
    assert counts[~support].sum() == 0
