"""Checkpoints: netCDF4 round trips, exact continuation, plain-netCDF layout, crash safety, bad files."""

from __future__ import annotations

import copy
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import netCDF4
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from sklearn.exceptions import NotFittedError

from kpms_estimators import ARHMM, KeypointSLDS
from kpms_estimators import _checkpoint as ckpt
from kpms_estimators._core import arhmm as ar_core
from kpms_estimators._core import keypoint_slds as kp_core
from kpms_estimators.datasets import simulate_arhmm, simulate_keypoints

REPO = Path(__file__).resolve().parents[1]
JAX_CACHE = os.environ.get("KPMS_JAX_CACHE", "")  # opt-in, see conftest.py

AR_SIM = dict(n_states=3, latent_dim=2, n_recordings=2, n_frames=200, random_state=0)
AR_PARAMS = dict(n_states=5, n_iter=3, random_state=0)
KP_PARAMS = dict(n_states=8, n_ar_iter=2, n_iter=3, n_apply_iter=2, n_marginal_samples=2, latent_dim=3, random_state=0)


# ----------------------------------------------------------------------------- helpers


def assert_same(a, b, where="estimator"):
    """Exact equality of values, dtypes and pytree/container types."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, tuple) and hasattr(a, "_fields"):
        assert a._fields == b._fields, where
        for field in a._fields:
            assert_same(getattr(a, field), getattr(b, field), f"{where}.{field}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype, f"{where}: {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, where
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_estimator(a, b):
    assert a.get_params() == b.get_params()
    assert sorted(vars(a)) == sorted(vars(b))
    for name in vars(a):
        assert_same(getattr(a, name), getattr(b, name), name)


@pytest.fixture(scope="module")
def ar_sim():
    return simulate_arhmm(**AR_SIM)


@pytest.fixture(scope="module")
def ar_fitted(ar_sim):
    return ARHMM(**AR_PARAMS).fit(ar_sim.X, sequence_ids=ar_sim.sequence_ids)


@pytest.fixture(scope="module")
def kp_sim():
    return simulate_keypoints(n_recordings=2, n_frames=300, random_state=0)


@pytest.fixture(scope="module")
def kp_fitted(kp_sim):
    return KeypointSLDS(**KP_PARAMS).fit(kp_sim.poses)


# ----------------------------------------------------------------------------- estimators


def test_arhmm_round_trip_predictions(tmp_path, ar_sim, ar_fitted):
    path = tmp_path / "arhmm.nc"
    ar_fitted.save(path)
    loaded = ARHMM.load(path)
    assert_same_estimator(ar_fitted, loaded)
    kw = dict(sequence_ids=ar_sim.sequence_ids)
    np.testing.assert_array_equal(loaded.predict(ar_sim.X, **kw), ar_fitted.predict(ar_sim.X, **kw))
    np.testing.assert_array_equal(loaded.predict_proba(ar_sim.X, **kw), ar_fitted.predict_proba(ar_sim.X, **kw))
    np.testing.assert_array_equal(loaded.transform(ar_sim.X, **kw), ar_fitted.transform(ar_sim.X, **kw))
    assert loaded.score(ar_sim.X, **kw) == ar_fitted.score(ar_sim.X, **kw)


def test_arhmm_continuation_is_exact(tmp_path, ar_sim, ar_fitted):
    path = tmp_path / "arhmm.nc"
    ar_fitted.save(path)
    kw = dict(sequence_ids=ar_sim.sequence_ids)
    in_memory = copy.deepcopy(ar_fitted).partial_fit(ar_sim.X, **kw)
    resumed = ARHMM.load(path).partial_fit(ar_sim.X, **kw)
    assert resumed.n_iter_ == 2 * AR_PARAMS["n_iter"]
    assert_same_estimator(in_memory, resumed)


def test_feature_names_and_random_state_instance(tmp_path, ar_sim):
    """Object arrays of names survive; a RandomState instance is saved as None with a warning."""
    X = pd.DataFrame(ar_sim.X, columns=[f"pc{i}" for i in range(ar_sim.X.shape[1])])
    model = ARHMM(**{**AR_PARAMS, "random_state": np.random.RandomState(0)})
    model.fit(X, sequence_ids=ar_sim.sequence_ids)
    with pytest.warns(UserWarning, match="random_state"):
        model.save(tmp_path / "df.nc")
    loaded = ARHMM.load(tmp_path / "df.nc")
    assert loaded.random_state is None
    assert loaded.feature_names_in_.dtype == object
    np.testing.assert_array_equal(loaded.feature_names_in_, model.feature_names_in_)
    np.testing.assert_array_equal(
        loaded.predict(X, sequence_ids=ar_sim.sequence_ids), model.predict(X, sequence_ids=ar_sim.sequence_ids)
    )


def test_keypoint_slds_round_trip_and_continuation(tmp_path, kp_sim, kp_fitted):
    path = tmp_path / "kp.nc"
    kp_fitted.save(path)
    loaded = KeypointSLDS.load(path)
    assert_same_estimator(kp_fitted, loaded)
    assert loaded._fingerprint_ == kp_fitted._fingerprint_
    np.testing.assert_array_equal(loaded._anterior_, kp_fitted._anterior_)
    for rec, labels in kp_fitted.predict(kp_sim.poses).items():
        np.testing.assert_array_equal(loaded.predict(kp_sim.poses)[rec], labels)
    expected, got = kp_fitted.transform(kp_sim.poses), loaded.transform(kp_sim.poses)
    for rec in expected:
        xr.testing.assert_identical(got[rec], expected[rec])
    assert loaded.score(kp_sim.poses) == kp_fitted.score(kp_sim.poses)
    # the chain continues exactly as it would have in memory
    in_memory = copy.deepcopy(kp_fitted).partial_fit(kp_sim.poses)
    resumed = loaded.partial_fit(kp_sim.poses)
    assert resumed.n_iter_ == KP_PARAMS["n_ar_iter"] + 2 * KP_PARAMS["n_iter"]
    assert_same_estimator(in_memory, resumed)
    np.testing.assert_array_equal(resumed.log_likelihood_history_, in_memory.log_likelihood_history_)


def test_save_unfitted_and_load_errors(tmp_path, ar_fitted):
    with pytest.raises(NotFittedError):
        ARHMM().save(tmp_path / "unfitted.nc")
    path = tmp_path / "ar.nc"
    ar_fitted.save(path)
    with pytest.raises(ValueError, match=rf"{path}.*ARHMM.*not a KeypointSLDS"):
        KeypointSLDS.load(path)
    # a checkpoint with hyperparameters but no chain
    empty = tmp_path / "empty.nc"
    ckpt.write_checkpoint(empty, model_name="ARHMM", hyperparams=ARHMM().get_params())
    with pytest.raises(ValueError, match=rf"{empty}.*no fitted ARHMM"):
        ARHMM.load(empty)
    with pytest.raises(ValueError, match=rf"{empty}.*no snapshot"):
        ckpt.read_checkpoint(empty)


# ----------------------------------------------------------------------------- the file itself


def _walk(group):
    yield group
    for child in group.groups.values():
        yield from _walk(child)


def test_file_is_plain_netcdf(tmp_path, kp_fitted):
    path = tmp_path / "kp.nc"
    kp_fitted.save(path)
    with xr.open_datatree(path, engine="netcdf4") as tree:
        assert tree.attrs["library"] == "kpms_estimators"
        assert tree.attrs["model"] == "KeypointSLDS"
        assert int(tree.attrs["format_version"]) == 1
        for name in ("jax_version", "xarray_version", "netCDF4_version", "numpy_version", "kpms_estimators_version"):
            assert tree.attrs[name]
        assert json.loads(tree.attrs["hyperparams_json"])["n_states"] == KP_PARAMS["n_states"]
        fitted = json.loads(tree.attrs["fitted_json"])
        assert fitted["latent_dim_"] == 3 and fitted["keypoints_"] == kp_fitted.keypoints_
        assert fitted["n_iter_"] == kp_fitted.n_iter_
        snap = tree[ckpt.snapshot_group(kp_fitted.n_iter_)]
        assert set(snap.data_vars) == {
            "params.betas", "params.pi", "params.Ab", "params.Q", "params.Cd", "params.sigmasq",
            "x", "z", "h", "v", "s", "rng_key",
        }
        assert snap["z"].dtype == np.int32 and snap["z"].dims == ("segment", "labelled_frame")
        assert snap["x"].dims == ("segment", "frame", "latent_dim")
        assert snap["rng_key"].dtype == np.uint32
        assert snap["x"].dtype == np.float64
        assert list(tree["history"]["stage"].values) == list(kp_fitted.stage_history_)
        assert tree["history"].sizes["iteration"] == kp_fitted.n_iter_
    with netCDF4.Dataset(path) as nc:
        assert nc.getncattr("library") == "kpms_estimators"
        groups = {g.path for g in _walk(nc)}
        assert {"/history", "/fitted", f"/{ckpt.snapshot_group(kp_fitted.n_iter_)}"} <= groups
        n_vars = 0
        for group in _walk(nc):
            for name, var in group.variables.items():
                n_vars += 1
                # plain numbers, or netCDF strings (a VLType of str): nothing opaque or pickled
                assert not isinstance(var.datatype, (netCDF4.CompoundType, netCDF4.EnumType)), name
                if isinstance(var.datatype, netCDF4.VLType):
                    assert var.dtype is str, (group.path, name, var.dtype)
                else:
                    assert np.dtype(var.dtype).kind in "iuf", (group.path, name, var.dtype)
        assert n_vars > 20
        assert nc[f"{ckpt.snapshot_group(kp_fitted.n_iter_)}/z"].dtype == np.int32
    assert not list(tmp_path.glob(".*tmp*"))


class _Inner(kp_core.KeypointParams):
    pass


def test_generic_pytrees_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    params = ar_core.ARHMMParams(
        betas=rng.random(4).astype(np.float32),
        pi=rng.random((4, 4)),
        Ab=rng.integers(0, 9, (4, 2, 7)).astype(np.int64),
        Q=np.float64(2.5),  # a 0-d leaf
    )
    state = {"arhmm": ar_core.ARHMMState(params, rng.integers(0, 4, (2, 5)).astype(np.int32)),
             "flags": (rng.random(3) > 0.5, None, [np.arange(3, dtype=np.uint16)])}
    key = np.array([7, 9], dtype=np.uint32)
    history = {"x": rng.random(6), "n_used": np.arange(6), "stage": np.array(["ar_only"] * 2 + ["full"] * 4)}
    path = tmp_path / "generic.nc"
    ckpt.write_checkpoint(
        path, model_name="Custom", hyperparams={"shape": (2, 3), "scale": np.float64(0.5), "names": ["a"], "none": None},
        fitted={"count_": 3, "mean_": np.float32(1.5), "order_": np.arange(4), "mask_": np.array([True, False]),
                "labels_": ("a", "b")},
        snapshots={6: (state, key)}, history=history,
    )
    meta, got, got_key, got_history, iteration = ckpt.read_checkpoint(path)
    assert iteration == 6 and meta["model"] == "Custom"
    assert meta["hyperparams"] == {"shape": (2, 3), "scale": 0.5, "names": ["a"], "none": None}
    assert_same(meta["fitted"]["mean_"], np.float32(1.5))
    assert_same(meta["fitted"]["mask_"], np.array([True, False]))
    assert meta["fitted"]["labels_"] == ("a", "b") and meta["fitted"]["count_"] == 3
    state["arhmm"] = state["arhmm"]._replace(params=state["arhmm"].params._replace(Q=np.asarray(2.5)))
    assert_same(got, state)
    assert_same(got_key, key)
    assert_same(got_history, history)
    # an unregistered NamedTuple subclass cannot be written
    with pytest.raises(TypeError, match="PYTREE_TYPES"):
        ckpt.write_checkpoint(tmp_path / "bad.nc", model_name="X", snapshots={1: (_Inner(*range(6)), key)})


def test_unknown_pytree_type_is_refused(tmp_path, ar_fitted):
    path = tmp_path / "ar.nc"
    ar_fitted.save(path)
    group = ckpt.snapshot_group(ar_fitted.n_iter_)
    with netCDF4.Dataset(path, "a") as nc:
        treedef = nc[group].getncattr("treedef_json")
        nc[group].setncattr("treedef_json", treedef.replace('"ARHMMState"', '"os.system"'))
    with pytest.raises(ValueError, match=r"unknown pytree type 'os.system'"):
        ARHMM.load(path)


def test_snapshots_list_read_add_delete(tmp_path):
    rng = np.random.default_rng(1)

    def state(n):
        params = ar_core.ARHMMParams(rng.random(3), rng.random((3, 3)), rng.random((3, 2, 5)), rng.random((3, 2, 2)))
        return ar_core.ARHMMState(params, np.full((2, 4), n, np.int32)), np.array([n, n + 1], np.uint32)

    snaps = {n: state(n) for n in (2, 5, 9)}
    history = {"x": np.arange(9.0), "stage": np.array(["full"] * 9)}
    path = tmp_path / "fit.nc"
    data = {"Y": rng.random((3, 10, 4, 2)), "conf": rng.random((3, 10, 4)), "mask": rng.random((3, 10)) > 0.2}
    keys, bounds = ["mouse/a 1", "mouse/a 1", "b"], np.array([[0, 10], [5, 15], [0, 8]])
    ckpt.write_checkpoint(path, model_name="ARHMM", snapshots=snaps, history=history, data=data, keys=keys, bounds=bounds)
    assert ckpt.list_iterations(path) == [2, 5, 9]
    meta, latest, key, hist, it = ckpt.read_checkpoint(path)
    assert it == 9 and meta["iterations"] == [2, 5, 9] and meta["has_data"]
    assert_same(latest, snaps[9][0])
    assert_same(key, snaps[9][1])
    _, mid, key, hist, it = ckpt.read_checkpoint(path, iteration=5)
    assert it == 5
    assert_same(mid, snaps[5][0])
    np.testing.assert_array_equal(hist["x"], np.arange(5.0))
    with pytest.raises(ValueError, match="no snapshot at iteration 4"):
        ckpt.read_checkpoint(path, iteration=4)
    # formatted data: recording names are coordinate values, not group names
    got_data, got_keys, got_bounds = ckpt.read_data(path)
    assert_same(got_data, data)
    assert list(got_keys) == keys
    assert_same(got_bounds, bounds)
    with xr.open_datatree(path, engine="netcdf4") as tree:
        assert list(tree["data"]["recording"].values) == keys
        assert tree["data"]["Y"].dims == ("segment", "time", "Y_dim2", "Y_dim3")
        assert set(tree.children) == {"data", "history", "iteration_000002", "iteration_000005", "iteration_000009"}
    # add a snapshot, then truncate as a resume from iteration 5 would
    ckpt.add_snapshot(path, 12, *state(12), history={"x": np.arange(12.0), "stage": np.array(["full"] * 12)})
    assert ckpt.list_iterations(path) == [2, 5, 9, 12]
    assert ckpt.delete_snapshots_after(path, 5) == [9, 12]
    assert ckpt.list_iterations(path) == [2, 5]
    meta, latest, _, hist, it = ckpt.read_checkpoint(path)
    assert it == 5
    assert_same(latest, snaps[5][0])
    np.testing.assert_array_equal(hist["x"], np.arange(5.0))
    assert ckpt.read_data(path)[1].tolist() == keys
    assert not list(tmp_path.glob(".*tmp*"))


def test_failed_write_keeps_the_old_file(tmp_path, ar_fitted, monkeypatch):
    path = tmp_path / "ar.nc"
    ar_fitted.save(path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(xr.DataTree, "to_netcdf", broken)
    with pytest.raises(OSError, match="disk full"):
        ar_fitted.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ar.nc"]


# ----------------------------------------------------------------------------- bad files


def test_malformed_files_raise_value_error(tmp_path, ar_fitted):
    good = tmp_path / "good.nc"
    ar_fitted.save(good)
    raw = good.read_bytes()
    bad = {
        "half.nc": raw[: len(raw) // 2],
        "head.nc": raw[:100],
        "tail_cut.nc": raw[:-16],
        "random.nc": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty.nc": b"",
    }
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    xr.Dataset({"a": ("t", np.arange(3))}, attrs={"title": "other"}).to_netcdf(tmp_path / "foreign.nc", engine="netcdf4")
    for name in [*bad, "foreign.nc"]:
        path = tmp_path / name
        with pytest.raises(ValueError, match=str(path)) as info:
            ARHMM.load(path)
        if name == "foreign.nc":
            assert "not a kpms_estimators checkpoint" in str(info.value)
        with pytest.raises(ValueError, match=str(path)):
            ckpt.read_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        ARHMM.load(tmp_path / "missing.nc")


# ----------------------------------------------------------------------------- crash safety

_CHILD = r"""
import sys
import jax
if sys.argv[2]:
    jax.config.update("jax_compilation_cache_dir", sys.argv[2])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
