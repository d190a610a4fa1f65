"""Checkpoints: one netCDF4 file per fit, written atomically, read without executing code.

Layout (``format_version`` 1)::

    /                    attrs: library="kpms_estimators", format_version=1, model (class
                         name), created_at (ISO 8601, UTC), kpms_estimators_version,
                         jax_version, xarray_version, netCDF4_version, numpy_version,
                         hyperparams_json (``get_params()``), fitted_json (small fitted
                         attributes: scalars, strings, lists)
    /fitted              (optional) array-valued fitted attributes, one variable each,
                         named like the attribute (``syllable_order_``, ``_anterior_``)
    /data                (optional) formatted data: padded arrays over (segment, time, ...),
                         ``recording`` coordinate (segment,) with the recording names as
                         values, ``bounds`` (segment, bound) with bound = [start, end]
    /history             per-sweep arrays over ``iteration`` (the coordinate holds the
                         sweep number 1..N): log-likelihood terms, ``stage`` (strings), ...
    /iteration_{n:06d}   one per snapshot, n = completed sweeps: every leaf of the chain
                         state pytree as a variable named by its path (``params.betas``,
                         ``z``, ``x``), ``rng_key`` (uint32 key data); attrs ``iteration``
                         and ``treedef_json`` (the pytree structure, NamedTuple types by
                         name)

Every variable carries ``kpms_dtype`` (the NumPy dtype it was written from); bool
arrays are stored as uint8 and strings as netCDF strings, and both come back with
their original dtype. No ``_FillValue`` is written, so nothing is masked on reading.

Pytrees are rebuilt through the explicit :data:`PYTREE_TYPES` registry (NamedTuple
class name -> class); an unknown name is an error, and nothing from the file is ever
imported, evaluated or unpickled.

Writes are atomic: the file is written to a temporary file in the same folder,
named ``.{name}.tmp-XXXXXXXX`` (``tempfile.mkstemp``), flushed and fsynced, then
moved over ``path`` with :func:`os.replace` (and the folder is fsynced). A process
killed mid-write leaves ``path`` untouched (old or new version, never a mix) and
may leave such a hidden temporary file behind; it is never read and may be deleted.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ._core import allo as _allo
from ._core import arhmm as _arhmm
from ._core import autoregressive as _autoregressive
from ._core import keypoint_slds as _keypoint_slds

FORMAT_VERSION = 1
LIBRARY = "kpms_estimators"
SNAPSHOT_PREFIX = "iteration_"
_SNAPSHOT_RE = re.compile(r"^iteration_(\d+)$")
_DTYPE_ATTR = "kpms_dtype"
_ENGINE = "netcdf4"

#: NamedTuple classes a checkpoint may name in a pytree, by class name. Reading
#: never looks a type up anywhere else.
PYTREE_TYPES: dict[str, type] = {
    "ARHMMState": _arhmm.ARHMMState,
    "ARHMMParams": _arhmm.ARHMMParams,
    "ARHMMHypers": _arhmm.ARHMMHypers,
    "ARParams": _autoregressive.ARParams,
    "ARPrior": _autoregressive.ARPrior,
    "KeypointState": _keypoint_slds.KeypointState,
    "KeypointParams": _keypoint_slds.KeypointParams,
    "KeypointHypers": _keypoint_slds.KeypointHypers,
    "AlloState": _allo.AlloState,
    "AlloParams": _allo.AlloParams,
    "AlloHypers": _allo.AlloHypers,
    "AlloPrior": _allo.AlloPrior,
}

# Meaningful dimension names of known state leaves (by last path component and ndim);
# used when their sizes agree within the snapshot, otherwise ``<path>_dim<i>``.
_LEAF_DIMS = {
    "z": ("segment", "labelled_frame"),
    "x": ("segment", "frame", "latent_dim"),
    "h": ("segment", "frame"),
    "v": ("segment", "frame", "space"),
    "s": ("segment", "frame", "keypoint"),
    "betas": ("state",),
    "pi": ("state", "next_state"),
    "Ab": ("state", "latent_dim", "ar_feature"),
    "Q": ("state", "latent_dim", "latent_dim_col"),
    "Cd": ("embedded_coordinate", "emission_column"),
    "sigmasq": ("keypoint",),
    "delta_h": ("state",),
    "sigmasq_h": ("state",),
    "delta_v": ("state", "egocentric_axis"),
    "sigmasq_v": ("state",),
}


class CheckpointError(ValueError):
    """A file that is not a readable kpms_estimators checkpoint."""


# ----------------------------------------------------------------------------- helpers


def snapshot_group(iteration: int) -> str:
    """Group name of the snapshot after ``iteration`` completed sweeps."""
    return f"{SNAPSHOT_PREFIX}{int(iteration):06d}"


def _versions() -> dict[str, str]:
    import jax
    import netCDF4

    from . import __version__

    return {
        "kpms_estimators_version": __version__,
        "jax_version": jax.__version__,
        "xarray_version": xr.__version__,
        "netCDF4_version": netCDF4.__version__,
        "numpy_version": np.__version__,
    }


def _encode_array(value, name: str) -> tuple[np.ndarray, dict]:
    """A NumPy array ready for netCDF4 and the attrs that restore its dtype."""
    arr = np.asarray(value)
    dtype = arr.dtype
    if dtype == bool:
        arr = arr.astype(np.uint8)
    elif dtype.kind == "U":
        pass
    elif dtype.kind not in "iuf":
        raise TypeError(f"{name!r}: arrays of dtype {dtype} cannot be stored in a checkpoint")
    return arr, {_DTYPE_ATTR: dtype.str if dtype.kind != "b" else "bool"}


def _decode_array(var: xr.Variable | xr.DataArray, name: str) -> np.ndarray:
    arr = np.array(var.values)  # a copy, detached from any file
    stored = var.attrs.get(_DTYPE_ATTR)
    if stored is None:
        return arr
    dtype = np.dtype(stored)
    if dtype.kind == "U":
        return np.asarray(arr.astype(str), dtype=dtype) if arr.size else np.zeros(arr.shape, dtype)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr


def _generic_dims(name: str, ndim: int) -> tuple[str, ...]:
    return tuple(f"{name}_dim{i}" for i in range(ndim))


def _dataset(arrays: dict[str, np.ndarray], dims: dict[str, tuple[str, ...]] | None = None, coords=None, attrs=None):
    """An xarray Dataset of encoded arrays; dims default to ``<name>_dim<i>``."""
    variables = {}
    for name, value in arrays.items():
        arr, vattrs = _encode_array(value, name)
        var_dims = (dims or {}).get(name) or _generic_dims(name, arr.ndim)
        variables[name] = xr.Variable(var_dims, arr, attrs=vattrs)
    return xr.Dataset(variables, coords=coords, attrs=attrs or {})


def _json_safe(value, name: str):
    """Plain JSON of ``value``: NumPy scalars become Python, tuples are tagged."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, np.generic) and value.dtype.kind == "U":
        return str(value)
    if isinstance(value, tuple):
        return {"__tuple__": [_json_safe(v, name) for v in value]}
    if isinstance(value, list):
        return [_json_safe(v, name) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{name!r}: only dicts with string keys can be stored in a checkpoint")
        return {k: _json_safe(v, f"{name}[{k!r}]") for k, v in value.items()}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufU":
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, np.ndarray) and value.dtype.kind == "O" and all(isinstance(v, str) for v in value.flat):
        # e.g. sklearn's feature_names_in_: an object array of strings
        return {"__ndarray__": value.tolist(), "dtype": "object"}
    raise TypeError(f"{name!r}: a value of type {type(value).__name__} cannot be stored in a checkpoint")


