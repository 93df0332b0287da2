"""Real talking clips: the catalog, the held-out split, and reading a clip's frames and speech.

A data folder (`../shared/data/real/` in this project) holds `catalog.json`, `videos/<id>.mp4`
(25 fps) and `audio/<id>.wav` (16 kHz mono, the clip's own speech). Items of the same person share
an `identity` label; the split below is by identity, so no held-out face or voice is ever trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..models.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

# Whole identities kept out of every training stage, used only by `edgetalk eval --real`.
# Chosen for spread: VoxCeleb2 interviews (a noisy and a quiet one), an HDTF radio host, a
# Real3DPortrait presenter, a StyleTalk politician (female), three GRID speakers. 10 clips, 71 s.
HELD_OUT_IDENTITIES: tuple[str, ...] = (
    "vox_u00015",
    "vox_u00098",
    "vox_6209",
    "vox_6811",
    "hdtf_RD_Radio34",
    "May",
    "KristiNoem",
    "grid_spkA",
    "grid_spkC",
    "grid_spkH",
)


@dataclass(frozen=True)
class RealItem:
    id: str
    kind: str  # video, photo, photo_art, speech
    identity: str | None
    license: str
    source_repo: str
    file: Path  # the mp4 / image / wav
    audio: Path | None  # 16 kHz wav beside a video
    duration_s: float | None

    @property
    def held_out(self) -> bool:
        return self.identity in HELD_OUT_IDENTITIES


def load_catalog(root: str | Path) -> list[RealItem]:
    """Every item of a data folder's catalog.json, with absolute paths."""
    root = Path(root)
    cat = root / "catalog.json"
    if not cat.is_file():
        raise InputError(f"{root} has no catalog.json; give a real-data folder (see its README)")
    try:
        items = json.loads(cat.read_text())["items"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{cat} is not a readable catalog ({type(e).__name__}: {e})") from None
    out = []
    for it in items:
        try:
            audio = it.get("audio_file") or (it["file"] if it["kind"] == "speech" else None)
            out.append(
                RealItem(
                    id=str(it["id"]),
                    kind=str(it["kind"]),
                    identity=it.get("identity"),
                    license=str(it.get("license", "")),
                    source_repo=str(it.get("source_repo", "")),
                    file=root / it["file"],
                    audio=root / audio if audio else None,
                    duration_s=it.get("duration_s"),
                )
            )
        except (KeyError, TypeError) as e:
            raise InputError(f"{cat}: item {it!r:.80} lacks a field ({e})") from None
    return out


def videos(root: str | Path, split: str = "all") -> list[RealItem]:
    """Talking clips with their speech: split 'train' (never a held-out identity), 'eval'
    (held-out identities only) or 'all'."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be train, eval or all, not {split!r}")
    out = [i for i in load_catalog(root) if i.kind == "video" and i.audio is not None]
    if split == "train":
        out = [i for i in out if not i.held_out]
    elif split == "eval":
        out = [i for i in out if i.held_out]
    return out


def speech_only(root: str | Path) -> list[RealItem]:
    """Speech recordings without video, minus any held-out identity's voice."""
    return [i for i in load_catalog(root) if i.kind == "speech" and not i.held_out]


def read_frames(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """All frames of a video as [T, H, W, 3] uint8 RGB (the clips are 25 fps)."""
    import av

    p = Path(path)
    if not p.is_file():
        raise InputError(f"video not found: {p}")
    frames = []
    try:
        with av.open(str(p)) as c:
            stream = c.streams.video[0]
            rate = float(stream.average_rate or FPS)
            if abs(rate - FPS) > 0.5:
                raise InputError(f"{p} is {rate:.2f} fps; real clips must be {FPS} fps")
            for f in c.decode(stream):
                frames.append(f.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except InputError:
        raise
    except Exception as e:  # PyAV raises many error types for undecodable input
        raise InputError(f"cannot read {p} as a video ({type(e).__name__}: {e})") from None
    if not frames:
        raise InputError(f"{p} has no frames")
    return np.stack(frames)


def read_speech(path: str | Path) -> np.ndarray:
    """A wav as float32 mono at 16 kHz (resampled and downmixed when it is not)."""
    from ..runtime.audio_io import read_audio

    return np.ascontiguousarray(read_audio(str(path)).pcm, np.float32)


def read_clip(item: RealItem, max_seconds: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(frames [T, H, W, 3], speech [T * 640]) cut to the same whole number of frames."""
    cap = None if max_seconds is None else int(round(max_seconds * FPS))
    frames = read_frames(item.file, cap)
    pcm = read_speech(item.audio)
    n = min(len(frames), len(pcm) // SAMPLES_PER_FRAME)
    if n < FPS:
        raise InputError(f"{item.id}: under one second of video with speech")
    return frames[:n], pcm[: n * SAMPLES_PER_FRAME]


__all__ = [
    "HELD_OUT_IDENTITIES",
    "RealItem",
    "SAMPLE_RATE",
    "load_catalog",
    "read_clip",
    "read_frames",
    "read_speech",
    "speech_only",
    "videos",
]
