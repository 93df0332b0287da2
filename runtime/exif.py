"""The EXIF orientation of a photo, and turning its pixels upright.

Phones store the sensor's pixels as they came and a tag saying how to turn them for display; a
decoder that ignores the tag hands the avatar over sideways (the face detector then crops a
sideways face, and the avatar talks lying down). Only the one tag is read, from the TIFF block
that JPEG (APP1 "Exif"), PNG (eXIf) and WebP (EXIF) carry, with every offset bounds-checked:
a damaged block means "no orientation", never an error.
"""

from __future__ import annotations

import struct

import numpy as np

ORIENTATION_TAG = 0x0112
_EXIF_HEADER = b"Exif\x00\x00"


def orientation(data: bytes, kind: str) -> int:
    """The EXIF orientation (1..8) of an image file's bytes; 1 (as stored) when there is none."""
    tiff = _tiff_block(data, kind)
    value = _read_orientation(tiff) if tiff else 1
    return value if 1 <= value <= 8 else 1


def upright(rgb: np.ndarray, value: int) -> np.ndarray:
    """The pixels as the photo is meant to be seen, for EXIF orientation `value`."""
    turn = {
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # upside down
        4: lambda a: a[::-1],  # mirrored top-bottom
        5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
        6: lambda a: np.rot90(a, -1),  # stored turned left: turn right
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the other diagonal
        8: lambda a: np.rot90(a, 1),  # stored turned right: turn left
    }.get(value)
    return rgb if turn is None else np.ascontiguousarray(turn(rgb))


def _tiff_block(data: bytes, kind: str) -> bytes | None:
    if kind == "jpeg":
        return _jpeg_exif(data)
    if kind == "png":
        return _png_chunk(data, b"eXIf")
    if kind == "webp":
        block = _riff_chunk(data, b"EXIF")
        if block is not None and block.startswith(_EXIF_HEADER):
            block = block[len(_EXIF_HEADER) :]
        return block
    return None


def _jpeg_exif(data: bytes) -> bytes | None:
    pos = 2  # after SOI
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no more metadata
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            return None
        body = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and body.startswith(_EXIF_HEADER):
            return body[len(_EXIF_HEADER) :]
        pos += 2 + length
    return None


def _png_chunk(data: bytes, name: bytes) -> bytes | None:
    pos = 8  # after the signature
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == name:
            return data[pos + 8 : pos + 8 + length]
        if kind in (b"IDAT", b"IEND"):  # eXIf comes before the image data
            return None
        pos += 12 + length
    return None


def _riff_chunk(data: bytes, name: bytes) -> bytes | None:
    pos = 12  # after RIFF, size, WEBP
    while pos + 8 <= len(data):
        kind, length = struct.unpack("<4sI", data[pos : pos + 8])
        if kind == name:
            return data[pos + 8 : pos + 8 + length]
        pos += 8 + length + (length & 1)  # chunks are padded to even sizes
    return None


def _read_orientation(tiff: bytes) -> int:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    end = "<" if tiff[:2] == b"II" else ">"
    magic, ifd = struct.unpack(end + "HI", tiff[2:8])
    if magic != 42 or ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(end + "H", tiff[ifd : ifd + 2])
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return 1
        tag, typ, n = struct.unpack(end + "HHI", tiff[entry : entry + 8])
        if tag == ORIENTATION_TAG:
            if typ != 3 or n != 1:  # SHORT, one value, stored in the entry itself
                return 1
            return struct.unpack(end + "H", tiff[entry + 8 : entry + 10])[0]
    return 1
