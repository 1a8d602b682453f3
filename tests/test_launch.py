"""utils/launch.py: accelerate's launcher in-process; a failed process's exit code and message, nothing more."""

import signal
import subprocess
import sys
from pathlib import Path

from utils.launch import exit_code_of

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "utils" / "launch.py"
ONE_MACHINE = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# Every rank exits with the code it is given; rank 0 says so first. Its checks refuse the argument "bad"; "late" is
# a mistake only the launched processes see (every one of them raises it, rank 0 last).
CHILD = '''import os, sys, time
sys.path.insert(0, {repo!r})
from utils.cli import UsageError, run_main

def check_command_line(argv):
    if argv[:1] == ["bad"]:
        raise UsageError("bad is not a code")

def main(argv):
    if sys.argv[1] == "late":
        if os.environ["RANK"] == "0":
            time.sleep(0.5)  # rank 1 gets there first, and the launcher stops rank 0 once rank 1 has exited
        raise UsageError("late is seen by rank " + os.environ["RANK"])
    if os.environ.get("RANK", "0") == "0":
        sys.stderr.write("rank 0 stops\\n")
    return int(sys.argv[1])

if __name__ == "__main__":
    run_main(main)
'''.format(repo=str(REPO))


def launch(tmp_path, *args) -> subprocess.CompletedProcess:
    """python utils/launch.py ARGS with the child script above, from a foreign cwd."""
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    return subprocess.run([sys.executable, str(LAUNCH), *args[:-1], str(child), args[-1]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_exit_codes_pass_through_and_signals_become_128_plus(capsys):
    assert [exit_code_of(code) for code in (0, 1, 2, 3)] == [0, 1, 2, 3]
    assert exit_code_of(-signal.SIGKILL) == 128 + signal.SIGKILL
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: the training process was killed by SIGKILL (often the kernel's out-of-memory killer)"]


def test_two_processes_fail_with_the_childs_code_and_no_launcher_report(tmp_path):
    """torch's elastic launcher (2 processes): its ChildFailedError report is gone, the child's code stays."""
    done = launch(tmp_path, "--multi_gpu", "--num_processes", "2", *ONE_MACHINE, "3")
    assert done.returncode == 3, done.stderr[-3000:]
    assert done.stderr.strip() == "rank 0 stops", done.stderr[-3000:]


def test_script_checks_run_once_before_any_process_starts(tmp_path):
    """check_command_line's UsageError: one line, exit 2, the script never started."""
    done = launch(tmp_path, "--multi_gpu", "--num_processes", "2", *ONE_MACHINE, "bad")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == "error: bad is not a code", done.stderr[-3000:]


def test_a_usage_error_every_process_sees_prints_once(tmp_path):
    """Raised in both launched processes after the checks, rank 1 first: rank 0's one line, exit 2."""
    done = launch(tmp_path, "--multi_gpu", "--num_processes", "2", *ONE_MACHINE, "late")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == "error: late is seen by rank 0", done.stderr[-3000:]
