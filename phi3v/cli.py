"""What every command-line entry point shares: one-line errors and range-checked argument types.

    with cli.errors("train.py"):
        main(config)

turns any exception into the one line `train.py: error: <message>` on stderr and exit status 1:
the library raises ValueError / OSError with messages that name the file, field or value at fault,
so the traceback adds nothing for a user. Other exceptions are unexpected; their line starts with
the exception type. With PHI3V_DEBUG=1 the exception propagates with its full traceback.
`ArgumentParser` reports bad arguments in one line too (no usage dump), exit status 2.
Only entry points use this module, in their `__main__` blocks (the rest of the library never prints).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
from pathlib import Path

DEBUG_ENV = "PHI3V_DEBUG"
EXPECTED = (ValueError, OSError)     # the library's errors (FileNotFoundError, PermissionError, ... included)


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def program_name() -> str:
    """`convert.ucf101` for `python -m convert.ucf101`, else the script's file name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name else Path(sys.argv[0]).name


def _unwrap_worker(e: BaseException, text: str) -> str:
    """The original message of an exception re-raised by a DataLoader worker.

    torch re-raises a worker's exception in the main process as the same type, with the message
    "Caught ValueError in DataLoader worker process 0.\\nOriginal Traceback ...\\nValueError: <msg>".
    """
    lines = text.splitlines()
    if not (lines and lines[0].startswith("Caught ") and "Original Traceback" in text):
        return text
    name = type(e).__name__
    for i in range(len(lines) - 1, 0, -1):
        head, sep, rest = lines[i].partition(": ")
        if sep and head.rpartition(".")[2] == name:
            return "\n".join([rest] + lines[i + 1:])
    return text


def message(e: BaseException) -> str:
    """One line saying what went wrong (worker wrappers removed, line breaks joined)."""
    text = str(e) if not isinstance(e, KeyError) else " ".join(map(str, e.args))
    text = _unwrap_worker(e, text)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if not isinstance(e, EXPECTED):
        text = f"{type(e).__name__}: {text} (set {DEBUG_ENV}=1 for the traceback)"
    return text or type(e).__name__


@contextlib.contextmanager
def errors(program: str, status: int = 1):
    """An exception inside becomes the line `<program>: error: <message>` on stderr and
    `SystemExit(status)`; with PHI3V_DEBUG=1 it propagates (full traceback)."""
    try:
        yield
    except Exception as e:
        if debug():
            raise
        _close_progress_bars()
        sys.stderr.write(f"{program}: error: {message(e)}\n")
        raise SystemExit(status) from None


def _close_progress_bars() -> None:
    """Close the open tqdm bars, so the error line starts a line of its own (not after a bar)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors `<prog>: error: <message>` (exit 2), no usage dump, and
    negative numbers in any spelling taken as values (`--learning_rate -1e-4` reaches the range
    check instead of failing as an unknown option)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.I)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------------------------------
# argparse types: each checks its range and names the accepted values in its error


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value:g}")
    return value


def probability(text: str) -> float:
    """A value in (0, 1] (nucleus sampling's top_p)."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value
