"""One edgetalk-mlx safetensors file -> the MLX module it describes, with its weights loaded.

A file holds one module's weights, its fixed constants (names starting with "_": the audio
front end's DFT basis and mel filterbank, format version 2) and metadata that makes it
self-describing: the module, the model config, the precision and, for int8, the bits, group size
and the exact layers that were quantized. `load` rebuilds the module for the config with the
file's constants, gives it that precision's structure (the same layers quantized), checks every
tensor's name, shape and dtype, then loads the weights. converters/mlx.py writes these files;
this module only reads them. Version 1 files (no constants) still load where torch is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ...models.config import ModelConfig
from ...models.constants import MODULES
from .appearance import AppearanceStage
from .audio_encoder import AudioEncoder
from .decoder import Decoder
from .generator import MotionGenerator
from .layers import Module, QuantizedConv

FORMAT = "edgetalk-mlx"
FORMAT_VERSION = "2"
READS = ("1", "2")  # 1: the audio constants are rebuilt with torch

CLASSES = {
    "appearance": AppearanceStage,
    "audio": AudioEncoder,
    "generator": MotionGenerator,
    "decoder": Decoder,
}


def build(part: str, cfg: ModelConfig, constants: dict | None = None) -> Module:
    """The float32 MLX module `part` for `cfg`, weights not loaded. `constants`: its fixed arrays
    (`Module.constant_names`); None rebuilds them with torch."""
    if part not in CLASSES:
        raise KeyError(f"unknown module {part!r}; modules are {MODULES}")
    cls = CLASSES[part]
    return cls(cfg, constants) if cls.constant_names else cls(cfg)


def quantized_layers(module: nn.Module) -> list[str]:
    """Paths of the layers that hold quantized weights."""
    kinds = (nn.QuantizedLinear, QuantizedConv)
    return sorted(p for p, m in module.named_modules() if isinstance(m, kinds))


def apply_precision(
    module: Module,
    precision: str,
    group_size: int = 32,
    bits: int = 8,
    only: list[str] | None = None,
) -> Module:
    """Turn a float32 module (weights loaded or not) into the precision's structure.

    fp16: every parameter cast to float16 (but `fp32_params`) and float16 compute. int8:
    nn.quantize over exactly the layer paths in `only` (the converter picks them; a file records
    them), each of which must be quantizable."""
    if precision == "fp32":
        return module
    if precision == "fp16":
        keep = {k: getattr(module, k) for k in module.fp32_params}
        module.set_dtype(mx.float16)
        for k, v in keep.items():
            setattr(module, k, v)
        module.dtype = mx.float16
        return module
    if precision == "int8":
        chosen = set(only or ())

        def pred(path, m):
            return hasattr(m, "to_quantized") and path in chosen

        nn.quantize(module, group_size=group_size, bits=bits, mode="affine", class_predicate=pred)
        return module
    raise ValueError(f"unknown precision {precision!r}")


def read(path: Path) -> tuple[dict, dict]:
    """(arrays, metadata) of an MLX module file; a clear error if it is not one."""
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises plain RuntimeError/ValueError for unreadable files
        raise ValueError(f"{Path(path).name} is not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{Path(path).name} is not an EdgeTalk MLX module file (no metadata)")
    if meta.get("format_version") not in READS:
        raise ValueError(
            f"{Path(path).name} has MLX format version {meta.get('format_version')!r}; "
            f"this EdgeTalk reads {' and '.join(READS)}"
        )
    return arrays, meta


def split_constants(arrays: dict) -> tuple[dict, dict]:
    """(weights, constants): a file's constants are its tensors whose names start with "_"."""
    weights = {k: v for k, v in arrays.items() if not k.startswith("_")}
    return weights, {k: v for k, v in arrays.items() if k.startswith("_")}


def check_constants(meta: dict, cfg: ModelConfig, constants: dict, fname: str) -> dict | None:
    """The file's constants, exactly the ones its module needs (float32, the config's shapes);
    None for a version 1 file, which has none."""
    if meta.get("module") not in CLASSES:
        raise ValueError(f"{fname} holds an unknown module {meta.get('module')!r}")
    if meta.get("format_version") == "1" and not constants:
        return None
    shapes = CLASSES[meta["module"]].constant_shapes(cfg)
    if extra := sorted(set(constants) - set(shapes)):
        raise ValueError(f"{fname}: unexpected constants {extra[:3]}")
    for k, shape in shapes.items():
        a = constants.get(k)
        if a is None:
            raise ValueError(f"{fname}: constant {k} is missing")
        if tuple(a.shape) != shape or a.dtype != mx.float32:
            raise ValueError(
                f"{fname}: constant {k} is {a.dtype}{list(a.shape)}, expected float32{list(shape)}"
            )
    return constants


def structure(meta: dict, cfg: ModelConfig | None = None, constants: dict | None = None) -> Module:
    """An unloaded MLX module with the file's precision structure (dtypes, quantized layers)."""
    cfg = cfg or ModelConfig.from_dict(json.loads(meta["config"]))
    module = build(meta["module"], cfg, constants)
    precision = meta.get("precision")
    if precision == "int8":
        apply_precision(
            module,
            "int8",
            group_size=int(meta["group_size"]),
            bits=int(meta["bits"]),
            only=json.loads(meta["quantized_layers"]),
        )
    elif precision in ("fp16", "fp32"):
        apply_precision(module, precision)
    else:
        raise ValueError(f"unknown precision {precision!r} in the file's metadata")
    return module


def verify(module: nn.Module, arrays: dict, fname: str) -> None:
    """Every tensor the structure needs is in the file with its exact shape and dtype; no extras."""
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


def load(path: Path, cfg: ModelConfig | None = None) -> tuple[Module, dict]:
    """(module, metadata) of a saved file: its precision's structure with its weights loaded.
    ValueError, one line, when the file is not a valid EdgeTalk MLX module file."""
    arrays, meta = read(path)
    fname = Path(path).name
    arrays, constants = split_constants(arrays)
    cfg = cfg or ModelConfig.from_dict(json.loads(meta["config"]))
    module = structure(meta, cfg, check_constants(meta, cfg, constants, fname))
    verify(module, arrays, fname)
    module.load_weights(list(arrays.items()), strict=True)
    module.eval()
    mx.eval(module.parameters())
    return module, meta
