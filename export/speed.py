"""Whether a precision pays on this machine, measured at export time.

An fp16 or INT8 artifact is only worth shipping to a CPU where it runs faster than its fp32
graph, and that depends on the CPU, not on the model: 8-bit convolutions gained nothing over
float on a first-generation EPYC (AVX2 without 8-bit dot products) and 9-16% on other AVX2 and
AVX-512 VMs; fp16 ran slower than fp32 on every CPU measured. Peers ship "int8" flags that
silently buy nothing. The export times each converted artifact against the fp32 graph it was
made from, while both exist, and says so when the precision does not pay here.

The figure is one module call as the target's runtime makes it (ONNX Runtime on one thread, a
bundle's default on 2 cores; MLX on its default device, compiled where the runtime compiles), in
interleaved rounds because a VM's speed drifts over seconds. It is an indicator, not a benchmark:
`edgetalk bench --export T:fp32,T:P` compares whole streams."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

ROUNDS = 3
# per artifact and round: about 1 s in all for an ONNX decoder of 30 ms a call; a call slower
# than this (MLX's CPU build here: 2 s) is timed once a round
ROUND_S = 0.15
MAX_CALLS = 40
PAYS = 1.05  # a speed-up under 5% is inside what these interleaved medians resolve


def measure(target, fp32_path: Path, path: Path, sample: dict[str, np.ndarray]) -> dict | None:
    """{"threads" or "device", "ms", "fp32_ms", "vs_fp32", "cpu"} for the artifact at `path`
    against its fp32 graph; None where the target cannot run its artifacts here (the manifest
    then has no figure); {"status": "not measured: ..."} when a run failed (the parity gate runs
    the same artifact and reports the failure; the export does not stop for a timing)."""
    try:
        calls = {"fp32": target.timed_call(fp32_path, sample)}
        calls["this"] = target.timed_call(path, sample)
        if any(c is None for c in calls.values()):
            return None
        for call in calls.values():  # a first run allocates and plans (and compiles)
            call()
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(ROUNDS):
            for key, call in calls.items():
                end = time.perf_counter() + ROUND_S
                for n in range(MAX_CALLS):
                    if n and time.perf_counter() > end:
                        break
                    t0 = time.perf_counter()
                    call()
                    times[key].append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - reported in the manifest, never fatal
        return {"status": f"not measured: {type(e).__name__}: {e}"[:300]}
    # four significant digits, not three decimals: a small graph's call takes ~0.05 ms, where
    # 0.001 ms is 2% and the recorded times no longer gave the recorded ratio
    ms = {k: float(f"{float(np.median(v)) * 1e3:.4g}") for k, v in times.items()}
    return {
        **target.timing_setting(),
        "ms": ms["this"],
        "fp32_ms": ms["fp32"],
        "vs_fp32": round(ms["fp32"] / ms["this"], 3),
        "cpu": _cpu(),
    }


def column(info: dict) -> str:
    """The export table's speed cell: '1.12x fp32' (or '' without a figure)."""
    speed = info.get("speed") or {}
    return f"{speed['vs_fp32']:.2f}x fp32" if "vs_fp32" in speed else ""


def verdict(modules, target: str, precision: str, main_part: str = "decoder") -> str | None:
    """One line when the precision does not pay for the module that does a frame's work (the
    decoder: 98% of it), else None. `modules`: (part name, info) pairs."""
    speed = dict(modules).get(main_part, {}).get("speed") or {}
    if "vs_fp32" not in speed or speed["vs_fp32"] >= PAYS:
        return None
    how = "no faster than" if speed["vs_fp32"] >= 1 / PAYS else "slower than"
    return (
        f"note: on this CPU ({speed.get('cpu') or 'unknown'}) the {precision} {main_part} runs "
        f"{speed['vs_fp32']:.2f}x its fp32 graph ({speed['ms']:.1f} against "
        f"{speed['fp32_ms']:.1f} ms a call, {_setting(speed)}): {how} fp32 here. "
        f"`edgetalk bench --export {target}:fp32,{target}:{precision}` compares whole streams; "
        "export fp32 for this machine if it agrees"
    )


def _setting(speed: dict) -> str:
    if "device" in speed:
        return f"on {speed['device']}"
    n = speed.get("threads", 1)
    return "one thread" if n == 1 else f"{n} threads"


def _cpu() -> str | None:
    try:
        from ..benchmarks.device import describe_cpu

        return describe_cpu()
    except Exception:  # noqa: BLE001 - a description, never worth failing for
        return None
