"""The ``AlloKeypointSLDS`` estimator: keypoint-MoSeq's location-aware model (model spec 5)."""

from __future__ import annotations

import jax.numpy as jnp

from .._core import allo
from ._base import REDUCTION_OPTIONS, compiled
from .keypoint_slds import _PARTS as _KEYPOINT_PARTS
from .keypoint_slds import KeypointSLDS, _Kernels, windowed_emission, windowed_labels, windowed_rows

_PARTS = allo.SweepParts(
    allo_params=compiled(allo.redraw_allo_params),
    labels=windowed_labels(allo.sample_labels),
    emission=windowed_emission(allo.sample_emission, allo.emission_after_x),
    info=compiled(allo.sweep_info, options=REDUCTION_OPTIONS),
)


def _step(key, state, data, hypers, *, switches):
    """``allo.gibbs_step`` from separately compiled parts, the AR parameter draw being KeypointSLDS's."""
    return allo.sweep(key, state, data, hypers, switches, _PARTS, _KEYPOINT_PARTS)


def _init_state(key, x0, h0, v0, data, hypers, Cd, *, num_states, reference_compat):
    return allo.init_state(key, x0, h0, v0, data, hypers, Cd, num_states, reference_compat, _PARTS, _KEYPOINT_PARTS)


def _init_given_params(key, x0, h0, v0, data, hypers, params, *, reference_compat):
    return allo.init_states_given_params(key, x0, h0, v0, data, hypers, params, reference_compat, _PARTS,
                                         _KEYPOINT_PARTS)


_KERNELS = _Kernels(
    step=_step,
    init_state=_init_state,
    init_given_params=_init_given_params,
    posterior_marginals=windowed_rows(allo.posterior_marginals),
    predictive=windowed_rows(allo.predictive_log_likelihoods),
)

_ALLO_PRIOR = ("alpha0_h", "beta0_h", "lambda0_h", "alpha0_v", "beta0_v", "lambda0_v")


