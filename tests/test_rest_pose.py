"""A photo taken mid-word: its mouth is measured (MediaPipe's face mesh run by OpenCV) and its lips
close at rest, while speech still opens them as far as before (runtime/rest_pose.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgetalk.errors import InputError
from edgetalk.models.motion import INDEX, MOTION_DIM
from edgetalk.runtime import rest_pose
from edgetalk.runtime.rest_pose import (
    GAP_CLOSED,
    GAP_RAMP,
    GAP_WIDE,
    JAW_APART,
    KEEP,
    MouthRest,
    measure,
)

JAW, PRESS = INDEX["jaw_open"], INDEX["lip_press"]
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def motion(jaw, press=0.0) -> np.ndarray:
    m = np.zeros((len(jaw), MOTION_DIM), np.float32)
    m[:, JAW], m[:, PRESS] = jaw, press
    m[:, INDEX["head_yaw"]] = 0.1  # anything else passes through
    return m


def test_a_closed_photo_is_left_alone():
    m = motion([0.0, 0.3, 0.8])
    for rest in (KEEP, MouthRest(None, "x"), MouthRest(GAP_CLOSED, "x"), MouthRest(0.0, "x")):
        assert rest.strength == 0.0
        assert rest.apply(m) is m


def test_an_open_photo_closes_at_rest_and_opens_with_the_jaw():
    rest = MouthRest(GAP_CLOSED + 2 * GAP_RAMP, "open")
    m = motion([0.0, JAW_APART / 2, JAW_APART, 0.8], press=[0.0, 0.0, 0.0, 0.9])
    out = rest.apply(m)
    assert out is not m and np.array_equal(
        m, motion([0.0, JAW_APART / 2, JAW_APART, 0.8], [0, 0, 0, 0.9])
    )
    np.testing.assert_allclose(out[:, PRESS], [1.0, 0.5, 0.0, 0.9], atol=1e-6)  # p/b/m kept
    np.testing.assert_allclose(out[:, JAW], m[:, JAW])  # the jaw opens as far as before
    np.testing.assert_allclose(out[:, INDEX["head_yaw"]], 0.1)
    # fades in with the photo's opening: half way up the ramp, half the closure
    half = MouthRest(GAP_CLOSED + GAP_RAMP / 2, "parted").apply(motion([0.0]))
    assert half[0, PRESS] == pytest.approx(0.5)
    # and out for a shout the decoder cannot close
    assert MouthRest(GAP_WIDE, "x").strength == 1.0
    assert MouthRest(GAP_WIDE + GAP_RAMP, "x").strength == pytest.approx(0.5)
    assert MouthRest(0.25, "x").strength == 0.0


def test_policy_is_checked():
    assert measure(np.zeros((8, 8, 3), np.uint8), "keep") is KEEP
    with pytest.raises(InputError, match="close, keep"):
        measure(np.zeros((8, 8, 3), np.uint8), "shut")


def test_every_entry_point_takes_the_policy_and_refuses_a_wrong_one():
    from edgetalk.cli import build_parser
    from edgetalk.integrations._stream import AvatarStream

    with pytest.raises(InputError, match="open_mouth"):
        AvatarStream(open_mouth="shut")  # said at once, not when the session opens later
    for cmd in ("run", "live", "serve", "eval"):
        with pytest.raises(SystemExit):  # argparse's own refusal, exit 2
            build_parser(cmd, lazy=True).parse_args([cmd, "--open-mouth", "shut"])
        args = build_parser(cmd, lazy=True).parse_args([cmd, "--open-mouth", "keep"])
        assert args.open_mouth == "keep", cmd


def test_without_opencv_the_photo_keeps_its_mouth_and_says_why(monkeypatch):
    from edgetalk.runtime import face_detect

    def no_cv2():
        raise InputError("face detection needs OpenCV: pip install 'edgetalk[face]'")

    monkeypatch.setattr(face_detect, "_cv2", no_cv2)
    rest = measure(np.zeros((64, 64, 3), np.uint8))
    assert rest.strength == 0.0 and "edgetalk[face]" in rest.note


# ---- measuring the photo (OpenCV) -------------------------------------------------------------

cv2 = pytest.importorskip("cv2", reason="the face extra is not installed")


@pytest.fixture(scope="module")
def shipped():
    from edgetalk.runtime.loader import open_backend

    return open_backend(threads=1)


@pytest.fixture(scope="module")
def photos(shipped):
    """The embedded avatar drawn by the shipped decoder with closed lips and with a dropped jaw:
    a closed-mouthed and a mid-word photo of one face."""
    from edgetalk.runtime.avatar import prepare_avatar
    from edgetalk.training.evaluate import decoder_reconstruction

    avatar = prepare_avatar(None, shipped.cfg.render.resolution)
    c = shipped.cfg.chunk
    m = np.zeros((2 * c, MOTION_DIM), np.float32)
    m[:c, PRESS] = 1.0
    m[c:, JAW] = 0.35  # 0.115 face heights: open, and not too wide to close
    out = decoder_reconstruction(shipped, avatar, m)
    return {"avatar": avatar, "closed": out[c - 1], "open": out[2 * c - 1]}


def rotate(rgb: np.ndarray, deg: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
    return cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REFLECT)


def test_mouth_gap_tells_closed_from_open(photos):
    from edgetalk.runtime.face_mesh import mouth_gap

    closed, opened = mouth_gap(photos["closed"]), mouth_gap(photos["open"])
    print(
        f"closed {closed:.3f}, open {opened:.3f}, embedded avatar {mouth_gap(photos['avatar']):.3f}"
    )
    # This model reads a smile's pressed lips a little open (0.029 here, the attention mesh
    # 0.001): closed is judged against the ramp's top, and against the open photo.
    assert closed < GAP_CLOSED + GAP_RAMP < opened and opened - closed > 0.08
    # a tilted head measures about the same (the crop is rotated upright, as MediaPipe does)
    for deg in (-15, 15):
        assert mouth_gap(rotate(photos["open"], deg)) == pytest.approx(opened, abs=0.02)
        assert mouth_gap(rotate(photos["closed"], deg)) == pytest.approx(closed, abs=0.02)
    assert mouth_gap(np.full((256, 256, 3), 128, np.uint8)) is None  # no face, no number


def test_a_mid_word_photo_closes_in_silence_and_opens_in_speech(shipped, photos):
    """Through a Session as `run`/`live`/`serve` use it: silence, then the embedded sentence."""
    from edgetalk.runtime.audio_io import default_speech, read_audio
    from edgetalk.runtime.face_mesh import mouth_gap
    from edgetalk.runtime.session import Session

    speech = read_audio(default_speech()).pcm[: 16000 * 3]
    pcm = np.concatenate([np.zeros(16000, np.float32), speech])
    gaps = {}
    for policy in ("close", "keep"):
        sess = Session(avatar=photos["open"], backend=shipped, realtime=False, open_mouth=policy)
        assert (sess.mouth_rest.strength == 1.0) == (policy == "close"), sess.mouth_rest.note
        sess.push_audio(pcm)
        sess.close()
        frames = [f.rgb for f in sess.frames()]
        gaps[policy] = np.array([mouth_gap(f) for f in frames[::5]], np.float64)
    silent = slice(2, 4)  # frames 10-15: inside the first second of silence
    print({k: np.round(v, 3).tolist() for k, v in gaps.items()})
    assert gaps["keep"][silent].min() > GAP_CLOSED + GAP_RAMP  # the photo's gap, all along
    # lips closed at rest: this model reads the pressed lips of this smile at 0.03-0.05 (the
    # attention mesh at 0.00-0.02), about half the open photo's 0.10
    assert gaps["close"][silent].max() < 0.6 * gaps["keep"][silent].min()
    # in speech the mouth still opens as wide as the photo or wider
    assert np.nanpercentile(gaps["close"][6:], 90) > 0.8 * np.nanmedian(gaps["keep"][silent])


@pytest.mark.skipif(not (REAL / "catalog.json").is_file(), reason=f"no real data at {REAL}")
def test_real_first_frames_measure_like_the_eval_mesh():
    """Against mediapipe's own attention mesh (the eval's measure) on the held-out first frames:
    the open ones are found open, the closed ones closed."""
    from edgetalk.runtime.avatar import detect_face, prepare_avatar
    from edgetalk.runtime.face_mesh import mouth_gap
    from edgetalk.training.real_data import read_clip, videos

    metrics = pytest.importorskip("edgetalk.training.metrics")
    pytest.importorskip("mediapipe", reason="mediapipe is a test dependency")
    fm = metrics.FaceMeasurer(video_mode=False)
    ours, theirs = [], []
    for item in videos(REAL, "eval"):
        first = read_clip(item, max_seconds=1.5)[0][0]
        crop = prepare_avatar(first, 256, face_check=detect_face(first) is not None)
        ours.append(mouth_gap(crop))
        theirs.append(fm.track([crop]).opening[0])
    ours, theirs = np.array(ours, np.float64), np.array(theirs)
    print(np.round(ours, 3).tolist(), np.round(theirs, 3).tolist())
    assert np.corrcoef(ours, theirs)[0, 1] > 0.7
    assert np.all(ours[theirs > 0.06] > GAP_CLOSED + GAP_RAMP)  # clearly open ones are found
    assert np.mean(np.abs(ours - theirs)) < 0.03
    assert rest_pose.POLICIES == ("close", "keep")
