"""The keypoint-MoSeq functional API (``format_data``, ``init_model``, ``fit_model``, ...).

Same names, arguments and semantics as keypoint-moseq's, so that switching is a
change of import. Every function is a thin wrapper over the ``KeypointSLDS``
estimator's own steps (formatting, initialisation, the Gibbs loop, the
states-only apply sweeps); nothing here re-implements the sampler.

A model is a dict ``{"seed", "states", "params", "hypparams", "noise_prior",
"estimator"}``; ``estimator`` holds the constructor arguments and fitted
attributes of the underlying ``KeypointSLDS`` (JSON-safe values and arrays).

Differences from the reference, on purpose:

- ``fit_model(num_iters=n, start_iter=i)`` runs exactly ``n - i`` sweeps, and
  snapshots are labelled by the number of completed sweeps (the reference's
  labels are off by one).
- Checkpoints are one netCDF4 file, ``{project_dir}/{model_name}/checkpoint.nc``
  (``kpms_estimators._checkpoint``), written atomically; no pickle.
- ``location_aware=True`` fits the exact location-aware model (``AlloKeypointSLDS``,
  spec 5), whose fitted allo parameters are kept on new data.
"""

from __future__ import annotations

import datetime as _dt
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from . import _checkpoint, _data, _init
from ._core import arhmm as ar_core
from ._core import keypoint_slds as core
from ._core.keypoints import centring_embedding
from ._estimators._base import compiled, float64
from ._core import allo as allo_core
from ._estimators.allo_keypoint_slds import AlloKeypointSLDS
from ._estimators.keypoint_slds import KeypointSLDS

__all__ = [
    "format_data", "init_model", "fit_model", "apply_model", "estimate_syllable_marginals",
    "update_hypparams", "load_checkpoint", "extract_results", "expected_marginal_likelihoods", "fit_pca",
    "estimate_sigmasq_loc",
]

#: model name -> (estimator class, parameter pytree, state pytree)
_MODELS = {
    "KeypointSLDS": (KeypointSLDS, core.KeypointParams, core.KeypointState),
    "AlloKeypointSLDS": (AlloKeypointSLDS, allo_core.AlloParams, allo_core.AlloState),
}
_ALLO_NAMES = ("alpha0_v", "beta0_v", "lambda0_v", "alpha0_h", "beta0_h", "lambda0_h")
#: hypparams group -> {reference name: KeypointSLDS constructor argument}
_HYPPARAM_NAMES = {
    "trans_hypparams": {"num_states": "n_states", "alpha": "alpha", "gamma": "gamma", "kappa": "kappa"},
    "ar_hypparams": {"latent_dim": "latent_dim", "nlags": "n_lags", "S_0_scale": "S_0_scale", "K_0_scale": "K_0_scale"},
    "obs_hypparams": {"nu_s": "nu_s", "nu_sigma": "nu_sigma", "sigmasq_0": "sigmasq_0"},
    "cen_hypparams": {"sigmasq_loc": "sigmasq_loc"},
}
_STRUCTURAL = {"num_states", "latent_dim", "nlags"}


def _hypparam_names(est) -> dict:
    """The hyperparameter groups of this model (``allo_hypparams`` for the location-aware one)."""
    if isinstance(est, AlloKeypointSLDS):
        return {**_HYPPARAM_NAMES, "allo_hypparams": {n: n for n in _ALLO_NAMES}}
    return _HYPPARAM_NAMES


def _model_class(model: dict) -> str:
    return model["estimator"].get("class", "KeypointSLDS")


def _check_location_aware(model: dict, location_aware: bool, where: str) -> None:
    aware = _model_class(model) == "AlloKeypointSLDS"
    if bool(location_aware) != aware:
        raise ValueError(
            f"{where}(location_aware={bool(location_aware)}) was given a "
            f"{'location-aware' if aware else 'non-location-aware'} model ({_model_class(model)}); pass "
            f"location_aware={aware} (the value used in init_model).")


