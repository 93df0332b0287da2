"""Face detection for avatar photos: BlazeFace, with OpenCV's Haar cascade as a fallback.

BlazeFace is MediaPipe's short-range face detector (`face_detection_short_range.tflite`, from the
mediapipe 0.10.21 wheel, Apache-2.0, unmodified, committed in models/assets/). It finds faces that
are tilted or look down, which the Haar cascade refuses. OpenCV's own TFLite reader runs it, so
`pip install 'edgetalk[face]'` (OpenCV only) is all a user needs: mediapipe itself is not a
dependency (it pins numpy<2 and pulls jax). The short-range model is made for faces that fill a
good part of the picture, as portraits do; for a small face in a big photo the Haar cascade
(frontal faces only) is tried next.

Both return boxes in the Haar cascade's convention (brows to just below the mouth), which the crop
rule in avatar.py and the training crops were built on.
"""

from __future__ import annotations

import importlib.resources
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import InputError
from .avatar import FaceBox

BLAZEFACE_MODEL = "face_detection_short_range.tflite"
INPUT = 128  # the model's square input
MIN_SCORE = 0.5  # MediaPipe's default detection threshold
NMS_IOU = 0.3  # MediaPipe's suppression threshold (weighted NMS)
OUTPUTS = ("classificators", "regressors")  # the model's score and box heads
# BlazeFace boxes -> Haar's convention: side and centre shift in units of the BlazeFace box side,
# fitted on the real photos and clip first frames where both detectors find the face
# (medians over 59 images; Haar's centre sits 0.14 of a side higher, its box is 1.12x larger)
TO_HAAR_SIDE = 1.12
TO_HAAR_SHIFT_Y = -0.14
_NET_LOCK = threading.Lock()  # one shared network; setInput + forward must not interleave


@dataclass(frozen=True)
class Detection:
    box: FaceBox  # in the Haar convention, image pixels
    score: float
    keypoints: np.ndarray  # [6, 2] pixels: right eye, left eye, nose, mouth, right ear, left ear


def _cv2():
    try:
        import cv2
    except ImportError:
        raise InputError(
            "face detection needs OpenCV: pip install 'edgetalk[face]' "
            "(or pass --no-face-check to use a centre crop)"
        ) from None
    return cv2


@lru_cache(maxsize=1)
def _anchors() -> np.ndarray:
    """[896, 2] anchor centres (x, y) in [0, 1]: MediaPipe's SSD anchors for this model (strides
    8, 16, 16, 16, two anchors per layer and cell, fixed size, offset 0.5)."""
    out = []
    for stride, per_cell in ((8, 2), (16, 6)):
        n = INPUT // stride
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        centres = np.stack([(xs + 0.5) / n, (ys + 0.5) / n], -1).reshape(-1, 1, 2)
        out.append(np.repeat(centres, per_cell, axis=1).reshape(-1, 2))
    return np.concatenate(out).astype(np.float32)


@lru_cache(maxsize=1)
def _blazeface():
    cv2 = _cv2()
    ref = importlib.resources.files("edgetalk.models") / "assets" / BLAZEFACE_MODEL
    with importlib.resources.as_file(ref) as p:
        if not Path(p).is_file():
            raise InputError(f"the face detector model is missing ({p}); reinstall edgetalk")
        net = cv2.dnn.readNetFromTFLite(str(p))
    return net


