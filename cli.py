"""The `edgetalk` command. Each subcommand lives next to the code it drives and registers itself."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import EdgeTalkError

SUBCOMMANDS = (
    "edgetalk.runtime.cli_run",
    "edgetalk.runtime.cli_live",
    "edgetalk.export.cli",
    "edgetalk.training.cli_eval",
    "edgetalk.benchmarks.cli",
    "edgetalk.benchmarks.soak",
    "edgetalk.runtime_cuda.doctor",
    "edgetalk.serve.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetalk",
        description="Real-time talking heads on the edge: one photo + live audio -> live video.",
    )
    parser.add_argument("--version", action="version", version=f"edgetalk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    got = {}
    restore = _sigterm_as_keyboard_interrupt(got)
    try:
        return int(args.func(args) or 0)
    except EdgeTalkError as e:
        print(f"edgetalk {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgetalk {args.command}: interrupted", file=sys.stderr)
        return 143 if got.get("sigterm") else 130
    finally:
        restore()


def _sigterm_as_keyboard_interrupt(got: dict):
    """SIGTERM stops like Ctrl-C: `live` finishes its mp4, `export` removes its partial bundle
    (service managers and `kill` get the same clean stop as a terminal)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        got["sigterm"] = True
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
