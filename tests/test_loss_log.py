"""trainer.loss_log: the per-step CSV, its cut-back on resume, and the loss-curve PNG drawn from it."""

import numpy as np
import pytest
from PIL import Image

from trainer.loss_log import (append_loss, loss_log_path, read_loss_log, smooth, smoothing_weight, truncate_loss_log,
                              write_loss_curve)


def test_append_then_read_round_trips_values(tmp_path):
    for step, loss in ((1, 0.5), (2, 0.25), (3, 0.125)):
        append_loss(tmp_path, step, loss, 1e-4 * step)
    assert read_loss_log(loss_log_path(tmp_path)) == [(1, 0.5, 1e-4 * 1), (2, 0.25, 1e-4 * 2), (3, 0.125, 1e-4 * 3)]
    assert loss_log_path(tmp_path).read_text().splitlines()[0] == "step,loss,lr"


def test_truncate_keeps_steps_up_to_the_checkpoint(tmp_path):
    for step in range(1, 7):
        append_loss(tmp_path, step, float(step), 0.1)
    truncate_loss_log(tmp_path, 4)
    append_loss(tmp_path, 5, 50.0, 0.1)
    assert [(s, loss) for s, loss, _ in read_loss_log(loss_log_path(tmp_path))] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]


def test_fresh_run_starts_an_empty_log_and_missing_log_is_fine(tmp_path):
    truncate_loss_log(tmp_path, 0)
    assert not loss_log_path(tmp_path).exists()
    append_loss(tmp_path, 1, 1.0, 0.1)
    truncate_loss_log(tmp_path, 0)
    assert read_loss_log(loss_log_path(tmp_path)) == []


def test_line_cut_short_by_a_crash_is_skipped(tmp_path):
    append_loss(tmp_path, 1, 1.0, 0.1)
    with open(loss_log_path(tmp_path), "a") as handle:
        handle.write("2,0.5")
    assert read_loss_log(loss_log_path(tmp_path)) == [(1, 1.0, 0.1)]


# --- The loss curve (smoothing and the PNG).

def test_smooth_is_a_bias_corrected_moving_average():
    # weight 0.5: the running sums are 0.5*v1, 0.25*v1 + 0.5*v2, ... divided by 1 - 0.5**n.
    assert smooth([4.0, 0.0, 8.0], 0.5) == pytest.approx([4.0, 4.0 * 0.25 / 0.75, (0.5 + 4.0) / 0.875])
    assert smooth([3.0] * 50, 0.95) == pytest.approx([3.0] * 50)  # no pull towards 0 at the start
    assert smooth([1.0, 5.0, 2.0], 0.0) == [1.0, 5.0, 2.0]
    with pytest.raises(ValueError):
        smooth([1.0], 1.0)


def test_smoothing_span_grows_with_the_run_but_never_below_ten_steps():
    assert smoothing_weight(5) == pytest.approx(0.9)
    assert smoothing_weight(500) == pytest.approx(0.9)
    assert 1 / (1 - smoothing_weight(3500)) == pytest.approx(70)


def test_loss_curve_png_is_written_atomically_from_the_log(tmp_path):
    assert write_loss_curve(tmp_path) is None  # nothing logged, nothing drawn
    for step in range(1, 41):
        append_loss(tmp_path, step, 1.0 / step, 1e-4)
    path = write_loss_curve(tmp_path)
    assert path == tmp_path / "loss_curve.png"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 450)
        # Both lines are drawn in blue: many pixels are clearly bluish, not only axes and text.
        pixels = np.asarray(image.convert("RGB")).astype(int)
        assert ((pixels[..., 2] - pixels[..., 0]) > 60).sum() > 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_curve.png", "loss_log.csv"]


def test_loss_curve_handles_zero_and_negative_losses_on_a_linear_axis(tmp_path):
    for step, loss in enumerate([0.5, 0.0, -0.1], start=1):
        append_loss(tmp_path, step, loss, 0.1)
    with Image.open(write_loss_curve(tmp_path)) as image:
        assert image.size == (800, 450)
