"""MLX: one convert_<part>() per module writing MLX-layout safetensors, then FP16 or INT8.

The graphs are code (converters/mlx_models.py, a port of the torch modules); the bundle holds one
safetensors file of weights per module, with metadata that makes it self-describing: the module,
the model config, the precision and, for int8, the bits, group size and the exact layers that
were quantized. The MLX backend rebuilds each module from that metadata before loading weights.

- FP16: every weight stored as float16 and the module computes in float16 (inputs and outputs
  stay float32). The DFT/log-mel front end, RoPE/time tables, the Euler state, the motion
  statistics and all resampling (affine grid, flow, interpolate, grid_sample, alpha blend) stay
  float32.
- INT8: `mlx.nn.quantize(bits=8, group_size=32)`: 8-bit affine weights with a float scale and
  bias per 32 weights, weight-only (activations stay float32). Linear layers whose input size is
  not a multiple of 32 are skipped (they stay float32 and are listed). Every convolution is
  really 8-bit: its weight is stored with mx.quantize (reduction dim zero-padded to the group)
  and it runs as im2col + mx.quantized_matmul. The fixed DFT/mel front end is not a layer and
  stays float32. An "int8" file without 8-bit weights is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..models.config import ModelConfig
from ..models.io_spec import ModuleIO

SUFFIX = ".safetensors"
FORMAT = "edgetalk-mlx"
FORMAT_VERSION = "1"
BITS = 8
GROUP_SIZE = 32
FP16_FLOAT32_PARTS = [
    "audio: DFT conv1d, power, mel matmul, log",
    "generator: RoPE and time-embedding tables, Euler state, motion mean/std",
    "decoder: affine grid, flow, bilinear interpolate, grid_sample, alpha blend",
    "appearance: spatial mean",
]


def _save(path: Path, arrays: dict, meta: dict) -> None:
    import mlx.core as mx

    mx.save_safetensors(str(path), arrays, metadata={k: str(v) for k, v in meta.items()})


def read(path: Path) -> tuple[dict, dict]:
    """(arrays, metadata) of an MLX module file; a clear error if it is not one."""
    import mlx.core as mx

    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises plain RuntimeError/ValueError for unreadable files
        raise ValueError(f"{Path(path).name} is not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{Path(path).name} is not an EdgeTalk MLX module file (no metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{Path(path).name} has MLX format version {meta.get('format_version')!r}; "
            f"this EdgeTalk reads {FORMAT_VERSION}"
        )
    return arrays, meta


def structure(meta: dict, cfg: ModelConfig | None = None):
    """An unloaded MLX module with the file's precision structure (dtypes, quantized layers)."""
    from . import mlx_models as M

    cfg = cfg or ModelConfig.from_dict(json.loads(meta["config"]))
    module = M.build(meta["module"], cfg)
    precision = meta.get("precision")
    if precision == "int8":
        M.apply_precision(
            module,
            "int8",
            group_size=int(meta["group_size"]),
            bits=int(meta["bits"]),
            only=json.loads(meta["quantized_layers"]),
        )
    elif precision in ("fp16", "fp32"):
        M.apply_precision(module, precision)
    else:
        raise ValueError(f"unknown precision {precision!r} in the file's metadata")
    return module


def verify(module, arrays: dict, fname: str) -> None:
    """Every tensor the structure needs is in the file with its exact shape and dtype; no extras."""
    from mlx.utils import tree_flatten

    want = dict(tree_flatten(module.parameters()))
    if extra := sorted(set(arrays) - set(want)):
        raise ValueError(f"{fname}: unexpected tensors {extra[:3]}")
    for k, v in want.items():
        a = arrays.get(k)
        if a is None:
            raise ValueError(f"{fname}: tensor {k} is missing")
        if a.shape != v.shape or a.dtype != v.dtype:
            raise ValueError(
                f"{fname}: tensor {k} is {a.dtype}{list(a.shape)}, expected {v.dtype}{list(v.shape)}"
            )


def build_from_file(path: Path, cfg: ModelConfig | None = None):
    """The MLX module of a saved file, with its precision's structure and its weights loaded."""
    import mlx.core as mx

    arrays, meta = read(path)
    module = structure(meta, cfg)
    verify(module, arrays, Path(path).name)
    module.load_weights(list(arrays.items()), strict=True)
    module.eval()
    mx.eval(module.parameters())
    return module, meta


# ---- convert -------------------------------------------------------------------------------------
def _convert(model, part: str, io: ModuleIO, path: Path, sample=None) -> Path:
    import mlx.core as mx

    from . import mlx_models as M

    weights = {k: mx.array(v) for k, v in M.torch_to_mlx(model.module(part)).items()}
    mlx_module = M.build(part, model.cfg)
    mlx_module.load_weights(list(weights.items()), strict=True)  # names and shapes line up
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "module": part,
        "config": model.cfg.to_json(),
        "precision": "fp32",
        "layout": "mlx channels-last: conv2d OHWI, conv1d OKI",
        "io": json.dumps(io.to_dict()),
    }
    _save(Path(path), weights, meta)
    return Path(path)


def convert_appearance(model, io, path, sample=None):
    return _convert(model, "appearance", io, path, sample)


def convert_audio(model, io, path, sample=None):
    return _convert(model, "audio", io, path, sample)


def convert_generator(model, io, path, sample=None):
    return _convert(model, "generator", io, path, sample)


def convert_decoder(model, io, path, sample=None):
    return _convert(model, "decoder", io, path, sample)


CONVERTERS = {
    "appearance": convert_appearance,
    "audio": convert_audio,
    "generator": convert_generator,
    "decoder": convert_decoder,
}


