"""Tests for the input adapter ``kpms_estimators._data``."""

import numpy as np
import pytest
import xarray as xr
from scipy import sparse

from kpms_estimators._data import (
    MIN_FRAGMENT_LENGTH,
    OVERLAP,
    Batch,
    Recordings,
    as_recordings,
    choose_seg_length,
    from_features,
    from_poses,
    make_batch,
    to_rows,
    unbatch,
)

RNG = np.random.default_rng(0)


def pose_dataset(n_frames=12, keypoints=("nose", "body", "tail"), individuals=None,
                 n_space=2, conf=True, seed=0):
    """A movement-layout Dataset with dims (time, space, keypoints[, individuals])."""
    rng = np.random.default_rng(seed)
    dims = ["time", "space", "keypoints"]
    shape = [n_frames, n_space, len(keypoints)]
    coords = {"time": np.arange(n_frames) / 30.0, "space": ["x", "y", "z"][:n_space],
              "keypoints": list(keypoints)}
    if individuals is not None:
        dims.append("individuals")
        shape.append(len(individuals))
        coords["individuals"] = list(individuals)
    data = {"position": (dims, rng.normal(size=shape))}
    if conf:
        cdims = [d for d in dims if d != "space"]
        data["confidence"] = (cdims, rng.uniform(0.1, 1.0, size=[s for d, s in zip(dims, shape)
                                                                  if d != "space"]))
    return xr.Dataset(data, coords=coords)


def features(lengths, n_features=3, ids=None):
    X = RNG.normal(size=(sum(lengths), n_features))
    if ids is None:
        ids = [f"rec{i}" for i in range(len(lengths))]
    return X, np.repeat(np.array(ids, dtype=object), lengths)


# ------------------------------------------------------------------------------ valid input


def test_features_split_by_first_appearance():
    X, ids = features([5, 7, 6], ids=["c", 1, "a"])
    rec = as_recordings(X, ids, min_length=4)
    assert rec.kind == "features" and rec.names == ("c", "1", "a")
    assert rec.lengths.tolist() == [5, 7, 6] and rec.n_rows == 18
    np.testing.assert_array_equal(rec.arrays[1], X[5:12])
    np.testing.assert_array_equal(rec.rows[2], np.arange(12, 18))
    np.testing.assert_array_equal(rec.times[0], np.arange(5))
    assert rec.confidences is None and rec.keypoints is None
    assert not rec.arrays[0].flags.writeable


def test_features_without_ids_is_one_recording():
    X = RNG.normal(size=(9, 2)).astype(np.float32)
    rec = from_features(X, min_length=4)
    assert rec.names == ("0",) and rec.arrays[0].dtype == np.float64


def test_lone_dataset_one_recording_per_individual():
    ds = pose_dataset(individuals=["mouse2", "mouse1"])
    rec = as_recordings(ds, min_length=4)
    assert rec.kind == "poses" and rec.source_type == "dataset"
    assert rec.names == ("mouse1", "mouse2")  # sorted
    assert rec.keypoints == ("nose", "body", "tail") and rec.space == ("x", "y")
    expected = ds.position.sel(individuals="mouse1").transpose("time", "keypoints", "space")
    np.testing.assert_array_equal(rec.arrays[0], expected.values)
    np.testing.assert_array_equal(rec.confidences[0],
                                  ds.confidence.sel(individuals="mouse1").values)
    np.testing.assert_array_equal(rec.times[1], ds.time.values)
    assert rec.individuals == ("mouse1", "mouse2") and rec.sources == (None, None)


def test_dataset_without_individuals_is_named_0():
    rec = from_poses(pose_dataset(), min_length=4)
    assert rec.names == ("0",) and rec.individuals == (None,)


def test_dict_names_and_missing_confidences_filled_with_ones():
    X = {"zeta": RNG.normal(size=(10, 3, 2)),
         "alpha": pose_dataset(individuals=["m1", "m2"]),
         "mid": pose_dataset(individuals=["only"])}
    rec = as_recordings(X, min_length=4)
    assert rec.names == ("alpha:m1", "alpha:m2", "mid", "zeta")
    assert rec.sources == ("alpha", "alpha", "mid", "zeta")
    assert rec.individuals == ("m1", "m2", "only", None)
    assert rec.keypoints == ("nose", "body", "tail")
    np.testing.assert_array_equal(rec.confidences[3], np.ones((10, 3)))
    np.testing.assert_array_equal(rec.times[3], np.arange(10))
    assert rec.n_rows == 12 + 12 + 12 + 10


