"""Agreement of syllables between implementations and between seeds, on a real recording set.

    python benchmarks/agreement.py --data bsoid --seeds 3 --sweeps 50 100     # the comparison's settings
    python benchmarks/agreement.py --data bsoid --seeds 3 --sweeps 50 500     # longer chains
    python benchmarks/agreement.py --data jabs --seeds 3 --sweeps 200 800 --jobs 2

Runs ``--seeds`` chains of each implementation (``_compare_worker.py``, the same pipeline and
settings as ``compare_reference.py``: 100 states, latent_dim 4, 3 lags, AR-only stage at kappa 1e6,
then the full model at kappa 1e4) and compares every pair of chains by the adjusted Rand index of
their syllables on all frames. The issue's criterion: our agreement with the reference (mean ARI
over the ours x reference pairs) no worse than the reference's agreement with itself (mean ARI
over the reference x reference pairs). One pair of chains is a noisy estimate of either (the
comparison table has one pair of each); this script reports every pair, their means, and per chain
the number of states used and the median syllable length, the statistics that show whether chains
are still moving.

Timings are not measured here (``--jobs 2`` runs two chains side by side). Output:
``benchmarks/results/agreement-<data>-<n_ar>-<n_full>.json`` and a table on stdout. Exits non-zero
if the reference cannot be run: no agreement with it is reported that was not measured.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_data  # noqa: E402
import compare_reference as cr  # noqa: E402


def chain_summary(labels_by_recording: dict) -> dict:
    """States used (any frame; above 0.5% of frames) and the median syllable length in frames."""
    labels = np.concatenate([np.asarray(v) for v in labels_by_recording.values()])
    counts = np.bincount(labels)
    lengths = []
    for seq in labels_by_recording.values():
        seq = np.asarray(seq)
        change = np.flatnonzero(np.diff(seq)) + 1
        bounds = np.concatenate([[0], change, [len(seq)]])
        lengths.extend(np.diff(bounds))
    return {"states_used": int(np.sum(counts > 0)), "states_above_0.5pct": int(np.sum(counts > 0.005 * len(labels))),
            "median_syllable_frames": float(np.median(lengths))}


def _plain(settings: dict) -> dict:
    """Settings without a false ``reference_compat`` (runs from before the switch existed lack it)."""
    return {k: v for k, v in settings.items() if k != "reference_compat" or v}


def pair_aris(chains: dict, names) -> dict:
    """ARI of every pair of finished chains, keyed "a|b", and the means per kind of pair."""
    labels = {k: np.concatenate([np.asarray(v["syllables"][n]) for n in names]) for k, v in chains.items()}
    pairs = {f"{a}|{b}": adjusted_rand_score(labels[a], labels[b]) for a, b in itertools.combinations(sorted(labels), 2)}

    def mean_of(kind_a, kind_b):
        values = [v for k, v in pairs.items()
                  if sorted(s.split(" ")[0] for s in k.split("|")) == sorted([kind_a, kind_b])]
        return (float(np.mean(values)), len(values)) if values else (None, 0)

    means = {"ours vs reference": mean_of("ours", "reference"), "reference vs reference": mean_of("reference", "reference"),
             "ours vs ours": mean_of("ours", "ours")}
    return {"pairs": pairs, "means": {k: {"mean": m, "n_pairs": n} for k, (m, n) in means.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="bsoid", choices=["bsoid", "jabs"], help="real set (bench_data.write_real)")
    parser.add_argument("--seeds", type=int, default=3, help="chains per implementation (seeds 0 .. N-1)")
    parser.add_argument("--sweeps", type=int, nargs=2, default=[50, 100], metavar=("N_AR", "N_FULL"),
                        help="AR-only and full-model sweeps per chain (the full comparison uses 50 100)")
    parser.add_argument("--ours-reference-compat", action="store_true",
                        help="run ours with reference_compat=True (the reference's hard-coded 3 coordinates per "
                             "keypoint in the noise-scale updates, spec 4.5-4.6) instead of the exact 2 for 2D data")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a chain's result from an earlier run with the same data, settings and seed "
                             "(e.g. the reference's chains when only ours changes)")
    parser.add_argument("--jobs", type=int, default=1, help="chains run at once (timings are not reported)")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per chain")
    parser.add_argument("--reference-python", default=None, metavar="PYTHON", type=cr.interpreter)
    parser.add_argument("--real-dir", default=None, metavar="DIR", help=f"default {cr.REAL_DIR}")
    args = parser.parse_args()
    real_dir = Path(args.real_dir).resolve() if args.real_dir else cr.REAL_DIR
    if not real_dir.is_dir():
        sys.exit(f"{real_dir} not found: the real recordings are needed here")
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (agreement within a side needs two chains)")
    reference_python = cr.ensure_reference(args.reference_python)
    cr.RESULTS.mkdir(exist_ok=True)
    data_path = bench_data.write_real(cr.RESULTS / f"real_{args.data}.npz", real_dir, args.data)
    n_ar, n_full = args.sweeps
    settings = dict(cr.COMMON, n_ar_iter=n_ar, n_iter=n_full, n_apply_iter=0, marginals=None,
                    sigmasq_loc=bench_data.sigmasq_loc(data_path))
    base_tag = f"agreement-{args.data}-{n_ar}-{n_full}"
    tag = base_tag + ("-compat" if args.ours_reference_compat else "")

    jobs = [(impl, seed) for seed in range(args.seeds) for impl in ("ours", "reference")]

    def run(job):
        impl, seed = job
        python = sys.executable if impl == "ours" else reference_python
        chain_settings = dict(settings, seed=seed, reference_compat=impl == "ours" and args.ours_reference_compat)
        chain_tag = f"{tag if impl == 'ours' else base_tag}_{impl}{seed}"  # the reference has no such switch
        earlier = cr.RESULTS / f"{chain_tag}.json"
        if args.reuse and earlier.exists():
            result = json.loads(earlier.read_text())
            if _plain(result.get("settings", {})) == _plain(chain_settings):
                print(f"reusing {earlier.name}", flush=True)
                return job, dict(result, status="ok")
        print(f"running {impl} seed {seed} ({n_ar} + {n_full} sweeps) ...", flush=True)
        return job, cr.run_side(python, impl, data_path, chain_settings, chain_tag, args.timeout)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = dict(pool.map(run, jobs))
    failed = {f"{impl} {seed}": r.get("status") + " in " + str(r.get("stage")) for (impl, seed), r in results.items()
              if r.get("status") != "ok"}
    chains = {f"{impl} {seed}": r for (impl, seed), r in results.items() if r.get("status") == "ok"}
    names = bench_data.read(data_path)[0]
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": cr._machine(),
        "command": " ".join(["python", "benchmarks/agreement.py", *sys.argv[1:]]), "settings": settings,
        "chains": {k: chain_summary(v["syllables"]) for k, v in sorted(chains.items())},
        "failed": failed, **pair_aris(chains, names),
    }
    out = cr.RESULTS / f"{tag}.json"
    out.write_text(json.dumps(report, indent=1))

    print(f"\n{args.data}: {n_ar} AR-only + {n_full} full sweeps per chain")
    print(f"{'chain':14s} {'states used':>11s} {'> 0.5%':>7s} {'median syllable':>16s}")
    for name, s in report["chains"].items():
        print(f"{name:14s} {s['states_used']:11d} {s['states_above_0.5pct']:7d} {s['median_syllable_frames']:16.1f}")
    for pair, value in report["pairs"].items():
        print(f"ARI {pair:30s} {value:.3f}")
    for kind, m in report["means"].items():
        if m["mean"] is not None:
            print(f"mean ARI {kind:24s} {m['mean']:.3f}  ({m['n_pairs']} pairs)")
    for name, why in failed.items():
        print(f"{name}: {why}")
    print(f"written: {out}")
    if any(name.startswith("reference") for name in failed):
        sys.exit("a reference chain did not finish; its agreement was not measured")


if __name__ == "__main__":
    main()
