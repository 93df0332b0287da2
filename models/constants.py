"""Fixed numbers the torch modules and their MLX port (runtime/mlx/) share.

Torch-free on purpose: the MLX backend imports these without importing torch.
"""

from __future__ import annotations

from .motion import INDEX

# The four streaming modules, in the order the scheduler runs them.
MODULES = ("appearance", "audio", "generator", "decoder")

# Audio encoder, mel normalization (models/audio_encoder.py: voice_gate, normalize_mels): a
# frame's total mel energy (logsumexp of its log-mels) against a fixed level. On this front end
# white noise at L dBFS has energy 10.26 + 0.2303 L (measured; 20 dB = ln 100), so the centre -1.7
# is about -52 dBFS and the width 0.7 about 3 dB: room tone (-60 dBFS and below) and the idle
# stream's digital silence are shut out, speech at -45 dBFS passes at 0.9.
GATE_CENTER = -1.7
GATE_WIDTH = 0.7
GATE_FLOOR = 0.02  # a shut frame still moves the mean, 50x slower (a long silence forgets)

# Generator: the additive attention-mask value; finite so fp16 exports stay NaN-free.
NEG = -1e4

# Decoder, lip-closing field (models/decoder.py: Decoder.closing).
LIP_PRESS = INDEX["lip_press"]
# Pressed lips roll in: each lip is pulled this far (normalized rows: 1.8 px at 256) past the
# midline. On photos the head has not seen it places each edge to ~1.4 px (leave-one-face-out
# over the training faces), and an edge found inside the teeth leaves a white line that reads
# as an open mouth; the roll hides it. It fades out for gaps smaller than itself, so photos
# with closed lips are left as they are.
LIP_ROLL = 0.014
# A mouth is one interval of columns. On a held-out laugh the head's presence dipped to 0.3 in
# the middle (bright front teeth) and the lips stayed apart there; its dips are filled over this
# many columns each way (1/4 resolution: 2 is ~3% of the picture), its corners are kept.
PRESENCE_FILL = 2
# The closing field flips sign over this fraction of an output row: an output pixel that looks
# this close to the midline shows a mix of the teeth, so the narrower the better.
SHARP_ROWS = 0.05

# The mouth readout (models/mouth_readout.py): video frames of context around frame t (the
# lookahead covers READOUT_AHEAD whole frames), and the time constant of its running log-mel mean.
READOUT_PAST = 3
READOUT_AHEAD = 1
READOUT_NORM_S = 2.0
