"""Is each implementation's initial z an exact draw from its own conditional p(z | x0, params)?

    python benchmarks/check_initial_labels.py                 # real JABS set (needs ../shared)
    python benchmarks/check_initial_labels.py --data PATH.npz # any bench_data .npz

Both implementations initialise the same way (model spec 2.5): x0 from PCA, transitions and AR
parameters from the prior, then z0 by forward filtering, backward sampling given x0 and those
parameters. This script runs each side's ``init_model`` (the reference in its own virtual
environment, as ``compare_reference.py`` installs it), takes the x0, (pi, Ab, Q) and z0 that
each side reports, and compares the number of label switches in z0 with its exact expectation
under that side's own parameters, computed here independently in NumPy/SciPy (float64,
log-space forward-backward, pairwise marginals). A correct sampler lands within a few standard
deviations of the expectation (the spread of the switch count is a few tens at most here).
``--sweeps N`` runs N AR-only sweeps first: x stays x0 and each sweep draws the parameters, then z
given them, so the same check applies to the labels of sweep N.
Output: one line per side and seed, and ``benchmarks/results/check_initial_labels-<data>-<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.special import logsumexp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_data  # noqa: E402
import compare_reference  # noqa: E402

SETTINGS = dict(compare_reference.COMMON, n_ar_iter=0, n_iter=0)

_DUMP = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[4])
import json, _compare_worker as w
from bench_data import read
names, bodyparts, anterior, posterior, coords, confs, _ = read(sys.argv[2])
settings = json.loads(sys.argv[5])
side = w.Ours(settings) if sys.argv[1] == "ours" else w.Reference(settings)
data, metadata, model = side.init(coords, confs, bodyparts, anterior, posterior)
if settings["n_ar_iter"] > 0:  # AR-only sweeps: each redraws the parameters, then z given them and x0
    model = side.fit(side.api.update_hypparams(model, kappa=settings["ar_kappa"]), data, metadata,
                     settings["n_ar_iter"], True)
st, pa = model["states"], model["params"]
np.savez(sys.argv[3], mask=np.asarray(data["mask"]), x=np.asarray(st["x"]), z=np.asarray(st["z"]),
         pi=np.asarray(pa["pi"]), Ab=np.asarray(pa["Ab"]), Q=np.asarray(pa["Q"]))
"""


def ar_log_likelihoods(x, Ab, Q, n_lags):
    """log N(x_t | A_k [x_{t-L}; ...; x_{t-1}; 1], Q_k) for t = L..T-1, all states: (T-L, S)."""
    lagged = np.concatenate([x[i : len(x) - n_lags + i] for i in range(n_lags)] + [np.ones((len(x) - n_lags, 1))], 1)
    resid = x[n_lags:, None, :] - np.einsum("kpa,ta->tkp", Ab, lagged)
    chol = np.linalg.cholesky(Q)
    white = np.linalg.solve(chol[None], resid[..., None])[..., 0]
    logdet = 2 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(-1)
    return -0.5 * (white**2).sum(-1) - 0.5 * logdet - 0.5 * x.shape[1] * np.log(2 * np.pi)


def expected_switches(log_likes, pi, mask):
    """E[#{t: z_t != z_{t+1}, both frames real}] under the HMM posterior (uniform initial state)."""
    log_pi = np.log(pi)
    num_frames, num_states = log_likes.shape
    ll = log_likes * mask[:, None]
    fwd = np.zeros_like(ll)
    fwd[0] = ll[0] - np.log(num_states)
    for t in range(1, num_frames):
        fwd[t] = logsumexp(fwd[t - 1][:, None] + log_pi, axis=0) + ll[t]
    bwd = np.zeros_like(ll)
    for t in range(num_frames - 2, -1, -1):
        bwd[t] = logsumexp(log_pi + (ll[t + 1] + bwd[t + 1])[None, :], axis=1)
    log_z = logsumexp(fwd[-1])
    total = 0.0
    for t in range(num_frames - 1):
        if mask[t] and mask[t + 1]:
            stay = np.exp(fwd[t] + np.diag(log_pi) + ll[t + 1] + bwd[t + 1] - log_z).sum()
            total += 1.0 - stay
    return total


def switches(z, mask):
    return int(np.sum((z[:-1] != z[1:]) & (mask[:-1] > 0) & (mask[1:] > 0)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="a bench_data .npz (default: the real JABS set)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sweeps", type=int, default=0,
                        help="AR-only sweeps after the initialisation (z is then drawn given the parameters that "
                             "sweep drew, and x is still x0)")
    args = parser.parse_args()
    if args.data is None:
        if not compare_reference.REAL_DIR.is_dir():
            sys.exit(f"{compare_reference.REAL_DIR} not found; pass --data")
        compare_reference.RESULTS.mkdir(exist_ok=True)
        args.data = str(bench_data.write_real(compare_reference.RESULTS / "real_jabs.npz", compare_reference.REAL_DIR,
                                              "jabs"))
    args.data = str(Path(args.data).resolve())  # the sides run in benchmarks/
    reference_python = compare_reference.ensure_reference()
    n_lags = SETTINGS["n_lags"]
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl, python in (("ours", sys.executable), ("reference", str(reference_python))):
            for seed in args.seeds:
                out = Path(tmp) / f"{impl}{seed}.npz"
                settings = json.dumps(dict(SETTINGS, seed=seed, n_ar_iter=args.sweeps))
                subprocess.run([python, "-c", _DUMP, impl, args.data, str(out), str(HERE), settings], check=True,
                               cwd=HERE, stderr=subprocess.DEVNULL)
                d = np.load(out)
                row = {}
                for b in range(d["x"].shape[0]):
                    mask = d["mask"][b, n_lags:]
                    ll = ar_log_likelihoods(d["x"][b], d["Ab"], d["Q"], n_lags)
                    row.setdefault("expected", 0.0)
                    row["expected"] += expected_switches(ll, d["pi"], mask)
                    row.setdefault("observed", 0)
                    row["observed"] += switches(d["z"][b], mask)
                report[f"{impl} seed {seed}"] = row
                when = f"after {args.sweeps} AR-only sweeps" if args.sweeps else "initial"
                print(f"{impl} seed {seed}: z ({when}) has {row['observed']} switches; exact expectation under the "
                      f"parameters it was drawn with {row['expected']:.1f}", flush=True)
    out = compare_reference.RESULTS / f"check_initial_labels-{Path(args.data).stem}-{args.sweeps}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
