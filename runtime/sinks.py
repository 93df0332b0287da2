"""Frame sinks: where the scheduler's frames go. All share `write(frame)` and `close()`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..models.config import FPS, SAMPLE_RATE
from .scheduler import Frame


class Sink:
    def write(self, frame: Frame) -> None:
        raise NotImplementedError

    def write_audio(self, pcm: np.ndarray) -> None:
        """Audio that belongs to the same timeline (sinks without audio ignore it)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NullSink(Sink):
    """Discards frames (benchmarks); counts them."""

    def __init__(self):
        self.frames = 0

    def write(self, frame: Frame) -> None:
        self.frames += 1


class CallbackSink(Sink):
    def __init__(self, fn: Callable[[Frame], None]):
        self.fn = fn

    def write(self, frame: Frame) -> None:
        self.fn(frame)


class Mp4Sink(Sink):
    """H.264 video at 25 fps with AAC audio, both stamped on one timeline (PyAV).

    Video pts are frame indices in 1/25 s; audio pts are sample counts in 1/16000 s. Both start at
    zero, so players keep them in sync however long the stream runs.
    """

    def __init__(self, path: str | Path, resolution: int, with_audio: bool = True, crf: int = 20):
        import av

        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise InputError(f"output folder does not exist: {self.path.parent}")
        try:
            self.container = av.open(str(self.path), mode="w", format="mp4")
        except Exception as e:
            raise InputError(f"cannot write {self.path}: {e}") from None
        self.video = self.container.add_stream("libx264", rate=FPS)
        self.video.width = self.video.height = resolution
        self.video.pix_fmt = "yuv420p"
        self.video.options = {"crf": str(crf), "preset": "veryfast"}
        self.audio = None
        if with_audio:
            self.audio = self.container.add_stream("aac", rate=SAMPLE_RATE)
            self.audio.layout = "mono"
        self.audio_samples = 0
        self.frames = 0
        self.closed = False

    def write(self, frame: Frame) -> None:
        import av

        vf = av.VideoFrame.from_ndarray(frame.rgb, format="rgb24")
        vf.pts = frame.index  # codec time base is 1/25 s
        for packet in self.video.encode(vf):
            self.container.mux(packet)
        self.frames += 1

    def write_audio(self, pcm: np.ndarray) -> None:
        import av

        if self.audio is None or pcm.size == 0:
            return
        af = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm, dtype=np.float32)[None], format="flt", layout="mono"
        )
        af.sample_rate = SAMPLE_RATE
        af.pts = self.audio_samples  # codec time base is 1/16000 s
        self.audio_samples += pcm.shape[0]
        for packet in self.audio.encode(af):
            self.container.mux(packet)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in (self.video, self.audio):
            if stream is not None:
                for packet in stream.encode(None):
                    self.container.mux(packet)
        self.container.close()
