"""Live audio sources. Each one is an iterator of float32 16 kHz mono pieces (numpy arrays).

A source may also yield `INTERRUPT` (the sender asks for a barge-in) and, for a file with a
partner track, `(own, partner)` pairs. `feed(session, source)` plays any source into a Session.

Sources:
- `MicSource`: a microphone via sounddevice (the `mic` extra).
- `PcmStdinSource`: raw s16le PCM on a pipe (`--pcm-stdin`), any rate and channel count.
- `SocketSource` (socket_source.py): a TCP server carrying length-prefixed s16le PCM.
- `FileSource`: an audio file played in real time.

Every queue here is bounded: a source never holds more than a few seconds of audio.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..models.config import SAMPLE_RATE
from .audio_io import StreamResampler, read_audio, s16le_to_float
from .session import SessionClosed

MAX_SOURCE_SECONDS = 4.0  # audio a source holds for the session (socket, mic); bounded


class Control:
    """A control item in a source's stream of audio pieces."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


INTERRUPT = Control("INTERRUPT")


class BoundedQueue:
    """A FIFO of audio pieces capped in seconds. `put` waits (backpressure) or drops the oldest."""

    def __init__(self, max_seconds: float = MAX_SOURCE_SECONDS):
        self.cap = int(max_seconds * SAMPLE_RATE)
        self.items: deque = deque()
        self.samples = 0
        self.dropped_samples = 0
        self.closed = False
        self.cond = threading.Condition()

    @staticmethod
    def _size(item) -> int:
        return item.shape[0] if isinstance(item, np.ndarray) else 0

    def put(self, item, block: bool = True) -> None:
        n = self._size(item)
        with self.cond:
            while block and n and self.samples + n > self.cap and self.samples and not self.closed:
                self.cond.wait(0.1)
            while not block and n and self.samples + n > self.cap and self.items:
                old = self.items.popleft()
                self.samples -= self._size(old)
                self.dropped_samples += self._size(old)
            self.items.append(item)
            self.samples += n
            self.cond.notify_all()

    def put_interrupt(self) -> None:
        """Barge-in: speech still waiting here is dropped too, and the interrupt goes first."""
        with self.cond:
            self.dropped_samples += self.samples
            self.items = deque(i for i in self.items if not isinstance(i, np.ndarray))
            self.samples = 0
            self.items.append(INTERRUPT)
            self.cond.notify_all()

    def get(self, timeout: float = 0.1):
        with self.cond:
            if not self.items:
                self.cond.wait(timeout)
            if not self.items:
                return None
            item = self.items.popleft()
            self.samples -= self._size(item)
            self.cond.notify_all()
            return item

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class AudioSource:
    """Base: iterate for pieces; `close()` stops the source from any thread."""

    name = "source"

    def __init__(self):
        self.notes: list[str] = []
        self._closed = threading.Event()

    def __iter__(self) -> Iterator:
        raise NotImplementedError

    def close(self) -> None:
        self._closed.set()

    def describe(self) -> str:
        return self.name


# ------------------------------------------------------------------------------------------------
class PcmStdinSource(AudioSource):
    """Raw signed 16-bit little-endian PCM from a pipe (stdin by default), interleaved channels.

    Reads whatever the pipe has (never waits for a full block), so a TTS that writes 20 ms at a
    time is heard 20 ms at a time. A read that splits a sample is carried over to the next one; a
    trailing incomplete sample at the end of the stream is ignored with a note.
    """

    name = "stdin"

    def __init__(self, stream=None, rate: int = SAMPLE_RATE, channels: int = 1, block: int = 4096):
        super().__init__()
        if stream is None:
            if sys.stdin is None or sys.stdin.isatty():
                raise InputError(
                    "--pcm-stdin reads raw s16le PCM from a pipe, but stdin is a terminal; "
                    "pipe audio in, e.g. `tts ... | edgetalk live --pcm-stdin`"
                )
            stream = sys.stdin.buffer
        if channels < 1:
            raise InputError(f"invalid channel count {channels}")
        self.stream = stream
        self.channels = channels
        self.block = block
        self.resample = StreamResampler(rate)
        self.bytes_read = 0

    def describe(self) -> str:
        return f"s16le PCM on stdin ({self.resample.rate} Hz, {self.channels} ch)"

    def __iter__(self) -> Iterator[np.ndarray]:
        read = getattr(self.stream, "read1", None) or self.stream.read
        frame_bytes = 2 * self.channels
        carry = b""
        while not self._closed.is_set():
            try:
                data = read(self.block)
            except (OSError, ValueError):  # closed underneath us
                break
            if not data:
                break
            self.bytes_read += len(data)
            data = carry + data
            usable = len(data) - len(data) % frame_bytes
            carry = data[usable:]
            if usable:
                yield self.resample(s16le_to_float(data[:usable], self.channels))
        if carry:
            self.notes.append(
                f"ignored {len(carry)} trailing byte(s) of stdin: not a whole {frame_bytes}-byte sample"
            )
        tail = self.resample.flush()
        if tail.size:
            yield tail