# ---- precision -----------------------------------------------------------------------------------
def finish(precision: str, src: Path, dst: Path, calibration=None) -> dict:
    """fp32: the converted file as it is. fp16: weights cast. int8: nn.quantize (8-bit)."""
    from mlx.utils import tree_flatten

    from . import mlx_models as M

    src, dst = Path(src), Path(dst)
    if precision == "fp32":
        src.replace(dst)
        return {"weights": "float32", "compute": "float32"}
    module, meta = build_from_file(src)
    meta = dict(meta, precision=precision)
    if precision == "fp16":
        M.apply_precision(module, "fp16")
        info = {
            "weights": "float16",
            "compute": "float16",
            "io": "float32",
            "float32_parts": FP16_FLOAT32_PARTS,
        }
        if module.fp32_params:
            info["float32_params"] = list(module.fp32_params)
    elif precision == "int8":
        candidates = M.float_layers(module)
        M.apply_precision(module, "int8", group_size=GROUP_SIZE, bits=BITS)
        quantized = M.quantized_layers(module)
        if not quantized:
            raise RuntimeError(f"{dst.name}: INT8 quantization produced no 8-bit weights")
        kept = [p for p in candidates if p not in set(quantized)]
        meta.update(
            bits=BITS, group_size=GROUP_SIZE, mode="affine", quantized_layers=json.dumps(quantized)
        )
        info = {
            "bits": BITS,
            "group_size": GROUP_SIZE,
            "mode": "affine (per-group scale and bias), weight-only",
            "activations": "float32",
            "quantized_layers": quantized,
            "float_layers": kept,
            "float_reason": f"Linear input size not a multiple of {GROUP_SIZE}",
            "float_parts": ["audio: fixed DFT/mel front end (constants, feeds a log)"]
            if meta["module"] == "audio"
            else [],
        }
    else:
        raise ValueError(f"unknown precision {precision!r}")
    arrays = dict(tree_flatten(module.parameters()))
    _save(dst, arrays, meta)
    return info


# ---- checks --------------------------------------------------------------------------------------
def checks(path: Path, io: ModuleIO, precision: str) -> dict:
    """The file is what its precision says (names, shapes, dtypes; real 8-bit weights for int8),
    and the module it builds maps the contract's inputs to the contract's outputs."""
    import mlx.core as mx

    from . import mlx_models as M

    path = Path(path)
    arrays, meta = read(path)
    if meta.get("precision") != precision:
        raise RuntimeError(
            f"{path.name}: file says precision {meta.get('precision')}, not {precision}"
        )
    try:
        module, _ = build_from_file(path)
    except ValueError as e:
        raise RuntimeError(str(e)) from None
    dtypes = sorted({str(a.dtype).replace("mlx.core.", "") for a in arrays.values()})
    out: dict = {"tensors": len(arrays), "dtypes": dtypes}
    if precision == "fp16":
        n16 = sum(a.dtype == mx.float16 for a in arrays.values())
        if n16 == 0:
            raise RuntimeError(f"{path.name}: no float16 weights in an fp16 export")
    if precision == "int8":
        quantized = json.loads(meta.get("quantized_layers", "[]"))
        if int(meta.get("bits", 0)) != 8:
            raise RuntimeError(f"{path.name}: int8 export stored with bits={meta.get('bits')}")
        packed = 0
        for layer in quantized:
            w, s, b = (arrays.get(f"{layer}.{n}") for n in ("weight", "scales", "biases"))
            if w is None or s is None or b is None or w.dtype != mx.uint32:
                raise RuntimeError(f"{path.name}: layer {layer} has no packed 8-bit weight")
            if w.shape[-1] * 32 // BITS != s.shape[-1] * int(meta["group_size"]):
                raise RuntimeError(f"{path.name}: layer {layer} is not packed at 8 bits")
            packed += 1
        if packed == 0:
            raise RuntimeError(f"{path.name}: no 8-bit weights in an int8 export")
        int8_bytes = sum(arrays[f"{q}.weight"].nbytes for q in quantized)
        out.update(int8_layers=packed, int8_weight_bytes=int(int8_bytes))
    # Run the contract's shapes once (zeros) and compare names and shapes of the outputs.
    feed = {t.name: np.zeros(t.shape, np.float32) for t in io.inputs}
    got = module(**M.to_mx_inputs(feed, io.input_names))
    for t in io.outputs:
        if t.name not in got:
            raise RuntimeError(f"{path.name}: module returns no {t.name!r}")
        if tuple(got[t.name].shape) != t.shape or got[t.name].dtype != mx.float32:
            raise RuntimeError(
                f"{path.name}: output {t.name} is {got[t.name].dtype}{list(got[t.name].shape)}, "
                f"contract says float32{list(t.shape)}"
            )
        if not np.isfinite(np.array(got[t.name])).all():
            raise RuntimeError(f"{path.name}: output {t.name} is not finite on zero inputs")
    out["static_shapes"] = "pass"
    return out


def parity_backend(bundle):
    from ..runtime.backend_mlx import MlxBackend

    return MlxBackend.from_bundle(bundle)


def tool_versions() -> dict:
    import mlx.core as mx
    import safetensors
    import torch

    return {
        "torch": torch.__version__,
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def availability():
    try:
        import mlx.core  # noqa: F401
        import mlx.nn  # noqa: F401
    except ImportError as e:
        return False, (
            f"mlx is not importable ({e}); pip install 'edgetalk[mlx]' "
            "(on Linux this installs mlx[cpu])"
        )
    return True, ""
