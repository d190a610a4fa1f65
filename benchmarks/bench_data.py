"""Benchmark inputs written once to ``.npz``: synthetic mouse-like recordings and the shared real sets.

The synthetic generator is independent of the model: a 10-keypoint body (nose, ears,
head, neck, four spine points, tail base) moves in a 500 x 500 arena. A small number
of regimes (the "true syllables") follow a semi-Markov chain; each regime has its own
body bend oscillation, head sweep, body stretch, forward speed and turning rate. The
centroid reflects off the walls. Tracking noise is Gaussian, confidences are Beta draws,
and a few points are missing (NaN coordinates with confidence 0).

Layout of an ``.npz`` (one file per dataset): ``names`` (recordings), ``bodyparts``,
``anterior``/``posterior`` (bodypart names), and per recording ``coords/<name>``
(T, K, 2), ``conf/<name>`` (T, K) and, for synthetic data, ``truth/<name>`` (T,).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BODYPARTS = ["nose", "left_ear", "right_ear", "head", "neck", "spine1", "spine2", "spine3", "spine4", "tail_base"]
# body frame (x forward, y left), units of pixels; spine points are bent by the regime's curvature
_TEMPLATE = np.array([
    [30.0, 0.0], [18.0, 7.0], [18.0, -7.0], [20.0, 0.0], [12.0, 0.0],
    [4.0, 0.0], [-4.0, 0.0], [-12.0, 0.0], [-20.0, 0.0], [-28.0, 0.0],
])
# per regime: bend amplitude (rad), bend frequency (Hz), head sweep (rad), stretch amplitude,
# forward speed (px/frame), turning rate (rad/frame)
_REGIMES = np.array([
    [0.05, 0.5, 0.05, 0.00, 0.2, 0.00],   # pause
    [0.10, 2.0, 0.10, 0.05, 4.0, 0.00],   # run
    [0.40, 1.0, 0.15, 0.00, 1.0, 0.06],   # turn left
    [0.40, 1.0, 0.15, 0.00, 1.0, -0.06],  # turn right
    [0.05, 3.0, 0.50, 0.20, 0.3, 0.00],   # groom/rear-like: head sweep and stretch
])
FPS = 30.0
ARENA = 500.0


def _pose(bend, sweep, stretch):
    """Body-frame keypoints (K, 2) for one frame."""
    pts = _TEMPLATE.copy()
    pts[:, 0] *= 1.0 + stretch
    spine = np.arange(5, 10)
    # bend: rotate each posterior point about the neck by an angle growing along the spine
    for j, k in enumerate(spine):
        angle = bend * (j + 1) / len(spine)
        c, s = np.cos(angle), np.sin(angle)
        rel = pts[k] - pts[4]
        pts[k] = pts[4] + [c * rel[0] - s * rel[1], s * rel[0] + c * rel[1]]
    c, s = np.cos(sweep), np.sin(sweep)
    for k in range(4):  # nose, ears, head swing about the neck
        rel = pts[k] - pts[4]
        pts[k] = pts[4] + [c * rel[0] - s * rel[1], s * rel[0] + c * rel[1]]
    return pts - pts.mean(0)


def synthetic_recording(rng, n_frames, mean_duration=25.0, noise=1.5, missing=0.002):
    """(coords (T, K, 2), conf (T, K), regimes (T,)) of one recording."""
    n_regimes = len(_REGIMES)
    regimes = np.empty(n_frames, dtype=np.int64)
    t = 0
    current = rng.integers(n_regimes)
    while t < n_frames:
        length = max(3, int(rng.geometric(1.0 / mean_duration)))
        regimes[t:t + length] = current
        t += length
        current = (current + rng.integers(1, n_regimes)) % n_regimes
    heading = rng.uniform(-np.pi, np.pi)
    centre = rng.uniform(100, ARENA - 100, 2)
    phase = rng.uniform(0, 2 * np.pi, 3)
    coords = np.empty((n_frames, len(BODYPARTS), 2))
    for t in range(n_frames):
        amp, freq, sweep_amp, stretch_amp, speed, turn = _REGIMES[regimes[t]]
        phase += 2 * np.pi * freq / FPS * np.array([1.0, 1.3, 0.7])
        pose = _pose(amp * np.sin(phase[0]), sweep_amp * np.sin(phase[1]), stretch_amp * np.sin(phase[2]))
        heading += turn + rng.normal(0, 0.02)
        step = speed * np.array([np.cos(heading), np.sin(heading)]) + rng.normal(0, 0.3, 2)
        centre = centre + step
        for d in range(2):  # reflect off the walls
            if centre[d] < 40 or centre[d] > ARENA - 40:
                centre[d] = np.clip(centre[d], 40, ARENA - 40)
                heading = np.pi - heading if d == 0 else -heading
        c, s = np.cos(heading), np.sin(heading)
        coords[t] = pose @ np.array([[c, s], [-s, c]]) + centre
    coords += rng.normal(0, noise, coords.shape)
    conf = rng.beta(8.0, 1.5, coords.shape[:2])
    gone = rng.random(coords.shape[:2]) < missing
    coords[gone] = np.nan
    conf[gone] = 0.0
    return coords, conf, regimes


def write_synthetic(path, n_recordings, n_frames, seed=0):
    """Write ``n_recordings`` synthetic recordings of ``n_frames`` frames to ``path`` (seeded)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    names = [f"rec{r}" for r in range(n_recordings)]
    for name in names:
        coords, conf, truth = synthetic_recording(rng, n_frames)
        arrays[f"coords/{name}"], arrays[f"conf/{name}"], arrays[f"truth/{name}"] = coords, conf, truth
    np.savez_compressed(path, names=np.array(names), bodyparts=np.array(BODYPARTS),
                        anterior=np.array(["nose"]), posterior=np.array(["tail_base"]), **arrays)
    return Path(path)


