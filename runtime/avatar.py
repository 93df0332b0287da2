"""Avatar preparation: load a photo of any size, find the face, crop and align it to the model.

The same crop rule is used to build the training data, so a user's photo reaches the model framed
the way the training faces were.
"""

from __future__ import annotations

import importlib.resources
import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .exif import orientation, upright

MAX_IMAGE_PIXELS = 50_000_000  # refuse decompression bombs before decoding whole frames
MAX_IMAGE_BYTES = 64 * 1024 * 1024  # a photo file; bigger is not a photo
FFMPEG_PAD = 128  # pixels FFmpeg's decoders may add to each side of a frame buffer (stride, blocks)
IMAGE_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP", "bmp": "BMP"}
# FFmpeg's single-image demuxer per format: no probing, no protocols, no references to other files
IMAGE_DEMUXERS = {"png": "png_pipe", "jpeg": "jpeg_pipe", "webp": "webp_pipe", "bmp": "bmp_pipe"}
CROP_SCALE = 1.9  # crop side as a multiple of the detected face box side
CROP_SHIFT_DOWN = 0.06  # face boxes sit high; move the crop down to keep the chin
PAD_FEATHER = 0.05  # outside the photo: mirrored for this share of the crop, then faded out
PAD_BLUR_CELLS = 3  # further out: the crop seen at 3 x 3, a soft gradient with no features


@dataclass(frozen=True)
class FaceBox:
    x: float
    y: float
    w: float
    h: float


def load_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB (alpha dropped, grey and 16-bit converted).

    Only PNG, JPEG, WebP and BMP, recognised by their first bytes (never by the file name)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"avatar image not found: {p}")
    if p.is_dir():
        raise InputError(f"avatar image is a directory, not a file: {p}")
    size = p.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise InputError(f"image {p} is {size:,} bytes, over the {MAX_IMAGE_BYTES:,}-byte limit")
    return decode_image(p.read_bytes(), str(p), max_pixels)


def sniff_image(data: bytes) -> str | None:
    """The image format from the file's magic bytes: "png", "jpeg", "webp", "bmp" or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM" and len(data) >= 26:
        return "bmp"
    return None


def decode_image(data: bytes, name: str = "the image", max_pixels: int | None = None) -> np.ndarray:
    """Image bytes -> HxWx3 uint8 RGB, upright (EXIF orientation applied). The format is taken from the magic bytes and decoded by
    FFmpeg's demuxer and decoder for exactly that format (never a probe): a playlist, a video or
    anything naming another file is refused before FFmpeg sees it. The pixel cap is checked from
    the header first; FFmpeg's `max_pixels` guards formats whose header we could not read."""
    import av

    cap = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    kind = sniff_image(data)
    if kind is None:
        raise InputError(f"cannot read {name} as an image: it is not a PNG, JPEG, WebP or BMP file")
    if kind == "webp" and data[12:16] == b"VP8X" and len(data) > 20 and data[20] & 0x02:
        # FFmpeg's WebP decoder reads still pictures only: say so, not "damaged"
        raise InputError(f"{name} is an animated WebP; use a still photo (PNG, JPEG, WebP or BMP)")
    over = f"over the {cap:,}-pixel limit; resize it first"
    w, h = _header_size(data)
    if w * h > cap:
        raise InputError(f"image {name} is {w}x{h}, {over}")
    damaged = f"cannot read {name}: the {IMAGE_NAMES[kind]} data is damaged or truncated"
    rgb = None
    try:
        with av.open(io.BytesIO(data), mode="r", format=IMAGE_DEMUXERS[kind]) as container:
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is None:
                raise InputError(damaged)
            w, h = stream.codec_context.width, stream.codec_context.height
            if w and h and w * h > cap:
                raise InputError(f"image {name} is {w}x{h}, {over}")
            stream.codec_context.options = {"max_pixels": str(ffmpeg_pixel_cap(w, h, cap))}
            for frame in container.decode(stream):
                if frame.width * frame.height > cap:
                    raise InputError(f"image {name} is over the {cap:,}-pixel limit")
                rgb = frame.to_ndarray(format="rgb24")
                break
    except InputError:
        raise
    except Exception:  # FFmpeg's own error text names its internals, not the user's problem
        raise InputError(damaged) from None
    if rgb is None:
        raise InputError(damaged)
    rgb = upright(rgb, orientation(data, kind))  # a phone photo's EXIF turn
    if rgb.ndim != 3 or rgb.shape[0] < 16 or rgb.shape[1] < 16:
        raise InputError(
            f"image {name} is too small ({rgb.shape[1]}x{rgb.shape[0]}); need 16x16 or more"
        )
    return np.ascontiguousarray(rgb)


def ffmpeg_pixel_cap(w: int, h: int, cap: int) -> int:
    """FFmpeg's `max_pixels` for an image announced as w x h (already checked against `cap`).
    FFmpeg checks the frame buffer it allocates, whose width is padded to its SIMD stride (64 on
    AVX-512) and whose height a JPEG pads to its block rows. A 50 MP phone photo (8160x6120,
    49.9 MP) under a 50 MP cap was refused as damaged. So the padded size of the announced
    image is allowed, and no more: a stream that decodes larger than it announced still fails."""
    if w <= 0 or h <= 0:
        return cap  # size unknown: the plain cap (and the per-frame check after decoding)
    return (w + FFMPEG_PAD) * (h + FFMPEG_PAD)


