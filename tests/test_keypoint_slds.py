"""KeypointSLDS: recovery on data from the model, contract on valid keypoint data, bad input, real data."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import xarray as xr
from sklearn.base import clone

from kpms_estimators import KeypointSLDS
from kpms_estimators._core import keypoint_slds as core
from kpms_estimators._summary import matched_accuracy, syllable_durations
from kpms_estimators.datasets import simulate_keypoints
from kpms_estimators.io import load_many


SMALL = dict(n_states=8, n_ar_iter=2, n_iter=3, n_apply_iter=2, n_marginal_samples=2, random_state=0)


@pytest.fixture(scope="module")
def sim():
    return simulate_keypoints(n_keypoints=10, n_dims=2, n_states=5, n_recordings=4, n_frames=3000, random_state=0)


@pytest.fixture(scope="module")
def fitted(sim):
    """The default recipe with reduced sweeps: 50 AR-only, then 100 full-model sweeps."""
    model = KeypointSLDS(latent_dim=4, n_ar_iter=50, n_iter=100, n_apply_iter=20, n_marginal_samples=3,
                         anterior_keypoints=["nose"], posterior_keypoints=["tail_base"], random_state=0)
    return model.fit(sim.poses)


def _label_agreement(model) -> float:
    """Share of labelled frames whose z draw is the same with float32 AR residuals and float32-stored
    log-likelihoods (what the sampler uses, ``core.LABEL_RESIDUAL_DTYPE``, ``core.LABEL_LOG_LIKE_DTYPE``)
    as with float64 ones, for the same uniforms, at the fitted state; the float32 log-likelihoods must
    also be within 1e-3 of float64 where they matter (within 30 nats of the frame's best state)."""
    import jax
    import jax.numpy as jnp

    from kpms_estimators._core import arhmm, hmm
    from kpms_estimators._estimators._base import float64

    with float64():
        state = jax.tree_util.tree_map(jnp.asarray, model.chain_state_)
        data = arhmm.ARHMMData(state.x, jnp.ones(state.x.shape[:2]))
        exact = arhmm.masked_log_likes(data, state.params.ar)
        fast = arhmm.masked_log_likes(data, state.params.ar, core.LABEL_RESIDUAL_DTYPE,
                                      out_dtype=core.LABEL_LOG_LIKE_DTYPE)
        assert fast.dtype == core.LABEL_LOG_LIKE_DTYPE
        relevant = exact > jnp.max(exact, axis=-1, keepdims=True) - 30
        assert float(jnp.max(jnp.where(relevant, jnp.abs(fast - exact), 0.0))) < 1e-3
        u = jax.random.uniform(jax.random.key(0), exact.shape[:2], exact.dtype)
        draw = jax.vmap(hmm.sample_states_from_uniforms, in_axes=(0, 0, None))
        return float(jnp.mean(draw(u, exact, state.params.pi)[0] == draw(u, fast, state.params.pi)[0]))


def test_float32_label_residuals_match_float64(fitted):
    assert _label_agreement(fitted) >= 0.999


def _angle_error(a, b):
    return np.abs(np.angle(np.exp(1j * (a - b))))


def test_recovers_syllables_heading_and_centroid(sim, fitted):
    """After 50 AR-only + 100 full sweeps: matched syllable accuracy >= 0.85 (chance is ~0.3; measured
    on chains random_state=0-19 with the simulator's default latent_noise=0.3: 0.896-0.996, median
    0.986, 4 of 20 below 0.95, where a true syllable is split over several states; this is chain 0);
    median heading error < 0.2 rad and median centroid error < 1.5 units (body length 40,
    per-coordinate noise ~1.8 units)."""
    results = fitted.transform(sim.poses)
    assert sorted(results) == sorted(sim.poses)
    labels = np.concatenate([results[r]["syllable"].values for r in sorted(results)])
    truth = np.concatenate([sim.syllables[r] for r in sorted(results)])
    assert matched_accuracy(truth, labels) >= 0.85
    heading = np.concatenate([_angle_error(results[r]["heading"].values, sim.heading[r]) for r in results])
    centroid = np.concatenate(
        [np.linalg.norm(results[r]["centroid"].values - sim.centroid[r], axis=-1) for r in results]
    )
    assert np.median(heading) < 0.2, np.median(heading)
    assert np.median(centroid) < 1.5, np.median(centroid)
    assert fitted.n_iter_ == 150 and list(fitted.stage_history_[[0, 49, 50, 149]]) == [
        "ar_only", "ar_only", "full", "full"]
    for term in ("z", "x", "Y", "s", "v"):
        assert fitted.log_likelihood_terms_[term].shape == (150,)
        assert np.all(np.isfinite(fitted.log_likelihood_terms_[term]))
    assert np.all(np.diff(fitted.syllable_frequencies_) <= 0)


@pytest.mark.slow
def test_recovers_syllables_after_longer_chains(sim):
    """Matched accuracy >= 0.95 after 50 AR-only + 400 full sweeps on another chain."""
    model = KeypointSLDS(latent_dim=4, n_ar_iter=50, n_iter=400, n_apply_iter=20, random_state=1,
                         anterior_keypoints=["nose"], posterior_keypoints=["tail_base"]).fit(sim.poses)
    labels = model.predict(sim.poses)
    truth = np.concatenate([sim.syllables[r] for r in sorted(labels)])
    assert matched_accuracy(truth, np.concatenate([labels[r] for r in sorted(labels)])) >= 0.95


def test_predict_proba_and_score(sim, fitted):
    proba = fitted.predict_proba(sim.poses)
    for rec, ds in proba.items():
        p = ds["syllable_proba"].values
        assert p.shape == (3000, fitted.n_states)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    labels = fitted.predict(sim.poses)
    agree = np.mean(np.concatenate([proba[r]["syllable_proba"].values.argmax(1) == labels[r] for r in labels]))
    assert agree > 0.9
    score = fitted.score(sim.poses)
    assert np.isfinite(score)


def test_new_data_are_resampled_with_fixed_parameters(sim, fitted):
    """Data not seen in fit: states re-initialised and resampled, parameters untouched."""
    other = simulate_keypoints(n_recordings=1, n_frames=800, random_state=5).poses
    before = pickle.dumps(fitted.chain_state_.params)
    out = fitted.transform(other)
    assert pickle.dumps(fitted.chain_state_.params) == before
    ds = out["rec0"]
    assert set(ds.data_vars) == {"syllable", "latent_state", "centroid", "heading"}
    assert ds["latent_state"].shape == (800, 4)
    assert np.all(np.isfinite(ds["latent_state"].values))
    assert np.all(np.abs(ds["heading"].values) <= np.pi)


def test_latent_dim_none_explains_90_percent(sim):
    model = KeypointSLDS(**SMALL).fit({"a": sim.poses["rec0"]})
    cumulative = np.cumsum(model.explained_variance_ratio_)
    assert model.latent_dim_ == min(int(np.argmax(cumulative > 0.9)) + 1, 10)
    assert model.emission_.shape == (9 * 2, model.latent_dim_ + 1)


def test_reproducible_and_compiles_once(sim):
    poses = {"a": sim.poses["rec0"].isel(time=slice(0, 613))}
    before = dict(core.TRACE_COUNTS)
    first = KeypointSLDS(**SMALL).fit(poses)
    first.predict(poses)
    count = dict(core.TRACE_COUNTS)
    # a shape no other test uses: init, the AR-only and full stages and predict's states-only
    # sweeps each trace the shared parts once (compile once per shape)
    for part in ("param_stats", "sample_labels", "sample_emission", "emission_x"):
        assert count[f"keypoint_slds.{part}"] - before[f"keypoint_slds.{part}"] == 1, part
    second = KeypointSLDS(**SMALL).fit(poses)
    second.partial_fit(poses)
    second.predict(poses)
    # the sweep's compiled parts are shared by init, both stages and apply's states-only sweeps
    assert core.TRACE_COUNTS == count
    np.testing.assert_array_equal(first.log_likelihood_history_, second.log_likelihood_history_[:5])
    assert second.n_iter_ == 8
    other = KeypointSLDS(**{**SMALL, "random_state": 1}).fit(poses)
    assert not np.array_equal(first.log_likelihood_history_, other.log_likelihood_history_)


def test_two_dimensional_array_path(sim):
    """X (n_frames, K * D) keypoint-major with n_dims, plus sequence_ids."""
    pos = [sim.poses[r]["position"].transpose("time", "keypoints", "space").values[:500] for r in ("rec0", "rec1")]
    X = np.concatenate([p.reshape(len(p), -1) for p in pos])
    ids = np.repeat([0, 1], 500)
    model = KeypointSLDS(n_dims=2, latent_dim=3, **SMALL)
    assert model.fit(X, sequence_ids=ids) is model
    assert model.n_features_in_ == 20
    latent = model.transform(X, sequence_ids=ids)
    assert latent.shape == (1000, 3) and latent.dtype == np.float64
    assert model.predict(X, sequence_ids=ids).shape == (1000,)
    assert model.predict_proba(X, sequence_ids=ids).shape == (1000, 8)
    with pytest.raises(ValueError, match="X has 18 features, but KeypointSLDS is expecting 20"):
        model.predict(X[:, :18], sequence_ids=ids)
    params = model.get_params()
    assert clone(model).get_params() == params
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.predict(X, sequence_ids=ids), model.predict(X, sequence_ids=ids))
    assert model.get_params() == params  # fit never changes constructor arguments
    with pytest.raises(ValueError, match="Input X contains NaN|NaN"):
        KeypointSLDS(n_dims=2, **SMALL).fit(np.where(np.arange(X.size).reshape(X.shape) == 7, np.nan, X))
    # float32 input is accepted and computed in float64 (the chain differs: the data are rounded)
    refit = KeypointSLDS(n_dims=2, latent_dim=3, **SMALL).fit(X.astype(np.float32), sequence_ids=ids)
    out = refit.transform(X.astype(np.float32), sequence_ids=ids)
    assert out.dtype == np.float64 and np.all(np.isfinite(out))


