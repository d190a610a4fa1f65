"""Input adapter: every accepted input becomes validated recordings, then a padded batch.

Accepted inputs (``docs/design.md``, "Estimator contract"): a 2D array
``(n_frames_total, n_features)`` with per-frame ``sequence_ids`` (:func:`from_features`),
or a pose :class:`xarray.Dataset` in the ``movement`` layout or a dict
``{name: Dataset or (T, K, D) array}`` (:func:`from_poses`). :func:`make_batch` cuts
recordings into overlapping, padded segments (model spec, section 1, steps 5-6);
:func:`unbatch` and :func:`to_rows` map per-segment results back to recordings and to
input rows. All input validation lives here. NumPy only, no JAX.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Number

import numpy as np
import xarray as xr
from scipy import sparse
from sklearn.utils import check_array

MIN_FRAGMENT_LENGTH = 4
OVERLAP = 30
MAX_SEG_LENGTH = 10_000
MAX_PERCENT_PADDING = 50.0

_DIM_ALIASES = {"time": "time", "space": "space", "keypoints": "keypoints",
                "keypoint": "keypoints", "individuals": "individuals",
                "individual": "individuals"}
_POSITION_DIMS = "(time, space, keypoints[, individuals]) in any order (singular names allowed)"


@dataclass(frozen=True, eq=False)
class Recordings:
    """Validated per-recording inputs, before batching (arrays are read-only)."""

    names: tuple[str, ...]  # recording names, in output order
    arrays: tuple[np.ndarray, ...]  # float64 (T_r, F) "features" / (T_r, K, D) "poses"
    # (T_r, K) float64 per recording, 0 at missing points (poses only); None when no
    # recording had confidences and no point was missing
    confidences: tuple[np.ndarray, ...] | None
    kind: str  # "features" or "poses"
    keypoints: tuple[str, ...] | None  # poses: keypoint names ("kp0", ... if unnamed)
    space: tuple[str, ...] | None  # poses: space labels, e.g. ("x", "y")
    times: tuple[np.ndarray, ...]  # time coordinate per recording (np.arange(T_r) if none)
    rows: tuple[np.ndarray, ...] | None  # features: row indices of X per recording
    n_rows: int  # features: len(X); poses: sum of T_r
    sources: tuple[str | None, ...] | None = None  # poses: dict key (None: lone Dataset)
    individuals: tuple[str | None, ...] | None = None  # poses: individual (None: no dim)
    source_type: str = "array"  # "array", "dataset" or "dict": the input's container

    @property
    def lengths(self) -> np.ndarray:
        """Frames per recording, ``(R,)`` int."""
        return np.array([len(a) for a in self.arrays], dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Batch:
    """Recordings cut into overlapping segments of ``T = seg_length + overlap`` frames."""

    values: np.ndarray  # (B, T, F) or (B, T, K, D) float64; padding repeats last real frame
    conf: np.ndarray | None  # (B, T, K) float64, batched like values, or None
    mask: np.ndarray  # (B, T) bool, True on real frames
    keys: np.ndarray  # (B,) int, index into Recordings.names
    bounds: np.ndarray  # (B, 2) int, (start, end) in recording frames, end exclusive
    seg_length: int  # frames between consecutive segment starts
    lengths: np.ndarray  # (R,) int, frames per recording
    overlap: int = OVERLAP  # frames shared by consecutive segments


# ------------------------------------------------------------------------------------ inputs


def as_recordings(X, sequence_ids=None, *, min_length: int, keypoints=None) -> Recordings:
    """Validate any accepted input and return its :class:`Recordings`.

    Parameters
    ----------
    X : array-like of shape (n_frames_total, n_features), xarray.Dataset or dict
        Array-likes go to :func:`from_features`; a Dataset or a dict to :func:`from_poses`.
    sequence_ids : array-like of shape (n_frames_total,), optional
        Recording id per row; array input only.
    min_length : int
        Minimum frames per recording.
    keypoints : sequence of str, optional
        Keypoints to keep, in this order; pose input only.

    Returns
    -------
    Recordings
    """
    if isinstance(X, (xr.Dataset, Mapping)) and not sparse.issparse(X):  # dok is a dict
        if sequence_ids is not None:
            raise ValueError("sequence_ids applies only to 2D array input; a Dataset or dict "
                             "names its recordings by individual and dict key.")
        return from_poses(X, min_length=min_length, keypoints=keypoints)
    array_like = (isinstance(X, (np.ndarray, list, tuple)) or sparse.issparse(X)
                  or hasattr(X, "__array__") or hasattr(X, "__array_namespace__"))
    if not array_like or isinstance(X, (str, bytes, Number)):
        raise TypeError(
            f"Unsupported input type {type(X).__name__}; expected a 2D array-like "
            "(n_frames, n_features), an xarray.Dataset with a 'position' variable, or a "
            "dict {recording_name: Dataset or (T, K, D) array}.")
    if keypoints is not None:
        raise ValueError("keypoints= selects pose keypoints; it does not apply to 2D input.")
    return from_features(X, sequence_ids, min_length=min_length)


def from_features(X, sequence_ids=None, *, min_length: int) -> Recordings:
    """Split a 2D feature array into recordings by ``sequence_ids``.

    Parameters
    ----------
    X : array-like of shape (n_frames_total, n_features)
        Validated by :func:`sklearn.utils.check_array` (float64, finite, dense), so
        sklearn's standard messages appear for NaN, inf, sparse, complex or empty input.
    sequence_ids : array-like of shape (n_frames_total,), optional
        Recording id per row (any hashable); rows of one recording must be contiguous
        and in time order. Names are ``str(id)`` in order of first appearance; None
        means one recording named ``"0"``.
    min_length : int
        Minimum frames per recording.

    Returns
    -------
    Recordings
        Kind ``"features"``; ``arrays`` are read-only views of the validated ``X``.
    """
    try:
        X = check_array(X, dtype=np.float64, ensure_all_finite=True, ensure_2d=False,
                        allow_nd=True, ensure_min_samples=1, input_name="X")
    except ValueError as err:
        _reraise_nonfinite(err, X, sequence_ids)
        raise
    if X.ndim != 2:
        hint = (" Reshape your data either using X.reshape(-1, 1) if it has a single "
                "feature or X.reshape(1, -1) if it contains a single frame." if X.ndim == 1
                else " Pass pose data as an xarray.Dataset or a dict of recordings.")
        raise ValueError("Expected a 2D array (n_frames, n_features), got an array of "
                         f"shape {X.shape}.{hint}")
    names, arrays, rows = [], [], []
    for name, start, stop in _runs(sequence_ids, X.shape[0]):
        _check_length(name, stop - start, min_length)
        view = X[start:stop]
        view.flags.writeable = False
        names.append(name)
        arrays.append(view)
        rows.append(np.arange(start, stop))
    return Recordings(
        names=tuple(names), arrays=tuple(arrays), confidences=None, kind="features",
        keypoints=None, space=None, times=tuple(np.arange(len(a)) for a in arrays),
        rows=tuple(rows), n_rows=X.shape[0])


def _runs(sequence_ids, n_rows: int) -> list[tuple[str, int, int]]:
    """``(name, start, stop)`` of each contiguous block of equal ``sequence_ids``."""
    if sequence_ids is None:
        return [("0", 0, n_rows)]
    ids = np.asarray(sequence_ids)
    if ids.shape != (n_rows,):
        raise ValueError(f"sequence_ids must have one id per row of X: expected shape "
                         f"({n_rows},), got {ids.shape}.")
    starts = np.concatenate([[0], np.flatnonzero(ids[1:] != ids[:-1]) + 1]).astype(int)
    stops = np.append(starts[1:], n_rows)
    seen: dict = {}
    by_name: dict[str, object] = {}
    for value, start, stop in zip(ids[starts].tolist(), starts.tolist(), stops.tolist()):
        if value in seen:
            raise ValueError(
                f"sequence_ids: recording {value!r} occupies rows {seen[value][0]}-"
                f"{seen[value][1] - 1} and reappears at row {start}; the frames of one "
                "recording must be contiguous and in time order.")
        if str(value) in by_name:
            raise ValueError(f"sequence_ids {by_name[str(value)]!r} and {value!r} both map to "
                             f"recording name {str(value)!r}; use distinct ids.")
        seen[value], by_name[str(value)] = (start, stop), value
    return [(str(v), a, b) for v, (a, b) in seen.items()]


def _reraise_nonfinite(err: ValueError, X, sequence_ids) -> None:
    """Add the first non-finite row and its recording to sklearn's NaN/inf message."""
    if "NaN" not in str(err) and "infinity" not in str(err):
        return
    try:
        values = np.asarray(X, dtype=np.float64)
        row = int(np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(1))[0])
        ids = None if sequence_ids is None else np.asarray(sequence_ids)
        name = "0" if ids is None or ids.shape != (len(values),) else str(ids.tolist()[row])
    except Exception:  # noqa: BLE001 - keep sklearn's own message then
        return
    raise ValueError(f"{err} First non-finite value at row {row} (recording {name!r}).") from err


