"""Groups of segments sampled side by side on the CPU's cores.

The latent-pose and label draws are sequential loops over the frames of each segment
(Kalman and HMM filters): XLA:CPU runs such a loop on one core at a time, so one
program keeps a 2-core machine about half idle. The segments are conditionally
independent given the parameters, and both draws can sample any window of segments
with exactly the random numbers those segments get in the whole batch
(``core.sample_x(..., window=)``, ``arhmm.sample_labels_grouped(..., window=)``), so the
estimators split the segments into equal windows and run them in one lane (host thread)
per core: the same draws, up to float rounding, on any number of cores. Windows hold at
most ``WINDOW_FRAMES`` frames, and each lane runs its windows one after another, so that
the draws' temporaries stay the size of a few windows however many recordings there are.

``KPMS_SEGMENT_THREADS`` (environment) sets the number of lanes; 1 turns this off (one
program over all segments). It is off by default off the CPU (an accelerator runs all
segments of one program in parallel) and in processes whose ``XLA_FLAGS`` ask for
``intra_op_parallelism_threads=1`` (the setting of joblib workers that share the machine's
cores, docs/design.md). ``KPMS_WINDOW_FRAMES`` sets the frames per window.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

from .._compat import enable_x64


#: At most this many host threads (lanes of windows) by default.
MAX_SEGMENT_THREADS = 8

#: Frames per window at most, where more than one thread runs windows: the label and latent-pose
#: programs' temporaries grow with the frames they hold (labels: ~1.3 KB per frame with 100
#: states), so windows of at most this many frames, run one after another in each lane, keep
#: that memory flat as recordings are added. Smaller windows cost speed: at 10 x 18000 frames
#: (20 segments of 10 030) windows of 5 (a 100 000-frame budget) lowered the peak RSS from
#: 1.63-1.66 to 1.36-1.39 GB but made full sweeps 6-18%, apply 15-20% and the full stage's
#: compile 12-27% slower than one window of 10 per lane (benchmarks/README.md, session 11).
#: Hence the label groups' budget (``arhmm.LABEL_GROUP_FRAMES``): windows shrink only where
#: memory starts to matter; ``KPMS_WINDOW_FRAMES`` trades speed for memory below that.
WINDOW_FRAMES = 250_000

#: Frames per window at most for the per-segment rows of ``windowed_rows`` (forward-backward
#: marginals, predictive log-likelihoods): their temporaries are four (frames x states) float64
#: arrays, ~3.2 KB per frame with 100 states, against the draws' ~1.3 KB, and a program that
#: runs once per sample or per call gains little from wide windows (forward-backward at
#: 10 030 frames: 74 ms per segment in windows of 10, 105 ms in windows of 2).
ROWS_WINDOW_FRAMES = 60_000

_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_COMPILED: dict = {}  # signature -> future of its compile (None: compiled here)


def segment_threads() -> int:
    """Windows of segments to run side by side: ``KPMS_SEGMENT_THREADS``, else the CPU cores
    this process may use (at most ``MAX_SEGMENT_THREADS``) on the CPU backend, else 1 (see
    the module's docstring)."""
    threads = _positive_int_setting("KPMS_SEGMENT_THREADS", None)
    if threads is not None:
        return threads
    if jax.default_backend() != "cpu" or _single_threaded_xla():
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_SEGMENT_THREADS))


def window_frame_budget() -> int:
    """Frames per window at most: ``KPMS_WINDOW_FRAMES`` (environment), else ``WINDOW_FRAMES``."""
    return _positive_int_setting("KPMS_WINDOW_FRAMES", WINDOW_FRAMES)


def _positive_int_setting(name: str, default):
    """The positive integer in environment variable ``name``, or ``default`` where it is unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return number


def _single_threaded_xla() -> bool:
    """Whether XLA_FLAGS asks for one thread per process (as in joblib workers, docs/design.md)."""
    flags = os.environ.get("XLA_FLAGS", "").replace("=", " ").split()
    return any(a == "intra_op_parallelism_threads" and b == "1" for a, b in zip(flags, flags[1:]))


def windows(num_segments: int, threads: int, num_frames: int = 0,
            window_frames: int | None = None) -> list[tuple[int, int]]:
    """(start, size) of equal windows covering the segments in order, the last one starting
    early (overlapping the one before) when they do not divide evenly, so that every window has
    the same shape and one compiled program serves them all.

    With one thread: one window of all segments. Otherwise windows of at most ``window_frames``
    frames (default ``WINDOW_FRAMES``; segments of ``num_frames`` frames, 0 = no limit; a window
    holds at least one segment) and at most one per thread's lane, of the size that leaves the
    busiest lane (``side_by_side`` deals the windows to the lanes in turn) the fewest segments,
    the largest such size."""
    if threads <= 1 or num_segments <= 1:
        return [(0, num_segments)]
    budget = window_frame_budget() if window_frames is None else window_frames
    most = max(1, budget // num_frames) if num_frames > 0 else num_segments
    lanes = min(threads, num_segments)

    def busiest(size):  # segments drawn by the busiest lane with windows of ``size``
        return -(-(-(-num_segments // size)) // lanes) * size

    fewest = -(-num_segments // lanes)  # one window per lane
    size = min(range(1, min(most, fewest) + 1), key=lambda n: (busiest(n), -n))
    groups = -(-num_segments // size)
    return [(min(g * size, num_segments - size), size) for g in range(groups)]


def segment_windows(mask_shape, window_frames: int | None = None) -> list[tuple[int, int]]:
    """``windows`` for segments of mask shape (segments, frames) on ``segment_threads()`` threads
    (``window_frames``: at most this many frames per window, and at most ``KPMS_WINDOW_FRAMES``)."""
    budget = window_frame_budget() if window_frames is None else min(window_frames, window_frame_budget())
    return windows(mask_shape[0], segment_threads(), mask_shape[1], budget)


def traced(*trees) -> bool:
    """Whether any argument is being traced (inside an outer ``jit`` or ``vmap``): then the
    caller runs its plain function in that trace instead of separate programs and threads."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(MAX_SEGMENT_THREADS, thread_name_prefix="kpms-segments")
        return _POOL


