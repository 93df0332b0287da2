"""CUDA backend: the PyTorch modules on an NVIDIA GPU in fp16/bf16, replayed as CUDA graphs, with
the KV cache resident on the device.

- Precision: weights stay fp32 and the generator and decoder run under torch.autocast (fp16 or
  bf16), which keeps softmax, normalisation, exp/log and reductions in fp32 and promotes
  grid_sample to fp32. The audio encoder (a DFT front end feeding a log) and the once-per-avatar
  appearance encoder run in fp32, as the fp16 ONNX and CoreML exports keep them.
- CUDA graphs: audio, generator and decoder are captured on their first call (shapes are static)
  and replayed; see static_io.py. `compile=True` also runs each module through torch.compile.
- Two things in the shared model code are not capture-safe; this file works around them without
  changing the models: factory calls without a device (the flow-time embedding's `arange`) run
  under `torch.device(...)`, and `torch.tensor(<python list>, device=cuda)` (a synchronising copy,
  which capture forbids) is made once during warm-up and reused (_HoistConstants).
- Residency: the KV cache is made by this backend (`new_cache`) and lives on the device; each
  chunk's K/V go from the generator's output buffers into their slots without leaving the GPU
  (device_cache.py). Per-avatar inputs are uploaded when they change (residency.py). Every
  host<->device copy is counted in `self.transfers`.

Precision defaults to fp32, so callers that name none (the loader, the bench, which labels such
runs fp32) get what they report; pass precision="fp16" or "bf16" for the fast path.

`device="cpu"` runs the same buffers and bookkeeping without graphs, pinning or streams; the
registry never picks it (availability needs a GPU), the tests use it to check the logic in CI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from ..errors import BackendUnavailable, InputError
from ..models.checkpoint import default_checkpoint, load_checkpoint
from ..models.config import ModelConfig
from ..models.edgetalk import MODULES, EdgeTalkModel
from ..models.io_spec import module_io
from ..runtime.backend import Backend
from .device_cache import TorchDeviceKVCache
from .gpu import torch_cuda_reason
from .residency import TransferLog
from .static_io import ModuleRunner

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
AMP_MODULES = ("generator", "decoder")
GRAPH_MODULES = ("audio", "generator", "decoder")  # appearance runs once per avatar
# Per-avatar inputs kept on the device, uploaded when they change; the KV cache arrives on the
# device already (new_cache).
RESIDENT = {"decoder": ("app_feat", "image", "dec_proj", "dec_basis", "dec_lips")}
DEVICE_INPUTS = {"generator": ("k_cache", "v_cache")}


class _HoistConstants(TorchFunctionMode):
    """Serve `torch.tensor(data, ...)` from a cache keyed by its arguments: the first (warm-up)
    call makes the tensor on the device, the captured call reuses it instead of copying from
    pageable host memory. Only safe for constants nobody writes to, which is how the models use it."""

    def __init__(self, made: dict):
        super().__init__()
        self.made = made

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.tensor:
            key = (repr(args), repr(sorted(kwargs.items(), key=lambda kv: kv[0])))
            if key not in self.made:
                self.made[key] = func(*args, **kwargs)
            return self.made[key]
        return func(*args, **kwargs)


class CudaBackend(Backend):
    name = "cuda"
    targets = ("torch",)

    def __init__(
        self,
        model: EdgeTalkModel,
        cfg: ModelConfig | None = None,
        precision: str = "fp32",
        graphs: bool = True,
        compile: bool = False,
        device: str = "cuda",
    ):
        if precision not in PRECISIONS:
            raise InputError(f"the cuda backend runs {', '.join(PRECISIONS)}, not {precision!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            ok, why = self.availability()
            if not ok:
                raise BackendUnavailable(f"backend 'cuda' cannot run here: {why}")
            if precision == "bf16" and not torch.cuda.is_bf16_supported():
                raise BackendUnavailable(f"{torch.cuda.get_device_name()} has no bf16; use fp16")
        cfg = cfg or model.cfg
        super().__init__(cfg, module_io(cfg), precision)
        # its own model for its own streaming settings (weights shared until moved to the device)
        model = model if cfg == model.cfg else model.for_streaming(cfg)
        self.model = model.eval().to(self.device)  # moves the caller's model
        self.amp = PRECISIONS[precision]
        self.graphs = graphs and self.device.type == "cuda"
        self.compiled = compile
        self.transfers = TransferLog()
        self._constants: dict = {}
        self.runners: dict[str, ModuleRunner] = {}
        for name in MODULES:
            runner = ModuleRunner(
                self.io[name],
                self.device,
                self.transfers,
                resident=RESIDENT.get(name, ()),
                device_inputs=DEVICE_INPUTS.get(name, ()),
                graphs=self.graphs and name in GRAPH_MODULES,
            )
            runner.compute = self._compute_fn(name)
            self.runners[name] = runner

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        why = torch_cuda_reason()
        return (not why), why

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        chunk: int | None = None,
        steps: int | None = None,
        window: int | None = None,
        lookahead_ms: float | None = None,
        precision: str = "fp32",
        graphs: bool = True,
        compile: bool = False,
        device: str = "cuda",
    ) -> CudaBackend:
        if device == "cuda":
            ok, why = cls.availability()
            if not ok:  # before loading weights: the refusal is the message, not a traceback
                raise BackendUnavailable(f"backend 'cuda' cannot run here: {why}")
        model, _ = load_checkpoint(path or default_checkpoint())
        cfg = model.cfg.with_streaming(
            chunk=chunk, steps=steps, window=window, lookahead_ms=lookahead_ms
        )
        return cls(model, cfg, precision, graphs, compile, device)

    @classmethod
    def from_bundle(cls, bundle) -> CudaBackend:
        # No export writes a "torch" bundle: only a hand-edited manifest gets here.
        raise InputError(
            f"{bundle.path}: the cuda backend runs checkpoints (--checkpoint), not bundles"
        )

    def _compute_fn(self, name: str):
        module = self.model.module(name)
        fn = torch.compile(module, dynamic=False) if self.compiled else module
        amp = self.amp if name in AMP_MODULES else None
        device = self.device

        def compute(args, outs) -> None:
            with (
                torch.device(device),
                _HoistConstants(self._constants),
                torch.autocast(
                    device.type,
                    dtype=amp or torch.bfloat16,
                    enabled=amp is not None,
                    cache_enabled=False,  # cached casts would outlive a CUDA-graph capture
                ),
            ):
                out = fn(**args)
            for k, view in outs.items():
                view.copy_(out[k])  # casts back to the contract's fp32

        return compute

    def run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runners[module].run(inputs)

    def _cache(self) -> TorchDeviceKVCache:
        return device_kv_cache(self)

    def describe(self) -> str:
        if self.device.type != "cuda":
            return f"cuda ({self.precision}, on {self.device} for testing)"
        graphs = "CUDA graphs" if self.graphs else "eager"
        return f"cuda ({self.precision}, {torch.cuda.get_device_name(self.device)}, {graphs})"


def device_kv_cache(backend) -> TorchDeviceKVCache:
    """The cache of a backend whose generator runs on a ModuleRunner (cuda, tensorrt)."""
    return TorchDeviceKVCache(backend.cfg, backend.runners["generator"], backend.transfers)


BACKEND = CudaBackend
