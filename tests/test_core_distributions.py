"""The loop-free gamma sampler against scipy (``kpms_estimators._core.distributions``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import digamma, polygamma

from kpms_estimators._compat import enable_x64
from kpms_estimators._core import distributions as dist

NUM = 40_000
_log_gamma = jax.jit(dist.sample_log_gamma,
                     static_argnames=("num_proposals", "repair", "first_proposals", "round_proposals"))


@pytest.mark.parametrize(
    "proposals, repair, first, rounds",
    [(16, False, None, None), (1, True, None, None), (16, False, 1, None), (16, False, 2, None),
     (16, False, None, 4), (16, False, None, 1)],
    ids=["loop-free", "repair-loop", "compact-1", "compact-2", "rounds-of-4", "rounds-of-1"],
)
@pytest.mark.parametrize("shape", [1e-3, 0.3, 1.0, 2.5, 40.0, 5e4])
def test_log_gamma_matches_scipy(shape, proposals, repair, first, rounds):
    """log G, G ~ Gamma(shape): Kolmogorov-Smirnov against scipy's log-gamma
    distribution (p > 1e-3), and mean psi(a) / variance psi'(a) within 5 standard
    errors. Shape 1e-3 exercises the boost (G itself underflows float64 often).
    With one pre-drawn proposal and the repair loop, the ~5% of rejections are
    redrawn in the loop: exact sequential rejection sampling. With ``first_proposals``
    (1 or 2 for every variate, then only the rejected ones redrawn: the per-frame
    scales' mode) and with ``round_proposals`` (rounds of 4 or 1 for every variate
    until all accept: pi's mode) it is exact too."""
    with enable_x64(True):
        key = jax.random.key(int(shape * 1000) % 997)
        draws = np.asarray(_log_gamma(key, jnp.full((NUM,), shape), num_proposals=proposals, repair=repair,
                                      first_proposals=first, round_proposals=rounds))
    assert np.all(np.isfinite(draws))
    assert stats.kstest(draws, stats.loggamma(c=shape).cdf).pvalue > 1e-3
    var = polygamma(1, shape)
    assert abs(draws.mean() - digamma(shape)) <= 5 * np.sqrt(var / NUM)


def test_uniforms_are_split_from_one_draw():
    """uniforms() returns arrays of the asked shapes, in [tiny, 1), not equal to each other."""
    with enable_x64(True):
        a, b = dist.uniforms(jax.random.key(0), (3, 4), (5,), dtype=jnp.float64)
    assert a.shape == (3, 4) and b.shape == (5,)
    both = np.concatenate([np.ravel(a), np.ravel(b)])
    assert np.all(both > 0) and np.all(both < 1) and len(np.unique(both)) == 17


def test_gamma_exhaustion_probability_is_negligible():
    """The documented bound: at shape 1 (the worst case after the boost) a
    Marsaglia-Tsang proposal is accepted with probability > 0.95, measured here by
    Monte Carlo with the sampler's own acceptance test, so all 16 proposals fail
    with probability < 0.05**16."""
    rng = np.random.default_rng(0)
    d = 1.0 - 1.0 / 3.0
    c = 1.0 / np.sqrt(9.0 * d)
    x = rng.standard_normal(1_000_000)
    v = (1 + c * x) ** 3
    u = rng.random(x.size)
    safe = np.where(v > 0, v, 1.0)
    accept = (v > 0) & (np.log(u) < 0.5 * x**2 + d - d * safe + d * np.log(safe))
    assert accept.mean() > 0.95


@pytest.mark.parametrize("shape", [0.3, 2.5])
def test_log_gamma_compact_redraw_rounds_overflow(shape):
    """``rejection_sample_compact`` on arrays of 8 variates redraws at most one per round
    (capacity 8 // 8), so rejections queue over several rounds; under vmap (5000 keys,
    40000 variates) the draws still match scipy's log-gamma law (KS p > 1e-3, mean within
    5 standard errors)."""
    draw = jax.jit(jax.vmap(lambda k, a: dist.sample_log_gamma(k, a, first_proposals=1), in_axes=(0, None)))
    with enable_x64(True):
        keys = jax.random.split(jax.random.key(11), NUM // 8)
        draws = np.asarray(draw(keys, jnp.full((8,), shape))).ravel()
    assert np.all(np.isfinite(draws))
    assert stats.kstest(draws, stats.loggamma(c=shape).cdf).pvalue > 1e-3
    assert abs(draws.mean() - digamma(shape)) <= 5 * np.sqrt(polygamma(1, shape) / draws.size)


@pytest.mark.parametrize("shape", [1.0, 1.5, 3.5, 40.0])
@pytest.mark.parametrize("share", [8, 32, 4096])
def test_log_gamma_two_uniform_compact_matches_scipy(shape, share):
    """The local noise scales' mode: shapes known to be >= 1 (``at_least_one``: two uniforms
    per proposal, no boost) and 1/``share`` of the array redrawn per round (share 4096: 9
    slots for ~2000 rejections at shape 1, so rejections queue over ~200 rounds, beyond the usual
    cap of 64: the compact loop's cap grows with the share). KS against
    scipy's log-gamma (p > 1e-3) and mean within 5 standard errors."""
    draw = jax.jit(lambda k, a: dist.sample_log_gamma(k, a, first_proposals=1, redraw_share=share, at_least_one=True))
    with enable_x64(True):
        draws = np.asarray(draw(jax.random.key(share + int(10 * shape)), jnp.full((NUM,), shape)))
    assert np.all(np.isfinite(draws))
    assert stats.kstest(draws, stats.loggamma(c=shape).cdf).pvalue > 1e-3
    assert abs(draws.mean() - digamma(shape)) <= 5 * np.sqrt(polygamma(1, shape) / NUM)


@pytest.mark.parametrize("mode", [dict(num_proposals=1, repair=True), dict(first_proposals=1),
                                  dict(round_proposals=4)], ids=["repair", "compact", "rounds"])
def test_rejection_loops_end_on_nan_parameters(mode):
    """A NaN shape never accepts a proposal: the loops stop after MAX_REJECTION_ROUNDS and give
    NaN there (which a fit's finiteness check catches), instead of looping forever; the
    other variates are unaffected and finite."""
    shapes = jnp.asarray([2.5, np.nan, 0.3, 40.0] * 8)
    draw = jax.jit(lambda k, a: dist.sample_log_gamma(k, a, **mode))
    with enable_x64(True):
        out = np.asarray(draw(jax.random.key(0), shapes.astype(jnp.float64)))
    nan = np.isnan(np.asarray(shapes))
    assert np.all(np.isnan(out[nan]))
    assert np.all(np.isfinite(out[~nan]))


@pytest.mark.parametrize("count", [1, 5, 40])
def test_true_positions_match_nonzero(count):
    """``_true_positions`` is ``jnp.nonzero(size=count, fill_value=n)``: fewer, as many and more
    True entries than slots, none at all, and all."""
    rng = np.random.default_rng(count)
    for flags in (rng.random(37) < 0.3, np.zeros(37, bool), np.ones(37, bool), rng.random(37) < 0.9):
        flags = jnp.asarray(flags)
        expected = jnp.nonzero(flags, size=count, fill_value=flags.size)[0]
        np.testing.assert_array_equal(np.asarray(dist._true_positions(flags, count)), np.asarray(expected))
