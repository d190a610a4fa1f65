"""The shared Gibbs loop and scikit-learn contract of every model.

A model subclass fills in a few hooks (sklearn-mixture style):

- ``_min_frames()``: the shortest recording the model accepts;
- ``_core_data(recordings, batch)``: the core's data pytree for a batch;
- ``_hypers(data)``: the core's hyperparameter pytree from the constructor arguments;
- ``_init_chain(key, data)``: a fresh chain state (may set fitted attributes,
  e.g. a PCA, that ``_hypers`` then uses);
- ``_init_states(key, chain, data)``: new latent states for other data,
  keeping the chain's parameters (``partial_fit`` on new data);
- ``_schedule(first, data)``: the stages of sweeps of one call, by default
  ``n_iter`` sweeps of ``_gibbs_step``, a module-level jitted
  ``(key, state, data, hypers) -> (state, info)``.

After every sweep the loop checks on the device that the new chain state and
the sweep's log-likelihood terms are finite. A sweep that gives NaN or inf is
rolled back and retried from the last finite state with a fresh key and, where
the hyperparameters have a ``jitter`` (the keypoint SLDS), ten times the jitter
per retry; the number of retries of each sweep is the ``nan_retries`` series of
the history. A sweep still not finite after ``_MAX_NAN_RETRIES`` retries stops
the fit with a ``RuntimeWarning`` naming the arrays; the last finite state stays
the fitted one and ``nan_stop_`` describes the stop (model spec 11, 12.2).
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from scipy import sparse
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.utils import TransformerTags
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from tqdm.auto import tqdm

from .. import _data
from .._compat import enable_x64


@contextmanager
def float64():
    """Run the sampler in float64, as the reference does.

    The sticky prior (kappa ~ 1e6) produces transition probabilities and gamma
    variates far below float32's range, and the sufficient statistics sum over
    many frames; float64 keeps both exact (model spec 12.1, 12.3). Scoped, so that
    importing this package never changes JAX's global precision.
    """
    with enable_x64(True):
        yield


#: XLA options per backend for the sampler's programs. On the CPU, LLVM optimisation level 1
#: without its expensive passes compiles the full keypoint sweep in 9.3 s instead of 14.8 s
#: with steady sweeps no slower (0.23 vs 0.28 s; 4 x 3000 frames, 100 states; measured with
#: ``jax.jit(...).lower(...).compile(compiler_options=...)``, see benchmarks/README.md), and
#: XLA's older (non-MLIR) loop emitters for fusions compile the keypoint model's parts in
#: about two thirds of the time with a third less peak memory, steady sweeps unchanged
#: (benchmarks/README.md, session 6). Other backends keep XLA's defaults. An option the
#: installed jaxlib does not know is dropped (``compiler_options``).
COMPILER_OPTIONS = {
    "cpu": {
        "xla_backend_optimization_level": 1,
        "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False,
    },
}

#: Extra CPU options for programs made mostly of elementwise work reduced to sums (``compiled``'s
#: ``cpu_options``): XLA's default hands such fusions to its YNNPACK library path, which runs
#: them in one thread and materialises their broadcasts. Without it, the keypoint sweep's
#: log-likelihood terms take 22 ms instead of 65 ms (temporary memory 19 instead of 83 MB) at
#: 10 x 18000 frames. Not for everything: the label draw's float32 residual matmul is about
#: 40% slower without it (benchmarks/README.md, session 7).
REDUCTION_OPTIONS = {"cpu": {"xla_cpu_experimental_ynn_fusion_type": ""}}

_ACCEPTED_OPTIONS: dict = {}


def compiler_options(backend: str, extra: dict | None = None) -> dict | None:
    """``COMPILER_OPTIONS[backend]`` (updated by ``extra``) less the options this jaxlib rejects.

    XLA renames and retires its debug options between releases; an unknown one fails
    every compile, so each (name, value) is tried on a one-element program first, once.
    """
    wanted = {**COMPILER_OPTIONS.get(backend, {}), **(extra or {})}
    accepted = {}
    for name, value in wanted.items():
        key = (backend, name, repr(value))
        if key not in _ACCEPTED_OPTIONS:
            try:
                jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(np.zeros(1)).compile()
                _ACCEPTED_OPTIONS[key] = True
            except Exception:  # noqa: BLE001  (XLA raises its own runtime error type)
                _ACCEPTED_OPTIONS[key] = False
        if _ACCEPTED_OPTIONS[key]:
            accepted[name] = value
    return accepted or None


def _malloc_trim():
    """glibc's ``malloc_trim`` or None (other C libraries, other systems)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_heap() -> None:
    """Give the heap that compilation freed back to the operating system (glibc only; else a no-op).

    Compiling one of the sampler's larger programs leaves ~0.3 GB of freed but unreturned
    heap behind (measured: 0.92 -> 0.63 GB resident after ``malloc_trim``), so without this
    every compile adds to the process's peak memory instead of reusing it.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def compiled(fun, options: dict | None = None, **jit_kwargs):
    """``jax.jit(fun, **jit_kwargs)`` with the ``COMPILER_OPTIONS`` of the default backend,
    updated by ``options[backend]`` (e.g. ``REDUCTION_OPTIONS``).

    The backend is looked up at the first call (not at import), so importing the
    package never initialises JAX's backends and the same code runs on a GPU.
    """
    jitted = {}

    def for_backend():
        backend = jax.default_backend()
        if backend not in jitted:
            extra = (options or {}).get(backend)
            jitted[backend] = jax.jit(fun, compiler_options=compiler_options(backend, extra), **jit_kwargs)
        return jitted[backend]

    @functools.wraps(fun)
    def call(*args, **kwargs):
        jitted_fun = for_backend()
        cache_size = getattr(jitted_fun, "_cache_size", None)  # private in jax: used only when present
        n_compiled = cache_size() if cache_size else None
        out = jitted_fun(*args, **kwargs)
        if cache_size and cache_size() != n_compiled:  # this call compiled a new program
            release_free_heap()
        return out

    call.lower = lambda *args, **kwargs: for_backend().lower(*args, **kwargs)
    return call


def _to_numpy(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def _fingerprint(batch: _data.Batch) -> str:
    """A digest of the batched training data, to tell a continued chain from new data."""
    digest = hashlib.sha1()
    for arr in (batch.values, batch.mask, batch.keys, batch.bounds):
        digest.update(np.ascontiguousarray(arr).tobytes())
        digest.update(str(arr.shape).encode())
    return digest.hexdigest()


#: Retries of a sweep that gave non-finite values, before the fit stops.
_MAX_NAN_RETRIES = 3
#: Factor on the jitter per retry, and the jitter the first retry starts from when it is 0.
_JITTER_GROWTH = 10.0
_MIN_RETRY_JITTER = 1e-4


def _is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _all_finite_tree(tree) -> jax.Array:
    """True when every float leaf of ``tree`` is finite: one fused reduction on the device."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree) if _is_float(leaf)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


