"""AlloKeypointSLDS: recovery on location-aware simulated data, relabelling, new data, checkpoints, bad input."""

from __future__ import annotations

import copy
import pickle

import jax
import numpy as np
import pytest
import xarray as xr
from scipy.optimize import linear_sum_assignment

from kpms_estimators import AlloKeypointSLDS, KeypointSLDS
from kpms_estimators._compat import enable_x64
from kpms_estimators._core import allo
from kpms_estimators._summary import matched_accuracy
from kpms_estimators.datasets import simulate_keypoints

N_RECORDINGS, N_FRAMES = 3, 1500
SIM = dict(n_keypoints=10, n_dims=2, n_states=5, n_recordings=N_RECORDINGS, n_frames=N_FRAMES, location_aware=True)
PARAMS = dict(n_states=20, latent_dim=4, n_ar_iter=20, n_iter=40, n_apply_iter=3, n_marginal_samples=2,
              anterior_keypoints=["nose"], posterior_keypoints=["tail_base"], random_state=0)


@pytest.fixture(scope="module")
def sim():
    return simulate_keypoints(**SIM, random_state=0)


#: What the ``fitted`` fixture's fit traced (a shape no other test uses): see the compile-once test.
_FIT_TRACES: dict[str, int] = {}


@pytest.fixture(scope="module")
def fitted(sim):
    """20 AR-only then 40 full sweeps on 3 x 1500 frames."""
    from kpms_estimators._core import keypoint_slds as kslds

    before = {**allo.TRACE_COUNTS, **kslds.TRACE_COUNTS}
    model = AlloKeypointSLDS(**PARAMS).fit(sim.poses)
    _FIT_TRACES.update({k: v - before[k] for k, v in {**allo.TRACE_COUNTS, **kslds.TRACE_COUNTS}.items()})
    return model


@pytest.fixture(scope="module")
def labels(sim, fitted):
    """Predicted (relabelled) syllables on the training data and the true ones, recordings in order."""
    pred = fitted.predict(sim.poses)
    recs = sorted(sim.poses)
    return np.concatenate([pred[r] for r in recs]), np.concatenate([sim.syllables[r] for r in recs])


