"""`edgetalk doctor`: what can run here. Every discovered backend and export target, each
"available" or "unavailable: <reason>", and the versions of the libraries behind them."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from importlib import metadata


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="list the backends and export targets that can run here, and why others cannot",
        description="Check every backend (runtime/ and runtime_cuda/) and export target on this "
        "machine and print the versions of torch, CUDA, onnxruntime, tensorrt, mlx and coremltools.",
    )
    p.set_defaults(func=main)


def _status(check) -> str:
    try:
        ok, why = check()
    except Exception as e:  # a broken install is a finding, not a crash
        ok, why = False, f"{type(e).__name__}: {e}"
    return "available" if ok else f"unavailable: {why}"


def backend_rows() -> list[tuple[str, str]]:
    from ..runtime.backends import registry

    return [(name, _status(cls.availability)) for name, cls in registry().items()]


def target_rows() -> list[tuple[str, str]]:
    from ..export.pipeline import TARGETS

    rows = []
    for target in TARGETS:
        try:
            conv = importlib.import_module(f"edgetalk.converters.{target}")
        except ImportError as e:
            rows.append((target, f"unavailable: {e}"))
            continue
        check = getattr(conv, "availability", lambda: (True, ""))
        rows.append((target, _status(check)))
    return rows


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_rows() -> list[tuple[str, str]]:
    import torch

    from .gpu import probe

    gpu, why = probe()
    if torch.version.cuda is None:
        torch_cuda = "built without CUDA"
    else:
        torch_cuda = f"CUDA {torch.version.cuda}, GPU {'usable' if torch.cuda.is_available() else 'not usable'}"
    try:
        import onnxruntime as ort

        onnxrt = f"{ort.__version__}; providers: {', '.join(ort.get_available_providers())}"
    except ImportError:
        onnxrt = "not installed"
    trt = _version("tensorrt")
    if trt == "not installed":
        trt = _version("tensorrt-cu12")
    return [
        ("python", f"{platform.python_version()} ({platform.system()} {platform.machine()})"),
        (
            "GPU",
            f"{gpu.name}, compute capability {gpu.compute_capability}, driver CUDA {gpu.driver}"
            if gpu
            else why,
        ),
        ("torch", f"{torch.__version__} ({torch_cuda})"),
        ("onnxruntime", onnxrt),
        ("tensorrt", trt),
        ("mlx", _version("mlx")),
        ("coremltools", _version("coremltools")),
    ]


def report() -> str:
    from .. import __version__

    lines = [f"edgetalk {__version__} doctor"]
    for title, rows in (
        ("backends", backend_rows()),
        ("export targets", target_rows()),
        ("versions", version_rows()),
    ):
        width = max(len(name) for name, _ in rows)
        lines += ["", title]
        lines += [f"  {name.ljust(width)}  {text}" for name, text in rows]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    print(report())
    sys.stdout.flush()
    return 0
