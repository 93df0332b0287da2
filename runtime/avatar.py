"""Avatar preparation: load a photo of any size, find the face, crop and align it to the model.

The same crop rule is used to build the training data, so a user's photo reaches the model framed
the way the training faces were.
"""

from __future__ import annotations

import importlib.resources
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

MAX_IMAGE_PIXELS = 50_000_000  # refuse decompression bombs before decoding whole frames
CROP_SCALE = 1.9  # crop side as a multiple of the detected face box side
CROP_SHIFT_DOWN = 0.06  # face boxes sit high; move the crop down to keep the chin


@dataclass(frozen=True)
class FaceBox:
    x: float
    y: float
    w: float
    h: float


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB (alpha dropped, grey and 16-bit converted)."""
    import av

    p = Path(path)
    if not p.exists():
        raise InputError(f"avatar image not found: {p}")
    if p.is_dir():
        raise InputError(f"avatar image is a directory, not a file: {p}")
    over = f"over the {MAX_IMAGE_PIXELS:,}-pixel limit; resize it first"
    w, h = _header_size(p)
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"image {p} is {w}x{h}, {over}")
    try:
        with av.open(str(p)) as container:
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is None:
                raise InputError(f"not an image file: {p}")
            w, h = stream.codec_context.width, stream.codec_context.height
            if w and h and w * h > MAX_IMAGE_PIXELS:
                raise InputError(f"image {p} is {w}x{h}, {over}")
            # FFmpeg's own cap: its decoder refuses to allocate a bigger frame, for the formats
            # whose size is only known once decoding starts.
            stream.codec_context.options = {"max_pixels": str(MAX_IMAGE_PIXELS)}
            for frame in container.decode(stream):
                if frame.width * frame.height > MAX_IMAGE_PIXELS:
                    raise InputError(f"image {p} is over the {MAX_IMAGE_PIXELS:,}-pixel limit")
                rgb = frame.to_ndarray(format="rgb24")
                break
            else:
                raise InputError(f"image file has no picture in it: {p}")
    except InputError:
        raise
    except Exception as e:  # PyAV raises many error types for undecodable input
        raise InputError(f"cannot read {p} as an image ({type(e).__name__}: {e})") from None
    if rgb.ndim != 3 or rgb.shape[0] < 16 or rgb.shape[1] < 16:
        raise InputError(
            f"image {p} is too small ({rgb.shape[1]}x{rgb.shape[0]}); need 16x16 or more"
        )
    return np.ascontiguousarray(rgb)


def _header_size(p: Path) -> tuple[int, int]:
    """(width, height) from the file header without decoding, (0, 0) when unknown."""
    try:
        from PIL import Image
    except ImportError:
        return 0, 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own bomb warning: our cap decides
            with Image.open(p) as im:
                return im.size
    except Image.DecompressionBombError:  # over Pillow's hard cap, far over ours
        return 1 << 20, 1 << 20
    except Exception:  # not an image Pillow reads: PyAV decides
        return 0, 0


def detect_face(rgb: np.ndarray) -> FaceBox | None:
    """Largest frontal face (OpenCV Haar cascade), or None. Raises if OpenCV is missing."""
    try:
        import cv2
    except ImportError:
        raise InputError(
            "face detection needs OpenCV: pip install 'edgetalk[face]' "
            "(or pass --no-face-check to use a centre crop)"
        ) from None
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


def crop_box(shape: tuple[int, ...], face: FaceBox | None) -> tuple[float, float, float]:
    """Square crop (cx, cy, side) around a face, or the centre square when face is None."""
    h, w = shape[:2]
    if face is None:
        side = float(min(h, w))
        return w / 2.0, h / 2.0, side
    side = CROP_SCALE * max(face.w, face.h)
    cx = face.x + face.w / 2.0
    cy = face.y + face.h / 2.0 + CROP_SHIFT_DOWN * side
    return cx, cy, side


def crop_resize(rgb: np.ndarray, box: tuple[float, float, float], size: int) -> np.ndarray:
    """Cut the square box (edge pixels repeat outside the photo) and resize it to size x size."""
    import torch
    import torch.nn.functional as F

    cx, cy, side = box
    h, w = rgb.shape[:2]
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = max(1, int(round(side)))
    ys = np.clip(np.arange(y0, y0 + s), 0, h - 1)
    xs = np.clip(np.arange(x0, x0 + s), 0, w - 1)
    patch = rgb[ys[:, None], xs[None, :]]
    t = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)[None].float()
    t = F.interpolate(
        t, size=(size, size), mode="bilinear", antialias=s > size, align_corners=False
    )
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def prepare_avatar(
    source: str | Path | np.ndarray | None, size: int, face_check: bool = True
) -> np.ndarray:
    """Photo (path, RGB array, or None for the embedded default) -> size x size x 3 uint8 crop."""
    if source is None:
        return crop_resize(default_avatar(), crop_box((512, 512), None), size)
    rgb = load_image(source) if not isinstance(source, np.ndarray) else source
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InputError("avatar array must be HxWx3 uint8 RGB")
    face = None
    if face_check:
        face = detect_face(rgb)
        if face is None:
            where = source if not isinstance(source, np.ndarray) else "the image"
            raise InputError(
                f"no face found in {where}; use a frontal photo with one clearly visible face, "
                "or pass --no-face-check to use a centre crop anyway"
            )
    return crop_resize(rgb, crop_box(rgb.shape, face), size)


def default_avatar() -> np.ndarray:
    """The embedded default avatar: a 512x512 aligned face crop shipped with the package."""
    ref = importlib.resources.files("edgetalk.models") / "assets" / "avatar.png"
    with importlib.resources.as_file(ref) as p:
        return load_image(p)
