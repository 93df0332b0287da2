"""The `edgetalk bench` JSON format: one file per run on one device.

`SCHEMA` below is the documentation and the check at once. It is a plain JSON Schema (the
draft 2020-12 keywords `type`, `properties`, `required`, `items`, `additionalProperties`,
`enum`, `minimum`, `description`), so other tools can use it, and `validate()` checks a report
against it without extra dependencies. `bench report` refuses files that do not validate.

Definitions (DESIGN.md, "Time, frames and latency"). Video is 25 fps, audio 16 kHz mono; the audio
is the embedded example speech, looped or trimmed to `settings.seconds`.

- fps: frames delivered to a null sink per wall second, audio pushed as fast as it is consumed,
  end to end (audio features, generation, decoding and the uint8 conversion all count; the
  appearance encoder runs once per avatar, before the clock starts).
- first_frame_delay_ms (FFD): audio paced in real time from wall time 0 (the first sample), in
  pieces of `settings.piece_ms` pushed at the instant their last sample would have arrived, the
  scheduler running inline. FFD is the wall time at which the first frame reached the sink.
  first_frame_floor_ms = C*40 ms + lookahead_ms: the audio the first chunk needs; FFD - floor is
  compute; first_chunk_ms splits it into the first chunk's calls. Reports of schema version 1
  gave the lookahead in whole frames (`lookahead`, 2 = 80 ms); `bench report` reads them as
  lookahead_ms (report.py).
- rtf: compute time / media time in the paced run, compute time being the wall time spent inside
  the scheduler (push_audio and flush). rtf_throughput is the throughput run's wall time / media
  time (= 25 / fps).
- deadline_miss_rate: in the paced run, frame i's presentation time is (the wall time the first
  frame arrived) + i * 40 ms, i.e. a player that starts showing at the first frame and then runs at
  25 fps with no buffer. A frame is missed if it reaches the sink later than its presentation
  time. max_late_ms is the worst lateness (0 if none is late).
- modules: per call latency (ms) of each module, p50 and p95 over the throughput runs, plus the
  uint8 conversion ("convert"; 0 where the backend converts each frame as it renders it,
  Backend.decode_levels: the conversion is then in "decoder"). per_frame_p50_ms = p50 / frames
  per call (C for the streaming modules, 1 call per avatar for appearance, which is not per
  frame).
- peak_rss_mb: peak resident memory of the process while the configuration ran (Linux: VmHWM,
  reset before each configuration; elsewhere: sampled after every scheduler call).
- flops_per_frame: FLOPs counted from the model (models/flops.py) per streamed frame (audio +
  generator + decoder per chunk / C); gflops = flops_per_frame * fps / 1e9; fraction_of_peak =
  gflops / the GEMM peak measured in the same run on the device the backend runs on.
- speedup_vs_torch: fps / fps of torch eager fp32 with the same streaming config (chunk, steps,
  window) in the same run; 1.0 for that reference itself.
- speedup_spread (bench --interleave): the same ratio run by run, each throughput run over the
  reference's run interleaved with it (same repeat and round): min, median, max and every value.
  Their range is the ratio's uncertainty within the run; runs apart (no --interleave) pair
  nothing, and the field is absent.
- interleaved_with (bench --interleave): the throughput runs of every configuration with the same
  streaming config, threads and load went chunk by chunk in turn (who goes first rotates), each
  timed on its own, so a machine's drift hits them alike and their ratios hold; FFD stays one
  configuration at a time (it is real time). Peak RSS is then of all of them together.
- Each headline number is the median over settings.repeats runs (warm-up excluded), and with
  `bench --rounds N` over the repeats of all N rounds (the whole plan run N times round-robin,
  so that a drifting machine affects every row alike); `spread` holds min, max and every value.
"""

from __future__ import annotations

from typing import Any

FORMAT = "edgetalk-bench"
SCHEMA_VERSION = 2  # 2: lookahead_ms replaces lookahead (whole frames)

_NUM = {"type": "number"}
_NUM0 = {"type": "number", "minimum": 0}
_INT0 = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_OPT_NUM = {"type": ["number", "null"]}
_OPT_STR = {"type": ["string", "null"]}


