"""Real module inputs for calibration and parity: the shipped avatar and example speech streamed
through the torch scheduler, every call recorded (copied: the scheduler updates its cache in place)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..models.config import SAMPLES_PER_FRAME
from ..runtime.audio_io import default_speech, read_audio
from ..runtime.avatar import prepare_avatar
from ..runtime.backend import Backend
from ..runtime.scheduler import StreamScheduler


class RecordingBackend(Backend):
    def __init__(self, inner: Backend):
        super().__init__(inner.cfg, inner.io, inner.precision)
        self.name = f"recording:{inner.name}"
        self.inner = inner
        self.calls: dict[str, list[dict[str, np.ndarray]]] = {}

    def run(self, module, inputs):
        self.calls.setdefault(module, []).append({k: np.array(v) for k, v in inputs.items()})
        return self.inner.run(module, inputs)


@dataclass
class Recording:
    calls: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)

    def extend(self, other: dict[str, list]) -> None:
        for k, v in other.items():
            self.calls.setdefault(k, []).extend(v)


def record_stream(torch_backend: Backend, seconds: float = 4.0, seed: int = 0) -> Recording:
    """Run the example speech (own voice, then a dyadic pass with the partner speaking) and the
    embedded avatar plus colour/flip variants through the scheduler, recording every call."""
    rec = Recording()
    res = torch_backend.cfg.render.resolution
    avatar = prepare_avatar(None, res)
    speech = read_audio(default_speech()).pcm
    speech = speech[8000 : 8000 + int(seconds * 16000)]  # skip the leading half second of silence
    variants = [avatar, avatar[:, ::-1].copy(), np.clip(avatar * 0.8 + 20, 0, 255).astype(np.uint8)]
    for i, img in enumerate(variants):
        backend = RecordingBackend(torch_backend)
        sched = StreamScheduler(backend, img, seed=seed + i)
        if i == 0:
            sched.push_audio(speech)
        elif i == 1:  # dyadic: the partner talks over a quiet own track, so the avatar listens
            n = (speech.shape[0] * 3 // 4 // SAMPLES_PER_FRAME) * SAMPLES_PER_FRAME
            sched.push_audio(speech[:n] * 0.05, speech[speech.shape[0] - n :])
        else:
            sched.push_audio(speech[: speech.shape[0] // 3])
        sched.flush()
        rec.extend(backend.calls)
    return rec


def pick(calls: list[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    """n calls spread over a recording (the first, the last, and evenly between)."""
    if len(calls) <= n:
        return calls
    idx = np.unique(np.linspace(0, len(calls) - 1, n).round().astype(int))
    return [calls[i] for i in idx]
