"""The decoder's resampling ops, each in two forms with the same result: PyTorch's native kernel
(eager, Core ML, TensorRT) and the form ONNX Runtime's CPU kernels run fast (`native=False`, which
the ONNX exporter switches on; see export/patching.py); and one convolution in the same two forms
(RowsConv2d):
- bilinear sampling (grid_sample, border, align_corners=False) with gathers: ONNX Runtime's
  GridSample kernel took half of the decoder's time;
- pixel shuffle as two small transposes: its DepthToSpace is one generic 6-D transpose, 12 ms of
  a 4-frame call for the last one (measured with ORT's profiler, 1 thread);
- x4 bilinear upsampling (align_corners=False) as two matmuls with fixed interpolation
  matrices: its Resize kernel took 5 ms, the matmuls are GEMMs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .meta import shapes_only


def bilinear_corners(grid: torch.Tensor, h: int, w: int, index_dtype: torch.dtype):
    """For grid [N, Ho, Wo, 2] (normalized, align_corners=False, border padding) over an h x w
    picture: the integer corners x0, y0, x1, y1 (as index_dtype) and the weights wx, wy of the
    second corner, each [N, Ho, Wo]. What every gather form of grid_sample shares."""
    x = ((grid[..., 0] + 1.0) * w - 1.0) * 0.5  # pixel coordinates, align_corners=False
    y = ((grid[..., 1] + 1.0) * h - 1.0) * 0.5
    x = x.clamp(0.0, w - 1.0)  # border padding = clamp the coordinate
    y = y.clamp(0.0, h - 1.0)
    x0, y0 = torch.floor(x), torch.floor(y)
    x0i, y0i = x0.to(index_dtype), y0.to(index_dtype)
    x1i, y1i = (x0i + 1).clamp(max=w - 1), (y0i + 1).clamp(max=h - 1)
    return x0i, y0i, x1i, y1i, x - x0, y - y0


def grid_sample_border(img: torch.Tensor, grid: torch.Tensor, native: bool = True) -> torch.Tensor:
    if native:
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    n, c, h, w = img.shape
    ho, wo = grid.shape[1], grid.shape[2]
    x0i, y0i, x1i, y1i, wx, wy = bilinear_corners(grid, h, w, torch.long)
    wx, wy = wx.unsqueeze(1), wy.unsqueeze(1)
    flat = img.reshape(n, c, h * w)

    def tap(yi, xi):
        idx = (yi * w + xi).reshape(n, 1, ho * wo).expand(n, c, ho * wo)
        return torch.gather(flat, 2, idx).reshape(n, c, ho, wo)

    top = tap(y0i, x0i) * (1.0 - wx) + tap(y0i, x1i) * wx
    bottom = tap(y1i, x0i) * (1.0 - wx) + tap(y1i, x1i) * wx
    return top * (1.0 - wy) + bottom * wy


def sample_rows(img: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """grid_sample_border of one reference picture img [1, C, H, W] at grid [N, Ho, Wo, 2], for
    every frame N: [N, C, Ho, Wo]. ONNX Runtime's form for the 1/4-resolution features: the
    picture as rows [H*W, C], and each of the four taps one Gather of whole rows (one int32 index
    per pixel, C floats copied at once) and one transpose back to planar. Per-channel
    GatherElements needed an index copied for every channel first; at chunk 4 they took 6.3 ms
    a call, these 4.3 (1 thread; the same numbers to the bit)."""
    c, h, w = img.shape[1], img.shape[2], img.shape[3]
    n, ho, wo = grid.shape[0], grid.shape[1], grid.shape[2]
    x0i, y0i, x1i, y1i, wx, wy = bilinear_corners(grid, h, w, torch.int32)
    wx, wy = wx.reshape(n, 1, ho * wo), wy.reshape(n, 1, ho * wo)
    rows = img[0].reshape(c, h * w).transpose(0, 1)  # [H*W, C]

    def tap(yi, xi):
        idx = (yi * w + xi).reshape(n * ho * wo)
        return torch.index_select(rows, 0, idx).reshape(n, ho * wo, c).transpose(1, 2)

    top = tap(y0i, x0i) * (1.0 - wx) + tap(y0i, x1i) * wx
    bottom = tap(y1i, x0i) * (1.0 - wx) + tap(y1i, x1i) * wx
    return (top * (1.0 - wy) + bottom * wy).reshape(n, c, ho, wo)


def sample_columns(row: torch.Tensor, grid: torch.Tensor, native: bool = True) -> torch.Tensor:
    """grid_sample_border of a one-row picture row [1, C, 1, W] at grid [N, Ho, Wo, 2] (only x
    matters): [N, C, Ho, Wo]. The gather form needs two taps, not four."""
    n, ho, wo = grid.shape[:3]
    if native:
        return grid_sample_border(row.expand(n, -1, -1, -1), grid, True)
    c, w = row.shape[1], row.shape[3]
    x = (((grid[..., 0] + 1.0) * w - 1.0) * 0.5).clamp(0.0, w - 1.0)
    x0 = torch.floor(x)
    wx = (x - x0).unsqueeze(1)
    x0i = x0.long()
    x1i = (x0i + 1).clamp(max=w - 1)
    flat = row.reshape(1, c, w).expand(n, c, w)

    def tap(xi):
        idx = xi.reshape(n, 1, ho * wo).expand(n, c, ho * wo)
        return torch.gather(flat, 2, idx).reshape(n, c, ho, wo)

    return tap(x0i) * (1.0 - wx) + tap(x1i) * wx


def pixel_shuffle2(x: torch.Tensor, native: bool = True) -> torch.Tensor:
    """F.pixel_shuffle(x, 2): [N, 4C, H, W] -> [N, C, 2H, 2W]."""
    if native:
        return F.pixel_shuffle(x, 2)
    n, c4, h, w = x.shape
    c = c4 // 4
    # channels are (c, row offset a, column offset b): put b beside each column, then a beside
    # each row; both are 3-D/4-D transposes, which ONNX Runtime runs several times faster
    x = x.reshape(n * c * 2, 2, h * w).transpose(1, 2)  # [(n c a), (h w), b]
    x = x.reshape(n * c, 2, h, 2 * w).transpose(1, 2)  # [(n c), h, a, (w b)]
    return x.reshape(n, c, 2 * h, 2 * w)


def upsample_matrix(size: int, factor: int) -> torch.Tensor:
    """[size*factor, size]: 1-D linear upsampling with align_corners=False (PyTorch's half-pixel
    rule, edges clamped), so that A @ x @ A.T is F.interpolate(x, bilinear)."""
    if shapes_only():
        return torch.empty(size * factor, size)
    eye = torch.eye(size).unsqueeze(1)  # [size, 1, size]: each row a unit impulse
    up = F.interpolate(eye, scale_factor=factor, mode="linear", align_corners=False)
    return up[:, 0].T.contiguous()


def upsample_bands(
    x: torch.Tensor, factor: int, matrix: torch.Tensor, bands: list[tuple[int, int]], lo: int = 0
) -> list[torch.Tensor]:
    """upsample_bilinear's matmul form for output rows [r0, r1) of each of `bands`, with the
    columns interpolated once for all: [N, C, r1 - r0, W * factor] each. x holds the input rows
    [lo, lo + H) of a square picture (all of them at lo 0); every input row a band reads must
    lie among them (Decoder.band_rows)."""
    n, c, h, w = x.shape
    a = matrix.to(x.dtype)
    cols = torch.matmul(x.reshape(n * c * h, w), a.T).reshape(n * c, h, w * factor)
    return [
        torch.matmul(a[r0:r1, lo : lo + h], cols).reshape(n, c, r1 - r0, w * factor)
        for r0, r1 in bands
    ]


class Upsample(torch.nn.Module):
    """x`factor` bilinear upsampling (align_corners=False) of a square [N, C, size, size].

    A module (no weights) so that its exported nodes carry the scope `/upsample/`: FP16 and INT8
    exports keep them float by that name, for their output is the sampling grid, where a 1% error
    is a visible shift (converters/onnx.py). The interpolation matrix is a buffer, so a trace
    records it as a constant rather than the ops that build it."""

    def __init__(self, size: int, factor: int):
        super().__init__()
        self.factor = factor
        self.register_buffer("matrix", upsample_matrix(size, factor), persistent=False)

    def forward(self, x: torch.Tensor, native: bool = True, rows=None, bands=None, lo: int = 0):
        """The whole picture (or rows (r0, r1, lo, hi) of it); with `bands`, a list of
        (r0, r1) output rows of x's rows from `lo` on (upsample_bands), each a tensor."""
        if bands is not None:
            return upsample_bands(x, self.factor, self.matrix, bands, lo)
        return upsample_bilinear(x, self.factor, native, self.matrix, rows)