def test_dict_of_arrays_has_no_confidences_and_default_labels():
    rec = from_poses({"b": np.zeros((6, 2, 3)), "a": np.ones((5, 2, 3))}, min_length=4)
    assert rec.names == ("a", "b") and rec.confidences is None
    assert rec.keypoints == ("kp0", "kp1") and rec.space == ("x", "y", "z")


@pytest.mark.parametrize("order", [("time", "space", "keypoints", "individuals"),
                                   ("individuals", "keypoints", "time", "space"),
                                   ("space", "individuals", "time", "keypoints")])
@pytest.mark.parametrize("singular", [False, True])
def test_dim_names_and_orders(order, singular):
    ds = pose_dataset(individuals=["a", "b"])
    ref = as_recordings(ds, min_length=4)
    ds = ds.transpose(*order)
    if singular:
        ds = ds.rename({"keypoints": "keypoint", "individuals": "individual"})
    rec = as_recordings(ds, min_length=4)
    assert rec.names == ref.names and rec.keypoints == ref.keypoints
    for got, want in zip(rec.arrays + rec.confidences, ref.arrays + ref.confidences):
        np.testing.assert_array_equal(got, want)


def test_keypoints_subset_and_reorder():
    ds = pose_dataset(keypoints=("nose", "body", "tail"))
    rec = as_recordings(ds, min_length=4, keypoints=["tail", "nose"])
    assert rec.keypoints == ("tail", "nose")
    pos = ds.position.transpose("time", "keypoints", "space").values
    np.testing.assert_array_equal(rec.arrays[0], pos[:, [2, 0]])
    np.testing.assert_array_equal(rec.confidences[0], ds.confidence.values[:, [2, 0]])


def test_missing_points_interpolated_with_held_edges():
    pos = np.arange(6 * 2 * 2, dtype=float).reshape(6, 2, 2)
    x = pos.copy()
    x[[0, 2, 3, 5], 0, 0] = np.nan  # keypoint 0 seen only at frames 1 and 4
    x[2, 1, 1] = np.nan  # one NaN coordinate makes the whole point missing
    rec = from_poses({"r": x}, min_length=4)
    out = rec.arrays[0]
    np.testing.assert_allclose(out[:, 0], [pos[1, 0], pos[1, 0], pos[2, 0], pos[3, 0],
                                           pos[4, 0], pos[4, 0]])
    np.testing.assert_allclose(out[:, 1], pos[:, 1])  # linear data: interpolation exact
    expected_conf = np.ones((6, 2))
    expected_conf[[0, 2, 3, 5], 0] = 0.0
    expected_conf[2, 1] = 0.0
    np.testing.assert_array_equal(rec.confidences[0], expected_conf)


def test_nan_confidence_at_missing_point_becomes_zero():
    ds = pose_dataset()
    ds.position[3, :, 1] = np.nan
    ds.confidence[3, 1] = np.nan
    rec = from_poses(ds, min_length=4)
    assert rec.confidences[0][3, 1] == 0.0 and np.isfinite(rec.arrays[0]).all()


# ------------------------------------------------------------------------------- bad input


def test_features_1d_and_3d_name_shape():
    with pytest.raises(ValueError, match=r"shape \(5,\).*Reshape your data"):
        from_features(np.ones(5), min_length=1)
    with pytest.raises(ValueError, match=r"2D array.*shape \(4, 3, 2\)"):
        as_recordings(np.ones((4, 3, 2)), min_length=1)