# ------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small_poses(sim):
    return {"a": sim.poses["rec0"].isel(time=slice(0, 200))}


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(keypoints=["nose", "paw"]), "paw"),
        (dict(anterior_keypoints=["snout"]), "anterior_keypoints entry 'snout' is not among the keypoints used"),
        (dict(keypoints=["nose", "tail_base"], posterior_keypoints=["spine3"]),
         "posterior_keypoints entry 'spine3' is not among the keypoints used"),
        (dict(latent_dim=19), r"latent_dim must be an integer between 1 and \(K-1\)\*D = 18"),
        (dict(keypoints=["nose"]), "at least 2 keypoints; the data have 1"),
    ],
)
def test_bad_keypoint_arguments(small_poses, params, match):
    with pytest.raises(ValueError, match=match):
        KeypointSLDS(**{**SMALL, **params}).fit(small_poses)


def test_bad_dimensions_and_confidences(small_poses):
    ds = small_poses["a"]
    one_d = ds.isel(space=[0])
    with pytest.raises(ValueError, match=r"shape \(200, 10, 1\); expected \(time, keypoints, space\) with 2 or 3 space dims"):
        KeypointSLDS(**SMALL).fit({"a": one_d})
    bad = ds.copy(deep=True)
    bad["confidence"][5, 2] = -0.5
    with pytest.raises(ValueError, match="Negative confidence .*recording 'a', keypoint 'spine2' \\(frame 5\\)"):
        KeypointSLDS(**SMALL).fit({"a": bad})
    with pytest.raises(ValueError, match="n_dims=2 or 3"):
        KeypointSLDS(**SMALL).fit(np.zeros((50, 6)))