def from_poses(X, *, min_length: int, keypoints=None) -> Recordings:
    """Read pose recordings from a ``movement`` Dataset or a dict.

    Parameters
    ----------
    X : xarray.Dataset or dict
        A Dataset with a ``position`` variable with dims ``time``, ``space``,
        ``keypoints`` and optionally ``individuals`` (singular names too, any order),
        and optionally ``confidence`` with the same dims but ``space``. Or a dict
        ``{name: Dataset or (T, K, D) array}``; arrays have no confidences (all ones
        when another recording has some).
    min_length : int
        Minimum frames per recording.
    keypoints : sequence of str, optional
        Keypoints to keep, in this order.

    Returns
    -------
    Recordings
        Kind ``"poses"``, in sorted name order. Each individual is its own recording:
        in a lone Dataset it is named ``"{individual}"`` (``"0"`` without an individuals
        dim); in a dict ``"{key}"`` if the entry has one individual, else
        ``"{key}:{individual}"``. Missing points (any NaN coordinate) are filled by
        linear interpolation over frames per keypoint and dimension, holding the edge
        values, and get confidence 0.
    """
    if isinstance(X, xr.Dataset):
        entries, source_type = _dataset_entries(X, None), "dataset"
    elif isinstance(X, Mapping):
        if len(X) == 0:
            raise ValueError("No recordings: the input dict is empty.")
        entries, source_type = [], "dict"
        for key, value in X.items():
            key = str(key)
            if isinstance(value, xr.Dataset):
                entries.extend(_dataset_entries(value, key))
            elif isinstance(value, xr.DataArray):
                raise TypeError(f"Recording {key!r} is an xarray.DataArray; pass a Dataset "
                                "with a 'position' variable or a (T, K, D) array.")
            else:
                entries.append(dict(name=key, source=key,
                                    pos=_as_float(value, f"positions of recording {key!r}")))
    else:
        raise TypeError(f"from_poses expects an xarray.Dataset or a dict, got "
                        f"{type(X).__name__}.")
    return _build_poses(entries, min_length, keypoints, source_type)


