"""Checkpoint I/O: safetensors only, with the model config in the file's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import BundleError, InputError
from .config import ModelConfig
from .edgetalk import EdgeTalkModel

FORMAT = "edgetalk-checkpoint"
FORMAT_VERSION = "1"
# A checkpoint's config is read from a user file. Sizes are capped at 65,536 each (config.py),
# which still multiply to models of terabytes: these caps are checked before anything is built.
MAX_LAYERS = 256  # per stack (generator layers, audio conv layers, flow blocks)
MAX_ELEMENTS = 500_000_000  # parameters + buffers (2 GB in fp32; `large` has 93 M)


def save_checkpoint(model: EdgeTalkModel, path: str | Path, **info: str) -> None:
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.cfg.to_json()}
    meta.update({k: str(v) for k, v in info.items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise InputError(f"checkpoint not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise BundleError(f"{p} is not a safetensors checkpoint ({e})") from None
    if meta.get("format") != FORMAT:
        raise BundleError(f"{p} is a safetensors file but not an EdgeTalk checkpoint (no metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{p} has checkpoint format version {meta.get('format_version')!r}; "
            f"this EdgeTalk reads version {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(
    path: str | Path, allow_new: tuple[str, ...] = ()
) -> tuple[EdgeTalkModel, dict[str, str]]:
    """Load (model in eval mode, metadata). Never unpickles: safetensors holds only tensors.

    allow_new: prefixes of parameters the file may lack, left at their initial values (training
    starts a new part of the model from older weights; nothing else loads incomplete files)."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    try:
        cfg = ModelConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError) as e:
        raise BundleError(f"{path}: bad model config in checkpoint metadata ({e})") from None
    check_model_size(cfg, path)
    model = EdgeTalkModel(cfg)
    state = load_file(str(path))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        first = str(e).strip().splitlines()[-1].strip()
        raise BundleError(
            f"{path}: weights do not match the {cfg.name!r} config ({first})"
        ) from None
    missing = [k for k in missing if not k.startswith(allow_new)] if allow_new else missing
    if missing or unexpected:
        raise BundleError(
            f"{path}: weights do not match the {cfg.name!r} config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise BundleError(f"{path}: weights contain NaN or Inf ({bad[:3]})")
    return model.eval(), meta


def check_model_size(cfg: ModelConfig, path: str | Path) -> None:
    """Refuse a config whose model would be implausibly big, and weights whose names or shapes do
    not match it, before one byte of the model is allocated: the model is first built on the meta
    device (shapes only) and compared with the tensor shapes in the file's header."""
    from safetensors import safe_open

    stacks = {
        "generator.layers": cfg.generator.layers,
        "audio.conv_layers": cfg.audio.conv_layers,
        "render.flow_blocks": cfg.render.flow_blocks,
    }
    for name, n in stacks.items():
        if n > MAX_LAYERS:
            raise BundleError(f"{path}: config {name} = {n} is over the limit of {MAX_LAYERS}")
    with torch.device("meta"):
        shell = EdgeTalkModel(cfg)
    total = sum(t.numel() for t in (*shell.parameters(), *shell.buffers()))
    if total > MAX_ELEMENTS:
        raise BundleError(
            f"{path}: its config describes a model of {total:,} parameters and buffers, over the "
            f"limit of {MAX_ELEMENTS:,}; refused before building it"
        )
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    with safe_open(str(path), framework="pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    wrong = [k for k in want.keys() & have.keys() if want[k] != have[k]]
    if wrong:
        k = sorted(wrong)[0]
        raise BundleError(
            f"{path}: weights do not match the {cfg.name!r} config ({k}: {list(have[k])} in "
            f"the file, {list(want[k])} in the model)"
        )


def default_checkpoint() -> Path:
    """The embedded `tiny` weights that ship with the package."""
    import importlib.resources

    return Path(str(importlib.resources.files("edgetalk.models") / "weights" / "tiny.safetensors"))
