"""The reference-compatible functional API (kpms_estimators.fitting) on small simulated data."""

from __future__ import annotations

import re

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


def test_reference_compat_is_used_and_kept(formatted):
    """init_model(reference_compat=True): the reference's 3 coordinates per keypoint in the s draw
    (2D data: chi2(nu_s + 3) instead of chi2(nu_s + 2), so smaller scales, about 5/6 on average
    at nu_s = 5), and the choice stays with the model through fit_model."""
    _, data, metadata = formatted
    exact = fitting.init_model(data, seed=0, **HYP)
    compat = fitting.init_model(data, seed=0, reference_compat=True, **HYP)
    assert exact["estimator"]["params"]["reference_compat"] is False
    assert compat["estimator"]["params"]["reference_compat"] is True
    np.testing.assert_array_equal(compat["states"]["x"], exact["states"]["x"])
    mask = data["mask"] > 0
    ratio = compat["states"]["s"][mask].mean() / exact["states"]["s"][mask].mean()
    assert 0.75 < ratio < 0.92, ratio
    compat, _ = fitting.fit_model(compat, data, metadata, num_iters=1)
    assert compat["estimator"]["params"]["reference_compat"] is True


def test_estimate_sigmasq_loc_is_init_models_default(formatted):
    """The tutorial's step (estimate, then pass it on) gives the same centroid variance as init_model's
    own default, and bad shapes or filter sizes are named."""
    _, data, _ = formatted
    value = fitting.estimate_sigmasq_loc(data["Y"], data["mask"], filter_size=30)
    model = fitting.init_model(data, seed=0, **HYP)
    assert model["hypparams"]["cen_hypparams"]["sigmasq_loc"] == pytest.approx(value, rel=1e-12)
    given = fitting.init_model(data, seed=0, cen_hypparams={"sigmasq_loc": 2.5 * value}, **HYP)
    assert given["hypparams"]["cen_hypparams"]["sigmasq_loc"] == pytest.approx(2.5 * value, rel=1e-12)
    with pytest.raises(ValueError, match=r"mask \(segments, T\); got \(2, 330, 10, 2\) and \(330,\)"):
        fitting.estimate_sigmasq_loc(data["Y"], data["mask"][0])
    with pytest.raises(ValueError, match="filter_size"):
        fitting.estimate_sigmasq_loc(data["Y"], data["mask"], filter_size=0)


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
    with pytest.raises(ValueError, match="location_aware=False"):
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


# ----------------------------------------------------------------------------- expected marginal likelihoods


def numpy_marginal_log_likelihood(x, mask, Ab, Q, pi):
    """Independent float64 forward algorithm in log space (scipy): sum_b log p(x_b | Ab, Q, pi)."""
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    n_states, latent_dim = Ab.shape[:2]
    n_lags = (Ab.shape[2] - 1) // latent_dim
    total = 0.0
    for b in range(x.shape[0]):
        n = int(mask[b].sum())
        assert mask[b, :n].all() and not mask[b, n:].any()  # real frames first, then padding
        lagged = np.stack([x[b, t - n_lags : t].reshape(-1) for t in range(n_lags, n)])  # oldest lag first
        lagged = np.column_stack([lagged, np.ones(len(lagged))])
        loglik = np.column_stack([
            multivariate_normal.logpdf(x[b, n_lags:n] - lagged @ Ab[k].T, np.zeros(latent_dim), Q[k])
            for k in range(n_states)
        ])
        with np.errstate(divide="ignore"):
            log_pi = np.log(pi)
        alpha = loglik[0] - np.log(n_states)
        for row in loglik[1:]:
            alpha = logsumexp(alpha[:, None] + log_pi, axis=0) + row
        total += logsumexp(alpha)
    return total


@pytest.fixture(scope="module")
def eml_project(formatted, tmp_path_factory):
    """Three AR-only fits of the same data in one project: seeds 0 and 1 (2 sweeps), seed 0 (4 sweeps)."""
    _, data, metadata = formatted
    project = tmp_path_factory.mktemp("eml")
    for name, seed, n in (("a", 0, 2), ("b", 1, 2), ("c", 0, 4)):
        model = fitting.init_model(data, seed=seed, **HYP)
        fitting.fit_model(model, data, metadata, project_dir=project, model_name=name, num_iters=n, ar_only=True,
                          generate_progress_plots=False)
    return project


