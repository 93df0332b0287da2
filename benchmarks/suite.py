"""Run a plan: measure every configuration in turn and assemble the JSON report (schema.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import time
from collections.abc import Callable

import numpy as np

from .. import __version__
from ..errors import EdgeTalkError
from ..runtime.threads import apply_torch_threads, resolve, set_threads, spare_cores
from .configs import Config, Plan
from .load import BusyLoad
from .measure import Clock, Settings, Sleep, bench_audio
from .schema import FORMAT, SCHEMA_VERSION


def flops_for(cfg, cache: dict) -> dict[str, float]:
    key = cfg.to_json()
    if key not in cache:
        from ..models.flops import flops_per_frame

        cache[key] = flops_per_frame(cfg)
    return cache[key]


def measure_configs(
    configs: list[Config],
    settings: Settings,
    pcm,
    peaks: dict[str, float],
    flops_cache: dict,
    clock: Clock = time.perf_counter,
    sleep: Sleep = time.sleep,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Records for configurations of one streaming config; with several, their throughput runs
    are interleaved (measure_group). All are open together for that."""
    from ..runtime.avatar import prepare_avatar
    from .device import backend_device
    from .measure import measure_group

    backends, loads = [], []
    try:
        for config in configs:
            t0 = time.perf_counter()
            backends.append(config.opener())
            loads.append(time.perf_counter() - t0)
        cfg = backends[0].cfg
        avatar = prepare_avatar(None, cfg.render.resolution)
        recs = measure_group(backends, avatar, pcm, settings, clock, sleep, log=log)
        facts = [(backend_device(b), b.name, b.precision, b.cfg) for b in backends]
    finally:
        del backends
        gc.collect()
    out = []
    for config, rec, load_s, (where, backend_name, precision, cfg) in zip(
        configs, recs, loads, facts, strict=True
    ):
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
        out.append(rec)
    return out


def add_speedups(results: list[dict]) -> None:
    """speedup_vs_torch = fps / fps of the torch fp32 reference with the same streaming config
    (and the same threads and load); fps_vs_quiet = fps under load / fps of the same row quiet."""

    def cond(r: dict):
        return (r["_key"], r.get("threads"), r.get("load", 0))

    refs = {cond(r): r for r in results if r["reference"]}
    quiet = {(r["_base"], r.get("threads")): r["fps"] for r in results if not r.get("load")}
    for r in results:
        ref = refs.get(cond(r))
        r["speedup_vs_torch"] = round(r["fps"] / ref["fps"], 4) if ref else None
        if r["reference"]:
            r["speedup_vs_torch"] = 1.0
        elif ref is not None and (paired := paired_speedups(r, ref)) is not None:
            r["speedup_spread"] = paired
        if r.get("load"):
            q = quiet.get((r["_base"], r.get("threads")))
            r["fps_vs_quiet"] = round(r["fps"] / q, 4) if q else None


def paired_speedups(row: dict, ref: dict) -> dict | None:
    """The row's throughput over its torch reference's, run by run (min, median, max and every
    ratio). With --interleave the k-th run of each went chunk by chunk beside the other's k-th
    (same repeat, same round), so each ratio is free of the machine's drift between runs, and
    their range is how far the headline ratio can be trusted in this run. None where the runs
    were not interleaved (seconds apart) or do not pair up."""
    a, b = row["spread"]["fps"]["values"], ref["spread"]["fps"]["values"]
    together = row.get("interleaved_with", 0) > 0 and ref.get("interleaved_with", 0) > 0
    if not together or len(a) != len(b) or not a or min(b) <= 0:
        return None
    ratios = [round(x / y, 4) for x, y in zip(a, b, strict=True)]
    return {
        "min": min(ratios),
        "median": round(float(np.median(ratios)), 4),
        "max": max(ratios),
        "values": ratios,
    }


MERGED = ("fps", "first_frame_delay_ms", "rtf", "deadline_miss_rate")


def first_chunk(rec: dict) -> str:
    """'; first chunk: audio 1.0, generator 2.1, decoder 5.5, convert 0.2 ms' (or nothing)."""
    parts = rec.get("first_chunk_ms") or {}
    shown = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if k != "other")
    return f"; first chunk: {shown} ms" if shown else ""


