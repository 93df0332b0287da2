"""Synthetic training data: speech timings, visemes, rendering, clips and shards."""

from __future__ import annotations

import numpy as np
import pytest

from edgetalk.models.motion import INDEX, MOTION_DIM
from edgetalk.training import faces, speech, visemes

from .conftest import need, skip_or_fail

needs_speech = pytest.mark.skipif(
    not speech.available(), reason="espeak-ng not installed (apt-get install espeak-ng)"
)


def _motion(**kw) -> np.ndarray:
    m = np.zeros(MOTION_DIM, np.float32)
    for k, v in kw.items():
        m[INDEX[k]] = v
    return m


@pytest.fixture(scope="module")
def astronaut():
    need("mediapipe", "mediapipe==0.10.21 is needed for face landmarks")
    need("skimage", "scikit-image ships the astronaut photo")
    need("cv2", "opencv-python-headless is needed for face detection")
    ids = faces.load_identities(sources=("astronaut",))
    if not ids:
        skip_or_fail("mediapipe found no landmarks on the astronaut photo")
    return ids[0]


# ---------------------------------------------------------------- speech


@needs_speech
def test_speech_has_ordered_phonemes_and_matching_audio():
    text = "Bob, Pam and Mike made seven maps of the river."
    utt = speech.synthesize(text, speech.Voice("en-us"))
    starts = np.array([s for _, s, _ in utt.phonemes])
    assert 20 <= len(utt.phonemes) <= 60, utt.phonemes  # ~1 phoneme per letter, minus spelling
    assert np.all(np.diff(starts) > 0)
    assert all(e > s for _, s, e in utt.phonemes)
    dur = len(utt.audio) / speech.SAMPLE_RATE
    assert utt.phonemes[-1][2] <= dur + 1e-6 and dur < utt.phonemes[-1][2] + 1.0
    # The phoneme spans are where the sound is.
    a, b = (int(t * speech.SAMPLE_RATE) for t in (utt.phonemes[0][1], utt.phonemes[-1][2]))
    inside = np.sqrt(np.mean(utt.audio[a:b] ** 2))
    before = np.sqrt(np.mean(utt.audio[:a] ** 2)) if a > 0 else 0.0
    assert inside > 0.02 and before < 0.1 * inside
    assert sum(p[0] in ("p", "b", "m") for p in utt.phonemes) >= 6


@needs_speech
def test_speech_is_deterministic_and_voices_split():
    v = speech.Voice("en-us+f3", rate=160, pitch=60)
    a = speech.synthesize("Maybe the doctor will call back on Friday.", v)
    speech.synthesize("Hallo Welt", speech.Voice("de"))  # must not disturb the next one
    b = speech.synthesize("Maybe the doctor will call back on Friday.", v)
    assert np.array_equal(a.audio, b.audio) and a.phonemes == b.phonemes
    train, ev = set(speech.voices("train")), set(speech.voices("eval"))
    assert not train & ev
    assert {speech.language(v) for v in ev} - {speech.language(v) for v in train}  # unseen language
    with pytest.raises(ValueError):
        speech.synthesize("x", speech.Voice("no-such-voice"))


# ---------------------------------------------------------------- visemes

_PHONES = [
    ("s", 0.40, 0.50),
    ("ɑ", 0.50, 0.70),
    ("p", 0.70, 0.80),
    ("ɑ", 0.80, 1.00),
    ("m", 1.00, 1.12),
    ("i", 1.12, 1.30),
    ("f", 1.30, 1.40),
    ("u", 1.40, 1.60),
]


def test_visemes_bilabials_close_and_silence_is_shut():
    rng = np.random.default_rng(0)
    mt = visemes.motion_track(60, rng, _PHONES)
    m = mt.motion
    assert mt.motion.shape == (60, MOTION_DIM) and mt.motion.dtype == np.float32
    assert mt.bilabial.sum() >= 2
    assert np.allclose(m[mt.bilabial, INDEX["lip_press"]], 1.0)
    assert np.allclose(m[mt.bilabial, INDEX["jaw_open"]], 0.0)
    t = (np.arange(60) + 0.5) / visemes.FPS
    assert m[(t > 0.55) & (t < 0.65), INDEX["jaw_open"]].max() > 0.4  # open vowel
    assert m[(t > 1.45) & (t < 1.55), INDEX["lip_round"]].max() > 0.4  # rounded vowel
    assert m[(t > 1.3) & (t < 1.4), INDEX["teeth_show"]].max() > 0.3  # labiodental
    silent = (t < 0.3) | (t > 1.8)
    assert mt.talk[silent].sum() == 0
    assert np.all(m[silent, INDEX["jaw_open"]] == 0.0)
    assert np.all(m[silent, INDEX["lip_press"]] > 0)
    lim = np.abs(m[:, INDEX["head_yaw"] :]).max(0)
    assert np.all(lim <= [0.12, 0.12, 0.12, 0.05, 0.03, 0.03])


