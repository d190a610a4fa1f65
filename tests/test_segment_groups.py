"""Windows of segments sampled side by side on the CPU's cores (``_estimators._groups``)."""

from __future__ import annotations

import numpy as np
import pytest

from kpms_estimators import AlloKeypointSLDS, KeypointSLDS
from kpms_estimators._estimators import _groups
from kpms_estimators.datasets import simulate_keypoints


@pytest.mark.parametrize("num_segments", [1, 2, 3, 4, 5, 7, 20])
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_windows_cover_the_segments_in_equal_windows(num_segments, threads):
    spans = _groups.windows(num_segments, threads)
    sizes = {size for _, size in spans}
    assert len(sizes) == 1  # one compiled program serves every window
    starts = [start for start, _ in spans]
    assert starts == sorted(set(starts)) and starts[0] == 0
    assert len(spans) <= min(threads, num_segments)  # never more windows than threads or segments
    covered = np.zeros(num_segments, int)
    for start, size in spans:
        assert 0 <= start and start + size <= num_segments
        covered[start:start + size] += 1
    assert covered.min() == 1
    # the windows are as small as the thread count allows; only the last may overlap
    assert next(iter(sizes)) == -(-num_segments // min(threads, num_segments))
    assert covered.max() <= 2


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("num_frames,budget", [(10_030, 50_000), (3_030, 10_000), (160, 160), (5_000, 1_000)])
def test_windows_hold_at_most_the_frame_budget(threads, num_frames, budget):
    """With a frame budget: equal windows of at most ``budget`` frames (at least one segment), and
    of all sizes within the budget the one whose busiest lane (windows dealt in turn) draws fewest."""
    for num_segments in range(1, 26):
        spans = _groups.windows(num_segments, threads, num_frames, window_frames=budget)
        (size,) = {size for _, size in spans}
        assert size == 1 or size * num_frames <= budget
        covered = np.zeros(num_segments, int)
        for start, n in spans:
            covered[start:start + n] += 1
        assert covered.min() == 1 and covered.max() <= 2
        lanes = min(threads, num_segments)
        busiest = -(-len(spans) // lanes) * size
        for other in range(1, num_segments + 1):
            if other == 1 or other * num_frames <= budget:
                assert busiest <= -(-(-(-num_segments // other)) // lanes) * other
    # the benchmark's 10 x 18000 frames: 20 segments of 10 030 in 4 windows of 5, 2 per core
    assert _groups.windows(20, 2, 10_030, window_frames=100_000) == [(5 * i, 5) for i in range(4)]
    assert _groups.windows(20, 2, 10_030, window_frames=50_000) == [(2 * i, 2) for i in range(10)]
    assert _groups.windows(20, 1, 10_030, window_frames=50_000) == [(0, 20)]  # one thread: one program


def test_window_frames_setting(monkeypatch):
    monkeypatch.setenv("KPMS_WINDOW_FRAMES", "20000")
    assert _groups.window_frame_budget() == 20_000
    assert _groups.segment_windows((20, 10_030))[0][1] == 1 or _groups.segment_threads() == 1
    for value in ("0", "many"):
        monkeypatch.setenv("KPMS_WINDOW_FRAMES", value)
        with pytest.raises(ValueError, match="KPMS_WINDOW_FRAMES must be a positive integer"):
            _groups.window_frame_budget()


def test_assemble_drops_the_overlap():
    rows = np.arange(5)
    spans = _groups.windows(5, 2)  # (0, 3), (2, 3)
    assert spans == [(0, 3), (2, 3)]
    pieces = [rows[s:s + n] for s, n in spans]
    np.testing.assert_array_equal(_groups.assemble(pieces, spans), rows)


def test_owned_rows_cover_each_row_once():
    for num_segments, threads in [(5, 2), (7, 3), (20, 8), (4, 2), (1, 2)]:
        spans = _groups.windows(num_segments, threads)
        owned = _groups.owned_rows(spans)
        covered = np.zeros(num_segments, int)
        for (start, size), (first, offset) in zip(spans, owned):
            assert first == start + offset and 0 <= offset < size
            covered[first:start + size] += 1
        np.testing.assert_array_equal(covered, 1)


def test_rows_windows_follow_their_own_budget(monkeypatch):
    """The forward-backward rows run in windows of at most ``ROWS_WINDOW_FRAMES`` frames, or of
    ``KPMS_WINDOW_FRAMES`` where that is smaller (10 x 18000 frames: 20 segments of 10 030)."""
    monkeypatch.setenv("KPMS_SEGMENT_THREADS", "2")
    monkeypatch.delenv("KPMS_WINDOW_FRAMES", raising=False)
    assert _groups.segment_windows((20, 10_030)) == [(0, 10), (10, 10)]  # the draws: one window per lane
    assert _groups.segment_windows((20, 10_030), _groups.ROWS_WINDOW_FRAMES) == [(5 * i, 5) for i in range(4)]
    monkeypatch.setenv("KPMS_WINDOW_FRAMES", "25000")
    assert _groups.segment_windows((20, 10_030), _groups.ROWS_WINDOW_FRAMES) == [(2 * i, 2) for i in range(10)]


@pytest.mark.parametrize("threads", ["1", "2"])
def test_side_by_side_hands_each_result_to_consume(monkeypatch, threads):
    """``consume(i, result)`` gets every window's result once, in its lane, and the list holds None."""
    import jax
    import jax.numpy as jnp
    from kpms_estimators._estimators._base import compiled

    monkeypatch.setenv("KPMS_SEGMENT_THREADS", threads)
    program = compiled(lambda x, start, size: jax.lax.dynamic_slice_in_dim(x, start, size) * 2.0,
                       static_argnames="size")
    rows = jnp.arange(7.0)
    spans = _groups.windows(7, 3)  # (0, 3), (3, 3), (4, 3): the last overlaps
    seen = {}
    out = _groups.side_by_side(program, spans, rows, consume=lambda i, piece: seen.setdefault(i, np.asarray(piece)))
    assert out == [None] * len(spans) and sorted(seen) == list(range(len(spans)))
    for i, (start, size) in enumerate(spans):
        np.testing.assert_array_equal(seen[i], 2.0 * np.arange(start, start + size))


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_thread_setting_is_named(monkeypatch, value):
    monkeypatch.setenv("KPMS_SEGMENT_THREADS", value)
    with pytest.raises(ValueError, match="KPMS_SEGMENT_THREADS must be a positive integer"):
        _groups.segment_threads()


def test_thread_setting(monkeypatch):
    monkeypatch.setenv("KPMS_SEGMENT_THREADS", "3")
    assert _groups.segment_threads() == 3
    monkeypatch.delenv("KPMS_SEGMENT_THREADS")
    assert 1 <= _groups.segment_threads() <= _groups.MAX_SEGMENT_THREADS
    # joblib workers sharing the cores (docs/design.md): one window
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    assert _groups.segment_threads() == 1
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=2")
    assert _groups.segment_threads() >= 1


@pytest.mark.parametrize("estimator,thread_counts", [(KeypointSLDS, ("1", "2", "3", "2/160")),
                                                     (AlloKeypointSLDS, ("1", "2", "2/160"))])
def test_side_by_side_gives_the_draws_of_one_program(monkeypatch, estimator, thread_counts):
    """Fit and apply with the segments in 1, 2 (overlapping) and 3 windows, and in 3 windows of one
    segment dealt to 2 lanes ("2/160": 160 frames per window at most): the same chain (the windows
    draw with the keys and uniforms their segments get in the whole batch; XLA may round a few
    float64 operations differently for another number of segments, ~1e-15 here), sigmasq
    resampling included (its step runs before the windows); the same syllable marginals and
    score, which are computed per window too."""
    location_aware = estimator is AlloKeypointSLDS
    sim = simulate_keypoints(n_keypoints=5, n_dims=2, n_states=3, n_recordings=3, n_frames=160,
                             location_aware=location_aware, random_state=1)
    runs = {}
    for threads in thread_counts:
        monkeypatch.setenv("KPMS_SEGMENT_THREADS", threads.split("/")[0])
        if "/" in threads:
            monkeypatch.setenv("KPMS_WINDOW_FRAMES", threads.split("/")[1])
            assert _groups.segment_windows((3, 175)) == [(0, 1), (1, 1), (2, 1)]
        else:
            monkeypatch.delenv("KPMS_WINDOW_FRAMES", raising=False)
        model = estimator(n_states=6, latent_dim=2, n_ar_iter=2, n_iter=2, n_apply_iter=2, n_marginal_samples=2,
                          resample_global_noise_scale=True, random_state=0).fit(sim.poses)
        runs[threads] = (model, model.transform(sim.poses), model.predict_proba(sim.poses), model.score(sim.poses))
    model_1, out_1, proba_1, score_1 = runs["1"]
    assert model_1.chain_state_.x.shape[0] == 3  # three segments: windows of 1, and of 2 overlapping
    for threads in thread_counts[1:]:
        model, out, proba, score = runs[threads]
        # forward-backward marginals and predictive log-likelihoods per window (``windowed_rows``)
        np.testing.assert_allclose(score, score_1, rtol=1e-9)
        for rec in proba_1:
            np.testing.assert_allclose(proba[rec]["syllable_proba"].values, proba_1[rec]["syllable_proba"].values,
                                       rtol=1e-9, atol=1e-12)
        close = dict(rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(model.log_likelihood_history_, model_1.log_likelihood_history_, **close)
        np.testing.assert_array_equal(model.chain_state_.z, model_1.chain_state_.z)
        for name in ("x", "h", "v", "s"):
            np.testing.assert_allclose(getattr(model.chain_state_, name), getattr(model_1.chain_state_, name), **close)
        np.testing.assert_allclose(model.chain_state_.params.sigmasq, model_1.chain_state_.params.sigmasq, **close)
        for rec in out_1:
            np.testing.assert_array_equal(out[rec]["syllable"].values, out_1[rec]["syllable"].values)
            for var in ("latent_state", "centroid", "heading"):
                np.testing.assert_allclose(out[rec][var].values, out_1[rec][var].values, **close)
