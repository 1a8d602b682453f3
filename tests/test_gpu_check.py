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


def load_gpu_check():
    """scripts/gpu_check.py as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_selected_row_brings_the_rows_it_needs_in_table_order():
    """GPU_CHECK_ROWS=ema_shipped also runs the recipe and its resume, whose output it reads, before it."""
    check = load_gpu_check()
    keys = [entry.key for entry in check.selected_rows({"ema_shipped"})]
    assert keys == ["recipe", "recipe_resume", "ema_shipped"]
    assert len(check.selected_rows(set())) == len(check.ROWS)


def test_rows_run_side_by_side_after_their_needs_and_alone_rows_first(tmp_path):
    """Independent rows overlap (each waits for the other to start), a row starts only after the rows it needs,
    one whose need failed is reported without running, and an `alone` row runs before any other starts."""
    import threading

    check = load_gpu_check()
    started, order = {"a": threading.Event(), "b": threading.Event()}, []

    def side_by_side(me, other):
        def run(_):
            order.append(me)
            started[me].set()
            assert started[other].wait(timeout=10), f"{other} did not run beside {me}"
        run.__name__ = me
        return run

    def named(name, body):
        body.__name__ = name
        return body

    def fails(_):
        raise check.CheckFailed("broken")

    rows = [check.Row("probe", False, named("probe", lambda _: order.append("probe")), alone=True),
            check.Row("a", False, side_by_side("a", "b")), check.Row("b", False, side_by_side("b", "a")),
            check.Row("after", False, named("after", lambda _: order.append("after")), needs=("a", "b")),
            check.Row("bad", False, named("bad", fails)),
            check.Row("needs bad", False, named("needs_bad", lambda _: order.append("needs_bad")), needs=("bad",))]
    with open(tmp_path / "log", "w") as log:
        results = {name: result for name, result, *_ in check.run_rows(check.Check(tmp_path, "cpu", log), rows, 2)}
    assert results == {"probe": "PASS", "a": "PASS", "b": "PASS", "after": "PASS", "bad": "FAIL",
                       "needs bad": "FAIL"}
    assert order[0] == "probe" and order.index("after") > max(order.index("a"), order.index("b"))
    assert "needs_bad" not in order


def test_top_imports_reads_the_top_level_entries_of_importtime():
    """Only unindented modules count, slowest first, in seconds."""
    check = load_gpu_check()
    output = ("import time: self [us] | cumulative | imported package\n"
              "import time:       100 |     900000 |   torch._C\n"
              "import time:      2000 |    4100000 | torch\n"
              "import time:       300 |    4800000 | diffusers.optimization\n"
              "import time:        10 |        500 | site\n")
    assert check.top_imports(output, 2) == "diffusers.optimization 4.8, torch 4.1"
