"""Correctness of ``kpms_estimators._init`` (model spec 1, 2.1-2.6).

References are written here in NumPy: explicit formulas, hand-computed linear
interpolations, synthetic bodies rotated/translated by known amounts, and an
eigen-decomposition of the sample covariance for the PCA variance ratios.
"""

from __future__ import annotations

import numpy as np
import pytest

from kpms_estimators import _init
from kpms_estimators._core.keypoints import centring_embedding
from kpms_estimators._data import from_poses


def np_rotation(h):
    return np.array([[np.cos(h), -np.sin(h)], [np.sin(h), np.cos(h)]])


# --------------------------------------------------------------------------- #
# noise_prior (spec 2.1)
# --------------------------------------------------------------------------- #
def test_noise_prior_values_and_monotone():
    """s0 = 10**(2 (slope log10(conf + 1e-6) + intercept)); with the defaults
    (-0.5, 0.25) that is sqrt(10)/(conf + 1e-6): ~3.162 at conf 1, ~3.16e3 at 1e-3."""
    conf = np.array([1.0, 1e-3])
    s0 = _init.noise_prior(conf, -0.5, 0.25)
    np.testing.assert_allclose(s0, np.sqrt(10) / (conf + 1e-6), rtol=1e-12)
    assert s0[0] == pytest.approx(3.162, abs=1e-3)
    assert s0[1] == pytest.approx(3159.1, rel=1e-4)
    grid = np.linspace(0.0, 1.0, 101)
    assert np.all(np.diff(_init.noise_prior(grid, -0.5, 0.25)) < 0)  # less confident -> larger variance
    # another slope/intercept, against the formula written out
    np.testing.assert_allclose(_init.noise_prior(np.array([0.3]), -1.2, 0.1), 10 ** (2 * (-1.2 * np.log10(0.300001) + 0.1)))
    assert np.isfinite(_init.noise_prior(np.array([0.0]), -0.5, 0.25)).all()


# --------------------------------------------------------------------------- #
# interpolation (spec 2.2.1)
# --------------------------------------------------------------------------- #
def test_interpolate_missing_linear_and_edges():
    """Dropped points are linearly interpolated between kept frames, edges hold the
    nearest kept value, fully kept or fully dropped keypoints are unchanged."""
    T, K, D = 10, 3, 2
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(T, K, D))
    keep = np.ones((T, K), bool)
    keep[[0, 1, 4, 5, 6, 9], 0] = False  # kept frames of keypoint 0: 2, 3, 7, 8
    keep[:, 2] = False  # never kept
    orig = pos.copy()
    _init.interpolate_missing(pos, keep)
    exp = orig.copy()
    exp[0, 0] = exp[1, 0] = orig[2, 0]  # leading edge
    for t in (4, 5, 6):  # between frames 3 and 7
        w = (t - 3) / 4
        exp[t, 0] = (1 - w) * orig[3, 0] + w * orig[7, 0]
    exp[9, 0] = orig[8, 0]  # trailing edge
    np.testing.assert_allclose(pos, exp, rtol=1e-12)


def test_interpolate_low_confidence():
    """Per segment: points with conf < threshold replaced by interpolation over the same
    keypoint's confident frames (padding frames take part); a keypoint with no confident
    frame in the segment keeps its ``raw`` coordinates; input arrays are not modified."""
    B, T, K, D = 2, 8, 3, 3
    rng = np.random.default_rng(1)
    Y = rng.normal(size=(B, T, K, D))
    raw = Y + 100.0  # distinguishable fallback
    conf = np.ones((B, T, K))
    conf[0, 3, 1] = 0.2  # inside: between frames 2 and 4
    conf[0, 5:7, 1] = 0.49  # inside: between frames 4 and 7
    conf[0, 0, 0] = 0.1  # leading edge
    conf[1, :, 2] = 0.3  # no confident frame in segment 1
    conf[1, 7, 0] = 0.0  # trailing edge
    Y_before, conf_before = Y.copy(), conf.copy()
    out = _init.interpolate_low_confidence(Y, conf, 0.5, raw)
    np.testing.assert_array_equal(Y, Y_before)
    np.testing.assert_array_equal(conf, conf_before)
    exp = Y.copy()
    exp[0, 3, 1] = 0.5 * (Y[0, 2, 1] + Y[0, 4, 1])
    exp[0, 5, 1] = Y[0, 4, 1] + (Y[0, 7, 1] - Y[0, 4, 1]) / 3
    exp[0, 6, 1] = Y[0, 4, 1] + 2 * (Y[0, 7, 1] - Y[0, 4, 1]) / 3
    exp[0, 0, 0] = Y[0, 1, 0]
    exp[1, :, 2] = raw[1, :, 2]
    exp[1, 7, 0] = Y[1, 6, 0]
    np.testing.assert_allclose(out, exp, rtol=1e-12)
    # the threshold is inclusive for keeping: conf == threshold is kept
    conf2 = np.ones((1, T, K))
    conf2[0, 2, 0] = 0.5
    np.testing.assert_array_equal(_init.interpolate_low_confidence(Y[:1], conf2, 0.5, raw[:1]), Y[:1])


