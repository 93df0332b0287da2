"""Run a plan: measure every configuration in turn and assemble the JSON report (schema.py)."""

from __future__ import annotations

import datetime as dt
import gc
import time
from collections.abc import Callable

from .. import __version__
from ..errors import EdgeTalkError
from ..runtime.threads import apply_torch_threads, set_threads
from .configs import Config, Plan
from .load import BusyLoad
from .measure import Clock, Settings, Sleep, bench_audio, measure
from .schema import FORMAT, SCHEMA_VERSION


def flops_for(cfg, cache: dict) -> dict[str, float]:
    key = cfg.to_json()
    if key not in cache:
        from ..models.flops import flops_per_frame

        cache[key] = flops_per_frame(cfg)
    return cache[key]


def measure_config(
    config: Config,
    settings: Settings,
    pcm,
    peaks: dict[str, float],
    flops_cache: dict,
    clock: Clock = time.perf_counter,
    sleep: Sleep = time.sleep,
    log: Callable[[str], None] = print,
) -> dict:
    from ..runtime.avatar import prepare_avatar
    from .device import backend_device

    t0 = time.perf_counter()
    backend = config.opener()
    load_s = time.perf_counter() - t0
    try:
        cfg = backend.cfg
        avatar = prepare_avatar(None, cfg.render.resolution)
        rec = measure(backend, avatar, pcm, settings, clock, sleep, log=log)
        where = backend_device(backend)
        backend_name, precision = backend.name, backend.precision
    finally:
        del backend
        gc.collect()
    flops = flops_for(cfg, flops_cache)
    peak_device = where if where in peaks else "cpu"
    gflops = flops["total"] * rec["fps"] / 1e9
    rec.update(
        label=config.label,
        backend=backend_name,
        target=config.target,
        precision=precision,
        source=config.source,
        reference=config.reference,
        chunk_fixed=config.chunk_fixed,
        bundle_bytes=int(config.size_bytes),
        flops_per_frame=round(flops["total"], 1),
        flops_per_frame_modules={k: round(v, 1) for k, v in flops.items() if k != "total"},
        gflops=round(gflops, 4),
        peak_device=peak_device,
        fraction_of_peak=round(gflops / peaks[peak_device], 6) if peaks[peak_device] else 0.0,
        speedup_vs_torch=None,
        load_seconds=round(load_s, 3),
        note=config.note,
        _key=cfg.to_json(),
    )
    return rec


def add_speedups(results: list[dict]) -> None:
    """speedup_vs_torch = fps / fps of the torch fp32 reference with the same streaming config
    (and the same threads and load); fps_vs_quiet = fps under load / fps of the same row quiet."""

    def cond(r: dict):
        return (r["_key"], r.get("threads"), r.get("load", 0))

    refs = {cond(r): r["fps"] for r in results if r["reference"]}
    quiet = {(r["_base"], r.get("threads")): r["fps"] for r in results if not r.get("load")}
    for r in results:
        ref = refs.get(cond(r))
        r["speedup_vs_torch"] = round(r["fps"] / ref, 4) if ref else None
        if r["reference"]:
            r["speedup_vs_torch"] = 1.0
        if r.get("load"):
            q = quiet.get((r["_base"], r.get("threads")))
            r["fps_vs_quiet"] = round(r["fps"] / q, 4) if q else None


def run_plan(
    plan: Plan,
    settings: Settings,
    device: dict,
    command: list[str] | None = None,
    clock: Clock = time.perf_counter,
    sleep: Sleep = time.sleep,
    log: Callable[[str], None] = print,
    threads: list[int] | None = None,
    load: int = 0,
) -> dict:
    """Every configuration at every thread count in `threads` (None: as the process is set), each
    quiet and, with load > 0, right after under `load` busy processes (so the ratio compares
    neighbouring measurements on a machine whose other work drifts)."""
    pcm = bench_audio(settings.seconds)
    peaks = device["gemm_peak_gflops"]
    flops_cache: dict = {}
    results: list[dict] = []
    skipped = list(plan.skipped)
    runs = [
        (config, t, n_load)
        for t in (threads or [None])
        for config in plan.configs
        for n_load in ((0, load) if load else (0,))
    ]
    n = len(runs)
    for i, (config, t, n_load) in enumerate(runs, 1):
        label = config.label + (f" t{t}" if threads else "") + (f" load{n_load}" if load else "")
        log(f"[{i}/{n}] {label} ({config.source})")
        if t is not None:
            set_threads(t)
            apply_torch_threads(t)
        try:
            with BusyLoad(n_load):
                rec = measure_config(
                    config,
                    settings,
                    pcm,
                    peaks,
                    flops_cache,
                    clock,
                    sleep,
                    log=(lambda s, label=label: log(f"    {label}: {s}")),
                )
        except EdgeTalkError as e:
            skipped.append({"config": label, "reason": str(e)})
            log(f"    skipped: {e}")
            continue
        rec.update(_base=config.label, label=label)
        if t is not None:
            rec["threads"] = t
        if load:
            rec["load"] = n_load
        results.append(rec)
        log(
            f"    {rec['fps']:.1f} fps, FFD {rec['first_frame_delay_ms']:.0f} ms "
            f"(floor {rec['first_frame_floor_ms']:.0f}), RTF {rec['rtf']:.2f}"
        )
    if not results:
        why = "; ".join(f"{s['config']}: {s['reason']}" for s in skipped) or "nothing to run"
        raise EdgeTalkError(f"no configuration could be benchmarked ({why})")
    add_speedups(results)
    for r in results:
        del r["_key"], r["_base"]
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "edgetalk_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command or []),
        "settings": settings.to_dict(),
        "device": device,
        "results": results,
        "skipped": skipped,
        "notes": list(plan.notes),
    }