def _as_float(value, what: str) -> np.ndarray:
    """Convert a numeric array-like to float64; TypeError for anything else."""
    try:
        arr = np.asarray(value)
        if arr.dtype.kind in "iufO":
            return arr.astype(np.float64)
    except (TypeError, ValueError) as err:  # ragged lists, objects that are not numbers
        raise TypeError(f"Non-numeric {what}: {err}") from err
    raise TypeError(f"Non-numeric {what}: got dtype {arr.dtype}, expected real numbers.")


def _canonical_dims(var: xr.DataArray, what: str, expected: str) -> dict[str, str]:
    """Map canonical dim names (time, space, keypoints, individuals) to ``var``'s own."""
    mapping: dict[str, str] = {}
    for dim in var.dims:
        canon = _DIM_ALIASES.get(str(dim))
        if canon is None or canon in mapping:
            raise ValueError(f"{what} has unexpected dims {tuple(var.dims)}; expected "
                             f"{expected}.")
        mapping[canon] = dim
    return mapping


def _labels(var: xr.DataArray, dim) -> list[str] | None:
    return [str(v) for v in var[dim].values.tolist()] if dim in var.coords else None


def _dataset_entries(ds: xr.Dataset, key: str | None) -> list[dict]:
    """One raw entry (name, positions, confidences, labels) per individual of a Dataset."""
    where = "Dataset" if key is None else f"Dataset {key!r}"
    if "position" not in ds.data_vars:
        raise ValueError(f"{where} has no 'position' variable (variables: "
                         f"{sorted(map(str, ds.data_vars))}).")
    pos = ds["position"]
    dims = _canonical_dims(pos, f"'position' of {where}", _POSITION_DIMS)
    if {"time", "space", "keypoints"} - set(dims):
        raise ValueError(f"'position' of {where} has dims {tuple(pos.dims)}; expected "
                         f"{_POSITION_DIMS}.")
    order = [d for d in ("individuals", "time", "keypoints", "space") if d in dims]
    pos_values = pos.transpose(*[dims[d] for d in order]).values
    conf_values = None
    if "confidence" in ds.data_vars:
        conf, want = ds["confidence"], order[:-1]
        shape = tuple(pos.sizes[dims[d]] for d in want)
        cdims = _canonical_dims(conf, f"'confidence' of {where}", f"dims {tuple(want)}")
        if set(cdims) != set(want) or tuple(conf.sizes[cdims[d]] for d in want) != shape:
            raise ValueError(
                f"'confidence' of {where} has dims {tuple(conf.dims)} and shape "
                f"{conf.shape}; expected dims {tuple(want)} with shape {shape} to match "
                "'position'.")
        conf_values = conf.transpose(*[cdims[d] for d in want]).values
    if "individuals" in dims:
        n_ind = pos.sizes[dims["individuals"]]
        individuals = _labels(pos, dims["individuals"]) or [f"individual_{i}"
                                                            for i in range(n_ind)]
        if n_ind == 0:
            raise ValueError(f"No recordings: {where} has an empty individuals dim.")
    else:
        individuals = [None]
        pos_values = pos_values[None]
        conf_values = None if conf_values is None else conf_values[None]
    times = np.array(pos[dims["time"]].values) if dims["time"] in pos.coords else None
    entries = []
    for i, ind in enumerate(individuals):
        if key is None:
            name = "0" if ind is None else ind
        else:
            name = key if len(individuals) == 1 else f"{key}:{ind}"
        entry = dict(name=name, source=key, individual=ind, times=times,
                     pos=_as_float(pos_values[i], f"positions of recording {name!r}"),
                     kp=_labels(pos, dims["keypoints"]), space=_labels(pos, dims["space"]))
        if conf_values is not None:
            entry["conf"] = _as_float(conf_values[i], f"confidences of recording {name!r}")
        entries.append(entry)
    return entries