def upsample_bilinear(
    x: torch.Tensor,
    factor: int,
    native: bool = True,
    matrix: torch.Tensor | None = None,
    rows: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False) for a square
    [N, C, H, H]; `matrix` is upsample_matrix(H, factor) when the caller keeps one.

    `rows` (r0, r1, lo, hi), matmul form only: output rows [r0, r1) of a cut-out x that holds
    the input rows [lo, hi) (Decoder.band_rows), from the interpolation matrix's block; every
    input row those output rows read lies inside the cut-out."""
    n, c, h, w = x.shape
    if native:
        return F.interpolate(x, size=(h * factor, w * factor), mode="bilinear", align_corners=False)
    if rows is None and h != w:
        raise ValueError(f"upsample_bilinear's matmul form takes a square input, not {h}x{w}")
    a = (upsample_matrix(w, factor) if matrix is None else matrix).to(x.dtype)
    cols = torch.matmul(x.reshape(n * c * h, w), a.T)  # one GEMM: [(n c h), W]
    left = a if rows is None else a[rows[0] : rows[1], rows[2] : rows[3]]
    out = torch.matmul(left, cols.reshape(n * c, h, w * factor))
    return out.reshape(n, c, left.shape[0], w * factor)


# ---- the fast ONNX Runtime form of the decoder's full-resolution tail (Decoder._render_gather) ---
# ONNX Runtime's CPU kernels cost per element and per node: a 4-frame tail of ~100 full-resolution
# nodes spent most of its time on GatherElements, on the Expand that gives every channel its own
# copy of the index, and on waking the pool's threads for each node. These forms gather whole
# rows with one index per pixel (int32), keep every per-pixel value planar ([N, 1, R, R]: ONNX
# Runtime broadcasts slowly over a short last axis) and work in pixel units.


def neighbour_table(img: torch.Tensor) -> torch.Tensor:
    """[H*W, 4*C] uint8 for one picture [1, C, H, W] in [0, 1]: row y*W+x holds the picture's
    8-bit levels at (y, x), (y, x+1), (y+1, x), (y+1, x+1), each clamped to the border, so that
    one Gather of a pixel's row fetches its four bilinear taps.

    8 bits because the photo is 8-bit (the avatar is cropped to uint8, runtime/avatar.py): its
    levels k/255 round back to k exactly, and a picture between levels moves by at most half of
    one. A quarter of a float table's bytes (0.8 MB at 256 px, not 3.1) is what ONNX Runtime's
    gathers are bound by: a 4-frame warp took 13.4 ms against 21.4 with the float table and a
    ReduceSum (sample_table, 1 thread)."""
    _, c, h, w = img.shape
    q = (img * 255.0 + 0.5).clamp(0.0, 255.0).to(torch.uint8)  # round half up, then truncate
    q = torch.cat([q, q[:, :, :, -1:]], 3)  # replicate the last column and row: border padding
    q = torch.cat([q, q[:, :, -1:, :]], 2)
    taps = torch.cat([q[:, :, :h, :w], q[:, :, :h, 1:], q[:, :, 1:, :w], q[:, :, 1:, 1:]], 1)
    return taps.reshape(4 * c, h * w).transpose(0, 1)


def sample_table(table: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: int, h: int):
    """Bilinear samples [N, C, Ho, Wo] in [0, 1] of the picture behind `table` (neighbour_table)
    at pixel coordinates x, y [N, 1, Ho, Wo] (pixel centres at integers; border padding).

    One frame at a time: the gathered taps of a 4-frame call at 256 px, with their transposed
    copy and weighted products alive together, raised the peak RSS of `run --bundle` by 18 MB
    (248 -> 266 MB) as float; per frame, ONNX Runtime reuses one frame's buffers. The four taps
    are summed by three Adds (a ReduceSum over them was 1.5 ms a frame, the Adds 0.4), and split
    while still 8-bit, then cast (the decoder at chunk 4: 80.9 -> 78.0 ms a call)."""
    n, _, ho, wo = x.shape
    c = table.shape[1] // 4
    x = x.clamp(0.0, w - 1.0)
    y = y.clamp(0.0, h - 1.0)
    x0, y0 = torch.floor(x), torch.floor(y)
    wx, wy = (x - x0).reshape(n, 1, ho * wo), (y - y0).reshape(n, 1, ho * wo)
    idx = (y0 * w + x0).reshape(n, ho * wo).to(torch.int32)  # exact: H*W is far below 2**24
    # the levels' 1/255 rides on the horizontal weights: one product per pixel, not per tap
    mx, wx = (1.0 - wx) * (1.0 / 255.0), wx * (1.0 / 255.0)
    my = 1.0 - wy
    frames = []
    for i in range(n):
        # one frame's values: for the one-frame graph a reshape, not a gather that copies each
        # (five of them, 0.06 ms a 256-px frame in ONNX Runtime, one thread)
        mxi, myi, wxi, wyi, idxi = (
            (v.reshape(v.shape[-1]) if n == 1 else v[i]) for v in (mx, my, wx, wy, idx)
        )
        t = torch.index_select(table, 0, idxi).transpose(0, 1)  # [4C, P] uint8
        # split, then cast: ONNX Runtime copies the slices, a quarter of the bytes as uint8
        top = t[:c].float() * (mxi * myi) + t[c : 2 * c].float() * (wxi * myi)
        bottom = t[2 * c : 3 * c].float() * (mxi * wyi) + t[3 * c :].float() * (wxi * wyi)
        frames.append(top + bottom)
    # one frame (the one-frame ONNX decoder) needs no stack: ONNX Runtime copies a 1-input Concat
    out = frames[0].unsqueeze(0) if n == 1 else torch.stack(frames)
    return out.reshape(n, c, ho, wo)


class TableSampler(torch.nn.Module):
    """The photo's bilinear warp in the gather form: neighbour_table, then sample_table. A
    module (no weights) so that its nodes carry the scope `/sampler`: FP16 exports keep them
    float (converters/onnx.py), for a pixel index reaches H*W = 65,536, far beyond the integers
    fp16 holds exactly (2,048), and the photo's levels need 8 bits exactly."""

    def forward(self, image, x, y):
        """Samples at x, y, or, given lists of them (a frame's row bands), a list: the
        neighbour table is made once for all (made once per avatar in a bundle, its part)."""
        table = neighbour_table(image)
        w, h = image.shape[3], image.shape[2]
        if isinstance(x, list | tuple):
            return [sample_table(table, xb, yb, w, h) for xb, yb in zip(x, y, strict=True)]
        return sample_table(table, x, y, w, h)