def blazeface(rgb: np.ndarray, min_score: float = MIN_SCORE) -> list[Detection]:
    """Every face BlazeFace finds, best first (boxes in the Haar convention)."""
    cv2 = _cv2()
    h, w = rgb.shape[:2]
    # Letterbox to 128 x 128 (keep the aspect ratio, pad evenly), as MediaPipe does.
    scale = INPUT / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(rgb, (nw, nh), interpolation=interp)
    px, py = (INPUT - nw) // 2, (INPUT - nh) // 2
    canvas = np.zeros((INPUT, INPUT, 3), np.uint8)
    canvas[py : py + nh, px : px + nw] = small
    blob = (canvas.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]
    with _NET_LOCK:
        scores_raw, reg = forward_outputs(_blazeface(), np.ascontiguousarray(blob), OUTPUTS)
    scores = 1.0 / (1.0 + np.exp(-np.clip(scores_raw.reshape(-1).astype(np.float64), -80, 80)))
    keep = np.flatnonzero(scores >= min_score)
    if keep.size == 0:
        return []
    reg, anchors = reg.reshape(-1, 16)[keep] / INPUT, _anchors()[keep]
    centre = reg[:, 0:2] + anchors
    size = reg[:, 2:4]
    kps = reg[:, 4:16].reshape(-1, 6, 2) + anchors[:, None]
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)  # x0 y0 x1 y1, letterbox
    out = []
    for members, weight in _weighted_nms(boxes, scores[keep]):
        box = (boxes[members] * weight[:, None]).sum(0)
        kp = (kps[members] * weight[:, None, None]).sum(0)
        # letterbox [0, 1] -> image pixels
        box = (box * INPUT - [px, py, px, py]) / scale
        kp = (kp * INPUT - [px, py]) / scale
        out.append(Detection(_to_haar(box), float(scores[keep][members].max()), kp))
    return out


def forward_outputs(net, blob: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
    """The outputs `names` of an OpenCV DNN net for one input (the caller holds the net's lock).
    OpenCV 5.0's new DNN engine refuses several output names in one forward ("outnames.size() ==
    noutputs"; 4.8-4.14 and 5.1 take them), but answers each name on its own: then the net runs
    once per output."""
    cv2 = _cv2()
    net.setInput(blob)
    try:
        return list(net.forward(list(names)))
    except cv2.error:
        outs = []
        for name in names:
            net.setInput(blob)
            outs.append(net.forward(name))
        return outs


def _weighted_nms(boxes: np.ndarray, scores: np.ndarray):
    """MediaPipe's weighted NMS: each cluster (IoU > NMS_IOU with its best box) is averaged,
    weighted by score. Yields (member indices, normalized weights), best cluster first."""
    order = np.argsort(-scores)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        best = boxes[order[0]]
        x0 = np.maximum(best[0], boxes[order, 0])
        y0 = np.maximum(best[1], boxes[order, 1])
        x1 = np.minimum(best[2], boxes[order, 2])
        y1 = np.minimum(best[3], boxes[order, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        iou = inter / (area[order[0]] + area[order] - inter + 1e-12)
        members, order = order[iou > NMS_IOU], order[iou <= NMS_IOU]
        yield members, scores[members] / scores[members].sum()


def _to_haar(box: np.ndarray) -> FaceBox:
    x0, y0, x1, y1 = (float(v) for v in box)
    side = TO_HAAR_SIDE * max(x1 - x0, y1 - y0)
    cx = (x0 + x1) / 2
    cy = (y0 + y1) / 2 + TO_HAAR_SHIFT_Y * max(x1 - x0, y1 - y0)
    return FaceBox(cx - side / 2, cy - side / 2, side, side)


def haar(rgb: np.ndarray) -> FaceBox | None:
    """Largest frontal face from OpenCV's Haar cascade, or None."""
    cv2 = _cv2()
    if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 moved it out of the main module
        return None
    cascade_path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
    cascade = cv2.CascadeClassifier(str(cascade_path))
    if cascade.empty():
        raise InputError(f"OpenCV's face cascade is missing ({cascade_path}); install opencv<5")
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    # Detect on a bounded size: big photos gain nothing and cost seconds.
    scale = min(1.0, 640.0 / max(grey.shape))
    small = (
        cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        if scale < 1
        else grey
    )
    small = cv2.equalizeHist(small)
    min_side = max(24, int(0.08 * min(small.shape)))
    faces = cascade.detectMultiScale(
        small, scaleFactor=1.1, minNeighbors=6, minSize=(min_side, min_side)
    )
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return FaceBox(x / scale, y / scale, w / scale, h / scale)


def detect_face(rgb: np.ndarray) -> FaceBox | None:
    """The photo's main face (Haar-convention box), or None: BlazeFace's largest confident face,
    else the Haar cascade's largest frontal face."""
    found = blazeface(rgb)
    if found:
        return max(found, key=lambda d: d.box.w).box
    return haar(rgb)