def _from_json(value):
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        if set(value) == {"__ndarray__", "dtype"}:
            dtype = np.dtype(value["dtype"])
            if dtype.kind not in "biufUO":
                raise CheckpointError(f"unsupported array dtype {value['dtype']!r} in the JSON attributes")
            if dtype.kind == "O" and not all(isinstance(v, str) for v in np.ravel(np.asarray(value["__ndarray__"], dtype=object))):
                raise CheckpointError("object arrays in the JSON attributes may only hold strings")
            return np.asarray(value["__ndarray__"], dtype=dtype)
        return {k: _from_json(v) for k, v in value.items()}
    return value


def hyperparams_to_json(params: dict[str, Any]) -> str:
    """JSON of ``get_params()``; a non-integer ``random_state`` is stored as null, with a warning."""
    out = {}
    for name, value in params.items():
        if name == "random_state" and not (value is None or isinstance(value, (int, np.integer))):
            warnings.warn(
                f"random_state={value!r} is not an int or None and cannot be saved; the checkpoint "
                "stores random_state=None. The chain itself continues exactly from the saved PRNG key.",
                UserWarning,
                stacklevel=3,
            )
            value = None
        out[name] = _json_safe(value, name)
    return json.dumps(out)


# ----------------------------------------------------------------------------- pytrees


