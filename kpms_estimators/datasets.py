"""Simulators that draw data from the models themselves (recovery tests, power analyses)."""

from __future__ import annotations

import numpy as np
import xarray as xr
from sklearn.utils import Bunch, check_random_state

from ._core.keypoints import centring_embedding


def _stable_rotation(rng: np.random.Generator, dim: int, decay: float) -> np.ndarray:
    """``decay`` times a random orthogonal matrix: a stable, rotating AR(1) coefficient."""
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return decay * q * np.sign(np.diag(r))


def simulate_arhmm(
    n_states: int = 5,
    latent_dim: int = 4,
    n_lags: int = 3,
    n_recordings: int = 5,
    n_frames: int = 2000,
    mean_duration: float = 20.0,
    separation: float = 3.0,
    noise_scale: float = 0.1,
    random_state=None,
) -> Bunch:
    """Draw recordings from a sticky AR(L) hidden Markov model.

    Each state k pulls the trajectory towards its own attractor ``mu_k`` (points
    ``separation`` apart on average) with rotating AR dynamics on the newest lag,
    so states differ in both where and how the trajectory moves:
    ``x_t = mu_k + A_k (x_{t-1} - mu_k) + eps``, ``eps ~ N(0, Q_k)``, written in the
    model's AR(L) form with zero coefficients on the older lags. The state sequence
    is a Markov chain with self-transition probability ``1 - 1/mean_duration`` and
    uniform switches; the first state is uniform, as in the model (spec 3.1).

    Parameters
    ----------
    n_states, latent_dim, n_lags : int
        Number of states S, dimension P of the trajectory, AR order L.
    n_recordings, n_frames : int
        Recordings drawn and frames per recording.
    mean_duration : float
        Expected state duration in frames (stickiness), > 1.
    separation : float
        Typical distance between state attractors, in units of the data.
    noise_scale : float
        Standard deviation of the innovations.
    random_state : int, RandomState instance or None
        Seed.

    Returns
    -------
    Bunch with
        X : (n_recordings * n_frames, latent_dim) float64 observations, recordings stacked;
        syllables : (n_recordings * n_frames,) int true states;
        sequence_ids : (n_recordings * n_frames,) int recording id per frame;
        Ab : (S, P, L*P + 1), Q : (S, P, P), pi : (S, S) the true parameters.
    """
    if mean_duration <= 1:
        raise ValueError(f"mean_duration must be > 1 frame, got {mean_duration}")
    if min(n_states, latent_dim, n_lags, n_recordings) < 1 or n_frames <= n_lags:
        raise ValueError(
            "n_states, latent_dim, n_lags and n_recordings must be >= 1 and n_frames > n_lags; got "
            f"{n_states=}, {latent_dim=}, {n_lags=}, {n_recordings=}, {n_frames=}"
        )
    rng = np.random.default_rng(check_random_state(random_state).randint(2**31 - 1))
    directions = rng.normal(size=(n_states, latent_dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    centers = separation * directions
    lagged = n_lags * latent_dim
    Ab = np.zeros((n_states, latent_dim, lagged + 1))
    Q = np.zeros((n_states, latent_dim, latent_dim))
    for k in range(n_states):
        A = _stable_rotation(rng, latent_dim, decay=0.9)
        Ab[k, :, lagged - latent_dim : lagged] = A
        Ab[k, :, -1] = centers[k] - A @ centers[k]
        root = noise_scale * (np.eye(latent_dim) + 0.3 * rng.normal(size=(latent_dim, latent_dim)) / latent_dim)
        Q[k] = root @ root.T
    stay = 1.0 - 1.0 / mean_duration
    pi = np.full((n_states, n_states), (1 - stay) / max(n_states - 1, 1))
    np.fill_diagonal(pi, stay if n_states > 1 else 1.0)

    chol_Q = np.linalg.cholesky(Q)
    xs, zs = [], []
    for _ in range(n_recordings):
        z = np.empty(n_frames, dtype=int)
        z[0] = rng.integers(n_states)
        for t in range(1, n_frames):
            z[t] = rng.choice(n_states, p=pi[z[t - 1]])
        x = np.empty((n_frames, latent_dim))
        x[:n_lags] = centers[z[0]] + noise_scale * rng.normal(size=(n_lags, latent_dim))
        noise = rng.normal(size=(n_frames, latent_dim))
        for t in range(n_lags, n_frames):
            xbar = np.concatenate([x[t - n_lags : t].reshape(-1), [1.0]])
            x[t] = Ab[z[t]] @ xbar + chol_Q[z[t]] @ noise[t]
        xs.append(x)
        zs.append(z)
    return Bunch(
        X=np.concatenate(xs),
        syllables=np.concatenate(zs),
        sequence_ids=np.repeat(np.arange(n_recordings), n_frames),
        Ab=Ab,
        Q=Q,
        pi=pi,
    )


def _body_template(n_keypoints: int, n_dims: int, length: float) -> np.ndarray:
    """A resting mouse-like pose (K, D): keypoints along a gently curved spine, nose at +x."""
    u = np.linspace(0.5, -0.5, n_keypoints)
    pose = np.zeros((n_keypoints, n_dims))
    pose[:, 0] = length * u
    pose[:, 1] = 0.08 * length * np.sin(np.pi * np.arange(n_keypoints) / 2.0)
    if n_dims == 3:
        pose[:, 2] = 0.1 * length * (1 - 4 * u**2)
    return pose - pose.mean(axis=0)


def _allo_motion(rng, syllables, heading0, centroid0, truth):
    """Heading and (x, y) centroid driven by the syllables (spec 5.1); heading wrapped to (-pi, pi]."""
    n_frames = len(syllables)
    k = syllables[1:]
    turns = truth.heading_change[k] + np.sqrt(truth.heading_change_var[k]) * rng.normal(size=n_frames - 1)
    heading = heading0 + np.concatenate([[0.0], np.cumsum(turns)])
    steps = truth.velocity[k] + np.sqrt(truth.velocity_var[k])[:, None] * rng.normal(size=(n_frames - 1, 2))
    cos, sin = np.cos(heading[:-1]), np.sin(heading[:-1])
    world = np.stack([cos * steps[:, 0] - sin * steps[:, 1], sin * steps[:, 0] + cos * steps[:, 1]], axis=-1)
    centroid = centroid0 + np.concatenate([np.zeros((1, 2)), np.cumsum(world, axis=0)])
    return np.angle(np.exp(1j * heading)), centroid


def simulate_keypoints(
    n_keypoints: int = 10,
    n_dims: int = 2,
    n_states: int = 5,
    latent_dim: int = 4,
    n_lags: int = 3,
    n_recordings: int = 4,
    n_frames: int = 3000,
    mean_duration: float = 20.0,
    latent_noise: float = 0.3,
    body_length: float = 40.0,
    pose_scale: float = 8.0,
    sigmasq_loc: float = 0.5,
    nu_s: float = 5.0,
    noise_slope: float = -0.5,
    noise_intercept: float = 0.25,
    random_state=None,
    location_aware: bool = False,
    heading_change_scale: float = 0.1,
    heading_noise: float = 0.02,
    speed_scale: float = 1.0,
    velocity_noise: float = 0.3,
) -> Bunch:
    """Draw keypoint recordings from the keypoint SLDS (model spec 4.1), or its location-aware variant (5.1).

    The latent pose x and the syllables come from :func:`simulate_arhmm`. The
    emission [C | d] maps x to an embedded pose around a mouse-like body template
    (``d``) with ``C`` of column norm ``pose_scale``. The centroid follows the
    model's random walk with variance ``sigmasq_loc``; the heading, which the model
    leaves uniform and independent per frame, is drawn as a slowly turning walk
    (a draw within the model's support that looks like an animal). Confidences
    are Beta(8, 1.5) draws; the noise prior s0 follows from them as in spec 2.1,
    s_tk ~ ScaledInvChi2(nu_s, s0_tk), and y_tk ~ N(R(h_t) yhat_tk + v_t, s_tk I).

    With ``location_aware=True`` the syllables also drive the motion (spec 5.1):
    every state k gets a heading change ``delta_h[k] ~ U(-heading_change_scale,
    heading_change_scale)`` rad/frame with standard deviation ``heading_noise``, and
    an egocentric velocity ``delta_v[k] ~ N(0, speed_scale^2 I_2)`` per frame with
    standard deviation ``velocity_noise`` per axis; for every frame t >= 1, with
    k = z_t, h_t = h_{t-1} + N(delta_h[k], heading_noise^2) and
    v_t[:2] = v_{t-1}[:2] + R(h_{t-1}) N(delta_v[k], velocity_noise^2 I_2). A 3D
    height keeps the random walk with ``sigmasq_loc``. The draws for the other
    arrays are unchanged (same seed, same recordings apart from h and v).

    Parameters
    ----------
    n_keypoints, n_dims : int
        K keypoints in D = 2 or 3 dimensions.
    n_states, latent_dim, n_lags, n_recordings, n_frames, mean_duration :
        As in :func:`simulate_arhmm`.
    latent_noise : float, default=0.3
        Standard deviation of the latent AR innovations (``noise_scale`` of
        :func:`simulate_arhmm`). With ``pose_scale=8`` the keypoint noise is about
        0.25 in latent units; innovations well below that make the settled phase
        of a syllable indistinguishable from tracking noise, and a fit then splits
        such a syllable into a "moving" and a "settled" state (measured with 0.1:
        matched accuracy 0.72-0.85 after 50 + 100 sweeps; with 0.3: 0.98-0.99 on
        four chains).
    body_length, pose_scale : float
        Size of the body template and of the pose changes, in coordinate units.
    sigmasq_loc, nu_s, noise_slope, noise_intercept : float
        Model hyperparameters used to draw v and s (spec 2.1, 2.6, 4.1).
    random_state : int, RandomState instance or None
    location_aware : bool, default=False
        Draw h and v from the location-aware model instead (see above).
    heading_change_scale, heading_noise, speed_scale, velocity_noise : float
        Scales of the location-aware parameters (radians and coordinate units per frame;
        the noises are standard deviations). Used only with ``location_aware=True``.

    Returns
    -------
    Bunch with
        poses : xarray.Dataset per recording ``{"rec0": ...}`` in the movement layout
            (``position`` (time, space, keypoints), ``confidence`` (time, keypoints));
        syllables, heading : dict of (n_frames,) arrays (heading wrapped to (-pi, pi]);
        centroid : dict of (n_frames, D); latent : dict of (n_frames, latent_dim) arrays;
        keypoints : list of names; Cd : ((K-1) * D, latent_dim + 1) emission; plus ``Ab``,
        ``Q``, ``pi`` of the AR-HMM. With ``location_aware=True`` also the true per-state
        ``heading_change`` (S,), ``heading_change_var`` (S,), ``velocity`` (S, 2) and
        ``velocity_var`` (S,) (variances per axis), indexed like the syllables.
    """
    if n_dims not in (2, 3) or n_keypoints < 2 or latent_dim > (n_keypoints - 1) * n_dims:
        raise ValueError(
            f"need n_dims in (2, 3), n_keypoints >= 2 and latent_dim <= (K-1)*D; got {n_dims=}, "
            f"{n_keypoints=}, {latent_dim=}"
        )
    seed = check_random_state(random_state).randint(2**31 - 1)
    arhmm = simulate_arhmm(n_states, latent_dim, n_lags, n_recordings, n_frames, mean_duration,
                           noise_scale=latent_noise, random_state=seed)
    rng = np.random.default_rng(seed + 1)
    gamma = centring_embedding(n_keypoints)
    d = (gamma.T @ _body_template(n_keypoints, n_dims, body_length)).reshape(-1)
    C = rng.normal(size=(d.size, latent_dim))
    C *= pose_scale / np.linalg.norm(C, axis=0)
    names = ["nose"] + [f"spine{i}" for i in range(1, n_keypoints - 1)] + ["tail_base"]
    space = ["x", "y", "z"][:n_dims]
    out = Bunch(poses={}, syllables={}, heading={}, centroid={}, latent={}, keypoints=names,
                Cd=np.concatenate([C, d[:, None]], axis=1), Ab=arhmm.Ab, Q=arhmm.Q, pi=arhmm.pi)
    if location_aware:
        if min(heading_change_scale, heading_noise, speed_scale, velocity_noise) < 0:
            raise ValueError(
                "heading_change_scale, heading_noise, speed_scale and velocity_noise must be >= 0; got "
                f"{heading_change_scale=}, {heading_noise=}, {speed_scale=}, {velocity_noise=}"
            )
        allo_rng = np.random.default_rng(seed + 2)
        out.heading_change = allo_rng.uniform(-heading_change_scale, heading_change_scale, n_states)
        out.heading_change_var = np.full(n_states, float(heading_noise) ** 2)
        out.velocity = speed_scale * allo_rng.normal(size=(n_states, 2))
        out.velocity_var = np.full(n_states, float(velocity_noise) ** 2)
    for r in range(n_recordings):
        rows = arhmm.sequence_ids == r
        x = arhmm.X[rows]
        flat = x @ C.T + d
        yhat = np.einsum("kj,tjd->tkd", gamma, flat.reshape(n_frames, n_keypoints - 1, n_dims))
        h = np.angle(np.exp(1j * (rng.uniform(-np.pi, np.pi) + np.cumsum(rng.normal(0, 0.05, n_frames)))))
        v = np.cumsum(rng.normal(0, np.sqrt(sigmasq_loc), (n_frames, n_dims)), axis=0)
        v[:, :2] += rng.uniform(-100, 100, 2)
        if location_aware:
            h, v[:, :2] = _allo_motion(allo_rng, arhmm.syllables[rows], h[0], v[0, :2], out)
        conf = rng.beta(8.0, 1.5, size=(n_frames, n_keypoints))
        s0 = 10.0 ** (2.0 * (noise_slope * np.log10(conf + 1e-6) + noise_intercept))
        s = nu_s * s0 / rng.chisquare(nu_s, size=s0.shape)
        cos, sin = np.cos(h)[:, None], np.sin(h)[:, None]
        world = yhat.copy()
        world[..., 0] = cos * yhat[..., 0] - sin * yhat[..., 1]
        world[..., 1] = sin * yhat[..., 0] + cos * yhat[..., 1]
        y = world + v[:, None, :] + np.sqrt(s)[..., None] * rng.normal(size=world.shape)
        name = f"rec{r}"
        out.poses[name] = xr.Dataset(
            {
                "position": (("time", "space", "keypoints"), np.transpose(y, (0, 2, 1))),
                "confidence": (("time", "keypoints"), conf),
            },
            coords={"time": np.arange(n_frames), "space": space, "keypoints": names},
        )
        out.syllables[name] = arhmm.syllables[rows]
        out.heading[name] = h
        out.centroid[name] = v
        out.latent[name] = x
    return out