# --------------------------------------------------------------------------- formatting
def format_data(coordinates, confidences=None, keys=None, seg_length=None, bodyparts=None, use_bodyparts=None,
                conf_pseudocount=1e-3, added_noise_level=0.1, **kwargs):
    """Batch recordings into padded segments (spec 1). Returns ``(data, metadata)``.

    ``coordinates``: ``{name: (T, K, D) array}`` (NaN where untracked);
    ``confidences``: ``{name: (T, K)}`` or None. ``data = {"Y", "conf", "mask"}``,
    ``metadata = (keys, bounds)`` with one recording name and one (start, end) per segment.
    """
    names = sorted(coordinates) if keys is None else list(keys)
    missing = [k for k in names if k not in coordinates]
    if missing:
        raise ValueError(f"keys {missing} are not in coordinates (available: {sorted(coordinates)}).")
    datasets = {}
    for name in names:
        pos = np.asarray(coordinates[name], dtype=np.float64)
        if pos.ndim != 3:
            raise ValueError(f"coordinates[{name!r}] must have shape (T, K, D), got {pos.shape}.")
        kp = list(bodyparts) if bodyparts is not None else [f"kp{k}" for k in range(pos.shape[1])]
        if len(kp) != pos.shape[1]:
            raise ValueError(f"bodyparts has {len(kp)} names but coordinates[{name!r}] has {pos.shape[1]} keypoints.")
        variables = {"position": (("time", "keypoints", "space"), pos)}
        if confidences is not None:
            conf = np.asarray(confidences[name], dtype=np.float64)
            if np.any(conf < 0):
                warnings.warn(f"Negative confidences in {name!r} clipped to 0.", UserWarning, stacklevel=2)
                conf = np.clip(conf, 0, None)
            variables["confidence"] = (("time", "keypoints"), conf)
        datasets[name] = xr.Dataset(variables, coords={"keypoints": kp})
    min_length = _data.MIN_FRAGMENT_LENGTH + 1
    recordings = _data.from_poses(datasets, min_length=min_length, keypoints=use_bodyparts)
    batch = _data.make_batch(recordings, seg_length)
    Y, conf = _init.formatted_arrays(batch, added_noise_level, conf_pseudocount)
    data = {"Y": Y, "conf": conf, "mask": batch.mask.astype(np.float64)}
    metadata = (np.asarray(recordings.names)[batch.keys], batch.bounds.copy())
    return data, metadata


def fit_pca(Y, mask, anterior_idxs=None, posterior_idxs=None, conf=None, conf_threshold=0.5, verbose=False,
            PCA_fitting_num_frames=1_000_000, exclude_outliers_for_pca=False, fix_heading=False, **kwargs):
    """Fit the PCA of the aligned, embedded poses (spec 2.2-2.3); returns a fitted ``sklearn.decomposition.PCA``.

    Called as ``fit_pca(**data, **config)`` on ``format_data``'s output, as in
    keypoint-MoSeq's tutorial, and passed on with ``init_model(data, pca=pca, ...)``.
    Points with ``conf < conf_threshold`` are interpolated before alignment;
    ``exclude_outliers_for_pca=True`` also drops frames in which any keypoint is
    below the threshold. ``anterior_idxs``/``posterior_idxs`` index the keypoints
    of ``Y`` (default: the first and the last).
    """
    Y = np.asarray(Y, dtype=np.float64)
    mask = np.asarray(mask)
    if Y.ndim != 4 or mask.shape != Y.shape[:2]:
        raise ValueError(f"fit_pca needs Y of shape (segments, T, K, D) and mask (segments, T); got {Y.shape} "
                         f"and {mask.shape}.")
    n_kp = Y.shape[2]
    anterior = _keypoint_indices(anterior_idxs, n_kp, [0], "anterior_idxs")
    posterior = _keypoint_indices(posterior_idxs, n_kp, [n_kp - 1], "posterior_idxs")
    conf = None if conf is None else np.asarray(conf, dtype=np.float64)
    Yi = Y if conf is None else _init.interpolate_low_confidence(Y, conf, conf_threshold, raw=Y)
    h0, v0 = _init.heading_and_centroid(Yi, anterior, posterior, bool(fix_heading))
    flat = _init.embed(Yi, h0, v0)
    pca = _init.fit_pca(flat, mask, conf, conf_threshold, bool(exclude_outliers_for_pca), int(PCA_fitting_num_frames))
    if verbose:
        print(f"PCA fitted on {pca.n_samples_} frames; components explaining 90% of the variance: "
              f"{int(np.argmax(np.cumsum(pca.explained_variance_ratio_) > 0.9)) + 1}")
    return pca


def estimate_sigmasq_loc(Y, mask, filter_size=30) -> float:
    """The centroid random walk's variance from the data (spec 2.6): the squared mean frame-to-frame
    step of the median-filtered (``filter_size`` frames, e.g. the config's ``fps``) keypoint-median
    centroid, over the real frames of every segment.

    Same name and arguments as keypoint-MoSeq's estimator: ``estimate_sigmasq_loc(data["Y"],
    data["mask"], filter_size=fps)`` on ``format_data``'s output, passed on with
    ``init_model(..., cen_hypparams={"sigmasq_loc": value})``; ``init_model`` estimates it this
    way when no value is given (the reference uses its config's 0.5 then).
    """
    Y = np.asarray(Y, dtype=np.float64)
    mask = np.asarray(mask)
    if Y.ndim != 4 or mask.shape != Y.shape[:2]:
        raise ValueError(f"estimate_sigmasq_loc needs Y of shape (segments, T, K, D) and mask (segments, T); got "
                         f"{Y.shape} and {mask.shape}.")
    if int(filter_size) < 1:
        raise ValueError(f"filter_size must be a positive number of frames, got {filter_size!r}.")
    return _init.estimate_sigmasq_loc(Y, mask, filter_size=int(filter_size))


def _keypoint_indices(idxs, n_kp, default, name):
    idxs = default if idxs is None else [int(i) for i in np.atleast_1d(np.asarray(idxs))]
    bad = [i for i in idxs if not 0 <= i < n_kp]
    if bad or not idxs:
        raise ValueError(f"{name}={idxs} must be non-empty positions among the {n_kp} keypoints used.")
    return idxs


