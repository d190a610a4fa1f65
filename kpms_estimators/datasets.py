"""Simulators that draw data from the models themselves (recovery tests, power analyses)."""

from __future__ import annotations

import numpy as np
from sklearn.utils import Bunch, check_random_state


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
