"""trainer.loss_log: the per-step CSV that the loss curve is drawn from, and its cut-back on resume."""

from trainer.loss_log import append_loss, loss_log_path, read_loss_log, truncate_loss_log


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
