"""training/fit_blend.py: the boundary blend's gain is fitted by replaying recorded streams."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .conftest import need, tiny_real_folder

DATA = Path(__file__).parent / "data"


def _train_folder(tmp_path: Path) -> Path:
    """One real clip under an identity that is not held out: training data."""
    return tiny_real_folder(tmp_path, "grid_tiny_train", "grid_not_held_out")


def test_replay_shows_exactly_what_a_live_stream_shows(tmp_path):
    """The blend never feeds back into the generator, so replaying recorded audio and generator
    outputs with the fitted gain gives the live stream's frames; another gain gives others."""
    need("mediapipe", "the photo's rest pose uses mediapipe's face mesh")
    from edgetalk.runtime.avatar import prepare_avatar
    from edgetalk.runtime.continuity import velocity_gain
    from edgetalk.runtime.loader import open_backend
    from edgetalk.runtime.rest_pose import measure
    from edgetalk.training.fit_blend import _Recorder, _Replay, _stream
    from edgetalk.training.real_data import read_clip, videos

    (item,) = videos(_train_folder(tmp_path), "train")
    frames, pcm = read_clip(item, 1.2)
    backend = open_backend(chunk=2, threads=1)
    avatar = prepare_avatar(frames[0], backend.cfg.render.resolution, face_check=False)
    rest = measure(avatar, "close")
    live = np.stack(_stream(backend, avatar, rest, pcm, seed=0))
    rec = _Recorder(backend)
    _stream(rec, avatar, rest, pcm, seed=0)
    assert {m for m, _ in rec.calls} == {"audio", "generator"}
    same = np.stack(_stream(_Replay(backend, rec.calls), avatar, rest, pcm, 0, velocity_gain(2)))
    assert np.array_equal(same, live)
    other = np.stack(_stream(_Replay(backend, rec.calls), avatar, rest, pcm, 0, gain=0.3))
    assert not np.array_equal(other, live)


def test_best_gain_is_the_mean_closest_to_one_on_a_log_scale():
    from edgetalk.training.fit_blend import best_gain

    assert best_gain({0.8: [0.8, 0.9], 1.0: [1.3, 1.2], 1.2: [1.0, 1.02]}) == 1.2
    # a 0.8 stall is as far off as a 1.25 step; 0.85 is nearer than 1.25
    assert best_gain({0.6: [0.85], 1.0: [1.25]}) == 0.6


def test_cli_prints_the_ratio_per_gain_and_the_best(tmp_path, capsys):
    need("mediapipe", "the photo's rest pose uses mediapipe's face mesh")
    from edgetalk.training.fit_blend import main

    root = _train_folder(tmp_path)
    argv = ["--real", str(root), "--chunks", "2", "--gains", "0.5,1.2", "--every", "1"]
    assert main(argv + ["--seconds", "1.2"]) == 0
    out = capsys.readouterr().out
    assert "1 training clips: grid_tiny_train" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("chunk 2 gain")]
    assert len(lines) == 2
    means = [float(ln.split("judder mean ")[1].split(",")[0]) for ln in lines]
    assert means[0] < means[1]  # a higher gain continues more velocity into the chunk start
    from edgetalk.runtime.continuity import VELOCITY_GAINS

    assert "chunk 2: best gain" in out and f"(shipped {VELOCITY_GAINS[2]:.2f};" in out


@pytest.mark.parametrize(
    "argv",
    [["--chunks", "1"], ["--gains", "0,1"], ["--chunks", "four"], ["--every", "0"]],
)
def test_cli_refuses_bad_settings_with_one_line(tmp_path, capsys, argv):
    from edgetalk.training.fit_blend import main

    assert main(["--real", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_cli_refuses_a_folder_without_training_clips(tmp_path, capsys):
    from edgetalk.training.fit_blend import main

    (tmp_path / "catalog.json").write_text(json.dumps({"items": []}))
    assert main(["--real", str(tmp_path)]) == 2
    assert "no training clips" in capsys.readouterr().err
