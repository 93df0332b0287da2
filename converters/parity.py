"""Parity: exported outputs against PyTorch, compared output by output, by name, with thresholds
per precision (like optimum's validation and ml-stable-diffusion's PSNR gate)."""

from __future__ import annotations

import math

import numpy as np

# Per precision: frames are scored by PSNR (dB), everything else by cosine similarity.
THRESHOLDS = {
    "fp32": {"psnr_db": 50.0, "cosine": 0.9999, "e2e_psnr_db": 45.0},
    "fp16": {"psnr_db": 40.0, "cosine": 0.999, "e2e_psnr_db": 35.0},
    "int8": {"psnr_db": 30.0, "cosine": 0.99, "e2e_psnr_db": 28.0},
}
# Outputs the gate judges. Caches/states follow from these and are reported, not gated, because a
# K/V element that is near zero has no meaningful relative error.
# The decoder's photo inputs (dec_*) are gated as appearance outputs: the decoder reads them unchanged.
GATED = {
    "app_feat",
    "ref_motion",
    "dec_proj",
    "dec_basis",
    "dec_lips",
    "audio_tokens",
    "mouth",
    "motion",
    "frames",
}


def psnr(ref: np.ndarray, got: np.ndarray, peak: float = 1.0) -> float:
    mse = float(np.mean((ref.astype(np.float64) - got.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def cosine(ref: np.ndarray, got: np.ndarray) -> float:
    a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def compare_outputs(
    ref: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]], precision: str
) -> dict:
    """Aggregate over calls; returns {output: {metric: value, ..., "pass": bool}, "status": ...}."""
    th = THRESHOLDS[precision]
    result: dict = {"outputs": {}}
    ok = True
    for name in ref[0]:
        r = np.concatenate([x[name].ravel() for x in ref])
        g = np.concatenate([x[name].ravel() for x in got])
        entry = {"max_abs_diff": float(np.max(np.abs(r - g))) if r.size else 0.0}
        if not np.isfinite(g).all():
            entry["nonfinite"] = True
            entry["pass"] = False
        elif name == "frames":
            entry["psnr_db"] = _finite(psnr(r, g))
            entry["pass"] = entry["psnr_db"] >= th["psnr_db"]
        else:
            entry["cosine"] = cosine(r, g)
            entry["pass"] = entry["cosine"] >= th["cosine"]
        if name in GATED:
            ok &= entry["pass"]
        else:
            entry["gated"] = False
        result["outputs"][name] = entry
    result["status"] = "pass" if ok else "fail"
    return result


def _finite(x: float) -> float:
    return 999.0 if math.isinf(x) else round(x, 3)


def headline(res: dict) -> str:
    """One figure for the summary table: frames PSNR, else the worst gated cosine."""
    outs = res.get("outputs", {})
    if "frames" in outs:
        return f"PSNR {outs['frames'].get('psnr_db', float('nan')):.1f} dB"
    cos = [v["cosine"] for k, v in outs.items() if k in GATED and "cosine" in v]
    return f"cos {min(cos):.5f}" if cos else res.get("status", "")
