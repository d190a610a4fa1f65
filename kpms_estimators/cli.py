"""Command line: ``python -m kpms_estimators demo`` fits an ARHMM to simulated data."""

from __future__ import annotations

import argparse
import time

import numpy as np

from ._summary import syllable_durations


def _demo(args: argparse.Namespace) -> int:
    from . import ARHMM
    from .datasets import simulate_arhmm

    sim = simulate_arhmm(
        n_states=args.true_states, n_recordings=args.recordings, n_frames=args.frames, random_state=args.seed
    )
    print(
        f"Simulated {args.recordings} recordings x {args.frames} frames from a {args.true_states}-state "
        f"AR-HMM ({sim.X.shape[1]} features)."
    )
    model = ARHMM(n_iter=args.iters, random_state=args.seed, verbose=args.progress)
    start = time.perf_counter()
    model.fit(sim.X, sequence_ids=sim.sequence_ids)
    elapsed = time.perf_counter() - start
    labels = model.predict(sim.X, sequence_ids=sim.sequence_ids)
    history = model.log_likelihood_history_
    print(f"Fitted ARHMM: {model.n_iter_} Gibbs iterations in {elapsed:.1f} s")
    print("iteration  log-likelihood")
    for i, value in enumerate(history, start=1):
        if i <= 3 or i % max(1, len(history) // 10) == 0 or i == len(history):
            print(f"{i:9d}  {value:14.2f}")
    per_recording = [labels[sim.sequence_ids == r] for r in np.unique(sim.sequence_ids)]
    durations = syllable_durations(per_recording)
    used = np.unique(labels)
    frequent = int(np.sum(model.syllable_frequencies_ > 0.005))
    print(f"Syllables found: {used.size} used by predict ({frequent} above 0.5% of frames; truth: {args.true_states})")
    print(f"Median syllable duration: {np.median(durations):.1f} frames (simulated durations: geometric, mean 20, median ~14)")
    print(f"Score on the training data (mean log-likelihood per frame): {model.score(sim.X, sequence_ids=sim.sequence_ids):.3f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpms_estimators", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit an ARHMM to data simulated by the package and print a summary")
    demo.add_argument("--recordings", type=int, default=5)
    demo.add_argument("--frames", type=int, default=2000)
    demo.add_argument("--true-states", type=int, default=5)
    demo.add_argument("--iters", type=int, default=50)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--progress", action="store_true", help="show a progress bar")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)
