"""The photo's mouth as found: a photo taken mid-word closes its lips at rest.

Motion is relative to the photo (models/motion.py), and the generator learned it relative to a
closed mouth: real clips are labelled against their most closed frame, synthetic faces rest with
closed lips. A photo whose mouth is open therefore kept it open all stream long, in every pause.
`MouthRest` measures the photo's opening once (runtime/face_mesh.py) and, when it is open, closes
the lips while the generator's jaw is low:

- lip_press rises to 1 - jaw / JAW_APART (full closure at jaw 0, none from JAW_APART up); the
  decoder closes the photo's gap about linearly in lip_press (on 4 held-out open-mouthed first
  frames, 0.5 left 5-54% of it and 1.0 under 5%);
- the jaw itself is left as the generator asks, so speech opens the mouth as far as before;
- a p/b/m closure the generator asks for is kept (the larger lip_press wins).

Subtracting the photo's opening from the jaw as well was tried and dropped: a smile that shows
teeth (the embedded avatar) measures as open as a mid-word photo, and its speech then stayed
closed-lipped (frames looked at); a photo the plain mesh over-reads (KristiNoem's parted lips)
lost its motion (eval range ratio 0.99 -> 0.06). Closing wherever the voice gate is low was
dropped too: some people rest with parted lips (May, 0.069 over her quietest frames).

It fades in between GAP_CLOSED and GAP_CLOSED + GAP_RAMP, so parted lips, or a measurement that is
slightly off, move little, and out between GAP_WIDE and GAP_WIDE + 2 GAP_RAMP: the decoder cannot
close a shout or an "O" (photos at 0.20-0.25 face heights stayed open under lip_press 1, or tore
the lips; the embedded avatar drawn with jaw 0.7, 0.16, pulled its mouth into the nose), so such a
photo keeps its mouth and the note says so. Only the shown motion is moved: the generator's
context (previous motion, KV cache) never sees it. One instance per avatar, owned by the
scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..models.motion import INDEX

JAW, PRESS = INDEX["jaw_open"], INDEX["lip_press"]
# The jaw from which the photo's lips stay apart as in the photo. The shipped generator's shown jaw
# in speech: median 0.26-0.31, 10th percentile 0.14-0.17 (the example sentence and two held-out
# real clips), so the lips close in pauses and partly on the lowest syllables.
JAW_APART = 0.25
GAP_CLOSED = 0.02  # at or below: the photo's mouth counts as closed (the measurement's noise)
GAP_RAMP = 0.02  # the correction fades in over this much more opening
GAP_WIDE = 0.12  # above: too wide for the decoder to close cleanly; gone at GAP_WIDE + 2 GAP_RAMP
POLICIES = ("close", "keep")


@dataclass(frozen=True)
class MouthRest:
    gap: float | None  # the photo's mouth opening (face heights), None when not measured
    note: str  # what was found, for logs and stats

    @property
    def strength(self) -> float:
        if self.gap is None:
            return 0.0
        fade_in = (self.gap - GAP_CLOSED) / GAP_RAMP
        fade_out = (GAP_WIDE + 2 * GAP_RAMP - self.gap) / (2 * GAP_RAMP)
        return float(np.clip(min(fade_in, fade_out), 0.0, 1.0))

    def apply(self, motion: np.ndarray) -> np.ndarray:
        """[..., P] motion as the generator means it -> the motion to show on this photo."""
        s = self.strength
        if s == 0.0:
            return motion
        out = np.array(motion, dtype=np.float32, copy=True)
        press = motion[..., PRESS]
        closure = np.clip(1.0 - motion[..., JAW] / JAW_APART, 0.0, 1.0)
        out[..., PRESS] = press + s * np.maximum(closure - press, 0.0)
        return out


KEEP = MouthRest(None, "kept as in the photo")


def check_policy(policy: str) -> None:
    """Refuse an unknown open_mouth policy (callers check before the model loads)."""
    if policy not in POLICIES:
        raise InputError(f"open_mouth must be one of {', '.join(POLICIES)}, not {policy!r}")


def measure(avatar: np.ndarray, policy: str = "close") -> MouthRest:
    """The rest for this prepared avatar crop: policy 'close' measures the photo's mouth (needs
    OpenCV, `edgetalk[face]`), 'keep' leaves the photo's mouth as the rest."""
    check_policy(policy)
    if policy == "keep":
        return KEEP
    try:
        from .face_mesh import mouth_gap

        gap = mouth_gap(avatar)
    except InputError as e:  # no OpenCV: the photo's mouth stays the rest, and the log says why
        return MouthRest(None, f"not measured ({e})")
    if gap is None:
        return MouthRest(None, "not measured (no face mesh found)")
    rest = MouthRest(gap, "")
    if gap <= GAP_CLOSED:
        state = "closed"
    elif rest.strength == 0.0:
        state = "too wide open to close; it stays the rest (--open-mouth keep is the same)"
    else:
        state = "open: it closes at rest"
    return MouthRest(gap, f"{state} (lip gap {gap:.3f} of the face height)")


def add_open_mouth_option(parser) -> None:
    """`--open-mouth close|keep` for the commands that stream a photo."""
    parser.add_argument(
        "--open-mouth",
        choices=POLICIES,
        default="close",
        help="a photo taken mid-word: close its lips at rest and open them with the speech "
        "(default), or keep the photo's mouth as the rest",
    )
