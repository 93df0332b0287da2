"""Avatar photos a user would try: tilted and looking-down faces are found (BlazeFace run by OpenCV,
the `face` extra only), nothing is found where there is no face, and a tight or small photo is
mirrored at its edges instead of smeared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgetalk.runtime import face_detect as fd
from edgetalk.runtime.avatar import _reflect, crop_box, crop_resize, default_avatar, detect_face

cv2 = pytest.importorskip("cv2", reason="the face extra is not installed")

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def rotate(rgb: np.ndarray, deg: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
    return cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


def look_down(rgb: np.ndarray, deg: float) -> np.ndarray:
    """The photo's plane tipped back about its horizontal axis (top away from the camera), seen
    in perspective: the foreshortened face of someone looking down."""
    h, w = rgb.shape[:2]
    f, th = 1.2 * max(h, w), np.radians(deg)
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = []
    for x, y in src:
        yc = y - h / 2
        s = f / (f - yc * np.sin(th))
        dst.append([w / 2 + (x - w / 2) * s, h / 2 + yc * np.cos(th) * s])
    m = cv2.getPerspectiveTransform(src, np.float32(dst))
    return cv2.warpPerspective(rgb, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return default_avatar()  # 512 x 512, a frontal face


def on_face(box, shape, tol=0.12) -> bool:
    """The box is the photo's face: centred (the photo is a face crop) and about its size."""
    if box is None:
        return False
    h, w = shape[:2]
    return (
        abs(box.x + box.w / 2 - w / 2) < tol * w
        and abs(box.y + box.h / 2 - h / 2) < tol * h
        and 0.25 * w < box.w < 0.8 * w
    )


@pytest.mark.skipif(
    not hasattr(cv2, "CascadeClassifier"),
    reason=f"OpenCV {cv2.__version__} has no Haar cascade in its main module (OpenCV 5)",
)
def test_frontal_face_in_haar_convention(photo):
    got, haar = detect_face(photo), fd.haar(photo)
    assert got is not None and haar is not None
    # BlazeFace's box is mapped onto the Haar cascade's (the crop rule and the training crops
    # were built on it): same centre within 0.1 of a side, same side within 20%.
    assert abs(got.x + got.w / 2 - (haar.x + haar.w / 2)) < 0.1 * haar.w
    assert abs(got.y + got.h / 2 - (haar.y + haar.h / 2)) < 0.1 * haar.w
    assert 0.8 < got.w / haar.w < 1.2
    kp = fd.blazeface(photo)[0].keypoints
    assert kp[0, 1] < kp[3, 1] and kp[1, 1] < kp[3, 1]  # eyes above the mouth
    assert kp[0, 0] < kp[1, 0]  # the subject's right eye is on the image's left


@pytest.mark.parametrize("deg", [-35, 35])
def test_tilted_face_is_found(photo, deg):
    tilted = rotate(photo, deg)
    assert not on_face(fd.haar(tilted), tilted.shape)  # before: refused, or a box off the face
    assert on_face(detect_face(tilted), tilted.shape)


def test_face_looking_down_is_found(photo):
    down = look_down(photo, 55)
    assert not on_face(fd.haar(down), down.shape, tol=0.2)
    assert on_face(detect_face(down), down.shape, tol=0.2)