def test_expected_marginal_likelihoods_against_numpy(eml_project):
    from kpms_estimators import _checkpoint

    names = ["a", "b", "c"]
    scores, errors = fitting.expected_marginal_likelihoods(eml_project, names)
    states = [_checkpoint.read_checkpoint(eml_project / n / "checkpoint.nc")[1] for n in names]
    mask = _checkpoint.read_data(eml_project / "a" / "checkpoint.nc")[0]["mask"]
    mll = np.array([[numpy_marginal_log_likelihood(sj.x, mask, si.params.Ab, si.params.Q, si.params.pi)
                     if i != j else np.nan for j, sj in enumerate(states)] for i, si in enumerate(states)])
    expected = np.nanmean(mll, axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-10)
    np.testing.assert_allclose(errors, np.sqrt(np.nanvar(mll, axis=1) / 2), rtol=1e-6)
    paths = [eml_project / n / "checkpoint.nc" for n in names]
    np.testing.assert_array_equal(fitting.expected_marginal_likelihoods(checkpoint_paths=paths)[0], scores)


def test_expected_marginal_likelihoods_ranks_a_worse_model_lower(eml_project, tmp_path):
    """A copy of model a whose AR noise covariances are inflated 100x scores below a."""
    import shutil

    from kpms_estimators import _checkpoint

    worse = tmp_path / "worse.nc"
    shutil.copy(eml_project / "a" / "checkpoint.nc", worse)
    _, state, key, _, iteration = _checkpoint.read_checkpoint(worse)
    state = state._replace(params=state.params._replace(Q=state.params.Q * 100))
    _checkpoint.add_snapshot(worse, iteration + 1, state, key)
    paths = [eml_project / n / "checkpoint.nc" for n in ("a", "b", "c")] + [worse]
    scores, errors = fitting.expected_marginal_likelihoods(checkpoint_paths=paths)
    # hundreds of nats on this small project (989 and 1000+ with two seeds' streams)
    assert scores[3] < scores[0] - 500 and np.all(np.isfinite(errors))


def test_expected_marginal_likelihoods_errors(eml_project, formatted):
    _, data, metadata = formatted
    with pytest.raises(ValueError, match="needs model_names .* or checkpoint_paths"):
        fitting.expected_marginal_likelihoods(eml_project)
    with pytest.raises(ValueError, match="not both"):
        fitting.expected_marginal_likelihoods(eml_project, ["a", "b"], checkpoint_paths=["x", "y"])
    with pytest.raises(ValueError, match="need the project_dir"):
        fitting.expected_marginal_likelihoods(model_names=["a", "b"])
    with pytest.raises(ValueError, match="at least 2 models"):
        fitting.expected_marginal_likelihoods(eml_project, ["a"])
    with pytest.raises(FileNotFoundError, match="nope"):
        fitting.expected_marginal_likelihoods(eml_project, ["a", "nope"])
    model = fitting.init_model(data, seed=0, **HYP)
    other = dict(data, Y=data["Y"] + 0.5)
    fitting.fit_model(model, other, metadata, project_dir=eml_project, model_name="other", num_iters=1,
                      ar_only=True, generate_progress_plots=False)
    with pytest.raises(ValueError, match=r"fitted to different data: '.*other.*' differs from '.*a.*' in Y"):
        fitting.expected_marginal_likelihoods(eml_project, ["a", "b", "other"])


# ----------------------------------------------------------------------------- argument combinations


def test_ar_only_resamples_only_the_ar_hmm(formatted):
    _, data, metadata = formatted
    model = fitting.init_model(data, seed=0, **HYP)
    ar, _ = fitting.fit_model(model, data, metadata, num_iters=2, ar_only=True)
    for name in ("x", "h", "v", "s"):
        np.testing.assert_array_equal(ar["states"][name], model["states"][name])
    for name in ("Cd", "sigmasq"):
        np.testing.assert_array_equal(ar["params"][name], model["params"][name])
    assert not np.array_equal(ar["params"]["Ab"], model["params"]["Ab"])
    full, _ = fitting.fit_model(ar, data, metadata, num_iters=3, start_iter=2)
    assert list(full["estimator"]["stages"]) == ["ar_only", "ar_only", "full"]
    assert not np.array_equal(full["states"]["x"], ar["states"]["x"])


