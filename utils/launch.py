"""`accelerate launch` run in this process, so a training run that fails ends with its own message and exit code.

accelerate's launcher answers a training process's non-zero exit with a traceback of its own (a CalledProcessError
for one process; torch's elastic ChildFailedError report for several) and exit code 1, after the trainer has already
said what went wrong: a usage error in one line with exit code 2, a diverged run with exit code 1. Here the same
launch runs in-process and its failure becomes the training process's exit code, with nothing added.

Before any process starts, the script's own command-line checks run once, here: when the script defines
check_command_line(argv), a usage error is one line (exit 2) instead of one line per process.

Run: python utils/launch.py [accelerate launch options] SCRIPT [SCRIPT ARGS]   (train.sh does)
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import importlib.util  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from utils.cli import UsageError, run_main  # noqa: E402

CHECK_FUNCTION = "check_command_line"
# torch's elastic agent logs each failed process at ERROR level before raising; the process has said why itself.
ELASTIC_LOGGER = "torch.distributed.elastic"


def run_script_checks(script: str, script_args: Sequence[str]) -> None:
    """Import SCRIPT (not as __main__, so it does not run) and call its check_command_line(argv), if any."""
    path = Path(script)
    if not path.is_file():
        raise UsageError(f"training script '{script}' does not exist")
    spec = importlib.util.spec_from_file_location(f"_launched_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    check = getattr(module, CHECK_FUNCTION, None)
    if check is not None:
        check(list(script_args))


def exit_code_of(returncode: int) -> int:
    """The shell's exit code for a process's return code: a signal N (negative return code) becomes 128 + N."""
    if returncode >= 0:
        return returncode
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    hint = " (often the kernel's out-of-memory killer)" if number == signal.SIGKILL else ""
    sys.stderr.write(f"error: the training process was killed by {name}{hint}\n")
    return 128 + number


def failed_child_code(err: Exception) -> Optional[int]:
    """The exit code of the first failed process in a launcher error, or None when err is no such error."""
    if isinstance(err, subprocess.CalledProcessError):
        return err.returncode
    try:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    except ImportError:  # a torch without the distributed package has no elastic launcher either
        return None
    if isinstance(err, ChildFailedError):
        _, failure = err.get_first_failure()
        return failure.exitcode
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Check the script's command line once, then launch it; return the training process's exit code."""
    try:
        from accelerate.commands.launch import launch_command, launch_command_parser
    except ImportError:
        raise UsageError(f"accelerate is not installed for {sys.executable}: activate the project's virtualenv "
                         "(scripts/setup_env.sh && . .venv/bin/activate)") from None
    args = launch_command_parser().parse_args(argv)
    if not (args.module or args.no_python):  # a script file: its checks can be imported
        run_script_checks(args.training_script, args.training_script_args)
    logging.getLogger(ELASTIC_LOGGER).setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except Exception as err:  # noqa: BLE001 - only a failed training process is turned into its exit code
        code = failed_child_code(err)
        if code is None:
            raise
        return exit_code_of(code)
    return 0


if __name__ == "__main__":
    run_main(main)
