"""CoreML: each module (as apple/ml-stable-diffusion's torch2coreml.py converts them) traced with
torch.jit.trace, converted to an ML program with fixed shapes, saved as .mlpackage.

- FP32: `compute_precision=FLOAT32`, deployment target macOS 14 / iOS 17 (spec 8, MIL opset CoreML7).
- FP16: the fp32 program is loaded back from the package and re-converted with
  `ct.transform.FP16ComputePrecision(op_selector=...)`. Ops that fp16 breaks stay fp32: resample
  (grid_sample), bilinear upsampling, normalisation and reductions, softmax, log/exp/pow/div, sin/cos,
  and everything that feeds a log (the DFT/mel front end) or a sin/cos (RoPE and flow-time angles).
  Graph inputs and outputs stay fp32, per the contract.
- INT8: the fp16 program's conv/linear weights become 8-bit via
  `coremltools.optimize.coreml.linear_quantize_weights` (linear symmetric, int8, per output
  channel); activations stay fp16 (the fp32 ops above stay fp32). The DFT/mel front end is left
  float (log magnifies its error), and so are tensors of <= INT8_WEIGHT_THRESHOLD elements. The
  weights that stay float are listed for the manifest; an "int8" package without 8-bit weight
  blobs is an error, never a silent fp16 file.

CoreML prediction needs macOS, so on Linux `checks` verifies what can be verified without it: the
saved spec (names, fixed shapes, dtypes, model type, deployment target) and, for int8, that the
MIL program holds constexpr dequantize ops whose payload blobs really are 8-bit.

Conversion fix (coremltools 9.0 with NumPy >= 2.4): torch.jit.trace records `aten::Int` on shape
values; coremltools 9.0 folds them with `int(val)` where `val` is a 1-element 1-D array, which
NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars",
apple/coremltools#2633, fixed upstream by #2632 after 9.0). `_numpy_scalar_cast_fix` swaps in a
translation of `int`/`bool` that takes the array's single element. It is the target's
`tool_patches`: in force only inside export/patching.py's context around one conversion, never at
import, and coremltools' own translations are back after it, error or not.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..models.edgetalk import EdgeTalkModel
from ..models.io_spec import ModuleIO
from .graph import ModuleGraph, example_args
from .target import Target

SUFFIX = ".mlpackage"
DEPLOYMENT_TARGET = "macOS14"  # spec version 8 == iOS17; MIL opset "CoreML7"
SPEC_VERSION = 8
# MIL op types that stay fp32 in fp16 and int8 packages.
FP16_KEEP = (
    "resample",
    "upsample_bilinear",
    "resize_bilinear",
    "crop_resize",
    "layer_norm",
    "instance_norm",
    "batch_norm",
    "l2_norm",
    "reduce_mean",
    "reduce_sum",
    "reduce_l2_norm",
    "softmax",
    "log",
    "exp",
    "pow",
    "sqrt",
    "rsqrt",
    "real_div",
    "inverse",
    "sin",
    "cos",
)
# Everything upstream of these also stays fp32 (the DFT/mel front end; RoPE and time angles).
FP16_KEEP_UPSTREAM = ("log", "sin", "cos")
FP32_POLICY = (
    "resample/upsample, normalisation, reductions, softmax, log/exp/pow/div/sqrt, sin/cos and "
    "every op upstream of log, sin or cos stay fp32"
)
QUANT_OP_TYPES = ("conv", "linear")  # ops whose constant weights become 8-bit
INT8_WEIGHT_THRESHOLD = 128  # elements; smaller weight tensors stay float
DEQUANT_OPS = (
    "constexpr_affine_dequantize",  # iOS16/17 linear quantization
    "constexpr_blockwise_shift_scale",  # iOS18 linear quantization
)
_EIGHT_BIT = {"INT8": "read_int8_data", "UINT8": "read_uint8_data"}
_ARRAY_DTYPES = {"float32": "FLOAT32", "float16": "FLOAT16", "int32": "INT32"}


# ---- coremltools plumbing -------------------------------------------------------------------
def _ct():
    """Import coremltools without its import-time chatter on Linux (the missing macOS runtime
    proxies, the untested-torch-version note); both are expected here and are not errors."""
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import coremltools as ct
    finally:
        log.setLevel(level)
    return ct


@contextlib.contextmanager
def _quiet():
    """coremltools logs warnings and draws tqdm bars on stderr for every pass; keep them out of
    the export's own progress display. What was captured is replayed if the conversion fails."""
    log = logging.getLogger("coremltools")
    level = log.level
    buf = _io.StringIO()
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        sys.stderr.write(buf.getvalue()[-4000:])
        raise
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _numpy_scalar_cast_fix(counter: list[int]):
    """See the module docstring. Restores coremltools' own translations on exit."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    def fixed(original, pytype):
        def translate(context, node):
            x = _get_inputs(context, node, expected=1)[0]
            val = x.val if x.can_be_folded_to_const() else None
            if val is not None and np.ndim(val) > 0 and np.size(val) == 1:
                item = pytype(np.asarray(val).reshape(-1)[0])
                context.add(mb.const(val=item, name=node.name), node.name)
                counter[0] += 1
                return
            original(context, node)

        return translate

    saved = {}
    for name, pytype in (("int", int), ("bool", bool)):
        saved[name] = _TORCH_OPS_REGISTRY.get_func(name)
        _TORCH_OPS_REGISTRY.set_func_by_name(fixed(saved[name], pytype), name)
    try:
        yield
    finally:
        for name, func in saved.items():
            _TORCH_OPS_REGISTRY.set_func_by_name(func, name)


def _target(ct):
    return getattr(ct.target, DEPLOYMENT_TARGET)


def _load_program(mlmodel):
    """The MIL program held by a saved or converted ML program model."""
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = mlmodel.get_spec()
    return load(spec, spec.specificationVersion, mlmodel.weights_dir)


def _open(path: Path):
    ct = _ct()
    with _quiet():
        return ct.models.MLModel(str(path), skip_model_load=True)


def _describe(mlmodel, part: str, io: ModuleIO | None, precision: str, extra: dict | None = None):
    mlmodel.author = "EdgeTalk"
    mlmodel.version = __version__
    mlmodel.short_description = f"EdgeTalk {part} module ({precision}, static shapes)"
    meta = mlmodel.user_defined_metadata
    meta["edgetalk.module"] = part
    meta["edgetalk.precision"] = precision
    meta["edgetalk.version"] = __version__
    for k, v in (extra or {}).items():
        meta[k] = str(v)
    if io is not None:
        for t in io.inputs:
            mlmodel.input_description[t.name] = f"{t.dtype}{list(t.shape)}"
        for t in io.outputs:
            mlmodel.output_description[t.name] = f"{t.dtype}{list(t.shape)}"


def _copy_descriptions(src, dst) -> None:
    for name in src.input_description:
        dst.input_description[name] = src.input_description[name]
    for name in src.output_description:
        dst.output_description[name] = src.output_description[name]


# ---- fp32: trace and convert ----------------------------------------------------------------
def _trace(model: EdgeTalkModel, part: str, io: ModuleIO, sample) -> torch.jit.ScriptModule:
    """Trace on a recorded real call; check the trace against eager on a second input (zeros),
    so a shape or branch baked in by the tracer is caught here, not on a Mac."""
    graph = ModuleGraph(model, part, io).eval()
    args = example_args(io, sample)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, args, check_trace=False)
        other = (
            example_args(io, None)
            if sample is not None
            else tuple(torch.rand_like(a) for a in args)
        )
        for a, b, name in zip(graph(*other), traced(*other), io.output_names, strict=True):
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                err = float((a - b).abs().max())
                raise RuntimeError(
                    f"{part}: the traced graph disagrees with eager PyTorch on {name} "
                    f"(max abs diff {err:.3g}); the module does something the tracer cannot record"
                )
    return traced


# ---- fp16 and int8 --------------------------------------------------------------------------
def _ops(prog) -> list:
    return list(prog.functions["main"].operations)


def _upstream_of(prog, op_types) -> set[str]:
    """Names of every op whose output reaches (directly or not) an op of one of op_types."""
    memo: dict[str, bool] = {}

    def reaches(op) -> bool:
        if op.name in memo:
            return memo[op.name]
        memo[op.name] = False
        hit = any(
            child.op_type in op_types or reaches(child)
            for out in op.outputs
            for child in out.child_ops
        )
        memo[op.name] = hit
        return hit

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))
    try:
        return {op.name for op in _ops(prog) if reaches(op)}
    finally:
        sys.setrecursionlimit(limit)


def _compute_dtypes(prog) -> dict:
    """Per compute op (not const/cast/constexpr): fp16 or fp32, from its first output's dtype."""
    from coremltools.converters.mil.mil import types

    counts: dict[str, Counter] = {"fp16": Counter(), "fp32": Counter()}
    for op in _ops(prog):
        if op.op_type in ("const", "cast") or op.op_type.startswith("constexpr_") or not op.outputs:
            continue
        dtype = op.outputs[0].dtype
        name = types.builtin_to_string(dtype) if dtype is not None else ""
        if name in counts:
            counts[name][op.op_type] += 1
    return counts