# --------------------------------------------------------------------------- #
# remove_outliers (spec 1)
# --------------------------------------------------------------------------- #
def test_remove_outliers_interpolates_planted_point():
    """A point planted far from its frame's keypoints is replaced by the average of its
    neighbours in time and gets confidence 0; every other point and confidence is unchanged."""
    rng = np.random.default_rng(2)
    # even K: with odd K a keypoint that is the coordinate-wise median in most frames has
    # dist = 0 there, so MAD = 0 and any frame where it is not the median is flagged
    T, K, D = 60, 6, 2
    body = rng.normal(scale=5.0, size=(K, D))
    pos = body + rng.normal(scale=0.3, size=(T, K, D)) + np.linspace(0, 20, T)[:, None, None]
    # push the rightmost keypoint further right: the frame's keypoint median is unchanged,
    # so no other point of that frame moves relative to it
    k = int(np.argmax(body[:, 0]))
    assert np.sort(body[:, 0])[-1] - np.sort(body[:, 0])[-2] > 2.0
    pos[20, k, 0] += 200.0
    recs = from_poses({"a": pos}, min_length=7)
    out, counts = _init.remove_outliers(recs, scale=6.0)
    assert counts == [1]
    new, conf = out.arrays[0], out.confidences[0]
    exp = pos.copy()
    exp[20, k] = 0.5 * (pos[19, k] + pos[21, k])
    np.testing.assert_allclose(new, exp, rtol=1e-12)
    exp_conf = np.ones((T, K))
    exp_conf[20, k] = 0.0
    np.testing.assert_array_equal(conf, exp_conf)
    np.testing.assert_array_equal(recs.arrays[0], pos)  # input untouched
    # a clean recording: nothing replaced
    clean, counts = _init.remove_outliers(from_poses({"a": exp}, min_length=7), scale=6.0)
    assert counts == [0]
    np.testing.assert_array_equal(clean.arrays[0], exp)


# --------------------------------------------------------------------------- #
# heading, centroid, embedding (spec 2.2)
# --------------------------------------------------------------------------- #
def _rotated_bodies(num_dims, T=12, seed=3):
    """A template body (K = 6) with anterior keypoints {0, 1} and posterior {4, 5} whose
    difference of means lies along +x, rotated by known angles and translated."""
    rng = np.random.default_rng(seed)
    K = 6
    template = rng.normal(size=(K, num_dims))
    template[[0, 1], 1] = [0.4, -0.4]
    template[[4, 5], 1] = [0.9, -0.9]
    template[[0, 1], 0] = [3.0, 2.5]
    template[[4, 5], 0] = [-2.0, -2.5]
    h = rng.uniform(-np.pi, np.pi, T)
    h[:3] = [0.0, np.pi - 1e-9, -np.pi / 2]
    shift = rng.normal(scale=10.0, size=(T, num_dims))
    Y = np.zeros((T, K, num_dims))
    for t in range(T):
        Y[t] = template
        Y[t, :, :2] = template[:, :2] @ np_rotation(h[t]).T
        Y[t] += shift[t]
    return template, h, Y


@pytest.mark.parametrize("num_dims", [2, 3])
def test_heading_and_centroid(num_dims):
    """h0 = the known rotation angle (anterior {0,1}, posterior {4,5}); v0 = keypoint mean
    (all D dims); fix_heading gives h0 = 0 and the same v0. Leading batch axes broadcast."""
    _, h, Y = _rotated_bodies(num_dims)
    h0, v0 = _init.heading_and_centroid(Y, np.array([0, 1]), np.array([4, 5]), False)
    np.testing.assert_allclose(np.cos(h0 - h), 1.0, atol=1e-12)
    np.testing.assert_allclose(v0, Y.mean(axis=1), rtol=1e-12)
    h0f, v0f = _init.heading_and_centroid(Y, np.array([0, 1]), np.array([4, 5]), True)
    np.testing.assert_array_equal(h0f, np.zeros(len(h)))
    np.testing.assert_allclose(v0f, Y.mean(axis=1), rtol=1e-12)
    hb, vb = _init.heading_and_centroid(np.stack([Y, Y[::-1]]), np.array([0, 1]), np.array([4, 5]), False)
    assert hb.shape == (2, len(h)) and vb.shape == (2, len(h), num_dims)
    np.testing.assert_allclose(np.cos(hb[1] - h[::-1]), 1.0, atol=1e-12)