def test_sklearn_messages_kept():
    with pytest.raises(ValueError, match="Input X contains NaN"):
        from_features(np.array([[1.0, np.nan]] * 5), min_length=1)
    with pytest.raises(ValueError, match="Complex data not supported"):
        from_features(np.ones((5, 2)) + 1j, min_length=1)
    for fmt in ["csr", "dok", "coo"]:  # a dok matrix is also a dict
        with pytest.raises(TypeError, match="Sparse data"):
            as_recordings(sparse.csr_matrix(np.ones((5, 2))).asformat(fmt), min_length=1)
    with pytest.raises(ValueError, match=r"0 feature\(s\) \(shape=\(12, 0\)\)"):
        from_features(np.empty((12, 0)), min_length=1)
    with pytest.raises(ValueError, match=r"0 sample\(s\)"):
        from_features(np.empty((0, 3)), min_length=1)
    with pytest.raises(ValueError, match="could not convert"):
        from_features(np.array([["a", "b"]] * 5), min_length=1)
    X = np.ones((5, 2), dtype=object)
    X[0, 0] = {"foo": "bar"}
    with pytest.raises(TypeError, match="argument must be .* string.* number"):
        from_features(X, min_length=1)


def test_features_infinite_value_names_recording():
    X, ids = features([5, 5], ids=["a", "b"])
    X[7, 1] = np.inf
    with pytest.raises(ValueError, match=r"infinity.*row 7 \(recording 'b'\)"):
        from_features(X, ids, min_length=1)


def test_short_recording_features():
    X, ids = features([6, 2], ids=["long", "short"])
    with pytest.raises(ValueError, match=r"'short' has 2 frame.*n_samples = 2.*at least 4"):
        from_features(X, ids, min_length=4)
    with pytest.raises(ValueError, match="n_samples = 1"):
        from_features(np.ones((1, 10)), min_length=2)


def test_short_recording_poses():
    with pytest.raises(ValueError, match=r"'b' has 3 frame.*n_samples = 3.*at least 5"):
        from_poses({"a": np.ones((8, 2, 2)), "b": np.ones((3, 2, 2))}, min_length=5)


def test_sequence_ids_wrong_length():
    with pytest.raises(ValueError, match=r"expected shape \(10,\), got \(9,\)"):
        from_features(np.ones((10, 2)), np.zeros(9), min_length=1)


def test_sequence_ids_not_contiguous():
    ids = ["a"] * 3 + ["b"] * 3 + ["a"] * 3
    with pytest.raises(ValueError, match=r"'a' occupies rows 0-2 and reappears at row 6"):
        from_features(np.ones((9, 2)), ids, min_length=1)


def test_sequence_ids_with_colliding_names():
    with pytest.raises(ValueError, match="both map to recording name '1'"):
        from_features(np.ones((8, 2)), np.array([1] * 4 + ["1"] * 4, dtype=object),
                      min_length=1)


def test_unsupported_type_and_misplaced_arguments():
    with pytest.raises(TypeError, match="Unsupported input type str.*2D array-like.*Dataset"):
        as_recordings("poses.h5", min_length=1)
    with pytest.raises(TypeError, match="Unsupported input type NoneType"):
        as_recordings(None, min_length=1)
    with pytest.raises(ValueError, match="sequence_ids applies only to 2D"):
        as_recordings(pose_dataset(), [0] * 12, min_length=1)
    with pytest.raises(ValueError, match="keypoints= .* does not apply to 2D"):
        as_recordings(np.ones((5, 2)), min_length=1, keypoints=["a"])
    with pytest.raises(TypeError, match="'r' is an xarray.DataArray"):
        from_poses({"r": pose_dataset().position}, min_length=1)


@pytest.mark.parametrize("shape", [(10, 6), (10, 3, 2, 1)])
def test_pose_array_not_3d(shape):
    with pytest.raises(ValueError, match=rf"recording 'r' have shape \({shape[0]}, {shape[1]}"):
        from_poses({"r": np.ones(shape)}, min_length=1)


def test_pose_space_dim_not_2_or_3():
    with pytest.raises(ValueError, match=r"'r' have shape \(10, 3, 4\).*2 or 3"):
        from_poses({"r": np.ones((10, 3, 4))}, min_length=1)


def test_keypoint_count_mismatch_names_both():
    with pytest.raises(ValueError, match=r"'a' and 'b' differ in keypoint count: 3 vs 4"):
        from_poses({"a": np.ones((10, 3, 2)), "b": np.ones((10, 4, 2))}, min_length=1)


def test_keypoint_names_mismatch_names_both():
    X = {"a": pose_dataset(keypoints=("nose", "tail")),
         "b": pose_dataset(keypoints=("ear", "tail"))}
    with pytest.raises(ValueError, match=r"'a' and 'b' have different keypoint names"):
        from_poses(X, min_length=1)


