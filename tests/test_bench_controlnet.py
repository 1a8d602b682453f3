"""bench/bench_controlnet.py: the ControlNet rows' command, the results block and its goals (no training here)."""

from pathlib import Path

import pytest

from bench.bench_controlnet import CONTROLNET_FLAGS, controlnet_command, main, report
from bench.bench_train import CONFIGS, RunResult
from utils.cli import UsageError


def result(samples_per_s: float, rss: float) -> RunResult:
    """A finished run's figures."""
    return RunResult(steps_per_s=samples_per_s / 4, samples_per_s=samples_per_s, loop_s=10.0, build_s=None,
                     peak_rss_mib=rss, peak_cuda_gib=None, peak_reserved_gib=None, others_cores=0.0)


def test_command_runs_train_controlnet_in_the_seed_recipe():
    """train_controlnet.py with the seed recipe's flags, less --center_crop, which the ControlNet scripts lack."""
    command = controlnet_command(Path("m"), Path("d"), CONFIGS["tiny"], 3, Path("o"), ["--cache_latents"])
    assert any(part.endswith("train_controlnet.py") for part in command)
    assert "--center_crop" not in command and "--gradient_checkpointing" in command
    assert command[-1] == "--cache_latents" and "--center_crop" not in CONTROLNET_FLAGS


def test_report_judges_speed_and_memory_goals():
    """The ratio is cached over uncached; 3x at no more memory passes, less fails, more memory fails."""
    lines = "\n".join(report("vae_realistic", CONFIGS["vae_realistic"], 2, result(1.0, 900), result(3.5, 800), "",
                             0.3))
    assert "3.50x samples/s (goal >= 3.0x: PASS)" in lines and "(goal: no more: PASS)" in lines
    lines = "\n".join(report("vae_realistic", CONFIGS["vae_realistic"], 2, result(1.0, 900), result(2.0, 950), "",
                             0.3))
    assert "2.00x samples/s (goal >= 3.0x: FAIL)" in lines and "(goal: no more: FAIL)" in lines


def test_report_names_a_failed_run():
    """An OOM or failed run is shown in its cell, not turned into a ratio."""
    lines = report("sd15", CONFIGS["sd15"], 2, "OOM", result(1.0, 1), "", 0.3)
    assert "uncached: OOM" in lines[-1]


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--reference", "/no/such/file.py"]])
def test_usage_errors(argv):
    """Bad steps or a missing reference copy stop before anything is built."""
    with pytest.raises(UsageError):
        main(argv)
