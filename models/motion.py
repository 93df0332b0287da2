"""The motion latent: explicit, named face-motion parameters.

EdgeTalk's motion latent is not a learned code. Each frame's motion is a vector of the parameters
below, measured relative to the reference photo (the photo itself is all zeros). Explicit
parameters let the synthetic-data renderer, the decoder, the generator and `edgetalk eval`
share one vocabulary, and make listening/speaking behaviour inspectable.

Units: expression parameters are in [0, 1] (0 = as in the photo, 1 = the strongest the renderer
produces). Head yaw/pitch/roll are in radians, scale is a log-ratio, translation is a fraction of
the crop size.
"""

from __future__ import annotations

MOTION_PARAMS: tuple[str, ...] = (
    "jaw_open",  # 0: lower lip and chin drop; mouth cavity shows
    "lip_spread",  # 1: mouth corners pulled sideways (ee, i)
    "lip_round",  # 2: lips pushed forward and narrowed (oo, w)
    "lip_press",  # 3: full lip closure on bilabials (p, b, m); overrides jaw_open at the lips
    "teeth_show",  # 4: upper lip raised, upper teeth visible (f, v, s)
    "smile",  # 5: corners up (listening smiles)
    "blink_left",  # 6: eyelid closure, subject's left eye
    "blink_right",  # 7
    "brow_raise",  # 8: both brows up
    "brow_frown",  # 9: brows together and down
    "head_yaw",  # 10: radians, positive turns to the subject's left
    "head_pitch",  # 11: radians, positive looks down (nods)
    "head_roll",  # 12: radians, positive tilts clockwise in the image
    "head_scale",  # 13: log scale of the head relative to the photo
    "head_tx",  # 14: horizontal shift, fraction of crop width
    "head_ty",  # 15: vertical shift, fraction of crop height
)
MOTION_DIM = len(MOTION_PARAMS)
INDEX = {name: i for i, name in enumerate(MOTION_PARAMS)}

MOUTH = ("jaw_open", "lip_spread", "lip_round", "lip_press", "teeth_show")
HEAD = ("head_yaw", "head_pitch", "head_roll", "head_scale", "head_tx", "head_ty")