class AlloKeypointSLDS(KeypointSLDS):
    """Location-aware keypoint-MoSeq: syllables also drive heading change and egocentric velocity.

    The keypoint SLDS of :class:`KeypointSLDS`, in which every syllable k also has
    its own heading change per frame (mean ``delta_h[k]``, variance
    ``sigmasq_h[k]``) and egocentric centroid velocity (mean ``delta_v[k]``, a
    2-vector whose first axis points along the heading, variance ``sigmasq_v[k]``
    per axis), with normal-inverse-gamma priors (model spec 5.1). These terms enter
    the syllable sampler, and heading and centroid are sampled jointly by an
    extended Kalman filter and backward sampling (5.4); 3D heights follow a random
    walk of unit variance. Same fitting recipe as :class:`KeypointSLDS` (AR-only
    stage, then the full model; the allo parameters are resampled in both).

    Deviations from keypoint-moseq's location-aware model (spec 14): the exact NIG
    posterior (#4); the allo hyperparameters given here are used (#11); fitted allo
    parameters are kept on new data (#5), relabelled with the syllables (#6) and
    used in the marginals (#7); padded frames do not pin heading and centroid
    (#16); the log joint reports "hv" and, for 3D data, "height" instead of "v"
    (#15).

    Parameters
    ----------
    alpha0_h, beta0_h, lambda0_h : float, default=10, 0.1, 1
        Heading-change prior: sigmasq_h ~ InvGamma(alpha0_h, beta0_h),
        delta_h | sigmasq_h ~ N(0, sigmasq_h / lambda0_h) (spec 2.6).
    alpha0_v, beta0_v, lambda0_v : float, default=10, 0.1, 1
        Velocity prior: sigmasq_v ~ InvGamma(alpha0_v, beta0_v),
        delta_v | sigmasq_v ~ N(0, sigmasq_v I_2 / lambda0_v).
    resample_global_noise_scale : bool, default=True
        Resample the per-keypoint scales sigmasq, as the reference does in this model
        (spec 5.5; off by default in :class:`KeypointSLDS`).
    fix_heading : bool, default=False
        Must stay False: this model needs the heading (use :class:`KeypointSLDS`).
    **others
        Every other parameter as in :class:`KeypointSLDS`. ``sigmasq_loc`` is not
        used (the centroid follows the syllables' velocities).

    Attributes
    ----------
    heading_change_, heading_change_var_ : ndarray of shape (n_states,)
        Per-syllable mean heading change per frame (radians, counter-clockwise
        positive) and its variance, relabelled by frequency like every other
        per-syllable attribute.
    velocity_ : ndarray of shape (n_states, 2)
        Per-syllable mean centroid displacement per frame in the animal's frame
        (first axis along the heading, second to its left).
    velocity_var_ : ndarray of shape (n_states,)
        Its variance per axis.
    log_likelihood_terms_ : dict of str -> ndarray of shape (n_iter_,)
        "z", "x", "Y", "s", "hv" (and "height" for 3D data) per sweep (spec 6).
    chain_state_ : AlloState
        The chain's last state (raw labels; unwrapped heading).
    Every other attribute as in :class:`KeypointSLDS`. The heading returned by
    ``transform`` is unwrapped (it accumulates turns and may leave (-pi, pi]).

    Examples
    --------
    >>> from kpms_estimators import AlloKeypointSLDS
    >>> from kpms_estimators.datasets import simulate_keypoints
    >>> sim = simulate_keypoints(n_recordings=2, n_frames=300, location_aware=True, random_state=0)
    >>> model = AlloKeypointSLDS(n_states=10, n_ar_iter=5, n_iter=5, n_apply_iter=5,
    ...                          random_state=0).fit(sim.poses)
    >>> model.velocity_.shape
    (10, 2)
    """

    _likelihood_terms = ("z", "x", "Y", "s", "hv", "height")
    _kernels = _KERNELS

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
        alpha0_h=10.0,
        beta0_h=0.1,
        lambda0_h=1.0,
        alpha0_v=10.0,
        beta0_v=0.1,
        lambda0_v=1.0,
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
        resample_global_noise_scale=True,
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
        super().__init__(
            n_states=n_states, latent_dim=latent_dim, n_lags=n_lags, kappa=kappa, ar_kappa=ar_kappa,
            n_ar_iter=n_ar_iter, n_iter=n_iter, alpha=alpha, gamma=gamma, S_0_scale=S_0_scale,
            K_0_scale=K_0_scale, keypoints=keypoints, anterior_keypoints=anterior_keypoints,
            posterior_keypoints=posterior_keypoints, n_dims=n_dims, conf_threshold=conf_threshold,
            conf_pseudocount=conf_pseudocount, noise_slope=noise_slope, noise_intercept=noise_intercept,
            sigmasq_loc=sigmasq_loc, nu_s=nu_s, nu_sigma=nu_sigma, sigmasq_0=sigmasq_0, fix_heading=fix_heading,
            resample_global_noise_scale=resample_global_noise_scale, reference_compat=reference_compat,
            added_noise_level=added_noise_level, outlier_scale_factor=outlier_scale_factor, jitter=jitter,
            parallel_message_passing=parallel_message_passing, n_apply_iter=n_apply_iter,
            n_marginal_samples=n_marginal_samples, seg_length=seg_length, random_state=random_state,
            verbose=verbose,
        )
        self.alpha0_h = alpha0_h
        self.beta0_h = beta0_h
        self.lambda0_h = lambda0_h
        self.alpha0_v = alpha0_v
        self.beta0_v = beta0_v
        self.lambda0_v = lambda0_v

    # -- model hooks ----------------------------------------------------------
    def _check_hyperparameters(self, data):
        super()._check_hyperparameters(data)
        self._check_numbers(positive=_ALLO_PRIOR)
        if self.fix_heading:
            raise ValueError(
                "AlloKeypointSLDS models heading changes, so it needs the heading: fix_heading must be False "
                f"(got {self.fix_heading!r}); use KeypointSLDS for a fixed heading."
            )

    def _hypers(self, data, kappa=None) -> allo.AlloHypers:
        hypers = super()._hypers(data, kappa=kappa)
        dtype = data.Y.dtype
        prior = allo.AlloPrior(*(jnp.asarray(getattr(self, name), dtype) for name in _ALLO_PRIOR))
        return allo.AlloHypers.from_keypoint(hypers, prior)

    def _switches(self, **overrides) -> allo.AlloSwitches:
        settings = super()._switches(**overrides)._asdict()
        del settings["fix_heading"]  # refused by _check_hyperparameters
        return allo.AlloSwitches(**settings)

    def _set_fitted_attributes(self, recordings, batch):
        super()._set_fitted_attributes(recordings, batch)
        params, order = self.chain_state_.params, self.syllable_order_
        self.heading_change_ = params.delta_h[order]
        self.heading_change_var_ = params.sigmasq_h[order]
        self.velocity_ = params.delta_v[order]
        self.velocity_var_ = params.sigmasq_v[order]

    def score(self, X, y=None, *, sequence_ids=None):
        """Mean per-frame log p(x_t, dh_t, dv_t | past) of the inferred trajectories, z summed out.

        The forward-filter normaliser with the syllable sampler's per-state
        likelihoods (AR plus heading change and egocentric step; spec 5.3, 9);
        larger is better.
        """
        return super().score(X, y, sequence_ids=sequence_ids)