def _fp16_model(src: Path):
    ct = _ct()
    base = _open(src)
    with _quiet():
        prog = _load_program(base)
    keep_names = _upstream_of(prog, FP16_KEEP_UPSTREAM)

    def selector(op) -> bool:  # True = compute this op in fp16
        return op.op_type not in FP16_KEEP and op.name not in keep_names

    with _quiet():
        m16 = ct.convert(
            prog,
            convert_to="mlprogram",
            minimum_deployment_target=_target(ct),
            compute_precision=ct.transform.FP16ComputePrecision(op_selector=selector),
            compute_units=ct.ComputeUnit.ALL,
            skip_model_load=True,
        )
    meta = dict(base.user_defined_metadata)
    part = meta.get("edgetalk.module", src.name.split(".")[0])
    _describe(m16, part, None, "fp16", {k: v for k, v in meta.items() if "cast_fix" in k})
    _copy_descriptions(base, m16)
    return m16, part, meta


def _precision_info(mlmodel) -> dict:
    with _quiet():
        prog = _load_program(mlmodel)
    d = _compute_dtypes(prog)
    return {
        "fp16_ops": sum(d["fp16"].values()),
        "fp32_ops": sum(d["fp32"].values()),
        "fp32_op_types": dict(sorted(d["fp32"].items())),
    }


