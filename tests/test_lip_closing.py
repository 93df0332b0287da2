"""The decoder's lip-closing field: where the photo's lips are, and how lip_press closes them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgetalk.errors import BundleError
from edgetalk.models.checkpoint import load_checkpoint, save_checkpoint
from edgetalk.models.config import preset
from edgetalk.models.decoder import (
    LIP_PRESS,
    LIP_ROLL,
    PRESENCE_FILL,
    base_grid,
    close_columns,
    closing_field,
    lip_edges,
)
from edgetalk.models.sampling import sample_columns

from .conftest import seeded_model

H = 64
ROWS = ((torch.arange(H, dtype=torch.float32) * 2 + 1) / H - 1).reshape(1, 1, H, 1)
SHARP = 0.25 * 2.0 / H


def _edges(up: float, low: float, present: float, w: int = 8):
    full = lambda v: torch.full((1, 1, 1, w), v)  # noqa: E731
    return full(up), full(low), full(present)


def test_field_pulls_both_lips_to_the_midline_by_half_the_gap():
    field = closing_field(*_edges(-0.1, 0.1, 1.0), ROWS, torch.tensor(0.1), SHARP)[0, 0, :, 0]
    rows = ROWS[0, 0, :, 0]
    just_above, just_below = (
        int(torch.searchsorted(rows, 0.0)) - 2,
        int(torch.searchsorted(rows, 0.0)) + 1,
    )
    # a row just above the midline samples the upper lip (0.1 higher, and the roll further),
    # just below the lower one
    assert field[just_above] == pytest.approx(-0.1 - LIP_ROLL, abs=0.01)
    assert field[just_below] == pytest.approx(0.1 + LIP_ROLL, abs=0.01)
    assert field[rows < -0.7].abs().max() < 1e-3 and field[rows > 0.7].abs().max() < 1e-3
    # closed lips, or no mouth in the column: nothing moves
    assert closing_field(*_edges(0.05, 0.05, 1.0), ROWS, torch.tensor(0.1), SHARP).abs().max() == 0
    assert closing_field(*_edges(-0.1, 0.1, 0.0), ROWS, torch.tensor(0.1), SHARP).abs().max() == 0
    # a wider gap is pulled further: the field scales with it, it is not a learned size
    wide = closing_field(*_edges(-0.2, 0.2, 1.0), ROWS, torch.tensor(0.1), SHARP)[0, 0, :, 0]
    assert wide[just_above - 3] < field[just_above - 3] - 0.05


def test_the_roll_fades_out_for_small_gaps():
    """Closed or nearly closed lips are not rolled in: the roll is for hiding a gap."""
    tiny = closing_field(*_edges(-0.001, 0.001, 1.0), ROWS, torch.tensor(0.1), SHARP)
    assert tiny.abs().max() < 0.003  # ~2x the half gap, not LIP_ROLL
    wide = closing_field(*_edges(-0.1, 0.1, 1.0), ROWS, torch.tensor(0.1), SHARP)
    assert wide.abs().max() == pytest.approx(0.1 + LIP_ROLL, abs=0.005)


def test_presence_dips_inside_the_mouth_are_filled_its_corners_kept():
    k = PRESENCE_FILL
    p = torch.zeros(1, 1, 1, 24)
    p[..., 6:18] = 1.0
    p[..., 11 : 11 + 2 * k] = 0.3  # a dip narrower than the window, inside the mouth
    out = close_columns(p, k)
    assert torch.allclose(out[..., 6:18], torch.ones(12))  # filled
    assert (out[..., :6] == 0).all() and (out[..., 18:] == 0).all()  # not widened
    wide_dip = p.clone()
    wide_dip[..., 8:16] = 0.3  # wider than the window: a real gap between two things stays
    assert (close_columns(wide_dip, k)[..., 10:14] == 0.3).all()


def test_edges_are_a_soft_argmax_over_rows():
    logits = torch.full((1, 3, H, 4), -30.0)
    logits[:, 0, 20] = 30.0  # upper edge on row 20, lower on row 40
    logits[:, 1, 40] = 30.0
    logits[:, 2] = 5.0
    up, low, present = lip_edges(logits, ROWS)
    assert torch.allclose(up, ROWS[0, 0, 20, 0].expand_as(up))
    assert torch.allclose(low, ROWS[0, 0, 40, 0].expand_as(low))
    assert (present > 0.99).all()


def test_lip_press_closes_a_painted_mouth_through_the_decoder():
    """A face-free picture with a white band (teeth) between two red bands (lips), and a lip head
    set by hand to find them: lip_press 1 replaces the white rows by lip, press 0 keeps them."""
    model = seeded_model(preset("tiny"))
    d = model.decoder
    res = d.res
    img = torch.zeros(1, 3, res, res)
    img[:, 0] = 0.6  # skin-ish
    band = lambda a, b: slice(int(a * res), int(b * res))  # noqa: E731
    img[:, :, band(0.40, 0.46)] = torch.tensor([0.8, 0.1, 0.1]).reshape(1, 3, 1, 1)  # upper lip
    img[:, :, band(0.46, 0.54)] = 1.0  # teeth
    img[:, :, band(0.54, 0.60)] = torch.tensor([0.8, 0.1, 0.1]).reshape(1, 3, 1, 1)  # lower lip
    with torch.no_grad():
        for mod in (d.flow_out, d.affine, d.basis):  # only the closing field moves pixels
            mod.weight.zero_()
            mod.bias.zero_()
        d.refine_out.weight.zero_()
        d.refine_out.bias.zero_()
        d.refine_out.bias[12:16] = -30.0  # no paint
        feat = d.feat
        edge_rows = {0: round(0.46 * feat - 0.5), 1: round(0.54 * feat - 0.5)}  # the band edges
        logit_map = torch.full((1, 3, feat, feat), -30.0)
        for ch, row in edge_rows.items():
            logit_map[:, ch, row] = 30.0
        logit_map[:, 2] = 10.0
        m = torch.zeros(2, model.cfg.motion_dim)
        m[1, LIP_PRESS] = 1.0
        d.lip_logits = lambda x: logit_map  # the head's output, fixed
        frames = d.render(torch.zeros(1, model.cfg.render.app_channels, feat, feat), img, m)
    white = lambda f: ((f > 0.95).all(-1)).float().mean().item()  # noqa: E731
    assert white(frames[0]) > 0.07  # press 0: the teeth show
    assert white(frames[1]) < 0.1 * white(frames[0])  # press 1: the lips meet over them


def test_pressed_lips_hide_the_teeth_where_the_midline_falls_between_pixels():
    """Each output pixel looks at one lip or the other, not at the teeth between them, also
    where the edges fall between pixel centres (a slanted mouth). A field built on the pixel
    grid and resampled flipped over a whole row: 38% of such columns showed teeth there."""
    model = seeded_model(preset("tiny"))
    d = model.decoder
    feat, res = d.feat, d.res
    logits = torch.full((1, 3, feat, feat), -30.0)
    for col in range(feat):  # edges between two rows, at a different fraction in each column
        t = min(max((col * 0.37) % 1.0, 1e-4), 1 - 1e-4)
        for ch, row in ((0, feat // 2 - 2), (1, feat // 2 + 1)):
            logits[0, ch, row, col] = math.log(1 - t)
            logits[0, ch, row + 1, col] = math.log(t)
    logits[0, 2] = 10.0
    d.lip_logits = lambda x: logits
    app = torch.zeros(1, model.cfg.render.app_channels, feat, feat)
    grid = base_grid(res, res).reshape(1, res, res, 3)[..., :2].contiguous()
    with torch.no_grad():
        lips = d.prepare(app)["dec_lips"]
        look = grid[0, ..., 1] + d.closing(lips, grid, torch.ones(1))[0, ..., 1]
        up, low, _ = (
            F.interpolate(t, size=(1, res), mode="bilinear", align_corners=False)[0, 0, 0]
            for t in d.lips(app)
        )
    px = 2.0 / res
    between = (look > up + px) & (look < low - px)  # more than a pixel inside the gap
    assert between.any(0).float().mean() < 0.15


def test_column_sampling_is_grid_sample_on_one_row():
    """The closing field reads each photo column's edges with two gathers (export form) or the
    native kernel: both equal grid_sample on a one-row picture, borders included."""
    row = torch.randn(1, 3, 1, 16)
    grid = torch.rand(2, 5, 7, 2) * 2.4 - 1.2  # some outside [-1, 1]: border padding
    want = F.grid_sample(
        row.expand(2, -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    for native in (True, False):
        assert torch.allclose(sample_columns(row, grid, native), want, atol=1e-6)


def test_older_weights_without_the_lip_head(tmp_path):
    model = seeded_model(preset("tiny"))
    path = tmp_path / "old.safetensors"
    save_checkpoint(model, path)
    from safetensors.torch import load_file, save_file

    from edgetalk.models.checkpoint import read_metadata

    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("decoder.lip")}
    save_file(state, str(path), metadata=read_metadata(path))
    with pytest.raises(BundleError, match="missing"):
        load_checkpoint(path)  # users' files must be complete
    loaded, _ = load_checkpoint(path, allow_new=("decoder.lip",))  # training may add the head
    up, low, present = loaded.decoder.lips(
        torch.zeros(1, model.cfg.render.app_channels, loaded.decoder.feat, loaded.decoder.feat)
    )
    assert float((low - up).abs().max()) < 1e-6  # a new head sees no gap: it closes nothing
    assert np.isfinite(up.detach().numpy()).all()
