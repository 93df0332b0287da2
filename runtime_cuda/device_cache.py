"""KV caches whose K/V live on the GPU: what the GPU backends' `new_cache()` returns.

The scheduler keeps calling only `positions()` and `write()` and passes `cache.k`/`cache.v` to the
generator; the slot bookkeeping and RAPR positions are cache.py's. Only the storage differs:

- `TorchDeviceKVCache` (cuda and tensorrt backends): two torch device tensors. `write` copies the
  chunk's new K/V straight from the generator's device output buffers into their slots
  (`index_copy_`, device to device) when those buffers still hold them, which is always the case
  in a stream; a caller that hands in other numpy K/V gets them uploaded.
- `OrtDeviceKVCache` (onnxruntime-cuda): ORT cannot write a slice of an OrtValue, so a tiny
  ScatterElements graph writes the slots, ping-ponging between two device buffers.

Either way there is no host copy of the cache and nothing is compared: the cache knows which
slots it writes. A slot index list is uploaded once per distinct ring position and reused.
"""

from __future__ import annotations

import threading

import numpy as np

from ..models.config import ModelConfig
from ..runtime.cache import KVCache
from .residency import TransferLog

SLOT_AXIS = 3


class TorchDeviceKVCache(KVCache):
    def __init__(self, cfg: ModelConfig, runner, log: TransferLog):
        self.runner, self.log, self.device = runner, log, runner.device
        self._index: dict[tuple[int, ...], object] = {}
        super().__init__(cfg)

    def _allocate(self, shape):
        import torch

        return (
            torch.zeros(shape, dtype=torch.float32, device=self.device),
            torch.zeros(shape, dtype=torch.float32, device=self.device),
        )

    def _clear(self) -> None:
        self.k.zero_()
        self.v.zero_()

    def _slot_index(self, slots: np.ndarray):
        import torch

        key = tuple(int(s) for s in slots)
        if key not in self._index:
            self._index[key] = torch.as_tensor(slots, dtype=torch.int64, device=self.device)
            self.log.to_device(slots.nbytes)
        return self._index[key]

    def _store(self, slots: np.ndarray, new_k, new_v) -> None:
        import torch

        index = self._slot_index(slots)
        for name, rows, dst in (("new_k", new_k, self.k), ("new_v", new_v, self.v)):

            def place(src, dst=dst):
                dst.index_copy_(SLOT_AXIS, index, src)

            if not self.runner.with_output(name, rows, place):
                place(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(dst.device))
                self.log.to_device(rows.nbytes)


def scatter_model(kv_shape: tuple[int, ...], chunk: int):
    """ONNX graph: (k, v, k_rows, v_rows [..C..], slots [C]) -> k, v with the rows at the slots."""
    from onnx import TensorProto, helper, numpy_helper

    rows_shape = list(kv_shape)
    rows_shape[SLOT_AXIS] = chunk
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    index_shape = [1] * len(kv_shape)
    index_shape[SLOT_AXIS] = chunk
    inits = [
        numpy_helper.from_array(np.array(index_shape, np.int64), "index_shape"),
        numpy_helper.from_array(np.array(rows_shape, np.int64), "rows_shape"),
    ]
    nodes = [
        helper.make_node("Reshape", ["slots", "index_shape"], ["slot_col"]),
        helper.make_node("Expand", ["slot_col", "rows_shape"], ["index"]),
        helper.make_node("ScatterElements", ["k", "index", "k_rows"], ["k_out"], axis=SLOT_AXIS),
        helper.make_node("ScatterElements", ["v", "index", "v_rows"], ["v_out"], axis=SLOT_AXIS),
    ]
    graph = helper.make_graph(
        nodes,
        "kv_slot_write",
        [
            helper.make_tensor_value_info("k", f32, list(kv_shape)),
            helper.make_tensor_value_info("v", f32, list(kv_shape)),
            helper.make_tensor_value_info("k_rows", f32, rows_shape),
            helper.make_tensor_value_info("v_rows", f32, rows_shape),
            helper.make_tensor_value_info("slots", i64, [chunk]),
        ],
        [
            helper.make_tensor_value_info("k_out", f32, list(kv_shape)),
            helper.make_tensor_value_info("v_out", f32, list(kv_shape)),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # opset 17's IR; onnx's newest may be ahead of the installed runtime
    return model


class OrtSlotWriter:
    """One backend's scatter session, shared by its caches (one call at a time)."""

    def __init__(self, kv_shape, chunk: int, device, providers, opts):
        import onnxruntime as ort

        model = scatter_model(tuple(kv_shape), chunk).SerializeToString()
        # The slot write is a few kernels; a TensorRT engine for it would only cost build time.
        plain = [p for p in providers if _provider_name(p) != "TensorrtExecutionProvider"]
        self.session = ort.InferenceSession(model, sess_options=opts, providers=plain)
        self.binding = self.session.io_binding()
        self.lock = threading.Lock()
        self.kv_shape, self.chunk, self.device = tuple(kv_shape), chunk, device

    def alloc(self, shape, dtype=np.float32):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, *self.device)

    def write(self, src: tuple, rows: tuple, slots, dst: tuple) -> None:
        with self.lock:
            b = self.binding
            for name, ov in zip(
                ("k", "v", "k_rows", "v_rows", "slots"), (*src, *rows, slots), strict=True
            ):
                b.bind_ortvalue_input(name, ov)
            b.bind_ortvalue_output("k_out", dst[0])
            b.bind_ortvalue_output("v_out", dst[1])
            self.session.run_with_iobinding(b)


def _provider_name(p) -> str:
    return p[0] if isinstance(p, tuple) else p


class OrtDeviceKVCache(KVCache):
    def __init__(self, cfg: ModelConfig, backend, writer: OrtSlotWriter, log: TransferLog):
        self.backend, self.writer, self.log = backend, writer, log
        self._index: dict[tuple[int, ...], object] = {}
        super().__init__(cfg)

    def _allocate(self, shape):
        self.pairs = [(self.writer.alloc(shape), self.writer.alloc(shape)) for _ in range(2)]
        rows_shape = list(shape)
        rows_shape[SLOT_AXIS] = self.chunk
        self.rows = (self.writer.alloc(rows_shape), self.writer.alloc(rows_shape))  # uploads
        self.current = 0
        self.k, self.v = self.pairs[0]
        self._clear()  # device memory starts as garbage: a masked NaN would still poison a sum
        return self.k, self.v

    def _clear(self) -> None:
        zeros = np.zeros(self.shape, np.float32)
        for ov in self.pairs[self.current]:
            ov.update_inplace(zeros)
            self.log.to_device(zeros.nbytes)

    def _slot_index(self, slots: np.ndarray):
        key = tuple(int(s) for s in slots)
        if key not in self._index:
            ov = self.writer.alloc((len(key),), np.int64)
            ov.update_inplace(np.asarray(slots, np.int64))
            self.log.to_device(slots.nbytes)
            self._index[key] = ov
        return self._index[key]

    def _store(self, slots: np.ndarray, new_k, new_v) -> None:
        index = self._slot_index(slots)
        nxt = self.pairs[1 - self.current]

        def scatter(rows) -> None:
            self.writer.write(self.pairs[self.current], rows, index, nxt)

        if not self.backend.with_generator_output(new_k, new_v, scatter):
            for ov, host in zip(self.rows, (new_k, new_v), strict=True):
                ov.update_inplace(np.ascontiguousarray(host, np.float32))
                self.log.to_device(host.nbytes)
            scatter(self.rows)
        self.current = 1 - self.current
        self.k, self.v = self.pairs[self.current]
