"""Progress plots (kpms_estimators.plots): valid, non-trivial PNG files; clear errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from kpms_estimators.plots import PLOT_FILES, plot_progress

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_nontrivial_png(path):
    """A PNG that decodes to an image with more than one colour."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)
    rgb = image[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 10, path  # axes, labels and data, not a blank canvas


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(0)
    return [np.repeat(rng.integers(0, 12, 40), rng.integers(1, 15, 40)) for _ in range(3)]


def test_plot_progress_writes_every_plot(tmp_path, labels):
    rng = np.random.default_rng(1)
    history = {"z": rng.normal(size=8), "x": rng.normal(size=8), "n_used": rng.integers(3, 9, 8),
               "nan_retries": np.array([0, 0, 1, 0, 0, 0, 0, 0]), "stage": np.array(["ar_only"] * 3 + ["full"] * 5)}
    earlier = {4: [seq[::-1] for seq in labels]}
    written = plot_progress(history, labels, tmp_path / "plots", iteration=8, syllable_history=earlier,
                            model_name="m")
    assert set(written) == set(PLOT_FILES)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(PLOT_FILES.values())
    for path in written.values():
        assert_nontrivial_png(path)
    assert "matplotlib.pyplot" not in sys.modules  # no pyplot state, no global backend switch
    # a second call replaces the files (and leaves no temporary file behind)
    plot_progress({}, labels[0], tmp_path / "plots")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(PLOT_FILES.values())


def test_plot_progress_rejects_bad_labels(tmp_path):
    with pytest.raises(ValueError, match="syllables must be a non-empty sequence of 1D integer"):
        plot_progress({}, [np.zeros((3, 2), int)], tmp_path)
    with pytest.raises(ValueError, match="syllables must be a non-empty sequence of 1D integer"):
        plot_progress({}, [np.zeros(3)], tmp_path)
    with pytest.raises(ValueError, match="syllables holds no labelled frame"):
        plot_progress({}, [np.zeros(0, int)], tmp_path)
    with pytest.raises(ValueError, match=r"syllable_history\[2\] must be"):
        plot_progress({}, [np.zeros(3, int)], tmp_path, syllable_history={2: []})
