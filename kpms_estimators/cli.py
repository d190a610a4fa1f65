"""Command line: ``python -m kpms_estimators {demo,fit,demo-arhmm}``.

``demo`` fits ``KeypointSLDS`` to mouse-like keypoint recordings simulated by the
package and writes per-recording results to a netCDF file; ``fit PATH...`` does the
same for the user's own pose files (DeepLabCut, SLEAP or JABS).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ._summary import syllable_durations


def save_results(results: dict, path) -> Path:
    """Write ``{recording: Dataset(syllable, latent_state, centroid, heading)}`` to one netCDF4 file.

    Same layout as ``fitting.apply_model``: dims (recording, time), syllable -1 and
    the other variables NaN past each recording's ``n_frames``; the file is replaced.
    """
    from .fitting import _write_results

    arrays = {rec: {k: ds[k].values for k in ("syllable", "latent_state", "centroid", "heading")}
              for rec, ds in results.items()}
    path = Path(path)
    if path.exists():
        path.unlink()
    _write_results(path, arrays, overwrite=True)
    return path


def _print_fit_summary(model, labels: dict, fps: float | None) -> None:
    terms = model.log_likelihood_terms_
    names = [k for k in model._likelihood_terms if k in terms]
    print(f"Fitted {type(model).__name__}: {model.n_iter_} Gibbs iterations "
          f"({np.sum(model.stage_history_ == 'ar_only')} AR-only, {np.sum(model.stage_history_ == 'full')} full)")
    print("iteration  stage    " + "".join(f"{n:>14s}" for n in names) + "           total")
    n = len(model.log_likelihood_history_)
    for i in range(n):
        if i < 2 or (i + 1) % max(1, n // 12) == 0 or i == n - 1:
            row = "".join(f"{terms[k][i]:14.5g}" for k in names)
            print(f"{i + 1:9d}  {model.stage_history_[i]:7s}  {row}  {model.log_likelihood_history_[i]:14.6g}")
    durations = syllable_durations(labels.values())
    used = np.unique(np.concatenate(list(labels.values())))
    frequent = int(np.sum(model.syllable_frequencies_ > 0.005))
    med = float(np.median(durations))
    ms = f" = {1000.0 * med / fps:.0f} ms at {fps:g} fps" if fps else ""
    print(f"Syllables used: {used.size} ({frequent} above 0.5% of frames)")
    print(f"Median syllable duration: {med:.1f} frames{ms}")


def _fit_and_save(model, poses, out, fps) -> int:
    start = time.perf_counter()
    model.fit(poses)
    print(f"Fit time: {time.perf_counter() - start:.1f} s")
    results = model.transform(poses)
    labels = {rec: ds["syllable"].values for rec, ds in results.items()}
    _print_fit_summary(model, labels, fps)
    path = save_results(results, out)
    print(f"Per-recording results (syllable, latent_state, centroid, heading) written to {path}")
    return 0


def _keypoint_model(args):
    from . import KeypointSLDS

    return KeypointSLDS(
        n_ar_iter=args.ar_iters, n_iter=args.iters, kappa=args.kappa, latent_dim=args.latent_dim,
        anterior_keypoints=args.anterior, posterior_keypoints=args.posterior, keypoints=args.keypoints,
        random_state=args.seed, verbose=args.progress,
    )


def _demo(args: argparse.Namespace) -> int:
    from .datasets import simulate_keypoints

    sim = simulate_keypoints(n_recordings=args.recordings, n_frames=args.frames, random_state=args.seed)
    print(f"Simulated {args.recordings} mouse-like recordings x {args.frames} frames, "
          f"{len(sim.keypoints)} keypoints in 2D, from a 5-syllable keypoint SLDS (30 fps assumed).")
    args.anterior, args.posterior, args.keypoints = ["nose"], ["tail_base"], None
    return _fit_and_save(_keypoint_model(args), sim.poses, args.out, fps=30.0)


def _fit(args: argparse.Namespace) -> int:
    from .io import load_many

    poses = {}
    for path in args.paths:  # each may be a file, a folder or a glob pattern
        for name, ds in load_many(path, source_software=args.source_software, fps=args.fps).items():
            if name in poses:
                raise ValueError(f"Two pose files are both named {name!r} (from {path}); rename one.")
            poses[name] = ds
    print(f"Loaded {len(poses)} file(s): {', '.join(poses)}")
    return _fit_and_save(_keypoint_model(args), poses, args.out, fps=args.fps)


def _demo_arhmm(args: argparse.Namespace) -> int:
    from . import ARHMM
    from .datasets import simulate_arhmm

    sim = simulate_arhmm(n_recordings=args.recordings, n_frames=args.frames, random_state=args.seed)
    print(f"Simulated {args.recordings} recordings x {args.frames} frames from a 5-state AR-HMM.")
    model = ARHMM(n_iter=args.iters, random_state=args.seed, verbose=args.progress)
    start = time.perf_counter()
    model.fit(sim.X, sequence_ids=sim.sequence_ids)
    print(f"Fit time: {time.perf_counter() - start:.1f} s")
    labels = model.predict(sim.X, sequence_ids=sim.sequence_ids)
    per_rec = {r: labels[sim.sequence_ids == r] for r in np.unique(sim.sequence_ids)}
    _print_fit_summary(model, per_rec, fps=None)
    return 0


def _add_fit_options(parser, iters: int, ar_iters: int) -> None:
    parser.add_argument("--iters", type=int, default=iters, help="full-model Gibbs sweeps")
    parser.add_argument("--ar-iters", type=int, default=ar_iters, help="AR-only sweeps before the full model")
    parser.add_argument("--kappa", type=float, default=1e4, help="stickiness of the full model")
    parser.add_argument("--latent-dim", type=int, default=None, help="default: 90%% of variance, at most 10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show progress bars")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpms_estimators", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fit KeypointSLDS to simulated mouse-like recordings, save results")
    demo.add_argument("--recordings", type=int, default=4)
    demo.add_argument("--frames", type=int, default=3000)
    demo.add_argument("--out", default="kpms_demo_results.nc", help="netCDF results file")
    _add_fit_options(demo, iters=100, ar_iters=50)
    demo.set_defaults(func=_demo)

    fit = sub.add_parser("fit", help="fit KeypointSLDS to pose files (DeepLabCut, SLEAP, JABS), save results")
    fit.add_argument("paths", nargs="+", help="pose files, folders or glob patterns")
    fit.add_argument("--out", default="results.nc", help="netCDF results file (default: results.nc)")
    fit.add_argument("--source-software", default=None, help="DeepLabCut, SLEAP or JABS (default: detect)")
    fit.add_argument("--fps", type=float, default=None, help="frame rate, for durations in ms")
    fit.add_argument("--keypoints", nargs="+", default=None, help="keypoints to use (default: all)")
    fit.add_argument("--anterior", nargs="+", default=None, help="front keypoints (default: the first)")
    fit.add_argument("--posterior", nargs="+", default=None, help="back keypoints (default: the last)")
    _add_fit_options(fit, iters=500, ar_iters=50)
    fit.set_defaults(func=_fit)

    arhmm = sub.add_parser("demo-arhmm", help="fit an ARHMM to simulated data and print a summary")
    arhmm.add_argument("--recordings", type=int, default=5)
    arhmm.add_argument("--frames", type=int, default=2000)
    arhmm.add_argument("--iters", type=int, default=50)
    arhmm.add_argument("--seed", type=int, default=0)
    arhmm.add_argument("--progress", action="store_true")
    arhmm.set_defaults(func=_demo_arhmm)

    args = parser.parse_args(argv)
    return args.func(args)
