"""TensorRT: serialized engines built from the ONNX export, FP16 or INT8 (FP32 too).

- The target is the ONNX target's subclass: `convert` is converters/onnx.py's, the same
  static-shape, opset-17 graph, except that sampling stays GridSample (`gather_sampling = False`):
  TensorRT has a native grid-sample layer, which the FP16 build pins to fp32 below; the gather
  form exists for ONNX Runtime's CPU kernel, and in FP16 its index math would lose precision.
- apply_precision() builds the engine with trt.Builder + OnnxParser. FP16 sets BuilderFlag.FP16 and keeps
  grid_sample (and normalisation, softmax, reductions and unary math such as exp/log/sin/cos) in
  fp32 through layer precision constraints with OBEY_PRECISION_CONSTRAINTS. The audio encoder is
  built without FP16: its DFT front end feeds a log, as in the ONNX and CoreML fp16 exports.
- INT8 is explicit quantization: the QDQ graph from converters/onnx.py's to_int8 (calibrated on
  recorded real inputs), built with INT8 (and FP16 for the float remainder). The engine is then
  inspected, and an "int8" engine with no INT8 layer is an error, never a silent float engine.
- FP32 clears TF32, which would otherwise miss the fp32 parity thresholds on Ampere and newer.
- The info dict (manifest `modules.<m>.info`) records the GPU name, its compute capability and the
  TensorRT version; the backend refuses an engine built for another GPU or TensorRT.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..models.io_spec import ModuleIO
from .onnx import OnnxTarget, to_int8

SUFFIX = ".engine"
WORKSPACE_BYTES = 2 << 30
# Layer types kept fp32 in FP16/INT8 engines (names of trt.LayerType members).
FP32_LAYERS = ("GRID_SAMPLE", "NORMALIZATION", "SOFTMAX", "REDUCE", "UNARY")
FP32_MODULES = ("audio",)  # built without FP16 altogether


def _trt():
    import tensorrt as trt

    return trt


def build_engine(onnx_path: Path, dst: Path, precision: str, part: str) -> dict:
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # TensorRT 10 networks are always explicit-batch; 8.x needs the flag.
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {part}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector needs it
    fp16 = precision in ("fp16", "int8") and part not in FP32_MODULES
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # QDQ scales come from the graph: no calibrator
    pinned: list[str] = []
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = _pin_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    t0 = time.time()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build the {part} engine ({precision}); see its log")
    dst.write_bytes(bytes(plan))
    from ..runtime_cuda.backend_tensorrt import engine_target

    return {
        **engine_target(),
        "build_seconds": round(time.time() - t0, 1),
        "builder_fp16": fp16,
        "fp32_layers": len(pinned),
        "fp32_grid_sample_layers": sum("GRID_SAMPLE" in p for p in pinned),
    }


def _pin_fp32(trt, network) -> list[str]:
    """Constrain the precision-sensitive float layers to fp32; returns "TYPE:name" of each."""
    kinds = {getattr(trt.LayerType, k) for k in FP32_LAYERS if hasattr(trt.LayerType, k)}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in kinds:
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        # Shape arithmetic and integer tensors take no precision constraint.
        if any(o.dtype != trt.float32 or getattr(o, "is_shape_tensor", False) for o in outs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned.append(f"{str(layer.type).split('.')[-1]}:{layer.name}")
    return pinned


def _engine(path: Path):
    trt = _trt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise RuntimeError(f"{path.name}: TensorRT could not deserialise the engine it just built")
    return runtime, engine


def int8_layers(engine) -> int:
    """Layers of a built engine that read or write INT8 tensors (from the engine inspector)."""
    trt = _trt()
    text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    count = 0
    for layer in json.loads(text).get("Layers", []):
        if not isinstance(layer, dict):  # names only: built without DETAILED verbosity
            continue
        tensors = [*layer.get("Inputs", []), *layer.get("Outputs", [])]
        formats = " ".join(
            str(t.get("Format/Datatype", "")) for t in tensors if isinstance(t, dict)
        )
        count += "int8" in formats.lower()
    return count


class TensorRTTarget(OnnxTarget):
    """The ONNX graphs are the engines' source: same tracing, same names, same static shapes."""

    name = "tensorrt"
    suffix = SUFFIX
    parity_backend = "tensorrt"
    gather_sampling = False  # TensorRT's own grid-sample layer, kept fp32 (FP32_LAYERS)
    per_frame_decoder = False  # an engine renders the whole chunk in one launch

    def runtime_aids(self, folder: Path, files: dict[str, str]) -> dict:
        return {}  # engines: nothing of the ONNX runtime's to record

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        from ..runtime_cuda.gpu import probe

        reasons = []
        try:
            _trt()
        except ImportError:
            reasons.append("tensorrt is not installed (pip install tensorrt)")
        ok, why = OnnxTarget.availability()
        if not ok:
            reasons.append(why)
        gpu, why = probe()
        if gpu is None:
            reasons.append(why)  # TensorRT builds and times its kernels on the GPU itself
        return not reasons, "; ".join(reasons)

    def apply_precision(self, precision: str, src: Path, dst: Path, calibration) -> dict:
        """src is the fp32 ONNX graph; dst the engine."""
        info: dict = {}
        graph = src
        if precision == "int8":
            graph = dst.with_name(f"{dst.stem}.qdq.onnx")
            # the native form: its refinement's flow is normalized, that head stays float
            info.update(to_int8(src, graph, calibration, self.float_heads()))
        try:
            info.update(build_engine(graph, dst, precision, dst.stem))
        finally:
            if graph != src:
                graph.unlink(missing_ok=True)
        return info

    def timed_call(self, path: Path, sample: dict):
        return None  # an engine, not an ONNX graph: `edgetalk bench --backend tensorrt` times it

    def checks(self, path: Path, io: ModuleIO, precision: str) -> dict:
        from ..runtime_cuda.backend_tensorrt import engine_io_problems

        _runtime, engine = _engine(path)
        problems = engine_io_problems(engine, io)
        if problems:
            raise RuntimeError(
                f"{path.name}: engine I/O differs from the contract: {'; '.join(problems)}"
            )
        out = {"static_shapes": "pass"}
        if precision == "int8":
            n = int8_layers(engine)
            if n == 0:
                raise RuntimeError(f"{path.name}: an int8 export whose engine has no INT8 layer")
            out["int8_layers"] = n
        return out

    def check_reused(self, part: str, info: dict) -> None:
        """The export reuses finished engines by checkpoint/config key, which does not name the
        GPU: an engine reused from another machine is an error here, not a bundle that fails
        later."""
        from ..errors import EdgeTalkError
        from ..runtime_cuda.backend_tensorrt import engine_mismatch, engine_target

        msg = engine_mismatch(part, info, engine_target())
        if msg:
            raise EdgeTalkError(f"{msg} (this export reused it: add --force)")

    def tool_versions(self) -> dict:
        import onnx
        import onnxruntime
        import torch

        from ..runtime_cuda.backend_tensorrt import engine_target

        gpu = engine_target()
        return {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "tensorrt": gpu.pop("tensorrt"),
            **gpu,
        }


TARGET = TensorRTTarget
