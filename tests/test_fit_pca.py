"""fitting.fit_pca and init_model(pca=...): the tutorial's PCA step."""

from __future__ import annotations

import numpy as np
import pytest

from kpms_estimators import fitting
from kpms_estimators.datasets import simulate_keypoints


def _arrays(sim, angle=0.0, shift=(0.0, 0.0)):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    coords = {k: v["position"].transpose("time", "keypoints", "space").values @ rot.T + np.asarray(shift)
              for k, v in sim.poses.items()}
    confs = {k: v["confidence"].transpose("time", "keypoints").values for k, v in sim.poses.items()}
    return coords, confs


@pytest.fixture(scope="module")
def sim():
    return simulate_keypoints(n_recordings=2, n_frames=300, random_state=3)


@pytest.fixture(scope="module")
def formatted(sim):
    return fitting.format_data(*_arrays(sim), added_noise_level=0.0)


def test_pca_is_invariant_to_rotation_and_translation_of_the_arena(sim, formatted):
    """Alignment removes heading and centroid: a rotated, shifted copy of the recordings gives the same PCA."""
    data, _ = formatted
    moved, _ = fitting.format_data(*_arrays(sim, angle=1.1, shift=(250.0, -40.0)), added_noise_level=0.0)
    a = fitting.fit_pca(**data, anterior_idxs=[0], posterior_idxs=[9])
    b = fitting.fit_pca(**moved, anterior_idxs=[0], posterior_idxs=[9])
    n = data["Y"].shape[2]
    assert a.components_.shape == ((n - 1) * 2, (n - 1) * 2)
    np.testing.assert_allclose(a.explained_variance_, b.explained_variance_, rtol=1e-7, atol=1e-9 * a.explained_variance_[0])
    np.testing.assert_allclose(a.mean_, b.mean_, atol=1e-8)
    np.testing.assert_allclose(np.abs(np.sum(a.components_ * b.components_, axis=1))[:6], 1.0, atol=1e-6)


def test_exclude_outliers_uses_only_confident_frames(formatted):
    data, _ = formatted
    confident = (data["mask"] > 0) & np.all(data["conf"] > 0.6, axis=-1)
    pca = fitting.fit_pca(**data, conf_threshold=0.6, exclude_outliers_for_pca=True)
    assert pca.n_samples_ == int(confident.sum()) < int((data["mask"] > 0).sum())
    assert fitting.fit_pca(**data, conf_threshold=0.6).n_samples_ == int((data["mask"] > 0).sum())
    assert fitting.fit_pca(**data, PCA_fitting_num_frames=100).n_samples_ == 100


def test_bad_input(formatted):
    data, _ = formatted
    with pytest.raises(ValueError, match="anterior_idxs"):
        fitting.fit_pca(**data, anterior_idxs=[12])
    with pytest.raises(ValueError, match="shape"):
        fitting.fit_pca(data["Y"][0], data["mask"])


def test_init_model_uses_the_given_pca(formatted):
    """init_model(pca=fit_pca(..., exclude_outliers_for_pca=True)) equals init_model's own PCA; another PCA changes Cd."""
    data, _ = formatted
    common = dict(anterior_idxs=[0], posterior_idxs=[9], ar_hypparams={"latent_dim": 3}, seed=0)
    own = fitting.init_model(data, **common)
    pca = fitting.fit_pca(**data, anterior_idxs=[0], posterior_idxs=[9], exclude_outliers_for_pca=True)
    given = fitting.init_model(data, pca=pca, **common)
    np.testing.assert_array_equal(own["params"]["Cd"], given["params"]["Cd"])
    np.testing.assert_array_equal(own["states"]["z"], given["states"]["z"])
    subset = fitting.fit_pca(**data, anterior_idxs=[0], posterior_idxs=[9], PCA_fitting_num_frames=60)
    other = fitting.init_model(data, pca=subset, **common)
    assert other["params"]["Cd"].shape == own["params"]["Cd"].shape
    assert not np.allclose(other["params"]["Cd"], own["params"]["Cd"])
    with pytest.raises(ValueError, match="features"):
        fitting.init_model({k: v[:, :, :5] if k != "mask" else v for k, v in data.items()}, pca=pca,
                           anterior_idxs=[0], posterior_idxs=[4])