def _build_poses(entries: list[dict], min_length: int, keypoints, source_type: str):
    """Check consistency across recordings, select keypoints, fill missing points."""
    by_name: dict[str, dict] = {}
    for e in entries:
        if e["name"] in by_name:
            raise ValueError(f"Two recordings are both named {e['name']!r}.")
        by_name[e["name"]] = e
        if "/" in e["name"]:
            warnings.warn(f"Recording name {e['name']!r} contains '/', which breaks HDF5 "
                          "paths.", UserWarning, stacklevel=3)
    entries = [by_name[n] for n in sorted(by_name)]
    ref = entries[0]
    for e in entries:
        shape = e["pos"].shape
        if len(shape) != 3 or shape[2] not in (2, 3) or shape[1] == 0:
            raise ValueError(f"Positions of recording {e['name']!r} have shape {shape}; "
                             "expected (time, keypoints, space) with 2 or 3 space dims.")
        for axis, what in ((1, "keypoint count"), (2, "spatial dimension")):
            if shape[axis] != ref["pos"].shape[axis]:
                raise ValueError(f"Recordings {ref['name']!r} and {e['name']!r} differ in "
                                 f"{what}: {ref['pos'].shape[axis]} vs {shape[axis]}.")
    named = [e for e in entries if e.get("kp") is not None]
    for e in named:
        if e["kp"] != named[0]["kp"]:
            raise ValueError(f"Recordings {named[0]['name']!r} and {e['name']!r} have "
                             f"different keypoint names: {named[0]['kp']} vs {e['kp']}.")
    n_kp, n_dim = ref["pos"].shape[1:]
    all_kp = named[0]["kp"] if named else [f"kp{k}" for k in range(n_kp)]
    index = _select_keypoints(all_kp, keypoints)
    spaces = [e["space"] for e in entries if e.get("space") is not None]
    space = spaces[0] if spaces else ["x", "y", "z"][:n_dim]
    arrays, confs, any_missing = [], [], False
    for e in entries:
        pos, conf, missing = _clean_recording(e, [all_kp[i] for i in index], index,
                                              min_length)
        any_missing |= bool(missing.any())
        pos.flags.writeable = conf.flags.writeable = False
        arrays.append(pos)
        confs.append(conf)
    has_conf = any_missing or any("conf" in e for e in entries)
    return Recordings(
        names=tuple(e["name"] for e in entries), arrays=tuple(arrays),
        confidences=tuple(confs) if has_conf else None, kind="poses",
        keypoints=tuple(all_kp[i] for i in index), space=tuple(space),
        times=tuple(np.arange(len(a)) if e.get("times") is None else e["times"]
                    for a, e in zip(arrays, entries)),
        rows=None, n_rows=int(sum(len(a) for a in arrays)),
        sources=tuple(e.get("source") for e in entries),
        individuals=tuple(e.get("individual") for e in entries), source_type=source_type)