REAL_SETS = {
    # name: (files relative to the shared real-data folder, source software, anterior, posterior)
    "bsoid": (["bsoid_openfield_dlc/raw_clip1DLC_resnet50_OpenFieldHighResApr8shuffle1_1030000.h5",
               "bsoid_openfield_dlc/raw_clip2DLC_resnet50_OpenFieldHighResApr8shuffle1_1030000.h5"],
              "DeepLabCut", None, None),
    "jabs": (["jabs_openfield/sample_pose_est_v2.h5"], "JABS", ["NOSE"], ["BASE_TAIL"]),
}


def write_real(path, real_dir, name):
    """Export one shared real set to the benchmark ``.npz`` layout (both implementations read the same arrays)."""
    from kpms_estimators.io import load_poses

    files, software, anterior, posterior = REAL_SETS[name]
    arrays, names, bodyparts = {}, [], None
    for i, rel in enumerate(files):
        ds = load_poses(Path(real_dir) / rel, source_software=software)
        if "individuals" in ds.dims:
            ds = ds.isel(individuals=0)
        rec = f"{name}{i}"
        names.append(rec)
        arrays[f"coords/{rec}"] = ds["position"].transpose("time", "keypoints", "space").values[..., :2]
        arrays[f"conf/{rec}"] = ds["confidence"].transpose("time", "keypoints").values
        bodyparts = [str(k) for k in ds["keypoints"].values]
    anterior = anterior or [bodyparts[0]]
    posterior = posterior or [bodyparts[-1]]
    np.savez_compressed(path, names=np.array(names), bodyparts=np.array(bodyparts),
                        anterior=np.array(anterior), posterior=np.array(posterior), **arrays)
    return Path(path)


#: Frames of the centroid's median filter in ``sigmasq_loc``: the reference config's fps.
FILTER_FRAMES = 30


def sigmasq_loc(path) -> float:
    """The centroid random walk's variance both implementations get for a dataset: the estimator
    both have, ``estimate_sigmasq_loc(data["Y"], data["mask"], filter_size=fps)``, on the formatted
    data (computed here with kpms_estimators; each worker also records its own estimate)."""
    from kpms_estimators import fitting

    names, bodyparts, _, _, coords, confs, _ = read(path)
    data, _ = fitting.format_data(coords, confs, bodyparts=bodyparts, use_bodyparts=bodyparts)
    return float(fitting.estimate_sigmasq_loc(data["Y"], data["mask"], filter_size=FILTER_FRAMES))


def read(path):
    """(names, bodyparts, anterior, posterior, coords, confs, truth or None) from a benchmark ``.npz``."""
    f = np.load(path)
    names = [str(n) for n in f["names"]]
    coords = {n: f[f"coords/{n}"] for n in names}
    confs = {n: f[f"conf/{n}"] for n in names}
    truth = {n: f[f"truth/{n}"] for n in names} if f"truth/{names[0]}" in f else None
    return (names, [str(b) for b in f["bodyparts"]], [str(a) for a in f["anterior"]],
            [str(p) for p in f["posterior"]], coords, confs, truth)
