"""A parametric face-motion model: phonemes with timings -> per-frame motion vectors.

Mouth shapes come from per-phoneme viseme targets blended by dominance functions
(Cohen-Massaro co-articulation): each phoneme pulls each parameter toward its target with a
strength that decays away from its span, so weakly specified consonants (t, k) borrow the lips of
their vowels while bilabials and labiodentals always reach their shape. The mouth leads the sound
by a frame or two, as in real speech. Blinks, brows, head motion and listening behaviour are
random but smooth, and the mouth is exactly closed whenever the subject is silent.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np

from ..models.motion import INDEX, MOTION_DIM

FPS = 25
_HZ = 200  # internal time grid for blending, finer than frames so short phonemes count

# Mouth parameters, in this order, for viseme targets.
_MOUTH = ("jaw_open", "lip_spread", "lip_round", "lip_press", "teeth_show")
_M = [INDEX[k] for k in _MOUTH]

# vowel -> (jaw_open, lip_spread, lip_round)
_VOWELS = {
    "a": (0.85, 0.15, 0.0),
    "ɑ": (0.9, 0.0, 0.05),
    "æ": (0.8, 0.35, 0.0),
    "ɐ": (0.65, 0.05, 0.0),
    "ɒ": (0.75, 0.0, 0.4),
    "ɔ": (0.65, 0.0, 0.55),
    "o": (0.45, 0.0, 0.75),
    "ʊ": (0.3, 0.0, 0.7),
    "u": (0.25, 0.0, 0.95),
    "ə": (0.4, 0.05, 0.0),
    "ɚ": (0.35, 0.0, 0.3),
    "ɜ": (0.45, 0.1, 0.0),
    "ʌ": (0.6, 0.05, 0.0),
    "ɘ": (0.4, 0.1, 0.0),
    "ɵ": (0.4, 0.0, 0.35),
    "e": (0.45, 0.55, 0.0),
    "ɛ": (0.6, 0.45, 0.0),
    "i": (0.22, 0.85, 0.0),
    "ɪ": (0.3, 0.6, 0.0),
    "ɨ": (0.3, 0.3, 0.0),
    "y": (0.22, 0.0, 0.85),
    "ʏ": (0.3, 0.0, 0.7),
    "ø": (0.4, 0.0, 0.7),
    "œ": (0.55, 0.0, 0.55),
    "ɯ": (0.25, 0.5, 0.0),
    "ɤ": (0.4, 0.2, 0.0),
    "ɶ": (0.75, 0.0, 0.4),
}
# consonant class -> (targets for _MOUTH, dominance for _MOUTH)
_CONS = {
    "bilabial": ((0.0, 0.0, 0.0, 1.0, 0.0), (4.0, 1.0, 1.0, 6.0, 1.0)),
    "labiodental": ((0.1, 0.1, 0.0, 0.0, 0.85), (2.0, 0.5, 1.0, 1.0, 4.0)),
    "dental": ((0.2, 0.1, 0.0, 0.0, 0.25), (1.0, 0.3, 0.3, 1.0, 1.5)),
    "sibilant": ((0.12, 0.4, 0.0, 0.0, 0.35), (1.5, 0.8, 0.5, 1.0, 1.2)),
    "postalveolar": ((0.15, 0.0, 0.6, 0.0, 0.3), (1.5, 1.0, 2.0, 1.0, 1.2)),
    "rounded": ((0.1, 0.0, 1.0, 0.0, 0.0), (1.5, 2.0, 3.0, 1.0, 0.5)),
    "palatal": ((0.2, 0.5, 0.0, 0.0, 0.0), (0.8, 1.0, 0.5, 1.0, 0.5)),
    "rhotic": ((0.25, 0.0, 0.35, 0.0, 0.0), (0.6, 0.5, 1.0, 1.0, 0.5)),
    "coronal": ((0.25, 0.1, 0.0, 0.0, 0.1), (0.6, 0.2, 0.2, 1.0, 0.5)),
    "dorsal": ((0.3, 0.05, 0.0, 0.0, 0.0), (0.5, 0.2, 0.2, 1.0, 0.5)),
}
_CONS_OF = {}
for _cls, _chars in {
    "bilabial": "pbmɓɸβʙ",
    "labiodental": "fvɱʋ",
    "dental": "θð",
    "sibilant": "szɕʑ",
    "postalveolar": "ʃʒ",
    "rounded": "wʍɥ",
    "palatal": "jçʝɲʎ",
    "rhotic": "rɹɾʀɻɽ",
    "coronal": "tdnlɫɬɮʈɖɳɭ",
    "dorsal": "kgɡŋxɣqχʁħʕhɦʔc",
}.items():
    for _c in _chars:
        _CONS_OF[_c] = _cls
_VOWEL_DOM = (1.5, 1.0, 1.0, 0.6, 0.6)
_SILENCE = ((0.0, 0.0, 0.0, 0.15, 0.0), (1.5, 1.0, 1.0, 1.0, 1.0))


@dataclass
class MotionTrack:
    motion: np.ndarray  # [T, 16] float32
    bilabial: np.ndarray  # [T] bool: frames inside a p/b/m closure
    talk: np.ndarray  # [T] float32: 1 where the subject speaks
    listen: np.ndarray  # [T] float32: 1 where the partner speaks and the subject does not


@dataclass(frozen=True)
class Style:
    """Per-clip speaker habits."""

    gain: float = 1.0  # articulation strength
    lead_s: float = 0.04  # how far the mouth runs ahead of the sound
    idle_press: float = 0.12  # lip press at rest
    head: float = 1.0  # head-motion amplitude
    blink_gap: tuple[float, float] = (2.0, 6.0)  # seconds between blinks

    @staticmethod
    def sample(rng: np.random.Generator) -> Style:
        return Style(
            gain=float(rng.uniform(0.85, 1.3)),
            lead_s=float(rng.uniform(0.02, 0.07)),
            idle_press=float(rng.uniform(0.05, 0.2)),
            head=float(rng.uniform(0.5, 1.0)),
            blink_gap=(2.0, float(rng.uniform(4.5, 6.0))),
        )


# ---------------------------------------------------------------- phonemes -> visemes


def _base(ipa: str) -> str:
    """Drop stress, length and diacritics: 'ˈaːʲ' -> 'a'."""
    s = unicodedata.normalize("NFD", ipa)
    return "".join(
        c
        for c in s
        if c not in "ˈˌːˑ'-"
        and not unicodedata.combining(c)
        and unicodedata.category(c)[0] == "L"
        and c not in "ʲʷʰˠˤ"
    )


def viseme(ipa: str) -> list[tuple[float, np.ndarray, np.ndarray, str]]:
    """Phoneme -> [(fraction of its span, targets[5], dominance[5], class)]. Diphthongs give two
    halves; affricates (tʃ) take their second, lip-shaping part."""
    base = _base(ipa)
    vows = [c for c in base if c in _VOWELS]
    if vows:
        parts = vows[:2]
        out = []
        for v in parts:
            j, sp, ro = _VOWELS[v]
            out.append(
                (1.0 / len(parts), np.array([j, sp, ro, 0.0, 0.0]), np.array(_VOWEL_DOM), "vowel")
            )
        return out
    cls = next((_CONS_OF[c] for c in reversed(base) if c in _CONS_OF), "dorsal")
    if any(c in "pbm" for c in base):
        cls = "bilabial"
    t, d = _CONS[cls]
    return [(1.0, np.array(t, float), np.array(d, float), cls)]


def _segments(phonemes, gap_s: float = 0.12):
    """Expand phonemes into viseme segments, inserting rest segments in pauses."""
    segs = []  # (start, end, targets, dominance, class)
    prev_end = None
    for ipa, s, e in phonemes:
        if prev_end is not None and s - prev_end > gap_s:
            segs.append((prev_end, s, np.array(_SILENCE[0]), np.array(_SILENCE[1]), "rest"))
        t = s
        for frac, tgt, dom, cls in viseme(ipa):
            t1 = t + frac * (e - s)
            segs.append((t, t1, tgt, dom, cls))
            t = t1
        prev_end = e
    return segs


def speaking_mask(phonemes, n_frames: int, bridge_s: float = 0.3) -> np.ndarray:
    """[T] float32: 1 on frames between a phrase's first and last phoneme; pauses shorter than
    bridge_s (between words, at commas) count as speaking."""
    mask = np.zeros(n_frames, np.float32)
    if not phonemes:
        return mask
    spans = []
    for _, s, e in sorted(phonemes, key=lambda p: p[1]):
        if spans and s - spans[-1][1] <= bridge_s:
            spans[-1][1] = max(spans[-1][1], e)
        else:
            spans.append([s, e])
    t = (np.arange(n_frames) + 0.5) / FPS
    for s, e in spans:
        mask[(t >= s) & (t < e)] = 1.0
    return mask


def mouth_track(phonemes, n_frames: int, style: Style = Style()) -> tuple[np.ndarray, np.ndarray]:
    """([T, 5] mouth parameters in _MOUTH order, [T] bilabial closure mask)."""
    out = np.zeros((n_frames, len(_MOUTH)), np.float32)
    out[:, 3] = style.idle_press
    bil = np.zeros(n_frames, bool)
    segs = _segments(phonemes)
    if not segs:
        return out, bil
    # Blend on a fine grid, then average each frame's window. Anticipation: the frame at time t
    # shows the articulation of t + lead.
    sub = _HZ // FPS
    t = (np.arange(n_frames * sub) + 0.5) / _HZ + style.lead_s
    starts = np.array([s[0] for s in segs])[:, None]
    ends = np.array([s[1] for s in segs])[:, None]
    dist = np.maximum(0.0, np.maximum(starts - t, t - ends))  # [S, N] seconds outside the span
    tgt = np.stack([s[2] for s in segs])  # [S, 5]
    dom = np.stack([s[3] for s in segs])
    tgt[:, [0, 1, 2, 4]] *= style.gain
    # Dominance decays over ~50 ms (tighter for the lips' hard closures).
    decay = np.array([0.045, 0.07, 0.08, 0.035, 0.05])
    w = dom[:, None, :] * np.exp(-dist[:, :, None] / decay)  # [S, N, 5]
    val = (w * tgt[:, None, :]).sum(0) / (w.sum(0) + 1e-3)
    out[:] = val.reshape(n_frames, sub, -1).mean(1)
    # Bilabial closures are complete: the lips meet and the jaw is up for at least one frame.
    ft = (np.arange(n_frames) + 0.5) / FPS + style.lead_s
    for s, e, _, _, cls in segs:
        if cls != "bilabial":
            continue
        hit = (ft >= s) & (ft < e)
        if not hit.any():
            k = int(
                np.clip(np.round((s + e) / 2 * FPS - 0.5 - style.lead_s * FPS), 0, n_frames - 1)
            )
            if abs((k + 0.5) / FPS + style.lead_s - (s + e) / 2) > 0.04:
                continue  # the closure lies outside the clip
            hit[k] = True
        bil |= hit
    out[bil, 0] = 0.0
    out[bil, 3] = 1.0
    out[bil, 4] = 0.0
    return np.clip(out, 0, 1), bil


def _gate(talk: np.ndarray) -> np.ndarray:
    """1 while speaking, easing to 0 within two frames after: silence has an exactly shut jaw."""
    g = talk.copy()
    for k in (1, 2):
        g[:-k] = np.maximum(g[:-k], talk[k:] * (1 - 0.4 * k))  # mouth starts just before sound
        g[k:] = np.maximum(g[k:], talk[:-k] * (1 - 0.4 * k))
    return g


# ---------------------------------------------------------------- blinks, brows, head


def blinks(n_frames: int, rng: np.random.Generator, gap=(2.0, 6.0), listen=None) -> np.ndarray:
    """[T, 2] eyelid closure (left, right): 150-250 ms blinks at 2-6 s intervals (a little more
    often while listening), fast to close and slower to open."""
    out = np.zeros((n_frames, 2), np.float32)
    sub = 8
    tt = (np.arange(n_frames * sub) + 0.5) / (FPS * sub)
    dur_clip = n_frames / FPS
    t = float(rng.uniform(0.2, gap[1]))
    while t < dur_clip:
        d = float(rng.uniform(0.15, 0.25))
        amp = float(rng.uniform(0.85, 1.0))
        x = (tt - t) / d
        close = np.clip(x / 0.4, 0, 1)
        opening = np.clip((1 - x) / 0.6, 0, 1)
        prof = np.where(x < 0.4, close**2 * (3 - 2 * close), opening**2 * (3 - 2 * opening))
        prof = np.where((x >= 0) & (x <= 1), prof * amp, 0.0).reshape(n_frames, sub).mean(1)
        asym = float(rng.uniform(-0.05, 0.05))
        out[:, 0] = np.maximum(out[:, 0], prof * (1 + asym))
        out[:, 1] = np.maximum(out[:, 1], prof * (1 - asym))
        k = min(int(t * FPS), n_frames - 1)
        lo, hi = gap
        if listen is not None and listen[k] > 0:
            lo, hi = 0.75 * lo, 0.75 * hi
        t += d + (0.3 if rng.random() < 0.08 else float(rng.uniform(lo, hi)))  # some doubles
    return np.clip(out, 0, 1)


def _bump(n_frames: int, centre_s: float, width_s: float) -> np.ndarray:
    t = (np.arange(n_frames) + 0.5) / FPS
    x = (t - centre_s) / width_s
    return np.where(np.abs(x) < 1, 0.5 * (1 + np.cos(np.pi * x)), 0.0).astype(np.float32)


def brows(n_frames: int, rng: np.random.Generator, phonemes) -> np.ndarray:
    """[T, 2] (raise, frown): raises on some stressed syllables (espeak gives no stress marks
    here; long vowels stand in), rare short frowns."""
    out = np.zeros((n_frames, 2), np.float32)
    vowels = [(s, e) for ipa, s, e in phonemes if viseme(ipa)[0][3] == "vowel"]
    if vowels:
        durs = np.array([e - s for s, e in vowels])
        long_ = durs >= np.quantile(durs, 0.75)
        for (s, e), is_long in zip(vowels, long_, strict=True):
            if is_long and rng.random() < 0.3:
                out[:, 0] = np.maximum(
                    out[:, 0],
                    float(rng.uniform(0.2, 0.6))
                    * _bump(n_frames, (s + e) / 2, float(rng.uniform(0.25, 0.45))),
                )
    if rng.random() < 0.15:
        c = float(rng.uniform(0, n_frames / FPS))
        out[:, 1] = float(rng.uniform(0.15, 0.4)) * _bump(n_frames, c, float(rng.uniform(0.5, 1.2)))
    return out


_HEAD = ("head_yaw", "head_pitch", "head_roll", "head_scale", "head_tx", "head_ty")
_HEAD_LIMIT = np.array([0.12, 0.12, 0.12, 0.05, 0.03, 0.03], np.float32)


def head_walk(n_frames: int, rng: np.random.Generator, activity: np.ndarray) -> np.ndarray:
    """[T, 6] head pose: a smooth mean-reverting random walk (Ornstein-Uhlenbeck, then a
    Gaussian blur), larger while speaking, soft-clipped inside the limits."""
    dt, tau = 1.0 / FPS, 1.5
    x = np.zeros((n_frames, 6), np.float32)
    state = rng.normal(0, 0.5, 6)
    noise = rng.normal(0, 1, (n_frames, 6))
    for k in range(n_frames):
        state = state - state * dt / tau + np.sqrt(2 * dt / tau) * 0.5 * noise[k]
        x[k] = state
    ker = np.exp(-0.5 * (np.arange(-9, 10) / 3.0) ** 2)
    ker /= ker.sum()
    xs = np.stack([np.convolve(np.pad(x[:, i], 9, mode="edge"), ker, "valid") for i in range(6)], 1)
    amp = (0.6 + 0.4 * activity)[:, None]
    return (_HEAD_LIMIT * np.tanh(xs * amp)).astype(np.float32)


def listening(
    n_frames: int, rng: np.random.Generator, listen: np.ndarray
) -> tuple[np.ndarray, ...]:
    """(pitch offsets [T], smile [T], brow raise [T]) for attentive listening: nods every few
    seconds, occasional small smiles."""
    pitch = np.zeros(n_frames, np.float32)
    smile = np.zeros(n_frames, np.float32)
    brow = np.zeros(n_frames, np.float32)
    t_all = (np.arange(n_frames) + 0.5) / FPS
    k = 0
    while k < n_frames:
        if listen[k] <= 0:
            k += 1
            continue
        e = k
        while e < n_frames and listen[e] > 0:
            e += 1
        s_t, e_t = k / FPS, e / FPS
        t = s_t + float(rng.uniform(0.2, 1.5))
        while t < e_t - 0.3:  # nods: 1-2 down-up cycles
            f, cycles = float(rng.uniform(1.5, 2.5)), int(rng.integers(1, 3))
            amp = float(rng.uniform(0.03, 0.06))
            x = (t_all - t) * f
            on = (x >= 0) & (x < cycles)
            pitch += np.where(on, amp * 0.5 * (1 - np.cos(2 * np.pi * x)), 0.0).astype(np.float32)
            if rng.random() < 0.3:
                brow = np.maximum(brow, float(rng.uniform(0.15, 0.4)) * _bump(n_frames, t, 0.4))
            t += cycles / f + float(rng.uniform(1.2, 3.5))
        if rng.random() < 0.6:
            c = float(rng.uniform(s_t, e_t))
            smile = np.maximum(
                smile,
                float(rng.uniform(0.15, 0.5)) * _bump(n_frames, c, float(rng.uniform(0.6, 1.4))),
            )
        k = e
    return pitch * listen, smile * listen, brow * listen


# ---------------------------------------------------------------- everything together


def motion_track(
    n_frames: int,
    rng: np.random.Generator,
    phonemes,
    partner_phonemes=(),
    style: Style | None = None,
) -> MotionTrack:
    """The subject's motion for a clip: speaking from its own phonemes (absolute times, s),
    listening while only the partner speaks, idle otherwise. Deterministic for rng's state."""
    style = style or Style.sample(rng)
    talk = speaking_mask(phonemes, n_frames)
    listen = speaking_mask(list(partner_phonemes), n_frames) * (1 - talk)
    motion = np.zeros((n_frames, MOTION_DIM), np.float32)

    mouth, bil = mouth_track(phonemes, n_frames, style)
    gate = _gate(talk)
    # Silence: jaw shut, lips lightly pressed, nothing else moves at the mouth.
    mouth[:, [0, 1, 2, 4]] *= gate[:, None]
    mouth[:, 3] = gate * mouth[:, 3] + (1 - gate) * style.idle_press
    bil &= gate > 0
    mouth[bil, 0], mouth[bil, 3] = 0.0, 1.0  # a closure at a phrase edge stays complete
    motion[:, _M] = mouth

    motion[:, [INDEX["blink_left"], INDEX["blink_right"]]] = blinks(
        n_frames, rng, style.blink_gap, listen
    )
    motion[:, [INDEX["brow_raise"], INDEX["brow_frown"]]] = brows(n_frames, rng, phonemes)
    head = head_walk(n_frames, rng, talk) * style.head
    nod, smile, brow = listening(n_frames, rng, listen)
    head[:, 1] = np.clip(head[:, 1] + nod, -_HEAD_LIMIT[1], _HEAD_LIMIT[1])
    motion[:, [INDEX[k] for k in _HEAD]] = head
    motion[:, INDEX["smile"]] = smile
    motion[:, INDEX["brow_raise"]] = np.maximum(motion[:, INDEX["brow_raise"]], brow)
    return MotionTrack(motion=motion, bilabial=bil, talk=talk, listen=listen.astype(np.float32))
