"""Reference backend: the PyTorch modules, eager, on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models.checkpoint import default_checkpoint, load_checkpoint
from ..models.config import ModelConfig
from ..models.edgetalk import EdgeTalkModel
from ..models.io_spec import module_io
from .backend import Backend

# The key under which prepare_photo hands the generator's reference keys and values back (a
# name no contract input has; the scheduler passes it to each generator call untouched)
REFERENCE = "generator:reference"


class TorchBackend(Backend):
    name = "torch"
    targets = ("torch",)
    concurrent_modules = True

    def __init__(self, model: EdgeTalkModel, cfg: ModelConfig | None = None, precision="fp32"):
        cfg = cfg or model.cfg
        super().__init__(cfg, module_io(cfg), precision)
        # its own model for its own streaming settings; the weights stay shared with `model`
        self.model = (model if cfg == model.cfg else model.for_streaming(cfg)).eval()
        # bf16 runs under CPU autocast, weights and I/O float32: casting the model instead left
        # float32 tables (RoPE, time embedding, mel weights) meeting bf16 matmuls.
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        chunk: int | None = None,
        steps: int | None = None,
        window: int | None = None,
        lookahead_ms: float | None = None,
    ) -> TorchBackend:
        model, _ = load_checkpoint(path or default_checkpoint())
        cfg = model.cfg.with_streaming(
            chunk=chunk, steps=steps, window=window, lookahead_ms=lookahead_ms
        )
        return cls(model, cfg)

    @classmethod
    def from_bundle(cls, bundle) -> TorchBackend:
        from ..errors import InputError

        # No export writes a "torch" bundle: only a hand-edited manifest gets here.
        raise InputError(
            f"{bundle.path}: the torch backend runs checkpoints (--checkpoint), not bundles"
        )

    def _autocast(self):
        return torch.autocast("cpu", self.dtype, enabled=self.dtype != torch.float32)

    def prepare_photo(self, feed: dict, module: str = "decoder") -> dict:
        """The generator's reference keys and values, made once per avatar: the reference
        token's pass through the layers was 0.5-0.6 ms of each 4.5-5.6 ms generator call on the
        Intel Xeon (one thread, chunk 1 and 4). The same values, so the same motion to the bit."""
        if module != "generator":
            return feed
        ref = torch.from_numpy(np.ascontiguousarray(feed["ref_motion"], dtype=np.float32))
        with torch.inference_mode(), self._autocast():
            return {**feed, REFERENCE: self.model.generator.reference(ref)}

    def run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.io[module]
        with torch.inference_mode(), self._autocast():
            args = {
                t.name: torch.from_numpy(np.ascontiguousarray(inputs[t.name], dtype=np.float32))
                for t in spec.inputs
            }
            if module == "generator" and REFERENCE in inputs:
                args["ref_kv"] = inputs[REFERENCE]
            out = self.model.module(module)(**args)
            return {t.name: out[t.name].float().numpy() for t in spec.outputs}


BACKEND = TorchBackend
