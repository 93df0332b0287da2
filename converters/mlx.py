"""MLX: torch weights -> one MLX-layout safetensors file per module, then FP16 or INT8.

The graphs are code (runtime/mlx/, the MLX port of the torch modules); the bundle holds one
safetensors file of weights per module, with metadata that makes it self-describing (the format
runtime/mlx/loader.py reads): the module, the model config, the precision and, for int8, the
bits, group size and the exact layers that were quantized. The audio file also carries the fixed
front end (DFT basis, mel filterbank) taken from the torch module, so the MLX runtime computes
with the very constants the parity gate's torch reference used, and needs no torch.

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

from ..models.io_spec import ModuleIO
from .target import Target

BITS = 8
GROUP_SIZE = 32
FP16_FLOAT32_PARTS = [
    "audio: DFT conv1d, power, mel matmul, log",
    "generator: RoPE and time-embedding tables, Euler state, motion mean/std",
    "decoder: affine grid, flow, bilinear interpolate, grid_sample, alpha blend",
    "appearance: spatial mean",
]


# ---- torch -> MLX weights ------------------------------------------------------------------------
def torch_to_mlx(torch_module) -> dict[str, np.ndarray]:
    """The torch module's state dict as float32 numpy arrays in MLX layouts (same key names)."""
    from torch import nn as tnn

    conv2d = {n for n, m in torch_module.named_modules() if isinstance(m, tnn.Conv2d)}
    conv1d = {n for n, m in torch_module.named_modules() if isinstance(m, tnn.Conv1d)}
    out = {}
    for key, t in torch_module.state_dict().items():
        a = t.detach().cpu().float().numpy()
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight" and owner in conv2d:
            a = a.transpose(0, 2, 3, 1)  # OIHW -> OHWI
        elif leaf == "weight" and owner in conv1d:
            a = a.transpose(0, 2, 1)  # OIK -> OKI
        out[key] = np.ascontiguousarray(a, dtype=np.float32)
    return out


def torch_constants(part: str, torch_module) -> dict[str, np.ndarray]:
    """The torch module's fixed arrays (non-persistent buffers) in the MLX port's names and
    layouts (runtime/mlx: `Module.constant_names`)."""
    if part != "audio":
        return {}
    dft = torch_module.dft.detach().cpu().float().numpy().transpose(0, 2, 1)  # OIK -> OKI
    melfb = torch_module.melfb.detach().cpu().float().numpy()
    return {"_dft": np.ascontiguousarray(dft), "_melfb": np.ascontiguousarray(melfb)}


# ---- which layers int8 covers --------------------------------------------------------------------
def quantizable(module, group_size: int = GROUP_SIZE) -> bool:
    """Every convolution (K is zero-padded to the group size) and every Linear whose input
    dimension is a multiple of the group size."""
    import mlx.nn as nn

    from ..runtime.mlx.layers import Conv1d, Conv2d

    if isinstance(module, (Conv1d, Conv2d)):
        return True
    if isinstance(module, nn.Linear):
        return module.weight.shape[-1] % group_size == 0
    return False


def float_layers(module) -> list[str]:
    """Paths of the compute layers still in float (Linear, Conv): before quantizing, all of them."""
    import mlx.nn as nn

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    return sorted(p for p, m in module.named_modules() if isinstance(m, kinds) and p)


def _save(path: Path, arrays: dict, meta: dict) -> None:
    import mlx.core as mx

    mx.save_safetensors(str(path), arrays, metadata={k: str(v) for k, v in meta.items()})