# --------------------------------------------------------------------------- model dict <-> estimator
def _estimator_kwargs(trans_hypparams=None, ar_hypparams=None, obs_hypparams=None, cen_hypparams=None,
                      error_estimator=None, conf_threshold=0.5, fix_heading=False, **kwargs):
    out = {"conf_threshold": conf_threshold, "fix_heading": fix_heading}
    for group, given in (("trans_hypparams", trans_hypparams), ("ar_hypparams", ar_hypparams),
                         ("obs_hypparams", obs_hypparams), ("cen_hypparams", cen_hypparams)):
        for name, value in (given or {}).items():
            if name in _HYPPARAM_NAMES[group]:
                out[_HYPPARAM_NAMES[group][name]] = value
    if error_estimator is not None:
        out["noise_slope"], out["noise_intercept"] = error_estimator["slope"], error_estimator["intercept"]
    return out


def _core_data(est: KeypointSLDS, data) -> core.KeypointData:
    Y, conf, mask = (np.asarray(data[k], dtype=np.float64) for k in ("Y", "conf", "mask"))
    s0 = _init.noise_prior(conf, est.noise_slope, est.noise_intercept)
    return core.KeypointData(jnp.asarray(Y), jnp.asarray(conf), jnp.asarray(mask), jnp.asarray(s0),
                             jnp.asarray(centring_embedding(Y.shape[2])))


def _hypparams(est: KeypointSLDS) -> dict:
    params = est.get_params()
    groups = {g: {ref: params[mine] for ref, mine in names.items()} for g, names in _hypparam_names(est).items()}
    groups["ar_hypparams"]["latent_dim"] = int(est.latent_dim_)
    groups["cen_hypparams"]["sigmasq_loc"] = float(est.sigmasq_loc_)
    return groups


def _to_model(est: KeypointSLDS, state, key, noise_prior) -> dict:
    state = jax.tree_util.tree_map(np.asarray, state)
    fitted = {k: v for k, v in vars(est).items() if k.endswith("_") and k not in est._CHECKPOINT_OWN}
    return {
        "seed": np.asarray(jax.random.key_data(key)),
        "states": {k: getattr(state, k) for k in ("x", "z", "v", "h", "s")},
        "params": state.params._asdict(),
        "hypparams": _hypparams(est),
        "noise_prior": np.asarray(noise_prior),
        "estimator": {"class": type(est).__name__, "params": est.get_params(), "fitted": fitted,
                      "history": {k: list(v) for k, v in getattr(est, "log_likelihood_terms_", {}).items()},
                      "stages": list(getattr(est, "stage_history_", []))},
    }


def _from_model(model: dict):
    """(estimator, chain state, key) from a model dict."""
    cls, params_type, state_type = _MODELS[_model_class(model)]
    est = cls(**model["estimator"]["params"])
    for name, value in model["estimator"]["fitted"].items():
        setattr(est, name, value)
    with float64():  # outside it, jnp.asarray would round float64 arrays to float32
        params = params_type(**{k: jnp.asarray(v) for k, v in model["params"].items()})
        states = {k: jnp.asarray(v) for k, v in model["states"].items()}
    state = state_type(params, states["x"], states["z"], states["h"], states["v"], states["s"])
    return est, state, jax.random.wrap_key_data(np.asarray(model["seed"], dtype=np.uint32))