def _flatten(tree, path: str, leaves: dict[str, np.ndarray]):
    """JSON structure of ``tree`` and its leaves by dotted path (no code, types by name)."""
    if tree is None:
        return None
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        type_name = type(tree).__name__
        if PYTREE_TYPES.get(type_name) is not type(tree):
            raise TypeError(
                f"NamedTuple type {type(tree).__module__}.{type_name} is not in "
                "kpms_estimators._checkpoint.PYTREE_TYPES and cannot be stored"
            )
        fields = [[f, _flatten(getattr(tree, f), _join(path, f), leaves)] for f in tree._fields]
        return {"namedtuple": type_name, "fields": fields}
    if isinstance(tree, (tuple, list)):
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return {kind: [_flatten(v, _join(path, str(i)), leaves) for i, v in enumerate(tree)]}
    if isinstance(tree, dict):
        if not all(isinstance(k, str) and "." not in k and "/" not in k for k in tree):
            raise TypeError(f"pytree dict at {path or '<root>'!r} needs string keys without '.' or '/'")
        return {"dict": [[k, _flatten(v, _join(path, k), leaves)] for k, v in tree.items()]}
    name = path or "value"
    leaves[name] = np.asarray(tree)
    return {"leaf": name}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _unflatten(node, leaves: dict[str, np.ndarray], where: str):
    if node is None:
        return None
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise CheckpointError(f"{where}: malformed pytree structure {node!r}")
    if "leaf" in node:
        name = node["leaf"]
        if name not in leaves:
            raise CheckpointError(f"{where}: variable {name!r} of the stored state is missing")
        return leaves[name]
    if "namedtuple" in node:
        type_name = node["namedtuple"]
        cls = PYTREE_TYPES.get(type_name)
        if cls is None:
            raise CheckpointError(
                f"{where}: unknown pytree type {type_name!r} (known types: {sorted(PYTREE_TYPES)})"
            )
        fields = [f for f, _ in node["fields"]]
        if tuple(fields) != tuple(cls._fields):
            raise CheckpointError(
                f"{where}: stored fields {fields} of {type_name} differ from the current ones {list(cls._fields)}"
            )
        return cls(*[_unflatten(child, leaves, where) for _, child in node["fields"]])
    if "tuple" in node:
        return tuple(_unflatten(c, leaves, where) for c in node["tuple"])
    if "list" in node:
        return [_unflatten(c, leaves, where) for c in node["list"]]
    if "dict" in node:
        return {k: _unflatten(c, leaves, where) for k, c in node["dict"]}
    raise CheckpointError(f"{where}: malformed pytree structure {node!r}")


def _leaf_dims(leaves: dict[str, np.ndarray]) -> dict[str, tuple[str, ...]]:
    """Meaningful dim names where known and consistent in size, generic otherwise."""
    sizes: dict[str, int] = {}
    dims = {}
    for name, arr in leaves.items():
        candidate = _LEAF_DIMS.get(name.rsplit(".", 1)[-1])
        if candidate is not None and len(candidate) == arr.ndim and all(
            sizes.get(d, n) == n for d, n in zip(candidate, arr.shape)
        ):
            sizes.update(zip(candidate, arr.shape))
            dims[name] = candidate
        else:
            dims[name] = _generic_dims(name, arr.ndim)
    return dims


