"""Join the stage checkpoints into the shipped weights: appearance + decoder from the render
stage, the decoder's lip head from the lip stage (if given), audio encoder + generator from the
motion stage.

    python -m edgetalk.training.assemble --render runs/render --lips runs/lips \
        --motion runs/motion --out models/weights/tiny.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models.checkpoint import load_checkpoint, read_metadata, save_checkpoint


def _tensors(run: Path) -> dict:
    path = run / "model.safetensors"
    read_metadata(path)  # refuses anything that is not an EdgeTalk checkpoint
    return load_file(str(path))


def _load_part(model, tensors: dict, prefix: str) -> None:
    """Copy the tensors under prefix (a module path, e.g. "decoder.lip_") into model."""
    sub = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    own = model.state_dict()
    missing = [k for k in own if k.startswith(prefix) and k not in sub]
    if missing or not sub:
        raise ValueError(f"the checkpoint lacks {missing[:3] or prefix + '*'}")
    own.update(sub)
    model.load_state_dict(own)


def _with_audio_config_of(model, motion_file: Path):
    """The audio encoder's config (lookahead, mel normalization) belongs to the stage that trained
    its weights, the motion stage; the rest of the config to the render stage."""
    import dataclasses

    from ..models.edgetalk import EdgeTalkModel

    audio = load_checkpoint(motion_file)[0].cfg.audio
    if audio == model.cfg.audio:
        return model
    out = EdgeTalkModel(dataclasses.replace(model.cfg, audio=audio).validate())
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("audio.")}
    out.load_state_dict(rest, strict=False)  # audio.* comes from the motion stage next
    return out


def assemble(
    render_dir: Path, motion_dir: Path, out: Path, note: str = "", lips_dir: Path | None = None
) -> dict:
    model, _ = load_checkpoint(render_dir / "model.safetensors")
    motion = _tensors(motion_dir)
    model = _with_audio_config_of(model, motion_dir / "model.safetensors")
    for part in ("audio.", "generator."):
        _load_part(model, motion, part)
    if lips_dir is not None:  # the lip-head stage (train_lips) trained only decoder.lip_*
        _load_part(model, _tensors(lips_dir), "decoder.lip_")
    with torch.no_grad():  # both recipes train with a zero reference token
        model.appearance.ref_head.weight.zero_()
        model.appearance.ref_head.bias.zero_()
    info = {}
    stages = [("render", render_dir), ("motion", motion_dir)]
    for name, d in stages + ([("lips", lips_dir)] if lips_dir is not None else []):
        log = d / "log.jsonl"  # a run shorter than one logging interval has none
        lines = log.read_text().splitlines() if log.exists() else []
        last = json.loads(lines[-1]) if lines else {}
        if not lines and (d / "model.safetensors").exists():  # a shipped file: its own record
            md = read_metadata(d / "model.safetensors")
            if f"{name}_steps" in md:
                info[f"{name}_steps"] = md[f"{name}_steps"]
                info[f"{name}_minutes"] = md.get(f"{name}_minutes")
                continue
        info[f"{name}_steps"] = last.get("step")
        info[f"{name}_minutes"] = round(last.get("time_s", 0) / 60, 1)
    if note:  # e.g. how a fine-tuned stage got to its starting point
        info["history"] = note
    # The audio encoder's provenance (the 60 ms distillation) travels with the audio encoder.
    carried = read_metadata(motion_dir / "model.safetensors")
    info.update({k: v for k, v in carried.items() if k.startswith("lookahead_")})
    save_checkpoint(
        model.half().float(),
        out,
        trained="true",
        recipe="training/train_render.py (+ --real) + train_lips.py + train_motion.py"
        + (" + distill_lookahead.py" if "lookahead_stage" in info else "")
        + "; see MODEL_CARD.md",
        **{k: str(v) for k, v in info.items()},
    )
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", type=Path, default=Path("runs/render"))
    ap.add_argument("--motion", type=Path, default=Path("runs/motion"))
    ap.add_argument("--out", type=Path, default=Path("models/weights/tiny.safetensors"))
    ap.add_argument(
        "--lips", type=Path, help="a train_lips run: its lip head replaces the render's"
    )
    ap.add_argument("--note", default="", help="training history to record in the metadata")
    args = ap.parse_args(argv)
    print(assemble(args.render, args.motion, args.out, args.note, args.lips))


if __name__ == "__main__":
    main()