# --------------------------------------------------------------------------- public API
def init_model(data=None, states=None, params=None, hypparams=None, noise_prior=None, seed=0, pca=None,
               anterior_idxs=None, posterior_idxs=None, location_aware=False, allo_hypparams=None,
               trans_hypparams=None, ar_hypparams=None, obs_hypparams=None, cen_hypparams=None,
               error_estimator=None, conf_threshold=0.5, fix_heading=False, verbose=False, reference_compat=False,
               **kwargs) -> dict:
    """Initialise a keypoint SLDS on formatted ``data`` (spec 2): PCA, alignment, starting states.

    ``hypparams`` (a dict of the four groups) overrides the group arguments.
    ``seed`` is an int or JAX key data. Passing ``params`` and ``hypparams`` (as
    ``apply_model`` does) skips the PCA and initialises states under those
    parameters. ``pca``: a PCA from :func:`fit_pca` (or any fitted sklearn PCA on the same
    embedded poses); by default one is fitted here on confident frames (spec 2.3).
    ``reference_compat=True`` uses keypoint-MoSeq's hard-coded 3 coordinates per keypoint in the
    noise-scale updates (s, sigmasq) instead of the data's dimension (spec 4.5-4.6): for 2D data
    that reproduces the reference's model rather than the exact conditional; the model dict keeps
    the choice for ``fit_model`` and ``apply_model``.
    """
    if allo_hypparams is not None and not location_aware:
        raise ValueError("allo_hypparams are for the location-aware model: pass location_aware=True as well.")
    if data is None:
        raise ValueError("init_model needs the formatted data (from format_data).")
    if hypparams is not None:
        trans_hypparams = hypparams.get("trans_hypparams", trans_hypparams)
        ar_hypparams = hypparams.get("ar_hypparams", ar_hypparams)
        obs_hypparams = hypparams.get("obs_hypparams", obs_hypparams)
        cen_hypparams = hypparams.get("cen_hypparams", cen_hypparams)
        allo_hypparams = hypparams.get("allo_hypparams", allo_hypparams)
    cls = AlloKeypointSLDS if location_aware else KeypointSLDS
    extra = {}
    if location_aware:
        unknown = sorted(set(allo_hypparams or {}) - set(_ALLO_NAMES))
        if unknown:
            raise ValueError(f"Unknown allo_hypparams {unknown}; known: {list(_ALLO_NAMES)}.")
        extra = dict(allo_hypparams or {})
    est = cls(**_estimator_kwargs(trans_hypparams, ar_hypparams, obs_hypparams, cen_hypparams,
                                  error_estimator, conf_threshold, fix_heading),
              **extra, anterior_keypoints=anterior_idxs, posterior_keypoints=posterior_idxs, verbose=verbose,
              reference_compat=bool(reference_compat))
    n_kp = np.asarray(data["Y"]).shape[2]
    names = [f"kp{k}" for k in range(n_kp)]
    est._anterior_ = est._keypoint_positions(anterior_idxs, names, 0, "anterior")
    est._posterior_ = est._keypoint_positions(posterior_idxs, names, n_kp - 1, "posterior")
    est.keypoints_ = names
    key = jax.random.key(seed) if np.ndim(seed) == 0 else jax.random.wrap_key_data(np.asarray(seed, np.uint32))
    with float64():
        cdata = _core_data(est, data)
        key, init_key = jax.random.split(key)
        if params is not None:
            est.latent_dim_ = int(np.asarray(params["Cd"]).shape[1] - 1)
            est.sigmasq_loc_ = float((cen_hypparams or {}).get("sigmasq_loc", 1.0))
            _, params_type, state_type = _MODELS[cls.__name__]
            state = state_type(params_type(**{k: jnp.asarray(v) for k, v in params.items()}),
                               *([None] * 5))  # only the parameters are used
            state = est._init_states(init_key, state, cdata)
        else:
            if cen_hypparams and cen_hypparams.get("sigmasq_loc") is not None:
                est.set_params(sigmasq_loc=cen_hypparams["sigmasq_loc"])
            state = est._init_chain(init_key, cdata, pca=pca)
    return _to_model(est, state, key, cdata.s0)


def update_hypparams(model_dict: dict, **kwargs) -> dict:
    """Change scalar hyperparameters (e.g. ``kappa``) of a model, in place; returns it (spec 10).

    Unknown names and structural changes (num_states, latent_dim, nlags) raise
    and change nothing.
    """
    groups = _HYPPARAM_NAMES
    if _model_class(model_dict) == "AlloKeypointSLDS":
        groups = {**groups, "allo_hypparams": {n: n for n in _ALLO_NAMES}}
    owners = {ref: group for group, names in groups.items() for ref in names}
    for name, value in kwargs.items():
        if name not in owners:
            raise ValueError(f"Unknown hyperparameter {name!r}; known: {sorted(owners)}.")
        if name in _STRUCTURAL and value != model_dict["hypparams"][owners[name]][name]:
            raise ValueError(f"{name} is structural: changing it ({model_dict['hypparams'][owners[name]][name]} -> "
                             f"{value}) needs a new model (init_model).")
        if not np.isscalar(value):
            raise ValueError(f"{name} must be a scalar, got {value!r}.")
    for name, value in kwargs.items():
        model_dict["hypparams"][owners[name]][name] = value
        model_dict["estimator"]["params"][groups[owners[name]][name]] = value
        if name == "sigmasq_loc":
            model_dict["estimator"]["fitted"]["sigmasq_loc_"] = float(value)
    return model_dict


def _checkpoint_path(project_dir, model_name) -> Path:
    return Path(project_dir) / model_name / "checkpoint.nc"


