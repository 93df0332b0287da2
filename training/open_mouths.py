"""Training photos with open, toothy mouths, made from the shipped photos.

A held-out laughing photo (lips 8% of the face height apart, both rows of teeth showing) never
closed its lips on a bilabial: the training photos hold three toothy smiles, none that wide, and
the decoder learns "close these lips" from what it has seen. Two ways to show it more, both with
real teeth (an earlier round trained on the renderer's painted teeth, flat grey, and did not
help):

- widen: a toothy smile opened wider by the mesh warp alone, so its own teeth stretch;
- transplant: any face's mouth opened by the warp and filled with another photo's real teeth,
  fitted to its inner-lip contour and tinted by its light, channel by channel (tilted, closed-mouth faces become
  tilted laughs).

The results are references like a photo: prepared with the landmarks the warp moved, so the
renderer's targets (lip_press closes the lips over the teeth) are exact for them.
"""

from __future__ import annotations

import numpy as np

from ..models.motion import INDEX, MOTION_DIM
from . import render as renderer

OPEN_PHOTO = 0.02  # photos whose lips part by more than this (of face height) show teeth
WIDEN = [  # (jaw_open, teeth_show, smile) of the widened toothy photos
    (j, t, s) for j in (0.1, 0.25, 0.4, 0.55) for t in (0.3, 0.7) for s in (0.2, 0.6)
]
OPEN_FOR_TEETH = [  # (jaw_open, teeth_show, smile) before a transplant
    (j, t, s) for j in (0.25, 0.4, 0.55) for t, s in ((0.7, 0.4), (0.9, 0.8))
]
# Teeth donors: toothy photos whose open mouth is as bright as their face (white teeth, not a
# cavity, not lips that mediapipe's inner contour took in): the astronaut 1.10; t1_2 0.74 and
# t1_4 0.59 gave brown smears.
BRIGHT_TEETH = 0.9

# The inner-lip contour as one polygon: the upper edge left to right, the lower edge back.
INNER = renderer.UI + renderer.LI[-2:0:-1]


def open_warp(ref: renderer.RefFace, jaw: float, teeth: float, smile: float):
    """(rgb, landmarks [478, 3]): ref's mouth opened by the mesh warp alone, nothing painted."""
    import cv2

    m = np.zeros(MOTION_DIM, np.float32)
    m[[INDEX["jaw_open"], INDEX["teeth_show"], INDEX["smile"]]] = (jaw, teeth, smile)
    mesh, landmarks = renderer.deform(ref, m)
    map_x, map_y = renderer._backward_map(ref, mesh)
    rgb = cv2.remap(ref.rgb, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return rgb, landmarks


def widen_mouth(ref: renderer.RefFace, jaw: float, teeth: float, smile: float):
    """A toothy smile opened wider, showing its own (stretched) teeth, as a new reference.
    Only meaningful for a photo whose mouth is open: a closed one would stretch its lips."""
    return renderer.prepare(*open_warp(ref, jaw, teeth, smile))


def _polygon_mask(shape, points: np.ndarray) -> np.ndarray:
    import cv2

    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(points[:, :2] * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
    return mask.astype(np.float32) / 255.0


def _mean_colour(rgb: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Mean RGB [3] inside the polygon."""
    mask = _polygon_mask(rgb.shape, points)[..., None]
    return (rgb.astype(np.float32) * mask).sum((0, 1)) / max(float(mask.sum()), 1.0)


def _mean_luminance(rgb: np.ndarray, points: np.ndarray) -> float:
    return float(_mean_colour(rgb, points).mean())


def is_teeth_donor(ref: renderer.RefFace) -> bool:
    lm = ref.landmarks
    return renderer.mouth_opening(lm) > OPEN_PHOTO and _mean_luminance(
        ref.rgb, lm[INNER]
    ) > BRIGHT_TEETH * _mean_luminance(ref.rgb, lm[renderer.FACE_OVAL])


def transplant_teeth(
    rgb: np.ndarray, lm: np.ndarray, donor: renderer.RefFace, two_rows: bool = False
) -> np.ndarray:
    """rgb with the inside of its inner-lip contour replaced by the donor's open mouth: an
    affine fit of the donor's inner-lip contour onto this one (least squares over its 20
    points), scaled by the ratio of the two faces' brightness, with a soft edge. two_rows
    mirrors the upper teeth below the midline, a little darker, for a laugh's lower row (the
    donors show one row; a held-out laugh shows both, with the bite line between)."""
    import cv2

    src = donor.landmarks[INNER, :2].astype(np.float64)
    dst = np.asarray(lm, np.float64)[INNER, :2]
    a = np.linalg.lstsq(np.c_[src, np.ones(len(src))], dst, rcond=None)[0].T  # 2x3
    size = (rgb.shape[1], rgb.shape[0])
    teeth = cv2.warpAffine(
        donor.rgb.astype(np.float32),
        a,
        size,
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    oval = renderer.FACE_OVAL
    # Per channel: teeth in a warm photo are warm (a grey scale left them blue-white there).
    tint = np.clip(
        (_mean_colour(rgb, lm[oval]) + 1.0)
        / (_mean_colour(donor.rgb, donor.landmarks[oval]) + 1.0),
        0.6,
        1.4,
    )
    if two_rows:
        mid = float(dst[:, 1].mean())
        ys, xs = np.mgrid[: rgb.shape[0], : rgb.shape[1]].astype(np.float32)
        below = ys > mid
        mirrored = cv2.remap(teeth, xs, np.where(below, 2 * mid - ys, ys), cv2.INTER_LINEAR)
        teeth = np.where(below[..., None], 0.85 * mirrored, teeth)
    mask = cv2.GaussianBlur(_polygon_mask(rgb.shape, dst), (0, 0), 0.7)[..., None]
    out = rgb.astype(np.float32) * (1.0 - mask) + np.clip(teeth * tint, 0, 255) * mask
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def is_toothy(ref: renderer.RefFace) -> bool:
    return renderer.mouth_opening(ref.landmarks) > OPEN_PHOTO


def open_mouth_refs(refs: list[renderer.RefFace], transplant: bool = True) -> list:
    """Laughing references from the training photos: every toothy one widened (WIDEN), and, with
    transplant, every photo opened (OPEN_FOR_TEETH) and given the teeth of each donor photo
    (is_teeth_donor) but its own, in one row and in two. Deterministic."""
    out = [widen_mouth(r, *w) for r in refs if is_toothy(r) for w in WIDEN]
    donors = [r for r in refs if is_teeth_donor(r)]
    if transplant:
        for ref in refs:
            for w in OPEN_FOR_TEETH:
                rgb, lm = open_warp(ref, *w)
                for donor in donors:
                    if donor is not ref:
                        for rows in (False, True):
                            laugh = transplant_teeth(rgb, lm, donor, two_rows=rows)
                            out.append(renderer.prepare(laugh, lm))
    return out