def test_unknown_keypoints_listed_with_available():
    with pytest.raises(ValueError, match=r"\['paw'\] not found.*\['nose', 'body', 'tail'\]"):
        from_poses(pose_dataset(), min_length=1, keypoints=["nose", "paw"])


def test_non_numeric_poses():
    with pytest.raises(TypeError, match="positions of recording 'r'.*dtype <U1"):
        from_poses({"r": np.full((5, 2, 2), "a")}, min_length=1)
    bad = np.ones((5, 2, 2), dtype=object)
    bad[0, 0, 0] = {"a": 1}
    with pytest.raises(TypeError, match="Non-numeric positions of recording 'r'"):
        from_poses({"r": bad}, min_length=1)


def test_infinite_position_names_recording_and_keypoint():
    ds = pose_dataset(individuals=["m1", "m2"])
    ds.position.loc[dict(individuals="m2", keypoints="body")] = np.inf
    with pytest.raises(ValueError, match=r"Infinite position in recording 'm2', keypoint 'body'"):
        from_poses(ds, min_length=1)


def test_all_nan_keypoint():
    ds = pose_dataset()
    ds.position.loc[dict(keypoints="tail")] = np.nan
    with pytest.raises(ValueError, match=r"Keypoint 'tail' is NaN in every frame of recording"
                                         r" '0'"):
        from_poses({"0": ds}, min_length=1)


def test_negative_confidence():
    ds = pose_dataset()
    ds.confidence[4, 2] = -0.5
    with pytest.raises(ValueError, match=r"Negative confidence.*'rec', keypoint 'tail'"):
        from_poses({"rec": ds}, min_length=1)


