"""Tests for the pose-file loaders ``kpms_estimators.io``.

Real files come from ``shared/data/real`` (skipped where absent); the facts checked here
(keypoints, frame and individual counts) are the ones in each subfolder's README.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from kpms_estimators import _data
from kpms_estimators.io import JABS_KEYPOINTS, load_many, load_poses

BSOID_KP = ["Snout", "Front Paw R", "Front Paw L", "Hind Paw R", "Hind Paw L",
            "Butt/Proximal Tail"]
DEEPOF_KP = ["Nose", "Left_ear", "Right_ear", "Left_fhip", "Right_fhip", "Left_bhip",
             "Right_bhip", "Spine_1", "Center", "Spine_2", "Tail_base", "Tail_1", "Tail_2",
             "Tail_tip"]
SLEAP_KP = ["head", "thorax", "abdomen", "wingL", "wingR", "forelegL4", "forelegR4",
            "midlegL4", "midlegR4", "hindlegL4", "hindlegR4", "eyeL", "eyeR"]
BSOID = "bsoid_openfield_dlc/raw_clip{}DLC_resnet50_OpenFieldHighResApr8shuffle1_1030000"
JABS = "jabs_openfield/sample_pose_est_{}.h5"
SLEAP = "sleap_fly_courtship/predictions.analysis.h5"
SLOTS = [f"individual_{i}" for i in range(6)]

# (file, software, frames, keypoints, individuals kept, individuals dropped)
REAL_FILES = [
    *[(BSOID.format(c) + ext, "DeepLabCut", 7200, BSOID_KP, ["individual_0"], [])
      for c in (1, 2) for ext in (".csv", ".h5")],
    *[(f"deepof_topview_dlc/{n}DLC_square_arena.h5", "DeepLabCut", 451, DEEPOF_KP,
       ["individual_0"], []) for n in ("test", "test2")],
    (JABS.format("v2"), "JABS", 1800, list(JABS_KEYPOINTS), ["individual_0"], []),
    (JABS.format("v3"), "JABS", 1800, list(JABS_KEYPOINTS), SLOTS[:3], SLOTS[3:5]),
    (JABS.format("v5"), "JABS", 1800, list(JABS_KEYPOINTS), SLOTS[:4], SLOTS[4:]),
    (SLEAP, "SLEAP", 3000, SLEAP_KP, ["track_0", "track_1"], []),
]


def load_real(path: Path, dropped: list[str], **kwargs) -> xr.Dataset:
    """``load_poses``, expecting the warning about dropped empty individuals if any."""
    if not dropped:
        return load_poses(path, **kwargs)
    with pytest.warns(UserWarning, match="dropping individual") as record:
        ds = load_poses(path, **kwargs)
    assert all(name in str(record[0].message) for name in dropped)
    return ds


def raw_jabs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """JABS ``points`` and ``confidence`` as stored (points are (y, x))."""
    with h5py.File(path, "r") as f:
        return f["poseest/points"][()], f["poseest/confidence"][()]


# ------------------------------------------------------------------------------- real files


@pytest.mark.parametrize("name, software, n_frames, keypoints, individuals, dropped",
                         REAL_FILES, ids=[Path(f[0]).name for f in REAL_FILES])
def test_real_file_layout(real_data_dir, name, software, n_frames, keypoints, individuals,
                          dropped):
    path = real_data_dir / name
    ds = load_real(path, dropped)
    assert ds["position"].dims == ("time", "space", "keypoints", "individuals")
    assert ds["confidence"].dims == ("time", "keypoints", "individuals")
    assert ds["position"].dtype == ds["confidence"].dtype == np.float64
    assert ds.sizes == {"time": n_frames, "space": 2, "keypoints": len(keypoints),
                        "individuals": len(individuals)}
    np.testing.assert_array_equal(ds["time"].values, np.arange(n_frames))
    assert ds["time"].dtype.kind == "i"
    assert ds["space"].values.tolist() == ["x", "y"]
    assert ds["keypoints"].values.tolist() == keypoints
    assert ds["individuals"].values.tolist() == individuals
    assert ds.attrs == {"source_software": software, "source_file": str(path)}
    assert load_real(path, dropped, source_software=software.upper()).identical(ds)
    missing = ds["position"].isnull().any("space")
    assert (ds["confidence"].where(missing) == 0).sum() == missing.sum()
    assert np.isfinite(ds["confidence"].values).all()


@pytest.mark.parametrize("clip", [1, 2])
def test_dlc_csv_and_h5_agree(real_data_dir, clip):
    stem = real_data_dir / BSOID.format(clip)
    csv, h5 = load_poses(f"{stem}.csv"), load_poses(f"{stem}.h5")
    for var in ("position", "confidence"):
        np.testing.assert_allclose(csv[var].values, h5[var].values, rtol=0, atol=1e-9)
    assert not np.isnan(h5["position"].values).any()  # README: no NaNs


@pytest.mark.parametrize("version, dropped", [("v2", []), ("v5", SLOTS[4:])])
def test_jabs_points_swapped_to_xy(real_data_dir, version, dropped):
    path = real_data_dir / JABS.format(version)
    ds = load_real(path, dropped)
    points, conf = raw_jabs(path)
    if points.ndim == 3:
        points, conf = points[:, None], conf[:, None]
    slot, k = ds.sizes["individuals"] - 1, JABS_KEYPOINTS.index("CENTER_SPINE")
    t = int(np.flatnonzero(conf[:, slot, k] > 0)[0])  # first frame with the point
    y, x = points[t, slot, k]
    point = ds["position"].isel(time=t, individuals=slot).sel(keypoints="CENTER_SPINE")
    assert point.sel(space="x") == x and point.sel(space="y") == y
    kept = [int(n.split("_")[1]) for n in ds["individuals"].values]
    np.testing.assert_array_equal(ds["position"].values.transpose(0, 3, 2, 1)[..., ::-1],
                                  np.where((conf > 0)[..., None], points, np.nan)[:, kept])


def test_jabs_missing_points_are_nan_with_zero_confidence(real_data_dir):
    path = real_data_dir / JABS.format("v3")
    with pytest.warns(UserWarning, match="individual_3', 'individual_4'"):
        ds = load_poses(path)
    _, conf = raw_jabs(path)
    conf = conf[:, :3]  # slots 3-4 (partial tracks) are dropped
    missing = (conf == 0).transpose(0, 2, 1)  # (time, keypoints, individuals)
    assert 0.0 < missing.mean() < 0.6
    assert np.isnan(ds["position"].values).all(1)[missing].all()
    assert not np.isnan(ds["position"].values).any(1)[~missing].any()
    np.testing.assert_array_equal(ds["confidence"].values, conf.transpose(0, 2, 1))


def test_sleap_matches_raw_tracks(real_data_dir):
    path = real_data_dir / SLEAP
    ds = load_poses(path)
    with h5py.File(path, "r") as f:
        tracks = f["tracks"][()]  # (tracks, xy, nodes, frames)
    np.testing.assert_array_equal(ds["position"].values, tracks.transpose(3, 1, 2, 0))
    present = ~ds["position"].isnull().any("space")
    assert 0.01 < 1 - float(present.mean()) < 0.03  # README: 2.0 % NaN
    # no point_scores in this export: confidence 1 where a point exists, 0 where missing
    np.testing.assert_array_equal(ds["confidence"].values, present.values.astype(float))


def test_fps_gives_time_in_seconds(real_data_dir):
    ds = load_poses(real_data_dir / JABS.format("v2"), fps=30)
    assert ds.attrs["fps"] == 30.0
    np.testing.assert_allclose(ds["time"].values, np.arange(1800) / 30.0)


@pytest.mark.parametrize("folder, n_recordings", [
    ("bsoid_openfield_dlc", 2), ("deepof_topview_dlc", 2), ("sleap_fly_courtship", 2)])
def test_adapter_accepts_folder(real_data_dir, folder, n_recordings):
    if folder == "bsoid_openfield_dlc":
        with pytest.warns(UserWarning, match="loading only") as record:
            poses = load_many(real_data_dir / folder)
        assert len(record) == 2
        assert all(key.startswith("raw_clip") for key in poses)
    else:
        poses = load_many(real_data_dir / folder)
    recordings = _data.from_poses(poses, min_length=7)
    assert len(recordings.names) == n_recordings
    assert recordings.kind == "poses"


def test_adapter_on_jabs_folder(real_data_dir):
    """v5 slots 4-5 are empty; v3 slots 3-4 hold detections but never a NOSE (partial
    tracks beside complete ones): all four are dropped with warnings, and the adapter
    accepts the rest."""
    with pytest.warns(UserWarning) as record:
        poses = load_many(real_data_dir / "jabs_openfield")
    messages = " ".join(str(w.message) for w in record)
    assert "'individual_3', 'individual_4'" in messages and "'individual_4', 'individual_5'" in messages
    assert list(poses) == ["sample_pose_est_v2", "sample_pose_est_v3", "sample_pose_est_v5"]
    recordings = _data.from_poses(poses, min_length=7)
    assert len(recordings.names) == 1 + 3 + 4
    assert "sample_pose_est_v5:individual_3" in recordings.names


# -------------------------------------------------------------------------- synthetic files


def dlc_table(n_frames=8, individuals=("m1", "m2"), keypoints=("nose", "tail")):
    """A DeepLabCut table; without ``individuals`` it has the single-animal header."""
    levels = [["scorer0"], list(individuals), list(keypoints), ["x", "y", "likelihood"]]
    names = ["scorer", "individuals", "bodyparts", "coords"]
    if not individuals:
        del levels[1], names[1]
    columns = pd.MultiIndex.from_product(levels, names=names)
    values = np.random.default_rng(0).uniform(1, 100, (n_frames, len(columns)))
    return pd.DataFrame(values, columns=columns)


def write_sleap(path: Path, n_tracks=2, n_frames=9, scores=True, track_names=True) -> Path:
    rng = np.random.default_rng(1)
    tracks = rng.uniform(0, 50, (n_tracks, 2, 3, n_frames))
    tracks[0, :, 1, 2] = np.nan
    with h5py.File(path, "w") as f:
        f["tracks"] = tracks
        f["node_names"] = np.array([b"a", b"b", b"c"])
        f["track_names"] = np.array([f"t{i}".encode() for i in range(n_tracks * track_names)],
                                    dtype="S4")
        if scores:
            f["point_scores"] = rng.uniform(0.5, 1, (n_tracks, 3, n_frames))
    return path


def write_jabs(path: Path, n_frames=9) -> Path:
    points = np.arange(n_frames * 12 * 2, dtype=np.uint16).reshape(n_frames, 12, 2)
    conf = np.ones((n_frames, 12), dtype=np.float32)
    conf[3, 5] = 0
    with h5py.File(path, "w") as f:
        f["poseest/points"] = points
        f["poseest/confidence"] = conf
    return path


@pytest.mark.parametrize("ext", [".csv", ".h5"])
def test_dlc_multi_animal(tmp_path, ext):
    table = dlc_table(individuals=("m1", "m2", "ghost"))
    table.loc[:, (slice(None), "ghost")] = np.nan
    table.iloc[2, 0] = np.nan  # m1 nose x
    path = tmp_path / f"rec{ext}"
    if ext == ".csv":
        table.to_csv(path)
    else:
        table.to_hdf(path, key="df_with_missing", format="table", mode="w")
    with pytest.warns(UserWarning, match=r"dropping individual\(s\) \['ghost'\]"):
        ds = load_poses(path)
    assert ds["individuals"].values.tolist() == ["m1", "m2"]
    assert ds["keypoints"].values.tolist() == ["nose", "tail"]
    expected = table["scorer0"]["m2"]["tail"]
    np.testing.assert_allclose(ds["position"].sel(individuals="m2", keypoints="tail",
                                                  space="y"), expected["y"], atol=1e-9)
    np.testing.assert_allclose(ds["confidence"].sel(individuals="m2", keypoints="tail"),
                               expected["likelihood"], atol=1e-9)
    assert np.isnan(ds["position"].values[2, 0, 0, 0])  # m1 nose x; y is left as it is
    assert ds["confidence"].values[2, 0, 0] == 0.0


def test_dlc_single_animal_csv_detected(tmp_path):
    path = tmp_path / "single.csv"
    dlc_table(individuals=()).to_csv(path)
    ds = load_poses(path)
    assert ds.attrs["source_software"] == "DeepLabCut"
    assert ds["individuals"].values.tolist() == ["individual_0"]


def test_sleap_point_scores_and_unnamed_track(tmp_path):
    ds = load_poses(write_sleap(tmp_path / "one.h5", n_tracks=1, track_names=False),
                    source_software="sleap")
    assert ds["individuals"].values.tolist() == ["individual_0"]
    with h5py.File(tmp_path / "one.h5", "r") as f:
        scores = f["point_scores"][()]
    assert ds["confidence"].values[2, 1, 0] == 0.0  # NaN point
    assert ds["confidence"].values[4, 2, 0] == scores[0, 2, 4]


def test_jabs_single_synthetic(tmp_path):
    ds = load_poses(write_jabs(tmp_path / "pose_est_v2.h5"), source_software="Jabs")
    assert ds["position"].values[0, :, 0, 0].tolist() == [1.0, 0.0]  # stored (y=0, x=1)
    assert np.isnan(ds["position"].values[3, :, 5, 0]).all()
    assert ds["confidence"].values[3, 5, 0] == 0.0


# ---------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        load_poses(path)
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        load_many([path])


@pytest.mark.parametrize("name, write", [
    ("notes.txt", lambda p: p.write_text("hello\nworld\n")),
    ("table.csv", lambda p: pd.DataFrame({"a": [1, 2]}).to_csv(p)),
    ("other.h5", lambda p: h5py.File(p, "w").close()),
])
def test_undetectable_format(tmp_path, name, write):
    write(tmp_path / name)
    with pytest.raises(ValueError, match=rf"{name}: expected .*DeepLabCut.*SLEAP.*JABS"):
        load_poses(tmp_path / name)


def test_unknown_software_name(tmp_path):
    path = write_jabs(tmp_path / "a.h5")
    with pytest.raises(ValueError, match="'MoSeq'.*DeepLabCut, SLEAP, JABS"):
        load_poses(path, source_software="MoSeq")


@pytest.mark.parametrize("writer, software, missing", [
    ("sleap", "JABS", "group 'poseest'"),
    ("jabs", "SLEAP", r"\['tracks', 'node_names'\]"),
    ("jabs", "DeepLabCut", "no pandas table"),
    ("csv", "DeepLabCut", "header rows scorer"),
    ("csv", "SLEAP", "not an HDF5 file"),
])
def test_content_does_not_match_software(tmp_path, writer, software, missing):
    path = tmp_path / f"file_{writer}.{'csv' if writer == 'csv' else 'h5'}"
    if writer == "sleap":
        write_sleap(path)
    elif writer == "jabs":
        write_jabs(path)
    else:
        pd.DataFrame({"a": [1, 2]}).to_csv(path)
    with pytest.raises(ValueError, match=rf"{path.name}.*{missing}"):
        load_poses(path, source_software=software)


def test_invalid_fps_and_empty_file(tmp_path):
    path = write_jabs(tmp_path / "a.h5")
    with pytest.raises(ValueError, match="fps must be a positive number"):
        load_poses(path, fps=0)
    table = dlc_table(individuals=())
    table.loc[:, :] = np.nan
    table.to_csv(tmp_path / "empty.csv")
    with pytest.raises(ValueError, match="empty.csv has no tracked point"):
        load_poses(tmp_path / "empty.csv")


# ------------------------------------------------------------------------------- load_many


def test_load_many_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_jabs(tmp_path / "a" / "rec.h5")
    write_sleap(tmp_path / "b" / "rec.h5")
    write_jabs(tmp_path / "a" / "rec_2.h5")
    (tmp_path / "a" / "README.md").write_text("not a pose file")
    assert list(load_many(tmp_path / "a")) == ["rec", "rec_2"]
    assert list(load_many(str(tmp_path / "*" / "rec.h5"))) == ["rec", "rec_2"]
    files = [tmp_path / "a" / "rec.h5", tmp_path / "b" / "rec.h5", tmp_path / "a" / "rec_2.h5"]
    assert list(load_many(files)) == ["rec", "rec_3", "rec_2"]
    poses = load_many([tmp_path / "b" / "rec.h5", tmp_path / "a" / "rec.h5"], fps=25)
    assert list(poses) == ["rec", "rec_2"]
    assert poses["rec"].attrs["source_software"] == "SLEAP"
    assert poses["rec_2"].attrs["fps"] == 25.0
    assert list(load_many(tmp_path / "a" / "rec.h5")) == ["rec"]


def test_load_many_prefers_h5_over_csv_twin(tmp_path):
    table = dlc_table(individuals=())
    table.to_csv(tmp_path / "clip.csv")
    table.to_hdf(tmp_path / "clip.h5", key="df_with_missing", format="table", mode="w")
    with pytest.warns(UserWarning, match="clip.csv and .*clip.h5 hold the same recording"):
        poses = load_many(tmp_path)
    assert list(poses) == ["clip"]
    assert poses["clip"].attrs["source_file"].endswith("clip.h5")


def test_load_many_nothing_to_load(tmp_path):
    with pytest.raises(FileNotFoundError, match="No pose files .* in directory"):
        load_many(tmp_path)
    with pytest.raises(FileNotFoundError, match="No pose files .* in pattern"):
        load_many(str(tmp_path / "*.h5"))
    with pytest.raises(ValueError, match="empty list"):
        load_many([])
