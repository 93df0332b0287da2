"""A phone photo's EXIF orientation is applied: the avatar is upright, as every viewer shows it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from edgetalk.runtime.avatar import decode_image
from edgetalk.runtime.exif import orientation


def _picture() -> Image.Image:
    """Asymmetric in both axes, so that every turn and mirror differs (lossless formats only)."""
    a = np.zeros((40, 64, 3), np.uint8)
    a[:10, :20] = (255, 0, 0)
    a[30:, 50:] = (0, 0, 255)
    a[:, 30:32, 1] = 200
    a[5:8, :] += 30
    return Image.fromarray(a)


def _encode(img: Image.Image, fmt: str, value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    buf = io.BytesIO()
    opts = {"lossless": True} if fmt == "WEBP" else {}
    img.save(buf, format=fmt, exif=exif.tobytes(), **opts)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@pytest.mark.parametrize("value", range(1, 9))
def test_every_orientation_matches_what_viewers_show(fmt, value):
    data = _encode(_picture(), fmt, value)
    assert orientation(data, fmt.lower()) == value
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(decode_image(data), want)


def test_a_jpeg_from_a_phone_is_turned_upright():
    """Stored turned left with orientation 6, as phones write a portrait shot."""
    img = _picture().resize((128, 80))
    plain = io.BytesIO()
    img.save(plain, format="JPEG", quality=95)
    turned = _encode(img.transpose(Image.Transpose.ROTATE_90), "JPEG", 6)
    assert orientation(turned, "jpeg") == 6
    up, ref = decode_image(turned).astype(int), decode_image(plain.getvalue()).astype(int)
    assert up.shape == ref.shape == (80, 128, 3)
    assert np.abs(up - ref).mean() < 6  # the same picture, up to JPEG's loss


@pytest.mark.parametrize(
    "tail",
    [b"", b"II*\x00\xff\xff\x00\x00", b"MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12", b"XX" * 8],
)
def test_damaged_exif_means_no_turn(tail):
    """A cut or nonsensical EXIF block is ignored, never an error."""
    jpeg = b"\xff\xd8\xff\xe1" + (len(tail) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + tail
    assert orientation(jpeg + b"\xff\xda", "jpeg") == 1
    assert orientation(b"\xff\xd8\xff\xe1\x00", "jpeg") == 1  # cut inside the marker
