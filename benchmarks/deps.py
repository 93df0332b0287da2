"""The bench extra (psutil, matplotlib): a missing one is one line naming what to install."""

from __future__ import annotations

import importlib.util

from ..errors import EdgeTalkError

EXTRA = "pip install 'edgetalk[bench]'"


class MissingExtra(EdgeTalkError):
    """An optional dependency this command needs is not installed."""


def have(module: str) -> bool:
    import sys

    if module in sys.modules:  # imported, or blocked with None (as tests and some tools do)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, why: str, extra: str = EXTRA) -> None:
    if not have(module):
        raise MissingExtra(f"{why} needs {module}, which is not installed: {extra}")


def require_bench_extra(plots: bool = False) -> None:
    """psutil always (memory and machine figures); matplotlib only when plots are asked for."""
    require("psutil", "edgetalk bench")
    if plots:
        require("matplotlib", "--plots")


def import_extra(module: str, why: str, extra: str = EXTRA):
    """importlib.import_module, or MissingExtra (one line) when it is not installed."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and module.split(".")[0] != e.name.split(".")[0]:
            raise  # the module is there but broken: its own error says more
        raise MissingExtra(f"{why} needs {module}, which is not installed: {extra}") from None