def test_real_face_looking_down_is_found():
    """A real frame (head down, eyes on the desk) that the Haar cascade refuses."""
    clip = REAL / "videos" / "pcavs_741400163.mp4"
    if not clip.exists():
        pytest.skip("the real clips (shared/data/real) are not here")
    import av

    with av.open(str(clip)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i == 280:
                rgb = frame.to_ndarray(format="rgb24")
                break
    assert fd.haar(rgb) is None
    got = detect_face(rgb)
    assert got is not None and 0.2 * rgb.shape[1] < got.w < 0.8 * rgb.shape[1]


class OneOutputPerForward:
    """OpenCV 5.0's DNN engine as seen on a GPU machine's image: forward() with several output
    names fails ("outnames.size() == noutputs"), each name on its own works."""

    def __init__(self, net):
        self.net = net
        self.calls: list = []

    def setInput(self, blob):  # noqa: N802 (OpenCV's name)
        self.net.setInput(blob)

    def forward(self, names):
        self.calls.append(names)
        if isinstance(names, list) and len(names) > 1:
            raise cv2.error("the number of requested and actual outputs must be the same")
        return self.net.forward(names)


def test_detector_and_mesh_work_where_a_forward_gives_one_output(photo, monkeypatch):
    from edgetalk.runtime import face_mesh

    box, gap = detect_face(photo), face_mesh.mouth_gap(photo)
    one = OneOutputPerForward(fd._blazeface())
    monkeypatch.setattr(fd, "_blazeface", lambda: one)
    mesh = OneOutputPerForward(face_mesh._mesh_net())
    monkeypatch.setattr(face_mesh, "_mesh_net", lambda: mesh)
    assert detect_face(photo) == box
    assert face_mesh.mouth_gap(photo) == pytest.approx(gap, abs=1e-9)
    assert one.calls[:3] == [list(fd.OUTPUTS), *fd.OUTPUTS]  # tried together, then one by one
    assert mesh.calls[-2:] == list(face_mesh.OUTPUTS)


def test_no_cascade_in_this_opencv_is_no_haar_face(photo, monkeypatch):
    """OpenCV 5 moved CascadeClassifier out of the main module: the fallback then finds
    nothing, and BlazeFace still finds the face."""
    monkeypatch.delattr(cv2, "CascadeClassifier", raising=False)
    assert fd.haar(photo) is None
    assert on_face(detect_face(photo), photo.shape)


def test_no_face_no_box():
    rng = np.random.default_rng(0)
    board = (np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)
    stripes = np.zeros((256, 256, 3), np.uint8)
    stripes[:, ::16] = 255
    for img in (
        rng.integers(0, 256, (300, 300, 3), dtype=np.uint8),
        np.full((200, 200, 3), 128, np.uint8),
        np.repeat(np.repeat(board, 32, 0), 32, 1)[..., None].repeat(3, 2),
        stripes,
    ):
        assert detect_face(img) is None


def test_reflect_matches_numpy():
    for n in (1, 2, 5):
        idx = np.arange(-13, n + 13)
        want = np.pad(np.arange(n), 13, mode="reflect" if n > 1 else "edge")
        assert np.array_equal(_reflect(idx, n), want)


def test_tight_small_photo_is_not_smeared(photo):
    """A 112-px photo cut tight around the face: the crop reaches past its edges. Repeating the
    edge pixels copied each edge pixel across the band (streaks: as much change from row to row
    as at the photo's edge); now the photo is mirrored at its edge and fades to a soft blur."""
    face = detect_face(photo)
    cx, cy = face.x + face.w / 2, face.y + face.h / 2
    half = int(0.62 * face.w)
    tight = photo[int(cy) - half : int(cy) + half, int(cx) - half : int(cx) + half]
    small = cv2.resize(tight, (112, 112), interpolation=cv2.INTER_AREA)
    box = crop_box(small.shape, detect_face(small))
    assert box[2] > 112 * 1.15  # the crop does leave the photo
    out = crop_resize(small, box, 256).astype(np.float32)
    pad = int(256 * (box[0] - box[2] / 2) / -box[2])  # output columns left of the photo
    assert pad >= 12
    band = out[:, : pad // 2]  # the outer half of the band, past the mirrored strip
    edge = out[:, pad + 1 : pad + 4]  # the photo's own first columns
    row_change = np.abs(np.diff(band, axis=0)).mean()
    assert row_change < 0.25 * np.abs(np.diff(edge, axis=0)).mean()
    # The photo itself is untouched: the crop of a photo that covers it needs no padding.
    inside = crop_resize(photo, (256.0, 256.0, 400.0), 200)
    assert np.array_equal(inside, crop_resize(photo[56:456, 56:456], (200.0, 200.0, 400.0), 200))


def test_block_mean_is_the_mean_of_each_block_partial_ones_included():
    from edgetalk.runtime.avatar import block_mean

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    out = block_mean(img, 4)
    assert out.shape == (6, 8, 3) and out.dtype == np.float32
    for i in range(6):
        for j in range(8):
            want = img[4 * i : 4 * i + 4, 4 * j : 4 * j + 4].reshape(-1, 3).mean(0)
            np.testing.assert_allclose(out[i, j], want, rtol=1e-6)


def test_a_phone_photo_is_cropped_in_bounded_memory_and_as_the_exact_resize_would():
    """A 12 MP phone photo whose face fills it: the resize by dense weights made float copies of
    the whole crop and more (1 GB, 6 s here). Averaging whole blocks first (as PIL's thumbnail
    does with reducing_gap 2) keeps the peak small; the picture stays within about a level of
    the exact resize, and a photo that needs no reduction is untouched (the test above)."""
    import tracemalloc

    src = default_avatar()  # 512 px
    # a 1000x750 photo (its crop needs no reduction: the exact resize) and the same photo with
    # every pixel repeated 4x4 (4000x3000, 12 MP), each with the same crop
    small = cv2.resize(src[:384], (1000, 750), interpolation=cv2.INTER_CUBIC)
    big = np.repeat(np.repeat(small, 4, 0), 4, 1)
    exact = crop_resize(small, (500.0, 375.0, 1000.0), 256)  # leaves the photo top and bottom
    tracemalloc.start()
    out = crop_resize(big, (2000.0, 1500.0, 4000.0), 256)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (256, 256, 3)
    assert peak < 150e6, f"peak {peak / 1e6:.0f} MB"
    assert np.abs(out.astype(int) - exact.astype(int)).mean() < 1.0
