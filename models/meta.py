"""Models built as shapes only, on the meta device (checkpoint.check_model_size vets a config
from a user's file before one byte is allocated). Their tables (DFT, mel filters, grids, the
upsampling matrix) are computed from the config; on the meta device even torch.arange goes
through torch's Python reference ops, whose first use imports torch._dynamo: 1.4 s of the start
of every command that opens a checkpoint. The tables' builders return empty tensors of the
right shape there instead."""

from __future__ import annotations

import torch


def shapes_only() -> bool:
    """Whether new tensors land on the meta device (a `with torch.device("meta")` block)."""
    return torch.empty(0).is_meta