def _matching(pred, truth):
    """(fitted label, true syllable) pairs of the one-to-one matching that maximises agreement."""
    confusion = np.zeros((pred.max() + 1, truth.max() + 1))
    np.add.at(confusion, (pred, truth), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return list(zip(rows, cols))


def test_recovers_syllables_heading_change_and_velocity(sim, fitted, labels):
    """Matched syllable accuracy >= 0.9 (measured 0.974-0.995 on chains 0-3), and for every true syllable
    the matched fitted one has heading change within 0.04 rad/frame (true values spread over +-0.1;
    measured max error 0.023 over chains 0-3) and egocentric velocity within 0.3 units/frame per axis
    (true values ~N(0, 1); measured max error 0.15). The remaining error is mostly a rotation of the
    egocentric frame: the fitted heading is the orientation of the fitted pose model, which differs from
    the simulator's body frame by a pose-dependent angle. The fitted variances are larger than the
    simulator's (after 40 sweeps the sampled heading and centroid still carry much of the keypoint
    noise), so they are not compared."""
    pred, truth = labels
    assert matched_accuracy(truth, pred) >= 0.9
    for fit_k, true_k in _matching(pred, truth):
        assert abs(fitted.heading_change_[fit_k] - sim.heading_change[true_k]) < 0.04, (fit_k, true_k)
        np.testing.assert_array_less(np.abs(fitted.velocity_[fit_k] - sim.velocity[true_k]), 0.3)
    assert fitted.n_iter_ == 60 and list(fitted.stage_history_[[0, 19, 20, 59]]) == [
        "ar_only", "ar_only", "full", "full"]
    assert set(fitted.log_likelihood_terms_) == {"z", "x", "Y", "s", "hv", "n_used", "nan_retries"}
    for term in ("z", "x", "Y", "s", "hv"):
        assert np.all(np.isfinite(fitted.log_likelihood_terms_[term]))
    np.testing.assert_allclose(fitted.log_likelihood_history_, sum(
        fitted.log_likelihood_terms_[k] for k in ("z", "x", "Y", "s", "hv")))
    # sigmasq is resampled by default here (it starts at 1)
    assert fitted.resample_global_noise_scale and not np.allclose(fitted.noise_scales_, 1.0)


def test_relabelling_permutes_the_allo_parameters(fitted, labels, sim):
    """Syllable i (by frequency) carries the chain's parameters of raw state syllable_order_[i]. The order
    is not the identity here, so leaving the allo parameters unpermuted (the reference, spec 14 #6) would
    pair syllables with other syllables' motion and fail the comparison with the truth below."""
    order = fitted.syllable_order_
    params = fitted.chain_state_.params
    n_used = int(np.sum(fitted.syllable_frequencies_ > 0))
    assert not np.array_equal(order[:n_used], np.arange(n_used))
    np.testing.assert_array_equal(fitted.heading_change_, params.delta_h[order])
    np.testing.assert_array_equal(fitted.heading_change_var_, params.sigmasq_h[order])
    np.testing.assert_array_equal(fitted.velocity_, params.delta_v[order])
    np.testing.assert_array_equal(fitted.velocity_var_, params.sigmasq_v[order])
    np.testing.assert_array_equal(fitted.ar_coefficients_, params.Ab[order])
    pred, truth = labels
    pairs = _matching(pred, truth)
    for fit_k, true_k in pairs:
        np.testing.assert_array_less(np.abs(fitted.velocity_[fit_k] - sim.velocity[true_k]), 0.3)
    # the same comparison with the raw (unpermuted) parameters fails
    assert any(np.max(np.abs(params.delta_v[fit_k] - sim.velocity[true_k])) >= 0.3 for fit_k, true_k in pairs)


def test_sweep_parts_compile_once_per_shape(sim, fitted):
    """The fit (initialisation, AR-only and full stages) traced each compiled part once; the AR parameter
    draw and the initialisation's parts are KeypointSLDS's. Apply's states-only sweeps and more sweeps
    trace nothing new."""
    from kpms_estimators._core import keypoint_slds as kslds

    for part in ("allo.allo_params", "allo.sample_labels", "allo.emission_after_x", "keypoint_slds.emission_x",
                 "keypoint_slds.param_stats", "keypoint_slds.sample_labels"):
        assert _FIT_TRACES[part] == 1, (part, _FIT_TRACES)
    # the emission runs as x windows + the steps after x (estimator), never as one program
    for part in ("allo.gibbs_step", "allo.sample_emission", "keypoint_slds.sample_emission"):
        assert _FIT_TRACES[part] == 0, (part, _FIT_TRACES)
    now = {**allo.TRACE_COUNTS, **kslds.TRACE_COUNTS}
    fitted.predict(sim.poses)
    copy.deepcopy(fitted).set_params(n_iter=1).partial_fit(sim.poses)
    assert {**allo.TRACE_COUNTS, **kslds.TRACE_COUNTS} == now


def test_new_data_keep_the_fitted_allo_parameters(fitted):
    """Other data (same shape, another seed): states are re-initialised and resampled under the fitted
    parameters, allo ones included (the reference replaces them with prior draws, spec 14 #5)."""
    other = simulate_keypoints(**SIM, random_state=7).poses
    before = pickle.dumps(fitted.chain_state_.params)
    _, _, state, _, _ = fitted._apply(other, None)
    for name in ("delta_h", "sigmasq_h", "delta_v", "sigmasq_v", "Ab", "pi", "sigmasq"):
        np.testing.assert_array_equal(getattr(state.params, name), getattr(fitted.chain_state_.params, name))
    out = fitted.transform(other)
    assert pickle.dumps(fitted.chain_state_.params) == before
    ds = out["rec0"]
    assert set(ds.data_vars) == {"syllable", "latent_state", "centroid", "heading"}
    assert ds["centroid"].shape == (N_FRAMES, 2) and np.all(np.isfinite(ds["heading"].values))
    assert np.isfinite(fitted.score(other))


def test_marginals_use_the_allo_likelihood(sim, fitted, labels):
    """predict_proba rows sum to one, agree with predict, and equal forward-backward with the z sampler's
    AR + allo log-likelihoods; the AR term alone gives different marginals (the reference's, spec 14 #7)."""
    proba = fitted.predict_proba(sim.poses)
    p = np.concatenate([proba[r]["syllable_proba"].values for r in sorted(proba)])
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    assert np.mean(p.argmax(1) == labels[0]) > 0.9
    state = jax.tree_util.tree_map(np.asarray, fitted.chain_state_)
    with enable_x64(True):
        recordings = fitted._recordings(sim.poses, None, reset=False)
        data = fitted._core_data(recordings, fitted._batch(recordings))
        full = np.asarray(allo.posterior_marginals(state, data))
        ar_only = np.asarray(allo.arhmm.posterior_marginals(allo.arhmm.ARHMMData(state.x, data.mask), state.params.ar))
    real = np.asarray(data.mask)[:, fitted.n_lags :] > 0
    assert np.max(np.abs(full - ar_only)[real]) > 0.1


def test_checkpoint_round_trip_and_continuation(tmp_path, sim, fitted):
    path = tmp_path / "allo.nc"
    fitted.save(path)
    loaded = AlloKeypointSLDS.load(path)
    assert loaded.get_params() == fitted.get_params()
    assert type(loaded.chain_state_) is allo.AlloState
    for name in ("heading_change_", "heading_change_var_", "velocity_", "velocity_var_", "syllable_order_"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fitted, name))
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.chain_state_, fitted.chain_state_)
    expected, got = fitted.predict(sim.poses), loaded.predict(sim.poses)
    for rec in expected:
        np.testing.assert_array_equal(got[rec], expected[rec])
    with pytest.raises(ValueError, match="AlloKeypointSLDS checkpoint, not a KeypointSLDS"):
        KeypointSLDS.load(path)
    # the chain continues exactly as in memory
    in_memory = copy.deepcopy(fitted).set_params(n_iter=2).partial_fit(sim.poses)
    resumed = loaded.set_params(n_iter=2).partial_fit(sim.poses)
    assert resumed.n_iter_ == 62
    np.testing.assert_array_equal(resumed.log_likelihood_history_, in_memory.log_likelihood_history_)
    np.testing.assert_array_equal(resumed.velocity_, in_memory.velocity_)