def test_resume_from_an_earlier_snapshot(formatted, tmp_path):
    """Resuming at snapshot 2 of [2, 4] deletes 4; save_every_n_iters=-1 saves only the end; exact chain."""
    from kpms_estimators import _checkpoint

    _, data, metadata = formatted
    model = fitting.init_model(data, seed=1, **HYP)
    kw = dict(project_dir=tmp_path, model_name="m", ar_only=True, generate_progress_plots=False)
    path = tmp_path / "m" / "checkpoint.nc"
    fitting.fit_model(model, data, metadata, num_iters=4, save_every_n_iters=2, **kw)
    assert _checkpoint.list_iterations(path) == [2, 4]
    loaded, data2, metadata2, iteration = fitting.load_checkpoint(tmp_path, "m", iteration=2)
    assert iteration == 2 and len(loaded["estimator"]["history"]["x"]) == 2
    with pytest.raises(ValueError, match="no snapshot at iteration 3"):
        fitting.load_checkpoint(tmp_path, "m", iteration=3)
    with pytest.raises(ValueError, match="num_iters=1 is less than start_iter=2"):
        fitting.fit_model(loaded, data2, metadata2, num_iters=1, start_iter=2)
    with pytest.raises(ValueError, match="save_every_n_iters must be an integer or None"):
        fitting.fit_model(loaded, data2, metadata2, num_iters=3, start_iter=2, project_dir=tmp_path,
                          save_every_n_iters=2.5)
    resumed, _ = fitting.fit_model(loaded, data2, metadata2, num_iters=5, start_iter=2, save_every_n_iters=-1, **kw)
    assert _checkpoint.list_iterations(path) == [2, 5]
    assert len(_checkpoint.read_checkpoint(path)[3]["x"]) == 5
    one_call, name = fitting.fit_model(model, data, metadata, num_iters=5, ar_only=True)
    for group in ("states", "params"):
        for k in one_call[group]:
            np.testing.assert_array_equal(one_call[group][k], resumed[group][k])
    assert re.fullmatch(r"\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}", name)  # model_name=None: date and time


def test_interrupt_returns_the_last_complete_model(formatted, tmp_path, monkeypatch):
    _, data, metadata = formatted
    model = fitting.init_model(data, seed=2, **HYP)
    real, calls = KeypointSLDS._kernels.step, []

    def interrupt_third_sweep(key, chain, data, hypers, **kwargs):
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(key, chain, data, hypers, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(KeypointSLDS, "_kernels", KeypointSLDS._kernels._replace(step=interrupt_third_sweep))
        with pytest.warns(UserWarning, match="Interrupted: returning the model after 2 sweeps"):
            stopped, _ = fitting.fit_model(model, data, metadata, num_iters=5, ar_only=True, project_dir=tmp_path,
                                           model_name="m", save_every_n_iters=1, generate_progress_plots=False)
    two, _ = fitting.fit_model(model, data, metadata, num_iters=2, ar_only=True)
    np.testing.assert_array_equal(stopped["states"]["z"], two["states"]["z"])
    np.testing.assert_array_equal(stopped["params"]["Ab"], two["params"]["Ab"])
    loaded, _, _, iteration = fitting.load_checkpoint(tmp_path, "m")
    assert iteration == 2
    np.testing.assert_array_equal(loaded["states"]["z"], two["states"]["z"])


def test_apply_model_and_marginals_defaults(formatted, tmp_path):
    """Default results path {project_dir}/{model_name}/results.nc, save_results=False, return values."""
    _, data, metadata = formatted
    model = fitting.init_model(data, seed=0, **HYP)
    results = fitting.apply_model(model, data, metadata, project_dir=tmp_path, model_name="m", num_iters=1)
    assert isinstance(results, dict) and set(results) == {"rec0", "rec1"}  # return_model=False: results only
    with xr.open_dataset(tmp_path / "m" / "results.nc") as ds:
        assert list(ds["recording"].values) == ["rec0", "rec1"]
    fitting.apply_model(model, data, metadata, project_dir=tmp_path, model_name="n", num_iters=1, save_results=False)
    assert not (tmp_path / "n").exists()
    marginals = fitting.estimate_syllable_marginals(model, data, metadata, burn_in_iters=1, num_samples=2,
                                                    steps_per_sample=1)
    assert set(marginals) == {"rec0", "rec1"} and marginals["rec1"].shape == (300, 8)  # no samples by default
    np.testing.assert_allclose(marginals["rec1"].sum(axis=1), 1.0, atol=1e-9)
