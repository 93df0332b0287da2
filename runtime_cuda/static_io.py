"""Fixed device buffers for one module: packed pinned transfers, a copy stream, CUDA-graph replay.

The streaming contract fixes every shape, so a module's inputs and outputs can live at the same
device addresses for the life of a backend. One call is:

    numpy inputs -> one pinned host buffer -> ONE host-to-device copy      (copy stream)
    compute: a CUDA-graph replay (or eager) reading the input views, writing the output views
    ONE device-to-host copy of every output into pinned memory -> numpy    (copy stream)

Two kinds of input are not in the packed buffer. The KV cache arrives as the device tensors of a
cache this backend made (device_cache.py) and is copied device-to-device into the runner's fixed
input buffers, with no host traffic; numpy K/V (a direct call, the export's parity check) are
uploaded instead. Per-avatar tensors are uploaded only when they change (residency.py).
On a CPU device the same code runs without pinning, streams or graphs (that is how CI tests it).

The buffers are the runner's, so one call at a time: `run` holds a lock from the host copy-in to
the copy-out. Sessions sharing a backend (`serve`) would otherwise read each other's outputs.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch

from ..models.io_spec import ModuleIO, TensorSpec
from .residency import TransferLog, WholeMirror

ALIGN = 64  # elements: every view starts on a 256-byte boundary (TensorRT wants aligned I/O)
WARMUP_CALLS = 3  # eager runs on the capture stream before capture (cuDNN/cuBLAS workspaces)

# compute(inputs, outputs): read the device input views, write the device output views.
Compute = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], None]


class Packed:
    """One flat float32 buffer on the host (pinned on CUDA) and its device twin, with named views."""

    def __init__(self, specs: tuple[TensorSpec, ...], device: torch.device, pin: bool):
        offsets, total = {}, 0
        for t in specs:
            if t.dtype != "float32":
                raise ValueError(f"{t.name}: the contract's {t.dtype} is not float32")
            offsets[t.name] = total
            total += math.ceil(math.prod(t.shape) / ALIGN) * ALIGN
        self.host = torch.zeros(max(total, ALIGN), dtype=torch.float32, pin_memory=pin)
        self.dev = torch.zeros(max(total, ALIGN), dtype=torch.float32, device=device)
        host_np = self.host.numpy()
        self.host_views = {}
        self.dev_views = {}
        for t in specs:
            o, n = offsets[t.name], math.prod(t.shape)
            self.host_views[t.name] = host_np[o : o + n].reshape(t.shape)
            self.dev_views[t.name] = self.dev[o : o + n].view(t.shape)
        self.nbytes = total * 4


class ModuleRunner:
    def __init__(
        self,
        spec: ModuleIO,
        device: torch.device,
        log: TransferLog,
        resident: tuple[str, ...] = (),
        device_inputs: tuple[str, ...] = (),
        graphs: bool = False,
    ):
        self.device = device
        self.cuda = device.type == "cuda"
        self.log = log
        shapes = {t.name: t.shape for t in spec.inputs}
        self.resident = {k: WholeMirror(shapes[k], device, log) for k in resident}
        # fixed device buffers for inputs that arrive on the device (the KV cache)
        self.dev_in = {
            k: torch.zeros(shapes[k], dtype=torch.float32, device=device) for k in device_inputs
        }
        kept = (*self.resident, *self.dev_in)
        self.inp = Packed(tuple(t for t in spec.inputs if t.name not in kept), device, self.cuda)
        self.out = Packed(spec.outputs, device, self.cuda)
        self.args = {
            **self.inp.dev_views,
            **{k: m.dev for k, m in self.resident.items()},
            **self.dev_in,
        }
        self.returned: dict[str, np.ndarray] = {}  # the last call's outputs, as handed out
        self.compute: Compute | None = None
        self.want_graph = graphs and self.cuda
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error = ""
        self.lock = threading.Lock()  # the fixed buffers and mirrors are shared state
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.capture_stream = torch.cuda.Stream(device)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            self.returned = self._run(inputs)
            return self.returned

    def with_output(self, name: str, handed_out: np.ndarray, use: Callable) -> bool:
        """Call use(device tensor of output `name`) if `handed_out` is what the last call returned
        for it, i.e. the device buffer still holds exactly that data (no other call ran since);
        under the lock, so no call can overwrite it meanwhile. False: use the host array."""
        with self.lock:
            if self.returned.get(name) is not handed_out:
                return False
            use(self.out.dev_views[name])
            return True

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, view in self.inp.host_views.items():
            np.copyto(view, inputs[name], casting="same_kind")
        if self.cuda:  # device inputs were written on the caller's stream
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._copy_stream():
            self.inp.dev.copy_(self.inp.host, non_blocking=self.cuda)
            self.log.to_device(self.inp.nbytes)
            for name, mirror in self.resident.items():
                mirror.sync(inputs[name])
            for name, buf in self.dev_in.items():
                x = inputs[name]
                if isinstance(x, torch.Tensor):
                    buf.copy_(x, non_blocking=True)  # device to device
                else:
                    buf.copy_(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
                    self.log.to_device(x.nbytes)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        with torch.inference_mode():
            self._compute()
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._copy_stream():
            self.out.host.copy_(self.out.dev, non_blocking=self.cuda)
            self.log.to_host(self.out.nbytes)
        if self.cuda:
            self.copy_stream.synchronize()  # the pinned buffer is read right below
        # Copies: the pinned buffer is overwritten by the next call, and callers keep results.
        return {name: view.copy() for name, view in self.out.host_views.items()}

    def _copy_stream(self):
        return torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext()

    def _step(self) -> None:
        self.compute(self.args, self.out.dev_views)

    def _compute(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self.want_graph and not self.graph_error:
            try:
                self.graph = self._capture()
                self.graph.replay()
                return
            except RuntimeError as e:  # an op that cannot be captured: run eager, say so once
                self.graph, self.graph_error = None, str(e).splitlines()[0]
                warnings.warn(
                    f"CUDA graph capture failed, running eager: {self.graph_error}", stacklevel=2
                )
        self._step()

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm up and capture on one side stream (cuDNN/cuBLAS bind workspaces per stream); the
        static input views already hold this call's inputs, so warm-up computes real outputs."""
        s = self.capture_stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(WARMUP_CALLS):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another session's thread may run (and synchronise) other modules while
        # this one captures; "global" would make those calls fail the capture.
        with torch.cuda.graph(graph, stream=s, capture_error_mode="thread_local"):
            self._step()
        return graph