@pytest.mark.parametrize("num_dims", [2, 3])
def test_embed_invariance_and_round_trip(num_dims):
    """With the true h0 and v0 = keypoint mean, the embedding of every rotated and
    translated copy equals Gamma^T template (flattened row-major, index j*D + c), and
    Gamma @ emb recovers the centred aligned pose."""
    template, h, Y = _rotated_bodies(num_dims)
    K = template.shape[0]
    gamma = centring_embedding(K)
    v0 = Y.mean(axis=1)
    emb = _init.embed(Y, h, v0)
    assert emb.shape == (len(h), (K - 1) * num_dims)
    expected = (gamma.T @ template).reshape(-1)
    np.testing.assert_allclose(emb, np.broadcast_to(expected, emb.shape), atol=1e-10)
    centred = template - template.mean(axis=0)
    for t in range(len(h)):
        np.testing.assert_allclose(gamma @ emb[t].reshape(K - 1, num_dims), centred, atol=1e-10)
    # explicit per-frame reference for an arbitrary (wrong) h0 and v0
    rng = np.random.default_rng(4)
    h_any, v_any = rng.uniform(-3, 3, len(h)), rng.normal(size=(len(h), num_dims))
    emb_any = _init.embed(Y, h_any, v_any)
    for t in range(len(h)):
        al = Y[t] - v_any[t]
        al[:, :2] = al[:, :2] @ np_rotation(-h_any[t]).T
        np.testing.assert_allclose(emb_any[t], (gamma.T @ al).reshape(-1), atol=1e-10)


# --------------------------------------------------------------------------- #
# PCA, whitening, projection (spec 2.3-2.5)
# --------------------------------------------------------------------------- #
def _low_rank_data(rng, n_frames, n_dim, scales, noise=0.05):
    """Yflat = z diag(scales) W^T + mean + noise, W with orthonormal columns."""
    W, _ = np.linalg.qr(rng.normal(size=(n_dim, len(scales))))
    z = rng.normal(size=(n_frames, len(scales))) * scales
    return z @ W.T + rng.normal(size=n_dim) * 3 + noise * rng.normal(size=(n_frames, n_dim))


def _cumulative_ratio_dim(rows):
    """Smallest n with cumulative explained variance ratio > 0.9, from numpy's eigvalsh."""
    eig = np.sort(np.linalg.eigvalsh(np.cov(rows, rowvar=False)))[::-1]
    return int(np.argmax(np.cumsum(eig) / eig.sum() > 0.9)) + 1, eig / eig.sum()