def sample_row_table(table: torch.Tensor, x: torch.Tensor, w: int) -> list[torch.Tensor]:
    """Linear samples of a one-row picture along x [N, 1, Ho, Wo] (pixel units, border): one
    [N, 1, Ho, Wo] per channel. `table` is [2*C, W]: each column's value and the step to the
    next column (row_table). One per-element gather (GatherElements) per table row, all sharing
    one index: ONNX Runtime gathers whole rows at ~3.5 ns each whatever their size, and a Gather
    of [W, 2C] rows needed a transpose and a split after it (0.46 ms a 256-px frame, these
    0.17; 1 thread)."""
    n, _, ho, wo = x.shape
    c = table.shape[0] // 2
    x = x.clamp(0.0, w - 1.0)
    x0 = torch.floor(x)
    wx = x - x0
    idx = x0.reshape(1, n * ho * wo).to(torch.int64)

    def column(k: int) -> torch.Tensor:
        return torch.gather(table[k : k + 1], 1, idx).reshape(n, 1, ho, wo)

    return [column(i) + column(c + i) * wx for i in range(c)]


def row_table(row: torch.Tensor) -> torch.Tensor:
    """[2*C, W] for a one-row picture [1, C, 1, W]: value and step to the next column (0 at the
    last), for sample_row_table."""
    v = row[0, :, 0]  # [C, W]
    step = torch.cat([v[:, 1:] - v[:, :-1], torch.zeros_like(v[:, :1])], 1)
    return torch.cat([v, step], 0)