def test_visemes_deterministic_and_listening():
    a = visemes.motion_track(200, np.random.default_rng(5), [], _PHONES * 1)
    b = visemes.motion_track(200, np.random.default_rng(5), [], _PHONES * 1)
    assert np.array_equal(a.motion, b.motion)
    # Listening only: mouth shut, attentive head motion.
    partner = [(p, s + k * 2.0, e + k * 2.0) for k in range(4) for p, s, e in _PHONES]
    mt = visemes.motion_track(200, np.random.default_rng(1), [], partner)
    assert mt.listen.sum() > 50 and mt.talk.sum() == 0
    assert np.all(mt.motion[:, INDEX["jaw_open"]] == 0)
    blinks = mt.motion[:, INDEX["blink_left"]]
    assert blinks.max() > 0.5  # 8 s: at least one blink


# ---------------------------------------------------------------- faces and render


def test_augment_is_deterministic():
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    need("cv2", "opencv-python-headless is needed for face detection")
    a = faces.augment(rgb, np.random.default_rng(3))
    b = faces.augment(rgb, np.random.default_rng(3))
    assert np.array_equal(a, b) and a.shape == rgb.shape and a.dtype == np.uint8
    flipped = faces.apply_augment(rgb, faces.Augment(flip=True))
    assert np.array_equal(flipped, rgb[:, ::-1])
    pts = faces.augment_points(np.array([[10.0, 20.0]]), faces.Augment(flip=True), 64)
    assert np.allclose(pts, [[54.0, 20.0]])  # continuous coordinates: x -> 64 - x


def test_degrade_damages_pixels_not_geometry():
    need("cv2", "opencv-python-headless is needed for face detection")
    ys, xs = np.mgrid[:64, :64]
    rgb = np.stack([(xs * 4) % 256, (ys * 4) % 256, ((xs + ys) * 2) % 256], -1).astype(np.uint8)
    a = faces.degrade(rgb, np.random.default_rng(5), 1.0)
    assert np.array_equal(a, faces.degrade(rgb, np.random.default_rng(5), 1.0))  # seeded
    assert a.shape == rgb.shape and a.dtype == np.uint8 and not np.array_equal(a, rgb)
    assert np.array_equal(faces.degrade(rgb, np.random.default_rng(5), 0.0), rgb)
    # blur, JPEG and noise leave the picture where it was: the mean colour of each half holds
    for half in (slice(0, 32), slice(32, 64)):
        assert np.abs(a[:, half].mean((0, 1)) - rgb[:, half].mean((0, 1))).max() < 12


def test_transplanted_teeth_take_the_photos_colour_cast(astronaut):
    from edgetalk.training import open_mouths, render

    donor = render.prepare(astronaut.rgb, astronaut.landmarks, 128)
    shut_rgb, shut_lm = render.render(donor, _motion(lip_press=1.0))
    warm = np.clip(shut_rgb * np.array([1.15, 0.95, 0.75]), 0, 255).astype(np.uint8)
    closed = render.prepare(warm, np.c_[shut_lm, donor.landmarks[:, 2:]])
    rgb, lm = open_mouths.open_warp(closed, 0.4, 0.9, 0.8)
    out = open_mouths.transplant_teeth(rgb, lm, donor)
    inside = open_mouths._polygon_mask(rgb.shape, lm[open_mouths.INNER]) > 0.99
    r, g, b = out[inside].astype(float).mean(0)
    teeth = donor.rgb[
        open_mouths._polygon_mask(donor.rgb.shape, donor.landmarks[open_mouths.INNER]) > 0.99
    ]
    r0, g0, b0 = teeth.astype(float).mean(0)
    assert r / b > 1.2 * r0 / b0  # warm photo, warm teeth


def test_rotation_moves_points_pixels_and_motion_together():
    need("cv2", "opencv-python-headless is needed for face detection")
    from edgetalk.training.train_render import mirror_motion, rotate_motion

    aug = faces.Augment(flip=True, angle=np.radians(20), scale=1.1, shift=(0.05, -0.02))
    img = np.zeros((64, 64, 3), np.uint8)
    img[19:22, 9:12] = 255  # a dot centred on pixel (10, 20): continuous (10.5, 20.5)
    out = faces.apply_augment(img, aug)[..., 0].astype(float)
    ys, xs = np.mgrid[:64, :64]
    seen = np.array([(xs * out).sum(), (ys * out).sum()]) / out.sum() + 0.5
    pts = faces.augment_points(np.array([[10.5, 20.5]]), aug, 64)
    assert np.allclose(seen, pts[0], atol=0.3)
    # draws without a rotation replay exactly; with one, the angle stays within the bound
    plain = faces.sample_augment(np.random.default_rng(5))
    assert plain == faces.sample_augment(np.random.default_rng(5), rotate=0.0)
    assert abs(faces.sample_augment(np.random.default_rng(5), rotate=0.2).angle) <= 0.2
    # a head shift turns with the picture, after the flip mirrors it
    m = np.zeros(16, np.float32)
    m[14] = 0.1  # head_tx
    turned = rotate_motion(mirror_motion(m), aug.angle)
    a = faces.augment_matrix(aug, 64)[:, :2] / aug.scale
    assert np.allclose(turned[[14, 15]], a @ [0.1, 0.0], atol=1e-6)