def _select_keypoints(available: list[str], keypoints) -> np.ndarray:
    """Indices into ``available`` of the requested ``keypoints`` (all if None)."""
    if keypoints is None:
        return np.arange(len(available))
    keypoints = [str(k) for k in keypoints]
    missing = [k for k in keypoints if k not in available]
    if missing:
        raise ValueError(f"Keypoints {missing} not found; available keypoints: {available}.")
    if not keypoints or len(set(keypoints)) != len(keypoints):
        raise ValueError(f"keypoints must be a non-empty list without repeats, got {keypoints}.")
    return np.array([available.index(k) for k in keypoints])


def _clean_recording(e: dict, kp: list[str], index: np.ndarray, min_length: int):
    """Validate one recording; interpolate its missing points (model spec 1, step 4)."""
    name, pos, conf = e["name"], e["pos"], e.get("conf")
    if conf is not None and conf.shape != pos.shape[:2]:
        raise ValueError(f"Confidences of recording {name!r} have shape {conf.shape}; "
                         f"expected {pos.shape[:2]} to match positions {pos.shape}.")
    if len(pos) == 0:
        raise ValueError(f"Recording {name!r} has zero frames (n_samples = 0).")
    _check_length(name, len(pos), min_length)
    pos = pos[:, index]
    conf = np.ones(pos.shape[:2]) if conf is None else conf[:, index]

    def culprit(bad: np.ndarray) -> str:
        t, k = np.argwhere(bad)[0]
        return f"recording {name!r}, keypoint {kp[k]!r} (frame {t})"

    if np.isinf(pos).any():
        raise ValueError(f"Infinite position in {culprit(np.isinf(pos).any(-1))}.")
    missing = np.isnan(pos).any(-1)
    if missing.all(0).any():
        raise ValueError(f"Keypoint {kp[int(np.argmax(missing.all(0)))]!r} is NaN in every "
                         f"frame of recording {name!r}; leave it out with keypoints=[...].")
    for bad, what in ((np.isinf(conf), "Infinite"), (np.isnan(conf), "NaN"),
                      (conf < 0, "Negative")):
        bad &= ~missing  # any confidence at a missing point becomes 0
        if bad.any():
            raise ValueError(f"{what} confidence (at a present position) in {culprit(bad)}.")
    conf[missing] = 0.0
    frames = np.arange(len(pos))
    for k in np.flatnonzero(missing.any(0)):
        seen = ~missing[:, k]
        for d in range(pos.shape[2]):
            pos[:, k, d] = np.interp(frames, frames[seen], pos[seen, k, d])
    return pos, conf, missing


def _check_length(name: str, n_frames: int, min_length: int) -> None:
    if n_frames < min_length:
        raise ValueError(f"Recording {name!r} has {n_frames} frame(s) (n_samples = "
                         f"{n_frames}); at least {min_length} are required.")


# ---------------------------------------------------------------------------------- batching


