"""ARHMM estimator: recovery, the scikit-learn contract, compilation and reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import config_context
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import make_pipeline

from kpms_estimators import ARHMM
from kpms_estimators._compat import enable_x64
from kpms_estimators._core import arhmm as core
from kpms_estimators._summary import matched_accuracy
from kpms_estimators.datasets import simulate_arhmm


@pytest.fixture(scope="module")
def recovery_data():
    return simulate_arhmm(n_states=5, n_recordings=5, n_frames=2000, random_state=1)


@pytest.fixture(scope="module")
def fitted(recovery_data):
    """The default recipe (100 states, default n_iter) on 5 recordings x 2000 frames."""
    model = ARHMM(random_state=0)
    return model.fit(recovery_data.X, sequence_ids=recovery_data.sequence_ids)


def test_recovers_simulated_syllables(recovery_data, fitted):
    """Hungarian-matched accuracy of ``predict`` on data drawn from the model itself."""
    labels = fitted.predict(recovery_data.X, sequence_ids=recovery_data.sequence_ids)
    accuracy = matched_accuracy(recovery_data.syllables, labels)
    assert accuracy >= 0.95, accuracy
    assert fitted.n_iter_ == ARHMM().n_iter
    assert fitted.log_likelihood_history_.shape == (fitted.n_iter_,)
    assert np.all(np.isfinite(fitted.log_likelihood_history_))
    # relabelled by frequency: 0 is the most used syllable
    assert np.all(np.diff(fitted.syllable_frequencies_) <= 0)
    counts = np.bincount(labels, minlength=fitted.n_states)
    assert counts.argmax() == 0


def test_predict_proba_and_transform(recovery_data, fitted):
    X, ids = recovery_data.X[:3000], recovery_data.sequence_ids[:3000]
    proba = fitted.predict_proba(X, sequence_ids=ids)
    assert proba.shape == (3000, fitted.n_states)
    assert proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(fitted.transform(X, sequence_ids=ids), proba)
    labels = fitted.predict(X, sequence_ids=ids)
    np.testing.assert_array_equal(labels, proba.argmax(axis=1))
    # the first n_lags frames of each recording copy frame n_lags (documented edge padding)
    start = 2000
    np.testing.assert_array_equal(proba[start : start + 3], np.repeat(proba[start + 3][None], 3, axis=0))


def test_score_is_mean_of_score_samples(recovery_data, fitted):
    X, ids = recovery_data.X[:4000], recovery_data.sequence_ids[:4000]
    samples = fitted.score_samples(X, sequence_ids=ids)
    assert samples.shape == (4000,)
    assert np.all(samples[[0, 1, 2, 2000, 2001, 2002]] == 0.0)
    assert fitted.score(X, sequence_ids=ids) == pytest.approx(samples.sum() / (4000 - 2 * 3))
    # the fitted model explains the data better than a shuffled-time version of it
    shuffled = X[np.random.default_rng(0).permutation(len(X))]
    assert fitted.score(X, sequence_ids=ids) > fitted.score(shuffled, sequence_ids=ids) + 1.0


def test_reproducible_and_seed_dependent():
    sim = simulate_arhmm(n_recordings=2, n_frames=300, random_state=3)
    kwargs = dict(n_states=8, n_iter=4)
    a = ARHMM(random_state=5, **kwargs).fit(sim.X, sequence_ids=sim.sequence_ids)
    b = ARHMM(random_state=5, **kwargs).fit(sim.X, sequence_ids=sim.sequence_ids)
    c = ARHMM(random_state=6, **kwargs).fit(sim.X, sequence_ids=sim.sequence_ids)
    np.testing.assert_array_equal(a.chain_state_.z, b.chain_state_.z)
    np.testing.assert_array_equal(a.ar_coefficients_, b.ar_coefficients_)
    np.testing.assert_array_equal(a.log_likelihood_history_, b.log_likelihood_history_)
    assert not np.array_equal(a.log_likelihood_history_, c.log_likelihood_history_)


def test_partial_fit_continues_the_same_chain():
    """n sweeps in one call equal k sweeps then n - k more with partial_fit."""
    sim = simulate_arhmm(n_recordings=2, n_frames=300, random_state=3)
    X, ids = sim.X, sim.sequence_ids
    whole = ARHMM(n_states=8, n_iter=6, random_state=1).fit(X, sequence_ids=ids)
    split = ARHMM(n_states=8, n_iter=2, random_state=1).fit(X, sequence_ids=ids)
    split.set_params(n_iter=4).partial_fit(X, sequence_ids=ids)
    assert split.n_iter_ == whole.n_iter_ == 6
    np.testing.assert_array_equal(split.chain_state_.z, whole.chain_state_.z)
    np.testing.assert_array_equal(split.chain_state_.params.Ab, whole.chain_state_.params.Ab)
    np.testing.assert_array_equal(split.log_likelihood_history_, whole.log_likelihood_history_)
    # partial_fit on other data keeps the parameters' chain going with fresh labels
    other = simulate_arhmm(n_recordings=1, n_frames=400, random_state=4)
    split.set_params(n_iter=1).partial_fit(other.X)
    assert split.n_iter_ == 7
    assert split.chain_state_.z.shape[0] == 1


def test_gibbs_step_compiles_once():
    sim = simulate_arhmm(n_recordings=2, n_frames=250, random_state=2)
    before = dict(core.TRACE_COUNTS)
    model = ARHMM(n_states=7, n_iter=1, random_state=0).fit(sim.X, sequence_ids=sim.sequence_ids)
    # initialisation and the sweep share the compiled labels program (a shape no other test uses)
    assert core.TRACE_COUNTS["arhmm.sample_labels"] == before["arhmm.sample_labels"] + 1
    after_fit = dict(core.TRACE_COUNTS)
    model.set_params(n_iter=5).partial_fit(sim.X, sequence_ids=sim.sequence_ids)
    model.set_params(kappa=1e3).partial_fit(sim.X, sequence_ids=sim.sequence_ids)
    # new recordings of the same shape: labels re-initialised by the same program
    other = simulate_arhmm(n_recordings=2, n_frames=250, random_state=3)
    model.set_params(n_iter=1).partial_fit(other.X, sequence_ids=other.sequence_ids)
    assert core.TRACE_COUNTS == after_fit
    assert model.n_iter_ == 12


def test_clone_keeps_params():
    model = ARHMM(n_states=12, n_lags=2, kappa=3e4, alpha=2.0, gamma=50.0, n_iter=7, random_state=3)
    assert clone(model).get_params() == model.get_params()


def test_pipeline_with_pca():
    sim = simulate_arhmm(n_recordings=1, n_frames=500, latent_dim=6, random_state=0)
    pipe = make_pipeline(PCA(3), ARHMM(n_states=6, n_iter=3, random_state=0))
    labels = pipe.fit(sim.X).predict(sim.X)
    assert labels.shape == (500,)
    assert labels.min() >= 0 and labels.max() < 6


def test_grid_search_over_kappa_with_group_kfold():
    """GridSearchCV picks kappa by held-out score, recordings kept whole by GroupKFold.

    ``sequence_ids`` reaches fit and score through scikit-learn's metadata routing.
    """
    sim = simulate_arhmm(n_recordings=4, n_frames=300, random_state=5)
    with config_context(enable_metadata_routing=True):
        est = ARHMM(n_states=6, n_iter=3, random_state=0)
        est.set_fit_request(sequence_ids=True).set_score_request(sequence_ids=True)
        search = GridSearchCV(est, {"kappa": [1e2, 1e6]}, cv=GroupKFold(n_splits=2))
        search.fit(sim.X, groups=sim.sequence_ids, sequence_ids=sim.sequence_ids)
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores))
    assert search.best_params_["kappa"] == [1e2, 1e6][int(np.argmax(scores))]
    assert search.best_estimator_.n_iter_ == 3


def test_compiler_options_drop_what_jaxlib_rejects(monkeypatch):
    from kpms_estimators._estimators import _base

    options = dict(_base.COMPILER_OPTIONS["cpu"], xla_cpu_no_such_option_kpms=True)
    monkeypatch.setitem(_base.COMPILER_OPTIONS, "cpu", options)
    monkeypatch.setattr(_base, "_ACCEPTED_OPTIONS", {})
    accepted = _base.compiler_options("cpu")
    assert "xla_cpu_no_such_option_kpms" not in accepted
    assert accepted["xla_backend_optimization_level"] == 1  # jaxlib >= 0.6.2 knows the others
    assert set(accepted) == set(options) - {"xla_cpu_no_such_option_kpms"}
    # a program compiled with what is left runs
    double = _base.compiled(lambda x: 2 * x)
    assert float(double(np.ones(1))[0]) == 2.0
    # per-program extras (REDUCTION_OPTIONS) go through the same filter
    extra = {"xla_cpu_no_such_option_kpms_2": 1, **_base.REDUCTION_OPTIONS["cpu"]}
    with_extra = _base.compiler_options("cpu", extra)
    assert "xla_cpu_no_such_option_kpms_2" not in with_extra
    assert set(accepted) <= set(with_extra) <= set(options) | set(extra)
    import jax.numpy as jnp

    sum_of_squares = _base.compiled(lambda x: jnp.sum(jnp.cos(x) ** 2), options=_base.REDUCTION_OPTIONS)
    assert float(sum_of_squares(np.zeros(3))) == 3.0


@pytest.mark.parametrize(
    "num_segments,num_frames,group_frames,expected",
    [(20, 10030, 100_000, 5), (20, 10030, 10**9, 20), (4, 3030, 100_000, 4), (7, 12, 40, 3), (6, 12, 25, 2),
     (6, 12, 10, 1), (1, 200_000, 100_000, 1)],
)
def test_label_group_size(num_segments, num_frames, group_frames, expected):
    """All segments when they fit; else a divisor of the segment count with groups of at least half
    the frame budget; else near-equal groups with a smaller last one (7 segments of 12 frames: 3)."""
    assert core.group_size(num_segments, num_frames, group_frames) == expected


@pytest.mark.parametrize("num_segments,group_frames", [(6, 10), (6, 25), (6, 45), (7, 40)])
def test_grouped_labels_match_all_at_once(num_segments, group_frames):
    """The label draw in groups of segments (one group, divisor groups, a remainder group) gives the
    labels of the draw over all segments at once, with float32-stored log-likelihoods and padding."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    num_states, latent_dim, n_lags, num_frames = 4, 2, 2, 12
    with enable_x64(True):
        Ab = rng.normal(0, 0.4, (num_states, latent_dim, n_lags * latent_dim + 1))
        Q = np.stack([np.eye(latent_dim) * rng.uniform(0.2, 1.0) for _ in range(num_states)])
        pi = rng.dirichlet(np.ones(num_states), num_states)
        params = core.ARHMMParams(jnp.full(num_states, 1 / num_states), jnp.asarray(pi), jnp.asarray(Ab), jnp.asarray(Q))
        mask = np.ones((num_segments, num_frames))
        mask[-1, 8:] = 0  # a padded tail
        data = core.ARHMMData(jnp.asarray(rng.normal(0, 1, (num_segments, num_frames, latent_dim))), jnp.asarray(mask))
        key = jax.random.key(5)
        grouped = core.sample_labels_grouped(key, data, params, jnp.float32, jnp.float32, group_frames)
        whole = core.sample_labels_grouped(key, data, params, jnp.float32, jnp.float32, 10**9)
        log_likes = core.masked_log_likes(data, params, jnp.float32, time_major=True, out_dtype=jnp.float32)
        direct = core.sample_z(key, log_likes, params.pi, time_major=True)[0]
    assert grouped.shape == (num_segments, num_frames - n_lags)
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(direct))
    np.testing.assert_array_equal(np.asarray(grouped), np.asarray(whole))
    assert len(np.unique(np.asarray(whole))) > 1  # the labels are not trivially constant