def _snapshot_dataset(iteration: int, state, key_data) -> xr.Dataset:
    leaves: dict[str, np.ndarray] = {}
    treedef = _flatten(state, "", leaves)
    if "rng_key" in leaves:
        raise TypeError("a state leaf may not be named 'rng_key'")
    dims = _leaf_dims(leaves)
    arrays = dict(leaves)
    dims["rng_key"] = ("key_data",)
    arrays["rng_key"] = np.asarray(key_data)
    attrs = {"iteration": int(iteration), "treedef_json": json.dumps(treedef)}
    return _dataset(arrays, dims, attrs=attrs)


def _history_dataset(history: dict[str, np.ndarray]) -> xr.Dataset:
    history = {k: np.asarray(v) for k, v in (history or {}).items()}
    lengths = {k: v.shape[0] if v.ndim else None for k, v in history.items()}
    if any(n is None for n in lengths.values()) or len(set(lengths.values())) > 1:
        raise ValueError(f"history arrays must have one common length along their first axis; got {lengths}")
    n = next(iter(lengths.values()), 0)
    dims = {k: ("iteration",) + _generic_dims(k, v.ndim)[1:] for k, v in history.items()}
    return _dataset(
        history, dims, coords={"iteration": np.arange(1, n + 1, dtype=np.int64)},
        attrs={"order_json": json.dumps(list(history))},
    )


def data_to_dataset(data: dict[str, np.ndarray], keys, bounds) -> xr.Dataset:
    """The ``/data`` group: padded arrays over (segment, time, ...), recording names, bounds.

    Parameters
    ----------
    data : dict of str -> ndarray
        Batched arrays whose first axis is the segment (e.g. ``Y`` (B, T, K, D),
        ``conf`` (B, T, K), ``mask`` (B, T) bool).
    keys : sequence of str, shape (B,)
        Recording name of each segment (stored as the ``recording`` coordinate).
    bounds : array-like of int, shape (B, 2)
        (start, end) of each segment in its recording's frames, end exclusive.
    """
    keys = np.asarray([str(k) for k in keys], dtype=str)
    bounds = np.asarray(bounds)
    n_seg = len(keys)
    if bounds.shape != (n_seg, 2) or bounds.dtype.kind not in "iu":
        raise ValueError(f"bounds must be integers of shape ({n_seg}, 2); got {bounds.dtype} {bounds.shape}")
    if "bounds" in data or "recording" in data:
        raise ValueError("data may not contain arrays named 'bounds' or 'recording'")
    dims, n_time = {}, None
    for name, value in data.items():
        arr = np.asarray(value)
        if arr.ndim == 0 or arr.shape[0] != n_seg:
            raise ValueError(f"data[{name!r}] must have {n_seg} segments along its first axis; got shape {arr.shape}")
        generic = _generic_dims(name, arr.ndim)
        use_time = arr.ndim >= 2 and (n_time is None or n_time == arr.shape[1])
        if use_time:
            n_time = arr.shape[1]
        dims[name] = ("segment",) + (("time",) if use_time else generic[1:2]) + generic[2:]
    arrays = dict(data)
    arrays["bounds"] = bounds
    dims["bounds"] = ("segment", "bound")
    recording = xr.Variable(("segment",), keys, attrs={_DTYPE_ATTR: keys.dtype.str})
    return _dataset(arrays, dims, coords={"recording": recording, "bound": ["start", "end"]})


def dataset_to_data(ds: xr.Dataset) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Inverse of :func:`data_to_dataset`: ``(data, keys, bounds)``."""
    data = {name: _decode_array(var, name) for name, var in ds.data_vars.items() if name != "bounds"}
    keys = np.asarray(ds["recording"].values).astype(str)
    return data, keys, _decode_array(ds["bounds"], "bounds")


# ----------------------------------------------------------------------------- file I/O


def _encoding(ds: xr.Dataset) -> dict:
    """No fill values; light compression of larger numeric arrays."""
    out = {}
    for name, var in ds.variables.items():
        var.encoding = {}
        enc: dict = {"_FillValue": None}
        if var.dtype.kind in "iuf" and var.size >= 4096:
            enc.update(zlib=True, complevel=1)
        if var.dtype.kind in "OU":
            enc = {}
        out[name] = enc
    return out


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_file_mode(path: Path) -> int:
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_groups(path, groups: dict[str, xr.Dataset]) -> None:
    """Write ``{"/": root, "/group": ds, ...}`` atomically to ``path``."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tree = xr.DataTree.from_dict(groups)
    encoding = {g: _encoding(ds) for g, ds in groups.items() if g != "/"}
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=folder)
    os.close(fd)
    try:
        tree.to_netcdf(tmp, mode="w", engine=_ENGINE, encoding=encoding)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