def choose_seg_length(lengths, *, max_seg_length: int = MAX_SEG_LENGTH,
                      max_percent_padding: float = MAX_PERCENT_PADDING,
                      min_fragment_length: int = MIN_FRAGMENT_LENGTH) -> int:
    """Choose the segment length as the reference does (model spec, section 1, step 5).

    Parameters
    ----------
    lengths : array-like of int, shape (R,)
        Frames per recording; each must be at least ``min_fragment_length``.
    max_seg_length : int
        Cap on the candidates, and the fallback (with a warning) when none qualifies.
    max_percent_padding : float
        Largest accepted padding, percent of all frames (the overlap is not counted).
    min_fragment_length : int
        Smallest accepted nonzero remainder ``T_r mod seg_length``.

    Returns
    -------
    int
        The largest candidate ``min(T_r, max_seg_length)`` whose padding
        ``100 * sum((-T_r) mod s) / sum(T_r)`` is within ``max_percent_padding``, then
        grown by the smallest nonzero remainder while some remainder is too short.
    """
    lengths = np.asarray(lengths, dtype=np.int64).ravel()
    if lengths.size == 0:
        raise ValueError("choose_seg_length needs at least one recording length.")
    if lengths.min() < min_fragment_length:
        short = np.flatnonzero(lengths < min_fragment_length).tolist()
        raise ValueError(f"Recordings at positions {short} have lengths "
                         f"{lengths[short].tolist()}, below min_fragment_length="
                         f"{min_fragment_length}.")
    seg_length = None
    for candidate in np.unique(np.minimum(lengths, max_seg_length))[::-1]:
        if 100.0 * ((-lengths) % candidate).sum() / lengths.sum() <= max_percent_padding:
            seg_length = int(candidate)
            break
    if seg_length is None:
        warnings.warn(f"No segment length keeps padding within {max_percent_padding}%; "
                      f"using max_seg_length={max_seg_length}.", UserWarning, stacklevel=2)
        seg_length = int(max_seg_length)
    while True:
        rem = lengths % seg_length
        if not ((rem > 0) & (rem < min_fragment_length)).any():
            return seg_length
        seg_length += int(rem[rem > 0].min())


def make_batch(recordings: Recordings, seg_length: int | None = None, *,
               overlap: int = OVERLAP, min_fragment_length: int = MIN_FRAGMENT_LENGTH) -> Batch:
    """Cut recordings into padded, overlapping segments (model spec, section 1, step 6).

    Parameters
    ----------
    recordings : Recordings
    seg_length : int, optional
        Frames between segment starts; default :func:`choose_seg_length` of the lengths.
    overlap : int
        Extra frames each segment runs into the next one.
    min_fragment_length : int
        Every segment must have at least this many real frames.

    Returns
    -------
    Batch
        Segments of recording r start at 0, seg_length, ... < T_r and end at
        ``min(start + seg_length + overlap, T_r)``; each is padded to
        ``seg_length + overlap`` frames by repeating its last real frame. Rows come in
        recording order, then start order. No pseudocount or jitter is added.
    """
    lengths = recordings.lengths
    if seg_length is None:
        seg_length = choose_seg_length(lengths, min_fragment_length=min_fragment_length)
    if int(seg_length) != seg_length or seg_length < 1 or int(overlap) != overlap or overlap < 0:
        raise ValueError("seg_length must be a positive int and overlap a non-negative int, "
                         f"got seg_length={seg_length!r}, overlap={overlap!r}.")
    seg_length, overlap = int(seg_length), int(overlap)
    width = np.arange(seg_length + overlap)
    values, conf, mask, keys, bounds = [], [], [], [], []
    for r, n_frames in enumerate(lengths.tolist()):
        starts = np.arange(0, n_frames, seg_length)
        ends = np.minimum(starts + seg_length + overlap, n_frames)
        short = starts[ends - starts < min_fragment_length]
        if short.size:
            raise ValueError(
                f"Segment starting at frame {short[0]} of recording {recordings.names[r]!r} "
                f"has {n_frames - short[0]} real frames, fewer than min_fragment_length="
                f"{min_fragment_length}; choose another seg_length.")
        frame = starts[:, None] + width
        index = np.minimum(frame, n_frames - 1)
        values.append(recordings.arrays[r][index])
        if recordings.confidences is not None:
            conf.append(recordings.confidences[r][index])
        mask.append(frame < n_frames)
        keys.append(np.full(len(starts), r, dtype=np.int64))
        bounds.append(np.stack([starts, ends], axis=1).astype(np.int64))
    return Batch(values=np.concatenate(values), conf=np.concatenate(conf) if conf else None,
                 mask=np.concatenate(mask), keys=np.concatenate(keys),
                 bounds=np.concatenate(bounds), seg_length=seg_length, lengths=lengths,
                 overlap=overlap)


