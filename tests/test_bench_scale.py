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


def test_a_fixed_start_up_fails_the_raw_spread_but_not_the_net_one():
    """5 s of start-up plus 1 ms a row: raw seconds per row spread 5.7x, net of a 10-row baseline flat."""
    linear = stage_results(lambda rows: 5.0 + rows / 1000)
    baseline = (10, {"create": {"seconds": 5.0 + 10 / 1000}})
    assert net_per_row(linear, baseline, "create") == pytest.approx([0.001] * 3)
    assert "FAIL" in create_line(targets(linear))
    line = create_line(targets(linear, baseline=baseline))
    assert "net of 10-row start-up spread 1.00x (target <= 1.3x): PASS" in line and "raw spread 5.71x" in line


def test_a_cost_that_grows_faster_than_the_rows_still_fails_net_of_start_up():
    """Quadratic cost: the baseline does not hide it."""
    quadratic = stage_results(lambda rows: 5.0 + (rows / 1000) ** 2)
    baseline = (10, {"create": {"seconds": 5.0 + (10 / 1000) ** 2}})
    assert "FAIL" in create_line(targets(quadratic, baseline=baseline))


@pytest.mark.parametrize("rows", ["-1", "1000"])
def test_a_baseline_not_below_the_smallest_size_is_a_usage_error(rows, tmp_path):
    """--baseline_rows must be under the smallest --sizes (a baseline as large measures no start-up)."""
    with pytest.raises(UsageError, match=f"--baseline_rows .* got {rows}"):
        main(["--sizes", "1000", "2000", "--baseline_rows", rows, "--work_dir", str(tmp_path / "w")])
