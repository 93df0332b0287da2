"""Join the stage checkpoints into the shipped weights: appearance + decoder from the render
stage, audio encoder + generator from the motion stage.

    python -m edgetalk.training.assemble --render runs/render --motion runs/motion \
        --out models/weights/tiny.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models.checkpoint import load_checkpoint, read_metadata, save_checkpoint


def assemble(render_dir: Path, motion_dir: Path, out: Path, note: str = "") -> dict:
    model, _ = load_checkpoint(render_dir / "model.safetensors")
    motion_file = motion_dir / "model.safetensors"
    read_metadata(motion_file)
    motion = load_file(str(motion_file))
    for part in ("audio", "generator"):
        sub = {k[len(part) + 1 :]: v for k, v in motion.items() if k.startswith(part + ".")}
        model.module(part).load_state_dict(sub)
    with torch.no_grad():  # both recipes train with a zero reference token
        model.appearance.ref_head.weight.zero_()
        model.appearance.ref_head.bias.zero_()
    info = {}
    for name, d in (("render", render_dir), ("motion", motion_dir)):
        lines = (d / "log.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
        info[f"{name}_steps"] = last.get("step")
        info[f"{name}_minutes"] = round(last.get("time_s", 0) / 60, 1)
    if note:  # e.g. how a fine-tuned stage got to its starting point
        info["history"] = note
    save_checkpoint(
        model.half().float(),
        out,
        trained="true",
        recipe="training/train_render.py + training/train_motion.py; see MODEL_CARD.md",
        **{k: str(v) for k, v in info.items()},
    )
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", type=Path, default=Path("runs/render"))
    ap.add_argument("--motion", type=Path, default=Path("runs/motion"))
    ap.add_argument("--out", type=Path, default=Path("models/weights/tiny.safetensors"))
    ap.add_argument("--note", default="", help="training history to record in the metadata")
    args = ap.parse_args(argv)
    print(assemble(args.render, args.motion, args.out, args.note))


if __name__ == "__main__":
    main()