from kpms_estimators import ARHMM
from kpms_estimators.datasets import simulate_arhmm

sim = simulate_arhmm(**SIM)
model = ARHMM.load(sys.argv[1])
first = True
while True:
    model.partial_fit(sim.X, sequence_ids=sim.sequence_ids)
    model.save(sys.argv[1])
    if first:
        print("saved", flush=True)
        first = False
        if len(sys.argv) > 3:  # warm-up run: compile (filling the cache) and stop
            break
""".replace("SIM", repr(AR_SIM))


def _kill_rounds(path: Path, n_kills: int, rng: random.Random, copies: list[Path], errors: list[str],
                 cache: str):
    """Start a child that resumes from ``path`` and saves in a loop; SIGKILL it at a random moment."""
    for i in range(n_kills):
        log = path.with_name(f"{path.stem}.child{i}.log")
        with open(log, "wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(path), cache], stdout=subprocess.PIPE, stderr=stderr
            )
        try:
            ready, _, _ = select.select([child.stdout], [], [], 120)
            line = child.stdout.readline() if ready else b""
            if line.strip() != b"saved":
                child.kill()
                child.wait()
                errors.append(f"child {i} for {path.name} did not save: {log.read_text()[-2000:]}")
                return
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        finally:
            child.stdout.close()
        log.unlink()
        copy_path = path.with_name(f"{path.stem}.kill{i:03d}.nc")
        shutil.copyfile(path, copy_path)
        copies.append(copy_path)


def _crash_test(tmp_path, ar_sim, n_kills, n_workers=2, seed=0):
    import threading

    kw = dict(sequence_ids=ar_sim.sequence_ids)
    paths = []
    for w in range(n_workers):
        path = tmp_path / f"w{w}" / "fit.nc"
        path.parent.mkdir()
        ARHMM(**{**AR_PARAMS, "n_iter": 1}).fit(ar_sim.X, **kw).save(path)
        paths.append(path)
    # The children share a compilation cache, filled by one uninterrupted child first: each killed child
    # then only loads its programs (no compile, so no cache write, can be cut short by a kill).
    cache = JAX_CACHE or str(tmp_path / "jax-cache")
    warm = tmp_path / "warm.nc"
    shutil.copyfile(paths[0], warm)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(warm), cache, "once"], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    warm.unlink()
    copies = [[] for _ in paths]
    errors: list[str] = []
    per_worker = [n_kills // n_workers + (w < n_kills % n_workers) for w in range(n_workers)]
    threads = [
        threading.Thread(target=_kill_rounds, args=(p, n, random.Random(seed * 1000 + w), copies[w], errors, cache))
        for w, (p, n) in enumerate(zip(paths, per_worker))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(map(len, copies)) == n_kills
    # the reference chain, uninterrupted, in memory (every worker runs the same chain)
    reference = [ARHMM(**{**AR_PARAMS, "n_iter": 1}).fit(ar_sim.X, **kw)]
    n_interrupted_writes = 0
    for w, worker_copies in enumerate(copies):
        last = 1
        for copy_path in worker_copies:
            loaded = ARHMM.load(copy_path)
            assert loaded.n_iter_ >= last  # never goes back
            last = loaded.n_iter_
            while len(reference) < loaded.n_iter_:
                reference.append(copy.deepcopy(reference[-1]).partial_fit(ar_sim.X, **kw))
            assert_same_estimator(reference[loaded.n_iter_ - 1], loaded)
            resumed = loaded.partial_fit(ar_sim.X, **kw)
            assert resumed.n_iter_ == last + 1
        # only the checkpoint, the copies, and (after a kill mid-write) hidden temporary files
        leftovers = {p.name for p in paths[w].parent.iterdir()} - {"fit.nc"} - {p.name for p in worker_copies}
        assert all(name.startswith(".fit.nc.tmp-") for name in leftovers), leftovers
        n_interrupted_writes += len(leftovers)
        ARHMM.load(paths[w])
    # most kills land inside ``save`` (it takes most of each loop); make sure some did
    assert n_interrupted_writes >= 1


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_writer_leaves_a_loadable_checkpoint(tmp_path, ar_sim):
    """6 SIGKILLs at random moments of a resume/partial_fit/save loop: the file always loads and continues.

    About 3/4 of each loop is spent in ``save``; ``test_killed_writer_many_times`` (slow) kills 50 times."""
    _crash_test(tmp_path, ar_sim, n_kills=6)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_writer_many_times(tmp_path, ar_sim):
    _crash_test(tmp_path, ar_sim, n_kills=50, seed=1)
