"""The functional API with location_aware=True: the AlloKeypointSLDS model through init/fit/apply/marginals."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.utils import check_random_state

from kpms_estimators import AlloKeypointSLDS, fitting
from kpms_estimators.datasets import simulate_keypoints

HYP = dict(trans_hypparams={"num_states": 6, "kappa": 1e6}, ar_hypparams={"latent_dim": 3, "nlags": 3})
ALLO = {"alpha0_v": 8.0, "beta0_v": 0.2, "lambda0_v": 2.0, "alpha0_h": 9.0, "beta0_h": 0.05, "lambda0_h": 0.5}


@pytest.fixture(scope="module")
def formatted():
    sim = simulate_keypoints(n_recordings=2, n_frames=300, location_aware=True, random_state=1)
    coords = {r: ds["position"].transpose("time", "keypoints", "space").values for r, ds in sim.poses.items()}
    confs = {r: ds["confidence"].values for r, ds in sim.poses.items()}
    data, metadata = fitting.format_data(coords, confs, bodyparts=sim.keypoints)
    return sim, data, metadata


@pytest.fixture(scope="module")
def fitted(formatted, tmp_path_factory):
    _, data, metadata = formatted
    project = tmp_path_factory.mktemp("allo_project")
    model = fitting.init_model(data, seed=0, location_aware=True, allo_hypparams=ALLO, **HYP)
    model, _ = fitting.fit_model(model, data, metadata, num_iters=2, ar_only=True, location_aware=True)
    fitting.update_hypparams(model, kappa=1e4, lambda0_v=3.0)
    model, name = fitting.fit_model(model, data, metadata, num_iters=4, start_iter=2, location_aware=True,
                                    project_dir=project, model_name="allo", save_every_n_iters=1,
                                    generate_progress_plots=False)
    return model, project


def test_init_model_honours_allo_hypparams(formatted):
    _, data, _ = formatted
    model = fitting.init_model(data, seed=0, location_aware=True, allo_hypparams=ALLO, **HYP)
    assert model["estimator"]["class"] == "AlloKeypointSLDS"
    assert model["hypparams"]["allo_hypparams"] == ALLO
    assert {k: model["estimator"]["params"][k] for k in ALLO} == ALLO
    assert model["params"]["delta_v"].shape == (6, 2) and model["params"]["sigmasq_h"].shape == (6,)
    with pytest.raises(ValueError, match="Unknown allo_hypparams"):
        fitting.init_model(data, location_aware=True, allo_hypparams={"alpha0": 1.0}, **HYP)
    with pytest.raises(ValueError, match="location_aware=True"):
        fitting.init_model(data, allo_hypparams=ALLO, **HYP)
    plain = fitting.init_model(data, seed=0, **HYP)
    with pytest.raises(ValueError, match="Unknown hyperparameter 'alpha0_v'"):
        fitting.update_hypparams(plain, alpha0_v=1.0)


def test_fit_checkpoint_and_resume(formatted, fitted):
    _, data, metadata = formatted
    model, project = fitted
    assert model["hypparams"]["allo_hypparams"]["lambda0_v"] == 3.0
    assert model["estimator"]["history"]["hv"] and len(model["estimator"]["stages"]) == 4
    loaded, _, _, iteration = fitting.load_checkpoint(project, "allo")
    assert iteration == 4 and loaded["estimator"]["class"] == "AlloKeypointSLDS"
    for k in ("delta_h", "sigmasq_h", "delta_v", "sigmasq_v", "Ab"):
        np.testing.assert_array_equal(loaded["params"][k], model["params"][k])
    with pytest.raises(ValueError, match="location_aware=True"):
        fitting.fit_model(loaded, data, metadata, num_iters=5, start_iter=4)
    # resume from snapshot 3 for one sweep == the uninterrupted chain's 4th sweep
    at3, _, _, _ = fitting.load_checkpoint(project, "allo", iteration=3)
    again, _ = fitting.fit_model(at3, data, metadata, num_iters=4, start_iter=3, location_aware=True)
    np.testing.assert_array_equal(again["states"]["z"], model["states"]["z"])
    np.testing.assert_array_equal(again["params"]["delta_v"], model["params"]["delta_v"])


def test_apply_and_marginals_keep_the_allo_parameters(formatted, fitted, tmp_path):
    _, data, metadata = formatted
    model, _ = fitted
    before = {k: np.array(model["params"][k]) for k in ("delta_h", "sigmasq_h", "delta_v", "sigmasq_v")}
    results, applied = fitting.apply_model(model, data, metadata, num_iters=2, location_aware=True,
                                           results_path=tmp_path / "r.nc", return_model=True)
    assert sorted(results) == ["rec0", "rec1"] and results["rec0"]["syllable"].shape == (300,)
    for k, v in before.items():
        np.testing.assert_array_equal(applied["params"][k], v)
    marg = fitting.estimate_syllable_marginals(model, data, metadata, burn_in_iters=1, num_samples=2,
                                               steps_per_sample=1, location_aware=True)
    np.testing.assert_allclose(marg["rec1"].sum(1), 1.0, atol=1e-9)
    with pytest.raises(ValueError, match="location_aware=True"):
        fitting.apply_model(model, data, metadata, num_iters=1, save_results=False)


def test_api_equals_estimator(formatted):
    """Same data, hyperparameters and seed: fitting API and AlloKeypointSLDS give identical chains."""
    sim, data, metadata = formatted
    est = AlloKeypointSLDS(n_states=6, latent_dim=3, n_ar_iter=1, n_iter=1, kappa=1e4, ar_kappa=1e6,
                           outlier_scale_factor=None, random_state=0, **ALLO).fit(sim.poses)
    seed = check_random_state(0).randint(np.iinfo(np.int32).max)
    model = fitting.init_model(data, seed=seed, location_aware=True, allo_hypparams=ALLO, **HYP)
    model, _ = fitting.fit_model(model, data, metadata, num_iters=1, ar_only=True, location_aware=True)
    fitting.update_hypparams(model, kappa=1e4)
    model, _ = fitting.fit_model(model, data, metadata, num_iters=2, start_iter=1, location_aware=True)
    np.testing.assert_array_equal(model["states"]["z"], est.chain_state_.z)
    np.testing.assert_array_equal(model["params"]["delta_v"], est.chain_state_.params.delta_v)