class RowsConv2d(torch.nn.Conv2d):
    """A 3x3 convolution (padding 1, stride 1) of few output channels (the decoder's flow head,
    2), with a second form for ONNX Runtime (`rows=True` while an ONNX export traces it): the
    kernel's three rows as one 1x3 convolution of three times the outputs, whose three row
    slices are summed one row apart.
    The same sums in another order (1e-6 apart). ONNX Runtime's blocked CPU convolution pads
    the output channels to its block of 16, so 2 outputs cost as much as 16: 0.27 ms for
    32 -> 2 channels at 64x64 on the Intel Xeon (one thread), this form 0.12 ms. A subclass, so
    the weights keep their names and the exported nodes the module's scope (`/flow_out/`), which
    the INT8 policy reads."""

    def forward(self, x: torch.Tensor, rows: bool = False) -> torch.Tensor:
        # In eager PyTorch the 3x3 kernel stays: oneDNN picks its 1x3 kernel's algorithm by the
        # input's height at one thread, so a band of rows and the whole frame round apart
        # (6.8e-5), where the 3x3 one keeps a band's rows the frame's to the bit.
        if rows and torch.onnx.is_in_onnx_export():
            return self.rows_form(x)
        return super().forward(x)

    def rows_form(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size != (3, 3) or self.padding != (1, 1) or self.stride != (1, 1):
            raise ValueError("RowsConv2d's rows form is for a 3x3 convolution with padding 1")
        c = self.out_channels
        w = self.weight.permute(2, 0, 1, 3).reshape(3 * c, self.in_channels, 1, 3)
        # padded by a row too: a zero row each side of the outputs (an F.pad would export as a
        # pad computed at run time, which leaves the graph's shapes symbolic)
        y = F.conv2d(x, w, padding=(1, 1))
        # constant slice bounds, for the same reason
        out = y[:, :c, :-2] + y[:, c : 2 * c, 1:-1] + y[:, 2 * c :, 2:]
        return out if self.bias is None else out + self.bias.reshape(1, c, 1, 1)
