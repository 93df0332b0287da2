"""`edgetalk doctor`: what can run here. Every discovered backend and export target, each
"available" or "unavailable: <reason>", and the versions of the libraries behind them.

It sits at the CLI level because it reads both sides: runtime/ and runtime_cuda/ (backends) and
converters/ (export targets), which do not import each other's layers."""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata
from pathlib import Path

from .benchmarks.device import describe_cpu


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="list the backends and export targets that can run here, and why others cannot",
        description="Check every backend (runtime/ and runtime_cuda/) and export target on this "
        "machine and print the versions of torch, CUDA, onnxruntime, tensorrt, mlx and coremltools, "
        "and which extras are installed.",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="load every backend and converter to check it (seconds: imports torch and the "
        "rest); without it doctor answers from installed package metadata at once",
    )
    p.set_defaults(func=main)


def _status(check) -> str:
    try:
        ok, why = check()
    except Exception as e:  # a broken install is a finding, not a crash
        ok, why = False, f"{type(e).__name__}: {e}"
    return "available" if ok else f"unavailable: {why}"


def backend_rows() -> list[tuple[str, str]]:
    from .runtime.registry import registry

    return [(name, _status(cls.availability)) for name, cls in registry().items()]


def target_rows() -> list[tuple[str, str]]:
    from .converters.target import targets

    try:
        found = targets()
    except Exception as e:  # a converter that does not import: a finding, not a crash
        return [("converters", f"unavailable: {type(e).__name__}: {e}")]
    return [(name, _status(cls.availability)) for name, cls in sorted(found.items())]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_rows() -> list[tuple[str, str]]:
    from .runtime_cuda.gpu import probe

    gpu, why = probe()
    try:
        import torch
    except ImportError:  # a bundle-only install: the runtime needs no torch
        torch_row = "not installed (only export, training, eval and the torch backend need it)"
    else:
        if torch.version.cuda is None:
            cuda = "built without CUDA"
        else:
            usable = "usable" if torch.cuda.is_available() else "not usable"
            cuda = f"CUDA {torch.version.cuda}, GPU {usable}"
        torch_row = f"{torch.__version__} ({cuda})"
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
        ("CPU", describe_cpu()),
        (
            "GPU",
            f"{gpu.name}, compute capability {gpu.compute_capability}, driver CUDA {gpu.driver}"
            if gpu
            else why,
        ),
        ("torch", torch_row),
        ("onnxruntime", onnxrt),
        ("tensorrt", trt),
        ("mlx", _version("mlx")),
        ("coremltools", _version("coremltools")),
    ]


# ---- the quick answer: package metadata only, nothing heavy imported ----------------------------
# extras that are tooling, not features of the runtime
SKIP_EXTRAS = ("all", "test")
# backend -> (distributions it needs, any of which will do; needs a CUDA GPU; macOS only)
QUICK_BACKENDS = {
    "torch": (("torch",), False, False),
    "onnxruntime": (("onnxruntime", "onnxruntime-gpu"), False, False),
    "coreml": (("coremltools",), False, True),
    "mlx": (("mlx",), False, False),
    "cuda": (("torch",), True, False),
    "onnxruntime-cuda": (("onnxruntime-gpu",), True, False),
    "tensorrt": (("tensorrt", "tensorrt-cu12"), True, False),
}


def extra_requirements() -> dict[str, list[str]] | None:
    """extra -> the distributions it installs on this platform (from edgetalk's own metadata)."""
    import re

    try:
        reqs = metadata.requires("edgetalk") or []
    except metadata.PackageNotFoundError:
        return None
    out: dict[str, list[str]] = {}
    for req in reqs:
        spec, _, marker = req.partition(";")
        m = re.search(r"""extra\s*==\s*["']([\w-]+)["']""", marker)
        if not m or m.group(1) in SKIP_EXTRAS:
            continue
        plat = re.search(r"""sys_platform\s*==\s*["'](\w+)["']""", marker)
        if plat and plat.group(1) != sys.platform:
            continue
        name = re.match(r"[A-Za-z0-9_.\-]+", spec.strip()).group(0)
        out.setdefault(m.group(1), []).append(name)
    return out


def extra_rows() -> list[tuple[str, str]]:
    extras = extra_requirements()
    if extras is None:
        return [("?", "edgetalk is not installed as a package (pip install -e .)")]
    rows = []
    for extra, dists in sorted(extras.items()):
        missing = [d for d in dists if _version(d) == "not installed"]
        if missing:
            text = f"missing {', '.join(missing)}: pip install 'edgetalk[{extra}]'"
        else:
            text = "installed (" + ", ".join(f"{d} {_version(d)}" for d in dists) + ")"
        rows.append((extra, text))
    return rows


def quick_backend_rows() -> list[tuple[str, str]]:
    from .runtime_cuda.gpu import probe

    gpu, why_no_gpu = probe()  # ctypes against the driver: fast, imports nothing
    rows = []
    for name, (dists, needs_gpu, mac_only) in QUICK_BACKENDS.items():
        have = [d for d in dists if _version(d) != "not installed"]
        reasons = []
        if mac_only and platform.system() != "Darwin":
            reasons.append(f"runs only on macOS; this is {platform.system()}")
        if not have:
            reasons.append(f"{' or '.join(dists)} not installed")
        if needs_gpu and gpu is None:
            reasons.append(why_no_gpu)
        rows.append(
            (name, f"unavailable: {'; '.join(reasons)}" if reasons else f"installed ({have[0]})")
        )
    return rows


def quick_version_rows() -> list[tuple[str, str]]:
    from .runtime_cuda.gpu import probe

    gpu, why = probe()
    return [
        ("python", f"{platform.python_version()} ({platform.system()} {platform.machine()})"),
        ("CPU", describe_cpu()),
        (
            "GPU",
            f"{gpu.name}, compute capability {gpu.compute_capability}, driver CUDA {gpu.driver}"
            if gpu
            else why,
        ),
        *((d, _version(d)) for d in ("torch", "onnxruntime", "tensorrt", "mlx", "coremltools")),
    ]


def compiled_rows() -> list[tuple[str, str]]:
    """The compiled part (setup.py), found without loading it: --help and doctor stay fast."""
    import importlib.util

    spec = importlib.util.find_spec("edgetalk.runtime._composite")
    built = spec is not None and bool(spec.origin)
    why = "not built (the install found no C compiler): ONNX decoders run their whole graph"
    return [("fused composite", f"built ({Path(spec.origin).name})" if built else why)]


def report(full: bool = True) -> str:
    from . import __version__

    lines = [f"edgetalk {__version__} doctor" + ("" if full else " (quick: --full loads each)")]
    sections = (
        (("backends", backend_rows()), ("export targets", target_rows()))
        if full
        else (("backends", quick_backend_rows()),)
    )
    versions = version_rows() if full else quick_version_rows()
    tail = (("extras", extra_rows()), ("compiled", compiled_rows()), ("versions", versions))
    for title, rows in (*sections, *tail):
        width = max(len(name) for name, _ in rows)
        lines += ["", title]
        lines += [f"  {name.ljust(width)}  {text}" for name, text in rows]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    print(report(full=getattr(args, "full", False)))
    sys.stdout.flush()
    return 0
