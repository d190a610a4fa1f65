"""Progress plots of a fit (model spec 6): PNG files drawn with matplotlib's Agg canvas.

``fitting.fit_model(generate_progress_plots=True)`` calls :func:`plot_progress`
at every checkpoint save. Figures are built on :class:`matplotlib.figure.Figure`
with an explicit Agg canvas: no pyplot, no global backend switch, so plotting
never changes the caller's matplotlib state. matplotlib is imported when a plot
is drawn, not when this module is imported.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ._checkpoint import _new_file_mode
from ._summary import run_lengths

__all__ = ["plot_progress", "PLOT_FILES"]

#: The files :func:`plot_progress` writes, by plot.
PLOT_FILES = {
    "frequencies": "syllable_frequencies.png",
    "durations": "syllable_durations.png",
    "median_duration": "median_duration.png",
    "syllable_history": "syllable_history.png",
    "log_likelihood": "log_likelihood.png",
}
#: History series drawn as log-likelihood terms, in this order (spec 6), when present.
LIKELIHOOD_TERMS = ("z", "x", "Y", "s", "v", "hv")
_MIN_FREQUENCY = 1e-3  # syllables rarer than this are left out of the frequency plot (as the reference)
_HISTORY_WINDOW = 600  # frames of the syllable-sequence history


def plot_progress(history, syllables, out_dir, *, iteration=None, syllable_history=None, model_name=None,
                  dpi=80) -> dict[str, Path]:
    """Write the progress plots of a fit as PNG files in ``out_dir`` (created if needed).

    Parameters
    ----------
    history : dict of str -> sequence
        Per-sweep series of the fit (``log_likelihood_terms_`` or a checkpoint's
        history): the log-likelihood terms "z", "x", "Y", "s", "v" present are
        traced, with their sum; "n_used" (syllables used) gets its own panel and
        "stage" (strings, e.g. "ar_only" / "full") shades the stages.
    syllables : sequence of 1D int arrays
        The current syllable of every valid frame, one array per segment or
        recording (runs never cross arrays).
    out_dir : str or PathLike
        Folder of the PNG files (:data:`PLOT_FILES`); existing plots are replaced
        atomically.
    iteration : int, optional
        Completed sweeps of ``syllables`` (default: the length of the history).
    syllable_history : dict of int -> sequence of 1D int arrays, optional
        Syllables at earlier iterations (e.g. the saved snapshots), for the
        median duration over iterations and the syllable-sequence history; the
        current ``syllables`` are added at ``iteration``.
    model_name : str, optional
        Shown in the titles.
    dpi : int, default=80

    Returns
    -------
    dict of str -> Path
        The file written for each plot (keys of :data:`PLOT_FILES`).

    Notes
    -----
    - Frequencies count occurrences (runs), not frames, and show syllables above
      0.1% of runs, sorted by frequency; bars are labelled by the syllable's
      index in the given labels.
    - Durations: run lengths in frames, as a density histogram up to the 95th
      percentile.
    - The syllable-sequence history shows the first 600 frames of the longest
      segment at every iteration (the reference picks a random window).
    """
    history = {str(k): np.asarray(v) for k, v in dict(history or {}).items()}
    current = _as_sequences(syllables, "syllables")
    n_sweeps = max((len(v) for v in history.values()), default=0)
    iteration = n_sweeps if iteration is None else int(iteration)
    snapshots = {int(i): _as_sequences(s, f"syllable_history[{i}]") for i, s in (syllable_history or {}).items()}
    snapshots[iteration] = current
    snapshots = dict(sorted(snapshots.items()))
    title = f"{model_name}: iteration {iteration}" if model_name else f"Iteration {iteration}"

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers = {
        "frequencies": lambda fig: _frequencies(fig, current),
        "durations": lambda fig: _durations(fig, current),
        "median_duration": lambda fig: _median_durations(fig, snapshots),
        "syllable_history": lambda fig: _syllable_history(fig, snapshots),
        "log_likelihood": lambda fig: _log_likelihood(fig, history),
    }
    written = {}
    for name, draw in drawers.items():
        fig = _figure()
        draw(fig)
        fig.suptitle(title)
        written[name] = _save(fig, out_dir / PLOT_FILES[name], dpi)
    return written


# ----------------------------------------------------------------------------- helpers


def _as_sequences(syllables, what) -> list[np.ndarray]:
    if isinstance(syllables, np.ndarray) and syllables.ndim == 1:
        syllables = [syllables]
    sequences = [np.asarray(s) for s in syllables]
    if not sequences or any(s.ndim != 1 or s.dtype.kind not in "iu" for s in sequences):
        raise ValueError(f"{what} must be a non-empty sequence of 1D integer label arrays, one per segment.")
    if sum(s.size for s in sequences) == 0:
        raise ValueError(f"{what} holds no labelled frame.")
    return sequences


def _run_stats(sequences):
    """(label of each run, length of each run) over all sequences."""
    labels, lengths = [], []
    for seq in sequences:
        if seq.size:
            runs = run_lengths(seq)
            labels.append(seq[np.cumsum(runs) - 1])
            lengths.append(runs)
    return np.concatenate(labels), np.concatenate(lengths)


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, dpi) -> Path:
    """Render to a temporary file beside ``path``, then replace it (never a half-written plot)."""
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.chmod(tmp, mode)  # mkstemp's 0600 -> what a plain open() would give
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _frequencies(fig, sequences):
    ax = fig.add_subplot()
    run_labels, _ = _run_stats(sequences)
    ids, counts = np.unique(run_labels, return_counts=True)
    freqs = counts / counts.sum()
    order = np.argsort(-freqs, kind="stable")
    order = order[freqs[order] > _MIN_FREQUENCY]
    ax.bar(np.arange(order.size), freqs[order], color="tab:blue")
    ax.set_xlim(-0.5, max(order.size, 10) - 0.5)
    ax.set_xticks(np.arange(order.size), [str(i) for i in ids[order]],
                  fontsize="small" if order.size <= 30 else "xx-small")
    ax.set_xlabel("syllable (sorted by frequency)")
    ax.set_ylabel("frequency of occurrence")
    ax.set_title("Syllable frequencies", fontsize="medium")


def _durations(fig, sequences):
    ax = fig.add_subplot()
    _, lengths = _run_stats(sequences)
    upper = max(float(np.percentile(lengths, 95)), 2.0)
    ax.hist(lengths, bins=np.linspace(1, upper, 31), density=True, color="tab:blue")
    ax.axvline(np.median(lengths), color="k", linestyle="--", label=f"median {np.median(lengths):g}")
    ax.set_xlabel("syllable duration (frames)")
    ax.set_ylabel("probability density")
    ax.set_title("Syllable durations", fontsize="medium")
    ax.legend(loc="upper right")


def _median_durations(fig, snapshots):
    ax = fig.add_subplot()
    iterations = np.array(list(snapshots))
    medians = np.array([np.median(_run_stats(s)[1]) for s in snapshots.values()])
    ax.plot(iterations, medians, "o-", color="tab:blue")
    ax.set_xlabel("iteration")
    ax.set_ylabel("median duration (frames)")
    ax.set_title("Median syllable duration", fontsize="medium")


def _syllable_history(fig, snapshots):
    ax = fig.add_subplot()
    latest = list(snapshots.values())[-1]
    segment = int(np.argmax([s.size for s in latest]))
    width = min(_HISTORY_WINDOW, max(s[segment].size if segment < len(s) else 0 for s in snapshots.values()))
    rows = np.full((len(snapshots), width), np.nan)
    for row, seqs in enumerate(snapshots.values()):
        if segment < len(seqs):
            seq = seqs[segment][:width]
            rows[row, : seq.size] = seq
    iterations = list(snapshots)
    ax.imshow(rows, aspect="auto", interpolation="nearest", cmap="jet", vmin=0, vmax=max(np.nanmax(rows), 1),
              extent=(-0.5, width - 0.5, len(iterations) - 0.5, -0.5))
    ticks = np.unique(np.linspace(0, len(iterations) - 1, min(len(iterations), 10)).round().astype(int))
    ax.set_yticks(ticks, [str(iterations[t]) for t in ticks])
    ax.set_xlabel(f"frame (segment {segment})")
    ax.set_ylabel("iteration")
    ax.set_title("Syllable sequence history", fontsize="medium")


def _log_likelihood(fig, history):
    terms = [k for k in LIKELIHOOD_TERMS if k in history and len(history[k])]
    panels = terms + (["total"] if len(terms) > 1 else []) + (["n_used"] if "n_used" in history else [])
    if not panels:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no log-likelihood history", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    fig.set_size_inches(6.4, 1.6 * len(panels) + 0.6)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    stages = history.get("stage")
    for ax, name in zip(axes, panels):
        values = sum(history[k].astype(float) for k in terms) if name == "total" else history[name].astype(float)
        sweeps = np.arange(1, len(values) + 1)
        ax.plot(sweeps, values, color="tab:blue", linewidth=1)
        if stages is not None and len(stages) == len(values):
            for start, stop in _spans(np.asarray(stages) == "ar_only"):
                ax.axvspan(start + 0.5, stop + 0.5, color="0.9", zorder=0)
        retried = np.flatnonzero(history.get("nan_retries", np.zeros(0)) > 0)
        if retried.size and len(history["nan_retries"]) == len(values):
            ax.plot(sweeps[retried], values[retried], "x", color="tab:red")
        label = {"total": "total", "n_used": "syllables used"}.get(name, f"log p ({name})")
        ax.set_ylabel(label, fontsize="small")
        ax.tick_params(labelsize="small")
    axes[-1].set_xlabel("sweep (grey: AR-only stage, x: sweep retried after NaN)")
    axes[0].set_title("Log-likelihood terms", fontsize="medium")


def _spans(flags):
    """``(a, b)`` per run of True in ``flags``: the run covers sweeps a + 1 .. b (1-based)."""
    padded = np.concatenate([[False], flags, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