def test_constructor_defaults_and_bad_arguments(sim):
    model = AlloKeypointSLDS()
    params = model.get_params()
    assert {k: params[k] for k in ("alpha0_v", "beta0_v", "lambda0_v", "alpha0_h", "beta0_h", "lambda0_h")} == dict(
        alpha0_v=10.0, beta0_v=0.1, lambda0_v=1.0, alpha0_h=10.0, beta0_h=0.1, lambda0_h=1.0)
    assert params["resample_global_noise_scale"] is True
    assert set(KeypointSLDS().get_params()) < set(params)
    small = {"a": sim.poses["rec0"].isel(time=slice(0, 200))}
    with pytest.raises(ValueError, match="beta0_h must be a positive finite number, got -1"):
        AlloKeypointSLDS(n_states=4, n_ar_iter=1, n_iter=1, beta0_h=-1).fit(small)
    with pytest.raises(ValueError, match="lambda0_v must be a positive finite number, got 0"):
        AlloKeypointSLDS(n_states=4, n_ar_iter=1, n_iter=1, lambda0_v=0).fit(small)
    with pytest.raises(ValueError, match="fix_heading must be False"):
        AlloKeypointSLDS(n_states=4, n_ar_iter=1, n_iter=1, fix_heading=True).fit(small)


