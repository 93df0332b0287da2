"""argparse value types with bounds, shared by every command: a bad number is refused on the
command line with one clear line ("argument --chunk: must be 1..64, got 0"), before anything is
loaded, instead of a traceback (or a terabyte allocation) deep inside the model."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from .models.config import MAX_CHUNK, MAX_SEED, MAX_STEPS, MAX_WINDOW


def _span(lo, hi) -> str:
    return f"{lo} or more" if hi is None else f"{lo}..{hi}"


def int_in(lo: int, hi: int | None = None):
    """A whole number in [lo, hi] (hi None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"must be {_span(lo, hi)}, got {n}")
        return n

    parse.__name__ = "whole number"  # argparse names the type in its own messages
    return parse


def float_in(lo: float, hi: float | None = None, *, above: bool = False):
    """A finite number >= lo (> lo when `above`), and <= hi."""

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = x > lo if above else x >= lo
        if not math.isfinite(x) or not low_ok or (hi is not None and x > hi):
            low = f"more than {lo:g}" if above else f"{lo:g} or more"
            rule = low if hi is None else f"{low} and at most {hi:g}"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return x

    parse.__name__ = "number"
    return parse


chunk = int_in(1, MAX_CHUNK)  # frames per generator call
seed = int_in(0, MAX_SEED)  # numpy's generators take non-negative seeds
steps = int_in(1, MAX_STEPS)
window = int_in(1, MAX_WINDOW)


def report_file(text: str) -> Path:
    """A file a command writes its report to at the end: checked now, so that a long run
    (eval, soak, bench) cannot end in a traceback that loses what it measured. Missing folders
    are made when it is written."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name in it")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} is not a writable folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: the file is read-only")
    return path


def write_report(path: Path, text: str) -> None:
    """Write a report file (its folders made); a failure is one line, not a traceback."""
    from .errors import InputError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
