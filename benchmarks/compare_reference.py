"""Side-by-side benchmark of kpms_estimators against the reference keypoint-MoSeq, same data, same run.

    python benchmarks/compare_reference.py --quick          # < 10 min on 2 cores
    python benchmarks/compare_reference.py                  # full: adds 10 x 18000 frames and B-SOiD
    python benchmarks/compare_reference.py --rows 10x18000  # only the datasets whose name contains this
    python benchmarks/compare_reference.py --quick --repeat 3  # medians of 3 alternated runs per side

The reference (keypoint-moseq 0.8.1 on jax/jaxlib 0.6.2, float64) is installed on
first use into ``benchmarks/.reference-venv`` (ignored by git; nothing of it is
committed). Each implementation runs in its own process (``_compare_worker.py``)
with a time limit; a process that runs out of time is reported as a hang with the
stage it was in, and the other rows are kept. If the reference cannot be
installed or imported the script says so and exits non-zero: it never reports a
ratio it did not measure.

Output: one table on stdout and ``benchmarks/results/compare[-quick][-ROWS].json`` (rewritten after
each dataset) with
every measured number, the ratios ours/reference, and the agreement statistics
(matched accuracy and ARI against the true syllables on synthetic data; on real
data the ARI between our syllables and the reference's next to the ARI between two
reference seeds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
REFERENCE_VENV = HERE / ".reference-venv"
REFERENCE_PINS = ["keypoint-moseq==0.8.1", "jax[cpu]==0.6.2", "jaxlib==0.6.2"]
REAL_DIR = REPO.parent / "shared" / "data" / "real"

sys.path.insert(0, str(HERE))
import bench_data  # noqa: E402

from kpms_estimators._summary import matched_accuracy  # noqa: E402

COMMON = dict(n_states=100, latent_dim=4, n_lags=3, ar_kappa=1e6, kappa=1e4, seed=0)
RATIO_KEYS = [
    "import_s", "init_s", "ar_only_compile_s", "ar_only_steady_s_per_sweep", "full_compile_s",
    "full_steady_s_per_sweep", "apply_first_s", "apply_steady_s", "marginals_s", "peak_rss_gb",
    "device_peak_gb",  # GPU runs only: peak memory on the accelerator
]


def plan(quick: bool, real_dir: Path = REAL_DIR):
    """[(dataset name, npz writer, settings, new-data writer or None, reference seeds)]."""
    marg = {"burn_in_iters": 10, "num_samples": 5, "steps_per_sample": 2}
    rows = [(
        "synthetic 4x3000",
        lambda p: bench_data.write_synthetic(p, 4, 3000, seed=0),
        dict(COMMON, n_ar_iter=30 if quick else 50, n_iter=30 if quick else 200, n_apply_iter=20, marginals=marg),
        lambda p: bench_data.write_synthetic(p, 2, 3000, seed=1),
        [0],
    )]
    real = [("jabs", 20, 20)] if quick else [("jabs", 50, 100), ("bsoid", 50, 100)]
    for name, n_ar, n_full in real:
        rows.append((
            f"real {name}",
            lambda p, name=name: bench_data.write_real(p, real_dir, name),
            dict(COMMON, n_ar_iter=n_ar, n_iter=n_full, n_apply_iter=20, marginals=None),
            None,
            [0, 1],
        ))
    if not quick:
        rows.append((
            "synthetic 10x18000",
            lambda p: bench_data.write_synthetic(p, 10, 18000, seed=2),
            dict(COMMON, n_ar_iter=10, n_iter=10, n_apply_iter=10,
                 marginals={"burn_in_iters": 2, "num_samples": 2, "steps_per_sample": 1}),
            lambda p: bench_data.write_synthetic(p, 10, 18000, seed=3),
            [0],
        ))
    return rows


def interpreter(name: str) -> str:
    """An interpreter argument as the workers need it: they run in ``benchmarks/``, so a relative
    path (``.venv-x/bin/python``) is made absolute here; a bare name stays a ``PATH`` lookup."""
    return str(Path(name).absolute()) if os.sep in name else name


def ensure_reference(python=None) -> Path:
    """The reference's python (``python``, or the venv's, installing it on first use); exits non-zero
    if that fails or the reference does not import there."""
    if python is not None:
        python = Path(python)
    else:
        python = REFERENCE_VENV / "bin" / "python"
    if python == REFERENCE_VENV / "bin" / "python" and not python.exists():
        print(f"installing the reference into {REFERENCE_VENV} ({', '.join(REFERENCE_PINS)}) ...", flush=True)
        steps = [[sys.executable, "-m", "venv", str(REFERENCE_VENV)],
                 [str(python), "-m", "pip", "install", "--quiet", *REFERENCE_PINS]]
        for cmd in steps:
            if subprocess.run(cmd).returncode != 0:
                sys.exit(f"could not install the reference ({' '.join(cmd)}); no comparison was made.")
    probe = subprocess.run([str(python), "-c", "import _compare_worker as w; w._import_stand_ins(); import keypoint_moseq"],
                           capture_output=True, text=True, cwd=HERE)
    if probe.returncode != 0:
        sys.exit(f"the reference does not import from {python}:\n{probe.stderr[-2000:]}\nno comparison was made.")
    return python


def run_side(python, impl, data_path, settings, tag, timeout):
    """Run one worker; returns its result dict, or {"status": "hang"/"error", "stage": ...}."""
    out = RESULTS / f"{tag}.json"
    log = RESULTS / f"{tag}.log"
    out.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([str(python), str(HERE / "_compare_worker.py"), impl, str(data_path), str(out),
                                 json.dumps(settings)], stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=HERE)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - start
    stages = [line.split(" ", 1)[1].strip() for line in log.read_text(errors="replace").splitlines()
              if line.startswith("STAGE ")]
    last = stages[-1] if stages else "start-up"
    if proc.returncode == 0 and out.exists():
        result = json.loads(out.read_text())
        result["status"] = "ok"
        return result
    if proc.returncode in (-9, 137):
        print(f"  {impl}: no result after {wall:.0f} s (limit {timeout} s), stopped in stage '{last}'", flush=True)
        return {"status": "hang", "stage": last, "limit_s": timeout}
    tail = log.read_text(errors="replace")[-1500:]
    print(f"  {impl}: failed (exit {proc.returncode}) in stage '{last}':\n{tail}", flush=True)
    return {"status": "error", "stage": last, "exit": proc.returncode, "log_tail": tail}


def _labels(result, names):
    return np.concatenate([np.asarray(result["syllables"][n]) for n in names])


def agreement(row_results, names, truth):
    """Accuracy/ARI against the truth (synthetic) or between implementations and reference seeds (real)."""
    ours, refs = row_results["ours"], row_results["reference"]
    ok = [r for r in refs if r.get("status") == "ok"]
    out = {}
    if truth is not None:
        t = np.concatenate([truth[n] for n in names])
        for label, res in [("ours", ours)] + [(f"reference seed {i}", r) for i, r in enumerate(refs)]:
            if res.get("status") == "ok":
                p = _labels(res, names)
                t_, p_ = t[-len(p):], p[-len(t):]  # both cover whole recordings; guard against a lag offset
                out[f"matched_accuracy {label}"] = matched_accuracy(t_, p_)
                out[f"ARI vs truth {label}"] = adjusted_rand_score(t_, p_)
    if ours.get("status") == "ok" and ok:
        out["ARI ours vs reference seed 0"] = adjusted_rand_score(_labels(ours, names), _labels(ok[0], names))
    if len(ok) >= 2:
        out["ARI reference seed 0 vs seed 1"] = adjusted_rand_score(_labels(ok[0], names), _labels(ok[1], names))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few sweeps (< 10 min on 2 cores)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per process (default 400 quick, 3600 full)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows", nargs="+", default=None, metavar="TEXT",
                        help="run only the datasets whose name contains one of these (e.g. 10x18000 bsoid)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run ours and the reference (seed 0) N times each, alternating, and report the medians "
                             "(on a shared VM one run of either side can be 25%% off its median)")
    parser.add_argument("--reference-python", default=None, metavar="PYTHON", type=interpreter,
                        help="run the reference with this interpreter instead of benchmarks/.reference-venv (e.g. a "
                             "machine where it was installed from carried wheels; see gpu_quick.sh)")
    parser.add_argument("--ours-python", default=sys.executable, metavar="PYTHON", type=interpreter,
                        help="run kpms_estimators with this interpreter (default: this one)")
    parser.add_argument("--ours-only", action="store_true",
                        help="run only kpms_estimators (no reference, hence no ratios): e.g. where the reference "
                             "cannot be installed; the script still says so and exits non-zero")
    parser.add_argument("--real-dir", default=None, metavar="DIR",
                        help=f"where the real recordings are (default {REAL_DIR})")
    args = parser.parse_args()
    real_dir = Path(args.real_dir).resolve() if args.real_dir else REAL_DIR
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    timeout = args.timeout or (400 if args.quick else 3600)
    RESULTS.mkdir(exist_ok=True)
    reference_python = None if args.ours_only else ensure_reference(args.reference_python)
    suffix = "-quick" if args.quick else ""
    rows = [r for r in plan(args.quick, real_dir) if args.rows is None or any(t in r[0] for t in args.rows)]
    if not rows:
        sys.exit(f"no dataset matches --rows {' '.join(args.rows)}; names: {[r[0] for r in plan(args.quick)]}")
    tag = ("-" + "-".join(args.rows) if args.rows else "") + (f"-x{args.repeat}" if args.repeat > 1 else "")
    out = Path(args.out) if args.out else RESULTS / f"compare{suffix}{tag}.json"
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": _machine(),
              "command": " ".join(["python", "benchmarks/compare_reference.py", *sys.argv[1:]]), "rows": {}}
    for name, write, settings, write_new, seeds in rows:
        if name.startswith("real") and not real_dir.is_dir():
            print(f"{name}: skipped, {real_dir} not found", flush=True)
            continue
        slug = name.replace(" ", "_")
        data_path = write(RESULTS / f"{slug}.npz")
        # the same centroid random-walk variance on both sides (estimated from the data; without it
        # the reference would use its config's 0.5 and ours its own estimate: two different models)
        settings = dict(settings, sigmasq_loc=bench_data.sigmasq_loc(data_path))
        if write_new is not None:
            settings = dict(settings, new_data=str(write_new(RESULTS / f"{slug}_new.npz")))
        runs = {"ours": [], "reference": []}
        for i in range(args.repeat):  # alternated, so that a slow spell of the machine hits both sides
            rep = f"-r{i}" if args.repeat > 1 else ""
            print(f"{name}: running ours{f' (run {i + 1} of {args.repeat})' if rep else ''} ...", flush=True)
            runs["ours"].append(run_side(args.ours_python, "ours", data_path, settings, f"{slug}{suffix}_ours{rep}", timeout))
            if reference_python is None:
                runs["reference"].append({"status": "not run", "stage": "--ours-only"})
                continue
            print(f"{name}: running the reference (seed {seeds[0]}{f', run {i + 1} of {args.repeat}' if rep else ''}) ...",
                  flush=True)
            runs["reference"].append(run_side(reference_python, "reference", data_path, dict(settings, seed=seeds[0]),
                                              f"{slug}{suffix}_reference{seeds[0]}{rep}", timeout))
        row = {"settings": settings, "ours": _median_run(runs["ours"]), "reference": [_median_run(runs["reference"])]}
        for seed in seeds[1:] if reference_python is not None else []:
            print(f"{name}: running the reference (seed {seed}) ...", flush=True)
            row["reference"].append(run_side(reference_python, "reference", data_path, dict(settings, seed=seed),
                                             f"{slug}{suffix}_reference{seed}", timeout))
        names, *_, truth = bench_data.read(data_path)
        row["agreement"] = agreement(row, names, truth)
        ref = row["reference"][0]
        row["ratio"] = {k: row["ours"][k] / ref[k] for k in RATIO_KEYS
                        if row["ours"].get(k) and ref.get(k) and ref[k] > 0}
        if args.repeat > 1:  # ratio of each alternated pair, to show the spread behind the medians
            pairs = [(o, r) for o, r in zip(runs["ours"], runs["reference"]) if o.get("status") == r.get("status") == "ok"]
            row["ratio_range"] = {k: [min(o[k] / r[k] for o, r in pairs), max(o[k] / r[k] for o, r in pairs)]
                                  for k in row["ratio"] if pairs and all(o.get(k) and r.get(k) for o, r in pairs)}
        for side in [row["ours"], *row["reference"]]:
            side.pop("syllables", None)
        report["rows"][name] = row
        _print_row(name, row)
        out.write_text(json.dumps(report, indent=1))  # after every row: a later hang or kill loses nothing
    print(f"\nwritten: {out}")
    if reference_python is None:
        sys.exit("--ours-only: the reference was not run; no ratio was measured.")


def _median_run(results):
    """One side's result over repeated runs: the first run, with each timing and memory key replaced
    by its median over the runs; a run that hung or failed is reported instead (no median of partial runs)."""
    bad = [r for r in results if r.get("status") != "ok"]
    if bad:
        return bad[0]
    merged = dict(results[0])
    if len(results) > 1:
        for key in RATIO_KEYS:
            values = [r[key] for r in results if r.get(key) is not None]
            if values:
                merged[key] = float(np.median(values))
                merged[f"{key}_runs"] = values
    return merged


def _print_row(name, row):
    ours, ref = row["ours"], row["reference"][0]
    spread = row.get("ratio_range", {})
    print(f"\n== {name}  (ours: {ours.get('status')}, reference: {ref.get('status')})")
    print(f"{'quantity':32s} {'ours':>10s} {'reference':>10s} {'ratio':>7s}" + ("  pair ratios" if spread else ""))
    for key in RATIO_KEYS:
        a, b = ours.get(key), ref.get(key)
        ratio = row["ratio"].get(key)
        extra = f"  {_fmt(spread[key][0])}-{_fmt(spread[key][1])}" if key in spread else ""
        print(f"{key:32s} {_fmt(a):>10s} {_fmt(b):>10s} {_fmt(ratio):>7s}{extra}")
    for key, value in row["agreement"].items():
        print(f"{key:45s} {value:.3f}")
    for side in [ours, *row["reference"]]:
        if side.get("status") != "ok":
            print(f"  {side.get('status')} in stage '{side.get('stage')}'")


def _fmt(v):
    return "-" if v is None else f"{v:.3g}"


def _machine():
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:  # the card, on a GPU machine
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        if query.returncode == 0 and query.stdout.strip():
            machine["gpus"] = query.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return machine


if __name__ == "__main__":
    main()
