"""Seconds and minor page faults per Gibbs sweep of the functional API, ours only.

    python benchmarks/sweep_faults.py benchmarks/results/synthetic_10x18000.npz [--sweeps 4]

Reads a dataset written by ``bench_data.py`` (``compare_reference.py`` writes them to
``benchmarks/results/``), initialises the model as the comparison does (100 states,
latent_dim 4, 3 lags), runs one warm-up sweep per stage (AR-only, then full) and then
``--sweeps`` timed sweeps, printing the median and minimum seconds, the median number of
minor page faults (``getrusage``) per sweep and the process's peak RSS. Meant for
comparing allocator settings given in the environment, e.g.

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/sweep_faults.py DATA.npz
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from bench_data import read  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

import kpms_estimators.fitting as api


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="an .npz written by bench_data.py")
    parser.add_argument("--sweeps", type=int, default=4, help="timed sweeps per stage (default 4)")
    args = parser.parse_args()

    _, bodyparts, anterior, posterior, coords, confs, _ = read(args.data)
    data, metadata = api.format_data(coords, confs, bodyparts=bodyparts, use_bodyparts=bodyparts)
    model = api.init_model(
        data, seed=0, anterior_idxs=[bodyparts.index(a) for a in anterior],
        posterior_idxs=[bodyparts.index(p) for p in posterior],
        trans_hypparams={"num_states": 100, "kappa": 1e6}, ar_hypparams={"latent_dim": 4, "nlags": 3},
    )

    def sweep(model, ar_only):
        return api.fit_model(model, data, metadata, num_iters=1, ar_only=ar_only,
                             save_every_n_iters=None, generate_progress_plots=False)[0]

    for ar_only in (True, False):
        model = sweep(model, ar_only)  # warm-up: compiles
        seconds, faults = [], []
        for _ in range(args.sweeps):
            f0, t0 = _faults(), time.perf_counter()
            model = sweep(model, ar_only)
            seconds.append(time.perf_counter() - t0)
            faults.append(_faults() - f0)
        print(f"{'AR-only' if ar_only else 'full'} sweep: median {1e3 * np.median(seconds):.1f} ms, "
              f"min {1e3 * min(seconds):.1f} ms, minor faults per sweep {np.median(faults):.0f}", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB")


if __name__ == "__main__":
    main()