def test_simulator_location_aware_truth():
    """The location-aware simulator's heading and centroid steps follow the returned per-syllable truth."""
    sim = simulate_keypoints(n_recordings=1, n_frames=4000, n_states=3, random_state=3, location_aware=True,
                             heading_noise=0.01, velocity_noise=0.05)
    z, h, v = sim.syllables["rec0"], sim.heading["rec0"], sim.centroid["rec0"]
    dh = np.angle(np.exp(1j * np.diff(h)))
    step = np.diff(v, axis=0)
    cos, sin = np.cos(h[:-1]), np.sin(h[:-1])
    ego = np.stack([cos * step[:, 0] + sin * step[:, 1], -sin * step[:, 0] + cos * step[:, 1]], axis=-1)
    for k in range(3):
        sel = z[1:] == k
        np.testing.assert_allclose(dh[sel].mean(), sim.heading_change[k], atol=0.002)
        np.testing.assert_allclose(dh[sel].var(), sim.heading_change_var[k], rtol=0.15)
        np.testing.assert_allclose(ego[sel].mean(0), sim.velocity[k], atol=0.01)
        np.testing.assert_allclose(ego[sel].var(0), sim.velocity_var[k], rtol=0.15)
    plain = simulate_keypoints(n_recordings=1, n_frames=4000, n_states=3, random_state=3)
    np.testing.assert_array_equal(plain.syllables["rec0"], z)
    assert "velocity" not in plain
    assert isinstance(sim.poses["rec0"], xr.Dataset)


def _purity(pred, truth):
    """Fraction of frames whose fitted state's majority true syllable is their own (1 = no merged syllables)."""
    confusion = np.zeros((pred.max() + 1, truth.max() + 1))
    np.add.at(confusion, (pred, truth), 1)
    return confusion.max(axis=1).sum() / len(pred)


@pytest.mark.slow
def test_three_dimensional_recordings():
    """3D location-aware data, 20 AR-only + 40 full sweeps: heading, centroid and height are tracked as
    well as by KeypointSLDS (measured median errors 0.17 rad against the simulator's body frame, and 0.48
    units per axis, height included; bounds 0.25 and 1.0), the log joint has the "height" term, and the
    syllables are recovered with matched accuracy >= 0.75. Measured 0.85 here: two syllables merged in
    the AR-only stage and stay merged. In 3D this happened more often than with KeypointSLDS (after the
    AR-only stage, 4 chains on another simulation: 0.80, 0.87, 0.99, 0.94 against 0.91, 0.98, 0.97,
    0.98), in 2D less often (0.99, 0.97, 0.98, 0.96 against 0.94, 0.96, 0.79, 0.97): an open problem."""
    sim = simulate_keypoints(**{**SIM, "n_dims": 3}, random_state=1)
    model = AlloKeypointSLDS(**PARAMS).fit(sim.poses)
    out = model.transform(sim.poses)
    recs = sorted(sim.poses)
    truth = np.concatenate([sim.syllables[r] for r in recs])
    pred = np.concatenate([out[r]["syllable"].values for r in recs])
    assert matched_accuracy(truth, pred) >= 0.75
    heading = np.concatenate([np.abs(np.angle(np.exp(1j * (out[r]["heading"].values - sim.heading[r]))))
                              for r in recs])
    centroid = np.concatenate([np.abs(out[r]["centroid"].values - sim.centroid[r]) for r in recs])
    assert np.median(heading) < 0.25
    np.testing.assert_array_less(np.median(centroid, axis=0), 1.0)
    assert np.all(np.isfinite(model.log_likelihood_terms_["height"]))
    np.testing.assert_allclose(model.log_likelihood_history_, sum(
        model.log_likelihood_terms_[k] for k in ("z", "x", "Y", "s", "hv", "height")))


@pytest.mark.slow
def test_recovery_with_the_default_number_of_states(sim):
    """100 states (the default truncation), 50 AR-only + 100 full sweeps: no two true syllables share a
    fitted state (purity >= 0.95; measured 0.998). The matched accuracy is lower, 0.885 on this chain:
    the fastest-turning syllable splits into three states (538, 305 and 121 frames), the split-syllable
    problem that KeypointSLDS has too."""
    model = AlloKeypointSLDS(**{**PARAMS, "n_states": 100, "n_ar_iter": 50, "n_iter": 100, "random_state": 1})
    pred = model.fit(sim.poses).predict(sim.poses)
    recs = sorted(sim.poses)
    truth = np.concatenate([sim.syllables[r] for r in recs])
    pred = np.concatenate([pred[r] for r in recs])
    assert _purity(pred, truth) >= 0.95
    assert matched_accuracy(truth, pred) >= 0.8
