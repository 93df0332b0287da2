"""Audio augmentation for speech -> motion training: what a microphone, a room and a call do.

Level, background noise, reverb (a synthetic room response), band limits (telephone to wideband),
microphone colour (a random smooth EQ), codec round trips (Opus or AAC through PyAV) and speed
(with the motion stretched to match, see `stretch`). Each draw is from the caller's rng, so a
training run is reproducible.
"""

from __future__ import annotations

import numpy as np

SR = 16000


def reverb(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Convolve with exponentially decaying noise (RT60 0.15-0.8 s), mixed 20-70% wet."""
    from scipy.signal import fftconvolve

    rt60 = rng.uniform(0.15, 0.8)
    n = int(rt60 * SR)
    t = np.arange(n) / SR
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    ir[: int(0.002 * SR)] = 0.0  # the direct path comes first
    ir /= np.sqrt(np.sum(ir**2)) + 1e-9
    wet = fftconvolve(x, ir)[: len(x)]
    mix = rng.uniform(0.2, 0.7)
    return ((1 - mix) * x + mix * wet).astype(np.float32)


def band_pass(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """4th-order Butterworth band-pass, lo..hi Hz."""
    from scipy.signal import butter, sosfilt

    sos = butter(4, [lo, hi], btype="band", fs=SR, output="sos")
    return sosfilt(sos, x).astype(np.float32)


def band_limit(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """High-pass 50-300 Hz and low-pass 3.4-7.5 kHz (telephone to wideband)."""
    return band_pass(x, rng.uniform(50, 300), rng.uniform(3400, 7500))


def mic_colour(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random smooth EQ: +-8 dB at 6 log-spaced points, interpolated over frequency."""
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(len(x), 1 / SR)
    pts = np.geomspace(100, 8000, 6)
    gain_db = rng.uniform(-8, 8, len(pts))
    g = 10 ** (np.interp(np.log(np.maximum(f, 50)), np.log(pts), gain_db) / 20)
    return np.fft.irfft(spec * g, len(x)).astype(np.float32)


def codec(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round trip through Opus (12-32 kb/s) or AAC (24-64 kb/s) with PyAV; same length out."""
    import av

    name = "libopus" if rng.random() < 0.5 else "aac"
    rate = 48000 if name == "libopus" else 16000
    kbps = int(rng.uniform(12, 32) if name == "libopus" else rng.uniform(24, 64))
    try:
        enc = av.CodecContext.create(name, "w")
        enc.sample_rate, enc.layout, enc.format = rate, "mono", "flt" if name == "aac" else "s16"
        if name == "aac":
            enc.format = "fltp"
        enc.bit_rate = kbps * 1000
        enc.open()
        dec = av.CodecContext.create(name, "r")
        dec.sample_rate, dec.layout = rate, "mono"
        dec.open()
        src = x if rate == SR else _resample(x, SR, rate)
        frame_n = enc.frame_size or 1024
        out = []
        pad = np.concatenate([src, np.zeros(frame_n * 2, np.float32)])
        for i in range(0, len(pad) - frame_n + 1, frame_n):
            piece = pad[i : i + frame_n]
            if enc.format.name == "s16":
                arr = (np.clip(piece, -1, 1) * 32767).astype(np.int16)[None]
            else:
                arr = piece.astype(np.float32)[None]
            fr = av.AudioFrame.from_ndarray(arr, format=enc.format.name, layout="mono")
            fr.sample_rate = rate
            for pkt in enc.encode(fr):
                for d in dec.decode(pkt):
                    out.append(d.to_ndarray().reshape(-1))
        for pkt in enc.encode(None):
            for d in dec.decode(pkt):
                out.append(d.to_ndarray().reshape(-1))
    except Exception:  # a build of FFmpeg without the codec: leave the audio as it is
        return x
    y = np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
    if y.dtype.kind == "i" or np.abs(y).max(initial=0) > 2:
        y = y / 32768.0
    if rate != SR:
        y = _resample(y, rate, SR)
    # Encoders delay the signal (priming samples); re-align by cross-correlation.
    lag = _delay(x, y)
    y = y[lag : lag + len(x)]
    return np.pad(y, (0, len(x) - len(y))).astype(np.float32)


def _delay(x: np.ndarray, y: np.ndarray, max_lag: int = 4000) -> int:
    n = min(len(x), len(y) - max_lag, SR)
    if n <= 100:
        return 0
    c = np.correlate(y[: n + max_lag], x[:n], mode="valid")
    return int(np.argmax(c))


def _resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    import soxr

    return soxr.resample(x, src, dst).astype(np.float32)


def stretch(audio: np.ndarray, motion: np.ndarray, factor: float, frames: int):
    """Speed change by `factor` (> 1 faster; pitch moves with it, as a tape would): audio of
    round(frames * factor) frames becomes `frames` frames, the motion is resampled to match."""
    spf = SR // 25
    src_frames = motion.shape[0]
    y = _resample(audio, SR, int(round(SR / factor)))
    y = np.pad(y, (0, max(0, frames * spf - len(y))))[: frames * spf]
    t = np.linspace(0, src_frames - 1, frames)
    m = np.stack(
        [np.interp(t, np.arange(src_frames), motion[:, k]) for k in range(motion.shape[1])], 1
    )
    return y.astype(np.float32), m.astype(np.float32)


def degrade(x: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A random chain of the above; each step with probability ~0.25 * strength."""
    p = 0.25 * strength
    if rng.random() < p:
        x = mic_colour(x, rng)
    if rng.random() < p:
        x = reverb(x, rng)
    if rng.random() < p:
        x = band_limit(x, rng)
    if rng.random() < 0.6 * p:
        x = codec(x, rng)
    peak = float(np.abs(x).max()) or 1.0
    x = x / peak * rng.uniform(0.03, 0.95)  # level: quiet to near full scale
    noise_db = rng.uniform(-75, -25)  # background noise relative to full scale
    x = x + rng.standard_normal(len(x)).astype(np.float32) * 10 ** (noise_db / 20)
    return np.clip(x, -1, 1).astype(np.float32)
