"""Is there an NVIDIA GPU here, and which one?

Asked of the CUDA driver itself (libcuda, through ctypes), so the answer needs neither a CUDA
build of torch nor onnxruntime-gpu nor tensorrt, and every backend and the doctor give the same
reason when there is none.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

# CUdevice_attribute values from cuda.h
_CC_MAJOR, _CC_MINOR = 75, 76
_DRIVER_LIBS = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"
    driver: str  # CUDA version the driver supports, "12.4"

    def to_dict(self) -> dict:
        return {
            "gpu": self.name,
            "compute_capability": self.compute_capability,
            "cuda_driver": self.driver,
        }


@cache
def probe() -> tuple[GpuInfo | None, str]:
    """(device 0, "") or (None, why not). Device 0 is the one every CUDA backend uses."""
    lib = None
    for name in _DRIVER_LIBS:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return None, "no CUDA GPU (no NVIDIA driver: libcuda.so.1 not found)"
    rc = lib.cuInit(0)
    if rc != 0:
        return None, f"no CUDA GPU (the NVIDIA driver did not initialise: CUDA error {rc})"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return None, "no CUDA GPU (the NVIDIA driver sees no device)"
    dev = ctypes.c_int(0)
    lib.cuDeviceGet(ctypes.byref(dev), 0)
    raw = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(raw, 256, dev)
    major, minor, version = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
    lib.cuDriverGetVersion(ctypes.byref(version))
    v = version.value
    return GpuInfo(
        raw.value.decode(errors="replace"),
        f"{major.value}.{minor.value}",
        f"{v // 1000}.{v % 1000 // 10}",
    ), ""


def torch_cuda_reason() -> str:
    """Why torch cannot use a GPU here ("" when it can)."""
    import torch

    if torch.cuda.is_available():
        return ""
    reasons = []
    gpu, why = probe()
    if gpu is None:
        reasons.append(why)
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is built without CUDA")
    elif gpu is not None:
        reasons.append(
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use {gpu.name}"
        )
    return "; ".join(reasons) or "no CUDA GPU"
