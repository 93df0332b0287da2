"""Trace-friendly views of the modules: positional inputs and a tuple of outputs in contract order.

Every converter traces these, so input and output names come from one place (models/io_spec.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.edgetalk import EdgeTalkModel
from ..models.io_spec import ModuleIO


class ModuleGraph(nn.Module):
    def __init__(self, model: EdgeTalkModel, module: str, io: ModuleIO, inner: nn.Module = None):
        super().__init__()
        self.inner = model.module(module) if inner is None else inner
        self.io = io

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.inner(**dict(zip(self.io.input_names, args, strict=True)))
        return tuple(out[name] for name in self.io.output_names)


def example_args(io: ModuleIO, sample: dict | None = None) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: a real recorded call when given, else zeros of the contract's shapes."""
    if sample is not None:
        return tuple(torch.from_numpy(sample[t.name]).float() for t in io.inputs)
    return tuple(torch.zeros(t.shape) for t in io.inputs)