def to_fp16(src: Path, dst: Path) -> dict:
    m16, _, meta = _fp16_model(src)
    with _quiet():
        m16.save(str(dst))
    info = {"compute_precision": "fp16", "fp32_policy": FP32_POLICY}
    info.update(_precision_info(m16))
    if info["fp16_ops"] == 0:
        raise RuntimeError(f"{dst.name}: the fp16 pass left no op in fp16")
    return info | _fix_note(meta)


def to_int8(src: Path, dst: Path) -> dict:
    import coremltools.optimize.coreml as cto

    m16, part, meta = _fp16_model(src)
    with _quiet():
        prog = _load_program(m16)
    front_end = _upstream_of(prog, ("log",))
    op_cfg = cto.OpLinearQuantizerConfig(
        mode="linear_symmetric",
        dtype="int8",
        granularity="per_channel",
        weight_threshold=INT8_WEIGHT_THRESHOLD,
    )
    skip: dict[str, None] = {}
    candidates, left_float = [], {}
    for op in _ops(prog):
        if op.op_type != "const" or op.outputs[0].rank < 2:
            continue
        users = list(op.outputs[0].child_ops)
        if not users or not all(u.op_type in QUANT_OP_TYPES for u in users):
            continue
        value = np.asarray(op.outputs[0].val)
        if not np.issubdtype(value.dtype, np.floating):
            continue
        size = int(value.size)
        if op.name in front_end:
            skip[op.name] = None
            left_float[op.name] = "front end (feeds log)"
        elif size <= INT8_WEIGHT_THRESHOLD:
            left_float[op.name] = f"small ({size} elements)"
        else:
            candidates.append((op.name, size))
    config = cto.OptimizationConfig(
        op_type_configs={t: op_cfg for t in QUANT_OP_TYPES}, op_name_configs=skip
    )
    with _quiet():
        m8 = cto.linear_quantize_weights(m16, config)
    _describe(m8, part, None, "int8", {k: v for k, v in meta.items() if "cast_fix" in k})
    _copy_descriptions(m16, m8)
    with _quiet():
        m8.save(str(dst))
    rep = int8_report(dst)
    if rep["int8_weight_tensors"] == 0:
        raise RuntimeError(f"{dst.name}: INT8 quantization produced no 8-bit weights")
    info = {
        "compute_precision": "fp16",
        "weights": "int8 linear_symmetric per_channel",
        "weight_threshold_elements": INT8_WEIGHT_THRESHOLD,
        "int8_weight_tensors": rep["int8_weight_tensors"],
        "int8_weight_params": rep["int8_weight_params"],
        "quantizable_weight_tensors": len(candidates),
        "float_weights": left_float,
        "fp32_policy": FP32_POLICY,
    }
    info.update(_precision_info(m8))
    return info | _fix_note(meta)


def _fix_note(meta: dict) -> dict:
    n = int(meta.get("edgetalk.numpy_cast_fix_nodes", 0) or 0)
    return {"numpy_cast_fix_nodes": n} if n else {}


