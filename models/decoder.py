"""Warping decoder: motion vectors -> RGB frames, batched over a chunk.

The photo itself is warped at full resolution by a flow predicted at 1/4 resolution, then a small
refinement head paints what a warp cannot show (mouth interior, teeth, eyelids) and blends it in
with a predicted alpha. The flow has five parts:
- a learned global affine of the motion (head pose);
- per-parameter basis fields predicted from the photo once per avatar, weighted by the motion
  (blendshape-like: "this is how *this* face moves when the jaw opens"), for flow and alpha;
- a non-linear residual from motion-modulated features (FiLM) for what is not linear;
- a full-resolution correction from the refinement head: closing open lips collapses the teeth
  between them into a line, a jump a 1/4-resolution flow blurs over ~4 pixels of visible teeth;
- a lip-closing field for lip_press, computed from where the photo's lips are rather than learned
  as a flow: a small head finds, in each column, the upper and lower inner-lip edge (soft-argmax
  over rows) and whether the mouth is there, and the field pulls both lips to their midline by
  half the gap and a little more (pressed lips roll in). Learned flows did not close a
  laughing photo wider than the training photos (they must learn the gap's size from
  appearance); finding two edges is local, and the edges are supervised directly from the
  training photos' landmarks (training/train_lips.py trains the head on its own).
The refinement head works at 1/2 resolution and emits its outputs (colour, alpha, flow correction)
for each 2x2 block of output pixels (pixel shuffle), so none of them is bilinearly blurred.
Only 4-D grid_sample is used: 5-D warps do not run on ONNX Runtime or CoreML.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import REFINE_OUT_CHANNELS as OUT_CHANNELS
from .config import ModelConfig
from .constants import LIP_PRESS, LIP_ROLL, PRESENCE_FILL, SHARP_ROWS
from .meta import shapes_only
from .sampling import (
    RowsConv2d,
    TableSampler,
    Upsample,
    grid_sample_border,
    pixel_shuffle2,
    row_table,
    sample_columns,
    sample_row_table,
    sample_rows,
)


def pixel_centres(n: int) -> torch.Tensor:
    """[n] pixel-centre coordinates in [-1, 1] (align_corners=False)."""
    if shapes_only():
        return torch.empty(n)
    return (torch.arange(n, dtype=torch.float32) * 2 + 1) / n - 1


TAIL_PIXELS = 32768  # pixels of one band of the gather form's full-resolution tail


def tail_bands(r0: int, r1: int, width: int) -> list[tuple[int, int]]:
    """Output rows [r0, r1) of `width` pixels in bands of about TAIL_PIXELS pixels, for the
    per-pixel tail of the gather form (Decoder._render_gather): a band's tensors stay in the
    core's cache from one node to the next, where a whole frame's (0.8 MB each at 256 px) did
    not. The cuts fall on multiples of an even number of rows, where the pixel shuffle's 2x2
    blocks start; only the ends of [r0, r1) (a DecoderRows band's) may fall within a block."""
    rows = max(2, TAIL_PIXELS // width // 2 * 2)
    cuts = [r0, *(b for b in range(0, r1, rows) if r0 < b < r1), r1]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def base_grid(h: int, w: int) -> torch.Tensor:
    """Homogeneous pixel-centre coordinates in [-1, 1] (align_corners=False), [h*w, 3]."""
    if shapes_only():
        return torch.empty(h * w, 3)
    ys, xs = pixel_centres(h), pixel_centres(w)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).reshape(h * w, 3)


def lip_edges(logits: torch.Tensor, rows: torch.Tensor):
    """Per column: (upper edge y, lower edge y, mouth presence), each [B, 1, 1, w], from the lip
    head's logits [B, 3, h, w] (softmax over rows; presence from the column's strongest row, so
    a local mouth detector decides it: a column mean made the forehead vote too)."""
    up = (torch.softmax(logits[:, 0:1], dim=2) * rows).sum(dim=2, keepdim=True)
    low = (torch.softmax(logits[:, 1:2], dim=2) * rows).sum(dim=2, keepdim=True)
    present = torch.sigmoid(logits[:, 2:3].amax(dim=2, keepdim=True))
    return up, low, close_columns(present, PRESENCE_FILL)


def close_columns(x: torch.Tensor, k: int) -> torch.Tensor:
    """Morphological closing of [B, C, 1, W] along W (a max, then a min, over 2k+1 columns):
    dips narrower than that are filled, the ends of an interval stay where they are."""
    x = F.max_pool2d(x, (1, 2 * k + 1), stride=1, padding=(0, k))
    return -F.max_pool2d(-x, (1, 2 * k + 1), stride=1, padding=(0, k))


def closing_field(up, low, present, y, reach, sharp, roll=LIP_ROLL) -> torch.Tensor:
    """Vertical displacement (normalized units) that closes the lips at press 1, at photo rows y,
    for the inner-lip edges and presence of the photo column there (all broadcast together):
    rows above the midline sample from higher up, rows below from lower down, by half the gap
    at the midline plus the roll (LIP_ROLL), fading out beyond the lips (reach + half the gap).
    The sign flips within `sharp`: the teeth between the lips vanish. The field is homogeneous
    in its lengths: given every length in pixels (roll too), it is in pixels. The Gaussian's
    exponent is capped at 60 (e^-60 ~ 1e-26): past ~87 its values are denormal floats, which
    x86 computes ~20x slower, and an ONNX Runtime session of one thread runs on the caller's
    thread, where its denormals-as-zero option does not reach (0.16 ms of a 256-px frame)."""
    half = F.relu(low - up) * 0.5
    half = (half + roll * torch.tanh(half / roll)) * present
    off = y - (up + low) * 0.5
    return (
        half * torch.tanh(off / sharp) * torch.exp(-((off / (reach + half)) ** 2).clamp(max=60.0))
    )


def closing_field_mid(mid, gap, present, y, reach, sharp, roll) -> torch.Tensor:
    """closing_field for the edges mid - gap/2 and mid + gap/2, in the fewer nodes that the
    midline and gap given directly leave (the gather form's per-pixel tail, _closing_px): the
    same values to float rounding (roll and sharp are numbers: their quotients products)."""
    half = F.relu(gap) * 0.5
    half = (half + roll * torch.tanh(half * (1.0 / roll))) * present
    off = y - mid
    z = off / (reach + half)
    return half * torch.tanh(off * (1.0 / sharp)) * torch.exp(-(z * z).clamp(max=60.0))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        r = cfg.render
        p, ca, hd, rc = cfg.motion_dim, r.app_channels, r.hidden, r.refine_channels
        self.res = r.resolution
        self.feat = r.resolution // 4
        self.app_in = nn.Conv2d(ca, hd, 3, padding=1)
        self.film = nn.Linear(p, 2 * hd)
        self.blocks = nn.ModuleList(nn.Conv2d(hd, hd, 3, padding=1) for _ in range(r.flow_blocks))
        self.flow_out = RowsConv2d(hd, 2, 3, padding=1)
        self.basis = nn.Conv2d(ca, 3 * p, 3, padding=1)  # per parameter: flow (2) + alpha (1)
        self.affine = nn.Linear(p, 6)
        self.refine_in = nn.Conv2d(ca + hd, hd, 3, padding=1)
        self.refine_up = nn.Conv2d(hd, 4 * rc, 3, padding=1)
        self.refine_out = nn.Conv2d(rc, 4 * OUT_CHANNELS, 3, padding=1)
        # The lip head: logits of the upper and lower inner-lip edge per row, and of presence.
        self.lip_in = nn.Conv2d(ca, hd, 3, padding=1)
        self.lip_mid = nn.Conv2d(hd, hd, 3, padding=1)
        self.lip_out = nn.Conv2d(hd, 3, 3, padding=1)
        self.lip_reach = nn.Parameter(torch.tensor([-2.0]))  # softplus: ~0.13, lip thickness
        self.upsample = Upsample(self.feat, self.res // self.feat)  # 1/4 resolution -> full
        self.composite = Composite()  # the ONNX Runtime form's last steps (_render_gather)
        self.register_buffer("grid0", base_grid(self.feat, self.feat), persistent=False)
        self.register_buffer(
            "rows", pixel_centres(self.feat).reshape(1, 1, -1, 1), persistent=False
        )
        self.sharp = SHARP_ROWS * 2.0 / self.res  # the closing field's flip, normalized
        self.native_sampling = (
            True  # the ONNX exporter switches to the ORT form (models/sampling.py)
        )
        # Start as "show the photo": no flow, no affine change, refinement blended out.
        for m in (self.flow_out, self.affine, self.basis):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.refine_out.weight[4 * 4 :].zero_()  # no flow correction at first
            self.refine_out.bias[4 * 4 :].zero_()
            self.refine_out.bias[4 * 3 : 4 * 4] = -4.0
        self._lip_out_closed()

    def reset_lip_head(self) -> None:
        """A fresh lip head (train_lips --fresh), as a new decoder has it."""
        for m in (self.lip_in, self.lip_mid):
            m.reset_parameters()
        self._lip_out_closed()

    def _lip_out_closed(self) -> None:
        """The head's last layer at zero: its edges all on one row, so no gap, no field."""
        with torch.no_grad():
            nn.init.zeros_(self.lip_out.weight)
            nn.init.zeros_(self.lip_out.bias)
            self.lip_out.bias[2] = -3.0

    def forward(
        self,
        app_feat: torch.Tensor,  # [1, Ca, R/4, R/4]
        image: torch.Tensor,  # [1, 3, R, R] in [0, 1]
        motion: torch.Tensor,  # [1, C, P]
        dec_proj: torch.Tensor,  # [1, Hd, R/4, R/4]: prepare()'s outputs, made once per avatar
        dec_basis: torch.Tensor,  # [1, 3P, R/4, R/4]
        dec_lips: torch.Tensor,  # [1, 3, 1, R/4]
    ) -> dict[str, torch.Tensor]:
        photo = {"dec_proj": dec_proj, "dec_basis": dec_basis, "dec_lips": dec_lips}
        return {"frames": self.render(app_feat, image, motion[0], photo)}

    def prepare(self, app_feat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decoder's work that depends on the photo only: the features' projection, the
        motion bases and the lip edges. The streaming contract runs it once per avatar, in the
        appearance stage (models/edgetalk.py): at chunk 1 it was 0.35 of the decoder's 0.86
        GFLOP per call, repeated for every frame."""
        return {
            "dec_proj": self.app_in(app_feat),
            "dec_basis": self.basis(app_feat),
            "dec_lips": torch.cat(self.lips(app_feat), dim=1),
        }

    def render(
        self,
        app_feat: torch.Tensor,
        image: torch.Tensor,
        m: torch.Tensor,
        photo: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Frames [N, R, R, 3] for motions m [N, P]; app_feat/image hold 1 reference or N.
        `photo` is prepare(app_feat), made here when not given (training)."""
        photo = self.prepare(app_feat) if photo is None else photo
        if not self.native_sampling and image.shape[0] == 1:
            return self._render_gather(app_feat, image, m, photo)
        return self.render_parts(app_feat, image, m, photo)[0]

    def lip_logits(self, app_feat: torch.Tensor) -> torch.Tensor:
        """[B, 3, h, w]: upper edge, lower edge (softmax over rows) and presence logits."""
        return self.lip_out(F.gelu(self.lip_mid(F.gelu(self.lip_in(app_feat)))))

    def lips(self, app_feat: torch.Tensor):
        """The photo's inner-lip edges per column (see lip_edges): training supervises them."""
        return lip_edges(self.lip_logits(app_feat), self.rows)

    def closing(self, dec_lips, grid_full, press) -> torch.Tensor:
        """[N, R, R, 2] displacement closing the photo's lips by press [N], computed exactly
        where each output pixel looks in the photo (the grid): the edges of that photo column
        are read there (a one-row grid sample), so the field flips at the midline far within a
        pixel. A field built on a pixel grid and resampled flips over a whole row, and that row
        shows the teeth as a dotted white line between the closed lips."""
        c = grid_full.shape[0]
        # dec_lips [1 or N, 3, 1, w]: up, low, presence
        e = sample_columns(dec_lips, grid_full, self.native_sampling)  # [N, 3, R, R]
        y = grid_full[..., 1:2].permute(0, 3, 1, 2)  # [N, 1, R, R]: the photo row looked at
        reach = F.softplus(self.lip_reach)
        dy = closing_field(e[:, 0:1], e[:, 1:2], e[:, 2:3], y, reach, self.sharp)
        dy = dy * press.reshape(c, 1, 1, 1)
        # (0, dy) as a broadcast product: a concat with zeros exports as a frame-sized constant
        return dy.permute(0, 2, 3, 1) * torch.tensor([0.0, 1.0], device=dy.device)

    def band_rows(self, r0: int, r1: int) -> tuple[int, int]:
        """The 1/4-resolution rows [lo, hi) from which _render_gather computes output rows
        [r0, r1) exactly. Each 3x3 convolution on a cut-out reads one row past it (zeros there,
        where the whole picture has its neighbour), so the cut's error creeps one row inward
        per convolution: the flow blocks, flow_out, refine_in, refine_up and refine_out (one
        row at 1/2 resolution, rounded up), and the grid's upsampling reads one row further."""
        halo = len(self.blocks) + 4
        q = self.res // self.feat
        return max(0, r0 // q - halo), min(self.feat, -(-r1 // q) + halo)

    def _head(self, photo, m, lo: int = 0, hi: int | None = None):
        """What both forms share: the motion-modulated features x [N, Hd, h, w], the sampling
        grid at 1/4 resolution [N, h, w, 2] and the linear alpha [N, 1, h, w]; for rows [lo, hi)
        of it when given (band_rows)."""
        c, hw = m.shape[0], self.feat
        p = m.shape[1]
        hi = hw if hi is None else hi
        rows, cut = hi - lo, (lo, hi) != (0, hw)
        basis = photo["dec_basis"]  # [1 or N, 3P, h, w]
        proj = photo["dec_proj"]
        grid0 = self.grid0
        if cut:
            basis, proj, grid0 = basis[:, :, lo:hi], proj[:, :, lo:hi], grid0[lo * hw : hi * hw]
        if basis.shape[0] == 1:  # one reference: a single matmul mixes the bases for all frames
            lin = torch.matmul(m, basis.reshape(p, 3 * rows * hw)).reshape(c, 3, rows, hw)
        else:
            lin = (m.reshape(c, p, 1, 1, 1) * basis.reshape(c, p, 3, rows, hw)).sum(1)
        gamma, beta = self.film(m).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        x = F.gelu(proj * (1.0 + gamma) + beta)  # [N, Hd, h, w]
        for conv in self.blocks:
            x = x + F.gelu(conv(x))
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], device=m.device)
        theta = (identity + self.affine(m)).reshape(c, 2, 3)
        grid = torch.matmul(grid0, theta.transpose(1, 2)).reshape(c, rows, hw, 2)
        flow = self.flow_out(x, rows=not self.native_sampling)  # its ONNX Runtime form
        grid = grid + (flow + lin[:, :2]).permute(0, 2, 3, 1)
        return x, grid, lin[:, 2:]

    def _refine(self, wfeat, x, flow_px: float | None = None, shuffle: bool = True):
        """[N, 6, R, R]: colour logits (3), alpha logit (1), flow correction (2); without
        `shuffle`, the last convolution's output [N, 24, R/2, R/2] before its pixel shuffle.

        `flow_px` (the ONNX Runtime form): the flow correction in pixel units, its scale folded
        into the last convolution's weights and bias (a product of constants, which the export
        folds). An INT8 export quantizes that convolution with one output scale for all its
        channels: normalized, the flow (±0.04) got a few of its 256 steps and a frame fell to
        31.0 dB; in pixels it shares the logits' range and keeps 37.9 dB (38.0 float)."""
        native = self.native_sampling
        r = F.gelu(self.refine_in(torch.cat([wfeat, x], dim=1)))
        r = F.gelu(pixel_shuffle2(self.refine_up(r), native))  # [N, rc, R/2, R/2]
        if flow_px is None:
            return pixel_shuffle2(self.refine_out(r), native)
        # output channels are (value, row offset, column offset): values 4 and 5 are the flow
        flow = torch.arange(4 * OUT_CHANNELS, device=r.device) // 4 >= 4
        scale = torch.where(flow, flow_px, 1.0)
        w = self.refine_out.weight * scale.reshape(-1, 1, 1, 1)
        o = F.conv2d(r, w, self.refine_out.bias * scale, padding=1)
        return pixel_shuffle2(o, native) if shuffle else o

    def render_parts(self, app_feat, image, m, photo=None):
        """(frames [N, R, R, 3], sampling grid [N, R, R, 2], blend alpha [N, 1, R, R]): training
        supervises the grid and alpha directly where the synthetic renderer knows them."""
        c = m.shape[0]
        native = self.native_sampling
        photo = self.prepare(app_feat) if photo is None else photo
        x, grid, lin_alpha = self._head(photo, m)
        # the sampling grid and the linear alpha, upsampled together to full resolution
        full = self.upsample(torch.cat([grid.permute(0, 3, 1, 2), lin_alpha], dim=1), native)
        grid_full, alpha_lin = full[:, :2].permute(0, 2, 3, 1), full[:, 2:]
        wfeat = grid_sample_border(app_feat.expand(c, -1, -1, -1), grid, native)
        o = self._refine(wfeat, x)
        grid_full = grid_full + o[:, 4:].permute(0, 2, 3, 1)
        grid_full = grid_full + self.closing(photo["dec_lips"], grid_full, m[:, LIP_PRESS])
        warped = grid_sample_border(image.expand(c, -1, -1, -1), grid_full, native)
        alpha = torch.sigmoid(o[:, 3:4] + alpha_lin)
        frames = warped * (1.0 - alpha) + torch.sigmoid(o[:, :3]) * alpha
        return frames.permute(0, 2, 3, 1).clamp(0.0, 1.0), grid_full, alpha

    def _render_gather(self, app_feat, image, m, photo, rows: tuple[int, int] | None = None):
        """render() in the form ONNX Runtime runs fast (models/sampling.py, end): the same frames
        as render_parts to float rounding, for one reference picture. The grid is carried in
        pixel units (the upsampling is affine-equivariant: each row of its matrix sums to 1, so
        the conversion is done at 1/4 resolution), planar, and the photo is gathered from a
        neighbour table with one int32 index per output pixel.

        `rows` (r0, r1): only those output rows [N, r1 - r0, R, 3], the same values as the
        whole frame's (DecoderRows: a frame cut in bands that threads render side by side)."""
        c, res = m.shape[0], self.res
        half_res = res / 2.0
        r0, r1 = (0, res) if rows is None else rows
        lo, hi = (0, self.feat) if rows is None else self.band_rows(r0, r1)
        x, grid, lin_alpha = self._head(photo, m, lo, hi)
        g = grid.permute(0, 3, 1, 2)  # [N, 2, h, w], normalized
        # (alpha, x, y) in the order of the refinement's (alpha, flow x, flow y)
        z = torch.cat([lin_alpha, g * half_res + (half_res - 0.5)], 1)
        # the features at 1/4 resolution: rows gathered per tap. A neighbour table of the
        # features, made once per avatar (runtime/photo_split.py), was slower: ONNX Runtime
        # took 0.52 ms a frame to transpose the gathered [h*w, 4*Ca] floats back to planar
        wfeat = sample_rows(app_feat, grid)
        o = self._refine(wfeat, x, half_res, shuffle=False)  # [N, 24, 2 (hi - lo), R/2]
        # The full-resolution tail, row band by row band (tail_bands): every step from here on
        # is per pixel, and a band's tensors stay in the core's cache from one step to the next
        # where the whole frame's (0.8 MB each) did not.
        bands = tail_bands(r0, r1, res)
        full = self.upsample(z, False, bands=bands, lo=lo)
        lips = self._lip_table(photo["dec_lips"])
        press = m[:, LIP_PRESS].reshape(c, 1, 1, 1)
        half = 2 * lo  # o's first row at 1/2 resolution
        colour, alpha, xs, ys = [], [], [], []
        for (b0, b1), fb in zip(bands, full, strict=True):
            h0, h1 = b0 // 2, (b1 + 1) // 2  # the 2x2 blocks of rows [b0, b1)
            ob = pixel_shuffle2(o[:, :, h0 - half : h1 - half], False)
            if b0 % 2 or b1 % 2:  # a DecoderRows band's end within a block
                ob = ob[:, :, b0 - 2 * h0 : b1 - 2 * h0]
            s = fb + ob[:, 3:6]
            alpha_logit, xp, yp = s[:, 0:1], s[:, 1:2], s[:, 2:3]
            ys.append(yp + self._closing_px(lips, xp, yp) * press)
            xs.append(xp)
            colour.append(torch.sigmoid(ob[:, :3]))
            alpha.append(torch.sigmoid(alpha_logit))
        return self.composite(image, xs, ys, colour, alpha)

    def _lip_table(self, dec_lips):
        """The lip edges' midline, gap and presence per 1/4-resolution column, in pixels, as
        sample_row_table reads them (_closing_px)."""
        s = self.res / 2.0
        up, low, present = dec_lips[:, 0:1], dec_lips[:, 1:2], dec_lips[:, 2:3]  # normalized
        mid = (up + low) * (0.5 * s) + (s - 0.5)
        return row_table(torch.cat([mid, (low - up) * s, present], 1))

    def _closing_px(self, tab, xp, yp):
        """closing() at press 1 in pixel units, for output pixels that look at photo pixel
        (xp, yp) [N, 1, rows, R]: the field is homogeneous in its lengths, so every length
        (edges, roll, reach, the flip's width) is scaled to pixels once, per column or as a
        constant. The edges' midline, gap and presence (`tab`, _lip_table) are linear in the
        head's outputs, so they are interpolated along the row as the native form interpolates
        the outputs."""
        s = self.res / 2.0
        w = self.feat
        mid, gap, present = sample_row_table(
            tab, xp * (w / self.res) + (0.5 * w / self.res - 0.5), w
        )
        reach = F.softplus(self.lip_reach) * s
        return closing_field_mid(mid, gap, present, yp, reach, self.sharp * s, LIP_ROLL * s)


class Composite(nn.Module):
    """The gather form's last steps, per row band: the photo sampled where each pixel looks,
    blended with the refinement's colour by its alpha, clamped, as rows of RGB pixels. A module
    so that its exported nodes carry the scope `/composite/`: the exporter cuts them off the
    decoder's ONNX graph and stores the rest beside it, and the ONNX Runtime backend runs them
    fused in one compiled pass (runtime/composite.py; `cut_composite` reads each input's role
    off the graph these nodes make: a change here is a change there)."""

    def __init__(self):
        super().__init__()
        self.sampler = TableSampler()  # the photo's 8-bit neighbour table and its gather

    def forward(self, image, xs, ys, colour, alpha):
        """Frames [N, rows, R, 3] for lists of row bands' xs, ys, alpha [N, 1, rows_b, R] (pixel
        units) and colour [N, 3, rows_b, R], in row order."""
        warped = self.sampler(image, xs, ys)  # [N, 3, rows, R] each
        frames = [
            (w + (col - w) * a).permute(0, 2, 3, 1).clamp(0.0, 1.0)
            for w, col, a in zip(warped, colour, alpha, strict=True)
        ]
        return frames[0] if len(frames) == 1 else torch.cat(frames, 1)


class DecoderRows(nn.Module):
    """The decoder's contract (Decoder.forward) for output rows [r0, r1) of one frame, in the
    gather form: ONNX bundles at chunk 1 carry a frame in bands, so that two one-thread
    sessions render one frame side by side (converters/onnx.py, BAND_PARTS)."""

    def __init__(self, decoder: Decoder, r0: int, r1: int):
        super().__init__()
        self.decoder, self.r0, self.r1 = decoder, r0, r1

    def forward(self, app_feat, image, motion, dec_proj, dec_basis, dec_lips):
        if self.decoder.native_sampling or image.shape[0] != 1:
            raise ValueError("DecoderRows renders one reference picture in the gather form")
        photo = {"dec_proj": dec_proj, "dec_basis": dec_basis, "dec_lips": dec_lips}
        rows = (self.r0, self.r1)
        return {"frames": self.decoder._render_gather(app_feat, image, motion[0], photo, rows)}