def fit_model(model, data, metadata, project_dir=None, model_name=None, num_iters=50, start_iter=0,
              verbose=False, ar_only=False, parallel_message_passing=None, jitter=0.001,
              generate_progress_plots=True, save_every_n_iters=25, location_aware=False, **kwargs):
    """Run ``num_iters - start_iter`` Gibbs sweeps of the model; returns ``(model, model_name)``.

    ``ar_only`` resamples only the AR-HMM part (z and its parameters). With
    ``project_dir``, a netCDF4 checkpoint ``{project_dir}/{model_name}/checkpoint.nc``
    is saved every ``save_every_n_iters`` completed sweeps and at the end
    (``None``: never; 0 or negative: only at the end); snapshots later than
    ``start_iter`` in an existing checkpoint are deleted first. Ctrl-C returns
    the last complete model.

    With ``generate_progress_plots`` (and a checkpoint), every save also writes
    PNG plots to ``{project_dir}/{model_name}/plots/`` (:func:`kpms_estimators.plots.plot_progress`):
    syllable frequencies and durations now, the median duration and one
    segment's syllable sequence at every saved iteration (earlier snapshots are
    read from the checkpoint), and the per-term log-likelihood trace.
    ``save_every_n_iters=0`` turns the plots off with a warning, as the reference does.

    A sweep that gives NaN or inf is rolled back and retried from the last finite
    state with a fresh key and 10x the jitter, up to 3 times (the ``nan_retries``
    history series counts the retries of each sweep). If it stays non-finite,
    fitting stops with a ``RuntimeWarning`` naming the arrays and their non-finite
    counts; the returned model is the last finite one (also saved to the
    checkpoint, when there is one), and ``model["estimator"]["fitted"]["nan_stop_"]``
    describes the stop (None otherwise).
    """
    _check_location_aware(model, location_aware, "fit_model")
    if num_iters < start_iter:
        raise ValueError(f"num_iters={num_iters} is less than start_iter={start_iter}.")
    if save_every_n_iters is not None and not isinstance(save_every_n_iters, (int, np.integer)):
        raise ValueError(f"save_every_n_iters must be an integer or None, got {save_every_n_iters!r}.")
    model_name = model_name or _dt.datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    est, state, key = _from_model(model)
    est.set_params(verbose=verbose, jitter=jitter, parallel_message_passing=parallel_message_passing)
    history = {k: list(v) for k, v in model["estimator"]["history"].items()}
    stages = list(model["estimator"]["stages"])
    path = progress = None
    if project_dir is not None and save_every_n_iters is not None:
        path = _checkpoint_path(project_dir, model_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            _checkpoint.delete_snapshots_after(path, start_iter)
        if generate_progress_plots and save_every_n_iters == 0:
            warnings.warn("save_every_n_iters=0: progress plots are off; only the final snapshot is saved.",
                          UserWarning, stacklevel=2)
        elif generate_progress_plots:
            progress = _ProgressPlots(path, model_name, np.asarray(data["mask"])[:, est.n_lags :] > 0)
    with float64():
        cdata = _core_data(est, data)
        hypers = est._hypers(cdata)
        stage = "ar_only" if ar_only else "full"
        step = lambda k, s, d, h: est._kernels.step(k, s, d, h, switches=est._switches(ar_only=ar_only))  # noqa: E731
        schedule = [(stage, int(num_iters - start_iter), step, hypers)]
        done, saved = [start_iter], [None]

        def save(chain, k):
            saved[0] = done[0]
            _save_snapshot(path, est, chain, k, history, stages, data, metadata, done[0], cdata.s0)
            if progress is not None:
                progress.draw(chain.z, done[0], history, stages)

        def after_sweep(chain, k):
            done[0] += 1
            if path is not None and (done[0] == num_iters or (save_every_n_iters > 0
                                                             and done[0] % save_every_n_iters == 0)):
                save(chain, k)

        est.nan_stop_ = None
        state, key, interrupted, nan_stop = est._run_sweeps(key, state, cdata, schedule, history, stages,
                                                            callback=after_sweep)
        est.nan_stop_ = nan_stop
        if nan_stop is not None and path is not None and done[0] > start_iter and saved[0] != done[0]:
            save(state, key)  # keep the last finite state on disk: a resume (e.g. larger jitter) starts there
        est._store_chain(state, key, history, stages, done[0])
        model = _to_model(est, state, key, cdata.s0)
    if interrupted:
        warnings.warn(f"Interrupted: returning the model after {done[0]} sweeps.", UserWarning, stacklevel=2)
    return model, model_name


class _ProgressPlots:
    """fit_model's progress plots: the syllables at each save, with those of earlier snapshots."""

    def __init__(self, path: Path, model_name: str, label_mask: np.ndarray):
        self.out_dir = path.parent / "plots"
        self.model_name = model_name
        self.label_mask = label_mask  # (B, T-L) bool: labelled real frames
        saved = _checkpoint.read_snapshot_variable(path, "z") if path.exists() else {}
        self.snapshots = {it: self._labelled(z) for it, z in saved.items()}

    def _labelled(self, z) -> list[np.ndarray]:
        z = np.asarray(z)
        return [z[b][self.label_mask[b]] for b in range(z.shape[0])]

    def draw(self, z, iteration: int, history: dict, stages: list) -> None:
        from . import plots

        current = self._labelled(z)
        previous = {it: s for it, s in self.snapshots.items() if it < iteration}
        plots.plot_progress({**history, "stage": np.asarray(stages, dtype=str)}, current, self.out_dir,
                            iteration=iteration, syllable_history=previous, model_name=self.model_name)
        self.snapshots[iteration] = current


def _save_snapshot(path, est, chain, key, history, stages, data, metadata, iteration, noise_prior):
    est._store_chain(chain, key, history, stages, iteration)
    model = _to_model(est, chain, key, noise_prior)
    hist = {k: np.asarray(v) for k, v in history.items()}
    hist["stage"] = np.asarray(stages, dtype=str)
    chain = jax.tree_util.tree_map(np.asarray, chain)
    key_data = np.asarray(jax.random.key_data(key))
    fitted = model["estimator"]["fitted"]
    if not path.exists():
        keys, bounds = metadata
        _checkpoint.write_checkpoint(
            path, model_name=type(est).__name__, hyperparams=est.get_params(), fitted=fitted,
            snapshots={iteration: (chain, key_data)}, history=hist,
            data={k: np.asarray(v) for k, v in data.items()}, keys=np.asarray(keys), bounds=np.asarray(bounds),
        )
    else:
        _checkpoint.add_snapshot(path, iteration, chain, key_data, hist)


def load_checkpoint(project_dir=None, model_name=None, iteration=None, path=None):
    """``(model, data, metadata, iteration)`` from a fit_model checkpoint (latest snapshot by default)."""
    path = Path(path) if path is not None else _checkpoint_path(project_dir, model_name)
    meta, state, key_data, history, iteration = _checkpoint.read_checkpoint(path, iteration)
    data, keys, bounds = _checkpoint.read_data(path)
    if meta["model"] not in _MODELS:
        raise ValueError(f"{path} holds a {meta['model']!r} checkpoint, not one of fit_model's models "
                         f"({', '.join(_MODELS)}); open it with that estimator's load().")
    est = _MODELS[meta["model"]][0](**meta["hyperparams"])
    for name, value in meta["fitted"].items():
        setattr(est, name, value)
    stages = [str(s) for s in history.pop("stage", [])]
    est._store_chain(state, jax.random.wrap_key_data(np.asarray(key_data, np.uint32)), history, stages, iteration)
    with float64():
        s0 = _core_data(est, data).s0
    model = _to_model(est, state, jax.random.wrap_key_data(np.asarray(key_data, np.uint32)), s0)
    return model, data, (keys, bounds), iteration


def _applied_chain(model, data):
    """(estimator, fresh states for ``data`` under the model's parameters, ..., key, core data, hypers)."""
    est, fitted_state, key = _from_model(model)
    with float64():
        cdata = _core_data(est, data)
        hypers = est._hypers(cdata)
        key, init_key = jax.random.split(key)
        state = est._init_states(init_key, fitted_state, cdata)
    return est, state, fitted_state, key, cdata, hypers


def _apply_states(model, data, num_iters, num_samples=0, steps_per_sample=1):
    est, state, _, key, cdata, hypers = _applied_chain(model, data)
    with float64():
        state, marginals = est._sample_states(key, state, cdata, hypers, num_iters, num_samples, steps_per_sample)
    return est, jax.tree_util.tree_map(np.asarray, state), marginals


def extract_results(model, metadata, n_lags=None) -> dict:
    """``{recording: {"syllable", "latent_state", "centroid", "heading"}}`` with padding removed (spec 7)."""
    keys, bounds = metadata
    batch = _batch_from_metadata(keys, bounds, np.asarray(model["states"]["x"]).shape[1])
    n_lags = n_lags or model["hypparams"]["ar_hypparams"]["nlags"]
    names = list(dict.fromkeys(np.asarray(keys).tolist()))
    parts = {
        "syllable": _data.unbatch(batch, model["states"]["z"], offset=n_lags),
        "latent_state": _data.unbatch(batch, model["states"]["x"]),
        "centroid": _data.unbatch(batch, model["states"]["v"]),
        "heading": _data.unbatch(batch, model["states"]["h"]),
    }
    return {name: {k: parts[k][r] for k in parts} for r, name in enumerate(names)}


def _batch_from_metadata(keys, bounds, width):
    keys = np.asarray(keys)
    names = list(dict.fromkeys(keys.tolist()))
    codes = np.array([names.index(k) for k in keys])
    bounds = np.asarray(bounds)
    lengths = np.array([bounds[codes == r, 1].max() for r in range(len(names))])
    mask = np.zeros((len(keys), width))
    for b, (start, end) in enumerate(bounds):
        mask[b, : end - start] = 1
    return _data.Batch(values=np.zeros((len(keys), width, 1)), conf=None, mask=mask, keys=codes,
                       bounds=bounds, seg_length=int(width - _data.OVERLAP), lengths=lengths)


def apply_model(model, data, metadata, project_dir=None, model_name=None, num_iters=500, ar_only=False,
                save_results=True, verbose=False, results_path=None, parallel_message_passing=None,
                return_model=False, location_aware=False, overwrite=False, **kwargs):
    """Infer states for (new) data with the model's parameters fixed (spec 7).

    Runs ``num_iters`` states-only sweeps from a fresh initialisation and returns
    the final sample per recording. With ``save_results``, writes them as netCDF
    to ``results_path`` or ``{project_dir}/{model_name}/results.nc``; recordings
    already in that file are refused unless ``overwrite=True``.
    """
    _check_location_aware(model, location_aware, "apply_model")
    if ar_only:
        raise NotImplementedError("apply_model(ar_only=True) is not supported yet.")
    est, state, _ = _apply_states(model, data, num_iters)
    applied = dict(model, states={k: getattr(state, k) for k in ("x", "z", "v", "h", "s")})
    rank = np.argsort(est.syllable_order_) if hasattr(est, "syllable_order_") else None
    results = extract_results(applied, metadata)
    if rank is not None:
        for res in results.values():
            res["syllable"] = rank[res["syllable"]]
    if save_results:
        path = Path(results_path) if results_path else Path(project_dir) / model_name / "results.nc"
        _write_results(path, results, overwrite)
    return (results, applied) if return_model else results


def _write_results(path: Path, results: dict, overwrite: bool) -> None:
    """All recordings in one netCDF4 file: dims (recording, time), NaN / -1 past each recording's end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with xr.open_dataset(path, engine="netcdf4") as old:
            old = old.load()
        clash = sorted(set(old["recording"].values.tolist()) & set(results))
        if clash and not overwrite:
            raise ValueError(f"{path} already holds recordings {clash}; pass overwrite=True to replace them.")
        keep = [r for r in old["recording"].values.tolist() if r not in results]
        merged = {r: {k: old[k].sel(recording=r).values[: int(old["n_frames"].sel(recording=r))]
                      for k in ("syllable", "latent_state", "centroid", "heading")} for r in keep}
        results = {**merged, **results}
    names = list(results)
    width = max(len(r["syllable"]) for r in results.values())

    def stack(name, fill):
        first = np.asarray(results[names[0]][name])
        out = np.full((len(names), width) + first.shape[1:], fill, dtype=first.dtype if fill == -1 else float)
        for i, n in enumerate(names):
            arr = np.asarray(results[n][name])
            out[i, : len(arr)] = arr
        return out

    ds = xr.Dataset(
        {
            "syllable": (("recording", "time"), stack("syllable", -1)),
            "latent_state": (("recording", "time", "latent_dim"), stack("latent_state", np.nan)),
            "centroid": (("recording", "time", "space"), stack("centroid", np.nan)),
            "heading": (("recording", "time"), stack("heading", np.nan)),
            "n_frames": (("recording",), np.array([len(results[n]["syllable"]) for n in names])),
        },
        coords={"recording": names},
        attrs={"library": "kpms_estimators", "padding": "syllable -1, others NaN past n_frames"},
    )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    ds.to_netcdf(tmp, engine="netcdf4")
    os.replace(tmp, path)


def estimate_syllable_marginals(model, data, metadata, burn_in_iters=200, num_samples=100, steps_per_sample=10,
                                return_samples=False, verbose=False, parallel_message_passing=None,
                                location_aware=False, **kwargs):
    """Averaged forward-backward syllable marginals per recording (spec 8): ``{name: (T_r, S)}``.

    Columns are in the model's syllable order (0 = most used) when the model was
    fitted through the estimator or fit_model. ``return_samples`` also returns
    ``{name: (num_samples, T_r)}`` sampled syllables (the documented orientation).
    """
    _check_location_aware(model, location_aware, "estimate_syllable_marginals")
    if not return_samples:
        est, state, marginals = _apply_states(model, data, burn_in_iters, num_samples, steps_per_sample)
        return _unbatch_marginals(est, model, metadata, marginals)
    samples = []
    est, state, _, key, cdata, hypers = _applied_chain(model, data)
    with float64():
        state, _ = est._sample_states(key, state, cdata, hypers, burn_in_iters, 0)
        total = None
        for i in range(num_samples):
            key, sub = jax.random.split(key)
            state, marg = est._sample_states(sub, state, cdata, hypers, steps_per_sample - 1, 1)
            total = marg if total is None else total + marg
            samples.append(np.asarray(state.z))
    marginals = _unbatch_marginals(est, model, metadata, total / num_samples)
    batch = _batch_from_metadata(*metadata, np.asarray(model["states"]["x"]).shape[1])
    n_lags = model["hypparams"]["ar_hypparams"]["nlags"]
    per_sample = [_data.unbatch(batch, z, offset=n_lags) for z in samples]
    names = list(marginals)
    return marginals, {n: np.stack([s[r] for s in per_sample]) for r, n in enumerate(names)}


def _unbatch_marginals(est, model, metadata, marginals):
    batch = _batch_from_metadata(*metadata, np.asarray(model["states"]["x"]).shape[1])
    n_lags = model["hypparams"]["ar_hypparams"]["nlags"]
    per_rec = _data.unbatch(batch, marginals, offset=n_lags)
    if hasattr(est, "syllable_order_"):
        per_rec = [m[:, est.syllable_order_] for m in per_rec]
    names = list(dict.fromkeys(np.asarray(metadata[0]).tolist()))
    return dict(zip(names, per_rec))


# --------------------------------------------------------------------------- model selection
def _marginal_log_likelihood_sum(x, mask, params: ar_core.ARHMMParams):
    """sum over segments of log p(x_b | Ab, Q, pi), z summed out by the forward filter (spec 3.5, 9)."""
    return jnp.sum(ar_core.predictive_log_likelihoods(ar_core.ARHMMData(x, mask), params))


_marginal_log_likelihood = compiled(_marginal_log_likelihood_sum)


def _eml_paths(project_dir, model_names, checkpoint_paths) -> list[Path]:
    if checkpoint_paths is not None and model_names is not None:
        raise ValueError("Give either model_names (with project_dir) or checkpoint_paths, not both.")
    if checkpoint_paths is None:
        if model_names is None:
            raise ValueError("expected_marginal_likelihoods needs model_names (with project_dir) or checkpoint_paths.")
        if project_dir is None:
            raise ValueError("model_names need the project_dir they were fitted in.")
        model_names = [model_names] if isinstance(model_names, str) else list(model_names)
        paths = [_checkpoint_path(project_dir, name) for name in model_names]
    else:
        checkpoint_paths = [checkpoint_paths] if isinstance(checkpoint_paths, (str, os.PathLike)) else checkpoint_paths
        paths = [Path(p) for p in checkpoint_paths]
    if len(paths) < 2:
        raise ValueError(f"expected_marginal_likelihoods compares at least 2 models; got {len(paths)}.")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"No checkpoint at {missing}.")
    return paths


def _same_data(path, data, keys, bounds, ref_path, ref) -> None:
    """Raise if a checkpoint's formatted data differ from the first one's (spec 9 needs one dataset)."""
    ref_data, ref_keys, ref_bounds = ref
    differences = []
    if list(keys) != list(ref_keys) or not np.array_equal(bounds, ref_bounds):
        differences.append("recordings or segment bounds")
    for name in sorted(set(data) | set(ref_data)):
        a, b = data.get(name), ref_data.get(name)
        if a is None or b is None or a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
            differences.append(name)
    if differences:
        raise ValueError(
            f"The models were fitted to different data: {str(path)!r} differs from {str(ref_path)!r} in "
            f"{', '.join(differences)}. Expected marginal likelihoods compare models fitted to the same data."
        )


def expected_marginal_likelihoods(project_dir=None, model_names=None, checkpoint_paths=None):
    """Score models fitted to the same data by expected marginal likelihood (spec 9).

    For M >= 2 fit_model checkpoints (``{project_dir}/{name}/checkpoint.nc`` for
    each of ``model_names``, or ``checkpoint_paths``), take the latent
    trajectory x^j and the AR-HMM parameters theta^i = (Ab, Q, pi) of each
    latest snapshot, and compute ``mll[i, j] = log p(x^j | theta^i)``: the
    forward-filter marginal log-likelihood with z summed out (uniform initial
    state), summed over all segments and labelled frames, so it is a total that
    grows with the dataset, not a per-frame mean. Then, over j != i,

    - ``scores[i]`` = mean of ``mll[i, j]``;
    - ``standard_errors[i]`` = sqrt(var_i / (M - 1)), with ``var_i`` the centred
      population variance (mean of ``(mll[i, j] - scores[i]) ** 2``). This is the
      reference's convention computed without its cancellation-prone
      mean-of-squares form.

    The best model has the largest score.

    Parameters
    ----------
    project_dir : str or PathLike, optional
    model_names : sequence of str, optional
        Models in ``project_dir`` (fit_model's ``model_name``).
    checkpoint_paths : sequence of str or PathLike, optional
        Checkpoint files instead of ``project_dir`` and ``model_names``.

    Returns
    -------
    scores, standard_errors : ndarray of shape (M,)
        In the order of the models given.

    Raises
    ------
    ValueError
        Neither (or both) of model_names and checkpoint_paths; fewer than two
        models; a checkpoint without formatted data (an estimator's ``save``);
        models fitted to different data, or with different latent_dim or n_lags.
    FileNotFoundError
        A checkpoint is missing.
    """
    paths = _eml_paths(project_dir, model_names, checkpoint_paths)
    xs, thetas, reference = [], [], None
    for path in paths:
        _, state, _, _, _ = _checkpoint.read_checkpoint(path)
        stored = _checkpoint.read_data(path)
        if stored is None or not hasattr(state, "x"):
            raise ValueError(f"{str(path)!r} holds no formatted data and latent trajectory; expected marginal "
                             "likelihoods need fit_model checkpoints.")
        if reference is None:
            reference = (path, stored)
        else:
            _same_data(path, *stored, *reference)
        xs.append(np.asarray(state.x, dtype=np.float64))
        p = state.params
        thetas.append(ar_core.ARHMMParams(*(np.asarray(a, dtype=np.float64) for a in (p.betas, p.pi, p.Ab, p.Q))))
        first_x, first_ab = xs[0].shape, thetas[0].Ab.shape[1:]
        if xs[-1].shape != first_x or thetas[-1].Ab.shape[1:] != first_ab:
            raise ValueError(
                f"{str(path)!r} has latent states of shape {xs[-1].shape} and AR coefficients {thetas[-1].Ab.shape[1:]}"
                f" per state, {str(paths[0])!r} {first_x} and {first_ab}: the models differ in latent_dim or n_lags."
            )
    n_models = len(paths)
    mll = np.zeros((n_models, n_models))
    with float64():
        mask = jnp.asarray(np.asarray(reference[1][0]["mask"], dtype=np.float64))
        x_dev = [jnp.asarray(x) for x in xs]
        for i, theta in enumerate(thetas):
            theta = jax.tree_util.tree_map(jnp.asarray, theta)
            for j in range(n_models):
                if i != j:
                    mll[i, j] = float(_marginal_log_likelihood(x_dev[j], mask, theta))
    others = ~np.eye(n_models, dtype=bool)
    scores = np.where(others, mll, 0.0).sum(axis=1) / (n_models - 1)
    variances = np.where(others, (mll - scores[:, None]) ** 2, 0.0).sum(axis=1) / (n_models - 1)
    return scores, np.sqrt(variances / (n_models - 1))
