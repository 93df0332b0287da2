"""Audio in: any file soundfile or PyAV can read -> 16 kHz mono float32, with notes on what changed;
and for streams, `StreamResampler` (continuous across pieces) and s16le decoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..models.config import SAMPLE_RATE

MAX_RUN_SECONDS = 3 * 3600  # `run` refuses longer files: use `live` for endless streams
MIN_RATE, MAX_RATE = 1000, 768_000  # plausible sample rates (Hz); outside is a damaged header


MAX_CHANNELS = 64  # a streamed [samples, channels] array wider than this is channels-first


def check_channels(x: np.ndarray, what: str = "audio") -> None:
    """[samples, channels] with more channels than this is almost surely a channels-first array
    ([2, N] stereo): downmixed as given it would be N-channel noise, 2 samples long."""
    if x.ndim == 2 and x.shape[1] > MAX_CHANNELS:
        raise InputError(
            f"{what} has shape {x.shape}: read as [samples, channels] that is {x.shape[1]} "
            f"channels (at most {MAX_CHANNELS}); pass a channels-first array transposed (x.T)"
        )


def check_rate(rate) -> None:
    if not isinstance(rate, int | np.integer) or not MIN_RATE <= rate <= MAX_RATE:
        raise InputError(
            f"unsupported sample rate {rate} Hz: EdgeTalk takes {MIN_RATE}..{MAX_RATE} Hz"
        )


@dataclass
class Audio:
    pcm: np.ndarray  # float32 mono at 16 kHz
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.pcm.shape[0] / SAMPLE_RATE


def to_mono_16k(data: np.ndarray, rate: int, notes: list[str] | None = None) -> np.ndarray:
    """[samples] or [samples, channels] at any rate -> float32 mono 16 kHz (downmix, soxr resample)."""
    import soxr

    notes = notes if notes is not None else []
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        if data.shape[1] > 1:
            notes.append(f"downmixed {data.shape[1]} channels to mono")
        data = data.mean(axis=1)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:  # before the resampler, whose filter would spread each NaN over its neighbours
        notes.append(f"{bad} samples were not numbers (NaN or Inf): replaced by silence")
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    check_rate(rate)
    if rate != SAMPLE_RATE:
        notes.append(f"resampled {rate} Hz to {SAMPLE_RATE} Hz")
        data = soxr.resample(data, rate, SAMPLE_RATE, quality="HQ") if data.size else data
    data = np.nan_to_num(data, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.ascontiguousarray(np.clip(data, -1.0, 1.0), dtype=np.float32)


def read_audio(path: str | Path, max_seconds: float = MAX_RUN_SECONDS) -> Audio:
    p = Path(path)
    if not p.exists():
        raise InputError(f"audio file not found: {p}")
    if p.is_dir():
        raise InputError(f"audio path is a directory, not a file: {p}")
    if p.stat().st_size == 0:
        raise InputError(f"audio file {p} is empty (0 bytes)")
    truncated = wav_truncation(p)
    if truncated:
        raise InputError(f"audio file {p}: {truncated}")
    notes: list[str] = []
    data, rate = _read_soundfile(p, max_seconds)
    if data is None:
        data, rate = _read_pyav(p, max_seconds)
    if data.shape[0] == 0:
        raise InputError(f"audio file {p} has no samples")
    if data.shape[0] / rate > max_seconds:
        raise InputError(f"audio file {p} is longer than the {max_seconds:.0f} s limit of `run`")
    pcm = to_mono_16k(data, rate, notes)
    if pcm.size == 0:  # a few samples at a high rate resample to nothing
        raise InputError(f"audio file {p} is too short ({data.shape[0]} samples at {rate} Hz)")
    return Audio(pcm, notes)


def _read_soundfile(p: Path, max_seconds: float):
    import soundfile as sf

    try:
        info = sf.info(str(p))
    except Exception:
        return None, 0  # not a format libsndfile knows; try PyAV
    if info.frames / max(info.samplerate, 1) > max_seconds:
        raise InputError(f"audio file {p} is longer than the {max_seconds:.0f} s limit of `run`")
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception:
        raise InputError(f"cannot read audio file {p}: the file is damaged") from None
    return data, rate


def wav_truncation(p: Path) -> str:
    """For a RIFF/WAVE file whose data chunk promises more bytes than the file holds, what is
    missing ("the file is truncated: header says X s, found Y s"); else "". Readers silently
    play what is there, so a cut download would render as a short video without a word."""
    import struct

    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return ""
        pos, rate, align = 12, 0, 0
        for _ in range(1000):  # real files have a handful of chunks before "data"
            if pos + 8 > size:
                break
            f.seek(pos)
            cid, n = struct.unpack("<4sI", f.read(8))
            if cid == b"fmt " and n >= 16:
                fmt = f.read(14)
                if len(fmt) < 14:  # cut inside the format chunk: the readers will say so
                    return ""
                _, _, rate, _, align = struct.unpack("<HHIIH", fmt)
            elif cid == b"data":
                found = size - pos - 8
                # 0 and 0xFFFFFFFF are what streaming writers put when the length is unknown
                if n in (0, 0xFFFFFFFF) or n <= found or not rate or not align:
                    return ""
                said, got = n / align / rate, (found // align) / rate
                return f"the file is truncated: header says {said:.2f} s, found {got:.2f} s"
            pos += 8 + n + (n & 1)
    return ""


def _read_pyav(p: Path, max_seconds: float):
    import av

    try:
        with av.open(str(p)) as c:
            stream = next((s for s in c.streams if s.type == "audio"), None)
            if stream is None:
                raise InputError(f"{p} has no audio stream")
            check_rate(stream.rate)  # a damaged header's rate would make the resampler crawl
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            parts = []
            total = 0
            for frame in c.decode(stream):
                check_rate(frame.sample_rate)
                for out in resampler.resample(frame):
                    arr = out.to_ndarray().reshape(-1)
                    parts.append(arr)
                    total += arr.shape[0]
                if total > max_seconds * SAMPLE_RATE:
                    raise InputError(f"audio file {p} is longer than the {max_seconds:.0f} s limit")
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except InputError:
        raise
    except Exception:  # PyAV's error text names FFmpeg internals, not the user's problem
        raise InputError(
            f"cannot read {p} as audio: not a format EdgeTalk reads, or the file is damaged"
        ) from None
    data = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return data[:, None], SAMPLE_RATE


def default_speech() -> Path:
    """The example speech that ships with the package (espeak-ng, 16 kHz mono)."""
    import importlib.resources

    return Path(str(importlib.resources.files("edgetalk.models") / "assets" / "speech.wav"))


class StreamResampler:
    """[n] or [n, channels] at `rate` -> float32 mono 16 kHz, continuous across pieces.

    Unlike resampling every piece on its own (to_mono_16k), the filter state carries over, so
    piece boundaries leave no clicks. `flush()` returns the filter's tail at the end of a stream.
    """

    def __init__(self, rate: int):
        check_rate(rate)
        self.rate = int(rate)
        self._rs = None
        if self.rate != SAMPLE_RATE:
            import soxr

            self._rs = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32")

    def __call__(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        check_channels(x)
        if x.ndim == 2:
            x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
        if x.ndim != 1:
            raise InputError(f"audio must be [samples] or [samples, channels], got {x.shape}")
        if self._rs is not None:
            x = self._rs.resample_chunk(np.ascontiguousarray(x), last=last)
        x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
        return np.ascontiguousarray(np.clip(x, -1.0, 1.0), dtype=np.float32)

    def flush(self) -> np.ndarray:
        if self._rs is None:
            return np.zeros(0, np.float32)
        out = self(np.zeros(0, np.float32), last=True)
        self._rs = type(self._rs)(self.rate, SAMPLE_RATE, 1, dtype="float32")
        return out


def s16le_to_float(data: bytes, channels: int = 1) -> np.ndarray:
    pcm = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return pcm.reshape(-1, channels) if channels > 1 else pcm
