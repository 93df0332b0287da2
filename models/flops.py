"""Work per frame, counted from the model with torch's FLOP counter (not estimated by hand)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig
from .edgetalk import MODULES, EdgeTalkModel
from .io_spec import module_io


def module_flops(model: EdgeTalkModel) -> dict[str, int]:
    """FLOPs of one call of each module at the model's static shapes (matmul/conv FLOPs = 2 MACs)."""
    io = module_io(model.cfg)
    out = {}
    with torch.no_grad():
        for name in MODULES:
            inputs = {t.name: torch.zeros(t.shape) for t in io[name].inputs}
            counter = FlopCounterMode(display=False)
            with counter:
                model.module(name)(**inputs)
            out[name] = int(counter.get_total_flops())
    return out


def flops_per_frame(cfg: ModelConfig, model: EdgeTalkModel | None = None) -> dict[str, float]:
    """Per streamed frame: audio + generator + decoder per chunk divided by C. The appearance
    encoder runs once per avatar and is reported separately."""
    model = model or EdgeTalkModel(cfg).eval()
    per_call = module_flops(model)
    c = cfg.chunk
    per_frame = {m: per_call[m] / c for m in ("audio", "generator", "decoder")}
    per_frame["total"] = sum(per_frame.values())
    per_frame["appearance_once"] = float(per_call["appearance"])
    return per_frame


def parameter_counts(model: EdgeTalkModel) -> dict[str, int]:
    params = {m: list(model.module(m).parameters()) for m in MODULES}
    counts = {m: sum(p.numel() for p in ps) for m, ps in params.items()}
    # the appearance stage shares the decoder's photo layers: each weight counts once in total
    unique = {id(p): p for ps in params.values() for p in ps}
    counts["total"] = sum(p.numel() for p in unique.values())
    return counts
