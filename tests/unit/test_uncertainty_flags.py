"""The per-frame statistics that flag a frame (largest and RMS per-atom force std) and the
thresholds fitted from them: one helper serves the fit, the recipes' watch and the benchmarks."""

from __future__ import annotations

import numpy as np
import pytest

from est_calc.training.uncertainty import FLAG_QUANTILE, flag_thresholds
from est_calc.uncertainty import frame_statistics


def test_frame_statistics_of_several_frames_one_frame_and_empty_frames():
    values = np.array([3.0, 4.0, 1.0, 1.0, 1.0, 5.0])
    frame = np.array([0, 0, 1, 1, 1, 3])                  # frame 2 has no atoms
    largest, rms = frame_statistics(values, frame, n_frames=5)
    np.testing.assert_allclose(largest, [4.0, 1.0, 0.0, 5.0, 0.0])
    np.testing.assert_allclose(rms, [np.sqrt(12.5), 1.0, 0.0, 5.0, 0.0])
    (one_max,), (one_rms,) = frame_statistics(values[:2])
    assert one_max == 4.0 and one_rms == pytest.approx(np.sqrt(12.5))
    assert frame_statistics(np.zeros(0)) == (np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="6 stds but 5 frame indices"):
        frame_statistics(values, frame[:5])


def test_flag_thresholds_leave_the_quantile_of_frames_with_atoms_under():
    rng = np.random.default_rng(0)
    sizes = rng.integers(3, 30, size=200)
    frame = np.repeat(np.arange(200), sizes)
    std = rng.lognormal(-3.0, 0.5, size=frame.size)
    frame_with_gap = np.where(frame >= 100, frame + 1, frame)      # frame 100 has no atoms
    th = flag_thresholds(std, frame_with_gap, n_frames=202)        # and neither has frame 201
    largest = np.array([std[frame == k].max() for k in range(200)])
    rms = np.array([np.sqrt(np.mean(std[frame == k] ** 2)) for k in range(200)])
    assert th == {"max": pytest.approx(np.quantile(largest, FLAG_QUANTILE)),
                  "rms": pytest.approx(np.quantile(rms, FLAG_QUANTILE))}
    assert np.mean(largest > th["max"]) == pytest.approx(1 - FLAG_QUANTILE, abs=0.01)
    with pytest.raises(ValueError, match="at least one frame with atoms"):
        flag_thresholds(np.zeros(0), np.zeros(0, dtype=int), n_frames=3)
