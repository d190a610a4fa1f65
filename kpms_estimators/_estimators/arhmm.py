"""The ``ARHMM`` estimator: a sticky HDP autoregressive HMM on a given trajectory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from .. import _data
from .._core import arhmm as core
from .._core.autoregressive import make_ar_prior
from ._base import GibbsEstimator, compiled, float64

#: The (beta, pi, Ab, Q) draw given the statistics: the keypoint SLDS uses the same compiled program.
params_given_stats = compiled(core.sample_params_given_stats)
_PARTS = core.SweepParts(
    param_stats=compiled(core.param_stats, static_argnums=(3, 4)),
    params_given_stats=params_given_stats,
    labels=compiled(core.sample_labels),
)
_posterior_marginals = compiled(core.posterior_marginals)
_predictive_log_likelihoods = compiled(core.predictive_log_likelihoods)


def _gibbs_step(key, state, data, hypers):
    """``core.gibbs_step`` from the separately compiled parts (no host round trip between them)."""
    return core.sweep(key, state, data, hypers, _PARTS)


def _init_state(key, data, hypers, num_states):
    return core.init_state(key, data, hypers, num_states, parts=_PARTS)


def _resample_z(key, chain, data):
    """New labels for other data given the chain's parameters (the sweep's labels program)."""
    z, _ = _PARTS.labels(key, chain.params, data)
    return core.ARHMMState(chain.params, z)


class ARHMM(GibbsEstimator):
    """Sticky HDP autoregressive hidden Markov model fitted by Gibbs sampling.

    Each frame t >= n_lags of a recording has a discrete state ("syllable") z_t
    following a sticky Markov chain, and ``x_t ~ N(A_z [x_{t-L}; ...; x_{t-1}] + b_z, Q_z)``.
    The number of states used is learned through the weak-limit hierarchical
    Dirichlet process prior (``n_states`` is its truncation). The features are
    taken as they are; like keypoint-MoSeq's latent pose (whitened principal
    components), they should be roughly unit-scale, since ``S_0_scale`` and
    ``K_0_scale`` set the prior in those units.

    Parameters
    ----------
    n_states : int, default=100
        Truncation level S of the HDP (maximum number of syllables).
    n_lags : int, default=3
        Autoregressive order L.
    kappa : float, default=1e6
        Stickiness: extra prior weight on self-transitions.
    alpha : float, default=5.7
        Concentration of each transition row around the global weights.
    gamma : float, default=1e3
        Concentration of the global state weights.
    n_iter : int, default=50
        Gibbs sweeps per call to ``fit`` or ``partial_fit``.
    S_0_scale : float, default=0.01
        Scale of the inverse-Wishart prior on the AR noise, ``S_0 = S_0_scale * I``.
    K_0_scale : float, default=10.0
        Column covariance scale of the matrix-normal prior on ``[A | b]``.
    seg_length : int or None, default=None
        Frames per batched segment (plus a 30-frame overlap); ``None`` chooses
        it from the recording lengths (model spec section 1).
    random_state : int, RandomState instance or None, default=None
        Seed of the chain. ``fit`` draws one seed from it; ``predict`` and
        friends are deterministic.
    verbose : bool, default=False
        Show a progress bar with the log-likelihood and number of states used.

    Attributes
    ----------
    n_features_in_ : int
        Dimension P of the trajectory.
    n_iter_ : int
        Gibbs sweeps run so far, over all ``fit``/``partial_fit`` calls.
    log_likelihood_history_ : ndarray of shape (n_iter_,)
        Log-likelihood ("z" + "x" terms) after each sweep.
    log_likelihood_terms_ : dict of str -> ndarray of shape (n_iter_,)
        Per-term log-likelihoods per sweep: "z" (transitions), "x" (AR
        emissions), "marginal" (x with z summed out), "n_used" (states used),
        "nan_retries" (retries of the sweep after non-finite values, normally 0).
    nan_stop_ : dict or None
        None, or why the last call stopped early: a sweep stayed non-finite
        after its retries (``iteration``, ``stage``, ``retries``, ``nonfinite``
        = ``{array: [non-finite entries, entries]}``); the fitted state is then
        the last finite one.
    syllable_order_ : ndarray of shape (n_states,)
        ``syllable_order_[label]`` is the chain's internal state shown as
        ``label``; labels are sorted by training frequency, 0 most used.
    syllable_frequencies_ : ndarray of shape (n_states,)
        Fraction of labelled training frames in each syllable, by label.
    betas_ : ndarray of shape (n_states,)
    transition_matrix_ : ndarray of shape (n_states, n_states)
    ar_coefficients_ : ndarray of shape (n_states, P, n_lags * P + 1)
        ``[A_k | b_k]`` with lag blocks oldest first.
    ar_covariances_ : ndarray of shape (n_states, P, P)
        All indexed by syllable label.
    chain_state_ : ARHMMState
        The raw chain (internal state order) that ``partial_fit`` continues.
    rng_key_ : ndarray of shape (2,) uint32
        The chain's PRNG key data.

    Notes
    -----
    The first ``n_lags`` frames of each recording only serve as lags and have no
    label of their own: ``predict``, ``predict_proba`` and ``transform`` give them
    the values of frame ``n_lags`` (edge padding, as keypoint-MoSeq does), and
    ``score_samples`` gives them 0.

    Examples
    --------
    >>> from kpms_estimators import ARHMM
    >>> from kpms_estimators.datasets import simulate_arhmm
    >>> sim = simulate_arhmm(n_recordings=2, n_frames=300, random_state=0)
    >>> model = ARHMM(n_states=10, n_iter=5, random_state=0)
    >>> labels = model.fit(sim.X, sequence_ids=sim.sequence_ids).predict(
    ...     sim.X, sequence_ids=sim.sequence_ids)
    >>> labels.shape
    (600,)
    """

    _likelihood_terms = ("z", "x")
    _gibbs_step = staticmethod(_gibbs_step)

    def __init__(
        self,
        n_states=100,
        n_lags=3,
        kappa=1e6,
        alpha=5.7,
        gamma=1e3,
        n_iter=50,
        S_0_scale=0.01,
        K_0_scale=10.0,
        seg_length=None,
        random_state=None,
        verbose=False,
    ):
        self.n_states = n_states
        self.n_lags = n_lags
        self.kappa = kappa
        self.alpha = alpha
        self.gamma = gamma
        self.n_iter = n_iter
        self.S_0_scale = S_0_scale
        self.K_0_scale = K_0_scale
        self.seg_length = seg_length
        self.random_state = random_state
        self.verbose = verbose

    # -- hooks ------------------------------------------------------------
    def _min_frames(self) -> int:
        return int(self.n_lags) + _data.MIN_FRAGMENT_LENGTH

    def _core_data(self, recordings, batch) -> core.ARHMMData:
        values = batch.values.reshape(batch.values.shape[:2] + (-1,))
        return core.ARHMMData(jnp.asarray(values), jnp.asarray(batch.mask, values.dtype))

    def _hypers(self, data) -> core.ARHMMHypers:
        self._check_hyperparameters()
        dtype = data.x.dtype
        return core.ARHMMHypers(
            alpha=jnp.asarray(self.alpha, dtype),
            gamma=jnp.asarray(self.gamma, dtype),
            kappa=jnp.asarray(self.kappa, dtype),
            ar=make_ar_prior(data.x.shape[-1], int(self.n_lags), self.S_0_scale, self.K_0_scale, dtype),
        )

    def _check_hyperparameters(self):
        self._check_numbers(integers=("n_states", "n_lags", "n_iter"),
                            positive=("alpha", "gamma", "S_0_scale", "K_0_scale"), nonnegative=("kappa",))

    def _init_chain(self, key, data):
        return _init_state(key, data, self._hypers(data), int(self.n_states))

    def _init_states(self, key, chain, data):
        return _resample_z(key, chain, data)

    def _set_fitted_attributes(self, recordings, batch):
        self._set_syllable_attributes(batch)

    # -- inference ----------------------------------------------------------
    def _per_frame(self, X, sequence_ids, compute, fill_lags=None):
        """Run ``compute(data, params) -> (B, T-L, ...)`` and map it back to the input frames."""
        self._check_fitted()
        recordings = self._recordings(X, sequence_ids, reset=False)
        batch = self._batch(recordings)
        with float64():
            data = self._core_data(recordings, batch)
            values = np.asarray(compute(data, self.chain_state_.params))
        per_recording = _data.unbatch(batch, values, offset=int(self.n_lags))
        if fill_lags is not None:
            for arr in per_recording:
                arr[: self.n_lags] = fill_lags
        return recordings, per_recording

    def _output(self, recordings, per_recording, name, extra_dims=()):
        if recordings.kind == "features":
            return _data.to_rows(recordings, per_recording)
        return {
            rec: xr.Dataset(
                {name: (("time",) + extra_dims, arr)}, coords={"time": times}
            )
            for rec, arr, times in zip(recordings.names, per_recording, recordings.times)
        }

    def predict_proba(self, X, *, sequence_ids=None):
        """Exact posterior syllable marginals p(z_t | x) given the fitted parameters.

        Returns
        -------
        ndarray of shape (n_frames, n_states), or on the pose path a dict of
        per-recording Datasets with ``syllable_proba`` (time, syllable).
        """
        recordings, per_recording = self._per_frame(X, sequence_ids, _posterior_marginals)
        per_recording = [arr[:, self.syllable_order_].astype(np.float64) for arr in per_recording]
        return self._output(recordings, per_recording, "syllable_proba", ("syllable",))

    def transform(self, X, *, sequence_ids=None):
        """Per-frame syllable marginals as features (same as ``predict_proba``)."""
        return self.predict_proba(X, sequence_ids=sequence_ids)

    def predict(self, X, *, sequence_ids=None):
        """Most probable syllable of each frame (argmax of the exact marginals), 0 = most used."""
        recordings, per_recording = self._per_frame(X, sequence_ids, _posterior_marginals)
        rank = np.argsort(self.syllable_order_)
        labels = [rank[np.argmax(arr, axis=-1)] for arr in per_recording]
        return self._output(recordings, labels, "syllable")

    def score_samples(self, X, *, sequence_ids=None):
        """Per-frame predictive log-likelihood log p(x_t | x_{<t}) under the fitted model.

        The first ``n_lags`` frames of each recording get 0. Returns float64 of
        shape (n_frames,) (or per-recording Datasets on the pose path).
        """
        recordings, per_recording = self._per_frame(
            X, sequence_ids, _predictive_log_likelihoods, fill_lags=0.0
        )
        return self._output(recordings, [a.astype(np.float64) for a in per_recording], "log_likelihood")

    def score(self, X, y=None, *, sequence_ids=None):
        """Mean log-likelihood per labelled frame (larger is better)."""
        recordings, per_recording = self._per_frame(
            X, sequence_ids, _predictive_log_likelihoods, fill_lags=0.0
        )
        total = sum(float(np.sum(a)) for a in per_recording)
        n_frames = sum(len(a) - self.n_lags for a in per_recording)
        return total / n_frames
