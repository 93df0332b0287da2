"""One optimisation step of each training stage and the weight assembly (never a training run)."""

from __future__ import annotations

import shutil

import pytest
import torch

from edgetalk.models.checkpoint import load_checkpoint

from .conftest import need

pytestmark = [
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed"),
]


def test_one_step_each_stage_then_assemble(tmp_path):
    need("mediapipe", "mediapipe 0.10.21 is not installed")
    from edgetalk.training import assemble, train_motion, train_render

    train_render.main(
        ["--out", str(tmp_path / "render"), "--steps", "1", "--batch", "1", "--pool-clips", "1"]
    )
    train_motion.main(
        [
            "--out",
            str(tmp_path / "motion"),
            "--data",
            str(tmp_path / "data"),
            "--clips",
            "2",
            "--val-clips",
            "1",
            "--steps",
            "1",
            "--batch",
            "2",
            "--frames",
            "16",
            "--mel-norm-s",  # from an init with or without it: the encoder's config follows
            "1.5",
            "--mouth-aux",  # the training-only readout: its loss runs, it is never saved
            "0.5",
        ]
    )
    motion_keys = load_checkpoint(tmp_path / "motion" / "model.safetensors")[0].state_dict()
    assert not any("readout" in k for k in motion_keys)
    for stage in ("render", "motion"):
        model, meta = load_checkpoint(tmp_path / stage / "model.safetensors")
        assert meta["stage"] == stage
        # exactly the one step asked for ran, and was saved with its optimiser state to resume
        assert torch.load(tmp_path / stage / "optim.pt", weights_only=True)["step"] == 1
    # the lip-head stage moves the lip head and nothing else
    from safetensors.torch import load_file

    from edgetalk.training import train_lips

    init = tmp_path / "render" / "model.safetensors"
    train_lips.main(["--init", str(init), "--out", str(tmp_path / "lips"), "--steps", "1"])
    before, after = load_file(str(init)), load_file(str(tmp_path / "lips" / "model.safetensors"))
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed and all(k.startswith("decoder.lip_") for k in changed), changed
    assert load_checkpoint(tmp_path / "lips" / "model.safetensors")[1]["stage"] == "lips"
    # resuming continues from the saved step (with the painted-mouth loss weighted up, as the
    # model card's dead-zone run does)
    train_render.main(
        ["--out", str(tmp_path / "render"), "--steps", "2", "--batch", "1", "--pool-clips", "1"]
        + ["--alpha-weight", "2.0"]
    )
    out = tmp_path / "tiny.safetensors"
    (tmp_path / "render" / "log.jsonl").write_text('{"step": 2, "time_s": 1}\n')
    (tmp_path / "motion" / "log.jsonl").write_text('{"step": 1, "time_s": 1}\n')
    info = assemble.assemble(tmp_path / "render", tmp_path / "motion", out)
    model, meta = load_checkpoint(out)
    assert meta["trained"] == "true" and info["render_steps"] == 2
    # the audio config travels with the audio weights: the motion stage's normalization
    assert model.cfg.audio.mel_norm_s == 1.5 and model.audio.mel_decay
    # with the lip stage: its head, everything else from the render and motion stages
    info = assemble.assemble(
        tmp_path / "render", tmp_path / "motion", out, lips_dir=tmp_path / "lips"
    )
    joined, render = load_file(str(out)), load_file(str(init))
    for k, v in joined.items():
        src = after if k.startswith("decoder.lip_") else render
        if k.startswith(("decoder.", "appearance.")):
            assert (v == src[k].half().float()).all(), k
    assert info["lips_steps"] is None  # one step: no log line yet
    assert float(model.generator.motion_std.min()) > 0