def _signature(fn, args, static: dict) -> tuple:
    """What decides the program ``fn`` compiles for: the static arguments, the argument tree, and
    each array's shape and dtype (arrays, NumPy arrays, ``jax.ShapeDtypeStruct``s alike)."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    shapes = tuple((tuple(a.shape), str(a.dtype), bool(getattr(a, "weak_type", False))) if hasattr(a, "dtype")
                   else ((), str(np.result_type(a)), True) for a in leaves)
    return (fn, repr(sorted(static.items())), treedef, shapes)


def _compile_once(signature, compile_fn, here: bool):
    """Compile for ``signature`` once (``compile_fn()``), in this thread or in the pool; a call
    for a signature already compiling waits for it. Returns the compile's future, or None."""
    with _POOL_LOCK:
        future = _COMPILED.get(signature)
        if future is None and signature not in _COMPILED:
            future = concurrent.futures.Future() if here else None
            _COMPILED[signature] = future
            mine = True
        else:
            mine = False
    if mine and here:
        try:
            compile_fn()
            future.set_result(None)
        except BaseException as error:  # the waiting threads get it too
            future.set_exception(error)
            with _POOL_LOCK:
                _COMPILED.pop(signature, None)
            raise
        return None
    if mine:
        future = _pool().submit(compile_fn)
        with _POOL_LOCK:
            _COMPILED[signature] = future
        return future
    return future


def side_by_side(fn, spans: list[tuple[int, int]], *args, consume=None, **static) -> list:
    """``[fn(*args, start, size=size, **static) for (start, size) in spans]`` for a ``compiled``
    ``fn``, in ``segment_threads()`` lanes (host threads; the caller's thread is the first) that
    take the windows in turn, each running its windows one after another (so that only as many
    windows' temporaries as lanes are held at once). JAX's precision setting (x64), which is
    scoped to the calling thread, is carried over. The first time ``fn`` meets these shapes, its
    program is compiled (here, or by ``compile_windows_ahead``) before the windows run, so that it
    compiles once rather than in every thread.

    ``consume(i, result)``: called in the lane as soon as window ``i``'s result is ready, which is
    then dropped (the list holds None), so that the results of all windows are never held at once."""
    size = spans[0][1]
    pending = _compile_once(_signature(fn, args, dict(static, size=size)),
                            lambda: fn.lower(*args, spans[0][0], size=size, **static).compile(), here=True)
    if pending is not None:
        pending.result()
    x64 = bool(jax.config.jax_enable_x64)

    def run(i):
        result = jax.block_until_ready(fn(*args, spans[i][0], size=size, **static))
        if consume is None:
            return result
        consume(i, result)
        return None

    if len(spans) == 1:
        return [run(0)]
    lanes = max(1, min(segment_threads(), len(spans)))

    def lane(indices):
        with enable_x64(x64):
            return [run(i) for i in indices]

    indices = list(range(len(spans)))
    futures = [_pool().submit(lane, indices[i::lanes]) for i in range(1, lanes)]
    done = [lane(indices[0::lanes])] + [f.result() for f in futures]
    return [done[i % lanes][i // lanes] for i in range(len(spans))]


def compile_windows_ahead(fn, spans: list[tuple[int, int]], *args, **static):
    """``compile_ahead`` for the window program that ``side_by_side(fn, spans, *args, **static)``
    will run (``args`` may be ``jax.ShapeDtypeStruct``s)."""
    size = spans[0][1]
    return compile_ahead(fn, *args, spans[0][0], size=size, _signature_args=args, **static)


def compile_ahead(fn, *args, _signature_args=None, **static):
    """Trace ``fn`` (a ``compiled`` function) for these arguments here and compile it in a pool
    thread, the first time it meets their shapes, so that XLA compiles it on another core while
    the caller goes on (tracing holds Python's lock; XLA's compile does not). ``args`` may be
    ``jax.ShapeDtypeStruct``s. Returns the compile's future (``result()`` waits for it and raises
    its error, if any; the call itself then finds the program in JAX's cache), or None when the
    shapes were seen before."""
    signature = _signature(fn, args if _signature_args is None else _signature_args,
                           static if _signature_args is None else dict(static))
    with _POOL_LOCK:
        if signature in _COMPILED:
            return None
    lowered = fn.lower(*args, **static)
    return _compile_once(signature, lowered.compile, here=False)


def owned_rows(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Per window, (first row of the batch it alone covers, offset of that row in its piece):
    every window covers the rows from its start, except that the last may start early and overlap
    the one before (``windows``); its overlapped rows belong to the earlier window."""
    owned, end = [], 0
    for start, size in spans:
        first = max(start, end)
        owned.append((first, first - start))
        end = start + size
    return owned


def assemble(pieces: list, spans: list[tuple[int, int]]):
    """The whole batch's rows from one piece per window (``windows``: the last may overlap)."""
    if len(pieces) == 1:
        return pieces[0]
    return jnp.concatenate([piece[offset:] for piece, (_, offset) in zip(pieces, owned_rows(spans))])