# ------------------------------------------------------------------------------------------------
class MicSource(AudioSource):
    """A microphone through sounddevice (PortAudio). The audio callback never blocks: when the
    session falls more than MAX_SOURCE_SECONDS behind, the oldest audio is dropped and counted."""

    name = "mic"

    def __init__(self, device: str | int | None = None, block_ms: int = 20):
        super().__init__()
        try:
            import sounddevice as sd
        except ImportError:
            raise InputError(
                "--mic needs sounddevice: pip install 'edgetalk[mic]' (or feed audio with "
                "--pcm-stdin or --listen)"
            ) from None
        except OSError as e:  # sounddevice is installed but PortAudio is not
            raise InputError(
                f"--mic: the PortAudio library is missing ({e}); on Linux install libportaudio2"
            ) from None
        try:
            info = sd.query_devices(device, kind="input")
        except Exception as e:
            raise InputError(
                f"no microphone found ({e}); check the input device, or feed audio with "
                "--pcm-stdin or --listen"
            ) from None
        rate = SAMPLE_RATE
        try:
            sd.check_input_settings(device=device, samplerate=SAMPLE_RATE, channels=1)
        except Exception:
            rate = int(info.get("default_samplerate") or 48000)
        self.device_name = info.get("name", str(device))
        self.resample = StreamResampler(rate)
        self.queue = BoundedQueue()
        try:
            self.stream = sd.InputStream(
                device=device,
                samplerate=rate,
                channels=1,
                dtype="float32",
                blocksize=max(1, int(rate * block_ms / 1000)),
                callback=self._callback,
            )
        except Exception as e:
            raise InputError(f"cannot open microphone {self.device_name!r}: {e}") from None

    def describe(self) -> str:
        return f"microphone {self.device_name!r} ({self.resample.rate} Hz)"

    def _callback(self, indata, frames, time_info, status) -> None:
        self.queue.put(indata[:, 0].copy(), block=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        self.stream.start()
        try:
            while not self._closed.is_set():
                piece = self.queue.get(0.1)
                if piece is not None:
                    yield self.resample(piece)
        finally:
            self.stream.stop()
            self.stream.close()
            if self.queue.dropped_samples:
                self.notes.append(
                    f"dropped {self.queue.dropped_samples / SAMPLE_RATE:.2f} s of microphone audio "
                    "(the session fell behind)"
                )

    def close(self) -> None:
        super().close()
        self.queue.close()


# ------------------------------------------------------------------------------------------------
class FileSource(AudioSource):
    """An audio file (any format `run` reads), played in real time (or as fast as consumed)."""

    name = "file"

    def __init__(
        self,
        path: str | Path,
        partner: str | Path | None = None,
        realtime: bool = True,
        piece_ms: int = 40,
    ):
        super().__init__()
        own = read_audio(path)
        self.notes += [f"audio: {n}" for n in own.notes]
        self.own, self.partner = own.pcm, None
        if partner is not None:
            pa = read_audio(partner)
            self.notes += [f"partner audio: {n}" for n in pa.notes]
            n = max(self.own.shape[0], pa.pcm.shape[0])
            self.own = np.pad(self.own, (0, n - self.own.shape[0]))
            self.partner = np.pad(pa.pcm, (0, n - pa.pcm.shape[0]))
        self.realtime = realtime
        self.piece = max(1, int(piece_ms * SAMPLE_RATE / 1000))
        self.path = Path(path)

    @property
    def seconds(self) -> float:
        return self.own.shape[0] / SAMPLE_RATE

    def describe(self) -> str:
        return f"{self.path.name} ({self.seconds:.2f} s{', real time' if self.realtime else ''})"

    def __iter__(self) -> Iterator:
        t0 = time.monotonic()
        for i in range(0, self.own.shape[0], self.piece):
            if self._closed.is_set():
                return
            if self.realtime:  # a piece is available once its last sample has "been spoken"
                wait = t0 + min(i + self.piece, self.own.shape[0]) / SAMPLE_RATE - time.monotonic()
                if wait > 0 and self._closed.wait(wait):
                    return
            own = self.own[i : i + self.piece]
            yield own if self.partner is None else (own, self.partner[i : i + self.piece])


# ------------------------------------------------------------------------------------------------
def feed(session, source: AudioSource, partner: bool = False, close_at_end: bool = True) -> None:
    """Play a source into a Session until the source ends (then close the session's input).

    `partner=True` routes the pieces to the partner voice (the other side of the conversation).
    """
    try:
        for item in source:
            if item is INTERRUPT:
                session.interrupt()
            elif isinstance(item, tuple):
                session.push_audio(item[0], item[1])
            elif partner:
                session.push_partner(item)
            else:
                session.push_audio(item)
    except SessionClosed:
        return
    if close_at_end and not partner:
        session.close()