# ---- checks on the saved spec (no macOS needed) ---------------------------------------------
def _check_io(path: Path, io: ModuleIO) -> dict:
    """Every input and output of the saved model has the contract's name, fixed shape and dtype."""
    from coremltools.proto import FeatureTypes_pb2 as ft

    spec = _open(path).get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"{path.name}: not an ML program (holds {spec.WhichOneof('Type')})")
    if spec.specificationVersion < SPEC_VERSION:
        raise ValueError(
            f"{path.name}: spec version {spec.specificationVersion}, expected >= {SPEC_VERSION}"
        )
    for kind, declared, got in (
        ("input", io.inputs, spec.description.input),
        ("output", io.outputs, spec.description.output),
    ):
        names = [f.name for f in got]
        if names != [t.name for t in declared]:
            raise ValueError(
                f"{path.name}: {kind}s are {names}, contract says {[t.name for t in declared]}"
            )
        for t, f in zip(declared, got, strict=True):
            if f.type.WhichOneof("Type") != "multiArrayType":
                raise ValueError(f"{path.name}: {kind} {t.name} is not a multi-array")
            arr = f.type.multiArrayType
            if arr.WhichOneof("ShapeFlexibility") is not None:
                raise ValueError(f"{path.name}: {kind} {t.name} has a flexible shape")
            shape = tuple(int(d) for d in arr.shape)
            if shape != t.shape:
                raise ValueError(
                    f"{path.name}: {kind} {t.name} is {shape}, contract says {t.shape}"
                )
            dtype = ft.ArrayFeatureType.ArrayDataType.Name(arr.dataType)
            if dtype != _ARRAY_DTYPES.get(t.dtype):
                raise ValueError(
                    f"{path.name}: {kind} {t.name} is {dtype}, contract says {t.dtype}"
                )
    # The MIL function itself must agree: static dimensions, same names.
    fn = spec.mlProgram.functions["main"]
    for v in fn.inputs:
        dims = v.type.tensorType.dimensions
        if any(d.WhichOneof("dimension") != "constant" for d in dims):
            raise ValueError(f"{path.name}: MIL input {v.name} has a symbolic dimension")
    if list(fn.block_specializations[fn.opset].outputs) != list(io.output_names):
        raise ValueError(f"{path.name}: MIL outputs differ from the contract's names")
    return {"opset": fn.opset, "spec_version": spec.specificationVersion}


def _walk_ops(block):
    for op in block.operations:
        yield op
        for b in op.blocks:
            yield from _walk_ops(b)


def int8_report(path: Path) -> dict:
    """Constexpr dequantize ops whose payload is declared 8-bit in the spec and whose weight blob
    really is stored as 8-bit (the blob reader checks the blob's own dtype metadata)."""
    from coremltools.libmilstoragepython import _BlobStorageReader
    from coremltools.proto import MIL_pb2

    mlmodel = _open(path)
    spec = mlmodel.get_spec()
    root = Path(mlmodel.weights_dir).parent
    fn = spec.mlProgram.functions["main"]
    ops = list(_walk_ops(fn.block_specializations[fn.opset]))
    const_vals = {
        o.name: op.attributes["val"]
        for op in ops
        if op.type == "const" and "val" in op.attributes
        for o in op.outputs
    }
    readers: dict[str, object] = {}
    tensors, params, op_types = 0, 0, Counter()
    for op in ops:
        if op.type not in DEQUANT_OPS:
            continue
        if "quantized_data" in op.attributes:  # iOS16/17 form
            value = op.attributes["quantized_data"]
        else:  # iOS18 form: data is an input bound to a const
            args = op.inputs["data"].arguments if "data" in op.inputs else []
            value = const_vals.get(args[0].name) if args else None
        if value is None:
            continue
        t = value.type.tensorType
        dtype = MIL_pb2.DataType.Name(t.dataType)
        if dtype not in _EIGHT_BIT or value.WhichOneof("value") != "blobFileValue":
            continue
        count = int(np.prod([d.constant.size for d in t.dimensions]))
        blob = value.blobFileValue
        file = root / blob.fileName.replace("@model_path/", "")
        if str(file) not in readers:
            readers[str(file)] = _BlobStorageReader(str(file))
        data = getattr(readers[str(file)], _EIGHT_BIT[dtype])(blob.offset)
        if data.size != count:
            raise RuntimeError(
                f"{path.name}: 8-bit blob of {op.outputs[0].name} holds "
                f"{data.size} values, the spec declares {count}"
            )
        tensors += 1
        params += count
        op_types[op.type] += 1
    return {
        "int8_weight_tensors": tensors,
        "int8_weight_params": params,
        "dequantize_ops": dict(op_types),
    }


