"""The static-shape I/O contract of every module: names, shapes and dtypes.

One source of truth for the torch backend, the exporters, the bundle manifest and the scheduler.
Batch is 1; every dimension is a fixed integer for a given config (chunk C, lookahead in samples,
window W).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import SAMPLES_PER_FRAME, ModelConfig
from .constants import READOUT_PAST
from .motion import MOUTH


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_dict(d: dict) -> TensorSpec:
        # Manifests are user files: a dimension is a JSON integer, never a float (2.5 would
        # truncate, inf would overflow) nor a bool (True would read as 1).
        shape = tuple(d["shape"])
        for x in shape:
            if not isinstance(x, int) or isinstance(x, bool) or x < 0:
                raise ValueError(f"tensor {d['name']!r} has a dimension {x!r}: not an integer >= 0")
        return TensorSpec(str(d["name"]), shape, str(d["dtype"]))


@dataclass(frozen=True)
class ModuleIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @staticmethod
    def from_dict(d: dict) -> ModuleIO:
        return ModuleIO(
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
        )

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def module_io(cfg: ModelConfig) -> dict[str, ModuleIO]:
    a, g, r = cfg.audio, cfg.generator, cfg.render
    c, p = cfg.chunk, cfg.motion_dim
    res, feat = r.resolution, r.resolution // 4
    kv = (g.layers, 1, g.heads, cfg.cache_slots, cfg.head_dim)
    new_kv = (g.layers, 1, g.heads, c, cfg.head_dim)
    T = TensorSpec
    # the running log-mel mean and its weight (own, partner); only encoders that normalize have it
    mel_state = (T("mel_state", (1, 2, a.n_mels + 1)),) if a.mel_norm_s else ()
    # the mouth readout's state (models/mouth_readout.py), where the config has one
    hops = SAMPLES_PER_FRAME // a.hop
    readout_state = (
        (
            T("readout_norm", (1, a.n_mels + 1)),
            T("readout_hist", (1, READOUT_PAST * hops, a.n_mels)),
        )
        if a.readout_mix
        else ()
    )
    readout_out = (
        (T("mouth", (1, c, len(MOUTH))), T("mouth_weight", (1, c))) if a.readout_mix else ()
    )
    # the decoder's photo-only work (Decoder.prepare), made once per avatar by the appearance
    # stage and passed to every decoder call unchanged
    photo = (
        T("dec_proj", (1, r.hidden, feat, feat)),
        T("dec_basis", (1, 3 * p, feat, feat)),
        T("dec_lips", (1, 3, 1, feat)),
    )
    return {
        "appearance": ModuleIO(
            (T("image", (1, 3, res, res)),),
            (
                T("app_feat", (1, r.app_channels, feat, feat)),
                T("ref_motion", (1, p)),
                *photo,
            ),
        ),
        "audio": ModuleIO(
            (
                T("pcm", (1, 2, cfg.chunk_samples)),  # C*640 + lookahead_samples
                T("talk_mask", (1, c)),
                T("pcm_state", (1, 2, a.n_fft - a.hop)),
                T("conv_state", (a.conv_layers, 2, a.hidden, a.kernel - 1)),
                *mel_state,
                *readout_state,
            ),
            (
                T("audio_tokens", (1, c, a.token_dim)),
                T("pcm_state_out", (1, 2, a.n_fft - a.hop)),
                T("conv_state_out", (a.conv_layers, 2, a.hidden, a.kernel - 1)),
                *(T(f"{t.name}_out", t.shape) for t in mel_state),
                *readout_out,
                *(T(f"{t.name}_out", t.shape) for t in readout_state),
            ),
        ),
        "generator": ModuleIO(
            (
                T("audio_tokens", (1, c, a.token_dim)),
                T("talk_mask", (1, c)),
                T("ref_motion", (1, p)),
                T("prev_motion", (1, p)),
                T("noise", (1, c, p)),
                T("k_cache", kv),
                T("v_cache", kv),
                T("cache_valid", (1, cfg.cache_slots)),
                T("cache_pos", (1, cfg.cache_slots)),
                T("query_pos", (1, c)),
            ),
            (T("motion", (1, c, p)), T("new_k", new_kv), T("new_v", new_kv)),
        ),
        "decoder": ModuleIO(
            (
                T("app_feat", (1, r.app_channels, feat, feat)),
                T("image", (1, 3, res, res)),
                T("motion", (1, c, p)),
                *photo,
            ),
            (T("frames", (c, res, res, 3)),),
        ),
    }


def per_avatar_inputs(io: dict[str, ModuleIO]) -> tuple[str, ...]:
    """The decoder's inputs that stay the same for the whole stream: everything but the motion
    (the photo, and what the appearance stage made from it)."""
    return tuple(n for n in io["decoder"].input_names if n != "motion")


def per_avatar_feed(io: dict[str, ModuleIO], image, appearance: dict) -> dict:
    """The decoder's per-avatar inputs by name: the photo, and the appearance stage's outputs."""
    return {n: image if n == "image" else appearance[n] for n in per_avatar_inputs(io)}


def decoder_per_frame(spec: ModuleIO) -> ModuleIO:
    """The decoder's contract for one frame: motion [1, 1, P] in, frames [1, R, R, 3] out, the
    photo inputs unchanged. ONNX bundles hold the decoder in this form for every chunk size and
    their backends run it frame by frame, in parallel where they have threads (converters/onnx.py,
    PER_FRAME_DECODER); the scheduler still sees the chunk's contract."""

    def one(t: TensorSpec) -> TensorSpec:
        if t.name == "motion":
            return TensorSpec(t.name, (t.shape[0], 1, *t.shape[2:]), t.dtype)
        if t.name == "frames":
            return TensorSpec(t.name, (1, *t.shape[1:]), t.dtype)
        return t

    return ModuleIO(tuple(map(one, spec.inputs)), tuple(map(one, spec.outputs)))