def _header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from an image header without decoding, (0, 0) when it cannot be read."""
    try:
        kind = sniff_image(data)
        if kind == "png" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if kind == "bmp":
            if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
                return struct.unpack("<HH", data[18:22])
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)  # a negative height is a top-down bitmap
        if kind == "webp":
            chunk = data[12:16]
            if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L" and data[20] == 0x2F:
                bits = struct.unpack("<I", data[21:25])[0]
                return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
            if chunk == b"VP8X":
                return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(
                    data[27:30], "little"
                )
        if kind == "jpeg":
            return _jpeg_size(data)
    except (struct.error, IndexError):
        pass
    return 0, 0


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """The size in the first SOF marker (every JPEG coding: baseline, progressive, lossless)."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return 0, 0
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        if marker == 0xDA:  # scan data begins: no SOF before it
            return 0, 0
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return 0, 0


def detect_face(rgb: np.ndarray) -> FaceBox | None:
    """The photo's main face, or None (face_detect.py: BlazeFace, then the Haar cascade). Finds
    faces that are tilted or look down; raises if OpenCV is missing."""
    from .face_detect import detect_face as find

    return find(rgb)


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
    """Cut the square box and resize it to size x size. Where the box leaves the photo (a tight or
    small photo), the photo is mirrored at its edge and, further out, blurred: repeating the edge
    pixels smeared streaks over up to a quarter of the frame, and a plain mirror showed a second,
    upside-down mouth or eye there."""
    cx, cy, side = box
    k = int(side // (2 * size))
    # A phone photo's face spans thousands of pixels: whole blocks are averaged first, down to
    # at least twice the output size (PIL's thumbnail does the same with its reducing_gap 2).
    if k >= 2:
        rgb, cx, cy, side = block_mean(rgb, k), cx / k, cy / k, side / k
    h, w = rgb.shape[:2]
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = max(1, int(round(side)))
    ys, xs = np.arange(y0, y0 + s), np.arange(x0, x0 + s)
    t = rgb[_reflect(ys, h)[:, None], _reflect(xs, w)[None, :]].astype(np.float32)
    # Distance outside the photo, per patch pixel: 0 inside, so the photo itself is untouched.
    out_y = np.maximum(0, np.maximum(-ys, ys - (h - 1)))
    out_x = np.maximum(0, np.maximum(-xs, xs - (w - 1)))
    outside = np.maximum(out_y[:, None], out_x[None, :]).astype(np.float32)
    if outside.any():
        feather = max(2.0, PAD_FEATHER * s)
        fade = np.clip(outside / feather, 0.0, 1.0)[..., None]
        coarse = _resample(t, _area_weights(s, PAD_BLUR_CELLS))
        blurred = _resample(coarse, _linear_weights(PAD_BLUR_CELLS, s))
        t = t * (1.0 - fade) + blurred * fade
    t = _resample(t, _linear_weights(s, size))
    return np.clip(np.round(t), 0, 255).astype(np.uint8)


def block_mean(rgb: np.ndarray, k: int) -> np.ndarray:
    """[H, W, C] -> [ceil(H/k), ceil(W/k), C] float32, each pixel the mean of a k x k block (the
    last row and column of blocks may be partial). Resizing works with dense weight matrices,
    whose cost grows with the square of the crop: a 12 MP phone photo took 6 s and 1 GB, a
    50 MP one 20 s and 3.7 GB. Done strip by strip, so no float copy of the whole photo is made."""
    h, w = rgb.shape[:2]
    cols = np.arange(0, w, k)
    counts_x = np.diff(np.append(cols, w)).astype(np.float32)
    out = np.empty((len(range(0, h, k)), len(cols), rgb.shape[2]), np.float32)
    for i, y in enumerate(range(0, h, k)):
        strip = rgb[y : y + k].sum(axis=0, dtype=np.float32)  # [W, C]
        out[i] = np.add.reduceat(strip, cols, axis=0) / (counts_x[:, None] * min(k, h - y))
    return out


# Resizing is two small matrix products (rows, then columns), so the run path needs no torch or
# OpenCV. The weights are torch's: `area` is adaptive average pooling, `bilinear` has
# align_corners=False and, when shrinking, the antialiasing triangle filter (PIL's) over the
# footprint of each output pixel.
def _resample(img: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[H, W, C] float32 -> [h, w, C] with the same [out, in] weights on both axes."""
    rows = np.tensordot(weights, img, axes=(1, 0))  # [h, W, C]
    return np.tensordot(weights, rows, axes=(1, 1)).transpose(1, 0, 2).astype(np.float32)


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    w = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        w[i, lo:hi] = 1.0 / (hi - lo)
    return w


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    scale = n_in / n_out
    support = max(scale, 1.0)  # shrinking widens the triangle to the output pixel's footprint
    centers = (np.arange(n_out) + 0.5) * scale
    taps = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(taps[None, :] - centers[:, None]) / support, 0.0, None)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices mirrored into 0..n-1 without repeating the edge (numpy's "reflect"), any distance
    out: ... 2 1 | 0 1 2 ... n-1 | n-2 n-3 ..."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    i = np.mod(idx, period)
    return np.where(i < n, i, period - i)


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
