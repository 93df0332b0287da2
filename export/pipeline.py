"""The export pipeline: checkpoint -> one bundle for one target and precision, parity-gated.

Target specifics live in one `converters/<target>.py` each, a `Target` (converters/target.py):
convert one module, apply the precision, check the artifact, name the backend that runs parity.
Everything else (calibration, the export-only patches, skipping finished modules, parity by name,
the end-to-end stream check, the manifest with hashes, the atomic rename) is shared here.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..converters.parity import THRESHOLDS, compare_outputs, psnr
from ..converters.target import Target
from ..converters.target import target as find_target
from ..errors import EdgeTalkError
from ..models.checkpoint import default_checkpoint, load_checkpoint
from ..models.edgetalk import MODULES
from ..models.flops import module_flops
from ..models.io_spec import module_io
from ..runtime.backend import Backend
from ..runtime.backend_torch import TorchBackend
from ..runtime.bundle import (
    EXTERNAL_DATA,
    MANIFEST,
    SCHEMA_VERSION,
    Bundle,
    onnx_external_data,
    sha256,
    tree_sha256,
)
from ..runtime.registry import lookup
from .calibration import pick, record_stream
from .patching import export_patches
from .speed import measure as measure_speed

E2E_FRAMES = 100
PARITY_CALLS = 6
CALIBRATION_CALLS = 64


class ExportFailed(EdgeTalkError):
    pass


@dataclass
class ModuleResult:
    name: str
    size_bytes: int = 0
    seconds: float = 0.0
    skipped: bool = False
    parity: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass
class ExportResult:
    path: Path
    ok: bool
    modules: list[ModuleResult]
    e2e: dict
    seconds: float
    manifest: dict


def default_out(cfg, target: str, precision: str) -> Path:
    return Path("bundles") / f"{cfg.name}-{target}-{precision}-c{cfg.chunk}"


def export_bundle(
    target: str,
    precision: str,
    checkpoint: str | Path | None = None,
    chunk: int | None = None,
    lookahead_ms: float | None = None,
    steps: int | None = None,
    window: int | None = None,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    e2e_frames: int = E2E_FRAMES,
) -> ExportResult:
    from tqdm import tqdm

    tgt = find_target(target)  # unknown or unusable here: one clear line
    if precision not in tgt.precisions:
        raise EdgeTalkError(
            f"unknown precision {precision!r}; choose from {', '.join(tgt.precisions)}"
        )
    t_start = time.time()
    ck_path = Path(checkpoint) if checkpoint else default_checkpoint()
    model, meta = load_checkpoint(ck_path)
    try:
        cfg = model.cfg.with_streaming(
            chunk=chunk, lookahead_ms=lookahead_ms, steps=steps, window=window
        )
    except ValueError as e:
        raise EdgeTalkError(str(e)) from None
    model = model.for_streaming(cfg)
    io = module_io(cfg)
    out = Path(out) if out else default_out(cfg, target, precision)
    _check_out(out, force)
    work = out.with_name(out.name + ".partial")
    if force:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    key = _export_key(ck_path, cfg, tgt, precision)

    torch_backend = TorchBackend(model, cfg)
    recording = record_stream(torch_backend).calls
    # recorded per module: a runtime sizes each module's thread pool by its work (a call of a
    # few dozen MFLOP runs faster on one thread; backend_onnxruntime.module_threads)
    flops = module_flops(model)
    files: dict[str, str] = {}
    results: list[ModuleResult] = []
    extra = tgt.extra_parts(cfg)  # part -> the module it serves a share of (its recording)
    for part in (*MODULES, *extra):
        module = extra.get(part, part)
        fname = f"{part}{tgt.suffix}"
        dst = work / fname
        res = ModuleResult(part)
        t0 = time.time()
        reused = _reuse(part, fname, key, work, out, force)
        with tqdm(
            total=3,
            desc=f"{part:<10}",
            disable=None if progress else True,
            leave=True,
            bar_format="{desc} {bar} {n_fmt}/{total_fmt} {postfix}",
        ) as bar:
            if reused:
                tgt.check_reused(part, reused)
                res.skipped = True
                res.info = reused
                bar.set_postfix_str("exists, skipped")
                bar.update(3)
            else:
                _remove(dst)
                src = work / f"{part}.fp32{tgt.suffix}"
                _remove(src)
                bar.set_postfix_str("tracing")
                with export_patches(model, tgt) as patched:
                    tgt.convert(patched, part, io[module], src, recording[module][0])
                bar.update(1)
                bar.set_postfix_str(f"{precision}")
                calibration = pick(recording[module], CALIBRATION_CALLS)
                res.info = tgt.apply_precision(precision, src, dst, calibration) or {}
                if src.exists() and src != dst:
                    bar.set_postfix_str(f"timing {precision} against fp32")
                    speed = measure_speed(tgt, src, dst, recording[module][0])
                    if speed is not None:
                        res.info["speed"] = speed
                    _remove(src)
                bar.update(1)
                bar.set_postfix_str("checks")
                res.info.update(tgt.checks(dst, io[module], precision) or {})
                if part in flops:
                    res.info["flops_per_call"] = flops[part]
                (work / f".{part}.key").write_text(json.dumps({"key": key, "info": res.info}))
                bar.update(1)
        files[part] = fname
        res.size_bytes = _size(dst)
        res.seconds = time.time() - t0
        results.append(res)

    aids = tgt.runtime_aids(work, files)  # may add files (stored graph parts)
    draft = Bundle(work, aids, cfg, target, precision, io, files)
    candidate = parity_backend(tgt, draft)
    e2e: dict
    if isinstance(candidate, str):
        for r in results:
            r.parity = {"status": f"not run: {candidate}"}
        e2e = {"status": f"not run: {candidate}"}
    else:
        for r in results:
            module = extra.get(r.name, r.name)
            calls = pick(recording[module], PARITY_CALLS)
            ref = [torch_backend.run(module, c) for c in calls]
            if r.name in extra:  # a share of the module's outputs, from its own graph
                ref = [tgt.part_share(r.name, x) for x in ref]
                got = [candidate.run_part(r.name, c) for c in calls]
            else:
                got = [candidate.run(r.name, c) for c in calls]
            r.parity = compare_outputs(ref, got, precision)
        e2e = end_to_end(torch_backend, candidate, precision, e2e_frames)

    ok = all(r.parity.get("status") != "fail" for r in results) and e2e.get("status") != "fail"
    if not ok:
        # A module that failed its gate is never reused by the next run; when only the stream
        # failed, no single module is to blame, so every module is rebuilt.
        failed = [r.name for r in results if r.parity.get("status") == "fail"] or [
            r.name for r in results
        ]
        for part in failed:
            (work / f".{part}.key").unlink(missing_ok=True)
    # each graph's contract: a module's, or an extra graph's own
    ios = {**io, **{part: tgt.graph_io(part, io[module]) for part, module in extra.items()}}
    manifest = (
        _manifest(
            cfg,
            tgt,
            precision,
            files,
            work,
            results,
            e2e,
            meta,
            ck_path,
            time.time() - t_start,
            ios,
        )
        | aids
    )
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    if ok:
        for f in work.glob(".*.key"):
            f.unlink()
        _replace_out(work, out)
    result_path = out if ok else work
    return ExportResult(result_path, ok, results, e2e, time.time() - t_start, manifest)


def parity_backend(tgt: Target, draft: Bundle) -> Backend | str:
    """The backend the target names, opened on the draft bundle; or why it cannot run here
    (Core ML off macOS, TensorRT without a GPU), which the manifest records as "not run"."""
    cls, ok, why = lookup(tgt.parity_backend)
    if not ok:
        return why
    return cls.from_bundle(draft)


def _check_out(out: Path, force: bool) -> None:
    """--out is a new or empty folder, or a bundle (it has a manifest.json). A folder holding
    anything else is the user's: refused unless --force, and even then moved aside, never deleted."""
    if out.exists() and not out.is_dir():
        raise ExportFailed(f"--out {out} is a file, not a folder")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()) and not force:
        raise ExportFailed(
            f"--out {out} is not empty and not a bundle (it has no {MANIFEST}); export would "
            "replace it. Choose a new folder, or pass --force (its contents are then moved "
            f"aside to {out.name}.old-*, not deleted)"
        )