def _open_error(path, exc) -> CheckpointError:
    return CheckpointError(
        f"{os.fspath(path)!r} is not a readable kpms_estimators checkpoint: it could not be read as a "
        f"netCDF4/HDF5 file (is it truncated or of another format?): {type(exc).__name__}: {exc}"
    )


def _read_groups(path, which=None) -> tuple[dict[str, xr.Dataset], list[str]]:
    """Load groups of the file into memory (all, or those ``which(name, names)`` accepts).

    Returns ``(groups, names)``: the groups by path, the root always included as
    "/", and the names of all top-level groups. The file is closed before returning.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {os.fspath(path)!r}")
    try:
        with xr.open_datatree(
            path, engine=_ENGINE, mask_and_scale=False, decode_times=False, decode_timedelta=False
        ) as tree:
            _check_root(path, tree.attrs)
            names = list(tree.children)
            groups = {"/": xr.Dataset(attrs=dict(tree.attrs))}
            for name, child in tree.children.items():
                if which is None or which(name, names):
                    groups[f"/{name}"] = child.to_dataset(inherit=False).load().copy(deep=True)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise _open_error(path, exc) from exc
    for ds in groups.values():
        for var in ds.variables.values():
            var.encoding = {}
    return groups, names


def _check_root(path, attrs) -> None:
    if attrs.get("library") != LIBRARY or "format_version" not in attrs or "model" not in attrs:
        raise CheckpointError(
            f"{os.fspath(path)!r} is not a kpms_estimators checkpoint (its root attributes lack "
            f"library={LIBRARY!r}, format_version and model)"
        )
    version = int(attrs["format_version"])
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{os.fspath(path)!r} has checkpoint format_version {version}; this version of "
            f"kpms_estimators reads up to {FORMAT_VERSION}"
        )


def _iterations(path, names) -> list[int]:
    out = []
    for name in names:
        match = _SNAPSHOT_RE.match(name.lstrip("/"))
        if match:
            out.append(int(match.group(1)))
    return sorted(out)


def _meta(path, groups: dict[str, xr.Dataset], names: list[str]) -> dict:
    attrs = groups["/"].attrs
    try:
        hyperparams = _from_json(json.loads(attrs.get("hyperparams_json", "{}")))
        fitted = _from_json(json.loads(attrs.get("fitted_json", "{}")))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{os.fspath(path)!r}: malformed JSON in the root attributes: {exc}") from exc
    if "/fitted" in groups:
        ds = groups["/fitted"]
        for name, var in ds.data_vars.items():
            arr = _decode_array(var, name)
            fitted[name] = arr[()] if var.attrs.get("scalar") == 1 else arr
    return {
        "model": str(attrs["model"]),
        "format_version": int(attrs["format_version"]),
        "created_at": str(attrs.get("created_at", "")),
        "versions": {k: str(v) for k, v in attrs.items() if k.endswith("_version") and k != "format_version"},
        "hyperparams": hyperparams,
        "fitted": fitted,
        "iterations": _iterations(path, names),
        "has_data": "data" in names,
    }


def _root_dataset(model_name, hyperparams, fitted_json: str) -> xr.Dataset:
    if isinstance(hyperparams, str):
        hyperparams_json = hyperparams
    else:
        hyperparams_json = hyperparams_to_json(dict(hyperparams or {}))
    attrs = {
        "library": LIBRARY,
        "format_version": FORMAT_VERSION,
        "model": str(model_name),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **_versions(),
        "hyperparams_json": hyperparams_json,
        "fitted_json": fitted_json,
    }
    return xr.Dataset(attrs=attrs)


def _split_fitted(fitted: dict[str, Any]) -> tuple[str, dict[str, np.ndarray], set[str]]:
    """(JSON of small values, arrays for /fitted, names of NumPy scalars)."""
    small, arrays, scalars = {}, {}, set()
    for name, value in (fitted or {}).items():
        if hasattr(value, "__array__") and not isinstance(value, (np.ndarray, np.generic)):
            value = np.asarray(value)  # e.g. a jax.Array
        if isinstance(value, np.ndarray) and value.dtype.kind in "biufU":
            arrays[name] = value
        elif isinstance(value, np.generic) and value.dtype.kind in "biufU":
            arrays[name] = np.asarray(value)
            scalars.add(name)
        else:
            small[name] = _json_safe(value, name)
    return json.dumps(small), arrays, scalars


def _fitted_dataset(arrays, scalars) -> xr.Dataset:
    ds = _dataset(arrays)
    for name in scalars:
        ds[name].attrs["scalar"] = 1
    return ds


# ----------------------------------------------------------------------------- public API


def write_checkpoint(
    path,
    *,
    model_name: str,
    hyperparams: dict[str, Any] | None = None,
    fitted: dict[str, Any] | None = None,
    snapshots: dict[int, tuple[Any, np.ndarray]] | None = None,
    history: dict[str, np.ndarray] | None = None,
    data: dict[str, np.ndarray] | None = None,
    keys=None,
    bounds=None,
) -> None:
    """Write a whole checkpoint atomically (replacing any file at ``path``).

    Parameters
    ----------
    path : str or PathLike
    model_name : str
        Class name of the model, e.g. ``"ARHMM"``.
    hyperparams : dict, optional
        ``get_params()``; made JSON-safe (tuples kept, NumPy scalars as Python).
    fitted : dict, optional
        Fitted attributes: arrays and NumPy scalars go to ``/fitted``, the rest
        (ints, floats, strings, lists, dicts of those) to the ``fitted_json`` attribute.
    snapshots : dict of int -> (state pytree, key data), optional
        Chain states by number of completed sweeps.
    history : dict of str -> ndarray, optional
        Per-sweep arrays of one common length.
    data, keys, bounds : optional
        Formatted data for ``/data`` (see :func:`data_to_dataset`).
    """
    fitted_json, arrays, scalars = _split_fitted(fitted or {})
    groups = {"/": _root_dataset(model_name, hyperparams, fitted_json)}
    if arrays:
        groups["/fitted"] = _fitted_dataset(arrays, scalars)
    if data is not None:
        if keys is None or bounds is None:
            raise ValueError("data needs keys (recording name per segment) and bounds")
        groups["/data"] = data_to_dataset(data, keys, bounds)
    groups["/history"] = _history_dataset(history or {})
    for iteration, (state, key_data) in sorted((snapshots or {}).items()):
        groups["/" + snapshot_group(iteration)] = _snapshot_dataset(iteration, state, key_data)
    _write_groups(path, groups)


def read_metadata(path) -> dict:
    """Root information without loading snapshots.

    Returns a dict with ``model``, ``format_version``, ``created_at``, ``versions``,
    ``hyperparams``, ``fitted`` (JSON and ``/fitted`` values), ``iterations`` (sorted
    snapshot iterations) and ``has_data``.
    """
    groups, names = _read_groups(path, which=lambda name, names: name == "fitted")
    return _meta(path, groups, names)


def list_iterations(path) -> list[int]:
    """Sorted iterations (completed sweeps) of the snapshots in the checkpoint."""
    return _iterations(path, _read_groups(path, which=lambda name, names: False)[1])


def _decode_history(path, ds: xr.Dataset | None, upto: int | None) -> dict[str, np.ndarray]:
    if ds is None:
        return {}
    order = json.loads(ds.attrs.get("order_json", "null")) or list(ds.data_vars)
    missing = [k for k in order if k not in ds.data_vars]
    if missing:
        raise CheckpointError(f"{os.fspath(path)!r}: history variables {missing} are missing")
    out = {k: _decode_array(ds[k], k) for k in order}
    if upto is not None:
        keep = np.asarray(ds["iteration"].values) <= upto
        out = {k: v[keep] for k, v in out.items()}
    return out


def _decode_snapshot(path, ds: xr.Dataset, name: str):
    where = f"{os.fspath(path)!r}, group /{name}"
    if "treedef_json" not in ds.attrs or "rng_key" not in ds:
        raise CheckpointError(f"{where}: not a snapshot (no treedef_json attribute or rng_key variable)")
    try:
        treedef = json.loads(ds.attrs["treedef_json"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: malformed treedef_json: {exc}") from exc
    leaves = {k: _decode_array(v, k) for k, v in ds.data_vars.items() if k != "rng_key"}
    try:
        state = _unflatten(treedef, leaves, where)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{where}: malformed pytree structure: {type(exc).__name__}: {exc}") from exc
    return state, _decode_array(ds["rng_key"], "rng_key")


def read_checkpoint(path, iteration: int | None = None):
    """Read one snapshot.

    Parameters
    ----------
    path : str or PathLike
    iteration : int, optional
        Completed sweeps of the snapshot to read; ``None`` reads the latest.

    Returns
    -------
    meta : dict
        As :func:`read_metadata`.
    state : pytree of ndarray
        The chain state, rebuilt with the NamedTuple classes of :data:`PYTREE_TYPES`.
    key_data : ndarray of uint32
    history : dict of str -> ndarray
        Per-sweep arrays up to and including ``iteration``.
    iteration : int
    """

    def which(name, names):
        its = _iterations(path, names)
        target = its[-1] if iteration is None and its else iteration
        return name in ("fitted", "history") or (target is not None and name == snapshot_group(target))

    groups, names = _read_groups(path, which=which)
    iterations = _iterations(path, names)
    if not iterations:
        raise CheckpointError(f"{os.fspath(path)!r} holds no snapshot (no fitted chain state)")
    if iteration is None:
        iteration = iterations[-1]
    elif int(iteration) not in iterations:
        raise ValueError(f"{os.fspath(path)!r} has no snapshot at iteration {iteration}; it has {iterations}")
    iteration = int(iteration)
    group = snapshot_group(iteration)
    meta = _meta(path, groups, names)
    state, key_data = _decode_snapshot(path, groups["/" + group], group)
    history = _decode_history(path, groups.get("/history"), iteration)
    return meta, state, key_data, history, iteration


def read_snapshot_variable(path, name: str) -> dict[int, np.ndarray]:
    """One variable (e.g. ``z``) of every snapshot, ``{iteration: array}`` in order, loading nothing else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {os.fspath(path)!r}")
    out = {}
    try:
        with xr.open_datatree(
            path, engine=_ENGINE, mask_and_scale=False, decode_times=False, decode_timedelta=False
        ) as tree:
            _check_root(path, tree.attrs)
            for group, child in tree.children.items():
                match = _SNAPSHOT_RE.match(group)
                if match is None:
                    continue
                if name not in child.variables:
                    raise CheckpointError(f"{os.fspath(path)!r}, group /{group}: no variable {name!r}")
                out[int(match.group(1))] = _decode_array(child[name], name)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise _open_error(path, exc) from exc
    return dict(sorted(out.items()))