def merge_rounds(recs: list[dict]) -> dict:
    """One record from a configuration measured in several rounds: each headline metric is the
    median over every run of every round (its spread lists them all); the rest (per-module
    latencies, memory) comes from the round whose fps was the median."""
    if len(recs) == 1:
        return recs[0]
    order = sorted(recs, key=lambda r: r["fps"])
    rec = dict(order[(len(order) - 1) // 2])
    rec["spread"] = dict(rec["spread"])
    for key in MERGED:
        values = [v for r in recs for v in r["spread"][key]["values"]]
        digits = 3 if key in ("fps", "first_frame_delay_ms") else 4
        rec[key] = round(float(np.median(values)), digits)
        rec["spread"][key] = {"min": min(values), "max": max(values), "values": values}
    rec["rounds"] = len(recs)
    return rec


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
    rounds: int = 1,
    interleave: bool = False,
) -> dict:
    """Every configuration at every thread count in `threads` (None: as the process is set), each
    quiet and, with load > 0, right after under `load` busy processes (so the ratio compares
    neighbouring measurements on a machine whose other work drifts). With rounds > 1 the whole
    sequence runs that many times, round-robin, and each row is the median over its rounds: a
    2-core VM's speed drifts by up to 2x over minutes, and a reference measured once, minutes
    away from the row it is compared with, moved ratios more than the change being measured.
    With interleave, the configurations of one streaming config run their throughput runs chunk
    by chunk in turn (measure.interleaved_throughput): the steadiest ratios this can give."""
    pcm = bench_audio(settings.seconds)
    peaks = device["gemm_peak_gflops"]
    flops_cache: dict = {}
    results: list[dict] = []
    skipped = list(plan.skipped)
    # With interleave, the configurations of one streaming config (a reference and what is
    # compared with it) are measured together; otherwise each alone.
    groups: dict[str, list[Config]] = {}
    for config in plan.configs:
        groups.setdefault(config.key if interleave else config.label, []).append(config)
    runs = [
        (group, t, n_load)
        for t in (threads or [None])
        for group in groups.values()
        for n_load in ((0, load) if load else (0,))
    ]
    n = len(runs)
    measured: dict[str, list[dict]] = {}
    steps = [(r, run) for r in range(rounds) for run in runs]
    for i, (rnd, (group, t, n_load)) in enumerate(steps, 1):
        suffix = (f" t{t}" if threads else "") + (f" load{n_load}" if load else "")
        labels = [c.label + suffix for c in group]
        round_note = f" round {rnd + 1}/{rounds}" if rounds > 1 else ""
        what = " | ".join(labels) + (" (interleaved)" if len(group) > 1 else "")
        sources = ", ".join(sorted({c.source for c in group}))
        log(f"[{i}/{n * rounds}] {what}{round_note} ({sources})")
        if t is not None:
            set_threads(t)
            apply_torch_threads(t)
        row = settings
        if settings.overlap and not spare_cores(t):
            # as `edgetalk run`: a chunk's decoder beside the next chunk's work only where both
            # have cores of their own; oversubscribed, torch ran at 0.71x (runtime/threads.py)
            row = dataclasses.replace(settings, overlap=False)
            log(f"    --overlap: no cores to spare at {resolve(t)} threads, not overlapped")
        try:
            with BusyLoad(n_load):
                recs = measure_configs(
                    group,
                    row,
                    pcm,
                    peaks,
                    flops_cache,
                    clock,
                    sleep,
                    log=(lambda s, label=labels[0]: log(f"    {label}: {s}")),
                )
        except EdgeTalkError as e:
            if len(group) > 1:
                raise EdgeTalkError(
                    f"{what}: {e} (with --interleave the configurations of a group open "
                    "together; run without it to measure the others)"
                ) from e
            skipped.append({"config": labels[0], "reason": str(e)})
            log(f"    skipped: {e}")
            continue
        for config, label, rec in zip(group, labels, recs, strict=True):
            rec.update(_base=config.label, label=label)
            if settings.overlap:
                rec["overlapped"] = row.overlap
            if t is not None:
                rec["threads"] = t
            if load:
                rec["load"] = n_load
            measured.setdefault(label, []).append(rec)
            log(
                f"    {label}: {rec['fps']:.1f} fps, FFD {rec['first_frame_delay_ms']:.0f} ms "
                f"(floor {rec['first_frame_floor_ms']:.0f}{first_chunk(rec)}), RTF {rec['rtf']:.2f}"
            )
    results = [merge_rounds(recs) for recs in measured.values()]
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