def _d(schema: dict, text: str) -> dict:
    return {**schema, "description": text}


SPREAD = {
    "type": "object",
    "description": "min, max and every repeat's value of one headline metric",
    "required": ["min", "max", "values"],
    "properties": {
        "min": _NUM,
        "max": _NUM,
        "values": {"type": "array", "items": _NUM},
    },
}

LATENCY = {
    "type": "object",
    "description": "one module's per-call latency",
    "required": ["p50_ms", "p95_ms", "calls"],
    "properties": {
        "p50_ms": _d(_NUM0, "median per call, ms"),
        "p95_ms": _d(_NUM0, "95th percentile per call, ms"),
        "calls": _d(_INT0, "calls measured"),
        "per_frame_p50_ms": _d(_NUM0, "p50 divided by the frames one call makes"),
    },
}

MODULE_NAMES = ("appearance", "audio", "generator", "decoder", "convert")

RECORD = {
    "type": "object",
    "description": "one configuration (backend x precision x chunk)",
    "required": [
        "label",
        "backend",
        "target",
        "precision",
        "chunk",
        "lookahead_ms",
        "resolution",
        "steps",
        "window",
        "model",
        "source",
        "reference",
        "frames",
        "media_seconds",
        "fps",
        "first_frame_delay_ms",
        "first_frame_floor_ms",
        "rtf",
        "rtf_throughput",
        "deadline_miss_rate",
        "max_late_ms",
        "spread",
        "modules",
        "peak_rss_mb",
        "gpu_peak_mb",
        "bundle_bytes",
        "flops_per_frame",
        "flops_per_frame_modules",
        "gflops",
        "peak_device",
        "fraction_of_peak",
        "speedup_vs_torch",
        "load_seconds",
    ],
    "properties": {
        "label": _d(_STR, "short name, e.g. 'onnxruntime int8 c4'"),
        "backend": _d(_STR, "backend that ran it (torch, onnxruntime, coreml, mlx, ...)"),
        "target": _d(_STR, "what it ran: 'torch' (a checkpoint) or a bundle target"),
        "precision": _d(_STR, "fp32, fp16, bf16, int8"),
        "chunk": _d({"type": "integer", "minimum": 1}, "C, frames per generator call"),
        "lookahead_ms": _d(_NUM0, "audio the encoder hears past a frame's end, ms (60)"),
        "resolution": _d({"type": "integer", "minimum": 1}, "output frames are R x R"),
        "steps": _d({"type": "integer", "minimum": 1}, "flow-matching Euler steps N"),
        "window": _d({"type": "integer", "minimum": 1}, "rolling KV window W"),
        "model": _d(_STR, "model config name (tiny, large, ...)"),
        "source": _d(_STR, "checkpoint, preset or bundle directory it ran"),
        "reference": _d({"type": "boolean"}, "torch eager fp32: the speedup reference"),
        "chunk_fixed": _d({"type": "boolean"}, "a bundle: its chunk is fixed at export"),
        "frames": _d(_INT0, "frames per stream"),
        "media_seconds": _d(_NUM0, "frames / 25"),
        "fps": _d(_NUM0, "throughput, frames per wall second, end to end (median)"),
        "first_frame_delay_ms": _d(_NUM0, "FFD with paced audio (median)"),
        "first_frame_floor_ms": _d(_NUM0, "C*40 ms + lookahead_ms"),
        "rtf": _d(_NUM0, "paced run: compute time / media time (median)"),
        "rtf_throughput": _d(_NUM0, "throughput run: wall time / media time (median)"),
        "deadline_miss_rate": _d(
            {"type": "number", "minimum": 0, "maximum": 1},
            "paced run: share of frames later than first-frame time + i*40 ms (median)",
        ),
        "max_late_ms": _d(_NUM0, "paced run: worst lateness of a frame (median over repeats)"),
        "spread": {
            "type": "object",
            "description": "min/max/values over repeats of each headline metric",
            "required": ["fps", "first_frame_delay_ms", "rtf", "deadline_miss_rate"],
            "additionalProperties": SPREAD,
        },
        "modules": {
            "type": "object",
            "description": "per-module latency: " + ", ".join(MODULE_NAMES),
            "required": list(MODULE_NAMES),
            "additionalProperties": LATENCY,
        },
        "first_chunk_ms": {
            "type": "object",
            "description": "paced run, the chunk that gave the first frame (median over repeats): "
            "each module's call and the conversion, ms; other = FFD - floor - those (the "
            "scheduler's own code, the pacing's wake-up; negative when the runs disagree)",
            "additionalProperties": _NUM,
        },
        "peak_rss_mb": _d(_NUM0, "peak resident memory while this configuration ran, MB"),
        "gpu_peak_mb": _d(_OPT_NUM, "torch.cuda peak allocated memory, MB (null: no CUDA)"),
        "bundle_bytes": _d(_INT0, "bundle size on disk (torch: checkpoint size, 0 if none)"),
        "flops_per_frame": _d(_NUM0, "FLOPs per streamed frame, counted from the model"),
        "flops_per_frame_modules": {
            "type": "object",
            "description": "audio, generator, decoder per frame; appearance_once per avatar",
            "additionalProperties": _NUM0,
        },
        "gflops": _d(_NUM0, "achieved GFLOP/s = flops_per_frame * fps / 1e9"),
        "peak_device": _d(_STR, "which measured GEMM peak fraction_of_peak uses (cpu, cuda)"),
        "fraction_of_peak": _d(_NUM0, "gflops / the measured GEMM peak of peak_device"),
        "speedup_vs_torch": _d(_OPT_NUM, "fps / torch eager fp32 fps at the same config"),
        "speedup_spread": {
            "type": "object",
            "description": "bench --interleave: fps / the torch reference's, run by run (each run "
            "paired with the reference's run beside it); min, median, max and every ratio",
            "required": ["min", "median", "max", "values"],
            "properties": {
                "min": _NUM0,
                "median": _NUM0,
                "max": _NUM0,
                "values": {"type": "array", "items": _NUM0},
            },
        },
        "load_seconds": _d(_NUM0, "time to open the backend (load, compile)"),
        "note": _d(_OPT_STR, "anything worth knowing about this row"),
        "threads": _d({"type": "integer", "minimum": 1}, "CPU threads (bench --threads N,M)"),
        "load": _d(_INT0, "busy processes running beside it (bench --load N); 0: quiet"),
        "fps_vs_quiet": _d(_OPT_NUM, "under load: fps / fps of the same row quiet, same run"),
        "overlapped": _d(
            {"type": "boolean"},
            "bench --overlap: whether this row's throughput ran overlapped; not where its threads "
            "left no cores to spare (as `edgetalk run`)",
        ),
        "interleaved_with": _d(
            _INT0,
            "bench --interleave: how many other configurations ran their throughput runs chunk "
            "by chunk in turn with this one (0: alone); peak_rss_mb is then of all of them",
        ),
        "rounds": _d(
            {"type": "integer", "minimum": 2},
            "bench --rounds N: the plan ran N times round-robin; headline = median of all runs",
        ),
    },
}

