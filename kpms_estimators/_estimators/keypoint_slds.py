"""The ``KeypointSLDS`` estimator: keypoint-MoSeq's model on pose recordings."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from .. import _data, _init
from .._core import arhmm as ar_core
from .._core import keypoint_slds as core
from .._core.autoregressive import make_ar_prior
from .._core.keypoints import centring_embedding
from . import _groups
from ._base import REDUCTION_OPTIONS, GibbsEstimator, _fingerprint, compiled, float64
from .arhmm import params_given_stats

_emission_sigmasq = compiled(core.emission_sigmasq, options=REDUCTION_OPTIONS, static_argnames="switches")
_emission_x_window = compiled(
    lambda key, state, data, hypers, start, switches, size: core.emission_x(key, state, data, hypers, switches,
                                                                             (start, size)),
    options=REDUCTION_OPTIONS, static_argnames=("switches", "size"))


def windowed_labels(sample_labels):
    """The label part from a core ``sample_labels(key, state, data, window=None)``: per window of
    segments, the windows side by side on the CPU's cores (``_groups``; the same labels as one
    program over all segments)."""
    window_program = compiled(lambda key, state, data, start, size: sample_labels(key, state, data, (start, size)),
                              static_argnames="size")

    def labels(key, state, data):
        if _groups.traced(key, state, data):
            return sample_labels(key, state, data)
        spans = _groups.segment_windows(data.mask.shape)
        key, state, data = jax.device_put((key, state, data))
        return _groups.assemble(_groups.side_by_side(window_program, spans, key, state, data), spans)

    def compile_ahead(key, state, data):
        """Start compiling the window program for these (possibly abstract) arguments."""
        spans = _groups.segment_windows(data.mask.shape)
        return _groups.compile_windows_ahead(window_program, spans, key, state, data)

    labels.compile_ahead = compile_ahead
    return labels


def windowed_emission(sample_emission, emission_after_x):
    """The emission part from a core ``sample_emission`` made of ``core.emission_sigmasq``,
    ``core.emission_x`` and ``emission_after_x``, as three programs: sigmasq (if resampled), the
    latent pose x per window of segments side by side on the CPU's cores (the same draws), then
    the rest, which compiles on another core while the x windows compile and run."""
    after_program = compiled(emission_after_x, options=REDUCTION_OPTIONS, static_argnames="switches")

    def emission(key, state, data, hypers, switches):
        if _groups.traced(key, state, data, hypers):
            return sample_emission(key, state, data, hypers, switches)
        spans = _groups.segment_windows(data.mask.shape)
        key, state, data, hypers = jax.device_put((key, state, data, hypers))
        if switches.resample_global_noise_scale:
            state = _emission_sigmasq(key, state, data, hypers, switches=switches)
        # the x window program, the longer compile, first: it compiles in the pool while this
        # thread traces and lowers the rest (0.33 s at 4 x 3000 frames)
        _groups.compile_windows_ahead(_emission_x_window, spans, key, state, data, hypers, switches=switches)
        ahead = _groups.compile_ahead(after_program, key, state, data, hypers, switches=switches)
        pieces = _groups.side_by_side(_emission_x_window, spans, key, state, data, hypers, switches=switches)
        state = state._replace(x=_groups.assemble(pieces, spans))
        if ahead is not None:
            ahead.result()
        return after_program(key, state, data, hypers, switches=switches)

    return emission


#: The sweep's pieces, each compiled once per shape and shared: the AR-only and the full
#: stage, the initialisation and apply's states-only sweeps run the same programs, so the
#: full stage compiles only the emission part and ``init`` only what no sweep has.
_PARTS = core.SweepParts(
    param_stats=compiled(core.param_stats),
    params_given_stats=params_given_stats,
    labels=windowed_labels(core.sample_labels),
    emission=windowed_emission(core.sample_emission, core.emission_after_x),
    info=compiled(core.sweep_info, options=REDUCTION_OPTIONS),
    noise_scales=compiled(core.resample_noise_scales, static_argnames="reference_compat"),
)


def _step(key, state, data, hypers, *, switches):
    """``core.gibbs_step`` from the separately compiled parts (no host round trip between them)."""
    return core.sweep(key, state, data, hypers, switches, _PARTS)


def _init_state(key, x0, h0, v0, data, hypers, Cd, *, num_states, reference_compat):
    _compile_parts_ahead(lambda parts: core.init_state(key, x0, h0, v0, data, hypers, Cd, num_states,
                                                        reference_compat, parts=parts), _PARTS, core.PARTS)
    return core.init_state(key, x0, h0, v0, data, hypers, Cd, num_states, reference_compat, parts=_PARTS)


def _abstract(tree):
    """Tracers as ``jax.ShapeDtypeStruct``s (weak type kept); everything else as it is."""
    def one(a):
        if isinstance(a, jax.core.Tracer):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.aval.weak_type)
        return a
    return jax.tree_util.tree_map(one, tree)


def _compile_parts_ahead(run, parts, plain_parts) -> None:
    """Compile the programs of ``parts`` that ``run(parts)`` calls, side by side in the pool,
    before it runs.

    ``run`` (an initialisation: its parts are called one after another, each on the results of
    the one before) is traced once, abstractly, with ``plain_parts`` (the parts' plain functions).
    Each call of a part starts its program's compile there and then, for the arguments' shapes:
    lowered in this thread, compiled on a pool thread, so that XLA's compiles, one core each,
    overlap with each other and with the rest of this trace. Returns when all are compiled;
    the calls of ``run(parts)`` then find them in JAX's cache."""
    if _groups.segment_threads() < 2:
        return
    futures = []

    def noting(name, part):
        def call(*args, **kwargs):
            compiled_part = getattr(parts, name)
            abstract = _abstract(args)
            if hasattr(compiled_part, "compile_ahead"):
                futures.append(compiled_part.compile_ahead(*abstract, **kwargs))
            elif hasattr(compiled_part, "lower"):
                futures.append(_groups.compile_ahead(compiled_part, *abstract, **kwargs))
            # (the counters are for traces that compile; this trace only reads shapes)
            counts = dict(core.TRACE_COUNTS)
            # as at a jit boundary: NumPy arrays become JAX values
            out = part(*jax.tree_util.tree_map(lambda a: jnp.asarray(a) if isinstance(a, np.ndarray) else a, args),
                       **kwargs)
            core.TRACE_COUNTS.update(counts)
            return out
        return call

    jax.eval_shape(lambda: run(plain_parts._replace(**{name: noting(name, getattr(plain_parts, name))
                                                      for name in plain_parts._fields})))
    for future in futures:
        if future is not None:
            future.result()


def _init_given_params(key, x0, h0, v0, data, hypers, params, *, reference_compat):
    return core.init_states_given_params(key, x0, h0, v0, data, hypers, params, reference_compat, parts=_PARTS)


def windowed_rows(per_segment):
    """A deterministic ``per_segment(state, data) -> (B, ...)`` (forward-backward marginals,
    predictive log-likelihoods) as one program per window of segments, the windows side by side
    on the CPU's cores (``_groups``): the same rows, on every core, with (frames x states)
    temporaries that follow the rows' window budget (``_groups.ROWS_WINDOW_FRAMES``) rather than
    the number of segments (at 10 x 18000 frames the AR residuals of all segments are 0.64 GB).

    ``rows(state, data, add_to=None)``; with ``add_to`` (a writable NumPy array of the rows' full
    shape) each window's rows are added into it in place as soon as they are ready, and it is
    returned: a running sum (the marginals' average over samples) then holds no other array of
    the whole batch's size."""
    window_program = compiled(lambda state, data, start, size: per_segment(*core.segment_rows(state, data, start, size)),
                              static_argnames="size")

    def rows(state, data, add_to=None):
        if _groups.traced(state, data):
            out = per_segment(state, data)
            return out if add_to is None else add_to + out
        spans = _groups.segment_windows(data.mask.shape, _groups.ROWS_WINDOW_FRAMES)
        state, data = jax.device_put((state, data))
        if add_to is None:
            return _groups.assemble(_groups.side_by_side(window_program, spans, state, data), spans)
        owned = _groups.owned_rows(spans)

        def add(i, piece):  # windows own disjoint rows: the lanes never write the same ones
            first, offset = owned[i]
            piece = np.asarray(piece)[offset:]
            np.add(add_to[first:first + len(piece)], piece, out=add_to[first:first + len(piece)])

        _groups.side_by_side(window_program, spans, state, data, consume=add)
        return add_to

    return rows


_posterior_marginals = windowed_rows(core.posterior_marginals)
_predictive = windowed_rows(core.predictive_log_likelihoods)


#: Padding new data with empty segments (``KeypointSLDS._pad_segments``) saves compiling the
#: states-only programs again (~5 s on 2 CPU cores) and costs ~20 us per padded frame and sweep
#: (0.24 s per full sweep of 4 x 3030 frames): worth it up to about this many frame-sweeps.
PAD_FRAME_SWEEPS = 250_000

#: The per-segment fields of a chain state (the rest are parameters).
_SEGMENT_FIELDS = ("x", "z", "h", "v", "s")


def _first_segments(state, n):
    """``state`` with its per-segment arrays cut to the first ``n`` segments (see ``_pad_segments``)."""
    if state.x.shape[0] == n:
        return state
    return state._replace(**{f: getattr(state, f)[:n] for f in _SEGMENT_FIELDS})


class _Kernels(NamedTuple):
    """The model's jitted core functions (module level, so nothing jitted is cached on an
    estimator). A subclass for a variant of the model supplies its own."""

    step: Callable  # (key, state, data, hypers, *, switches) -> (state, info)
    init_state: Callable  # (key, x0, h0, v0, data, hypers, Cd, *, num_states, reference_compat)
    init_given_params: Callable  # (key, x0, h0, v0, data, hypers, params, *, reference_compat)
    posterior_marginals: Callable  # (state, data, add_to=None) -> (B, T-L, S) (``windowed_rows``)
    predictive: Callable  # (state, data) -> (B, T-L)


class KeypointSLDS(GibbsEstimator):
    """keypoint-MoSeq: a switching linear dynamical system on keypoints, fitted by Gibbs sampling.

    Keypoints are explained by a low-dimensional latent pose x following a
    sticky HDP AR-HMM (the syllables), rotated by a heading h and shifted by a
    centroid v, with per-point noise scales s whose prior comes from the
    tracker's confidences (model spec section 4). ``fit`` runs the standard
    recipe: ``n_ar_iter`` AR-only sweeps with stickiness ``ar_kappa`` on the
    PCA-initialised trajectory, then ``n_iter`` sweeps of the full model with
    ``kappa``, one chain. ``partial_fit`` continues the full model.

    Parameters
    ----------
    n_states : int, default=100
        Truncation level S of the HDP (maximum number of syllables).
    latent_dim : int or None, default=None
        Dimension P of the latent pose. ``None`` keeps the fewest principal
        components explaining more than 90% of the variance, at most 10
        (see ``latent_dim_``).
    n_lags : int, default=3
        Autoregressive order L.
    kappa, ar_kappa : float, default=1e4, 1e6
        Stickiness of the full model and of the AR-only stage.
    n_ar_iter, n_iter : int, default=50, 500
        Sweeps of the AR-only stage (first fit only) and of the full model.
    alpha, gamma : float, default=5.7, 1e3
        Transition and global-weight concentrations.
    S_0_scale, K_0_scale : float, default=0.01, 10.0
        AR prior scales (spec 2.6).
    keypoints : list of str or None
        Keypoints to use, in this order (default: all).
    anterior_keypoints, posterior_keypoints : list of str or int, or None
        Keypoints whose mean defines the front and back of the body for the
        initial heading. Default: the first and the last keypoint used.
    n_dims : int or None
        Spatial dimension D (2 or 3) of a 2D ``X`` of shape (n_frames, K * D),
        keypoint-major. Required on that path; ignored for pose Datasets.
    conf_threshold : float, default=0.5
        Points below it are interpolated in the copy used for PCA and the initial
        alignment.
    conf_pseudocount : float, default=1e-3
        Added to every confidence.
    noise_slope, noise_intercept : float, default=-0.5, 0.25
        Error-estimator line mapping confidence to the noise prior s0 (spec 2.1).
    sigmasq_loc : float or None
        Centroid random-walk variance per frame; ``None`` estimates it from the
        data (spec 2.6, ``sigmasq_loc_``).
    nu_s, nu_sigma, sigmasq_0 : float, default=5, 1e5, 0.1
        Noise priors (spec 4.5-4.6).
    fix_heading : bool, default=False
        Keep the heading at 0 both at initialisation and during sampling.
    resample_global_noise_scale : bool, default=False
        Also resample the per-keypoint scales sigmasq (the reference keeps them at 1).
    reference_compat : bool, default=False
        Use the reference's hard-coded 3 coordinates per keypoint in the s and
        sigmasq updates instead of D (spec 4.5-4.6).
    added_noise_level : float, default=0.1
        Half-width of the uniform jitter added once to the coordinates (spec 1.8).
    outlier_scale_factor : float or None, default=6.0
        Points farther than median + factor * MAD from their frame's keypoint
        median are interpolated and get confidence 0; ``None`` skips this.
    jitter : float, default=1e-3
        Added to the backward-sampling covariance of the latent pose (serial sampler).
    parallel_message_passing : bool or None
        Associative-scan Kalman samplers; ``None`` uses them off the CPU only.
    n_apply_iter : int, default=100
        States-only sweeps on new data for ``predict``/``transform``/``score``.
    n_marginal_samples : int, default=10
        Latent trajectories averaged by ``predict_proba`` (spec 8).
    seg_length : int or None
        Segment length (default chosen from the recording lengths, spec 1.5).
    random_state : int, RandomState instance or None
    verbose : bool, default=False
        Progress bars.

    Attributes
    ----------
    latent_dim_ : int
    explained_variance_ratio_ : ndarray of shape (n_pca_components,)
    emission_ : ndarray of shape ((K-1) * D, latent_dim_ + 1)
        [C | d] of the whitened PCA emission, fixed during fitting.
    sigmasq_loc_ : float
    keypoints_ : list of str
    n_features_in_ : int
    n_iter_ : int
        Sweeps run so far, both stages.
    log_likelihood_terms_ : dict of str -> ndarray of shape (n_iter_,)
        "z", "x", "Y", "s", "v" per sweep (spec 6), plus "n_used" (syllables used) and
        "nan_retries" (retries of a sweep that gave non-finite values).
    nan_stop_ : dict or None
        Set when a sweep stayed non-finite after its retries: iteration, stage,
        retries, jitter and the non-finite arrays; the model is the last finite one.
    log_likelihood_history_ : ndarray of shape (n_iter_,)
        Their sum.
    stage_history_ : ndarray of str, shape (n_iter_,)
        "ar_only" or "full" per sweep.
    syllable_order_, syllable_frequencies_, betas_, transition_matrix_,
    ar_coefficients_, ar_covariances_, noise_scales_ : ndarray
        Relabelled by frequency (0 = most used).
    chain_state_ : KeypointState
        The chain's last state (NumPy arrays, raw labels).

    Examples
    --------
    >>> from kpms_estimators import KeypointSLDS
    >>> from kpms_estimators.datasets import simulate_keypoints
    >>> sim = simulate_keypoints(n_recordings=2, n_frames=300, random_state=0)
    >>> model = KeypointSLDS(n_states=10, n_ar_iter=5, n_iter=5, n_apply_iter=5,
    ...                      random_state=0).fit(sim.poses)
    >>> sorted(model.predict(sim.poses))
    ['rec0', 'rec1']
    """

    _likelihood_terms = ("z", "x", "Y", "s", "v")
    _kernels = _Kernels(_step, _init_state, _init_given_params, _posterior_marginals, _predictive)

    def __init__(
        self,
        n_states=100,
        latent_dim=None,
        n_lags=3,
        kappa=1e4,
        ar_kappa=1e6,
        n_ar_iter=50,
        n_iter=500,
        alpha=5.7,
        gamma=1e3,
        S_0_scale=0.01,
        K_0_scale=10.0,
        keypoints=None,
        anterior_keypoints=None,
        posterior_keypoints=None,
        n_dims=None,
        conf_threshold=0.5,
        conf_pseudocount=1e-3,
        noise_slope=-0.5,
        noise_intercept=0.25,
        sigmasq_loc=None,
        nu_s=5.0,
        nu_sigma=1e5,
        sigmasq_0=0.1,
        fix_heading=False,
        resample_global_noise_scale=False,
        reference_compat=False,
        added_noise_level=0.1,
        outlier_scale_factor=6.0,
        jitter=1e-3,
        parallel_message_passing=None,
        n_apply_iter=100,
        n_marginal_samples=10,
        seg_length=None,
        random_state=None,
        verbose=False,
    ):
        self.n_states = n_states
        self.latent_dim = latent_dim
        self.n_lags = n_lags
        self.kappa = kappa
        self.ar_kappa = ar_kappa
        self.n_ar_iter = n_ar_iter
        self.n_iter = n_iter
        self.alpha = alpha
        self.gamma = gamma
        self.S_0_scale = S_0_scale
        self.K_0_scale = K_0_scale
        self.keypoints = keypoints
        self.anterior_keypoints = anterior_keypoints
        self.posterior_keypoints = posterior_keypoints
        self.n_dims = n_dims
        self.conf_threshold = conf_threshold
        self.conf_pseudocount = conf_pseudocount
        self.noise_slope = noise_slope
        self.noise_intercept = noise_intercept
        self.sigmasq_loc = sigmasq_loc
        self.nu_s = nu_s
        self.nu_sigma = nu_sigma
        self.sigmasq_0 = sigmasq_0
        self.fix_heading = fix_heading
        self.resample_global_noise_scale = resample_global_noise_scale
        self.reference_compat = reference_compat
        self.added_noise_level = added_noise_level
        self.outlier_scale_factor = outlier_scale_factor
        self.jitter = jitter
        self.parallel_message_passing = parallel_message_passing
        self.n_apply_iter = n_apply_iter
        self.n_marginal_samples = n_marginal_samples
        self.seg_length = seg_length
        self.random_state = random_state
        self.verbose = verbose

    # -- input ------------------------------------------------------------
    def _min_frames(self) -> int:
        return int(self.n_lags) + _data.MIN_FRAGMENT_LENGTH

    def _keypoint_selection(self):
        return self.keypoints

    def _recordings(self, X, sequence_ids, *, reset):
        recordings = super()._recordings(X, sequence_ids, reset=reset)
        if recordings.kind == "features":
            recordings = self._features_as_poses(recordings)
        self._check_keypoints(recordings, reset)
        if self.outlier_scale_factor is not None:
            recordings, _ = _init.remove_outliers(recordings, float(self.outlier_scale_factor))
        return recordings

    def _features_as_poses(self, recordings):
        if self.n_dims not in (2, 3):
            raise ValueError(
                f"A 2D X of shape (n_frames, n_keypoints * n_dims) needs n_dims=2 or 3; got n_dims={self.n_dims!r}."
            )
        n_features = recordings.arrays[0].shape[1]
        if n_features % self.n_dims:
            raise ValueError(
                f"X has {n_features} features (n_features = {n_features}), which is not a multiple of n_dims={self.n_dims} "
                "(expected n_keypoints * n_dims columns, keypoint-major)."
            )
        n_kp = n_features // self.n_dims
        arrays = tuple(a.reshape(len(a), n_kp, self.n_dims) for a in recordings.arrays)
        names = tuple(f"kp{k}" for k in range(n_kp))
        return dataclasses.replace(recordings, arrays=arrays, keypoints=names, space=("x", "y", "z")[: self.n_dims])

    def _check_keypoints(self, recordings, reset):
        n_kp, n_dims = recordings.arrays[0].shape[1:]
        if n_kp < 2:
            raise ValueError(f"KeypointSLDS needs at least 2 keypoints; the data have {n_kp} ({list(recordings.keypoints)}).")
        if n_dims not in (2, 3):
            raise ValueError(f"Keypoints must be 2D or 3D; the data have D={n_dims} spatial dimensions.")
        if reset:
            self.keypoints_ = list(recordings.keypoints)
            self._anterior_ = self._keypoint_positions(self.anterior_keypoints, recordings.keypoints, 0, "anterior")
            self._posterior_ = self._keypoint_positions(self.posterior_keypoints, recordings.keypoints, n_kp - 1, "posterior")
        elif list(recordings.keypoints) != self.keypoints_ and recordings.kind != "features":
            raise ValueError(f"Keypoints {list(recordings.keypoints)} differ from the fitted ones {self.keypoints_}.")

    @staticmethod
    def _keypoint_positions(selection, names, default, what):
        if selection is None:
            return np.array([default])
        selection = [selection] if isinstance(selection, (str, int, np.integer)) else list(selection)
        if len(selection) == 0:
            raise ValueError(f"{what}_keypoints is empty.")
        out = []
        for item in selection:
            if isinstance(item, (int, np.integer)):
                if not 0 <= item < len(names):
                    raise ValueError(f"{what}_keypoints index {item} is out of range for {len(names)} keypoints.")
                out.append(int(item))
            elif item in names:
                out.append(list(names).index(item))
            else:
                raise ValueError(f"{what}_keypoints entry {item!r} is not among the keypoints used: {list(names)}.")
        return np.array(out)

    def _core_data(self, recordings, batch) -> core.KeypointData:
        Y, conf = _init.formatted_arrays(batch, self.added_noise_level, self.conf_pseudocount)
        s0 = _init.noise_prior(conf, self.noise_slope, self.noise_intercept)
        gamma = centring_embedding(Y.shape[2])
        return core.KeypointData(
            jnp.asarray(Y), jnp.asarray(conf), jnp.asarray(batch.mask, Y.dtype), jnp.asarray(s0), jnp.asarray(gamma)
        )

    def _hypers(self, data, kappa=None) -> core.KeypointHypers:
        self._check_hyperparameters(data)
        dtype = data.Y.dtype
        latent_dim = self.latent_dim_ if hasattr(self, "latent_dim_") else 1
        arhmm = ar_core.ARHMMHypers(
            alpha=jnp.asarray(self.alpha, dtype),
            gamma=jnp.asarray(self.gamma, dtype),
            kappa=jnp.asarray(self.kappa if kappa is None else kappa, dtype),
            ar=make_ar_prior(latent_dim, int(self.n_lags), self.S_0_scale, self.K_0_scale, dtype),
        )
        sigmasq_loc = getattr(self, "sigmasq_loc_", 1.0)
        return core.KeypointHypers(
            arhmm,
            nu_s=jnp.asarray(self.nu_s, dtype),
            nu_sigma=jnp.asarray(self.nu_sigma, dtype),
            sigmasq_0=jnp.asarray(self.sigmasq_0, dtype),
            sigmasq_loc=jnp.asarray(sigmasq_loc, dtype),
            jitter=jnp.asarray(self.jitter, dtype),
        )

    def _check_hyperparameters(self, data):
        self._check_numbers(
            integers=("n_states", "n_lags", "n_iter", "n_marginal_samples"), counts=("n_ar_iter", "n_apply_iter"),
            positive=("alpha", "gamma", "S_0_scale", "K_0_scale", "nu_s", "nu_sigma", "sigmasq_0"),
            nonnegative=("kappa", "ar_kappa", "jitter", "added_noise_level", "conf_pseudocount"),
        )
        if self.sigmasq_loc is not None and not (np.isfinite(self.sigmasq_loc) and self.sigmasq_loc > 0):
            raise ValueError(f"sigmasq_loc must be None or a positive number, got {self.sigmasq_loc!r}")
        n_kp, n_dims = data.Y.shape[2:]
        max_dim = (n_kp - 1) * n_dims
        if self.latent_dim is not None and not (
            isinstance(self.latent_dim, (int, np.integer)) and 1 <= self.latent_dim <= max_dim
        ):
            raise ValueError(
                f"latent_dim must be an integer between 1 and (K-1)*D = {max_dim} for {n_kp} keypoints in "
                f"{n_dims}D, got {self.latent_dim!r}."
            )

    def _switches(self, **overrides) -> core.Switches:
        parallel = self.parallel_message_passing
        if parallel is None:
            parallel = jax.default_backend() != "cpu"
        settings = dict(
            fix_heading=bool(self.fix_heading),
            resample_global_noise_scale=bool(self.resample_global_noise_scale),
            parallel_message_passing=bool(parallel),
            reference_compat=bool(self.reference_compat),
        )
        settings.update(overrides)
        return core.Switches(**settings)

    # -- initialisation ---------------------------------------------------
    def _starting_pose(self, data):
        """(x0 or None, h0, v0, embedded pose) from the confidence-interpolated copy (spec 2.2)."""
        Y, conf = np.asarray(data.Y), np.asarray(data.conf)
        Yi = _init.interpolate_low_confidence(Y, conf, self.conf_threshold, raw=Y)
        h0, v0 = _init.heading_and_centroid(Yi, self._anterior_, self._posterior_, bool(self.fix_heading))
        return h0, v0, _init.embed(Yi, h0, v0)

    def _init_chain(self, key, data, pca=None):
        """Initial chain state (spec 2); ``pca``: a fitted sklearn PCA to use instead of fitting one."""
        self._check_hyperparameters(data)
        h0, v0, flat = self._starting_pose(data)
        mask, conf = np.asarray(data.mask), np.asarray(data.conf)
        if pca is None:
            emission = _init.fit_emission(flat, mask, conf, self.conf_threshold, self.latent_dim)
        else:
            emission = _init.emission_from_pca(pca, flat, mask, self.latent_dim)
        self.latent_dim_ = emission.latent_dim
        self._segments_ = np.asarray(data.Y.shape[:2], dtype=np.int64)  # (B, T): see ``_pad_segments``
        self.explained_variance_ratio_ = emission.explained_variance_ratio
        self.emission_ = emission.Cd
        self.sigmasq_loc_ = (
            float(self.sigmasq_loc) if self.sigmasq_loc is not None else _init.estimate_sigmasq_loc(np.asarray(data.Y), mask)
        )
        # now with the chosen latent_dim and sigmasq_loc; the first stage's stickiness, as the
        # reference initialises with the config's kappa before the AR-only stage
        hypers = self._hypers(data, kappa=self.ar_kappa if self.n_ar_iter > 0 else None)
        x0 = _init.project(flat, emission.Cd)
        return self._kernels.init_state(
            key, jnp.asarray(x0), jnp.asarray(h0), jnp.asarray(v0), data, hypers, jnp.asarray(emission.Cd),
            num_states=int(self.n_states), reference_compat=bool(self.reference_compat),
        )

    def _init_states(self, key, chain, data):
        n_real = data.Y.shape[0]
        data = self._pad_segments(data)
        hypers = self._hypers(data)
        h0, v0, flat = self._starting_pose(data)
        x0 = _init.project(flat, np.asarray(chain.params.Cd))
        params = jax.tree_util.tree_map(jnp.asarray, chain.params)
        state = self._kernels.init_given_params(
            key, jnp.asarray(x0), jnp.asarray(h0), jnp.asarray(v0), data, hypers, params,
            reference_compat=bool(self.reference_compat),
        )
        return _first_segments(state, n_real)

    def _pad_segments(self, data, state=None, n_sweeps=1):
        """``data`` (and ``state``) with fully masked copies of segment 0 appended, up to the
        segment count of the fitting data when there are fewer segments of the same length.

        States-only sweeps on new data then run the programs compiled during fitting
        instead of compiling all of them again for a new shape; the extra segments
        carry no data (mask 0) and are dropped again by ``_first_segments``. Done only
        while the extra work of ``n_sweeps`` sweeps stays below what the compilation
        costs (``PAD_FRAME_SWEEPS``).
        """
        fitted = getattr(self, "_segments_", None)
        n_real, n_frames = data.Y.shape[:2]
        if (fitted is None or n_frames != int(fitted[1]) or n_real >= int(fitted[0])
                or (int(fitted[0]) - n_real) * n_frames * n_sweeps > PAD_FRAME_SWEEPS):
            return data if state is None else (data, state)
        index = np.concatenate([np.arange(n_real), np.zeros(int(fitted[0]) - n_real, dtype=np.int64)])
        real = jnp.asarray(np.arange(len(index)) < n_real)

        def take(arr):
            return jnp.asarray(np.asarray(arr)[index])

        data = data._replace(Y=take(data.Y), conf=take(data.conf), s0=take(data.s0),
                             mask=take(data.mask) * real[:, None].astype(data.mask.dtype))
        if state is None:
            return data
        return data, state._replace(**{f: take(getattr(state, f)) for f in _SEGMENT_FIELDS})

    def _schedule(self, first, data):
        stages = []
        if first and self.n_ar_iter > 0:
            ar_only = functools.partial(self._kernels.step, switches=self._switches(ar_only=True))
            stages.append(("ar_only", int(self.n_ar_iter), ar_only, self._hypers(data, kappa=self.ar_kappa)))
        full = functools.partial(self._kernels.step, switches=self._switches())
        stages.append(("full", int(self.n_iter), full, self._hypers(data)))
        return stages

    # -- fitted attributes ------------------------------------------------
    def _set_fitted_attributes(self, recordings, batch):
        self._set_syllable_attributes(batch)
        params = self.chain_state_.params
        self.noise_scales_ = params.sigmasq
        self.emission_ = params.Cd

    # -- inference ----------------------------------------------------------
    def _apply(self, X, sequence_ids, n_samples: int = 0):
        """States for X under the fitted parameters (spec 7), and optionally averaged marginals (spec 8).

        On the training data the chain's current states are the starting point;
        other data get fresh states and ``n_apply_iter`` states-only sweeps. Then
        ``n_samples`` more sweeps, averaging the forward-backward marginals of z
        given each sampled latent trajectory. The fitted chain is not modified.
        """
        self._check_fitted()
        recordings = self._recordings(X, sequence_ids, reset=False)
        batch = self._batch(recordings)
        with float64():
            data = self._core_data(recordings, batch)
            hypers = self._hypers(data)
            key = jax.random.fold_in(jax.random.wrap_key_data(self.rng_key_), 1)
            if _fingerprint(batch) == self._fingerprint_:
                state, n_burn = jax.tree_util.tree_map(jnp.asarray, self.chain_state_), 0
            else:
                key, init_key = jax.random.split(key)
                state, n_burn = self._init_states(init_key, self.chain_state_, data), int(self.n_apply_iter)
            state, marginals = self._sample_states(key, state, data, hypers, n_burn, n_samples)
            state = jax.tree_util.tree_map(np.asarray, state)
            log_pred = np.asarray(self._kernels.predictive(state, data))
        return recordings, batch, state, marginals, log_pred

    def _sample_states(self, key, state, data, hypers, n_burn, n_samples, steps_per_sample=1):
        """States-only sweeps (parameters fixed): ``n_burn``, then ``n_samples`` x ``steps_per_sample``,
        averaging p(z | x, params) after every ``steps_per_sample``-th sweep (spec 7-8).

        Returns the final state and the averaged marginals (B, T-L, S), or None
        when ``n_samples`` is 0.
        """
        n_real = data.Y.shape[0]
        data, state = self._pad_segments(data, state, n_burn + n_samples * steps_per_sample)
        step = functools.partial(self._kernels.step, switches=self._switches(states_only=True))
        total = None
        for i in range(n_burn + n_samples * steps_per_sample):
            key, step_key = jax.random.split(key)
            state, _ = step(step_key, state, data, hypers)
            if i >= n_burn and (i - n_burn) % steps_per_sample == 0:
                if total is None:  # summed in place, window by window (no batch-sized temporaries)
                    num_segments, num_frames = data.mask.shape
                    total = np.zeros((num_segments, num_frames - int(self.n_lags), state.params.pi.shape[0]),
                                     state.x.dtype)
                total = self._kernels.posterior_marginals(state, data, add_to=total)
        marginals = None if total is None else np.asarray(total)[:n_real] / n_samples
        return _first_segments(state, n_real), marginals

    def _unbatch_labels(self, batch, values):
        return _data.unbatch(batch, values, offset=int(self.n_lags))

    def _output(self, recordings, variables: dict):
        """Per-frame results: rows of X on the 2D path, per-recording Datasets on the pose path."""
        dims = {"syllable": (), "latent_state": ("latent_dim",), "centroid": ("space",), "heading": (),
                "syllable_proba": ("syllable",)}
        out = {}
        for r, (rec, times) in enumerate(zip(recordings.names, recordings.times)):
            data_vars = {name: (("time",) + dims[name], arrs[r]) for name, arrs in variables.items()}
            coords = {"time": times}
            if "centroid" in variables:
                coords["space"] = list(recordings.space)
            out[rec] = xr.Dataset(data_vars, coords=coords)
        return out

    def _results(self, recordings, batch, state):
        rank = np.argsort(self.syllable_order_)
        return {
            "syllable": [rank[z] for z in self._unbatch_labels(batch, state.z)],
            "latent_state": _data.unbatch(batch, state.x),
            "centroid": _data.unbatch(batch, state.v),
            "heading": _data.unbatch(batch, state.h),
        }

    def transform(self, X, *, sequence_ids=None):
        """Per-frame results under the fitted parameters (spec 7).

        Returns
        -------
        On the 2D path the latent state, float64 of shape (n_frames, latent_dim_);
        on the pose path a dict ``{recording: xarray.Dataset}`` with ``syllable``,
        ``latent_state``, ``centroid`` and ``heading`` over ``time``.
        """
        recordings, batch, state, _, _ = self._apply(X, sequence_ids)
        results = self._results(recordings, batch, state)
        if recordings.kind == "features":
            return _data.to_rows(recordings, [a.astype(np.float64) for a in results["latent_state"]])
        return self._output(recordings, results)

    def predict(self, X, *, sequence_ids=None):
        """Syllable of each frame from the final sample (0 = most used); first n_lags frames edge-padded."""
        recordings, batch, state, _, _ = self._apply(X, sequence_ids)
        labels = self._results(recordings, batch, state)["syllable"]
        if recordings.kind == "features":
            return _data.to_rows(recordings, labels)
        return {rec: lab for rec, lab in zip(recordings.names, labels)}

    def predict_proba(self, X, *, sequence_ids=None):
        """Syllable marginals averaged over ``n_marginal_samples`` sampled latent trajectories (spec 8).

        Returns (n_frames, n_states) on the 2D path (columns in relabelled order),
        or ``{recording: Dataset}`` with ``syllable_proba`` (time, syllable).
        """
        recordings, batch, _, marginals, _ = self._apply(X, sequence_ids, n_samples=int(self.n_marginal_samples))
        per_rec = [m[:, self.syllable_order_] for m in self._unbatch_labels(batch, marginals)]
        if recordings.kind == "features":
            return _data.to_rows(recordings, per_rec)
        return self._output(recordings, {"syllable_proba": per_rec})

    def score(self, X, y=None, *, sequence_ids=None):
        """Mean per-frame log p(x_t | x_{<t}) of the inferred latent trajectory (spec 9), larger is better."""
        recordings, batch, _, _, log_pred = self._apply(X, sequence_ids)
        per_rec = self._unbatch_labels(batch, log_pred)
        total = sum(float(np.sum(a[self.n_lags :])) for a in per_rec)
        return total / sum(len(a) - self.n_lags for a in per_rec)
