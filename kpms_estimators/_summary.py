"""Plain-text summaries of fitted syllable sequences."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def run_lengths(labels: np.ndarray) -> np.ndarray:
    """Lengths of the runs of equal consecutive values in a 1D label sequence."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return np.zeros(0, dtype=int)
    change = np.flatnonzero(np.diff(labels) != 0) + 1
    edges = np.concatenate([[0], change, [labels.size]])
    return np.diff(edges)


def syllable_durations(sequences) -> np.ndarray:
    """Run lengths over several recordings' label sequences (runs never cross recordings)."""
    runs = [run_lengths(seq) for seq in sequences]
    return np.concatenate(runs) if runs else np.zeros(0, dtype=int)


def matched_accuracy(true, pred) -> float:
    """One-to-one (Hungarian) matched accuracy between two labelings of the same frames."""
    true_ids, true_idx = np.unique(np.asarray(true), return_inverse=True)
    pred_ids, pred_idx = np.unique(np.asarray(pred), return_inverse=True)
    confusion = np.zeros((pred_ids.size, true_ids.size))
    np.add.at(confusion, (pred_idx, true_idx), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return float(confusion[rows, cols].sum() / len(true_idx))
