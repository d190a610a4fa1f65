"""Does the initial state explain where the AR-only chains go? Ours from the reference's start.

    python benchmarks/swap_initial_state.py                      # real JABS set, seed 0, 200 sweeps
    python benchmarks/swap_initial_state.py --data X.npz --seed 1 --sweeps 100

Runs three AR-only chains on the same data and prints, after 1, 5, 10, 50, 100, 200 sweeps, the
number of states used and the median syllable length (frames), and keeps each chain's final labels
in the JSON (``"final labels"``: own, swapped, reference), for ARIs across seeds:

- ours from our own initialisation;
- ours from the reference's initial state (its z0, pi, Ab and Q put into our functional-API
  model; x0, h0, v0 agree between the two to 1e-12, see ``check_initial_labels.py``);
- the reference from its own initialisation.

If ours-from-the-reference's-start follows the reference, the samplers agree and the chains differ
by where they start. Output: the table on stdout and
``benchmarks/results/swap_initial_state-<data>-<seed>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_data  # noqa: E402
import compare_reference  # noqa: E402

CHECKPOINTS = (1, 5, 10, 50, 100, 200)

_CHAIN = r"""
import sys, json, numpy as np
sys.path.insert(0, sys.argv[1])
import _compare_worker as w
from bench_data import read
data_path, seed, n_sweeps, start = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
impl = "reference" if start in ("reference", "dump") else "ours"
names, bodyparts, anterior, posterior, coords, confs, _ = read(data_path)
settings = dict(json.loads(sys.argv[6]), seed=seed)
side = w.Ours(settings) if impl == "ours" else w.Reference(settings)
data, metadata, model = side.init(coords, confs, bodyparts, anterior, posterior)
if start == "dump":
    st, pa = model["states"], model["params"]
    np.savez(sys.argv[7], z=np.asarray(st["z"]), pi=np.asarray(pa["pi"]), Ab=np.asarray(pa["Ab"]), Q=np.asarray(pa["Q"]))
    sys.exit(0)
if start == "swapped":
    ref = np.load(sys.argv[7])
    model["states"]["z"] = ref["z"].astype(np.asarray(model["states"]["z"]).dtype)
    for k in ("pi", "Ab", "Q"):
        model["params"][k] = ref[k]
model = side.api.update_hypparams(model, kappa=settings["ar_kappa"])
mask = np.asarray(data["mask"])[:, settings["n_lags"]:] > 0
rows, done = [], 0
for target in sorted({c for c in json.loads(sys.argv[8]) if c <= n_sweeps} | {n_sweeps}):
    model = side.fit(model, data, metadata, target - done, True)
    done = target
    z = np.asarray(model["states"]["z"])
    used, lengths = set(), []
    for b in range(z.shape[0]):
        zb = z[b][mask[b]]
        used.update(np.unique(zb).tolist())
        cuts = np.flatnonzero(np.diff(zb)) + 1
        lengths.extend(np.diff(np.concatenate([[0], cuts, [len(zb)]])).tolist())
    rows.append([done, len(used), float(np.median(lengths))])
print("ROWS " + json.dumps(rows))
print("LABELS " + json.dumps([int(v) for b in range(z.shape[0]) for v in z[b][mask[b]]]))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="a bench_data .npz (default: the real JABS set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweeps", type=int, default=200)
    args = parser.parse_args()
    if args.data is None:
        if not compare_reference.REAL_DIR.is_dir():
            sys.exit(f"{compare_reference.REAL_DIR} not found; pass --data")
        compare_reference.RESULTS.mkdir(exist_ok=True)
        args.data = bench_data.write_real(compare_reference.RESULTS / "real_jabs.npz", compare_reference.REAL_DIR,
                                          "jabs")
    args.data = str(Path(args.data).resolve())
    reference_python = str(compare_reference.ensure_reference())
    settings = json.dumps(dict(compare_reference.COMMON, n_ar_iter=args.sweeps, n_iter=0))
    report, final_labels = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        dump = str(Path(tmp) / "reference_init.npz")

        def run(python, start):
            cmd = [python, "-c", _CHAIN, str(HERE), args.data, str(args.seed), str(args.sweeps), start, settings, dump,
                   json.dumps(CHECKPOINTS)]
            out = subprocess.run(cmd, check=True, cwd=HERE, capture_output=True, text=True).stdout
            rows = [line for line in out.splitlines() if line.startswith("ROWS ")]
            labels = [line for line in out.splitlines() if line.startswith("LABELS ")]
            if labels:
                final_labels[start] = json.loads(labels[-1][7:])
            return json.loads(rows[-1][5:]) if rows else None

        run(reference_python, "dump")
        for label, python, start in (("ours, own init", sys.executable, "own"),
                                     ("ours, from the reference's init", sys.executable, "swapped"),
                                     ("reference, own init", reference_python, "reference")):
            report[label] = run(python, start)
            print(f"{label:34s} " + "  ".join(f"{n}: {u} states / {m:g}" for n, u, m in report[label]), flush=True)
    report["final labels"] = final_labels  # labelled real frames of every segment, in order (for ARIs across seeds)
    stem = f"swap_initial_state-{Path(args.data).stem}-{args.seed}" + (f"-{args.sweeps}" if args.sweeps != 200 else "")
    out = compare_reference.RESULTS / f"{stem}.json"
    out.write_text(json.dumps(report))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