DEVICE = {
    "type": "object",
    "description": "the machine the run was made on",
    "required": [
        "name",
        "cpu",
        "cores_logical",
        "memory_gb",
        "gpu",
        "os",
        "python",
        "versions",
        "threads",
        "gemm_peak_gflops",
    ],
    "properties": {
        "name": _d(_STR, "device name used in merged reports (--device-name)"),
        "cpu": _d(_STR, "CPU model"),
        "cpu_id": _d(_OPT_STR, "x86 'family F model M' (null: not x86 or unknown)"),
        "cpu_features": _d(
            {"type": "array", "items": _STR},
            "instruction-set extensions that decide the kernels (avx2, avx512_vnni, amx_int8, "
            "neon, dotprod, i8mm, ...); absent in older files",
        ),
        "cores_logical": _d({"type": "integer", "minimum": 1}, "logical CPU cores"),
        "cores_physical": _d({"type": ["integer", "null"]}, "physical CPU cores"),
        "memory_gb": _d(_NUM0, "total memory, GB"),
        "gpu": _d(_OPT_STR, "GPU name (null: none visible to torch)"),
        "gpu_memory_gb": _d(_OPT_NUM, "GPU memory, GB"),
        "os": _d(_STR, "platform string"),
        "python": _d(_STR, "Python version"),
        "versions": {
            "type": "object",
            "description": "package versions (null: not installed)",
            "additionalProperties": _OPT_STR,
        },
        "threads": _d(
            {"type": "integer", "minimum": 1},
            "CPU threads of the rows that do not state their own (bench's default or --threads)",
        ),
        "gemm_peak_gflops": {
            "type": "object",
            "description": "measured fp32 matmul GFLOP/s per device (cpu, cuda, mps); the cpu's "
            "on all its logical cores",
            "required": ["cpu"],
            "additionalProperties": _NUM0,
        },
        "gemm_size": _d({"type": "integer", "minimum": 1}, "n of the n x n GEMM"),
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "edgetalk bench report",
    "type": "object",
    "required": ["format", "schema_version", "created", "settings", "device", "results", "skipped"],
    "properties": {
        "format": {"enum": [FORMAT]},
        "schema_version": {"enum": [SCHEMA_VERSION]},
        "edgetalk_version": _STR,
        "created": _d(_STR, "UTC time, ISO 8601"),
        "command": _d({"type": "array", "items": _STR}, "the bench arguments"),
        "settings": {
            "type": "object",
            "required": ["seconds", "repeats", "piece_ms", "warmup_seconds", "seed"],
            "properties": {
                "seconds": _d(_NUM0, "media length of each stream"),
                "repeats": _d({"type": "integer", "minimum": 1}, "runs per measurement"),
                "piece_ms": _d(_NUM0, "paced audio piece length"),
                "warmup_seconds": _d(_NUM0, "audio streamed before measuring (excluded)"),
                "seed": _d({"type": "integer"}, "noise seed (and random-weight seed)"),
                "allocator": _d(
                    _STR,
                    "how the bench process's allocator was set (benchmarks/allocator.py): one "
                    "state for every backend measured",
                ),
                "overlap": _d(
                    {"type": "boolean"},
                    "bench --overlap: the throughput streams ran each chunk's decoder beside the "
                    "next chunk's audio and generator, as `edgetalk run` does (FFD stays serial), "
                    "where the row's threads left cores to spare (each row's `overlapped`)",
                ),
            },
        },
        "device": DEVICE,
        "results": {"type": "array", "items": RECORD},
        "notes": _d({"type": "array", "items": _STR}, "remarks printed with the table"),
        "skipped": {
            "type": "array",
            "description": "configurations that could not run here, with the reason",
            "items": {
                "type": "object",
                "required": ["config", "reason"],
                "properties": {"config": _STR, "reason": _STR},
            },
        },
    },
}

_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is(value: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[t])


def validate(obj: Any, schema: dict | None = None, path: str = "$") -> list[str]:
    """Every way obj breaks the schema, as 'path: problem' lines (empty list: valid)."""
    schema = SCHEMA if schema is None else schema
    errors: list[str] = []
    if "enum" in schema and obj not in schema["enum"]:
        errors.append(f"{path}: {obj!r} is not one of {schema['enum']}")
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is(obj, t) for t in types):
            errors.append(f"{path}: expected {' or '.join(types)}, got {type(obj).__name__}")
            return errors
    if _is(obj, "number"):
        if obj != obj or obj in (float("inf"), float("-inf")):
            errors.append(f"{path}: not a finite number")
        if "minimum" in schema and obj < schema["minimum"]:
            errors.append(f"{path}: {obj} is below the minimum {schema['minimum']}")
        if "maximum" in schema and obj > schema["maximum"]:
            errors.append(f"{path}: {obj} is above the maximum {schema['maximum']}")
    if isinstance(obj, dict):
        for key in schema.get("required", ()):
            if key not in obj:
                errors.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if key in props:
                errors += validate(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += validate(value, extra, f"{path}.{key}")
    if isinstance(obj, list) and "items" in schema:
        for i, value in enumerate(obj):
            errors += validate(value, schema["items"], f"{path}[{i}]")
    return errors
