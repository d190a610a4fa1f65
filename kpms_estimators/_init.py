"""Keypoint preprocessing and initialisation in NumPy (model spec 1 and 2).

Noise prior from confidences, outlier removal, low-confidence interpolation of
the copy used for PCA, heading/centroid alignment, the centring embedding, PCA
with whitening, and the projected starting trajectory. Pure NumPy / scikit-learn;
the JAX core starts from what these functions return.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import numpy as np
from scipy.ndimage import median_filter
from sklearn.decomposition import PCA

from ._core.keypoints import centring_embedding

#: latent_dim=None keeps the fewest components explaining more than this share of variance...
VARIANCE_EXPLAINED = 0.9
#: ...but at most this many.
MAX_AUTO_LATENT_DIM = 10


#: Floor on each keypoint's MAD in ``remove_outliers``, as a share of the median distance.
MAD_FLOOR = 0.1


#: Seed of the uniform jitter added once to the coordinates (spec 1.8).
ADDED_NOISE_SEED = 42


def formatted_arrays(batch, added_noise_level: float, conf_pseudocount: float) -> tuple[np.ndarray, np.ndarray]:
    """(Y, conf) of a batch as the model sees them (spec 1 steps 7-8).

    Y gets U(-a, a) jitter with a = ``added_noise_level`` from a generator seeded
    with 42 (deterministic given the data); confidences (all ones when the input had
    none) get ``conf_pseudocount`` added, padding included.
    """
    Y = batch.values
    if added_noise_level:
        rng = np.random.default_rng(ADDED_NOISE_SEED)
        Y = Y + rng.uniform(-added_noise_level, added_noise_level, size=Y.shape)
    conf = np.ones(batch.mask.shape + (Y.shape[2],)) if batch.conf is None else batch.conf
    return Y, conf + conf_pseudocount


def noise_prior(conf: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """s0 = 10 ** (2 (slope log10(conf + 1e-6) + intercept)): prior variance per point (spec 2.1)."""
    return 10.0 ** (2.0 * (slope * np.log10(conf + 1e-6) + intercept))


def remove_outliers(recordings, scale: float = 6.0):
    """Interpolate points far from their frame's keypoint median and zero their confidence (spec 1).

    dist_tk = ||y_tk - median_k y_tk||; a point is an outlier if
    dist_tk > median_t dist_tk + scale * MAD_t dist_tk (spec 1), with MAD_t floored at
    ``MAD_FLOOR`` times the median distance over all points (a deviation: see
    docs/notes.md). Returns new ``Recordings``
    and the number of points replaced per recording.
    """
    arrays, confs, counts = [], [], []
    conf_in = recordings.confidences or [np.ones(a.shape[:2]) for a in recordings.arrays]
    for pos, conf in zip(recordings.arrays, conf_in):
        dist = np.linalg.norm(pos - np.median(pos, axis=1, keepdims=True), axis=-1)
        med = np.median(dist, axis=0)
        mad = np.median(np.abs(dist - med), axis=0)
        # a keypoint that often IS the coordinate-wise median has median = MAD = 0, and then
        # every frame where it is not would count as an outlier: floor its MAD
        mad = np.maximum(mad, MAD_FLOOR * np.median(dist))
        outlier = dist > med + scale * mad
        pos, conf = pos.copy(), conf.copy()
        pos[outlier] = np.nan
        interpolate_missing(pos, ~outlier)
        conf[outlier] = 0.0
        arrays.append(pos)
        confs.append(conf)
        counts.append(int(outlier.sum()))
    return dataclasses.replace(recordings, arrays=tuple(arrays), confidences=tuple(confs)), counts


def interpolate_missing(pos: np.ndarray, keep: np.ndarray) -> None:
    """In place: replace points where ``keep`` is False by linear interpolation over frames.

    ``pos`` (T, K, D), ``keep`` (T, K). Edges hold the nearest kept value; a keypoint
    with no kept frame is left unchanged (the [REC] fallback of spec 2.2.1).
    """
    frames = np.arange(pos.shape[0])
    for k in np.flatnonzero(~keep.all(0) & keep.any(0)):
        seen = keep[:, k]
        for d in range(pos.shape[2]):
            pos[:, k, d] = np.interp(frames, frames[seen], pos[seen, k, d])


def interpolate_low_confidence(Y: np.ndarray, conf: np.ndarray, threshold: float, raw: np.ndarray) -> np.ndarray:
    """The PCA copy Yi: points with conf < threshold interpolated inside each segment (spec 2.2.1).

    Y (B, T, K, D), conf (B, T, K). A keypoint with no confident frame in a segment
    keeps its raw coordinates ``raw`` (the spec's [REC] instead of the reference's
    frame-index bug).
    """
    out = np.array(Y, dtype=np.float64, copy=True)
    for b in range(Y.shape[0]):
        keep = conf[b] >= threshold
        low = ~keep
        if low.any():
            interpolate_missing(out[b], keep)
            none = ~keep.any(0)
            out[b][:, none] = raw[b][:, none]
    return out


def heading_and_centroid(Yi: np.ndarray, anterior, posterior, fix_heading: bool):
    """h0 = atan2(a - p) of anterior/posterior means (x, y); v0 = keypoint mean (spec 2.2.2)."""
    v0 = Yi.mean(axis=-2)
    if fix_heading:
        return np.zeros(Yi.shape[:-2]), v0
    front = Yi[..., anterior, :2].mean(axis=-2)
    back = Yi[..., posterior, :2].mean(axis=-2)
    diff = front - back
    return np.arctan2(diff[..., 1], diff[..., 0]), v0


def embed(Yi: np.ndarray, h0: np.ndarray, v0: np.ndarray) -> np.ndarray:
    """Flattened aligned, centred pose Gamma^T R(-h0)(Yi - v0): (..., (K-1)*D) (spec 2.2)."""
    centred = Yi - v0[..., None, :]
    cos, sin = np.cos(-h0)[..., None], np.sin(-h0)[..., None]
    aligned = centred.copy()
    aligned[..., 0] = cos * centred[..., 0] - sin * centred[..., 1]
    aligned[..., 1] = sin * centred[..., 0] + cos * centred[..., 1]
    gamma = centring_embedding(Yi.shape[-2])
    emb = np.einsum("kj,...kd->...jd", gamma, aligned)
    return emb.reshape(emb.shape[:-2] + (-1,))


class Emission(NamedTuple):
    Cd: np.ndarray  # (O', P + 1)
    latent_dim: int
    explained_variance_ratio: np.ndarray  # of all PCA components
    n_pca_frames: int


def fit_pca(Yflat: np.ndarray, mask: np.ndarray, conf, conf_threshold: float, exclude_low_confidence: bool = True,
            max_frames: int = 1_000_000) -> PCA:
    """scikit-learn ``PCA(random_state=42)`` of the embedded poses, all components kept (spec 2.3).

    Frames used: mask > 0 and, when ``exclude_low_confidence`` and confidences are
    given, every keypoint's confidence above ``conf_threshold``; if fewer than
    O' + 1 such frames exist, all mask > 0 frames (with a warning). At most
    ``max_frames`` frames, a seeded random subset (seed 42).
    """
    valid = mask > 0
    rows = flat_valid = Yflat[valid]
    n_dim = Yflat.shape[-1]
    if exclude_low_confidence and conf is not None:
        rows = Yflat[valid & np.all(conf > conf_threshold, axis=-1)]
        if len(rows) < n_dim + 1:
            warnings.warn(
                f"Only {len(rows)} frames have every keypoint above conf_threshold={conf_threshold}; "
                f"fitting PCA on all {len(flat_valid)} frames instead.",
                UserWarning,
                stacklevel=3,
            )
            rows = flat_valid
    if len(rows) < n_dim + 1:
        raise ValueError(f"PCA needs at least {n_dim + 1} valid frames (keypoints x dims), got {len(rows)}.")
    if len(rows) > max_frames:
        rows = rows[np.random.default_rng(42).choice(len(rows), max_frames, replace=False)]
    return PCA(random_state=42).fit(rows)


def emission_from_pca(pca: PCA, Yflat: np.ndarray, mask: np.ndarray, latent_dim) -> Emission:
    """Whitened emission C = Cpca^T chol(Cov(u)), d = PCA mean, u over all mask > 0 frames (spec 2.4).

    latent_dim=None keeps the fewest components explaining more than 90% of the
    variance, capped at 10.
    """
    n_dim = Yflat.shape[-1]
    if getattr(pca, "components_", None) is None or pca.components_.shape[1] != n_dim:
        found = getattr(pca, "components_", np.empty((0, 0))).shape
        raise ValueError(f"the PCA does not fit these data: its components have shape {found}, the embedded "
                         f"poses have {n_dim} features ((keypoints - 1) x dims); fit it on the same keypoints.")
    ratios = pca.explained_variance_ratio_
    if latent_dim is None:
        latent_dim = min(int(np.argmax(np.cumsum(ratios) > VARIANCE_EXPLAINED)) + 1, MAX_AUTO_LATENT_DIM)
        latent_dim = min(latent_dim, len(ratios))
    if latent_dim > len(ratios):
        raise ValueError(f"latent_dim={latent_dim} is more than the PCA's {len(ratios)} components.")
    components = pca.components_[:latent_dim]  # (P, O')
    mean = pca.mean_
    scores = (Yflat[mask > 0] - mean) @ components.T
    cov = np.atleast_2d(np.cov(scores, rowvar=False))
    whiten = np.linalg.cholesky(cov + 1e-12 * np.eye(latent_dim))
    C = components.T @ whiten
    return Emission(np.concatenate([C, mean[:, None]], axis=1), int(latent_dim), ratios, int(pca.n_samples_))


def fit_emission(
    Yflat: np.ndarray, mask: np.ndarray, conf: np.ndarray, conf_threshold: float, latent_dim, max_frames: int = 1_000_000
) -> Emission:
    """PCA of the embedded poses (:func:`fit_pca`), then the whitened emission (:func:`emission_from_pca`)."""
    pca = fit_pca(Yflat, mask, conf, conf_threshold, True, max_frames)
    return emission_from_pca(pca, Yflat, mask, latent_dim)


def project(Yflat: np.ndarray, Cd: np.ndarray) -> np.ndarray:
    """x0 = pinv(C) (Yflat - d) for every frame, padding included (spec 2.5.1)."""
    C, d = Cd[:, :-1], Cd[:, -1]
    return (Yflat - d) @ np.linalg.pinv(C).T


def estimate_sigmasq_loc(Y: np.ndarray, mask: np.ndarray, filter_size: int = 30) -> float:
    """(mean frame-to-frame step of the median-filtered keypoint-median centroid)^2 (spec 2.6).

    Padding frames are excluded (the reference lets their NaNs run through the
    filter); each segment's real frames are filtered on their own.
    """
    steps = []
    for b in range(Y.shape[0]):
        real = Y[b][mask[b] > 0]
        if len(real) < 2:
            continue
        centre = np.median(real, axis=1)
        smooth = median_filter(centre, size=(min(filter_size, len(real)), 1), mode="nearest")
        steps.append(np.linalg.norm(np.diff(smooth, axis=0), axis=-1))
    step = float(np.mean(np.concatenate(steps))) if steps else 0.0
    return max(step**2, 1e-8)  # a motionless recording must not give a zero variance
