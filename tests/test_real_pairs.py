"""Self-reenactment pairs (training/real_pairs.py): the motion and the correspondence they carry.

Checked on frames the synthetic renderer made from known motion, where the exact answer is
known: the renderer's own backward map and motion vector.
"""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import need


@pytest.fixture(scope="module")
def scene():
    need("mediapipe", "pairs need mediapipe's face mesh for the reference landmarks")
    from edgetalk.models.motion import INDEX
    from edgetalk.runtime.avatar import prepare_avatar
    from edgetalk.training import faces, render

    photo = prepare_avatar(None, 256)
    ref = render.prepare(photo, faces.face_landmarks(photo), 256)
    m = np.zeros(16, np.float32)
    m[[INDEX["jaw_open"], INDEX["head_yaw"], INDEX["head_ty"]]] = 0.6, 0.1, 0.05
    mesh, lm3 = render.deform(ref, m)
    frame, lm2, (mx, my), painted = render.render_with_maps(ref, m)
    return ref, m, lm3, frame, (mx, my), painted


def test_pair_motion_recovers_the_target_motion(scene):
    from edgetalk.models.motion import INDEX
    from edgetalk.training import real_pairs
    from edgetalk.training.fit_motion import JAW_GAIN

    ref, m, lm3, *_ = scene
    got = real_pairs.pair_motion(ref, lm3)
    jaw = INDEX["jaw_open"]
    # Exact landmarks: the fit returns the motion, the jaw in label units (x JAW_GAIN).
    assert got[jaw] == pytest.approx(min(1.0, m[jaw] * JAW_GAIN), abs=0.08)
    assert got[INDEX["head_yaw"]] == pytest.approx(0.1, abs=0.03)
    assert got[INDEX["head_ty"]] == pytest.approx(0.05, abs=0.02)


def test_correspondence_is_the_renderers_backward_map_on_the_face(scene):
    from edgetalk.training import real_pairs

    ref, m, lm3, frame, (mx, my), _ = scene
    grid = real_pairs.correspondence(ref, m, lm3)
    want = np.stack([(mx + 0.5) / 128 - 1, (my + 0.5) / 128 - 1], axis=-1)
    w = real_pairs.face_mask(lm3, 256) * (1 - real_pairs.mouth_mask(lm3, 256))
    assert w.sum() > 0.15 * 256 * 256  # the face is most of the crop
    err_px = np.abs(grid - want).max(axis=-1) * 128
    assert np.median(err_px[w > 0]) < 0.05 and np.percentile(err_px[w > 0], 99) < 0.5
    # ... and it is not the identity: the jaw and head moved
    ident = np.stack(
        np.meshgrid((np.arange(256) + 0.5) / 128 - 1, (np.arange(256) + 0.5) / 128 - 1), -1
    )
    assert np.abs(grid - ident).max(axis=-1)[w > 0].mean() * 128 > 2.0


def test_open_mouth_is_masked_out_of_the_correspondence(scene):
    from edgetalk.training import real_pairs

    _, _, lm3, _, _, painted = scene
    mouth = real_pairs.mouth_mask(lm3, 256, pad=0)
    # The renderer painted the new mouth interior inside the inner-lip polygon.
    assert painted.sum() > 50
    assert (mouth[painted] > 0).mean() > 0.9
    assert real_pairs.mouth_mask(lm3, 256).sum() > mouth.sum()  # the pad dilates


def test_sampler_gives_consistent_pairs_and_flips_them(scene, tmp_path):
    import torch
    import torch.nn.functional as F

    from edgetalk.training import real_pairs

    ref, m, lm3, frame, _, _ = scene
    crops = np.stack([ref.rgb, frame] * 6)
    track = np.stack([ref.landmarks, lm3] * 6).astype(np.float32)
    np.savez(tmp_path / "clip.npz", crops=crops, landmarks=track)
    sampler = real_pairs.PairSampler([tmp_path / "clip.npz"], seed=3, open_source=0.0)
    flips = set()
    for _ in range(6):
        it = sampler.one(256)
        assert it["ref"].shape == it["target"].shape == (256, 256, 3)
        assert it["grid"].shape == (256, 256, 2) and it["lips"].shape == (3, 64)
        src = torch.from_numpy(it["ref"]).permute(2, 0, 1)[None].float()
        tgt = torch.from_numpy(it["target"]).permute(2, 0, 1)[None].float()
        warped = F.grid_sample(src, torch.from_numpy(it["grid"])[None], align_corners=False)
        w = torch.from_numpy(it["grid_weight"])[None, None]
        err = ((warped - tgt).abs() * w).sum() / w.sum() / 3
        still = ((src - tgt).abs() * w).sum() / w.sum() / 3
        assert err < 4.0  # grey levels: the grid takes the source onto the target
        moved = bool(still > 4.0)
        if moved:  # the source is not the target: the grid does the work
            assert err < 0.5 * still
        flips.add((moved, float(it["ref"][128, 60, 0])))
    assert len(flips) >= 2  # both orders of the pair and both flips turn up


def test_sampler_refuses_clips_without_faces(tmp_path):
    from edgetalk.training import real_pairs

    np.savez(
        tmp_path / "empty.npz",
        crops=np.zeros((12, 256, 256, 3), np.uint8),
        landmarks=np.full((12, 478, 3), np.nan, np.float32),
    )
    with pytest.raises(RuntimeError, match="no usable real clips"):
        real_pairs.PairSampler([tmp_path / "empty.npz"], seed=0)