# ------------------------------------------------------------------------------- real data
REAL_SETS = ["bsoid_openfield_dlc", "deepof_topview_dlc", "jabs_openfield", "sleap_fly_courtship"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # dropped JABS slots, duplicate DLC csv/h5, PCA fallback
@pytest.mark.parametrize("folder", REAL_SETS)
def test_real_recordings_fit_without_nan(real_data_dir, folder):
    """A few sweeps on each real set: finite log-likelihoods and states, every recording gets
    syllables, and the median syllable duration is at least 2 frames."""
    poses = load_many(real_data_dir / folder)
    model = KeypointSLDS(n_states=20, n_ar_iter=3, n_iter=3, n_apply_iter=0, random_state=0)
    model.fit(poses)
    assert np.all(np.isfinite(model.log_likelihood_history_))
    for part in model.chain_state_[1:]:
        assert np.all(np.isfinite(part))
    results = model.transform(poses)
    assert len(results) >= len(poses)
    durations = syllable_durations([ds["syllable"].values for ds in results.values()])
    assert np.median(durations) >= 2
    for ds in results.values():
        assert isinstance(ds, xr.Dataset) and np.all(np.isfinite(ds["latent_state"].values))
    assert _label_agreement(model) >= 0.999  # float32 residuals in the z sampler (see the synthetic test)
