"""Pose-file loaders: DeepLabCut, SLEAP and JABS files as ``movement``-layout Datasets.

:func:`load_poses` reads one tracking file into an :class:`xarray.Dataset` with

- ``position``: dims ``("time", "space", "keypoints", "individuals")``, float64, NaN
  where the tracker has no point;
- ``confidence``: dims ``("time", "keypoints", "individuals")``, float64, 0.0 where the
  point is missing;
- coordinates ``time`` (frame index, or seconds when ``fps`` is given), ``space``
  (``["x", "y"]`` or ``["x", "y", "z"]``), ``keypoints`` and ``individuals`` (str);
- attributes ``source_software``, ``source_file`` and, when known, ``fps``.

:func:`load_many` loads a folder, a glob pattern or a list of files into a dict keyed by
file stem, which :func:`kpms_estimators._data.from_poses` accepts as is.
"""

from __future__ import annotations

import glob
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import xarray as xr

SOURCE_SOFTWARE = ("DeepLabCut", "SLEAP", "JABS")
JABS_KEYPOINTS = ("NOSE", "LEFT_EAR", "RIGHT_EAR", "BASE_NECK", "LEFT_FRONT_PAW",
                  "RIGHT_FRONT_PAW", "CENTER_SPINE", "LEFT_REAR_PAW", "RIGHT_REAR_PAW",
                  "BASE_TAIL", "MID_TAIL", "TIP_TAIL")
POSE_SUFFIXES = (".csv", ".h5", ".hdf5")

_HDF5_SUFFIXES = (".h5", ".hdf5")
_DLC_HEADERS = (("scorer", "bodyparts", "coords"),
                ("scorer", "individuals", "bodyparts", "coords"))
_SPACE = ("x", "y", "z")
_EXPECTED = ("a DeepLabCut CSV (header rows scorer[, individuals], bodyparts, coords) or "
             "pandas HDF5 table, a SLEAP analysis HDF5 file (dataset 'tracks') or a JABS "
             "pose HDF5 file (group 'poseest')")
PathLike = str | os.PathLike


@dataclass(frozen=True)
class _Tracks:
    """What a reader found: arrays indexed ``(time, individual, keypoint[, space])``."""

    position: np.ndarray  # (T, I, K, D) float64, NaN where missing
    confidence: np.ndarray | None  # (T, I, K) float64, None if the file has none
    keypoints: list[str]
    individuals: list[str]
    space: list[str]


# ------------------------------------------------------------------------------ public API


def load_poses(path: PathLike, source_software: str | None = None,
               fps: float | None = None) -> xr.Dataset:
    """Load one pose-tracking file into a ``movement``-layout Dataset.

    Parameters
    ----------
    path : str or path-like
        A DeepLabCut ``.csv`` or pandas ``.h5`` file (single- or multi-animal), a SLEAP
        analysis ``.h5`` file or a JABS pose ``.h5`` file (v2 single mouse, v3+ multi).
    source_software : {"DeepLabCut", "SLEAP", "JABS"}, optional
        Case-insensitive. None detects the format from the file's content.
    fps : float, optional
        Frames per second. When given, ``time`` is in seconds and ``attrs["fps"]`` is
        set; otherwise ``time`` is the integer frame index and ``fps`` is absent.

    Returns
    -------
    xarray.Dataset
        ``position`` ``(time, space, keypoints, individuals)`` and ``confidence``
        ``(time, keypoints, individuals)``, both float64 (see the module docstring).
        Confidences are the file's own (DeepLabCut likelihood, SLEAP point score, JABS
        heat-map peak, which is not a probability), set to 0.0 wherever the point is
        missing. A file without confidences (a SLEAP export without ``point_scores``,
        DeepLabCut 3D) gets 1.0 where a point exists and 0.0 where it is missing.
        JABS points are stored (y, x) and are swapped to (x, y); a JABS point with
        confidence 0 is missing (NaN position). Individuals are ``"individual_0"`` for
        single-animal files, DeepLabCut's ``individuals`` names, SLEAP track names, and
        ``"individual_{slot}"`` for JABS multi-mouse instance slots (slots are not
        identities). Individuals without a valid point in any frame (e.g. JABS padding
        slots) are dropped with a warning; nothing else is changed.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not an existing file.
    ValueError
        For an unknown ``source_software`` name, a format that cannot be detected, a
        file whose content does not match ``source_software``, or an invalid ``fps``.
    """
    path = Path(path)
    if not path.is_file():
        hint = " (a directory: use load_many)" if path.is_dir() else ""
        raise FileNotFoundError(f"Pose file not found: {path}{hint}")
    _check_fps(fps)
    software = _detect(path) if source_software is None else _software_name(source_software)
    tracks = _READERS[software](path)
    return _to_dataset(_drop_empty_individuals(tracks, path), path, software, fps)