def test_fit_emission_auto_dim_whitening_and_masking():
    """latent_dim=None picks the smallest n with cumulative ratio > 0.9 (numpy
    eigenvalues of the confident valid frames); padded frames (mask 0, garbage) and
    frames with a keypoint below conf_threshold are left out of PCA (ratios and d match
    numpy on the confident valid frames); the whitened scores project(Yflat, Cd) have
    identity sample covariance on all valid frames; Cd has shape (O', P + 1)."""
    rng = np.random.default_rng(5)
    B, T, K = 3, 200, 5
    n_dim = (K - 1) * 2
    Yflat = _low_rank_data(rng, B * T, n_dim, scales=[5.0, 3.0, 2.0, 0.7]).reshape(B, T, n_dim)
    mask = np.ones((B, T))
    mask[2, 150:] = 0.0
    Yflat[2, 150:] = 1e3  # garbage in padding
    conf = np.ones((B, T, K))
    conf[0, :40, 2] = 0.2  # these frames are valid but not confident
    Yflat[0, :40] += rng.normal(scale=20.0, size=(40, n_dim))  # and would distort PCA
    confident = (mask > 0) & np.all(conf > 0.5, axis=-1)
    want_dim, ratios = _cumulative_ratio_dim(Yflat[confident])
    assert 1 < want_dim < n_dim
    em = _init.fit_emission(Yflat, mask, conf, 0.5, None)
    assert em.latent_dim == want_dim
    assert em.n_pca_frames == confident.sum()
    assert em.Cd.shape == (n_dim, want_dim + 1)
    np.testing.assert_allclose(em.explained_variance_ratio, ratios, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(em.Cd[:, -1], Yflat[confident].mean(axis=0), rtol=1e-10)
    x0 = _init.project(Yflat, em.Cd)
    assert x0.shape == (B, T, want_dim)
    valid_scores = x0[mask > 0]
    np.testing.assert_allclose(np.cov(valid_scores, rowvar=False), np.eye(want_dim), atol=1e-6)
    # C C^T = Cpca^T Cov(u) Cpca: the covariance of the valid frames within the top-P subspace
    eigvec = np.linalg.eigh(np.cov(Yflat[confident], rowvar=False))[1][:, ::-1][:, :want_dim]
    proj = eigvec @ eigvec.T
    C = em.Cd[:, :-1]
    np.testing.assert_allclose(C @ C.T, proj @ np.cov(Yflat[mask > 0], rowvar=False) @ proj, atol=1e-8)


def test_fit_emission_full_rank_reconstructs_and_caps_auto_dim():
    """latent_dim = O' (full rank): C project(Yflat) + d = Yflat on every frame (padding
    included). Isotropic 22-dim data: the auto choice is capped at 10."""
    rng = np.random.default_rng(6)
    n_dim = 6
    Yflat = _low_rank_data(rng, 300, n_dim, scales=[4.0, 2.0, 1.0], noise=0.3)[None]
    mask = np.ones((1, 300))
    mask[0, 280:] = 0.0
    conf = np.ones((1, 300, 4))
    em = _init.fit_emission(Yflat, mask, conf, 0.5, n_dim)
    x0 = _init.project(Yflat, em.Cd)
    np.testing.assert_allclose(x0 @ em.Cd[:, :-1].T + em.Cd[:, -1], Yflat, atol=1e-8)
    iso = rng.normal(size=(1, 400, 22))
    em_iso = _init.fit_emission(iso, np.ones((1, 400)), np.ones((1, 400, 12)), 0.5, None)
    assert _cumulative_ratio_dim(iso[0])[0] > 10
    assert em_iso.latent_dim == 10


def test_fit_emission_low_confidence_fallback_warns():
    """Fewer than O' + 1 confident frames: a UserWarning, and PCA on all valid frames."""
    rng = np.random.default_rng(7)
    Yflat = _low_rank_data(rng, 50, 8, scales=[3.0, 1.0])[None]
    mask = np.ones((1, 50))
    mask[0, 45:] = 0.0
    conf = np.full((1, 50, 5), 0.1)
    conf[0, :5] = 1.0  # only 5 confident frames < 9
    with pytest.warns(UserWarning, match="conf_threshold"):
        em = _init.fit_emission(Yflat, mask, conf, 0.5, 2)
    assert em.n_pca_frames == 45
    np.testing.assert_allclose(em.Cd[:, -1], Yflat[0, :45].mean(axis=0), rtol=1e-10)


# --------------------------------------------------------------------------- #
# estimate_sigmasq_loc (spec 2.6)
# --------------------------------------------------------------------------- #
def _line_motion(T, step, K=4, D=2, seed=8):
    """Keypoints moving rigidly along a straight line by ``step`` per frame."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    body = rng.normal(size=(K, D))
    return body + (np.arange(T)[:, None] * step * direction)[:, None, :]


def test_estimate_sigmasq_loc_straight_line():
    """Constant step along a line: step^2 exactly with an odd median window; padded frames
    (garbage, mask 0) are ignored; segments are filtered separately. With the default even
    window (30) an edge step per segment may be shortened, so only bounds are checked."""
    step, T = 0.7, 80
    Y = np.stack([_line_motion(T, step), _line_motion(T, step, seed=9)])
    mask = np.ones((2, T))
    Y[1, 60:] = 1e4 * np.random.default_rng(0).normal(size=Y[1, 60:].shape)
    mask[1, 60:] = 0.0
    assert _init.estimate_sigmasq_loc(Y, mask, filter_size=5) == pytest.approx(step**2, rel=1e-12)
    # default even window (30): scipy's median picks one middle element, so a coordinate
    # moving in the negative direction lags by one frame and its first step is lost
    # (at most one shortened step per segment)
    n_steps = (T - 1) + 59
    got = np.sqrt(_init.estimate_sigmasq_loc(Y, mask))
    assert step * (n_steps - 2) / n_steps - 1e-12 <= got <= step + 1e-12
    # 3D and a single segment
    Y3 = _line_motion(50, 0.3, D=3)[None]
    assert _init.estimate_sigmasq_loc(Y3, np.ones((1, 50)), filter_size=7) == pytest.approx(0.09, rel=1e-12)


def test_estimate_sigmasq_loc_motionless_floor():
    """A motionless recording gives the floor 1e-8, not 0."""
    Y = np.broadcast_to(np.random.default_rng(1).normal(size=(4, 2)), (1, 40, 4, 2)).copy()
    assert _init.estimate_sigmasq_loc(Y, np.ones((1, 40))) == 1e-8
