"""Where each implementation's resident memory goes: the imports, then each stage of the comparison's pipeline.

    python benchmarks/memory_stages.py                 # ours and the reference, 4 x 3000 frames
    python benchmarks/memory_stages.py --ours-only     # without the reference
    python benchmarks/memory_stages.py --repeat 2      # alternated runs, each printed
    python benchmarks/memory_stages.py --ours-only --recordings 10 --frames 18000 --sweeps 10

Each implementation runs in its own process (the reference in the virtual environment that
``compare_reference.py`` installs into ``benchmarks/.reference-venv``), with a thread that reads
``VmRSS`` from ``/proc/self/status`` every 5 ms. The process first imports its libraries one at a time
(jax, scikit-learn's ``sklearn.base``, xarray for ours, then the implementation), runs one trivial jitted
function, and then runs the pipeline of ``_compare_worker.py`` on a synthetic dataset (by default
the quick comparison's: 4 recordings x 3000 frames, 100 states, latent_dim 4, 3 lags; AR-only and
full stages of 30 sweeps, apply (20 sweeps) to half as many new recordings, marginals). For every step it prints the resident memory at its end
and the highest value sampled during it, and the process's peak (``ru_maxrss``) at the end, so
that the fixed cost of the imports (and of starting XLA) can be told apart from what the model's
programs and arrays add; the last line is the peak minus the memory after the trivial jit.
Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SETTINGS = dict(n_states=100, latent_dim=4, n_lags=3, ar_kappa=1e6, kappa=1e4, seed=0,
                n_ar_iter=30, n_iter=30, n_apply_iter=20,
                marginals={"burn_in_iters": 10, "num_samples": 5, "steps_per_sample": 2})
IMPORTS = {"ours": ["jax", "sklearn.base", "xarray", "kpms_estimators"],
           "reference": ["jax", "sklearn.base", "keypoint_moseq"]}  # the reference does not use xarray


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    raise RuntimeError("no VmRSS in /proc/self/status")


class _Sampler:
    """The highest resident memory seen since the last ``step``, read every 5 ms in a thread."""

    def __init__(self):
        self.high = _rss_gb()
        self.steps = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            self.high = max(self.high, _rss_gb())
            time.sleep(0.005)

    def step(self, name: str, start: float):
        now = _rss_gb()
        self.steps.append({"step": name, "seconds": time.perf_counter() - start, "rss_gb": now,
                           "high_gb": max(self.high, now)})
        self.high = now


def child(impl: str, data_path: str, new_path: str, out_path: str, settings: str):
    """Run in the implementation's own interpreter: import step by step, then the pipeline."""
    s = json.loads(settings)
    sampler = _Sampler()
    start = time.perf_counter()
    import numpy as np  # noqa: F401

    from bench_data import read

    names, bodyparts, anterior, posterior, coords, confs, _ = read(data_path)
    sampler.step("numpy + data", start)
    for module in IMPORTS[impl]:
        start = time.perf_counter()
        __import__(module)
        sampler.step(f"import {module}", start)
    import jax
    import jax.numpy as jnp

    start = time.perf_counter()
    jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()
    sampler.step("first trivial jit", start)

    import _compare_worker as worker

    side = worker.Ours(s) if impl == "ours" else worker.Reference(s)
    start = time.perf_counter()
    data, metadata, model = side.init(coords, confs, bodyparts, anterior, posterior)
    sampler.step("init", start)
    for name, kappa, n_sweeps, ar_only in (("AR-only stage", s["ar_kappa"], s["n_ar_iter"], True),
                                           ("full stage", s["kappa"], s["n_iter"], False)):
        start = time.perf_counter()
        model = side.api.update_hypparams(model, kappa=kappa)
        model = side.fit(model, data, metadata, n_sweeps, ar_only)
        sampler.step(name, start)
    start = time.perf_counter()
    side.syllables(model, metadata)
    sampler.step("syllables", start)
    _, _, _, _, new_coords, new_confs, _ = read(new_path)
    new_data, new_metadata = side.format(new_coords, new_confs, bodyparts)
    for label in ("first", "again"):
        start = time.perf_counter()
        side.apply(model, new_data, new_metadata, s["n_apply_iter"])
        sampler.step(f"apply ({label})", start)
    start = time.perf_counter()
    side.marginals(model, data, metadata, s["marginals"])
    sampler.step("marginals", start)
    result = {"impl": impl, "steps": sampler.steps, "versions": side.versions,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    Path(out_path).write_text(json.dumps(result))


def run(python: str, impl: str, data: Path, new: Path, settings: dict, tag: str, timeout: float) -> dict:
    out = RESULTS / f"memory-{tag}.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--child", impl, str(data), str(new), str(out),
                           json.dumps(settings)],
                          env=env, cwd=HERE, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        sys.exit(f"{impl} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def _print(results: list[dict]):
    steps = []
    for r in results:  # the import steps differ by implementation: each goes after the step it follows
        previous = None
        for step in (s["step"] for s in r["steps"]):
            if step not in steps:
                steps.insert(steps.index(previous) + 1 if previous else 0, step)
            previous = step
    header = "".join(f" | {r['impl']} run {r['run']}: end / high GB" for r in results)
    print(f"{'step':24s}{header}")
    for name in steps:
        cells = []
        for r in results:
            hit = [s for s in r["steps"] if s["step"] == name]
            cells.append(f"{hit[0]['rss_gb']:.3f} / {hit[0]['high_gb']:.3f}" if hit else "-")
        print(f"{name:24s}" + "".join(f" | {c:>28s}" for c in cells))
    print(f"{'peak (ru_maxrss)':24s}" + "".join(f" | {r['peak_rss_gb']:>28.3f}" for r in results))
    print(f"{'peak minus imports+jit':24s}" + "".join(f" | {_above_imports(r):>28.3f}" for r in results))


def _above_imports(result: dict) -> float:
    """What the model's programs, arrays and allocator add: the peak minus the memory after the first trivial jit."""
    floor = next(s["rss_gb"] for s in result["steps"] if s["step"] == "first trivial jit")
    return result["peak_rss_gb"] - floor


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:7])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours-only", action="store_true", help="do not run (or install) the reference")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="alternated runs per implementation")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per process (default 600)")
    parser.add_argument("--recordings", type=int, default=4, help="synthetic recordings (default 4)")
    parser.add_argument("--frames", type=int, default=3000, help="frames per recording (default 3000)")
    parser.add_argument("--sweeps", type=int, default=None,
                        help="sweeps of each stage and of apply (default 30 / 30 / 20, as in the quick comparison)")
    parser.add_argument("--out", default=None, help="JSON file for all runs (default results/memory-stages.json)")
    args = parser.parse_args()
    if min(args.recordings, args.frames, args.sweeps or 2) < 2:
        parser.error("--recordings, --frames and --sweeps must be at least 2")
    import bench_data

    RESULTS.mkdir(exist_ok=True)
    size = f"{args.recordings}x{args.frames}"
    data = bench_data.write_synthetic(RESULTS / f"memory_{size}.npz", args.recordings, args.frames, seed=0)
    new = bench_data.write_synthetic(RESULTS / f"memory_{size}_new.npz", max(args.recordings // 2, 1), args.frames,
                                     seed=1)
    settings = dict(SETTINGS)
    if args.sweeps:
        settings.update(n_ar_iter=args.sweeps, n_iter=args.sweeps, n_apply_iter=args.sweeps)
    sides = [("ours", sys.executable)]
    if not args.ours_only:
        from compare_reference import ensure_reference

        sides.append(("reference", str(ensure_reference())))
    results = []
    for i in range(args.repeat):
        for impl, python in sides:
            print(f"running {impl} (run {i + 1} of {args.repeat}) ...", flush=True)
            result = run(python, impl, data, new, settings, f"{impl}-{size}-r{i}", args.timeout)
            result["run"] = i + 1
            results.append(result)
    _print(results)
    out = Path(args.out) if args.out else RESULTS / "memory-stages.json"
    out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/memory_stages.py", *sys.argv[1:]]),
                               "settings": settings, "runs": results}, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
