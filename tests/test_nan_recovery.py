"""Non-finite sweeps: rollback and retry with a fresh key (and a larger jitter), or a clean stop.

The Gibbs step is wrapped so that chosen calls return a chain with a NaN in
``params.Ab``; the shared loop (``GibbsEstimator._run_sweeps``) must roll back,
retry, record the retries in the history, and stop with a warning naming the
array when every retry fails, keeping the last finite state as a usable model.
Shapes match tests/test_checkpoint.py and tests/test_fitting.py so that the
compiled steps are shared within one pytest run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpms_estimators import ARHMM, KeypointSLDS, fitting
from kpms_estimators.datasets import simulate_arhmm, simulate_keypoints

AR_PARAMS = dict(n_states=5, n_iter=3, random_state=0)
HYP = dict(trans_hypparams={"num_states": 8, "alpha": 5.7, "gamma": 1e3, "kappa": 1e6},
           ar_hypparams={"latent_dim": 3, "nlags": 3, "S_0_scale": 0.01, "K_0_scale": 10.0})


class InjectNaN:
    """A Gibbs step that returns a NaN in ``params.Ab`` on the calls ``bad(call_index)`` selects.

    Records, per call, the key data, the jitter (None without one) and a copy of the input chain.
    """

    def __init__(self, step, bad):
        self.step, self.bad = step, bad
        self.keys, self.jitters, self.inputs = [], [], []

    def __call__(self, key, chain, data, hypers, **kwargs):
        call = len(self.keys)
        self.keys.append(np.asarray(jax.random.key_data(key)))
        self.jitters.append(float(hypers.jitter) if hasattr(hypers, "jitter") else None)
        self.inputs.append(jax.tree_util.tree_map(np.array, chain))
        new, info = self.step(key, chain, data, hypers, **kwargs)
        if self.bad(call):
            params = new.params._replace(Ab=jnp.asarray(new.params.Ab).at[0, 0, 0].set(jnp.nan))
            new = new._replace(params=params)
        return new, info


def assert_tree_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def all_finite(tree):
    return all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree_util.tree_leaves(tree)
               if np.asarray(leaf).dtype.kind == "f")


# ----------------------------------------------------------------------------- estimator (ARHMM)


@pytest.fixture(scope="module")
def ar_sim():
    return simulate_arhmm(n_states=3, latent_dim=2, n_recordings=2, n_frames=200, random_state=0)


def fit_ar(sim, monkeypatch, bad, **params):
    inject = InjectNaN(ARHMM._gibbs_step, bad)
    with monkeypatch.context() as patch:
        patch.setattr(ARHMM, "_gibbs_step", staticmethod(inject))
        model = ARHMM(**{**AR_PARAMS, **params}).fit(sim.X, sequence_ids=sim.sequence_ids)
    return model, inject


def test_transient_nan_is_rolled_back_and_retried(ar_sim, monkeypatch):
    clean, clean_calls = fit_ar(ar_sim, monkeypatch, bad=lambda call: False)
    model, calls = fit_ar(ar_sim, monkeypatch, bad=lambda call: call == 1)  # sweep 2, first attempt
    assert len(calls.keys) == 4 and model.n_iter_ == 3 and model.nan_stop_ is None
    np.testing.assert_array_equal(model.log_likelihood_terms_["nan_retries"], [0, 1, 0])
    np.testing.assert_array_equal(clean.log_likelihood_terms_["nan_retries"], [0, 0, 0])
    # the retry starts from the state before the failed attempt, with another key
    assert_tree_equal(calls.inputs[2], calls.inputs[1])
    assert not np.array_equal(calls.keys[2], calls.keys[1])
    # the chain's own key sequence is unchanged: sweep 3 uses the clean run's key of sweep 3
    np.testing.assert_array_equal(calls.keys[3], clean_calls.keys[2])
    assert all_finite(model.chain_state_) and np.all(np.isfinite(model.log_likelihood_history_))
    assert calls.jitters == [None] * 4  # the ARHMM has no jitter: a fresh key only


def test_persistent_nan_stops_with_a_usable_model(ar_sim, monkeypatch, tmp_path):
    two, _ = fit_ar(ar_sim, monkeypatch, bad=lambda call: False, n_iter=2)
    with pytest.warns(RuntimeWarning, match=r"sweep 3 .*after 3 retries.*params\.Ab \(1 of 70 entries\)"):
        model, calls = fit_ar(ar_sim, monkeypatch, bad=lambda call: call >= 2)
    assert len(calls.keys) == 2 + 4  # the third sweep: one attempt and 3 retries
    assert model.n_iter_ == 2 and len(model.log_likelihood_history_) == 2
    assert model.nan_stop_ == {"iteration": 2, "stage": "full", "retries": 3, "jitter": None,
                               "nonfinite": {"params.Ab": [1, 70]}}
    assert_tree_equal(model.chain_state_, two.chain_state_)  # the last finite state is the fitted one
    labels = model.predict(ar_sim.X, sequence_ids=ar_sim.sequence_ids)
    np.testing.assert_array_equal(labels, two.predict(ar_sim.X, sequence_ids=ar_sim.sequence_ids))
    assert np.isfinite(model.score(ar_sim.X, sequence_ids=ar_sim.sequence_ids))
    model.save(tmp_path / "m.nc")
    loaded = ARHMM.load(tmp_path / "m.nc")
    assert loaded.nan_stop_ == model.nan_stop_
    # without the fault, the loaded chain continues and a clean call clears nan_stop_
    loaded.set_params(n_iter=1).partial_fit(ar_sim.X, sequence_ids=ar_sim.sequence_ids)
    assert loaded.n_iter_ == 3 and loaded.nan_stop_ is None


# ----------------------------------------------------------------------------- fit_model (KeypointSLDS)


@pytest.fixture(scope="module")
def formatted():
    sim = simulate_keypoints(n_recordings=2, n_frames=300, random_state=0)
    coords = {r: ds["position"].transpose("time", "keypoints", "space").values for r, ds in sim.poses.items()}
    confs = {r: ds["confidence"].values for r, ds in sim.poses.items()}
    data, metadata = fitting.format_data(coords, confs, bodyparts=sim.keypoints)
    return data, metadata, fitting.init_model(data, seed=3, **HYP)


def fit_api(formatted, monkeypatch, bad, **kwargs):
    data, metadata, model = formatted
    inject = InjectNaN(KeypointSLDS._kernels.step, bad)
    with monkeypatch.context() as patch:
        patch.setattr(KeypointSLDS, "_kernels", KeypointSLDS._kernels._replace(step=inject))
        out, _ = fitting.fit_model(model, data, metadata, ar_only=True, generate_progress_plots=False, **kwargs)
    return out, inject


def test_fit_model_retries_with_larger_jitter(formatted, monkeypatch, tmp_path):
    model, calls = fit_api(formatted, monkeypatch, bad=lambda call: call in (1, 2), num_iters=3,
                           project_dir=tmp_path, model_name="m", save_every_n_iters=1)
    assert calls.jitters == [1e-3, 1e-3, pytest.approx(1e-2), pytest.approx(1e-1), 1e-3]
    np.testing.assert_array_equal(model["estimator"]["history"]["nan_retries"], [0, 2, 0])
    assert model["estimator"]["fitted"]["nan_stop_"] is None and all_finite(model["states"])
    loaded, _, _, iteration = fitting.load_checkpoint(tmp_path, "m")
    assert iteration == 3
    np.testing.assert_array_equal(loaded["estimator"]["history"]["nan_retries"], [0, 2, 0])
    np.testing.assert_array_equal(loaded["states"]["z"], model["states"]["z"])


def test_fit_model_stops_and_saves_the_last_finite_model(formatted, monkeypatch, tmp_path):
    data, metadata, _ = formatted
    with pytest.warns(RuntimeWarning, match=r"sweep 3 .*jitter up to 1\b.*params\.Ab \(1 of "):
        model, calls = fit_api(formatted, monkeypatch, bad=lambda call: call >= 2, num_iters=4,
                               project_dir=tmp_path, model_name="m", save_every_n_iters=10)
    stop = model["estimator"]["fitted"]["nan_stop_"]
    assert stop["iteration"] == 2 and stop["retries"] == 3 and list(stop["nonfinite"]) == ["params.Ab"]
    assert len(model["estimator"]["history"]["x"]) == 2
    # the returned model is the input of the failed sweep, finite, and saved as snapshot 2
    np.testing.assert_array_equal(model["states"]["z"], calls.inputs[2].z)
    np.testing.assert_array_equal(model["params"]["Ab"], calls.inputs[2].params.Ab)
    assert all_finite(model["params"])
    loaded, data2, metadata2, iteration = fitting.load_checkpoint(tmp_path, "m")
    assert iteration == 2
    np.testing.assert_array_equal(loaded["params"]["Ab"], model["params"]["Ab"])
    # usable: it resumes cleanly from the saved snapshot and can be applied
    resumed, _ = fitting.fit_model(loaded, data2, metadata2, project_dir=tmp_path, model_name="m", num_iters=3,
                                   start_iter=2, ar_only=True, save_every_n_iters=1, generate_progress_plots=False)
    assert resumed["estimator"]["fitted"]["nan_stop_"] is None
    assert len(resumed["estimator"]["history"]["nan_retries"]) == 3
    results = fitting.apply_model(model, data, metadata, num_iters=1, save_results=False)
    assert results["rec0"]["syllable"].shape == (300,)
