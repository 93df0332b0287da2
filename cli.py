"""The `edgetalk` command. Each subcommand lives next to the code it drives and registers itself."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import EdgeTalkError

# command -> (module that registers it, its one-line help). Only the module of the command being
# run is imported: `edgetalk --help` and `edgetalk doctor` must not pay for torch (seconds).
# tests/test_cli_fast.py checks these help lines against what each module registers.
COMMANDS = {
    "run": ("edgetalk.runtime.cli_run", "render a talking-head mp4 from an audio file"),
    "live": (
        "edgetalk.runtime.cli_live",
        "live talking head from a microphone, a PCM pipe or a socket",
    ),
    "export": (
        "edgetalk.export.cli",
        "export the model to ONNX, CoreML, MLX or TensorRT (static shapes, fp32/fp16/int8)",
    ),
    "eval": (
        "edgetalk.training.cli_eval",
        "score lip sync, identity, stability, quality and listening on held-out data",
    ),
    "bench": (
        "edgetalk.benchmarks.cli",
        "benchmark FPS, first-frame delay, RTF and per-module latency",
    ),
    "soak": (
        "edgetalk.benchmarks.soak",
        "long streaming soak: RSS slope, KV size, A/V alignment, identity and head drift",
    ),
    "doctor": (
        "edgetalk.doctor",
        "list the backends and export targets that can run here, and why others cannot",
    ),
    "serve": ("edgetalk.serve.cli", "web page: your microphone in, the talking head out (WebRTC)"),
}
SUBCOMMANDS = tuple(dict.fromkeys(module for module, _ in COMMANDS.values()))


class OneLineParser(argparse.ArgumentParser):
    """A bad option is one line, like every other refusal (errors.py): what was wrong and where
    to look, not the whole usage block. Subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def build_parser(command: str | None = None, lazy: bool = False) -> argparse.ArgumentParser:
    """Every command registered by its module; with lazy=True only `command`'s module is
    imported, the others are listed by name and help (enough for `edgetalk --help`)."""
    parser = OneLineParser(
        prog="edgetalk",
        description="Real-time talking heads on the edge: one photo + live audio -> live video.",
    )
    parser.add_argument("--version", action="version", version=f"edgetalk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    done = set()
    for name, (module, help_) in COMMANDS.items():
        if lazy and name != command:
            sub.add_parser(name, help=help_)
        elif module not in done:
            done.add(module)
            importlib.import_module(module).register(sub)
    return parser


def _command(argv: list[str]) -> str | None:
    """The command named on the line: the first word that is not an option."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # a command's options can come from its plug-ins (export targets need torch)
        parser = build_parser(_command(argv), lazy=True)
    except ModuleNotFoundError as e:
        return _missing_extra(e, _command(argv) or "")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version or a refused option: already printed
        return e.code if isinstance(e.code, int) else 2
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
    except ModuleNotFoundError as e:
        return _missing_extra(e, args.command)
    except KeyboardInterrupt:
        print(f"edgetalk {args.command}: interrupted", file=sys.stderr)
        return 143 if got.get("sigterm") else 130
    finally:
        restore()


def _missing_extra(e: ModuleNotFoundError, command: str) -> int:
    """One line naming the extra to install, for an optional package; anything else is a bug."""
    from .errors import EXTRAS

    package = (e.name or "").split(".")[0]
    if package not in EXTRAS:
        raise e
    print(
        f"edgetalk {command}: error: this needs {package}, which is not installed: "
        f"pip install 'edgetalk[{EXTRAS[package]}]'",
        file=sys.stderr,
    )
    return 2


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
