"""bench/bench_scale.py: the per-row time target, net of the start-up baseline (no stage is run here)."""

import pytest

from bench.bench_scale import main, net_per_row, targets
from utils.cli import UsageError


def stage_results(seconds_of) -> dict:
    """Every size's figures of one timed stage (create), its seconds given by seconds_of(rows)."""
    return {rows: {"create": {"seconds": seconds_of(rows), "rss_mib": 100.0, "others_cores": 0.0}}
            for rows in (1000, 10000, 100000)}


def create_line(lines: list) -> str:
    """The create stage's seconds-per-row target line."""
    return next(line for line in lines if line.strip().startswith("create: seconds per row"))


def test_a_fixed_start_up_with_linear_cost_passes_though_the_raw_spread_is_wide():
    """5 s of start-up plus 1 ms a row: seconds per row fall 5.7x from 1k to 100k rows, which is no growth."""
    linear = stage_results(lambda rows: 5.0 + rows / 1000)
    baseline = (10, {"create": {"seconds": 5.0 + 10 / 1000}})
    assert net_per_row(linear, baseline, "create") == pytest.approx([0.001] * 3)
    line = create_line(targets(linear, baseline=baseline))
    assert "grow 1.00x, per added row 1.00x (target <= 1.3x): PASS" in line and "raw spread 5.71x" in line
    assert "net of 10-row start-up spread 1.00x" in line


def test_a_cost_that_grows_faster_than_the_rows_fails():
    """Quadratic cost: seconds per row rise with the rows."""
    quadratic = stage_results(lambda rows: 5.0 + (rows / 1000) ** 2)
    assert "FAIL" in create_line(targets(quadratic))


def test_a_slope_that_rises_in_the_last_interval_fails_even_when_start_up_hides_it_per_row():
    """Linear to 10k rows, then 1.5 ms instead of 1 ms per added row: seconds per row hardly rise (start-up), the
    slope does."""
    steeper = stage_results(lambda rows: 5.0 + rows / 1000 if rows <= 10000 else 15.0 + (rows - 10000) * 0.0015)
    line = create_line(targets(steeper))
    assert "per added row 1.50x" in line and "FAIL" in line


def test_start_up_jitter_in_a_stage_that_hardly_depends_on_the_rows_is_not_judged_as_a_slope():
    """create.py --merge-like: 0.40 / 0.38 / 0.50 s at 1k / 10k / 100k rows (a negative first slope); the last
    interval adds 0.12 s, under MEASURABLE_S."""
    seconds = {1000: 0.40, 10000: 0.38, 100000: 0.50}
    line = create_line(targets(stage_results(seconds.get)))
    assert "not judged" in line and "PASS" in line


@pytest.mark.parametrize("rows", ["-1", "1000"])
def test_a_baseline_not_below_the_smallest_size_is_a_usage_error(rows, tmp_path):
    """--baseline_rows must be under the smallest --sizes (a baseline as large measures no start-up)."""
    with pytest.raises(UsageError, match=f"--baseline_rows .* got {rows}"):
        main(["--sizes", "1000", "2000", "--baseline_rows", rows, "--work_dir", str(tmp_path / "w")])


def test_a_jump_in_seconds_per_row_between_the_first_sizes_fails_though_the_slopes_agree():
    """1 / 100 / 1,000 s at 1k / 10k / 100k rows: slopes 0.011 and 0.010 s a row agree, seconds per row rise 10x."""
    seconds = {1000: 1.0, 10000: 100.0, 100000: 1000.0}
    line = create_line(targets(stage_results(seconds.get)))
    assert "grow 10.00x" in line and "FAIL" in line
