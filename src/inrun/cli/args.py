"""The command line's own parsing: argument types, one-line errors, exit codes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3
MAX_LINE = 400  # characters of an error line: a message quoting a long input is cut, not dumped


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {bounded(repr(text), 60)}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    if value > 2**31:
        raise argparse.ArgumentTypeError(f"{value} is too large")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message, then a hint naming ``--help``."""

    def error(self, message: str) -> Any:
        print_error(message, f"see `{self.prog} --help`")
        raise SystemExit(EXIT_USAGE)


def bounded(text: str, limit: int = MAX_LINE) -> str:
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    return flat[: limit - 1] + f"… ({len(flat) - limit + 1} more characters)"


def print_error(message: str, hint: str | None = None, label: str = "error") -> None:
    """One line on stderr (plus an optional hint line), plain text: nothing is wrapped."""
    sys.stderr.write(f"{label}: {bounded(message)}\n")
    if hint:
        sys.stderr.write(f"hint: {bounded(hint)}\n")
    sys.stderr.flush()