def test_render_identity_and_jaw(astronaut):
    from edgetalk.training import render

    ref = render.prepare(astronaut.rgb, astronaut.landmarks, 128)
    frame, lm = render.render(ref, _motion())
    mse = np.mean((frame.astype(np.float64) - ref.rgb) ** 2)
    assert 10 * np.log10(255**2 / max(mse, 1e-10)) > 30
    assert lm.shape == (478, 2)
    _, lm_open = render.render(ref, _motion(jaw_open=1.0))
    height = np.linalg.norm(lm[152] - lm[10])
    gap0, gap1 = (np.linalg.norm(x[14] - x[13]) for x in (lm, lm_open))
    assert gap1 - gap0 > 0.07 * height
    _, lm_shut = render.render(ref, _motion(lip_press=1.0))
    assert np.linalg.norm(lm_shut[14] - lm_shut[13]) < 0.01 * height  # photo's open smile closes
    frame_turned, _ = render.render(ref, _motion(head_yaw=0.12, blink_left=1, blink_right=1))
    assert np.abs(frame_turned.astype(int) - frame).mean() > 1.0


def test_widen_mouth_opens_a_toothy_smile_with_its_own_pixels(astronaut):
    from edgetalk.training import open_mouths, render

    ref = render.prepare(astronaut.rgb, astronaut.landmarks, 128)
    wide = open_mouths.widen_mouth(ref, jaw=0.4, teeth=0.7, smile=0.2)
    again = open_mouths.widen_mouth(ref, jaw=0.4, teeth=0.7, smile=0.2)
    assert np.array_equal(wide.rgb, again.rgb)  # deterministic
    assert render.mouth_opening(wide.landmarks) > render.mouth_opening(ref.landmarks) + 0.03
    # Nothing painted: every pixel of the widened photo is a warp of the photo, so the mouth
    # holds no colour darker than the photo's darkest (the painted cavity is near black).
    assert wide.rgb.min() >= ref.rgb.min()
    # As a reference it behaves like a photo: zero motion shows it, lip_press closes it.
    frame, lm = render.render(wide, _motion())
    assert np.abs(frame.astype(int) - wide.rgb).mean() < 1.0
    _, shut = render.render(wide, _motion(lip_press=1.0))
    assert render.mouth_opening(shut) < 0.2 * render.mouth_opening(wide.landmarks)


