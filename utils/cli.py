"""Command-line plumbing shared by the scripts: one-line usage errors with exit code 2."""

import argparse
import math
import os
import sys
import time
from typing import Callable, NoReturn, Optional, Sequence

USAGE_EXIT_CODE = 2
# Where launchers put a process's global rank: torchrun and `accelerate launch` set RANK, MPI launchers their own.
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
# How long a process other than rank 0 waits before reporting a usage error itself (see exit_usage_error).
OTHER_RANKS_WAIT_S = 5.0


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2, no traceback."""


def process_rank() -> int:
    """This process's global rank as its launcher set it, 0 when it was not launched (nothing is initialised)."""
    for name in RANK_VARIABLES:
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return 0


def exit_usage_error(line: str) -> NoReturn:
    """Write the one-line usage error and exit 2; under several processes, rank 0 writes it.

    Every process checks the same command line and data, so each finds the same mistake. The others wait first:
    torchrun and `accelerate launch` stop every process once one has failed, so when rank 0 has written the line
    and exited they are stopped before writing it again; a launcher that does not, or a rank 0 that has not got
    there by then, still gets the line from them.
    """
    if process_rank() != 0:
        time.sleep(OTHER_RANKS_WAIT_S)
    sys.stderr.write(f"{line}\n")
    sys.exit(USAGE_EXIT_CODE)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Append "(default: X)" to a flag's help when it has a real default the help does not already state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a single line naming it, and shows every default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        exit_usage_error(f"{self.prog}: error: {message}")


def check_at_least(flag: str, value: Optional[int], minimum: int) -> None:
    """A usage error naming flag unless value is None or >= minimum."""
    if value is not None and value < minimum:
        raise UsageError(f"{flag} {value} must be at least {minimum}")


def check_finite(flag: str, value: float) -> None:
    """A usage error naming flag when value is nan or infinite (argparse's float() accepts both)."""
    if not math.isfinite(value):
        raise UsageError(f"{flag} {value} must be a finite number")


def run_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> None:
    """Run a script's main(); turn UsageError into one stderr line and exit code 2."""
    try:
        code = main(argv)
    except UsageError as err:
        exit_usage_error(f"error: {err}")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    sys.exit(code or 0)