def test_nan_confidence_where_position_present():
    ds = pose_dataset()
    ds.confidence[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN confidence.*'rec', keypoint 'nose' \(frame 2\)"):
        from_poses({"rec": ds}, min_length=1)


def test_empty_inputs():
    with pytest.raises(ValueError, match="No recordings: the input dict is empty"):
        as_recordings({}, min_length=1)
    with pytest.raises(ValueError, match="'r' has zero frames"):
        from_poses({"r": np.ones((0, 3, 2))}, min_length=1)
    with pytest.raises(ValueError, match="empty individuals dim"):
        from_poses(pose_dataset(individuals=[]), min_length=1)


def test_dataset_without_position():
    ds = pose_dataset().rename({"position": "pose"})
    with pytest.raises(ValueError, match=r"Dataset 'r' has no 'position' variable.*'pose'"):
        from_poses({"r": ds}, min_length=1)


@pytest.mark.parametrize("rename", [{"keypoints": "bodyparts"}, {"space": "xy"}])
def test_dataset_unexpected_dims(rename):
    ds = pose_dataset(conf=False).rename(rename)
    with pytest.raises(ValueError, match=r"has unexpected dims .*expected \(time, space, "
                                         r"keypoints\[, individuals\]\)"):
        from_poses(ds, min_length=1)


def test_dataset_missing_dim():
    ds = pose_dataset(conf=False).isel(space=0)
    with pytest.raises(ValueError, match=r"dims \('time', 'keypoints'\); expected \(time, space"):
        from_poses(ds, min_length=1)


def test_confidence_shape_mismatch():
    ds = pose_dataset(conf=False)
    ds["confidence"] = (("time", "keypoint"), np.ones((12, 2)))
    with pytest.raises(ValueError, match=r"'confidence' of Dataset has dims \('time', 'keypoint'\)"
                                         r" and shape \(12, 2\); expected .* \(12, 3\)"):
        from_poses(ds, min_length=1)
    ds = pose_dataset(conf=False)
    ds["confidence"] = (("time", "keypoints", "space"), np.ones((12, 3, 2)))
    with pytest.raises(ValueError, match="'confidence' .* expected dims"):
        from_poses(ds, min_length=1)


def test_slash_in_name_warns():
    with pytest.warns(UserWarning, match="'a/b' contains '/'"):
        rec = from_poses({"a/b": np.ones((5, 2, 2))}, min_length=1)
    assert rec.names == ("a/b",)


def test_duplicate_names_after_splitting_individuals():
    X = {"a": pose_dataset(individuals=["b", "c"]), "a:b": np.ones((12, 3, 2))}
    with pytest.raises(ValueError, match="both named 'a:b'"):
        from_poses(X, min_length=1)


# ---------------------------------------------------------------------------- seg length


@pytest.mark.parametrize("lengths, kwargs, expected", [
    ([100, 100], {}, 100),
    ([100, 60], {}, 100),  # padding 40 / 160 = 25 %
    ([100, 30], {}, 30),  # 100: 70 / 130 = 54 % > 50; 30: 20 / 130 = 15 %
    ([30_000, 25_000], {}, 10_000),  # capped candidates; padding 5000 / 55000
    ([102], {"max_seg_length": 50}, 52),  # 102 % 50 = 2 < 4: add 2
    ([101, 103], {"max_seg_length": 50}, 52),  # remainders 1, 3 -> 51 -> 103 % 51 = 1 -> 52
])
def test_choose_seg_length(lengths, kwargs, expected):
    assert choose_seg_length(lengths, **kwargs) == expected


def test_choose_seg_length_no_candidate_warns_and_falls_back():
    with pytest.warns(UserWarning, match="using max_seg_length=12"):
        assert choose_seg_length([7, 10], max_seg_length=12, max_percent_padding=5) == 12
    with pytest.warns(UserWarning, match="No segment length"):  # then 10002 % 10000 = 2 < 4
        assert choose_seg_length([10_002]) == 10_002


def test_choose_seg_length_rejects_too_short():
    with pytest.raises(ValueError, match=r"positions \[1\] have lengths \[3\]"):
        choose_seg_length([10, 3])


# -------------------------------------------------------------------------------- batching


def test_make_batch_layout():
    X, ids = features([25, 14], n_features=2)
    rec = from_features(X, ids, min_length=4)
    batch = make_batch(rec, 10, overlap=3)
    assert isinstance(batch, Batch) and batch.values.shape == (5, 13, 2) and batch.conf is None
    assert batch.keys.tolist() == [0, 0, 0, 1, 1]
    assert batch.bounds.tolist() == [[0, 13], [10, 23], [20, 25], [0, 13], [10, 14]]
    assert batch.mask.sum(1).tolist() == [13, 13, 5, 13, 4]
    assert batch.seg_length == 10 and batch.lengths.tolist() == [25, 14]
    np.testing.assert_array_equal(batch.values[1], X[10:23])
    np.testing.assert_array_equal(batch.values[2, :5], X[20:25])
    np.testing.assert_array_equal(batch.values[2, 5:], np.repeat(X[24:25], 8, axis=0))
    np.testing.assert_array_equal(batch.values[4, :4], X[35:39])
    np.testing.assert_array_equal(batch.values[4, 4:], np.repeat(X[38:39], 9, axis=0))
    assert not batch.mask[2, 5:].any() and batch.mask[2, :5].all()


def test_make_batch_poses_conf_and_default_seg_length():
    rec = from_poses({"a": pose_dataset(40), "b": pose_dataset(25, seed=1)}, min_length=4)
    batch = make_batch(rec)
    assert batch.seg_length == 40 and batch.overlap == OVERLAP
    assert batch.values.shape == (2, 40 + OVERLAP, 3, 2) and batch.conf.shape == (2, 70, 3)
    np.testing.assert_array_equal(batch.conf[1, :25], rec.confidences[1])
    np.testing.assert_array_equal(batch.conf[1, 25:], np.repeat(rec.confidences[1][-1:], 45, 0))


def test_make_batch_rejects_short_fragment():
    rec = from_features(np.ones((22, 2)), min_length=1)
    with pytest.raises(ValueError, match=r"frame 20 of recording '0' has 2 real frames"):
        make_batch(rec, 10, overlap=0)
    assert MIN_FRAGMENT_LENGTH == 4


def _check_round_trip(rec, seg_length, offset, overlap=OVERLAP):
    batch = make_batch(rec, seg_length, overlap=overlap)
    back = unbatch(batch, batch.values[:, offset:], offset=offset)
    for got, want in zip(back, rec.arrays):
        np.testing.assert_array_equal(got[offset:], want[offset:])
        np.testing.assert_array_equal(got[:offset], np.repeat(want[offset:offset + 1], offset, 0))
    if rec.confidences is not None:
        back = unbatch(batch, batch.conf[:, offset:], offset=offset)
        for got, want in zip(back, rec.confidences):
            np.testing.assert_array_equal(got[offset:], want[offset:])


@pytest.mark.parametrize("seg_length", [5, 7, 16, 100])
@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("overlap", [OVERLAP, 4])
def test_round_trip_features(seg_length, offset, overlap):
    X, ids = features([39, 40, 60])  # no remainder below 4 for these seg lengths
    _check_round_trip(from_features(X, ids, min_length=4), seg_length, offset, overlap)


@pytest.mark.parametrize("seg_length", [8, 20])
@pytest.mark.parametrize("offset", [0, 3])
def test_round_trip_multi_individual_dataset(seg_length, offset):
    rec = from_poses(pose_dataset(45, individuals=["a", "b", "c"]), min_length=4)
    _check_round_trip(rec, seg_length, offset)


def test_unbatch_midpoint_resolution():
    rec = from_features(np.zeros((30, 1)), min_length=4)
    batch = make_batch(rec, 10, overlap=4)  # (0, 14), (10, 24), (20, 30)
    seg = np.broadcast_to(np.arange(3)[:, None], (3, 14)).astype(np.int32)
    (out,) = unbatch(batch, seg)
    assert out.dtype == np.int32
    assert out.tolist() == [0] * 12 + [1] * 10 + [2] * 8  # midpoints 12 and 22
    (out,) = unbatch(batch, seg[:, 3:], offset=3)
    # later segment has values only from start + 3 = 13, so the cut moves to 13 / 23
    assert out.tolist() == [0] * 13 + [1] * 10 + [2] * 7


def test_unbatch_midpoint_default_overlap():
    rec = from_features(np.zeros((120, 1)), min_length=4)
    batch = make_batch(rec, 50)  # (0, 80), (50, 120), (100, 120)
    (out,) = unbatch(batch, np.broadcast_to(np.arange(3)[:, None, None], (3, 80, 2)))
    assert out.shape == (120, 2)
    assert out[:, 0].tolist() == [0] * 65 + [1] * 45 + [2] * 10  # midpoints 65, 110


def test_unbatch_rejects_wrong_shape():
    rec = from_features(np.zeros((30, 1)), min_length=4)
    batch = make_batch(rec, 10, overlap=4)
    with pytest.raises(ValueError, match=r"shape \(3, 11, \.\.\.\).*offset=3, got \(3, 14\)"):
        unbatch(batch, np.zeros((3, 14)), offset=3)


def test_to_rows_restores_shuffled_block_order():
    X, ids = features([10, 16, 12], ids=["c", "a", "b"])
    rec = from_features(X, ids, min_length=4)
    batch = make_batch(rec, 6, overlap=4)
    per_rec = unbatch(batch, batch.values * 2.0)
    np.testing.assert_array_equal(to_rows(rec, per_rec), X * 2.0)
    labels = to_rows(rec, [np.full(n, i) for i, n in enumerate(rec.lengths)])
    assert labels.tolist() == [0] * 10 + [1] * 16 + [2] * 12


def test_to_rows_scatters_by_rows():
    arrays = (np.zeros((2, 1)), np.ones((3, 1)))
    rec = Recordings(names=("a", "b"), arrays=arrays, confidences=None, kind="features",
                     keypoints=None, space=None, times=(np.arange(2), np.arange(3)),
                     rows=(np.array([3, 0]), np.array([4, 1, 2])), n_rows=5)
    out = to_rows(rec, [np.array([10, 11]), np.array([20, 21, 22])])
    assert out.tolist() == [11, 21, 22, 10, 20]


def test_to_rows_poses_concatenates_and_checks_lengths():
    rec = from_poses({"b": np.zeros((6, 2, 2)), "a": np.ones((5, 2, 2))}, min_length=4)
    out = to_rows(rec, [np.full(5, 1), np.full(6, 2)])
    assert out.tolist() == [1] * 5 + [2] * 6
    with pytest.raises(ValueError, match=r"\[5, 6\] frames, got \[6, 5\]"):
        to_rows(rec, [np.full(6, 1), np.full(5, 2)])