def test_transplanted_teeth_fill_only_the_opened_mouth(astronaut):
    import cv2

    from edgetalk.training import open_mouths, render

    donor = render.prepare(astronaut.rgb, astronaut.landmarks, 128)
    assert open_mouths.is_teeth_donor(donor)
    # A closed-mouth face: the astronaut with her lips pressed (the renderer closes them).
    shut_rgb, shut_lm = render.render(donor, _motion(lip_press=1.0))
    z = np.c_[shut_lm, donor.landmarks[:, 2:]]
    closed = render.prepare(shut_rgb, z)
    assert not open_mouths.is_teeth_donor(closed)
    rgb, lm = open_mouths.open_warp(closed, 0.4, 0.9, 0.8)
    out = open_mouths.transplant_teeth(rgb, lm, donor)
    poly = open_mouths._polygon_mask(rgb.shape, lm[open_mouths.INNER])
    inside = poly > 0.99
    assert inside.sum() > 20
    grey, before = out.astype(float).mean(2), rgb.astype(float).mean(2)
    assert grey[inside].mean() > before[inside].mean() + 20  # white teeth, not stretched lips
    near = cv2.dilate((poly > 0).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    assert np.array_equal(out[~near], rgb[~near])  # nothing outside the mouth changes
    two = open_mouths.transplant_teeth(rgb, lm, donor, two_rows=True)
    assert np.array_equal(two[~near], rgb[~near])
    low = inside & (np.arange(rgb.shape[0])[:, None] > lm[open_mouths.INNER, 1].mean() + 1)
    assert np.abs(two[low].astype(int) - out[low]).mean() > 5  # a second row below the midline


def test_open_mouth_refs_are_deterministic_and_only_widen_toothy_photos(astronaut):
    from edgetalk.training import open_mouths, render

    toothy = render.prepare(astronaut.rgb, astronaut.landmarks, 128)
    shut_rgb, shut_lm = render.render(toothy, _motion(lip_press=1.0))
    closed = render.prepare(shut_rgb, np.c_[shut_lm, toothy.landmarks[:, 2:]])
    refs = open_mouths.open_mouth_refs([toothy, closed])
    # the toothy photo widened, and the closed one given the toothy one's teeth
    assert len(refs) == len(open_mouths.WIDEN) + 2 * len(open_mouths.OPEN_FOR_TEETH)  # 1 and 2 rows
    again = open_mouths.open_mouth_refs([toothy, closed])
    assert all(np.array_equal(a.rgb, b.rgb) for a, b in zip(refs, again, strict=True))
    assert len(open_mouths.open_mouth_refs([closed])) == 0  # no donor, nothing to widen
    assert len(open_mouths.open_mouth_refs([toothy], transplant=False)) == len(open_mouths.WIDEN)


def test_grace_hopper_is_a_training_face():
    need("mediapipe", "mediapipe==0.10.21 is needed for face landmarks")
    need("matplotlib", "matplotlib ships the grace_hopper photo")
    ids = faces.load_identities("train", sources=("matplotlib",))
    assert [i.name for i in ids] == ["grace_hopper"]
    assert ids[0].rgb.shape == (faces.CROP, faces.CROP, 3) and ids[0].landmarks.shape == (478, 3)


# ---------------------------------------------------------------- clips and shards


@needs_speech
def test_clip_is_deterministic(astronaut):
    from edgetalk.training import synth

    a = synth.make_clip(11, astronaut, size=128, seconds=2.0)
    b = synth.make_clip(11, astronaut, size=128, seconds=2.0)
    T = a.n_frames
    assert T == 50 and a.frames.shape == (T, 128, 128, 3)
    assert len(a.audio) == T * synth.SAMPLES_PER_FRAME == len(a.partner_audio)
    assert not a.partner_audio.any()
    for name in ("frames", "motion", "audio", "talk_mask", "mouth_open_gt", "bilabial"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.phonemes == b.phonemes and a.voice == b.voice
    c = synth.make_clip(11, astronaut, size=128, seconds=2.0, render=False)
    assert c.frames is None and np.array_equal(c.motion, a.motion)
    assert np.allclose(c.mouth_open_gt, a.mouth_open_gt)


@needs_speech
def test_dyadic_talk_mask_follows_own_voice(astronaut):
    from edgetalk.training import synth

    clip = synth.make_clip(4, astronaut, size=64, seconds=8.0, dyadic=True, render=False)
    assert clip.partner_audio.any() and clip.partner_voice and clip.partner_voice != clip.voice
    rms = np.sqrt((clip.audio.reshape(clip.n_frames, -1) ** 2).mean(1))
    voiced = rms > 0.02 * rms.max()
    talk = clip.talk_mask > 0
    assert talk.any() and clip.listen_mask.any()
    assert np.mean(voiced == talk) > 0.85
    assert not np.any(talk & (clip.listen_mask > 0))
    prms = np.sqrt((clip.partner_audio.reshape(clip.n_frames, -1) ** 2).mean(1))
    assert np.mean(prms[clip.listen_mask > 0] > 0.02 * prms.max()) > 0.7
    # The mouth is shut while the subject is silent.
    silent = ~talk & ~np.convolve(talk, np.ones(5), "same").astype(bool)
    assert np.all(clip.motion[silent, INDEX["jaw_open"]] == 0)


@needs_speech
def test_shard_round_trip(astronaut, tmp_path):
    from edgetalk.training import synth

    clips = [
        synth.make_clip(1, astronaut, size=64, seconds=1.0),
        synth.make_clip(2, astronaut, size=64, seconds=2.0, dyadic=True, render=False),
    ]
    path = synth.write_shard(tmp_path / "s.npz", clips)
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    back = synth.read_shard(path)
    assert len(back) == 2 and back[1].frames is None
    for a, b in zip(clips, back, strict=True):
        for name in ("motion", "audio", "partner_audio", "talk_mask", "bilabial", "landmarks"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert (a.seed, a.identity, a.voice, a.partner_voice) == (
            b.seed,
            b.identity,
            b.voice,
            b.partner_voice,
        )
        assert [p[0] for p in a.phonemes] == [p[0] for p in b.phonemes]
        assert np.allclose([p[1:] for p in a.phonemes], [p[1:] for p in b.phonemes])
    assert np.array_equal(clips[0].frames, back[0].frames)
