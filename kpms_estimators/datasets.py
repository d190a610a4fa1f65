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
) -> Bunch:
    """Draw keypoint recordings from the keypoint SLDS (model spec 4.1).

    The latent pose x and the syllables come from :func:`simulate_arhmm`. The
    emission [C | d] maps x to an embedded pose around a mouse-like body template
    (``d``) with ``C`` of column norm ``pose_scale``. The centroid follows the
    model's random walk with variance ``sigmasq_loc``; the heading, which the model
    leaves uniform and independent per frame, is drawn as a slowly turning walk
    (a draw within the model's support that looks like an animal). Confidences
    are Beta(8, 1.5) draws; the noise prior s0 follows from them as in spec 2.1,
    s_tk ~ ScaledInvChi2(nu_s, s0_tk), and y_tk ~ N(R(h_t) yhat_tk + v_t, s_tk I).

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

    Returns
    -------
    Bunch with
        poses : xarray.Dataset per recording ``{"rec0": ...}`` in the movement layout
            (``position`` (time, space, keypoints), ``confidence`` (time, keypoints));
        syllables, heading : dict of (n_frames,) arrays; centroid : dict of (n_frames, D);
        latent : dict of (n_frames, latent_dim) arrays; keypoints : list of names;
        Cd : ((K-1) * D, latent_dim + 1) emission; plus ``Ab``, ``Q``, ``pi`` of the AR-HMM.
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
    for r in range(n_recordings):
        rows = arhmm.sequence_ids == r
        x = arhmm.X[rows]
        flat = x @ C.T + d
        yhat = np.einsum("kj,tjd->tkd", gamma, flat.reshape(n_frames, n_keypoints - 1, n_dims))
        h = np.angle(np.exp(1j * (rng.uniform(-np.pi, np.pi) + np.cumsum(rng.normal(0, 0.05, n_frames)))))
        v = np.cumsum(rng.normal(0, np.sqrt(sigmasq_loc), (n_frames, n_dims)), axis=0)
        v[:, :2] += rng.uniform(-100, 100, 2)
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
