"""How open the photo's mouth is: MediaPipe's face mesh run by OpenCV, no mediapipe needed.

`face_landmark.tflite` (MediaPipe's 468-point mesh without attention, from the mediapipe 0.10.21
wheel, Apache-2.0, unmodified, committed in models/assets/) reads a 192 x 192 face crop. The crop
is found as MediaPipe finds it: BlazeFace's box and eye keypoints (face_detect.py) give a first,
rotated region 1.5x the face; the landmarks of that pass give a second, tighter one (the box of
the landmarks, rotated by the eye corners), and the second pass is the answer.

The mouth opening is the inner-lip gap (landmarks 13/14) over the face height (10 -> 152), the
measure `edgetalk eval` and the training labels use, but those read mediapipe's attention model,
whose lips are sharper. This model sees a smaller gap; GAP_SCALE/GAP_OFFSET map it onto the
attention model's scale (fitted on frames of the training clips, see the constants).
"""

from __future__ import annotations

import importlib.resources
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import face_detect
from .face_detect import TO_HAAR_SHIFT_Y, TO_HAAR_SIDE, blazeface, forward_outputs

MESH_MODEL = "face_landmark.tflite"
INPUT = 192  # the model's square input
ROI_SCALE = 1.5  # MediaPipe's face region: 1.5x the face box, square
OUTPUTS = ("conv2d_21", "conv2d_31")  # the landmarks and the face-presence logit
MIN_PRESENCE = 0.0  # the model's face-presence logit; below it the crop holds no face
# gap_attention = (gap_this_model - GAP_OFFSET) / GAP_SCALE: least squares over 142 frames of the
# 30 training clips (every 20th frame of their first 4 s, the runtime's crop), against
# mediapipe's attention mesh on the same crops: r 0.82, mean error 0.017 face heights
# (held-out clips: r 0.88, 0.020).
GAP_SCALE = 0.622
GAP_OFFSET = 0.0050
_NET_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _mesh_net():
    cv2 = face_detect._cv2()  # one place says how to install OpenCV
    ref = importlib.resources.files("edgetalk.models") / "assets" / MESH_MODEL
    with importlib.resources.as_file(ref) as p:
        if not Path(p).is_file():
            raise InputError(f"the face mesh model is missing ({p}); reinstall edgetalk")
        return cv2.dnn.readNetFromTFLite(str(p))


def _run(rgb: np.ndarray, centre: np.ndarray, side: float, angle: float):
    """One pass on the square region (centre, side, rotated by angle radians) ->
    (landmarks [468, 2] in image pixels, presence logit)."""
    cv2 = face_detect._cv2()  # one place says how to install OpenCV
    c, s = np.cos(angle), np.sin(angle)
    m = np.array([[c, -s], [s, c]]) * side / INPUT  # crop pixels -> image pixels
    t = centre - m @ np.array([INPUT / 2, INPUT / 2])
    crop = cv2.warpAffine(
        rgb,
        np.hstack([m, t[:, None]]),
        (INPUT, INPUT),
        flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    blob = (crop.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
    with _NET_LOCK:
        lm, presence = forward_outputs(_mesh_net(), np.ascontiguousarray(blob), OUTPUTS)
    pts = lm.reshape(468, 3)[:, :2].astype(np.float64) @ m.T + t
    return pts, float(presence.reshape(-1)[0])


def landmarks(rgb: np.ndarray) -> np.ndarray | None:
    """[468, 2] face mesh landmarks in pixels of rgb (HxWx3 uint8), or None without a face."""
    found = blazeface(rgb)
    if not found:
        return None
    det = max(found, key=lambda d: d.box.w)
    # BlazeFace's own box from the Haar-convention one (face_detect._to_haar, inverted)
    side = det.box.w / TO_HAAR_SIDE
    centre = np.array(
        [det.box.x + det.box.w / 2, det.box.y + det.box.h / 2 - TO_HAAR_SHIFT_Y * side]
    )
    right_eye, left_eye = det.keypoints[0], det.keypoints[1]
    d = left_eye - right_eye
    pts, presence = _run(rgb, centre, side * ROI_SCALE, float(np.arctan2(d[1], d[0])))
    if presence < MIN_PRESENCE:
        return None
    # second pass: the region MediaPipe tracks with (eye corners 33 -> 263, landmarks' box)
    d = pts[263] - pts[33]
    angle = float(np.arctan2(d[1], d[0]))
    c, s = np.cos(angle), np.sin(angle)
    upright = np.array([[c, s], [-s, c]])  # image -> face-aligned axes
    q = (pts - pts.mean(0)) @ upright.T
    lo, hi = q.min(0), q.max(0)
    centre = pts.mean(0) + upright.T @ ((lo + hi) / 2)
    pts, presence = _run(rgb, centre, float((hi - lo).max()) * ROI_SCALE, angle)
    return pts if presence >= MIN_PRESENCE else None


def raw_gap(pts: np.ndarray) -> float:
    """Inner-lip gap over face height, on this model's landmarks."""
    return float(np.linalg.norm(pts[13] - pts[14]) / max(np.linalg.norm(pts[152] - pts[10]), 1e-6))


def mouth_gap(rgb: np.ndarray) -> float | None:
    """The mouth opening of the face in rgb on `edgetalk eval`'s scale (inner-lip gap over face
    height, as mediapipe's attention mesh measures it), or None when no face is found."""
    pts = landmarks(rgb)
    if pts is None:
        return None
    return max(0.0, (raw_gap(pts) - GAP_OFFSET) / GAP_SCALE)
