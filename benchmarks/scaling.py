"""Scaling: seconds per sweep and peak RSS at 1x, 2x, 4x, 8x the frames (issue #6, item 5).

    python benchmarks/scaling.py                 # ours only, 4 x 3000 frames times 1, 2, 4, 8
    python benchmarks/scaling.py --reference     # the reference too, in the same run

Same recording length (3000 frames), more recordings: 4, 8, 16, 32 of the synthetic
mouse of ``bench_data.py`` (model-free, seeded). Each size runs in its own process
through ``_compare_worker.py`` (the same functional-API pipeline as
``compare_reference.py``: format, init, AR-only then full sweeps; no apply, no
marginals), so that the peak RSS of one size is not inherited by the next. Writes
``benchmarks/results/scaling.json`` and ``scaling.png`` (seconds per sweep and peak RSS
against frames, with the line through the 1x point that linear growth would follow)
and prints the table, with each quantity's growth exponent between 1x and 8x
(log(ratio) / log 8: 1 is linear).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_data  # noqa: E402
from compare_reference import COMMON, RESULTS, _machine, ensure_reference, run_side  # noqa: E402

FACTORS = (1, 2, 4, 8)
BASE_RECORDINGS, FRAMES = 4, 3000
QUANTITIES = ("ar_only_steady_s_per_sweep", "full_steady_s_per_sweep", "peak_rss_gb")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", action="store_true", help="also run the reference at every size")
    parser.add_argument("--sweeps", type=int, default=6, help="sweeps per stage (median of all but the first)")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    sides = {"ours": sys.executable}
    if args.reference:
        sides["reference"] = ensure_reference()
    settings = dict(COMMON, n_ar_iter=args.sweeps, n_iter=args.sweeps, n_apply_iter=0, marginals=None)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": _machine(),
              "command": " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]]), "rows": []}
    for factor in FACTORS:
        n_rec = BASE_RECORDINGS * factor
        path = bench_data.write_synthetic(RESULTS / f"scaling_{n_rec}x{FRAMES}.npz", n_rec, FRAMES, seed=0)
        row = {"factor": factor, "recordings": n_rec, "frames": n_rec * FRAMES}
        for side, python in sides.items():
            print(f"{n_rec} x {FRAMES}: {side} ...", flush=True)
            result = run_side(python, "ours" if side == "ours" else "reference", path, settings,
                              f"scaling_{n_rec}x{FRAMES}_{side}", args.timeout)
            row[side] = {k: result.get(k) for k in ("status", "stage", "init_s", "full_compile_s", *QUANTITIES)}
        report["rows"].append(row)
    report["growth_exponent_1x_to_8x"] = {
        side: {q: _exponent(report["rows"], side, q) for q in QUANTITIES} for side in sides
    }
    out = RESULTS / "scaling.json"
    out.write_text(json.dumps(report, indent=1))
    _print(report, sides)
    _plot(report, sides, RESULTS / "scaling.png")
    print(f"\nwritten: {out} and {RESULTS / 'scaling.png'}")


def _exponent(rows, side, quantity):
    first, last = rows[0].get(side, {}).get(quantity), rows[-1].get(side, {}).get(quantity)
    if not first or not last:
        return None
    return math.log(last / first) / math.log(rows[-1]["factor"] / rows[0]["factor"])


LABELS = {"ar_only_steady_s_per_sweep": "AR s/sweep", "full_steady_s_per_sweep": "full s/sweep",
          "peak_rss_gb": "peak RSS GB"}


def _print(report, sides):
    columns = [(side, q) for side in sides for q in QUANTITIES]
    print("\n" + f"{'frames':>8s} " + " ".join(f"{side + ' ' + LABELS[q]:>24s}" for side, q in columns))
    for row in report["rows"]:
        cells = [row[side].get(q) for side, q in columns]
        print(f"{row['frames']:>8d} " + " ".join(f"{'-' if v is None else f'{v:.3g}':>24s}" for v in cells))
    print("growth exponent 1x -> 8x (1 = linear):")
    for side, exps in report["growth_exponent_1x_to_8x"].items():
        print(f"  {side}: " + ", ".join(f"{LABELS[q]} {'-' if e is None else f'{e:.2f}'}" for q, e in exps.items()))


def _plot(report, sides, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6))
    FigureCanvasAgg(fig)
    frames = [row["frames"] for row in report["rows"]]
    for ax, q in zip(fig.subplots(1, len(QUANTITIES)), QUANTITIES):
        for side in sides:
            values = [row[side].get(q) for row in report["rows"]]
            if values[0] is None:
                continue
            line = ax.plot(frames, values, "o-", label=side)[0]
            ax.plot(frames, [values[0] * f / frames[0] for f in frames], ":", color=line.get_color(),
                    label=f"{side}, linear from 1x")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("frames (recordings of 3000)")
        ax.set_title(q)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['command']}  ({report['date']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