_all_finite = compiled(_all_finite_tree)  # with the sampler's compiler options: 0.28 -> 0.1 s to compile


def _path_name(path) -> str:
    """``params.Ab``, ``x``, ``info.Y``: a pytree path as dotted names (the checkpoint's variable names)."""
    parts = []
    for entry in path:
        for attr in ("name", "key", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts)


def nonfinite_counts(tree) -> dict[str, list[int]]:
    """``{path: [non-finite entries, entries]}`` for every float leaf of ``tree`` that has any."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_float(leaf):
            arr = np.asarray(leaf)
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                out[_path_name(path)] = [bad, int(arr.size)]
    return out


def _retry_hypers(hypers, retry: int):
    """The hyperparameters of retry ``retry`` (1, 2, ...): a larger ``jitter`` where there is one."""
    if retry == 0 or "jitter" not in getattr(hypers, "_fields", ()):
        return hypers
    base = jnp.maximum(hypers.jitter, _MIN_RETRY_JITTER)
    return hypers._replace(jitter=(base * _JITTER_GROWTH**retry).astype(jnp.result_type(hypers.jitter)))


class GibbsEstimator(DensityMixin, BaseEstimator):
    """Base class owning the Gibbs loop, ``partial_fit`` and the sklearn contract.

    Fitted attributes set here for every model: ``chain_state_``, ``rng_key_``,
    ``n_iter_``, ``log_likelihood_terms_`` (per-sweep series, including
    ``nan_retries``: how often each sweep was retried after non-finite values),
    ``log_likelihood_history_``, ``stage_history_`` and ``nan_stop_`` (None, or
    a dict describing why the last call stopped early on non-finite values:
    ``iteration`` (the completed sweeps kept), ``stage``, ``retries``,
    ``jitter`` (the last one tried, or None) and ``nonfinite`` (``{array: [non-finite
    entries, entries]}``)).
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # ``transform`` gives per-frame features (syllable marginals or latent states)
        tags.transformer_tags = TransformerTags()
        return tags

    # -- input handling ---------------------------------------------------
    def _recordings(self, X, sequence_ids, *, reset: bool) -> _data.Recordings:
        """Validate any accepted input and return per-recording arrays.

        The 2D path goes through sklearn's ``validate_data`` so that
        ``n_features_in_`` and its messages follow the sklearn conventions.
        """
        if isinstance(X, xr.Dataset) or (isinstance(X, dict) and not sparse.issparse(X)):
            recordings = _data.from_poses(X, min_length=self._min_frames(), keypoints=self._keypoint_selection())
            n_features = self._n_features(recordings)
            if reset:
                self.n_features_in_ = n_features
            elif n_features != self.n_features_in_:
                raise ValueError(
                    f"X has {n_features} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input."
                )
            return recordings
        X = validate_data(self, X, reset=reset, dtype=np.float64)
        return _data.from_features(X, sequence_ids, min_length=self._min_frames())

    def _keypoint_selection(self):
        return None

    def _n_features(self, recordings: _data.Recordings) -> int:
        return int(np.prod(recordings.arrays[0].shape[1:]))

    def _batch(self, recordings: _data.Recordings) -> _data.Batch:
        return _data.make_batch(recordings, getattr(self, "seg_length", None))

    # -- fitting ------------------------------------------------------------
    def fit(self, X, y=None, *, sequence_ids=None):
        """Fit the model with ``n_iter`` Gibbs sweeps from a fresh initialisation.

        Parameters
        ----------
        X : array-like of shape (n_frames, n_features), xarray.Dataset or dict
            Features with one recording id per frame in ``sequence_ids``, or pose
            data in the movement layout.
        y : ignored
        sequence_ids : array-like of shape (n_frames,), default=None
            Recording of each row of a 2D ``X``; ``None`` means one recording.

        Returns
        -------
        self
        """
        for name in [a for a in vars(self) if a.endswith("_") and not a.startswith("__")]:
            delattr(self, name)
        return self.partial_fit(X, y, sequence_ids=sequence_ids)

    def partial_fit(self, X, y=None, *, sequence_ids=None):
        """Run ``n_iter`` more Gibbs sweeps of the same chain (the first call initialises).

        Given the training data again, the chain continues exactly where it
        stopped. Given other data, the parameters continue and the latent states
        are drawn afresh from their conditional given the parameters.
        """
        first = not hasattr(self, "chain_state_")
        recordings = self._recordings(X, sequence_ids, reset=first)
        batch = self._batch(recordings)
        fingerprint = _fingerprint(batch)
        with float64():
            data = self._core_data(recordings, batch)
            if first:
                seed = check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
                key = jax.random.key(seed)
                key, init_key = jax.random.split(key)
                chain = self._init_chain(init_key, data)
                history: dict[str, list] = {}
                stages: list[str] = []
            else:
                key = jax.random.wrap_key_data(self.rng_key_)
                chain = self.chain_state_
                if fingerprint != self._fingerprint_:
                    key, init_key = jax.random.split(key)
                    chain = self._init_states(init_key, chain, data)
                history = {k: list(v) for k, v in self.log_likelihood_terms_.items()}
                stages = list(self.stage_history_)
            schedule = self._schedule(first, data)
            n_before = len(stages)
            chain, key, interrupted, nan_stop = self._run_sweeps(key, chain, data, schedule, history, stages)
        self._store_chain(chain, key, history, stages, getattr(self, "n_iter_", 0) + len(stages) - n_before)
        self.nan_stop_ = nan_stop
        self._fingerprint_ = fingerprint
        self._set_fitted_attributes(recordings, batch)
        if interrupted:  # the completed sweeps are kept; let the caller see the interrupt
            raise KeyboardInterrupt
        return self

    def _store_chain(self, chain, key, history, stages, n_iter):
        """Set the chain's fitted attributes (state, key, per-sweep history)."""
        self.chain_state_ = _to_numpy(chain)
        self.rng_key_ = np.asarray(jax.random.key_data(key))
        self.n_iter_ = int(n_iter)
        self.log_likelihood_terms_ = {k: np.asarray(v, dtype=np.float64) for k, v in history.items()}
        self.stage_history_ = np.asarray(stages, dtype=str)
        self.log_likelihood_history_ = sum(
            self.log_likelihood_terms_.get(k, np.zeros(len(stages))) for k in self._likelihood_terms
        )

    def fit_transform(self, X, y=None, *, sequence_ids=None):
        """``fit`` then ``transform`` on the same data (same ``sequence_ids``)."""
        return self.fit(X, y, sequence_ids=sequence_ids).transform(X, sequence_ids=sequence_ids)

    def _schedule(self, first: bool, data) -> list[tuple[str, int, object, object]]:
        """The stages of one ``partial_fit`` call: (name, sweeps, jitted step, hypers)."""
        return [("full", int(self.n_iter), self._gibbs_step, self._hypers(data))]

    def _run_sweeps(self, key, chain, data, schedule, history, stages, callback=None):
        """Run the schedule's sweeps, appending per-sweep terms to ``history`` and ``stages``.

        ``callback(chain, key)`` runs after every completed sweep (checkpointing).
        Ctrl-C stops after the last complete sweep. A sweep with non-finite values
        is retried from the last finite state (see the module docstring); if it
        stays non-finite, the fit stops with a ``RuntimeWarning``.

        Returns ``(chain, key, interrupted, nan_stop)``: the last finite chain and
        its key, whether Ctrl-C stopped the loop, and None or the description of a
        stop on non-finite values (the ``nan_stop_`` attribute).
        """
        n_done = len(stages)
        try:
            for stage, n_sweeps, step, hypers in schedule:
                progress = tqdm(range(n_sweeps), disable=not self.verbose, desc=f"{type(self).__name__} ({stage})")
                for _ in progress:
                    next_key, step_key = jax.random.split(key)
                    for retry in range(_MAX_NAN_RETRIES + 1):
                        # retries start again from ``chain``, the last finite state
                        attempt_key = step_key if retry == 0 else jax.random.fold_in(step_key, retry)
                        attempt_hypers = _retry_hypers(hypers, retry)
                        new_chain, info = step(attempt_key, chain, data, attempt_hypers)
                        finite, info = jax.device_get((_all_finite((new_chain, info)), info))
                        if finite:
                            break
                    else:
                        return chain, key, False, self._stop_on_nonfinite(
                            new_chain, info, stage, n_done, retry, attempt_hypers)
                    info = {k: float(v) for k, v in info.items()}
                    info["nan_retries"] = float(retry)
                    chain, key = new_chain, next_key  # only a complete, finite sweep replaces the chain
                    n_done += 1
                    for name, value in info.items():
                        history.setdefault(name, []).append(value)
                    stages.append(stage)
                    if callback is not None:
                        callback(chain, key)
                    if self.verbose:
                        total = sum(info[k] for k in self._likelihood_terms)
                        progress.set_postfix(log_lik=f"{total:.4g}", used=int(info.get("n_used", -1)),
                                             **({"nan_retries": retry} if retry else {}))
        except KeyboardInterrupt:
            return chain, key, True, None
        return chain, key, False, None

    def _stop_on_nonfinite(self, new_chain, info, stage, n_done, retries, hypers) -> dict:
        """Warn about a sweep that stayed non-finite; the description kept as ``nan_stop_``."""
        counts = nonfinite_counts((new_chain, {"info": info}))
        counts = {name.split(".", 1)[1]: n for name, n in counts.items()}  # drop the tuple index
        jitter = float(hypers.jitter) if "jitter" in getattr(hypers, "_fields", ()) else None
        arrays = ", ".join(f"{name} ({bad} of {size} entries)" for name, (bad, size) in counts.items())
        retried = f"{retries} retries with fresh keys" + (f" and jitter up to {jitter:g}" if jitter is not None else "")
        warnings.warn(
            f"{type(self).__name__}: sweep {n_done + 1} ({stage!r} stage) gave non-finite values after "
            f"{retried}: {arrays}. Fitting stopped; the fitted state is the last finite one, after {n_done} "
            "sweeps. Larger jitter, float64 inputs or other hyperparameters may help (model spec 12.2).",
            RuntimeWarning,
            stacklevel=4,
        )
        return {"iteration": int(n_done), "stage": str(stage), "retries": int(retries), "jitter": jitter,
                "nonfinite": counts}

    def _check_numbers(self, integers=(), counts=(), positive=(), nonnegative=()):
        """Validate constructor arguments by name: integers >= 1, counts >= 0, finite floats > 0 / >= 0."""
        for names, minimum in ((integers, 1), (counts, 0)):
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, (int, np.integer)) or value < minimum:
                    what = "a positive" if minimum else "a non-negative"
                    raise ValueError(f"{name} must be {what} integer, got {value!r}")
        for names, strict in ((positive, True), (nonnegative, False)):
            for name in names:
                value = getattr(self, name)
                if not np.isfinite(value) or value < 0 or (strict and value == 0):
                    what = "positive" if strict else "non-negative"
                    raise ValueError(f"{name} must be a {what} finite number, got {value!r}")

    def _set_syllable_attributes(self, batch):
        """Relabel syllables by frequency over real labelled frames (0 = most used; ties: lower index first)."""
        chain = self.chain_state_
        labelled = batch.mask[:, self.n_lags :] > 0
        counts = np.bincount(chain.z[labelled].ravel(), minlength=self.n_states).astype(np.float64)
        order = np.argsort(-counts, kind="stable")
        params = chain.params
        self.syllable_order_ = order
        self.syllable_frequencies_ = counts[order] / max(counts.sum(), 1.0)
        self.betas_ = params.betas[order]
        self.transition_matrix_ = params.pi[np.ix_(order, order)]
        self.ar_coefficients_ = params.Ab[order]
        self.ar_covariances_ = params.Q[order]

    def _check_fitted(self):
        check_is_fitted(self, "chain_state_")

    # -- checkpoints --------------------------------------------------------
    # Stored apart from the other fitted attributes: the chain state and key as the
    # snapshot, the per-sweep arrays as the history.
    _CHECKPOINT_OWN = ("chain_state_", "rng_key_", "log_likelihood_terms_", "stage_history_")

    def save(self, path):
        """Write the fitted estimator to a netCDF4 checkpoint at ``path`` (atomically).

        The file holds the hyperparameters, every fitted attribute, the chain state
        and PRNG key as the snapshot at ``n_iter_``, and the per-sweep history; no
        pickle. :meth:`load` restores an estimator whose ``predict``, ``transform``
        and ``score`` equal this one's and whose ``partial_fit`` on the same data
        continues the chain exactly. A ``random_state`` that is not an int or None
        is stored as None (with a warning); it only seeds the first ``fit``.

        Parameters
        ----------
        path : str or PathLike
            The file to write (replaced if it exists).
        """
        from .. import _checkpoint

        self._check_fitted()
        fitted = {
            name: value
            for name, value in vars(self).items()
            if name.endswith("_") and not name.startswith("__") and name not in self._CHECKPOINT_OWN
        }
        history = dict(self.log_likelihood_terms_)
        if "stage" in history:
            raise ValueError("a log-likelihood term may not be named 'stage'")
        history["stage"] = np.asarray(self.stage_history_, dtype=str)
        _checkpoint.write_checkpoint(
            path,
            model_name=type(self).__name__,
            hyperparams=self.get_params(deep=False),
            fitted=fitted,
            snapshots={int(self.n_iter_): (self.chain_state_, self.rng_key_)},
            history=history,
        )

    @classmethod
    def load(cls, path):
        """Restore an estimator written by :meth:`save` (never executes code from the file).

        Raises ``ValueError`` naming the file if it is not a readable checkpoint,
        holds another model, or holds no fitted chain.
        """
        from .. import _checkpoint

        meta = _checkpoint.read_metadata(path)
        if meta["model"] != cls.__name__:
            raise ValueError(f"{str(path)!r} holds a {meta['model']} checkpoint, not a {cls.__name__} one.")
        n_iter = meta["fitted"].get("n_iter_")
        if n_iter is None or int(n_iter) not in meta["iterations"]:
            raise ValueError(
                f"{str(path)!r} holds no fitted {cls.__name__} (no snapshot at n_iter_={n_iter}; "
                f"snapshots: {meta['iterations']})."
            )
        meta, state, key_data, history, _ = _checkpoint.read_checkpoint(path, iteration=int(n_iter))
        try:
            estimator = cls(**meta["hyperparams"])
        except TypeError as exc:
            raise ValueError(f"{str(path)!r}: its hyperparameters do not fit {cls.__name__}: {exc}") from exc
        for name, value in meta["fitted"].items():
            setattr(estimator, name, value)
        stages = history.pop("stage", np.asarray([], dtype=str))
        estimator.chain_state_ = state
        estimator.rng_key_ = key_data
        estimator.log_likelihood_terms_ = history
        estimator.stage_history_ = stages
        return estimator
