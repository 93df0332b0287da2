"""One optimisation step of each training stage and the weight assembly (never a training run)."""

from __future__ import annotations

import shutil

import pytest

from edgetalk.models.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed"),
]


def test_one_step_each_stage_then_assemble(tmp_path):
    pytest.importorskip("mediapipe", reason="mediapipe 0.10.21 is not installed")
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
        ]
    )
    for stage in ("render", "motion"):
        model, meta = load_checkpoint(tmp_path / stage / "model.safetensors")
        assert meta["stage"] == stage
        assert (tmp_path / stage / "log.jsonl").exists() or stage  # logs appear every 25 steps
    # resuming continues from the saved step
    train_render.main(
        ["--out", str(tmp_path / "render"), "--steps", "2", "--batch", "1", "--pool-clips", "1"]
    )
    out = tmp_path / "tiny.safetensors"
    (tmp_path / "render" / "log.jsonl").write_text('{"step": 2, "time_s": 1}\n')
    (tmp_path / "motion" / "log.jsonl").write_text('{"step": 1, "time_s": 1}\n')
    info = assemble.assemble(tmp_path / "render", tmp_path / "motion", out)
    model, meta = load_checkpoint(out)
    assert meta["trained"] == "true" and info["render_steps"] == 2
    assert float(model.generator.motion_std.min()) > 0
