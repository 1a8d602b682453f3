"""scripts/gpu_check.sh in its CPU smoke mode: the table, its file in $OUT, CUDA-only rows skipped.

Only rows that train nothing run here: the full smoke mode trains a dozen times and takes minutes."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cuda_only_rows_skip_on_cpu_and_the_table_goes_to_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # PYTHON: this interpreter, not whichever python3 is first on PATH (a pytest run without the venv activated
    # failed here with "a required package is missing")
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "GPU_CHECK_ROWS": "skipped_step_holds_lr,sd15_16gb", "PYTHON": sys.executable}
    done = subprocess.run(["scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "gpu_check.md").read_text()
    assert table in done.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and "SKIP" in line]
    assert len(rows) == 2 and all("needs CUDA" in line for line in rows), table
    assert "0 passed, 0 failed, 2 skipped" in table
    assert (out / "gpu_check.log").is_file()