def _replace_out(work: Path, out: Path) -> None:
    """Move the finished bundle to `out`. Of what was there, only the files the previous export
    wrote (those its manifest names) are deleted; anything else is kept, moved aside."""
    if not out.exists():
        work.rename(out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))  # a fresh name
    old = aside / out.name
    out.rename(old)
    work.rename(out)
    try:
        prev = json.loads((old / MANIFEST).read_text()) if (old / MANIFEST).is_file() else {}
        names = {MANIFEST, *prev.get("files", {}).values(), *prev.get("sha256", {})}
    except (ValueError, TypeError, AttributeError, OSError):
        names = set()
    for name in names:
        safe = isinstance(name, str) and name and not Path(name).is_absolute()
        if safe and ".." not in Path(name).parts and not (old / name).is_symlink():
            _remove(old / name)
    for d in sorted((p for p in old.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()  # only empty folders go
    if not any(old.iterdir()):
        shutil.rmtree(aside)
    else:
        print(f"export: what was in {out} and not written by an export is kept in {old}")


def end_to_end(reference: Backend, candidate: Backend, precision: str, frames: int) -> dict:
    """Stream the same audio through both backends with the same seed; score the frames."""
    from ..runtime.audio_io import default_speech, read_audio
    from ..runtime.avatar import prepare_avatar
    from ..runtime.scheduler import StreamScheduler

    avatar = prepare_avatar(None, reference.cfg.render.resolution)
    pcm = read_audio(default_speech()).pcm[: frames * 640]
    videos = []
    for backend in (reference, candidate):
        sched = StreamScheduler(backend, avatar, seed=1234)
        got = sched.push_audio(pcm) + sched.flush()
        videos.append(np.stack([f.rgb for f in got[:frames]]).astype(np.float32) / 255.0)
    ref, cand = videos
    per_frame = [psnr(a, b) for a, b in zip(ref, cand, strict=True)]
    value = psnr(ref, cand)
    th = THRESHOLDS[precision]["e2e_psnr_db"]
    return {
        "frames": len(per_frame),
        "psnr_db": 999.0 if math.isinf(value) else round(value, 3),
        "min_frame_psnr_db": round(min(min(per_frame), 999.0), 3),
        "threshold_db": th,
        "status": "pass" if value >= th else "fail",
    }


def _export_key(ck: Path, cfg, tgt: Target, precision: str) -> str:
    h = hashlib.sha256()
    # The target's own source is part of the key (with the targets it builds on: tensorrt's
    # graphs are onnx's): a changed recipe (a precision policy, an op kept float) never reuses
    # modules made by the old one.
    sources = [
        sha256(Path(inspect.getfile(c)))
        for c in type(tgt).__mro__
        if issubclass(c, Target) and c is not Target
    ]
    # So are the traced model code and any package the target's artifacts depend on (the MLX
    # port decides which layers an int8 file quantizes).
    for package in ("edgetalk.models", *tgt.recipe_packages):
        folder = Path(importlib.import_module(package).__file__).parent
        sources += [sha256(f) for f in sorted(folder.glob("*.py"))]
    for part in (sha256(ck), cfg.to_json(), tgt.name, precision, __version__, *sources):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _reuse(part: str, fname: str, key: str, work: Path, out: Path, force: bool) -> dict | None:
    """An artifact already made with the same checkpoint, config, target and precision."""
    if force:
        return None
    marker = work / f".{part}.key"
    if marker.exists() and (work / fname).exists():
        rec = json.loads(marker.read_text())
        if rec.get("key") == key:
            return rec.get("info", {})
    mf = out / MANIFEST
    if mf.exists() and (out / fname).exists():
        try:
            prev = json.loads(mf.read_text())
        except json.JSONDecodeError:
            return None
        if prev.get("export_key") == key and tree_sha256(out / fname) == prev["sha256"].get(fname):
            _remove(work / fname)
            if (out / fname).is_dir():
                shutil.copytree(out / fname, work / fname)
            else:
                shutil.copy2(out / fname, work / fname)
            info = prev.get("modules", {}).get(part, {}).get("info", {})
            marker.write_text(json.dumps({"key": key, "info": info}))
            return info or {"reused": True}
    return None


def _manifest(cfg, tgt, precision, files, work, results, e2e, meta, ck_path, seconds, ios):
    return {
        "schema_version": SCHEMA_VERSION,
        "edgetalk_version": __version__,
        "export_key": _export_key(ck_path, cfg, tgt, precision),
        "target": tgt.name,
        "precision": precision,
        "config": cfg.to_dict(),
        "streaming": {
            "chunk": cfg.chunk,
            "lookahead_samples": cfg.lookahead_samples,
            "lookahead_ms": cfg.lookahead_ms,
            "cache_slots": cfg.cache_slots,
            "sink": cfg.sink,
            "window": cfg.generator.window,
            "max_position": cfg.max_position,
            "steps": cfg.generator.steps,
        },
        "checkpoint": {
            "file": ck_path.name,
            "sha256": sha256(ck_path),
            "trained": meta.get("trained"),
        },
        "modules": {
            r.name: {"io": ios[r.name].to_dict(), "info": r.info, "bytes": r.size_bytes}
            for r in results
        },
        "parity": {r.name: r.parity for r in results} | {"end_to_end": e2e},
        "thresholds": THRESHOLDS[precision],
        "files": files,
        "sha256": {f: tree_sha256(work / f) for f in files.values()},
        EXTERNAL_DATA: {
            f: onnx_external_data(work / f) for f in files.values() if f.endswith(".onnx")
        },
        "tool_versions": tgt.tool_versions(),
        "export_seconds": round(seconds, 1),
    }


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
