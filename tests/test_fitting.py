"""The reference-compatible functional API (kpms_estimators.fitting) on small simulated data."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from sklearn.utils import check_random_state

from kpms_estimators import KeypointSLDS, fitting
from kpms_estimators.datasets import simulate_keypoints

HYP = dict(trans_hypparams={"num_states": 8, "alpha": 5.7, "gamma": 1e3, "kappa": 1e6},
           ar_hypparams={"latent_dim": 3, "nlags": 3, "S_0_scale": 0.01, "K_0_scale": 10.0})


@pytest.fixture(scope="module")
def formatted():
    sim = simulate_keypoints(n_recordings=2, n_frames=300, random_state=0)
    coords = {r: ds["position"].transpose("time", "keypoints", "space").values for r, ds in sim.poses.items()}
    confs = {r: ds["confidence"].values for r, ds in sim.poses.items()}
    data, metadata = fitting.format_data(coords, confs, bodyparts=sim.keypoints)
    return sim, data, metadata


def test_format_data(formatted):
    _, data, (keys, bounds) = formatted
    assert data["Y"].shape == (2, 330, 10, 2) and data["conf"].shape == (2, 330, 10)
    assert list(keys) == ["rec0", "rec1"] and bounds.tolist() == [[0, 300], [0, 300]]
    assert data["mask"][:, 300:].sum() == 0 and data["mask"][:, :300].all()


def test_fit_resume_equals_one_call_and_checkpoints(formatted, tmp_path):
    """4 sweeps in one call == 2 sweeps, then load_checkpoint + resume (start_iter=2) for 2 more."""
    _, data, metadata = formatted
    model = fitting.init_model(data, seed=3, **HYP)
    one, _ = fitting.fit_model(model, data, metadata, num_iters=4, ar_only=True, project_dir=None)
    first, name = fitting.fit_model(model, data, metadata, project_dir=tmp_path, model_name="m", num_iters=2,
                                    ar_only=True, save_every_n_iters=1, generate_progress_plots=False)
    loaded, data2, metadata2, iteration = fitting.load_checkpoint(tmp_path, "m")
    assert iteration == 2 and name == "m"
    np.testing.assert_array_equal(data2["Y"], data["Y"])
    resumed, _ = fitting.fit_model(loaded, data2, metadata2, project_dir=tmp_path, model_name="m", num_iters=4,
                                   start_iter=2, ar_only=True, save_every_n_iters=1, generate_progress_plots=False)
    for group in ("states", "params"):
        for k in one[group]:
            np.testing.assert_array_equal(one[group][k], resumed[group][k])
    np.testing.assert_array_equal(one["seed"], resumed["seed"])
    with xr.open_datatree(tmp_path / "m" / "checkpoint.nc", engine="netcdf4") as tree:
        groups = sorted(g for g in tree.children if g.startswith("iteration_"))
    assert groups == ["iteration_000001", "iteration_000002", "iteration_000003", "iteration_000004"]


def test_update_hypparams(formatted):
    _, data, _ = formatted
    model = fitting.init_model(data, seed=0, **HYP)
    fitting.update_hypparams(model, kappa=1e4)
    assert model["hypparams"]["trans_hypparams"]["kappa"] == 1e4
    with pytest.raises(ValueError, match="Unknown hyperparameter 'kapa'"):
        fitting.update_hypparams(model, kapa=1.0)
    with pytest.raises(ValueError, match="latent_dim is structural"):
        fitting.update_hypparams(model, latent_dim=5)
    assert model["hypparams"]["ar_hypparams"]["latent_dim"] == 3


def test_api_equals_estimator(formatted):
    """Same data, hyperparameters and seed: fitting API and KeypointSLDS give identical chains."""
    sim, data, metadata = formatted
    est = KeypointSLDS(n_states=8, latent_dim=3, n_ar_iter=2, n_iter=2, kappa=1e4, ar_kappa=1e6,
                       outlier_scale_factor=None, random_state=0).fit(sim.poses)
    seed = check_random_state(0).randint(np.iinfo(np.int32).max)
    model = fitting.init_model(data, seed=seed, **HYP)
    model, _ = fitting.fit_model(model, data, metadata, num_iters=2, ar_only=True)
    fitting.update_hypparams(model, kappa=1e4)
    model, _ = fitting.fit_model(model, data, metadata, num_iters=4, start_iter=2)
    np.testing.assert_array_equal(model["states"]["z"], est.chain_state_.z)
    np.testing.assert_allclose(model["states"]["x"], est.chain_state_.x, rtol=0, atol=0)


def test_apply_and_marginals(formatted, tmp_path):
    _, data, metadata = formatted
    model = fitting.init_model(data, seed=0, **HYP)
    model, _ = fitting.fit_model(model, data, metadata, num_iters=3)
    path = tmp_path / "results.nc"
    results, applied = fitting.apply_model(model, data, metadata, num_iters=2, results_path=path, return_model=True)
    assert set(results) == {"rec0", "rec1"} and results["rec0"]["syllable"].shape == (300,)
    with xr.open_dataset(path) as ds:
        assert ds["syllable"].shape == (2, 300) and list(ds["recording"].values) == ["rec0", "rec1"]
    with pytest.raises(ValueError, match="already holds recordings"):
        fitting.apply_model(model, data, metadata, num_iters=1, results_path=path)
    fitting.apply_model(model, data, metadata, num_iters=1, results_path=path, overwrite=True)
    marg, samples = fitting.estimate_syllable_marginals(model, data, metadata, burn_in_iters=1, num_samples=3,
                                                         steps_per_sample=2, return_samples=True)
    assert marg["rec0"].shape == (300, 8)
    np.testing.assert_allclose(marg["rec0"].sum(1), 1.0, atol=1e-9)
    assert samples["rec1"].shape == (3, 300)
    with pytest.raises(NotImplementedError, match="AlloKeypointSLDS"):
        fitting.fit_model(model, data, metadata, location_aware=True)


def test_progress_plots_at_each_save(formatted, tmp_path, monkeypatch):
    """Plots at every save, with the syllables of earlier snapshots (also after a resume); none when off."""
    from kpms_estimators import plots

    _, data, metadata = formatted
    model = fitting.init_model(data, seed=0, **HYP)
    calls = []
    real = plots.plot_progress

    def spy(history, syllables, out_dir, **kwargs):
        calls.append((kwargs["iteration"], sorted(kwargs["syllable_history"]), len(history["x"])))
        return real(history, syllables, out_dir, **kwargs)

    monkeypatch.setattr(plots, "plot_progress", spy)
    kw = dict(project_dir=tmp_path, model_name="m", ar_only=True)
    first, _ = fitting.fit_model(model, data, metadata, num_iters=3, save_every_n_iters=2, **kw)
    fitting.fit_model(first, data, metadata, num_iters=4, start_iter=3, save_every_n_iters=2, **kw)
    assert calls == [(2, [], 2), (3, [2], 3), (4, [2, 3], 4)]
    out = tmp_path / "m" / "plots"
    assert sorted(p.name for p in out.iterdir()) == sorted(plots.PLOT_FILES.values())
    for name in plots.PLOT_FILES.values():  # valid, non-trivial PNGs (checked in detail in test_plots.py)
        content = (out / name).read_bytes()
        assert content[:8] == b"\x89PNG\r\n\x1a\n" and len(content) > 5000, name

    calls.clear()
    kw = dict(project_dir=tmp_path, ar_only=True)
    fitting.fit_model(model, data, metadata, num_iters=1, generate_progress_plots=False, model_name="off", **kw)
    fitting.fit_model(model, data, metadata, num_iters=1, save_every_n_iters=None, model_name="none", **kw)
    with pytest.warns(UserWarning, match="progress plots are off"):
        fitting.fit_model(model, data, metadata, num_iters=2, save_every_n_iters=0, model_name="zero", **kw)
    assert calls == []
    assert not (tmp_path / "off" / "plots").exists() and (tmp_path / "off" / "checkpoint.nc").exists()
    assert not (tmp_path / "none").exists()
    assert not (tmp_path / "zero" / "plots").exists()
    with xr.open_datatree(tmp_path / "zero" / "checkpoint.nc", engine="netcdf4") as tree:
        assert [g for g in tree.children if g.startswith("iteration_")] == ["iteration_000002"]