def unbatch(batch: Batch, values, *, offset: int = 0) -> list[np.ndarray]:
    """Map per-segment results back to one array per recording, padding removed.

    Parameters
    ----------
    batch : Batch
    values : array-like of shape (B, T - offset, ...)
        ``values[b, i]`` belongs to frame ``start_b + offset + i`` of its recording.
    offset : int
        Frames at the start of each segment without a value (``n_lags`` for labels).

    Returns
    -------
    list of ndarray
        ``(T_r, ...)`` per recording, dtype preserved. Where consecutive segments
        overlap, frames before the midpoint of the overlap come from the earlier segment
        (it has the past context), the rest from the later one (moved later if needed so
        that the later segment has a value there). Frames no segment covers (the first
        ``offset`` frames of a recording) repeat the nearest covered frame before them,
        or the first covered frame at the start of a recording (edge padding).
    """
    values = np.asarray(values)
    n_seg, width = batch.mask.shape
    if values.ndim < 2 or values.shape[:2] != (n_seg, width - offset):
        raise ValueError(f"values must have shape ({n_seg}, {width - offset}, ...) for this "
                         f"batch with offset={offset}, got {values.shape}.")
    out = []
    for r, n_frames in enumerate(batch.lengths.tolist()):
        rows = np.flatnonzero(batch.keys == r)
        rows = rows[np.argsort(batch.bounds[rows, 0], kind="stable")]
        starts, ends = batch.bounds[rows, 0], batch.bounds[rows, 1]
        # boundary between consecutive segments: midpoint of their overlap, at least
        # where the later one has values and at most where the earlier one ends
        cut = np.minimum(np.maximum((starts[1:] + ends[:-1]) // 2, starts[1:] + offset),
                         ends[:-1])
        lo = np.maximum(np.concatenate([[0], cut]), starts + offset)
        hi = np.concatenate([cut, ends[-1:]])
        result = np.empty((n_frames,) + values.shape[2:], dtype=values.dtype)
        covered = np.zeros(n_frames, dtype=bool)
        for row, start, a, b in zip(rows, starts, lo, hi):
            if b > a:
                result[a:b] = values[row, a - start - offset:b - start - offset]
                covered[a:b] = True
        if not covered.any():
            raise ValueError(f"Recording {r} ({n_frames} frames) has no value: every frame "
                             f"is before offset={offset}.")
        source = np.maximum.accumulate(np.where(covered, np.arange(n_frames), -1))
        source[source < 0] = np.argmax(covered)
        out.append(result[source])
    return out


def to_rows(recordings: Recordings, per_recording: Sequence[np.ndarray]) -> np.ndarray:
    """Put per-recording results back in input-row order.

    Parameters
    ----------
    recordings : Recordings
    per_recording : list of ndarray
        ``(T_r, ...)`` per recording, in ``recordings.names`` order.

    Returns
    -------
    ndarray of shape (n_rows, ...)
        Features path: row ``i`` belongs to row ``i`` of the input ``X``. Poses path:
        the recordings concatenated in order.
    """
    parts = [np.asarray(p) for p in per_recording]
    expected = recordings.lengths.tolist()
    if [len(p) for p in parts] != expected:
        raise ValueError(f"Expected {len(expected)} arrays with {expected} frames, got "
                         f"{[len(p) for p in parts]}.")
    if recordings.rows is None:
        return np.concatenate(parts, axis=0)
    out = np.empty((recordings.n_rows,) + parts[0].shape[1:], dtype=np.result_type(*parts))
    for rows, part in zip(recordings.rows, parts):
        out[rows] = part
    return out