class MlxTarget(Target):
    name = "mlx"
    suffix = ".safetensors"
    parity_backend = "mlx"
    recipe_packages = ("edgetalk.runtime.mlx",)  # its layers decide what int8 quantizes

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import mlx.core  # noqa: F401
            import mlx.nn  # noqa: F401
        except ImportError as e:
            return False, (
                f"mlx is not importable ({e}); pip install 'edgetalk[mlx]' "
                "(on Linux this installs mlx[cpu])"
            )
        return True, ""

    def convert(self, model, part: str, io: ModuleIO, path: Path, sample: dict | None) -> None:
        import mlx.core as mx

        from ..runtime.mlx.loader import FORMAT, FORMAT_VERSION, build

        torch_module = model.module(part)
        weights = {k: mx.array(v) for k, v in torch_to_mlx(torch_module).items()}
        constants = {k: mx.array(v) for k, v in torch_constants(part, torch_module).items()}
        mlx_module = build(part, model.cfg, constants)
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
        _save(Path(path), {**weights, **mlx_module.constants()}, meta)

    def apply_precision(self, precision: str, src: Path, dst: Path, calibration=None) -> dict:
        """fp32: the converted file as it is. fp16: weights cast. int8: nn.quantize (8-bit).
        Weight-only, so the calibration data is not needed."""
        from mlx.utils import tree_flatten

        from ..runtime.mlx.loader import apply_precision, load, quantized_layers

        src, dst = Path(src), Path(dst)
        if precision == "fp32":
            src.replace(dst)
            return {"weights": "float32", "compute": "float32"}
        module, meta = load(src)
        meta = dict(meta, precision=precision)
        if precision == "fp16":
            apply_precision(module, "fp16")
            info = {
                "weights": "float16",
                "compute": "float16",
                "io": "float32",
                "float32_parts": FP16_FLOAT32_PARTS,
            }
            if module.fp32_params:
                info["float32_params"] = list(module.fp32_params)
        elif precision == "int8":
            candidates = float_layers(module)
            chosen = [p for p, m in module.named_modules() if quantizable(m)]
            apply_precision(module, "int8", group_size=GROUP_SIZE, bits=BITS, only=chosen)
            quantized = quantized_layers(module)
            if not quantized:
                raise RuntimeError(f"{dst.name}: INT8 quantization produced no 8-bit weights")
            kept = [p for p in candidates if p not in set(quantized)]
            meta.update(
                bits=BITS,
                group_size=GROUP_SIZE,
                mode="affine",
                quantized_layers=json.dumps(quantized),
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
        _save(dst, {**arrays, **module.constants()}, meta)
        return info

    def timed_call(self, path: Path, sample: dict[str, np.ndarray]):
        import mlx.core as mx

        from ..runtime.backend_mlx import COMPILED, _compiled
        from ..runtime.mlx.loader import load

        module, meta = load(Path(path))
        spec = ModuleIO.from_dict(json.loads(meta["io"]))
        # compiled where the runtime compiles it (backend_mlx), so the figure is the runtime's
        run = _compiled(module, spec) if meta["module"] in COMPILED else module
        feed = {t.name: mx.array(np.asarray(sample[t.name], np.float32)) for t in spec.inputs}

        def call():
            out = run(**feed)
            mx.eval([out[n] for n in spec.output_names])  # MLX is lazy: force the work

        return call

    def timing_setting(self) -> dict:
        import mlx.core as mx

        kind = str(mx.default_device().type).rsplit(".", 1)[-1]  # "DeviceType.gpu" -> "gpu"
        return {"device": f"mlx {kind}"}

    def checks(self, path: Path, io: ModuleIO, precision: str) -> dict:
        """The file is what its precision says (names, shapes, dtypes; real 8-bit weights for
        int8), and the module it builds maps the contract's inputs to the contract's outputs."""
        import mlx.core as mx

        from ..runtime.mlx.loader import load, read

        path = Path(path)
        try:
            arrays, meta = read(path)
            if meta.get("precision") != precision:
                raise ValueError(
                    f"{path.name}: file says precision {meta.get('precision')}, not {precision}"
                )
            module, _ = load(path)
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
        got = module(**{t.name: mx.zeros(t.shape, mx.float32) for t in io.inputs})
        for t in io.outputs:
            if t.name not in got:
                raise RuntimeError(f"{path.name}: module returns no {t.name!r}")
            if tuple(got[t.name].shape) != t.shape or got[t.name].dtype != mx.float32:
                raise RuntimeError(
                    f"{path.name}: output {t.name} is {got[t.name].dtype}"
                    f"{list(got[t.name].shape)}, contract says float32{list(t.shape)}"
                )
            if not np.isfinite(np.array(got[t.name])).all():
                raise RuntimeError(f"{path.name}: output {t.name} is not finite on zero inputs")
        out["static_shapes"] = "pass"
        return out

    def tool_versions(self) -> dict:
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


TARGET = MlxTarget
