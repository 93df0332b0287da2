"""The decoder's ONNX Runtime form (models/sampling.py, `native_sampling = False`): the same
frames as PyTorch's native kernels, and the graph an ONNX export actually contains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgetalk.models.checkpoint import default_checkpoint, load_checkpoint
from edgetalk.models.sampling import (
    RowsConv2d,
    grid_sample_border,
    pixel_shuffle2,
    upsample_bilinear,
    upsample_matrix,
)


@pytest.mark.parametrize("shape", [(1, 8, 5, 7), (3, 24, 16, 16), (2, 4, 1, 9)])
def test_pixel_shuffle_as_two_transposes_is_exact(shape):
    x = torch.randn(shape)
    assert torch.equal(pixel_shuffle2(x, native=False), F.pixel_shuffle(x, 2))


@pytest.mark.parametrize(("cin", "cout", "h", "w"), [(32, 2, 64, 64), (8, 3, 5, 7), (4, 1, 1, 9)])
def test_a_convolution_by_its_kernel_rows_is_the_convolution(cin, cout, h, w):
    torch.manual_seed(cin + h)
    conv = RowsConv2d(cin, cout, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, cin, h, w)
    torch.testing.assert_close(conv.rows_form(x), conv(x), rtol=0, atol=1e-5)
    # eager PyTorch keeps the 3x3 kernel (the rows form is the ONNX graph's)
    assert torch.equal(conv(x, rows=True), F.conv2d(x, conv.weight, conv.bias, padding=1))
    with pytest.raises(ValueError, match="3x3"):
        RowsConv2d(cin, cout, 5, padding=2).rows_form(x)


@pytest.mark.parametrize("size,factor", [(8, 4), (64, 4), (5, 2)])
def test_upsampling_as_matmuls_matches_interpolate(size, factor):
    x = torch.randn(2, 3, size, size)
    want = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    got = upsample_bilinear(x, factor, native=False)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)
    # the edges are clamped, as PyTorch's half-pixel rule: the first output row is the input's
    assert torch.allclose(upsample_matrix(size, factor)[0, 0], torch.tensor(1.0))


def test_gather_sampling_matches_grid_sample_beyond_the_border():
    img = torch.rand(1, 3, 20, 20)
    grid = torch.rand(2, 9, 11, 2) * 2.6 - 1.3  # some samples fall outside: border padding
    want = F.grid_sample(
        img.expand(2, -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    assert torch.allclose(
        grid_sample_border(img.expand(2, -1, -1, -1), grid, False), want, atol=1e-5
    )


def shipped_and_gather_twin(seed: int):
    """The shipped model, its copy in the gather form (as the ONNX export traces it), a
    generator seeded with `seed`, and random features and an 8-bit photo drawn from it (the
    runtime crops the photo to uint8, runtime/avatar.py: the gather form holds its levels)."""
    model = load_checkpoint(default_checkpoint())
    model = model[0] if isinstance(model, tuple) else model
    twin = model.for_streaming(model.cfg).eval()
    twin.decoder.native_sampling = False
    g = torch.Generator().manual_seed(seed)
    app = torch.rand(1, 32, 64, 64, generator=g)
    image = torch.randint(0, 256, (1, 3, 256, 256), generator=g).float() / 255.0
    return model, twin, g, app, image


def test_shipped_decoder_renders_the_same_frames_in_both_forms():
    model, twin, g, app, image = shipped_and_gather_twin(0)
    motion = torch.randn(1, 4, model.cfg.motion_dim, generator=g) * 0.5
    with torch.no_grad():
        photo = model.decoder.eval().prepare(app)  # the appearance stage's dec_* tensors
        a = model.decoder(app, image, motion, **photo)["frames"]
        b = twin.decoder(app, image, motion, **photo)["frames"]
    assert model.decoder.native_sampling  # the reference never switches
    assert (a - b).abs().max().item() < 1e-3  # well under one grey level
    assert not torch.equal(a, torch.zeros_like(a))


def test_neighbour_table_sampling_matches_grid_sample_beyond_the_border():
    from edgetalk.models.sampling import neighbour_table, sample_table

    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (1, 5, 12, 20), generator=g).float() / 255.0  # 8-bit levels
    grid = torch.rand(3, 7, 9, 2, generator=g) * 2.6 - 1.3  # some fall outside: border padding
    want = F.grid_sample(
        img.expand(3, -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    x = (grid[..., 0:1] * 10 + 9.5).permute(0, 3, 1, 2)  # pixel units, W = 20
    y = (grid[..., 1:2] * 6 + 5.5).permute(0, 3, 1, 2)  # H = 12
    table = neighbour_table(img)
    assert table.dtype == torch.uint8 and table.shape == (12 * 20, 4 * 5)
    got = sample_table(table, x, y, 20, 12)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)


def test_neighbour_table_rounds_a_picture_between_levels_to_the_nearest():
    """A picture that is not 8-bit (or strays outside [0, 1]) moves by at most half a level."""
    from edgetalk.models.sampling import neighbour_table, sample_table

    g = torch.Generator().manual_seed(2)
    img = torch.rand(1, 3, 9, 9, generator=g) * 1.2 - 0.1
    x = torch.rand(2, 1, 5, 5, generator=g) * 8
    y = torch.rand(2, 1, 5, 5, generator=g) * 8
    want = F.grid_sample(
        img.clamp(0, 1).expand(2, -1, -1, -1),
        torch.cat([(x + 0.5) / 4.5 - 1, (y + 0.5) / 4.5 - 1], 1).permute(0, 2, 3, 1),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    got = sample_table(neighbour_table(img), x, y, 9, 9)
    err = (got - want).abs().max().item()
    assert 0 < err <= 0.5 / 255 + 1e-6


def test_row_gathers_of_one_reference_match_grid_sample_to_the_bit_order():
    """The features' form (sample_rows): one reference picture, every frame its own grid."""
    from edgetalk.models.sampling import sample_rows

    g = torch.Generator().manual_seed(3)
    img = torch.randn(1, 6, 10, 14, generator=g)
    grid = torch.rand(4, 8, 8, 2, generator=g) * 2.6 - 1.3
    want = F.grid_sample(
        img.expand(4, -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    got = sample_rows(img, grid)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)
    # the same arithmetic as the per-channel gather form, so the same numbers
    assert torch.equal(got, grid_sample_border(img.expand(4, -1, -1, -1), grid, False))


def test_row_table_sampling_matches_sample_columns():
    from edgetalk.models.sampling import row_table, sample_columns, sample_row_table

    row = torch.randn(1, 3, 1, 16)
    grid = torch.rand(2, 5, 6, 2) * 2.6 - 1.3
    want = sample_columns(row, grid, native=True)
    x = (grid[..., 0:1] * 8 + 7.5).permute(0, 3, 1, 2)
    got = torch.cat(sample_row_table(row_table(row), x, 16), 1)
    assert torch.allclose(got, want, atol=1e-5)


def test_lip_closing_field_makes_no_denormals_far_from_the_lips():
    """Rows far from the mouth get a Gaussian weight of ~0. Uncapped, a band of them came out as
    denormal floats, which x86 computes ~20x slower (0.16 ms of a 256-px ONNX frame, where a
    one-thread session cannot flush them); capped, they are exactly 0 or at least e^-60."""
    from edgetalk.models.constants import LIP_ROLL
    from edgetalk.models.decoder import closing_field

    y = torch.linspace(-300.0, 300.0, 60001).reshape(1, 1, -1, 1)  # pixels from the midline
    up, low = torch.tensor(-4.0), torch.tensor(4.0)  # an 8-px gap
    field = closing_field(up, low, torch.tensor(1.0), y, torch.tensor(16.0), 2.0, LIP_ROLL * 128)
    tiny = field.abs()
    assert not ((tiny > 0) & (tiny < torch.finfo(torch.float32).tiny)).any()
    assert field.abs().max() > 1.0  # the field itself still closes the lips


def test_tail_bands_cover_the_rows_in_even_bands_of_the_pixel_budget():
    from edgetalk.models.decoder import TAIL_PIXELS, tail_bands

    for r0, r1, width in [(0, 256, 256), (128, 256, 256), (0, 512, 512), (0, 64, 64), (3, 21, 8)]:
        bands = tail_bands(r0, r1, width)
        assert bands[0][0] == r0 and bands[-1][1] == r1
        assert all(a[1] == b[0] for a, b in zip(bands, bands[1:], strict=False))
        assert all(b1 > b0 for b0, b1 in bands)
        assert all(b0 % 2 == 0 for b0, _ in bands[1:])  # inner cuts on a 2x2 block's edge
        assert all((b1 - b0) * width <= max(TAIL_PIXELS, 2 * width) for b0, b1 in bands)
    assert tail_bands(0, 256, 256) == [(0, 128), (128, 256)]
    assert tail_bands(85, 171, 256) == [(85, 128), (128, 171)]  # a DecoderRows band's ends
    assert tail_bands(3, 9, 256) == [(3, 9)]


def test_the_gather_forms_tail_in_bands_renders_the_whole_frames_values(monkeypatch):
    """The per-pixel tail band by band (tail_bands) against the same tail over the whole frame
    at once (one band): every step is per pixel, so only the upsampling's row products may
    round apart; the whole frame and a DecoderRows band both."""
    from edgetalk.models import decoder as dec

    model, twin, g, app, image = shipped_and_gather_twin(3)
    motion = torch.rand(2, model.cfg.motion_dim, generator=g) * 0.6
    with torch.no_grad():
        photo = twin.decoder.prepare(app)
        banded = twin.decoder._render_gather(app, image, motion, photo)
        lower = twin.decoder._render_gather(app, image, motion, photo, (128, 256))
        assert len(dec.tail_bands(0, 256, 256)) == 2
        monkeypatch.setattr(dec, "TAIL_PIXELS", 256 * 256)
        assert len(dec.tail_bands(0, 256, 256)) == 1
        whole = twin.decoder._render_gather(app, image, motion, photo)
        lower_whole = twin.decoder._render_gather(app, image, motion, photo, (128, 256))
    assert banded.shape == whole.shape == (2, 256, 256, 3)
    torch.testing.assert_close(banded, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(lower, lower_whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(lower, whole[:, 128:], rtol=0, atol=1e-5)
    # a band with odd ends (a DecoderRows band of a frame cut in three) over several tail bands
    monkeypatch.setattr(dec, "TAIL_PIXELS", 40 * 256)
    assert len(dec.tail_bands(85, 171, 256)) == 3
    with torch.no_grad():
        odd = twin.decoder._render_gather(app, image, motion, photo, (85, 171))
    torch.testing.assert_close(odd, whole[:, 85:171], rtol=0, atol=1e-5)