def _fp16_tensor_count(path: Path) -> int:
    from coremltools.proto import MIL_pb2

    spec = _open(path).get_spec()
    fn = spec.mlProgram.functions["main"]
    fp16 = MIL_pb2.DataType.Value("FLOAT16")
    return sum(
        1
        for op in _walk_ops(fn.block_specializations[fn.opset])
        if op.type not in ("const",) and not op.type.startswith("constexpr_")
        for o in op.outputs
        if o.type.WhichOneof("type") == "tensorType" and o.type.tensorType.dataType == fp16
    )


# ---- the target ----------------------------------------------------------------------------
class CoreMLTarget(Target):
    name = "coreml"
    suffix = SUFFIX
    parity_backend = "coreml"  # Core ML prediction: macOS only; elsewhere parity is "not run"

    def __init__(self):
        self._cast_fixes: list[int] | None = None  # counts the fix's uses while it is in force

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            ct = _ct()
            import coremltools.libmilstoragepython  # noqa: F401  (writes ML program weights)
        except ImportError as e:
            return (
                False,
                f"coremltools is not installed or incomplete ({e}); pip install 'edgetalk[coreml]'",
            )
        major = int(ct.__version__.split(".")[0])
        if major < 8:
            return False, f"coremltools {ct.__version__} is too old; 8 or newer is needed"
        return True, ""

    @contextlib.contextmanager
    def tool_patches(self):
        counter = [0]
        with _numpy_scalar_cast_fix(counter):
            self._cast_fixes = counter
            try:
                yield
            finally:
                self._cast_fixes = None

    def convert(self, model, part: str, io: ModuleIO, path: Path, sample: dict | None) -> None:
        if self._cast_fixes is None:
            raise RuntimeError("CoreMLTarget.convert runs inside export.patching.export_patches")
        ct = _ct()
        traced = _trace(model, part, io, sample)
        with _quiet():
            mlmodel = ct.convert(
                traced,
                inputs=[
                    ct.TensorType(name=t.name, shape=t.shape, dtype=np.float32) for t in io.inputs
                ],
                outputs=[ct.TensorType(name=t.name) for t in io.outputs],
                convert_to="mlprogram",
                minimum_deployment_target=_target(ct),
                compute_precision=ct.precision.FLOAT32,
                compute_units=ct.ComputeUnit.ALL,
                skip_model_load=True,
            )
        fixed = self._cast_fixes[0]
        _describe(mlmodel, part, io, "fp32", {"edgetalk.numpy_cast_fix_nodes": fixed})
        with _quiet():
            mlmodel.save(str(path))
        _check_io(path, io)

    def apply_precision(self, precision: str, src: Path, dst: Path, calibration) -> dict:
        """Weight-only int8 needs no calibration data; activations are not quantized on CoreML."""
        if precision == "fp32":
            meta = dict(_open(src).user_defined_metadata)
            src.replace(dst)
            info = {"compute_precision": "fp32", "deployment_target": DEPLOYMENT_TARGET}
            return info | _precision_info(_open(dst)) | _fix_note(meta)
        if precision == "fp16":
            return to_fp16(src, dst)
        return to_int8(src, dst)

    def checks(self, path: Path, io: ModuleIO, precision: str) -> dict:
        out = {"spec_io": "pass", "model_type": "mlProgram", "deployment_target": DEPLOYMENT_TARGET}
        out |= _check_io(path, io)
        rep = int8_report(path)
        fp16 = _fp16_tensor_count(path)
        if precision == "int8" and rep["int8_weight_tensors"] == 0:
            raise RuntimeError(f"{path.name}: no 8-bit weights in an int8 export")
        if precision != "int8" and rep["int8_weight_tensors"]:
            raise RuntimeError(f"{path.name}: 8-bit weights in a {precision} export")
        if precision in ("fp16", "int8") and fp16 == 0:
            raise RuntimeError(f"{path.name}: no fp16 compute in a {precision} export")
        if precision == "fp32" and fp16:
            raise RuntimeError(f"{path.name}: {fp16} fp16 tensors in an fp32 export")
        out["fp16_tensors"] = fp16
        if precision == "int8":
            out["int8_weight_tensors"] = rep["int8_weight_tensors"]
            out["int8_weights_check"] = "pass"
        return out

    def tool_versions(self) -> dict:
        ct = _ct()
        return {
            "torch": torch.__version__,
            "coremltools": ct.__version__,
            "numpy": np.__version__,
            "coreml_deployment_target": DEPLOYMENT_TARGET,
        }


TARGET = CoreMLTarget
