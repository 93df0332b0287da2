"""Synthetic talking-head clips (audio, motion, frames), deterministic per seed, and shards.

A clip is a timeline of espeak utterances (the subject's own voice, and in dyadic clips a
partner's voice taking turns), the motion the viseme model derives from their phonemes, and
optionally the frames rendered from a real face photo. The same seed always gives identical
arrays. Shards are plain .npz files without pickle, so pre-rendered data loads safely anywhere.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from . import render as _render
from . import speech, visemes
from .faces import Identity, face_landmarks

FPS = visemes.FPS
SAMPLE_RATE = speech.SAMPLE_RATE
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640


@dataclass
class Clip:
    seed: int
    identity: str
    split: str
    motion: np.ndarray  # [T, 16] float32
    audio: np.ndarray  # [T * 640] float32, the subject's own voice
    partner_audio: np.ndarray  # [T * 640] float32, zeros unless dyadic
    talk_mask: np.ndarray  # [T] float32, 1 where the subject speaks
    listen_mask: np.ndarray  # [T] float32, 1 where only the partner speaks
    mouth_open_gt: np.ndarray  # [T] float32, inner-lip gap / face height, from the landmarks
    bilabial: np.ndarray  # [T] bool, frames inside a p/b/m closure
    landmarks: np.ndarray  # [T, 478, 2] float32, where the renderer put every landmark
    phonemes: list  # [(IPA, start_s, end_s)] of the subject
    partner_phonemes: list
    voice: str
    partner_voice: str
    frames: np.ndarray | None = None  # [T, S, S, 3] uint8 (None when not rendered)

    @property
    def n_frames(self) -> int:
        return len(self.motion)


# ---------------------------------------------------------------- timeline


def _place(track: np.ndarray, utt: speech.Utterance, t0: float, gain: float, phonemes: list):
    i0 = int(round(t0 * SAMPLE_RATE))
    seg = utt.audio[: max(0, len(track) - i0)]
    peak = float(np.abs(utt.audio).max()) or 1.0
    track[i0 : i0 + len(seg)] += seg * (gain / peak)
    dur = len(track) / SAMPLE_RATE
    for ipa, s, e in utt.phonemes:
        if t0 + s < dur:
            phonemes.append((ipa, t0 + s, min(t0 + e, dur)))


def _timeline(rng, seconds, own: speech.Voice, partner: speech.Voice | None):
    """Place utterances: a monologue with pauses, or turns alternating with a partner."""
    n = int(round(seconds * FPS)) * SAMPLES_PER_FRAME
    tracks = {"own": np.zeros(n, np.float32), "partner": np.zeros(n, np.float32)}
    phones = {"own": [], "partner": []}
    gains = {"own": float(rng.uniform(0.3, 0.9)), "partner": float(rng.uniform(0.3, 0.9))}
    voices = {"own": own, "partner": partner}
    who = "own" if partner is None or rng.random() < 0.5 else "partner"
    t = float(rng.uniform(0.1, 0.6))
    while t < seconds - 0.4:
        # A monologue fills the clip; a dyadic turn takes 30-60% of it (at most 4 s) so both
        # sides get to speak even in short clips.
        turn_end = seconds if partner is None else t + min(rng.uniform(0.3, 0.6) * seconds, 4.0)
        while t < min(turn_end, seconds - 0.4):
            budget = max(turn_end - t + 0.5, 1.0)
            utt = speech.random_utterance(rng, voices[who], max_seconds=budget)
            if not utt.phonemes:
                break
            start = t - utt.phonemes[0][1]  # the first phoneme lands at t, not espeak's lead-in
            _place(tracks[who], utt, max(start, 0.0), gains[who], phones[who])
            t = start + utt.phonemes[-1][2] + float(rng.uniform(0.15, 0.5))
        t += float(rng.uniform(0.1, 0.6))  # turn gap
        if partner is not None:
            who = "partner" if who == "own" else "own"
    return tracks, phones


# ---------------------------------------------------------------- references

_REFS: dict = {}
_REFS_LOCK = threading.Lock()


def reference(identity: Identity, size: int) -> _render.RefFace:
    """The prepared render reference of an identity at a size (landmarks measured once)."""
    key = (identity.name, size)
    with _REFS_LOCK:
        hit = _REFS.get(key)
        if hit is not None and hit[0] is identity.rgb:
            return hit[1]
    lm = identity.landmarks if identity.landmarks is not None else face_landmarks(identity.rgb)
    if lm is None:
        raise ValueError(f"no face landmarks found for identity {identity.name!r}")
    ref = _render.prepare(identity.rgb, lm, size)
    with _REFS_LOCK:
        _REFS[key] = (identity.rgb, ref)
    return ref


# ---------------------------------------------------------------- clips


def make_clip(
    seed: int,
    identity: Identity,
    size: int = 256,
    seconds: float = 4.0,
    dyadic: bool = False,
    split: str = "train",
    render: bool = True,
) -> Clip:
    """One synthetic clip. Same arguments -> identical arrays. render=False skips the frames
    (landmarks and mouth_open_gt are still exact: they come from the deformed mesh)."""
    ss = np.random.SeedSequence([int(seed), int(dyadic), {"train": 0, "eval": 1}[split]])
    rng_voice, rng_text, rng_motion = (np.random.default_rng(s) for s in ss.spawn(3))
    own = speech.random_voice(rng_voice, split)
    partner = speech.random_voice(rng_voice, split, exclude=own.name) if dyadic else None
    tracks, phones = _timeline(rng_text, seconds, own, partner)
    n_frames = len(tracks["own"]) // SAMPLES_PER_FRAME
    mt = visemes.motion_track(n_frames, rng_motion, phones["own"], phones["partner"])

    ref = reference(identity, size)
    frames = np.zeros((n_frames, size, size, 3), np.uint8) if render else None
    landmarks = np.zeros((n_frames, len(ref.landmarks), 2), np.float32)
    for k in range(n_frames):
        if render:
            frames[k], landmarks[k] = _render.render(ref, mt.motion[k])
        else:
            landmarks[k] = _render.deform(ref, mt.motion[k])[1][:, :2]
    gap = np.linalg.norm(landmarks[:, 14] - landmarks[:, 13], axis=1)
    height = np.linalg.norm(landmarks[:, 152] - landmarks[:, 10], axis=1)
    return Clip(
        seed=int(seed),
        identity=identity.name,
        split=split,
        motion=mt.motion,
        audio=tracks["own"],
        partner_audio=tracks["partner"],
        talk_mask=mt.talk,
        listen_mask=mt.listen,
        mouth_open_gt=(gap / height).astype(np.float32),
        bilabial=mt.bilabial,
        landmarks=landmarks,
        phonemes=phones["own"],
        partner_phonemes=phones["partner"],
        voice=own.name,
        partner_voice=partner.name if partner else "",
        frames=frames,
    )


# ---------------------------------------------------------------- shards

_ARRAYS = (
    "motion",
    "audio",
    "partner_audio",
    "talk_mask",
    "listen_mask",
    "mouth_open_gt",
    "bilabial",
    "landmarks",
    "frames",
)
_SCALARS = ("seed", "identity", "split", "voice", "partner_voice")


def _phoneme_arrays(ph: list) -> tuple[np.ndarray, np.ndarray]:
    ipa = np.array([p[0] for p in ph], dtype=str) if ph else np.zeros(0, "<U1")
    times = np.array([(p[1], p[2]) for p in ph], np.float64).reshape(-1, 2)
    return ipa, times


def write_shard(path: str | Path, clips: list[Clip], compress: bool = False) -> Path:
    """Write clips to one .npz (no pickle: strings are unicode arrays, phonemes two arrays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {"n_clips": np.array(len(clips), np.int64)}
    for i, c in enumerate(clips):
        for name in _ARRAYS:
            val = getattr(c, name)
            if val is not None:
                out[f"{i}/{name}"] = np.asarray(val)
        for name in _SCALARS:
            out[f"{i}/{name}"] = np.array(getattr(c, name))
        for name in ("phonemes", "partner_phonemes"):
            out[f"{i}/{name}_ipa"], out[f"{i}/{name}_t"] = _phoneme_arrays(getattr(c, name))
    with open(path, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **out)
    return path


def read_shard(path: str | Path) -> list[Clip]:
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    clips = []
    for i in range(int(data["n_clips"])):
        kw = {f.name: None for f in fields(Clip)}
        for name in _ARRAYS:
            kw[name] = data.get(f"{i}/{name}")
        for name in _SCALARS:
            kw[name] = data[f"{i}/{name}"].item()
        for name in ("phonemes", "partner_phonemes"):
            ipa, t = data[f"{i}/{name}_ipa"], data[f"{i}/{name}_t"]
            kw[name] = [(str(p), float(a), float(b)) for p, (a, b) in zip(ipa, t, strict=True)]
        clips.append(Clip(**kw))
    return clips
