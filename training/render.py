"""Render a frame from a reference face crop and a motion vector by warping the photo.

The reference's mediapipe landmarks are moved by explicit, smooth displacement fields (one per
motion parameter, in the face's own frame so tilted faces open their mouths along their own
axis), then the head pose is applied as a 3-D rotation of the landmarks. The photo is warped by
a piecewise-affine backward map over a triangulation fixed on the reference (so the topology
never changes), and a mouth interior is painted where the lips part. The result is a frame plus
its exact landmarks, the ground truth for mouth-opening metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..models.motion import INDEX, MOTION_DIM

# mediapipe face-mesh indices. Lip columns run corner to corner, left to right in the image,
# and line up: column i of the upper and lower contours face each other.
UO = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291]  # upper lip, outer edge
LO = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291]
UI = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]  # upper lip, inner edge
LI = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
# Eyes: "R" is the subject's right eye (image left). Lid margin (0) and the skin rings above.
EYE = {
    "R": dict(
        up0=[246, 161, 160, 159, 158, 157, 173],
        lo0=[33, 7, 163, 144, 145, 153, 154, 155, 133],
        up1=[247, 30, 29, 27, 28, 56, 190],
        up2=[113, 225, 224, 223, 222, 221, 189],
        brow=[156, 70, 63, 105, 66, 107, 55, 193, 35, 124, 46, 53, 52, 65],
    ),
    "L": dict(
        up0=[466, 388, 387, 386, 385, 384, 398],
        lo0=[263, 249, 390, 373, 374, 380, 381, 382, 362],
        up1=[467, 260, 259, 257, 258, 286, 414],
        up2=[342, 445, 444, 443, 442, 441, 413],
        brow=[383, 300, 293, 334, 296, 336, 285, 417, 265, 353, 276, 283, 282, 295],
    ),
}
# fmt: off
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400,
             377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67,
             109]
# fmt: on
N_MESH = 468  # the iris points (468..477) are moved but kept out of the warp mesh

JAW_DROP = 0.11  # lower-lip travel at jaw_open=1, in face heights (10 -> 152)


@dataclass
class RefFace:
    """A reference crop prepared once: landmarks, face frame, triangulation, mouth colours."""

    rgb: np.ndarray  # S x S x 3 uint8
    landmarks: np.ndarray  # [478, 3] float32 pixels (z scaled like x)
    points: np.ndarray  # [P, 3] warp-mesh points: 468 landmarks, two rings, fixed border
    ring_weight: np.ndarray  # [P] how much of the head motion each mesh point follows
    ring_mix: np.ndarray  # [R, 468] how ring points inherit the landmarks' expression motion
    tris: np.ndarray  # [K, 3] int32 triangles over points
    tri_sign: np.ndarray  # [K] orientation of each triangle on the reference
    height: float  # face height in pixels
    origin: np.ndarray  # mouth centre (2,)
    right: np.ndarray  # face x axis (2,), unit
    down: np.ndarray  # face y axis (2,), unit
    centre3: np.ndarray  # rotation centre (3,)
    mouth_colours: dict


def prepare(rgb: np.ndarray, landmarks: np.ndarray, size: int | None = None) -> RefFace:
    """Prepare a reference once per identity and size; landmarks are on rgb (any size)."""
    import cv2
    from scipy.spatial import Delaunay

    lm = np.asarray(landmarks, np.float32).copy()
    if size is not None and size != rgb.shape[0]:
        lm *= size / rgb.shape[0]
        interp = cv2.INTER_AREA if size < rgb.shape[0] else cv2.INTER_CUBIC
        rgb = cv2.resize(rgb, (size, size), interpolation=interp)
    s = rgb.shape[0]
    top, chin = lm[10, :2], lm[152, :2]
    height = float(np.linalg.norm(chin - top))
    down = (chin - top) / height
    right = np.array([down[1], -down[0]], np.float32)
    origin = (lm[13, :2] + lm[14, :2]) / 2
    oval = lm[FACE_OVAL]
    c2 = oval[:, :2].mean(0)
    # Rotation centre: behind the face surface (a head is about as deep as half its height).
    centre3 = np.array([c2[0], c2[1], lm[:N_MESH, 2].mean() + 0.45 * height], np.float32)

    # Rings around the face let hair and neck follow the head partly; points that would leave
    # the frame are dropped so the fixed border stays the outer hull.
    rings, weights = [], []
    for scale, w in ((1.25, 0.8), (1.6, 0.4)):
        r = oval.copy()
        r[:, :2] = c2 + scale * (oval[:, :2] - c2)
        keep = np.all((r[:, :2] > 0.03 * s) & (r[:, :2] < 0.97 * s), axis=1)
        rings.append(r[keep])
        weights.append(np.full(int(keep.sum()), w, np.float32))

    n = 8
    e = np.linspace(-1.0, s, n + 1)
    border = np.concatenate(
        [
            np.stack([e, np.full_like(e, -1.0)], 1),
            np.stack([e, np.full_like(e, s)], 1),
            np.stack([np.full_like(e[1:-1], -1.0), e[1:-1]], 1),
            np.stack([np.full_like(e[1:-1], s), e[1:-1]], 1),
        ]
    )
    border = np.concatenate([border, np.full((len(border), 1), centre3[2])], 1).astype(np.float32)
    points = np.concatenate([lm[:N_MESH], *rings, border]).astype(np.float32)
    ring_weight = np.concatenate(
        [np.ones(N_MESH, np.float32), *weights, np.zeros(len(border), np.float32)]
    )
    tris = Delaunay(points[:, :2]).simplices.astype(np.int32)
    t = points[tris, :2].astype(np.float64)
    tri_sign = np.sign(np.linalg.det(np.concatenate([t, np.ones((len(t), 3, 1))], axis=2)))
    return RefFace(
        rgb=np.ascontiguousarray(rgb),
        landmarks=lm,
        points=points,
        ring_weight=ring_weight,
        ring_mix=_ring_mix(np.concatenate(rings), lm, height),
        tris=tris,
        tri_sign=tri_sign,
        height=height,
        origin=origin,
        right=right,
        down=down,
        centre3=centre3,
        mouth_colours=_mouth_colours(rgb, lm),
    )


def _ring_mix(rings: np.ndarray, lm: np.ndarray, height: float) -> np.ndarray:
    """Gaussian weights from ring points to landmarks, plus a static 'background' weight of 1:
    a ring point hugging the lips (3/4 views) moves almost with them, a far one barely."""
    d2 = ((rings[:, None, :2] - lm[None, :N_MESH, :2]) ** 2).sum(-1) / (0.06 * height) ** 2
    w = np.exp(-d2)
    return (w / (w.sum(1, keepdims=True) + 1.0)).astype(np.float32)


def _mouth_colours(rgb: np.ndarray, lm: np.ndarray) -> dict:
    """Interior colours matched to the photo: teeth and cavity follow its brightness, and a grey
    photo gets grey teeth."""
    import cv2

    mask = np.zeros(rgb.shape[:2], np.uint8)
    # Lower face (cheek to cheek under the nose): mostly skin, little hair or background.
    cheeks = [*FACE_OVAL[FACE_OVAL.index(454) : FACE_OVAL.index(234) + 1], 1]
    cv2.fillPoly(mask, [np.round(lm[cheeks, :2]).astype(np.int32)], 1)
    skin = rgb[mask > 0].astype(np.float32).reshape(-1, 3)
    mean = skin.mean(0) if len(skin) else np.full(3, 150.0, np.float32)
    light = float(np.clip(mean.mean() / 150.0, 0.5, 1.3))
    sat = float(np.clip((mean.max() - mean.min()) / max(mean.max(), 1.0) / 0.35, 0.0, 1.0))

    def tone(c):
        c = np.asarray(c, np.float32)
        return np.clip((c.mean() + (c - c.mean()) * sat) * light, 0, 255)

    return {
        "cavity": tone((60, 22, 25)),
        "throat": tone((25, 8, 10)),
        "teeth": tone((212, 204, 188)),
        "teeth_low": tone((185, 176, 162)),
        "tongue": tone((130, 55, 60)),
    }


# ---------------------------------------------------------------- landmark motion


def _face_coords(ref: RefFace, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = xy - ref.origin
    return d @ ref.right / ref.height, d @ ref.down / ref.height


def deform(ref: RefFace, motion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Motion vector -> (moved mesh points [P, 3], moved landmarks [478, 3]), in pixels."""
    m = np.asarray(motion, np.float32).reshape(MOTION_DIM)
    pts = ref.landmarks
    A, B = _face_coords(ref, pts[:, :2])
    dA, dB = np.zeros_like(A), np.zeros_like(B)

    # Mouth frame: half-width to the outer corners, and the line between the lips.
    Ac = 0.5 * (abs(A[61]) + abs(A[291]))
    colA = (A[UI] + A[LI]) / 2
    order = np.argsort(colA)
    line_at = np.interp(A, colA[order], ((B[UI] + B[LI]) / 2)[order])
    rel = B - line_at
    lower = rel > 0
    lower[UO + UI] = False
    lower[LO + LI] = True
    upper = ~lower
    shape = np.clip(1 - (A / Ac) ** 2, 0, 1)
    rho = np.sqrt((A / (1.05 * Ac)) ** 2 + (rel / (0.45 * Ac)) ** 2)
    g_mouth = np.exp(-(np.maximum(rho - 1, 0) ** 2) / 0.25)
    g_wide = np.exp(-(np.maximum(rho - 1, 0) ** 2) / 0.64)
    side = np.clip(A / Ac, -1.3, 1.3)

    jaw, spread, rnd = m[INDEX["jaw_open"]], m[INDEX["lip_spread"]], m[INDEX["lip_round"]]
    press, teeth, smile = m[INDEX["lip_press"]], m[INDEX["teeth_show"]], m[INDEX["smile"]]

    # jaw_open: everything below the lips drops; the lower lip as an arc (corners move least),
    # the jaw line less toward the ears; the upper lip lifts a little.
    # Beyond the corners there is no slit: fade in from the line to stay continuous there.
    lip_part = np.where(
        np.abs(A) <= Ac,
        0.25 + 0.75 * shape,
        0.25 * np.exp(-(((np.abs(A) - Ac) / (0.3 * Ac)) ** 2)) * np.clip(rel / 0.03, 0, 1),
    )
    ramp = np.clip(rel / 0.08, 0, 1)
    skin_part = ramp * ramp * (3 - 2 * ramp) * np.clip(1 - (A / 0.45) ** 2, 0.1, 1)
    w_jaw = np.maximum(lip_part, skin_part)
    w_jaw[[61, 291, 78, 308]] = 0.25
    dB += np.where(
        lower, jaw * JAW_DROP * w_jaw, -jaw * 0.012 * shape * np.exp(-((rel / 0.07) ** 2))
    )
    dA -= jaw * 0.03 * side * g_mouth

    # lip_spread: corners out, lips thinner. lip_round: corners in, lips thicker and a small
    # opening. teeth_show: the upper lip rises. smile: corners up and out, cheeks lift.
    dA += spread * 0.045 * side * g_mouth
    dB -= spread * 0.2 * rel * g_mouth
    dA -= rnd * 0.06 * side * g_mouth
    dB += rnd * (0.15 * rel + np.where(lower, 0.015, -0.012) * shape) * g_mouth
    dB -= teeth * 0.028 * np.sqrt(shape) * np.exp(-((rel / 0.08) ** 2)) * upper
    dA += smile * 0.035 * side * g_wide
    dB -= smile * (
        0.03 * np.minimum((A / Ac) ** 2, 1.5) * g_wide
        + 0.012 * np.exp(-(((np.abs(A) - 0.22) / 0.1) ** 2) - ((B + 0.12) / 0.1) ** 2)
    )

    # lip_press: close whatever gap the other parameters (or the photo) left, and roll the lips
    # in. It acts on the lips only, so a bilabial closure wins over a half-open jaw.
    if press > 0:
        gap = (B[LI] + dB[LI]) - (B[UI] + dB[UI])
        close = press * np.maximum(gap, 0) / 2
        c_at = (
            np.interp(A, colA[order], close[order])
            * np.exp(-((rel / 0.1) ** 2))
            * (np.abs(A) < 1.2 * Ac)
        )
        dB += np.where(lower, -c_at, c_at)
        dB -= press * 0.2 * rel * g_mouth * shape

    # Blinks: the upper lid margin slides down onto the lower lid, the skin above follows.
    for eye, key in (("L", "blink_left"), ("R", "blink_right")):
        b = m[INDEX[key]]
        if b <= 0:
            continue
        ix = EYE[eye]
        lo = np.array(ix["lo0"])
        o = np.argsort(A[lo])
        target = np.interp(A[ix["up0"]], A[lo][o], B[lo][o])
        move = b * 0.95 * (target - B[ix["up0"]])
        dB[ix["up0"]] += move
        dB[ix["up1"]] += 0.45 * move
        dB[ix["up2"]] += 0.12 * move
        dB[lo] -= b * 0.05 * np.abs(move).mean()

    # Brows: raise lifts brows and (less) the forehead and upper lids; frown pulls the inner
    # ends together and down.
    raise_, frown = m[INDEX["brow_raise"]], m[INDEX["brow_frown"]]
    if raise_ != 0 or frown != 0:
        w_brow = np.zeros_like(A)
        for eye in ("L", "R"):
            bi = EYE[eye]["brow"]
            a0, b0 = A[bi].mean(), B[bi].mean()
            w_brow = np.maximum(w_brow, np.exp(-(((A - a0) / 0.13) ** 2) - ((B - b0) / 0.06) ** 2))
            w_brow[bi] = 1.0
        dB -= raise_ * 0.035 * w_brow
        inner = np.clip(1 - (np.abs(A) - 0.05) / 0.25, 0.2, 1)
        dA -= frown * 0.02 * np.sign(A) * w_brow * inner
        dB += frown * 0.015 * w_brow

    # Landmarks (iris included) move by the fields; rings around the face (hair, neck) inherit
    # the motion of the landmarks near them (see _ring_mix).
    disp = np.zeros_like(pts)
    disp[:, :2] = (dA * ref.height)[:, None] * ref.right + (dB * ref.height)[:, None] * ref.down
    disp[:, 2] = -rnd * 0.04 * ref.height * g_mouth  # rounded lips protrude; yaw shows it
    n_ring = len(ref.ring_mix)
    mesh = ref.points.copy()
    mesh[:N_MESH] += disp[:N_MESH]
    mesh[N_MESH : N_MESH + n_ring] += ref.ring_mix @ disp[:N_MESH]
    mesh = _head_pose(ref, mesh, m, ref.ring_weight)
    landmarks = _head_pose(ref, pts + disp, m, np.ones(len(pts), np.float32))
    return mesh, landmarks


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = (
        np.cos(yaw),
        np.sin(yaw),
        np.cos(pitch),
        np.sin(pitch),
        np.cos(roll),
        np.sin(roll),
    )
    # Image axes: x right, y down, z away from the camera. Positive yaw brings the nose to the
    # image right (the subject's left), positive pitch brings it down, positive roll is clockwise.
    ry = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return (rz @ ry @ rx).astype(np.float32)


