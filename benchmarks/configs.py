"""Which configurations (backend x precision x chunk) one `bench` run measures, and how to open each.

Nothing is loaded here: every configuration carries an `opener` that builds its backend right
before it is measured, so only one model is in memory at a time. Torch eager fp32 at the same
streaming config is added as the speedup reference wherever the user did not ask for it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BackendUnavailable, BundleError, EdgeTalkError, InputError
from ..models.config import MAX_CHUNK, ModelConfig
from ..runtime.backend import Backend

TORCH_PRECISIONS = ("fp32", "bf16")
SKIP_DIRS = (".partial", ".old")


@dataclass
class Config:
    label: str
    backend: str  # the backend that will run it
    target: str  # "torch" for checkpoints, else the bundle's target
    precision: str
    cfg: ModelConfig  # the streaming config it runs (its reference key)
    source: str
    size_bytes: int
    opener: Callable[[], Backend] = field(repr=False)
    reference: bool = False
    chunk_fixed: bool = False
    note: str | None = None

    @property
    def key(self) -> str:
        return self.cfg.to_json()


@dataclass
class Request:
    bundles: list[Path] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)
    preset: str | None = None
    checkpoint: Path | None = None
    chunks: list[int] | None = None
    cache_dir: Path = Path("bundles/bench")
    bundles_root: Path = Path("bundles")
    seed: int = 0
    threads: int | None = None


@dataclass
class Plan:
    configs: list[Config]
    skipped: list[dict]
    notes: list[str]


# ---- where the torch weights come from --------------------------------------------------------
class ModelSource:
    """A checkpoint file, or a preset with seeded random weights (fine for speed)."""

    def __init__(
        self,
        checkpoint: Path | None = None,
        preset: str | None = None,
        seed: int = 0,
        cache_dir: Path = Path("bundles/bench"),
    ):
        import json as _json

        from ..models.checkpoint import default_checkpoint, read_metadata
        from ..models.config import preset as get_preset

        if checkpoint is not None and preset is not None:
            raise InputError("give --checkpoint or --preset, not both")
        self.seed = seed
        self.cache_dir = Path(cache_dir)
        self.preset = preset
        if preset is not None:
            try:
                self.cfg = get_preset(preset)
            except ValueError as e:
                raise InputError(str(e)) from None
            self.path: Path | None = None
            self.description = f"preset {preset} (random weights, seed {seed})"
        else:
            self.path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
            meta = read_metadata(self.path)  # InputError / BundleError with a clear message
            try:
                self.cfg = ModelConfig.from_dict(_json.loads(meta["config"]))
            except (KeyError, ValueError) as e:
                raise BundleError(
                    f"{self.path}: bad model config in the checkpoint ({e})"
                ) from None
            self.description = str(self.path)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path is not None and self.path.exists() else 0

    def model(self):
        if self.path is not None:
            from ..models.checkpoint import load_checkpoint

            return load_checkpoint(self.path)[0]
        return random_model(self.cfg, self.seed)

    def checkpoint_path(self) -> Path:
        """A file other backends and the exporter can read (written once for a preset)."""
        if self.path is not None:
            return self.path
        from ..models.checkpoint import save_checkpoint

        path = self.cache_dir / "_weights" / f"{self.cfg.name}-random-seed{self.seed}.safetensors"
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            save_checkpoint(random_model(self.cfg, self.seed), tmp, trained="no (random, bench)")
            tmp.rename(path)
        return path

    def matches(self, cfg: ModelConfig) -> bool:
        """Same architecture as cfg (streaming settings aside)."""
        return streaming_like(self.cfg, cfg) == cfg


def random_model(cfg: ModelConfig, seed: int):
    import torch

    from ..models.edgetalk import EdgeTalkModel

    torch.manual_seed(seed)
    return EdgeTalkModel(cfg).eval()


def streaming_like(base: ModelConfig, cfg: ModelConfig) -> ModelConfig:
    return base.with_streaming(
        chunk=cfg.chunk, steps=cfg.generator.steps, window=cfg.generator.window
    )


# ---- openers ------------------------------------------------------------------------------------
def torch_opener(make_model: Callable, cfg: ModelConfig, precision: str) -> Callable[[], Backend]:
    def open_() -> Backend:
        from ..runtime.backend_torch import TorchBackend

        return TorchBackend(make_model(), cfg, precision)

    return open_


def checkpoint_opener(
    source: ModelSource, name: str, chunk: int, precision: str = "fp32"
) -> Callable[[], Backend]:
    def open_() -> Backend:
        from ..runtime.loader import open_backend
        from ..runtime.registry import backend_class

        if precision == "fp32":
            return open_backend(checkpoint=source.checkpoint_path(), backend=name, chunk=chunk)
        # e.g. cuda:fp16, the CUDA fast path
        return backend_class(name).from_checkpoint(
            source.checkpoint_path(), chunk=chunk, precision=precision
        )

    return open_


def bundle_opener(cls: type[Backend], path: Path, threads: int | None) -> Callable[[], Backend]:
    def open_() -> Backend:
        import inspect

        from ..runtime.bundle import open_bundle
        from ..runtime.threads import resolve

        bundle = open_bundle(path)
        if "threads" in inspect.signature(cls.__init__).parameters:  # None: bench's current
            return cls(bundle, threads=resolve(threads))
        return cls.from_bundle(bundle)

    return open_


# ---- parsing ------------------------------------------------------------------------------------
def parse_chunks(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            c = int(part)
        except ValueError:
            raise InputError(f"--chunk takes whole numbers like 1,4,24; got {text!r}") from None
        if not 1 <= c <= MAX_CHUNK:
            raise InputError(f"--chunk values must be 1..{MAX_CHUNK}; got {c}")
        if c not in out:
            out.append(c)
    if not out:
        raise InputError("--chunk is empty")
    return out


def split_spec(spec: str, what: str) -> tuple[str, str | None]:
    name, _, precision = spec.partition(":")
    if not name or (precision == "" and ":" in spec):
        raise InputError(f"bad {what} {spec!r}; write NAME or NAME:PRECISION")
    return name.strip(), (precision.strip() or None)


# ---- bundles ------------------------------------------------------------------------------------
def bundle_dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def discover_bundles(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for mf in sorted(root.rglob("manifest.json")):
        parts = mf.parent.relative_to(root).parts
        if any(p.endswith(SKIP_DIRS) or p.startswith("_") for p in parts):
            continue
        found.append(mf.parent)
    return found


def bundle_config(
    path: Path, threads: int | None, backends: dict[str, type[Backend]] | None = None
) -> Config:
    """A Config for a bundle, run by the backend named for its target (`backends`, from
    --backend) or else the first backend that can run its target here.

    Raises BundleError for a bad bundle and BackendUnavailable when nothing here can run it."""
    from ..runtime.bundle import open_bundle
    from ..runtime.registry import backend_for_target

    bundle = open_bundle(path)
    cls = (backends or {}).get(bundle.target) or backend_for_target(bundle.target)
    cfg = bundle.cfg
    return Config(
        label=f"{cls.name} {bundle.precision} c{cfg.chunk}",
        backend=cls.name,
        target=bundle.target,
        precision=bundle.precision,
        cfg=cfg,
        source=str(path),
        size_bytes=bundle_dir_size(path),
        opener=bundle_opener(cls, Path(path), threads),
        chunk_fixed=True,
    )


def export_is_current(out: Path, checkpoint: Path, cfg: ModelConfig, target: str, prec: str):
    """An existing bundle at `out` made from this checkpoint, config, target and precision."""
    from .. import __version__
    from ..runtime.bundle import sha256

    mf = out / "manifest.json"
    if not mf.exists():
        return False
    try:
        m = json.loads(mf.read_text())
        return (
            m.get("target") == target
            and m.get("precision") == prec
            and m.get("edgetalk_version") == __version__
            and m.get("config") == json.loads(cfg.to_json())
            and m.get("checkpoint", {}).get("sha256") == sha256(checkpoint)
        )
    except (OSError, ValueError, AttributeError):
        return False


def export_configs(
    spec: str,
    source: ModelSource,
    chunks: list[int],
    req: Request,
    plan: Plan,
    log,
    bundle_backends: dict[str, type[Backend]] | None = None,
) -> None:
    from ..converters.target import PRECISIONS, targets
    from ..export.pipeline import export_bundle

    target, precision = split_spec(spec, "--export")
    precision = precision or "fp32"
    if target not in targets():
        known = ", ".join(sorted(targets()))
        raise InputError(f"unknown export target {target!r}; choose from {known}")
    if precision not in PRECISIONS:
        raise InputError(
            f"unknown precision {precision!r} for --export {spec}; choose from "
            f"{', '.join(PRECISIONS)}"
        )
    for chunk in chunks:
        cfg = source.cfg.with_streaming(chunk=chunk)
        out = Path(req.cache_dir) / f"{cfg.name}-{target}-{precision}-c{chunk}"
        name = f"{target}:{precision} c{chunk}"
        ckpt = source.checkpoint_path()
        if export_is_current(out, ckpt, cfg, target, precision):
            log(f"export {name}: reusing {out}")
        else:
            log(f"export {name}: exporting to {out} ...")
            try:
                result = export_bundle(
                    target, precision, checkpoint=ckpt, chunk=chunk, out=out, progress=False
                )
            except EdgeTalkError as e:
                plan.skipped.append({"config": f"export {name}", "reason": str(e)})
                continue
            if not result.ok:
                plan.skipped.append(
                    {"config": f"export {name}", "reason": f"parity failed ({result.path})"}
                )
                continue
        try:
            plan.configs.append(bundle_config(out, req.threads, bundle_backends))
        except (BundleError, BackendUnavailable) as e:
            plan.skipped.append({"config": f"export {name}", "reason": str(e)})


# ---- the plan -----------------------------------------------------------------------------------
def make_plan(req: Request, log: Callable[[str], None] = print) -> Plan:
    from ..runtime.registry import lookup

    source = ModelSource(req.checkpoint, req.preset, req.seed, req.cache_dir)
    chunks = req.chunks or [source.cfg.chunk]
    plan = Plan([], [], [])
    auto = not (req.bundles or req.backends or req.exports)
    backends = ["torch"] if auto else list(req.backends)

    export_targets = {split_spec(e, "--export")[0] for e in req.exports}
    bundle_backends: dict[str, type[Backend]] = {}
    for spec in backends:
        name, precision = split_spec(spec, "--backend")
        cls, ok, why = lookup(name)
        if not ok:  # asked for by name: say why, do not measure something else instead
            raise BackendUnavailable(f"backend {name!r} cannot run here: {why}")
        if name == "torch":
            precision = precision or "fp32"
            if precision not in TORCH_PRECISIONS:
                raise InputError(
                    f"the torch backend runs {', '.join(TORCH_PRECISIONS)}, not {precision!r}"
                )
            for chunk in chunks:
                cfg = source.cfg.with_streaming(chunk=chunk)
                plan.configs.append(
                    Config(
                        label=f"torch {precision} c{chunk}",
                        backend="torch",
                        target="torch",
                        precision=precision,
                        cfg=cfg,
                        source=source.description,
                        size_bytes=source.size_bytes,
                        opener=torch_opener(source.model, cfg, precision),
                        reference=precision == "fp32",
                    )
                )
            continue
        if not hasattr(cls, "from_checkpoint"):
            mine = [t for t in cls.targets if t in export_targets]
            if mine or req.bundles:  # it runs those bundles (onnxruntime-cuda, tensorrt, ...)
                for t in cls.targets:
                    bundle_backends[t] = cls
                continue
            targets = ", ".join(f"--export {t}:fp32" for t in cls.targets) or "--bundle DIR"
            raise InputError(
                f"backend {name!r} runs exported bundles, not checkpoints; use {targets} "
                "(or --bundle DIR)"
            )
        takes = inspect.signature(cls.from_checkpoint).parameters
        if precision not in (None, "fp32") and "precision" not in takes:
            raise InputError(f"backend {name!r} runs checkpoints in fp32 only; drop :{precision}")
        precision = precision or "fp32"
        for chunk in chunks:
            cfg = source.cfg.with_streaming(chunk=chunk)
            plan.configs.append(
                Config(
                    label=f"{name} {precision} c{chunk}",
                    backend=name,
                    target="torch",
                    precision=precision,
                    cfg=cfg,
                    source=source.description,
                    size_bytes=source.size_bytes,
                    opener=checkpoint_opener(source, name, chunk, precision),
                )
            )

    for path in req.bundles:
        try:
            cfg = bundle_config(Path(path), req.threads, bundle_backends)
        except BackendUnavailable as e:
            plan.skipped.append({"config": str(path), "reason": str(e)})
            continue
        if req.chunks and cfg.cfg.chunk not in req.chunks:
            plan.notes.append(
                f"{path}: chunk is fixed at {cfg.cfg.chunk} by the bundle (--chunk does not apply)"
            )
        plan.configs.append(cfg)

    for spec in req.exports:
        export_configs(spec, source, chunks, req, plan, log, bundle_backends)
    if req.exports:  # an export that failed still leaves its torch reference to measure
        for chunk in chunks:
            if not any(c.cfg.chunk == chunk for c in plan.configs):
                cfg = source.cfg.with_streaming(chunk=chunk)
                plan.configs.append(reference_config(source, cfg, source.model, source.description))

    if auto:
        for path in discover_bundles(req.bundles_root):
            try:
                cfg = bundle_config(path, req.threads)
            except (BundleError, BackendUnavailable) as e:
                plan.skipped.append({"config": str(path), "reason": str(e)})
                continue
            if req.chunks is None or cfg.cfg.chunk in req.chunks:
                plan.configs.append(cfg)

    add_references(plan, source)
    dedupe_labels(plan.configs)
    return plan


def add_references(plan: Plan, source: ModelSource) -> None:
    """Torch eager fp32 at every streaming config in the plan, first in its group."""
    have = {c.key for c in plan.configs if c.reference}
    for c in list(plan.configs):
        if c.key in have:
            continue
        have.add(c.key)
        cfg = c.cfg
        if source.matches(cfg):
            make, where = source.model, source.description
        else:
            seed = source.seed
            make = lambda cfg=cfg, seed=seed: random_model(cfg, seed)  # noqa: E731
            where = f"random weights (seed {seed}) with the config of {c.source}"
        plan.configs.append(reference_config(source, cfg, make, where))
    order = {}
    for c in plan.configs:
        order.setdefault(c.key, len(order))
    plan.configs.sort(key=lambda c: (c.cfg.chunk, order[c.key], not c.reference))


def reference_config(source: ModelSource, cfg: ModelConfig, make: Callable, where: str) -> Config:
    return Config(
        label=f"torch fp32 c{cfg.chunk}",
        backend="torch",
        target="torch",
        precision="fp32",
        cfg=cfg,
        source=where,
        size_bytes=source.size_bytes if source.matches(cfg) else 0,
        opener=torch_opener(make, cfg, "fp32"),
        reference=True,
        note="added as the speedup reference",
    )


def dedupe_labels(configs: list[Config]) -> None:
    seen: dict[str, int] = {}
    for c in configs:
        n = seen.get(c.label, 0) + 1
        seen[c.label] = n
        if n > 1:
            c.label = f"{c.label} #{n}"
