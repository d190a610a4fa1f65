"""KeypointSLDS: initialisation, compile time, steady seconds per sweep, peak RSS.

Default data (issue #3): 4 recordings x 3000 frames, 10 keypoints, 2D, latent_dim 4,
100 states, simulated by ``kpms_estimators.datasets.simulate_keypoints``.

    python benchmarks/bench_keypoint_slds.py [--recordings 4 --frames 3000] [--repeats 5] [--json out.json]

init_s covers everything from pose Datasets to the first chain state (adapter,
batching, noise prior, interpolation, alignment, PCA, projection, the jitted
init and its compilation). The persistent compilation cache is disabled.
"""

from __future__ import annotations

import argparse
import functools
import resource
import time

import jax

jax.config.update("jax_enable_compilation_cache", False)

import numpy as np  # noqa: E402
from _report import report  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from kpms_estimators import KeypointSLDS  # noqa: E402
from kpms_estimators._estimators._base import float64  # noqa: E402
from kpms_estimators._estimators.keypoint_slds import _step  # noqa: E402
from kpms_estimators.datasets import simulate_keypoints  # noqa: E402


def _time_stage(state, data, hypers, switches, repeats, step=_step):
    """(state, compile seconds = first sweep - steady sweep, steady seconds per sweep, all finite).

    The sweep runs as the estimator runs it: separately compiled parts shared between
    stages, so a stage's compile time is what it adds to what earlier stages compiled.
    """
    step = functools.partial(step, switches=switches)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        state, info = step(jax.random.key(10 + i), state, data, hypers)
        jax.block_until_ready((state, info))
        times.append(time.perf_counter() - start)
    finite = all(np.isfinite(float(v)) for v in info.values())
    steady = float(np.median(times[1:]))
    return state, times[0] - steady, steady, finite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recordings", type=int, default=4)
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--states", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    sim = simulate_keypoints(n_keypoints=10, n_dims=2, latent_dim=4, n_recordings=args.recordings,
                             n_frames=args.frames, random_state=0)
    model = KeypointSLDS(n_states=args.states, latent_dim=4, random_state=0,
                         anterior_keypoints=["nose"], posterior_keypoints=["tail_base"])
    start = time.perf_counter()
    recordings = model._recordings(sim.poses, None, reset=True)
    batch = model._batch(recordings)
    with float64():
        data = model._core_data(recordings, batch)
        state = model._init_chain(jax.random.key(0), data)
        jax.block_until_ready(state)
        init_s = time.perf_counter() - start
        ar_hypers = model._hypers(data, kappa=model.ar_kappa)
        hypers = model._hypers(data)
        state, ar_compile, ar_sweep, ar_ok = _time_stage(state, data, ar_hypers, model._switches(ar_only=True),
                                                         args.repeats)
        state, compile_s, sweep, ok = _time_stage(state, data, hypers, model._switches(), args.repeats)
    result = {
        "data": f"{args.recordings} x {args.frames} frames, 10 keypoints, 2D, latent_dim 4, {args.states} states",
        "segments": list(data.Y.shape[:2]),
        "init_s": round(init_s, 2),
        "compile_ar_only_s": round(ar_compile, 2),
        "steady_ar_only_s_per_sweep": round(ar_sweep, 4),
        "compile_full_s": round(compile_s, 2),
        "steady_full_s_per_sweep": round(sweep, 4),
        "all_terms_finite": bool(ar_ok and ok),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
