"""Figures: the share proportions of MPPS Figures 6/7 and the PNG files."""

import numpy as np
import pytest

from tf_mtl import plots


def test_share_proportions_hand_values():
    # Channels 0, 1 owned by task 0; channel 2 by task 1; channel 3 by task 2.
    phi = np.array([
        [0.99, 0.90, 0.20, 0.10],
        [0.30, 0.20, 0.95, 0.60],
        [0.10, 0.60, 0.40, 0.97],
    ])
    got = plots.share_proportions(phi)
    assert got[0, 1, 2] == pytest.approx(np.mean([0.3 / 0.4, 0.2 / 0.8]))
    assert got[1, 0, 2] == pytest.approx(0.2 / 0.6)
    assert got[2, 0, 1] == pytest.approx(0.1 / 0.7)
    assert set(got) == {(0, 1, 2), (1, 0, 2), (2, 0, 1)}


def _records(num_tasks, epochs=3, channels=6):
    rng = np.random.default_rng(0)
    return [{
        "epoch": e, "ec": 0.9 - 0.2 * e, "ec_target": 0.99 - 0.3 * e,
        "ec_mask_0": 0.9 - 0.2 * e,
        "mask_probs": {"mask_0": rng.uniform(0.01, 0.99, (num_tasks, channels)).tolist()},
    } for e in range(epochs)]


def test_figures_are_png_files(tmp_path):
    plots.plot_capacity(_records(3), tmp_path / "ec.png")
    plots.plot_share_proportions(_records(3), ["a", "b", "c"], tmp_path / "share.png")
    for name in ("ec.png", "share.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_share_proportions_need_three_tasks(tmp_path):
    with pytest.raises(ValueError, match=">= 3 tasks"):
        plots.plot_share_proportions(_records(2), ["a", "b"], tmp_path / "x.png")