# A chunk-1 ONNX bundle also holds its one frame in this many row bands, one graph each
# (converters/onnx.py): two one-thread sessions render a frame side by side, where the frame
# workers of a longer chunk split its frames.
DECODER_BANDS = 2


def band_part(band: int) -> str:
    """The bundle role (and file stem) of the decoder graph for row band `band`."""
    return f"decoder_band{band}"


def band_index(part: str) -> int:
    """The band of a band_part name."""
    prefix = band_part(0)[:-1]
    if not part.startswith(prefix) or not part[len(prefix) :].isdigit():
        raise ValueError(f"{part!r} is not a decoder band")
    return int(part[len(prefix) :])


def band_span(res: int, band: int, bands: int = DECODER_BANDS) -> tuple[int, int]:
    """Output rows [r0, r1) of row band `band` of `bands` in an R-row frame."""
    return res * band // bands, res * (band + 1) // bands


def decoder_band(spec: ModuleIO, band: int, bands: int = DECODER_BANDS) -> ModuleIO:
    """One frame's decoder contract (decoder_per_frame) for the rows of one band: frames
    [1, r1 - r0, R, 3]; the inputs are the whole frame's."""
    one = decoder_per_frame(spec)
    (frames,) = one.outputs
    r0, r1 = band_span(frames.shape[1], band, bands)
    out = TensorSpec(frames.name, (1, r1 - r0, *frames.shape[2:]), frames.dtype)
    return ModuleIO(one.inputs, (out,))


def frames_per_call(spec: ModuleIO) -> int:
    """Frames one call of a decoder graph with this contract renders."""
    return next(t.shape[1] for t in spec.inputs if t.name == "motion")


def zeros_for(spec: ModuleIO) -> dict[str, np.ndarray]:
    return {t.name: np.zeros(t.shape, dtype=t.dtype) for t in spec.inputs}


def check_inputs(module: str, spec: ModuleIO, inputs: dict[str, np.ndarray]) -> None:
    """Raise ValueError naming the first input that is missing, has the wrong shape, or has a
    dtype that does not cast to the contract's: backends cast real numbers (float64, ints) to
    float32, and refuse complex numbers, strings and objects here rather than mid-graph."""
    for t in spec.inputs:
        if t.name not in inputs:
            raise ValueError(
                f"{module}: missing input {t.name!r} (it takes {', '.join(spec.input_names)})"
            )
        arr = np.asarray(inputs[t.name])
        if tuple(arr.shape) != t.shape or not np.can_cast(arr.dtype, t.dtype, "same_kind"):
            raise ValueError(
                f"{module}: input {t.name!r} is {arr.dtype}{list(arr.shape)}, "
                f"the contract says {t.dtype}{list(t.shape)}"
            )
