"""Command-line plumbing shared by the scripts: one-line usage errors with exit code 2."""

import argparse
import math
import sys
from typing import Callable, Optional, Sequence

USAGE_EXIT_CODE = 2


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2, no traceback."""


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
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(USAGE_EXIT_CODE)


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
        sys.stderr.write(f"error: {err}\n")
        sys.exit(USAGE_EXIT_CODE)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    sys.exit(code or 0)
