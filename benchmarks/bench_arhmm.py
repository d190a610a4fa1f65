"""Time one ARHMM Gibbs sweep: compile time and steady seconds per sweep.

Data: 4 recordings x 3000 frames, 4 features, 3 lags, 100 states (issue #2), simulated
by ``kpms_estimators.datasets.simulate_arhmm``; float64, as the estimator runs.

    python benchmarks/bench_arhmm.py [--repeats 7] [--json out.json]

The persistent compilation cache is disabled here so that compile time is real.
"""

from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_enable_compilation_cache", False)

import numpy as np  # noqa: E402
from _report import report  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from kpms_estimators import ARHMM  # noqa: E402
from kpms_estimators._core import arhmm as core  # noqa: E402
from kpms_estimators._estimators._base import float64  # noqa: E402
from kpms_estimators.datasets import simulate_arhmm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--recordings", type=int, default=4)
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--states", type=int, default=100)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    sim = simulate_arhmm(n_recordings=args.recordings, n_frames=args.frames, latent_dim=4, n_lags=3,
                         random_state=0)
    model = ARHMM(n_states=args.states, n_lags=3, random_state=0)
    recordings = model._recordings(sim.X, sim.sequence_ids, reset=True)
    batch = model._batch(recordings)
    with float64():
        data = model._core_data(recordings, batch)
        hypers = model._hypers(data)
        init = jax.jit(core.init_state, static_argnums=3)
        start = time.perf_counter()
        init_compiled = init.lower(jax.random.key(0), data, hypers, args.states).compile()
        init_compile_s = time.perf_counter() - start
        state = init_compiled(jax.random.key(0), data, hypers)
        step = jax.jit(core.gibbs_step)
        key = jax.random.key(1)
        start = time.perf_counter()
        compiled = step.lower(key, state, data, hypers).compile()
        compile_s = time.perf_counter() - start
        times = []
        for i in range(args.repeats + 1):
            start = time.perf_counter()
            state, info = compiled(jax.random.key(i), state, data, hypers)
            jax.block_until_ready((state, info))
            times.append(time.perf_counter() - start)
    result = {
        "data": f"{args.recordings} x {args.frames} frames, 4 features, 3 lags, {args.states} states",
        "segments": list(data.x.shape),
        "compile_s": round(compile_s, 3),
        "init_compile_s": round(init_compile_s, 3),
        "steady_s_per_sweep_median": round(float(np.median(times[1:])), 4),
        "repeats": args.repeats,
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