def read_data(path):
    """``(data, keys, bounds)`` from the ``/data`` group, or ``None`` if there is none."""
    groups, _ = _read_groups(path, which=lambda name, names: name == "data")
    if "/data" not in groups:
        return None
    return dataset_to_data(groups["/data"])


def add_snapshot(path, iteration: int, state, key_data, history: dict[str, np.ndarray] | None = None) -> None:
    """Add (or replace) the snapshot at ``iteration``; rewrites the file atomically.

    ``history`` (if given) replaces the stored history (pass the whole history up to
    ``iteration``).
    """
    groups, _ = _read_groups(path)
    groups["/" + snapshot_group(iteration)] = _snapshot_dataset(iteration, state, key_data)
    if history is not None:
        groups["/history"] = _history_dataset(history)
    _write_groups(path, groups)


def delete_snapshots_after(path, iteration: int) -> list[int]:
    """Remove snapshots after ``iteration`` and truncate the history to it (atomic rewrite).

    This is the reference's rule when a fit resumes from ``iteration``. Returns the
    removed iterations.
    """
    groups, names = _read_groups(path)
    removed = [n for n in _iterations(path, names) if n > int(iteration)]
    for n in removed:
        del groups["/" + snapshot_group(n)]
    if "/history" in groups:
        history = groups["/history"]
        groups["/history"] = history.isel(iteration=np.asarray(history["iteration"].values) <= int(iteration))
    _write_groups(path, groups)
    return removed
