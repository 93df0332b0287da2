"""TensorRT backend: the serialized engines of a tensorrt bundle (`edgetalk export --target
tensorrt`), run with execute_async_v3 on fixed device buffers owned by torch (static_io.py), with
the KV cache and per-avatar inputs resident on the GPU as in the cuda backend (device_cache.py,
residency.py).

An engine is tied to the GPU model and the TensorRT version that built it. The export records
both per module (manifest `modules.<m>.info`); a mismatch is refused with a message that says what
was recorded and what is here, before TensorRT would fail to deserialise.

An execution context is bound to its runner's fixed buffers, so it is used under that runner's
lock (ModuleRunner.run): sessions sharing the backend take turns per module call.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BackendUnavailable, BundleError
from ..models.edgetalk import MODULES
from ..models.io_spec import ModuleIO
from ..runtime.backend import Backend
from .backend_cuda import DEVICE_INPUTS, RESIDENT, device_kv_cache
from .gpu import probe, torch_cuda_reason
from .residency import TransferLog
from .static_io import ModuleRunner

ENGINE_KEYS = ("tensorrt", "gpu", "compute_capability")


def engine_target() -> dict:
    """What an engine built here is tied to (recorded at export, checked at load)."""
    import tensorrt as trt

    gpu, _ = probe()
    here = {"tensorrt": trt.__version__}
    if gpu is not None:
        here.update(gpu=gpu.name, compute_capability=gpu.compute_capability)
    return here


def engine_mismatch(module: str, recorded: dict, here: dict) -> str:
    """ "" when an engine built for `recorded` runs `here`, else the reason it cannot."""
    diff = [k for k in ENGINE_KEYS if k in recorded and recorded[k] != here.get(k)]
    if not diff:
        return ""

    def where(d: dict) -> str:
        return (
            f"{d.get('gpu', 'an unknown GPU')} (compute capability "
            f"{d.get('compute_capability', '?')}) with TensorRT {d.get('tensorrt', '?')}"
        )

    return (
        f"the {module} engine was built for {where(recorded)}; this is {where(here)}. "
        "TensorRT engines run only on the GPU model and TensorRT version that built them: "
        "re-export with `edgetalk export --target tensorrt` on this machine"
    )


def engine_io_problems(engine, spec: ModuleIO) -> list[str]:
    """Differences between an engine's I/O tensors and the module's contract (names, shapes,
    float32, direction)."""
    import tensorrt as trt

    found = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        found[name] = (
            engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
            tuple(engine.get_tensor_shape(name)),
            engine.get_tensor_dtype(name) == trt.float32,
        )
    want = {t.name: (True, t.shape, True) for t in spec.inputs}
    want |= {t.name: (False, t.shape, True) for t in spec.outputs}
    problems = [f"{n}: missing" for n in want if n not in found]
    problems += [f"{n}: not in the contract" for n in found if n not in want]
    for n in set(want) & set(found):
        if found[n] != want[n]:
            (inp, shape, f32), (_, want_shape, _) = found[n], want[n]
            what = "input" if inp else "output"
            problems.append(
                f"{n}: {what} {list(shape)} {'float32' if f32 else 'not float32'}, "
                f"contract {list(want_shape)} float32"
            )
    return problems


class TensorRTBackend(Backend):
    name = "tensorrt"
    targets = ("tensorrt",)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        reasons = []
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            reasons.append("tensorrt is not installed (pip install tensorrt)")
        why = torch_cuda_reason()  # device buffers and streams come from torch
        if why:
            reasons.append(why)
        return not reasons, "; ".join(reasons)

    @classmethod
    def from_bundle(cls, bundle) -> TensorRTBackend:
        ok, why = cls.availability()
        if not ok:
            raise BackendUnavailable(f"backend 'tensorrt' cannot run here: {why}")
        here = engine_target()
        for module in MODULES:
            info = bundle.manifest.get("modules", {}).get(module, {}).get("info", {})
            msg = engine_mismatch(module, info, here)  # a draft bundle (mid-export) has no info
            if msg:
                raise BackendUnavailable(f"{bundle.path}: {msg}")
        return cls(bundle)

    def __init__(self, bundle, graphs: bool = False):
        import tensorrt as trt

        super().__init__(bundle.cfg, bundle.io, bundle.precision)
        self.device = torch.device("cuda")
        self.transfers = TransferLog()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # must outlive its engines
        self.engines, self.contexts, self.runners = {}, {}, {}
        for module in MODULES:
            spec = self.io[module]
            engine = self.runtime.deserialize_cuda_engine(bundle.file(module).read_bytes())
            if engine is None:
                raise BundleError(
                    f"TensorRT {trt.__version__} could not load {bundle.files[module]} (built by "
                    "another TensorRT version or for another GPU?); re-export on this machine"
                )
            problems = engine_io_problems(engine, spec)
            if problems:
                raise BundleError(
                    f"{bundle.files[module]} does not match the {module} contract: "
                    + "; ".join(problems)
                )
            runner = ModuleRunner(
                spec,
                self.device,
                self.transfers,
                resident=RESIDENT.get(module, ()),
                device_inputs=DEVICE_INPUTS.get(module, ()),
                graphs=graphs,
            )
            context = engine.create_execution_context()
            # Fixed buffers: every address is bound once, for the life of the backend.
            for name, t in {**runner.args, **runner.out.dev_views}.items():
                context.set_tensor_address(name, t.data_ptr())
            runner.compute = _executor(context, module)
            self.engines[module], self.contexts[module] = engine, context
            self.runners[module] = runner

    def run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runners[module].run(inputs)

    def _cache(self):
        return device_kv_cache(self)

    def describe(self) -> str:
        return f"tensorrt ({self.precision}, {torch.cuda.get_device_name(self.device)})"


def _executor(context, module: str):
    def compute(args, outs) -> None:  # addresses are bound already; just enqueue
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the {module} engine")

    return compute


BACKEND = TensorRTBackend
