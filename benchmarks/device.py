"""What machine a benchmark ran on, and how fast its plain fp32 matrix multiply is (the 'peak')."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata

VERSIONED = ("edgetalk", "torch", "numpy", "onnxruntime", "onnx", "mlx", "coremltools", "tensorrt")
GEMM_SIZE = 1024


def cpu_model() -> str:
    system = platform.system()
    try:
        if system == "Linux":
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.lower().startswith(("model name", "hardware", "cpu model")):
                        return line.split(":", 1)[1].strip()
        elif system == "Darwin":
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# Instruction-set extensions that decide which kernels torch and ONNX Runtime run. Cloud VMs all
# call themselves "AMD EPYC" or "Intel Xeon"; these (with x86's family and model) tell a 2017 Zen 1,
# where an 8-bit convolution ran as slowly as a float one, from a Xeon with VNNI and AMX.
# /proc/cpuinfo flag (x86 "flags", Arm "Features") -> the name reported.
LINUX_FEATURES = {
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16",
    "avx_vnni": "avx_vnni",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
    "asimd": "neon",
    "asimddp": "dotprod",
    "asimdhp": "fp16",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
}
# macOS `sysctl hw.optional` keys -> the same names
MAC_FEATURES = {
    "hw.optional.avx1_0": "avx",
    "hw.optional.avx2_0": "avx2",
    "hw.optional.fma": "fma",
    "hw.optional.avx512f": "avx512f",
    "hw.optional.avx512vnni": "avx512_vnni",
    "hw.optional.neon": "neon",
    "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_FP16": "fp16",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_SME": "sme",
}


def _ordered(found: set[str]) -> list[str]:
    order = list(dict.fromkeys([*LINUX_FEATURES.values(), *MAC_FEATURES.values()]))
    return [f for f in order if f in found]


def parse_cpuinfo(text: str) -> tuple[list[str], str | None]:
    """(kernel-relevant extensions, "family F model M" on x86 or None) from /proc/cpuinfo."""
    flags: set[str] = set()
    fam = model = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key == "cpu family" and fam is None:
            fam = value.strip()
        elif key == "model" and model is None and value.strip().isdigit():
            model = value.strip()
    found = {name for flag, name in LINUX_FEATURES.items() if flag in flags}
    return _ordered(found), (f"family {fam} model {model}" if fam and model else None)


def parse_sysctl(text: str) -> list[str]:
    """Extensions from `sysctl hw.optional` ("key: 1" lines)."""
    found = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip() == "1" and key.strip() in MAC_FEATURES:
            found.add(MAC_FEATURES[key.strip()])
    return _ordered(found)


def cpu_identity() -> tuple[list[str], str | None]:
    """This machine's kernel-relevant extensions and x86 family/model (empty/None if unknown)."""
    system = platform.system()
    try:
        if system == "Linux":
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                return parse_cpuinfo(f.read(1 << 20))  # one CPU's block is enough; cap the read
        if system == "Darwin":
            out = subprocess.run(
                ["sysctl", "hw.optional"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0:
                return parse_sysctl(out.stdout), None
    except (OSError, subprocess.SubprocessError):
        pass
    return [], None


def describe_cpu() -> str:
    """One line for `doctor`: model, x86 family/model, extensions."""
    features, ident = cpu_identity()
    name = cpu_model() + (f" ({ident})" if ident else "")
    return f"{name}; {' '.join(features) if features else 'extensions unknown'}"


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_info() -> tuple[str | None, float | None]:
    try:
        import torch
    except ImportError:
        return None, None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.name, round(props.total_memory / 1e9, 2)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "Apple GPU (mps)", None
    return None, None


def gemm_peak_gflops(
    device: str = "cpu", size: int = GEMM_SIZE, seconds: float = 0.5, min_reps: int = 3
) -> float:
    """Best-of fp32 n x n matmul throughput on `device`, in GFLOP/s (2 n^3 FLOPs per matmul)."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()

    with torch.inference_mode():
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        out = torch.empty(size, size, device=device)
        for _ in range(2):  # warm-up: thread pools, kernels, clocks
            torch.mm(a, b, out=out)
        sync()
        best = float("inf")
        reps = 0
        start = time.perf_counter()
        while reps < min_reps or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            sync()
            best = min(best, time.perf_counter() - t0)
            reps += 1
    return 2.0 * size**3 / best / 1e9


def measure_peaks(size: int = GEMM_SIZE, seconds: float = 0.5) -> dict[str, float]:
    import torch

    peaks = {"cpu": round(gemm_peak_gflops("cpu", size, seconds), 2)}
    if torch.cuda.is_available():
        peaks["cuda"] = round(gemm_peak_gflops("cuda", max(size, 4096), seconds), 2)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        peaks["mps"] = round(gemm_peak_gflops("mps", size, seconds), 2)
    return peaks


def default_name(cpu: str, cores: int, gpu: str | None) -> str:
    return gpu if gpu else f"{cpu} ({cores} cores)"


def device_info(
    name: str | None = None, gemm_size: int = GEMM_SIZE, gemm_seconds: float = 0.5
) -> dict:
    import torch

    from ..runtime.threads import resolve
    from .deps import import_extra

    psutil = import_extra("psutil", "describing this machine")
    cpu = cpu_model()
    features, ident = cpu_identity()
    cores = os.cpu_count() or 1
    gpu, gpu_mem = gpu_info()
    # The peak is the machine's, on every core, whatever threads the rows then run with; the
    # threads torch had are put back (bench used to report the peak and "torch threads" of
    # whatever torch defaulted to on import, not what its rows ran).
    before = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        peaks = measure_peaks(gemm_size, gemm_seconds)
    finally:
        torch.set_num_threads(before)
    return {
        "name": name or default_name(cpu, cores, gpu),
        "cpu": cpu,
        "cpu_id": ident,
        "cpu_features": features,
        "cores_logical": cores,
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 2),
        "gpu": gpu,
        "gpu_memory_gb": gpu_mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": package_versions(),
        "threads": resolve(None),
        "gemm_peak_gflops": peaks,
        "gemm_size": gemm_size,
    }


def backend_device(backend) -> str:
    """Which measured peak a backend is compared with: 'cuda', 'mps' or 'cpu'."""
    where = f"{getattr(backend, 'device', '')} {getattr(backend, 'providers', '')}".lower()
    where += f" {backend.name}".lower()
    if "cuda" in where or "tensorrt" in where:
        return "cuda"
    if "gpu" in where or "mps" in where or "metal" in where:
        return "mps"
    return "cpu"