def load_many(paths: PathLike | Iterable[PathLike], source_software: str | None = None,
              fps: float | None = None) -> dict[str, xr.Dataset]:
    """Load several pose files into ``{file stem: Dataset}``.

    Parameters
    ----------
    paths : str, path-like or iterable of them
        A directory (all ``.csv``, ``.h5`` and ``.hdf5`` files in it, sorted), a glob
        pattern (its matches with those suffixes, sorted), one file, or a list of files.
    source_software : {"DeepLabCut", "SLEAP", "JABS"}, optional
        Passed to :func:`load_poses` for every file; None detects each file's format.
    fps : float, optional
        Passed to :func:`load_poses` for every file.

    Returns
    -------
    dict of str to xarray.Dataset
        Keyed by file stem (``"name"`` for ``name.h5``), in file order; colliding stems
        get ``"_2"``, ``"_3"``, ... appended. A ``.csv`` and an ``.h5``/``.hdf5`` file
        with the same stem in the same folder (DeepLabCut writes both) are one
        recording: only the HDF5 file is loaded, with a warning.

    Raises
    ------
    FileNotFoundError
        If a listed file is missing, or a directory or pattern holds no pose file.
    ValueError
        If ``paths`` is an empty list, or as :func:`load_poses`.
    """
    files = _prefer_hdf5(_resolve(paths))
    return {key: load_poses(file, source_software, fps)
            for key, file in zip(_unique_stems(files), files)}


# -------------------------------------------------------------------------- format choice


def _software_name(name: str) -> str:
    """The canonical spelling of a ``source_software`` name (case-insensitive)."""
    by_lower = {s.lower(): s for s in SOURCE_SOFTWARE}
    if not isinstance(name, str) or name.lower() not in by_lower:
        raise ValueError(f"Unknown source_software {name!r}; valid names are "
                         f"{', '.join(SOURCE_SOFTWARE)} (case-insensitive), or None to "
                         "detect the format from the file.")
    return by_lower[name.lower()]


