"""Model configuration: every size is a value here, never a constant in the modules."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..errors import SettingError
from .motion import MOTION_DIM

SAMPLE_RATE = 16_000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
LOOKAHEAD_MS = 60
MS_SAMPLES = SAMPLE_RATE // 1000  # 16 samples per millisecond
MAX_SIZE = 1 << 16  # no size in a config goes beyond this (configs are read from user files)
# Streaming settings a user may choose (run/export/eval/bench flags). Past these a call is
# seconds of media at once or a cache no model was trained near, and the attention tables grow
# with their square: refused, not attempted.
MAX_CHUNK = 64  # frames per generator call: 2.56 s
MAX_WINDOW = 256  # cached frames: 10 s
MAX_STEPS = 64  # Euler steps of the sampler
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class AudioConfig:
    n_fft: int = 400  # 25 ms window
    hop: int = 160  # 10 ms hop: 4 mel frames per video frame
    n_mels: int = 40
    hidden: int = 96
    conv_layers: int = 4
    kernel: int = 5  # causal temporal kernel over video frames
    token_dim: int = 64
    # Audio after a frame's end that its token may use, in samples: 60 ms is 960, i.e. one whole
    # frame and the first half of the next. A multiple of the hop (a mel frame ends on each hop);
    # checkpoints from before stored `lookahead` in whole frames (80 ms = 2), read as 1280.
    lookahead_samples: int = LOOKAHEAD_MS * MS_SAMPLES
    # Running mean of the log-mel, subtracted before the encoder (cepstral mean normalization):
    # its time constant in seconds, 0 = off. It removes what a microphone, a room and a voice add
    # to every frame alike; on real held-out speakers it is what lets a mouth generalise.
    # Configs written before it existed have no such field and are read as 0 (their weights
    # were trained on raw log-mels).
    mel_norm_s: float = 2.0
    # How much the mouth readout (models/mouth_readout.py: a linear map from normalized log-mels
    # to the mouth, fitted to real video) leads the shown mouth in speech, 0..1; 0 = no readout
    # (no weights, no state: every config written before it).
    readout_mix: float = 0.0


@dataclass(frozen=True)
class GeneratorConfig:
    dim: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    steps: int = 3  # Euler steps of the flow-matching sampler (N)
    window: int = 8  # rolling window of cached frames (W)
    rope_base: float = 1000.0


REFINE_OUT_CHANNELS = 6  # decoder refinement outputs per pixel: rgb, alpha logit, flow (x, y)


@dataclass(frozen=True)
class RenderConfig:
    resolution: int = 256
    app_channels: int = 32  # appearance features at resolution/4
    hidden: int = 32  # decoder hidden channels at resolution/4
    flow_blocks: int = 3
    refine_channels: int = 8  # channels at resolution/2 in the refinement head


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    motion_dim: int = MOTION_DIM
    chunk: int = 4  # C: frames per generator call
    audio: AudioConfig = field(default_factory=AudioConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    render: RenderConfig = field(default_factory=RenderConfig)

    # Derived streaming sizes (the static-shape contract).
    @property
    def lookahead_samples(self) -> int:
        return self.audio.lookahead_samples

    @property
    def lookahead_ms(self) -> float:
        return self.audio.lookahead_samples / MS_SAMPLES

    @property
    def chunk_samples(self) -> int:
        """PCM one audio call takes: the chunk's C frames and the lookahead after them."""
        return self.chunk * SAMPLES_PER_FRAME + self.lookahead_samples

    @property
    def sink(self) -> int:
        """Cached slots that are never evicted: the first chunk (the reference is an input)."""
        return self.chunk

    @property
    def cache_slots(self) -> int:
        """S = sink + window."""
        return self.sink + self.generator.window

    @property
    def max_position(self) -> int:
        """D: RAPR cap on positions. W + 2C keeps window slots clear of the sink's positions."""
        return self.generator.window + 2 * self.chunk

    @property
    def head_dim(self) -> int:
        return self.generator.dim // self.generator.heads

    def with_streaming(
        self,
        chunk: int | None = None,
        lookahead_ms: float | None = None,
        steps: int | None = None,
        window: int | None = None,
    ) -> ModelConfig:
        """A copy with other streaming settings (export/run flags). Weights do not depend on C or W.

        lookahead_ms is only checked: the lookahead is part of the audio encoder's weights."""
        cfg = self
        if chunk is not None:
            _check_positive("chunk", chunk, MAX_CHUNK)
            cfg = dataclasses.replace(cfg, chunk=chunk)
        if lookahead_ms is not None and lookahead_ms != cfg.lookahead_ms:
            raise SettingError(
                f"lookahead {lookahead_ms:g} ms does not match the trained audio encoder "
                f"({cfg.lookahead_ms:g} ms); the lookahead is part of the weights"
            )
        if steps is not None:
            _check_positive("steps", steps, MAX_STEPS)
            cfg = dataclasses.replace(
                cfg, generator=dataclasses.replace(cfg.generator, steps=steps)
            )
        if window is not None:
            _check_positive("window", window, MAX_WINDOW)
            cfg = dataclasses.replace(
                cfg, generator=dataclasses.replace(cfg.generator, window=window)
            )
        return cfg

    def architecture(self) -> ModelConfig:
        """This config with the streaming settings reset: equal for configs that share weights."""
        base = dataclasses.replace(self, chunk=1)
        return dataclasses.replace(
            base, generator=dataclasses.replace(base.generator, steps=1, window=1)
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> ModelConfig:
        d = dict(d)
        try:
            cfg = ModelConfig(
                name=d["name"],
                motion_dim=d["motion_dim"],
                chunk=d["chunk"],
                audio=AudioConfig(**_audio_fields(d["audio"])),
                generator=GeneratorConfig(**d["generator"]),
                render=RenderConfig(**d["render"]),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not an EdgeTalk model config: {e}") from e
        return cfg.validate()

    def validate(self) -> ModelConfig:
        """Check the types and ranges of every size (configs come from files users pass in): a
        wrong one would otherwise fail deep inside a model, or allocate without bound."""
        if not isinstance(self.name, str):
            raise ValueError(f"config name must be a string, got {self.name!r}")
        if self.motion_dim != MOTION_DIM:
            raise ValueError(f"motion_dim must be {MOTION_DIM}, got {self.motion_dim!r}")
        for part in (self, self.audio, self.generator, self.render):
            for f in dataclasses.fields(part):
                v = getattr(part, f.name)
                if f.type in ("int", int):
                    low = 0 if f.name == "lookahead_samples" else 1
                    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= MAX_SIZE:
                        raise ValueError(
                            f"{f.name} must be an integer in {low}..{MAX_SIZE}, got {v!r}"
                        )
                elif f.name == "readout_mix":
                    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v <= 1:
                        raise ValueError(f"readout_mix must be 0 (off) to 1, got {v!r}")
                elif f.name == "mel_norm_s":
                    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v <= 600:
                        raise ValueError(f"mel_norm_s must be 0 (off) to 600 seconds, got {v!r}")
                elif f.type in ("float", float) and (
                    not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v < 1e9
                ):
                    raise ValueError(f"{f.name} must be a positive number, got {v!r}")
        g, r, a = self.generator, self.render, self.audio
        if g.dim % g.heads or r.resolution % 4 or a.hop > a.n_fft or SAMPLES_PER_FRAME % a.hop:
            raise ValueError(
                "inconsistent config: dim % heads, resolution % 4, hop > n_fft or 640 % hop"
            )
        if a.lookahead_samples % a.hop:
            raise ValueError(
                f"lookahead_samples must be a multiple of the hop ({a.hop}), "
                f"got {a.lookahead_samples}"
            )
        return self


def _audio_fields(d: dict) -> dict:
    """Audio config fields; a config written before the lookahead was counted in samples has
    `lookahead` in whole video frames (tiny: 2 = 80 ms), which is the same encoder; one written
    before the running mel normalization has no `mel_norm_s`, and its encoder had none."""
    d = dict(d)
    d.setdefault("mel_norm_s", 0.0)  # written before the running mel normalization existed
    if "lookahead" in d:
        if "lookahead_samples" in d:
            raise ValueError("audio config has both lookahead (frames) and lookahead_samples")
        frames = d.pop("lookahead")
        if not isinstance(frames, int) or isinstance(frames, bool) or not 0 <= frames <= 64:
            raise ValueError(f"lookahead must be a number of frames in 0..64, got {frames!r}")
        d["lookahead_samples"] = frames * SAMPLES_PER_FRAME
    return d


def _check_positive(name: str, v: int, most: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= most:
        raise SettingError(f"{name} must be a whole number in 1..{most}, got {v!r}")


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    # Paper scale, for GPU speed benchmarks (random weights are fine there).
    "large": ModelConfig(
        name="large",
        chunk=4,
        audio=AudioConfig(n_mels=80, hidden=384, conv_layers=6, token_dim=256),
        generator=GeneratorConfig(dim=768, layers=12, heads=12, window=16),
        render=RenderConfig(
            resolution=512, app_channels=64, hidden=128, flow_blocks=4, refine_channels=32
        ),
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
