"""MLX port of the four streaming modules (mlx.core / mlx.nn), file for file beside models/.

In the flat style of mlx-lm: `layers.py` holds what torch has and MLX lacks (channels-last conv
wrappers that quantize, im2col, grid_sample, bilinear resizing, pixel shuffle), `rope.py`,
`appearance.py`, `audio_encoder.py`, `generator.py` and `decoder.py` mirror models/<same>.py,
and `loader.py` turns one edgetalk-mlx safetensors file into a module with its weights.

The math is the PyTorch modules' (models/*.py `forward`), op for op: exact (erf) GELU, LayerNorm
eps 1e-5, the fixed DFT-basis conv1d and mel filterbank built from the same functions, bilinear
grid_sample (border padding, align_corners=False) and bilinear resizing with torch's half-pixel
rule. MLX is channels-last, so each module transposes at its boundary: the arrays that enter and
leave `__call__` have exactly the layouts of models/io_spec.py. Parameter names equal the torch
state-dict keys (converters/mlx.py only transposes conv weights).

Precision (loader.apply_precision): fp16 makes convolutions, linears, norms and attention run in
float16 (the weights are stored in float16). The numerically fragile parts stay float32 as in the
ONNX export: the DFT/log-mel front end, RoPE and time-embedding tables, the Euler state of the
sampler, and everything that resamples (affine grid, flow, interpolation, grid_sample, blending).
For int8, `layers.Conv1d`/`Conv2d` define `to_quantized`, so `mlx.nn.quantize` turns them into
`QuantizedConv` (im2col + `mx.quantized_matmul` on 8-bit weights) just as it turns Linear layers
into QuantizedLinear.
"""