def _check_fps(fps) -> None:
    if fps is not None and not (isinstance(fps, Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number or None, got {fps!r}.")


def _detect(path: Path) -> str:
    """Name the software that wrote ``path``, from its content."""
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            if "poseest" in f:
                return "JABS"
            if "tracks" in f:
                return "SLEAP"
            if _has_pandas_table(f):
                return "DeepLabCut"
    elif _dlc_csv_header(path) is not None:
        return "DeepLabCut"
    raise ValueError(f"Cannot tell which software wrote {path}: expected {_EXPECTED}.")


def _has_pandas_table(f: h5py.File) -> bool:
    """Whether an HDF5 file holds a pandas (PyTables) object, as DeepLabCut writes."""
    return any("pandas_type" in f[key].attrs for key in f)


def _dlc_csv_header(path: Path) -> int | None:
    """Number of DeepLabCut header rows (3 or 4) in a CSV, or None if it has none."""
    try:
        first = pd.read_csv(path, header=None, nrows=4, usecols=[0]).iloc[:, 0]
    except (ValueError, UnicodeDecodeError):  # pandas' parser errors are ValueErrors
        return None
    labels = [str(v).strip().lower() for v in first.tolist()]
    for header in _DLC_HEADERS:
        if tuple(labels[:len(header)]) == header:
            return len(header)
    return None


# -------------------------------------------------------------------------------- readers


def _read_dlc(path: Path) -> _Tracks:
    """Read a DeepLabCut CSV or pandas HDF5 file (single- or multi-animal)."""
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            if not _has_pandas_table(f):
                raise ValueError(f"{path} is not a DeepLabCut HDF5 file: it has no pandas "
                                 "table (a group with a 'pandas_type' attribute).")
        table = pd.read_hdf(path)
    else:
        n_header = _dlc_csv_header(path)
        if n_header is None:
            raise ValueError(f"{path} is not a DeepLabCut CSV file: expected header rows "
                             "scorer[, individuals], bodyparts, coords in its first column.")
        table = pd.read_csv(path, header=list(range(n_header)), index_col=0)
    return _dlc_tracks(table, path)


def _dlc_tracks(table: pd.DataFrame, path: Path) -> _Tracks:
    """Reshape a DeepLabCut table into per-individual arrays."""
    names = list(table.columns.names) if isinstance(table, pd.DataFrame) else []
    if not {"bodyparts", "coords"} <= set(names):
        raise ValueError(f"{path} is not a DeepLabCut table: expected column levels "
                         f"scorer[, individuals], bodyparts, coords, got {names}.")
    columns = table.columns
    individuals = (columns.get_level_values("individuals").unique().astype(str).tolist()
                   if "individuals" in names else ["individual_0"])
    keypoints = columns.get_level_values("bodyparts").unique().astype(str).tolist()
    coords = set(columns.get_level_values("coords").astype(str))
    space = [c for c in _SPACE if c in coords]
    if space[:2] != ["x", "y"]:
        raise ValueError(f"{path} is not a DeepLabCut table: its coords level has "
                         f"{sorted(coords)}, missing 'x' and 'y'.")
    fields = space + (["likelihood"] if "likelihood" in coords else [])
    table = table.droplevel("scorer", axis=1) if "scorer" in names else table
    if "individuals" not in names:
        table = pd.concat({individuals[0]: table}, axis=1, names=["individuals"])
    full = pd.MultiIndex.from_product([individuals, keypoints, fields],
                                      names=["individuals", "bodyparts", "coords"])
    try:
        values = table.reindex(columns=full).to_numpy(dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: cannot read the DeepLabCut values: {err}") from err
    values = values.reshape(len(table), len(individuals), len(keypoints), len(fields))
    confidence = values[..., len(space)] if "likelihood" in coords else None
    return _Tracks(values[..., :len(space)], confidence, keypoints, individuals, space)


def _read_sleap(path: Path) -> _Tracks:
    """Read a SLEAP analysis HDF5 file; ``tracks`` is ``(tracks, space, nodes, frames)``."""
    with _open_hdf5(path, "SLEAP") as f:
        missing = [k for k in ("tracks", "node_names") if k not in f]
        if missing:
            raise ValueError(f"{path} is not a SLEAP analysis file: missing dataset(s) "
                             f"{missing}.")
        tracks = np.asarray(f["tracks"][()], dtype=np.float64)
        keypoints = _strings(f["node_names"][()])
        track_names = _strings(f["track_names"][()]) if "track_names" in f else []
        scores = f["point_scores"][()] if "point_scores" in f else None
    if tracks.ndim != 4 or tracks.shape[2] != len(keypoints) or tracks.shape[1] not in (2, 3):
        raise ValueError(f"{path}: SLEAP 'tracks' has shape {tracks.shape}; expected "
                         f"(n_tracks, 2 or 3, {len(keypoints)} nodes, n_frames).")
    n_tracks = tracks.shape[0]
    if not track_names and n_tracks == 1:
        track_names = ["individual_0"]
    if len(track_names) != n_tracks:
        raise ValueError(f"{path}: SLEAP 'tracks' has {n_tracks} tracks but 'track_names' "
                         f"has {len(track_names)} names.")
    confidence = None
    if scores is not None:
        if scores.shape != (n_tracks,) + tracks.shape[2:]:
            raise ValueError(f"{path}: SLEAP 'point_scores' has shape {scores.shape}; "
                             f"expected {(n_tracks,) + tracks.shape[2:]} to match 'tracks'.")
        confidence = np.asarray(scores, dtype=np.float64).transpose(2, 0, 1)
    return _Tracks(tracks.transpose(3, 0, 2, 1), confidence, keypoints, track_names,
                   list(_SPACE[:tracks.shape[1]]))


def _read_jabs(path: Path) -> _Tracks:
    """Read a JABS pose file: v2 single mouse or v3+ multi-mouse instance slots."""
    with _open_hdf5(path, "JABS") as f:
        group = f.get("poseest")
        if not isinstance(group, h5py.Group) or not {"points", "confidence"} <= set(group):
            raise ValueError(f"{path} is not a JABS pose file: missing group 'poseest' "
                             "with datasets 'points' and 'confidence'.")
        points, confidence = group["points"][()], group["confidence"][()]
    single = points.ndim == 3
    if single:
        points, confidence = points[:, None], confidence[:, None]
    n_kp = len(JABS_KEYPOINTS)
    if points.ndim != 4 or points.shape[2:] != (n_kp, 2) or confidence.shape != points.shape[:3]:
        raise ValueError(f"{path}: JABS 'points' {points.shape} and 'confidence' "
                         f"{confidence.shape} do not fit (frames[, instances], {n_kp}, 2) "
                         f"and (frames[, instances], {n_kp}).")
    confidence = confidence.astype(np.float64)
    position = points[..., ::-1].astype(np.float64)  # stored (y, x)
    position[confidence == 0] = np.nan
    individuals = [f"individual_{i}" for i in range(points.shape[1])]
    return _Tracks(position, confidence, list(JABS_KEYPOINTS), individuals, ["x", "y"])


def _open_hdf5(path: Path, software: str) -> h5py.File:
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path} is not an HDF5 file, which {software} files are.")
    return h5py.File(path, "r")


def _strings(values: np.ndarray) -> list[str]:
    """Decode an HDF5 array of byte or str names."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.ravel(values).tolist()]


_READERS = {"DeepLabCut": _read_dlc, "SLEAP": _read_sleap, "JABS": _read_jabs}


# ---------------------------------------------------------------------------------- output


def _drop_empty_individuals(tracks: _Tracks, path: Path) -> _Tracks:
    """Remove individuals that cannot be modelled, with a warning naming them.

    An individual with no valid point in any frame is always dropped. In files with
    several individuals (multi-animal trackers pad unused identity slots), an
    individual with some keypoint that is never tracked is a partial track and is
    dropped too; a lone individual is kept (the adapter then names the keypoint).
    """
    valid = ~np.isnan(tracks.position).any(-1)  # (time, individuals, keypoints)
    keep = valid.any(axis=(0, 2))
    if not keep.any():
        raise ValueError(f"{path} has no tracked point in any frame.")
    partial = keep & ~valid.any(axis=0).all(axis=-1)
    if keep.sum() > 1 and partial.any() and (keep & ~partial).any():
        keep = keep & ~partial
    if keep.all():
        return tracks
    dropped = [name for name, k in zip(tracks.individuals, keep) if not k]
    warnings.warn(f"{path}: dropping individual(s) {dropped}, which have no valid point in "
                  "any frame or (with other individuals present) a keypoint never tracked.",
                  UserWarning, stacklevel=3)
    confidence = None if tracks.confidence is None else tracks.confidence[:, keep]
    return _Tracks(tracks.position[:, keep], confidence, tracks.keypoints,
                   [n for n, k in zip(tracks.individuals, keep) if k], tracks.space)


def _to_dataset(tracks: _Tracks, path: Path, software: str, fps: float | None) -> xr.Dataset:
    """Build the ``movement``-layout Dataset."""
    present = ~np.isnan(tracks.position).any(-1)
    if tracks.confidence is None:
        confidence = present.astype(np.float64)
    else:
        confidence = np.where(present, tracks.confidence, 0.0)
    frames = np.arange(tracks.position.shape[0])
    attrs = {"source_software": software, "source_file": str(path)}
    if fps is not None:
        attrs["fps"] = float(fps)
    return xr.Dataset(
        {"position": (("time", "space", "keypoints", "individuals"),
                      tracks.position.transpose(0, 3, 2, 1)),
         "confidence": (("time", "keypoints", "individuals"), confidence.transpose(0, 2, 1))},
        coords={"time": frames if fps is None else frames / float(fps),
                "space": tracks.space, "keypoints": tracks.keypoints,
                "individuals": tracks.individuals},
        attrs=attrs)


# ---------------------------------------------------------------------------- many files


def _resolve(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """The files named by a directory, a glob pattern, one path or a list of paths."""
    if not isinstance(paths, (str, os.PathLike)):
        files = [Path(p) for p in paths]
        if not files:
            raise ValueError("load_many got an empty list of paths.")
        return files
    path = Path(paths)
    if path.is_dir():
        found, where = path.iterdir(), f"directory {path}"
    elif not path.exists() and any(c in str(paths) for c in "*?["):
        found, where = map(Path, glob.glob(str(paths))), f"pattern {str(paths)!r}"
    else:
        return [path]
    files = sorted(f for f in found if f.is_file() and f.suffix.lower() in POSE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"No pose files ({', '.join(POSE_SUFFIXES)}) in {where}.")
    return files


def _prefer_hdf5(files: list[Path]) -> list[Path]:
    """Drop a ``.csv`` that has an HDF5 twin (same folder and stem), with a warning."""
    hdf5 = {(f.parent, f.stem): f for f in files if f.suffix.lower() in _HDF5_SUFFIXES}
    kept = []
    for f in files:
        twin = hdf5.get((f.parent, f.stem)) if f.suffix.lower() == ".csv" else None
        if twin is None:
            kept.append(f)
        else:
            warnings.warn(f"{f} and {twin} hold the same recording {f.stem!r}; loading only "
                          f"{twin.name}.", UserWarning, stacklevel=3)
    return kept


def _unique_stems(files: list[Path]) -> list[str]:
    """File stems, with ``_2``, ``_3``, ... appended where they would collide."""
    taken = {f.stem for f in files}
    seen: set[str] = set()
    keys = []
    for f in files:
        key, n = f.stem, 2
        while key in seen or (key != f.stem and key in taken):
            key, n = f"{f.stem}_{n}", n + 1
        seen.add(key)
        keys.append(key)
    return keys