def _head_pose(ref: RefFace, pts: np.ndarray, m: np.ndarray, weight: np.ndarray) -> np.ndarray:
    yaw, pitch, roll = m[INDEX["head_yaw"]], m[INDEX["head_pitch"]], m[INDEX["head_roll"]]
    scale = np.exp(m[INDEX["head_scale"]])
    s = ref.rgb.shape[0]
    shift = np.array([m[INDEX["head_tx"]] * s, m[INDEX["head_ty"]] * s, 0.0], np.float32)
    if not (yaw or pitch or roll or scale != 1 or shift.any()):
        return pts
    moved = (pts - ref.centre3) @ _rotation(yaw, pitch, roll).T * scale + ref.centre3 + shift
    return pts + weight[:, None] * (moved - pts)


# ---------------------------------------------------------------- warping


def _backward_map(ref: RefFace, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense (map_x, map_y) taking each output pixel to its source pixel, piecewise affine over
    the reference triangulation. Triangles are painted far to near so folds show the near side."""
    import cv2

    s = ref.rgb.shape[0]
    tri_d = dst[ref.tris, :2].astype(np.float64)  # [K, 3, 2]
    tri_s = ref.points[ref.tris, :2].astype(np.float64)
    mats = np.concatenate([tri_d, np.ones((len(tri_d), 3, 1))], axis=2)  # rows [x y 1]
    det = np.linalg.det(mats)
    ok = np.abs(det) > 0.05  # twice the area in px^2; slivers would map pixels far away
    aff = np.zeros((len(tri_d), 3, 2))
    aff[ok] = np.linalg.solve(mats[ok], tri_s[ok])  # [x y 1] @ aff = source xy
    moved = np.abs(tri_d - tri_s).max(axis=(1, 2)) > 1e-3
    ids = np.full((s, s), -1, np.int32)
    # Folded (back-facing) triangles first, then far to near: where the mesh folds (the far
    # cheek on a turned head, a squeezed lip corner) the near, front-facing surface wins, and
    # the folded ones still fill any pixel nothing else covers.
    back = np.sign(det) != np.sign(ref.tri_sign)
    order = np.lexsort((-dst[ref.tris, 2].mean(1), ~back))
    # Pixels left unpainted keep the identity map: triangles that did not move need no work.
    for k in order:
        if ok[k] and moved[k]:
            cv2.fillConvexPoly(ids, np.round(tri_d[k] * 16).astype(np.int32), int(k), cv2.LINE_8, 4)
    ys, xs = np.nonzero(ids >= 0)
    map_x, map_y = np.meshgrid(np.arange(s, dtype=np.float32), np.arange(s, dtype=np.float32))
    k = ids[ys, xs]
    a = aff[k]
    # Clamp to the source triangle's box: pixels that a rasterized edge puts just outside a
    # thin triangle must not extrapolate its affine map.
    lo, hi = tri_s.min(1)[k] - 0.5, tri_s.max(1)[k] + 0.5
    map_x[ys, xs] = np.clip(xs * a[:, 0, 0] + ys * a[:, 1, 0] + a[:, 2, 0], lo[:, 0], hi[:, 0])
    map_y[ys, xs] = np.clip(xs * a[:, 0, 1] + ys * a[:, 1, 1] + a[:, 2, 1], lo[:, 1], hi[:, 1])
    return map_x, map_y


def render(ref: RefFace, motion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frame S x S x 3 uint8, landmarks [478, 2] float32) for one motion vector."""
    frame, landmarks, _, _ = render_with_maps(ref, motion)
    return frame, landmarks


def render_with_maps(ref: RefFace, motion: np.ndarray):
    """render() plus what produced the frame, for supervising a decoder: the backward map
    (map_x, map_y: source pixel of every output pixel) and the mask of painted mouth pixels."""
    import cv2

    mesh, landmarks = deform(ref, motion)
    map_x, map_y = _backward_map(ref, mesh)
    warped = cv2.remap(ref.rgb, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    frame = warped.copy()
    _paint_mouth(ref, frame, landmarks, np.asarray(motion, np.float32).reshape(MOTION_DIM))
    painted = np.any(frame != warped, axis=2)
    return frame, landmarks[:, :2].astype(np.float32), (map_x, map_y), painted


def mouth_opening(landmarks: np.ndarray) -> float:
    """Inner-lip gap (13 -> 14) over face height (10 -> 152): scale-free mouth opening."""
    lm = np.asarray(landmarks)
    return float(np.linalg.norm(lm[14, :2] - lm[13, :2]) / np.linalg.norm(lm[152, :2] - lm[10, :2]))


# ---------------------------------------------------------------- mouth interior


def _paint_mouth(ref: RefFace, frame: np.ndarray, lm: np.ndarray, motion: np.ndarray) -> None:
    """Dark cavity inside the inner-lip contour, upper teeth under the upper lip, lower teeth
    and tongue when wide open. Only the opening beyond the photo's own is painted, so zero
    motion leaves the photo untouched."""
    import cv2

    ref_lm = ref.landmarks
    up, lo = lm[UI, :2], lm[LI, :2]
    # Face axes in the output frame (they turn with the head).
    top, chin = lm[10, :2], lm[152, :2]
    h = float(np.linalg.norm(chin - top))
    down = (chin - top) / max(h, 1e-6)
    gap = (lo - up) @ down
    gap_ref = (ref_lm[LI, :2] - ref_lm[UI, :2]) @ ref.down
    extra = float(np.max(gap - gap_ref * h / ref.height))
    if extra < 0.4:
        return
    s = frame.shape[0]
    poly = np.concatenate([up, lo[::-1]])
    x0, y0 = np.floor(poly.min(0) - 2).astype(int).clip(0, s)
    x1, y1 = np.ceil(poly.max(0) + 2).astype(int).clip(0, s)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    off = np.array([x0, y0], np.float32)
    ss = 4  # supersample the masks for clean edges
    shp = ((y1 - y0) * ss, (x1 - x0) * ss)

    def mask(points):
        mk = np.zeros(shp, np.uint8)
        cv2.fillPoly(mk, [np.round((points - off) * ss * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
        return (
            cv2.resize(mk, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32)
            / 255
        )

    cav = mask(poly)
    col = ref.mouth_colours
    roi = frame[y0:y1, x0:x1].astype(np.float32)
    # Cavity: darker toward the throat (centre of the opening).
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    centre = poly.mean(0)
    r = np.sqrt(
        ((xx - centre[0]) / max(np.ptp(poly[:, 0]) / 2, 1)) ** 2
        + ((yy - centre[1]) / max(np.ptp(poly[:, 1]) / 2, 1)) ** 2
    )
    depth = np.clip(1 - r, 0, 1)[..., None]
    inside = col["cavity"] * (1 - depth) + col["throat"] * depth
    # Tongue: a low, flat hump resting behind the lower lip once the mouth is well open.
    open_frac = np.clip((float(np.max(gap)) / h - 0.03) / 0.05, 0, 1)
    if open_frac > 0.2:
        g5 = max(float(gap[5]), 1.0)
        tongue_c = lo[5] - down * 0.15 * g5
        width = float(np.linalg.norm(lo[-1] - lo[0]))
        ax = (max(0.28 * width, 1.0), max(0.3 * g5 * (open_frac - 0.2) / 0.8, 0.5))
        tg = np.zeros(shp, np.uint8)
        ang = float(np.degrees(np.arctan2(-down[0], down[1])))
        cv2.ellipse(
            tg,
            tuple(int(v) for v in np.round((tongue_c - off) * ss * 16)),
            (int(ax[0] * ss * 16), int(ax[1] * ss * 16)),
            ang,
            0,
            360,
            255,
            -1,
            cv2.LINE_AA,
            4,
        )
        tg = (
            cv2.resize(tg, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32)
            / 255
        )
        inside = inside * (1 - 0.7 * tg[..., None]) + col["tongue"] * 0.7 * tg[..., None]
    # Upper teeth: a band hanging from the upper inner lip, shorter toward the corners, shaded
    # toward the sides and just under the lip, with faint gaps between the teeth.
    right = np.array([down[1], -down[0]], np.float32)
    half = max(float(np.ptp(up @ right)) / 2, 1.0)
    u = ((xx - centre[0]) * right[0] + (yy - centre[1]) * right[1]) / half  # -1..1 corner to corner
    cols = np.linspace(-1, 1, len(UI))[1:-1, None]
    # The upper lip hides most of the teeth in speech; raising it (teeth_show) bares them.
    show = 0.012 + 0.022 * motion[INDEX["teeth_show"]] + 0.008 * motion[INDEX["jaw_open"]]
    length = show * h * (0.5 + 0.5 * (1 - cols**2))
    band = np.concatenate([up[1:-1], (up[1:-1] + down * length)[::-1]])
    teeth = mask(band)
    under = np.interp(u, np.linspace(-1, 1, len(UI)), up @ down)  # lip line at each pixel
    below = ((xx * down[0] + yy * down[1]) - under) / (show * h)
    shade = (0.7 + 0.3 * np.clip(1 - u**2, 0, 1)) * (0.82 + 0.18 * np.clip(below / 0.4, 0, 1))
    tooth = 0.24  # incisor width as a fraction of the half mouth width
    gaps = np.abs(((u / tooth + 0.5) % 1.0) - 0.5) < 0.06
    shade = (shade * np.where(gaps, 0.9, 1.0) * (0.75 + 0.25 * open_frac))[..., None]  # shadowed
    inside = inside * (1 - teeth[..., None]) + (col["teeth"] * shade) * teeth[..., None]
    # Lower incisors peek over the lower lip on wide openings.
    if open_frac > 0.6:
        mid = slice(3, 8)
        band = np.concatenate([lo[mid] - down * 0.012 * h, lo[mid][::-1]])
        lt = mask(band) * 0.6 * (open_frac - 0.6) / 0.4
        inside = inside * (1 - lt[..., None]) + (col["teeth_low"] * shade) * lt[..., None]
    # Fade the whole interior in over the first pixel or two of opening (no popping).
    a = cav[..., None] * float(np.clip(extra / 2.0, 0, 1))
    # Soften the painted detail to the photo's sharpness (crops are upscaled, hence blurry).
    inside = cv2.GaussianBlur(inside.astype(np.float32), (0, 0), 0.6 * s / 256)
    frame[y0:y1, x0:x1] = np.clip(roi * (1 - a) + inside * a + 0.5, 0, 255).astype(np.uint8)
