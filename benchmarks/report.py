"""Markdown tables of bench results, and merging the JSON files of several devices into one."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .schema import FORMAT, SCHEMA_VERSION, validate

MAX_REPORT_BYTES = 64 * 1024 * 1024


def load_report(path: str | Path) -> dict:
    """Read one `bench --json` file; InputError (naming the file and the problem) if it is not one."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"bench report not found: {p}")
    if not p.is_file():
        raise InputError(f"bench report is not a file: {p}")
    if p.stat().st_size > MAX_REPORT_BYTES:
        raise InputError(f"{p} is too large to be a bench report ({p.stat().st_size} bytes)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f'{p} is not an edgetalk bench report (no "format": "{FORMAT}")')
    problems = validate(upgrade(data))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(f"{p} does not match the bench schema: {'; '.join(problems[:3])}{more}")
    return data


def upgrade(data: dict) -> dict:
    """A schema version 1 report in version 2 terms: its `lookahead` counted whole frames
    (40 ms each); version 2 says lookahead_ms. Anything else is left for validate() to judge."""
    if data.get("schema_version") != 1 or not isinstance(data.get("results"), list):
        return data
    for r in data["results"]:
        frames = r.get("lookahead") if isinstance(r, dict) else None
        if isinstance(frames, int) and not isinstance(frames, bool) and "lookahead_ms" not in r:
            r["lookahead_ms"] = frames * 40.0
            del r["lookahead"]
    data["schema_version"] = SCHEMA_VERSION
    return data


def merge(reports: list[dict]) -> tuple[list[dict], list[dict]]:
    """(devices, rows): every result tagged with its device name (made unique across files)."""
    devices, rows, seen = [], [], {}
    for rep in reports:
        dev = dict(rep["device"])
        name = dev["name"]
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            dev["name"] = f"{name} ({seen[name]})"
        devices.append(dev)
        rows.extend({**r, "device": dev["name"]} for r in rep["results"])
    return devices, rows


# ---- formatting ---------------------------------------------------------------------------------
def _f(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _lat(rec: dict, module: str) -> str:
    m = rec["modules"].get(module)
    if not m or not m["calls"]:
        return "–"
    return f"{m['p50_ms']:.1f}/{m['p95_ms']:.1f}"


def _range(spread: dict | None) -> str:
    return "–" if spread is None else f"{spread['min']:.2f}–{spread['max']:.2f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


COLUMNS = [
    ("backend", lambda r: r["backend"]),
    ("prec", lambda r: r["precision"]),
    ("C", lambda r: f"{r['chunk']}{'*' if r.get('chunk_fixed') else ''}"),
    ("look ms", lambda r: f"{r['lookahead_ms']:g}"),
    ("res", lambda r: str(r["resolution"])),
    ("thr", lambda r: str(r.get("threads", "-"))),
    ("load", lambda r: str(r.get("load", 0))),
    (
        "FPS (min–max)",
        lambda r: (
            f"{r['fps']:.1f} ({r['spread']['fps']['min']:.1f}–{r['spread']['fps']['max']:.1f})"
        ),
    ),
    ("FFD ms", lambda r: f"{r['first_frame_delay_ms']:.0f}"),
    ("floor ms", lambda r: f"{r['first_frame_floor_ms']:.0f}"),
    ("RTF", lambda r: f"{r['rtf']:.2f}"),
    ("miss % (max ms)", lambda r: f"{100 * r['deadline_miss_rate']:.0f} ({r['max_late_ms']:.0f})"),
    ("audio p50/95", lambda r: _lat(r, "audio")),
    ("gen p50/95", lambda r: _lat(r, "generator")),
    ("dec p50/95", lambda r: _lat(r, "decoder")),
    ("u8 p50/95", lambda r: _lat(r, "convert")),
    ("RSS MB", lambda r: f"{r['peak_rss_mb']:.0f}"),
    ("size MB", lambda r: _mb(r["bundle_bytes"])),
    ("GFLOP/s", lambda r: f"{r['gflops']:.1f}"),
    ("% peak", lambda r: f"{100 * r['fraction_of_peak']:.1f}"),
    ("× torch", lambda r: _f(r["speedup_vs_torch"], 2)),
    ("× torch run by run", lambda r: _range(r.get("speedup_spread"))),
    ("× quiet", lambda r: _f(r.get("fps_vs_quiet"), 2)),
]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


# shown only when some row has the field (bench --threads N,M / --load N)
OPTIONAL = {
    "thr": "threads",
    "load": "load",
    "× quiet": "fps_vs_quiet",
    "× torch run by run": "speedup_spread",
}


def results_table(rows: list[dict], with_device: bool = False) -> str:
    cols = [
        (name, fn)
        for name, fn in COLUMNS
        if name not in OPTIONAL or any(OPTIONAL[name] in r for r in rows)
    ]
    header = (["device"] if with_device else []) + [name for name, _ in cols]
    body = [
        ([r["device"]] if with_device else []) + [fn(r) for _, fn in cols]
        for r in sorted(rows, key=_order)
    ]
    return markdown(header, body)


def _order(r: dict):
    return (
        r.get("device", ""),
        r["model"],
        r["chunk"],
        r.get("threads", 0),
        r.get("load", 0),
        not r["reference"],
        r["label"],
    )


def device_table(devices: list[dict]) -> str:
    header = ["device", "CPU", "CPU extensions", "cores", "memory GB", "GPU", "OS"]
    header += ["GEMM peak GFLOP/s", "versions"]
    body = []
    for d in devices:
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in d["gemm_peak_gflops"].items())
        vers = ", ".join(f"{k} {v}" for k, v in d["versions"].items() if v and k != "edgetalk")
        body.append(
            [
                d["name"],
                d["cpu"] + (f" ({d['cpu_id']})" if d.get("cpu_id") else ""),
                " ".join(d.get("cpu_features") or []) or "–",
                str(d["cores_logical"]),
                f"{d['memory_gb']:.0f}",
                d["gpu"] or "–",
                d["os"],
                peaks,
                vers,
            ]
        )
    return markdown(header, body)


LEGEND = (
    "FPS: frames/s end to end, audio as fast as consumed. FFD: first-frame delay with audio paced "
    "in real time; floor = C*40 ms + lookahead. RTF: compute / media time (paced). miss: frames "
    "later than first-frame time + i*40 ms (max: worst lateness). Latencies are ms per call (p50/p95). "
    "C* = chunk fixed by the bundle. × torch: FPS / torch eager fp32 FPS at the same chunk."
)


def render_run(report: dict) -> str:
    d = report["device"]
    s = report["settings"]
    parts = [
        f"## edgetalk bench — {d['name']}",
        "",
        f"{s['seconds']:g} s of speech, {s['repeats']} repeat(s), median shown; "
        + ("FPS with each chunk's decoder overlapped (--overlap); " if s.get("overlap") else "")
        + f"threads {d['threads']} (where a row has no thr); fp32 GEMM peak "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in d["gemm_peak_gflops"].items())
        + f" (cpu: all {d['cores_logical']} cores)",
        "",
        results_table(report["results"]),
        "",
        LEGEND,
    ]
    parts += _remarks(report)
    return "\n".join(parts)


def _remarks(report: dict) -> list[str]:
    out = []
    for note in report.get("notes", []):
        out.append(f"- note: {note}")
    for s in report.get("skipped", []):
        out.append(f"- skipped {s['config']}: {s['reason']}")
    return [""] + out if out else []


def render_merged(reports: list[dict]) -> str:
    devices, rows = merge(reports)
    parts = [
        f"## edgetalk bench — {len(devices)} device(s)",
        "",
        device_table(devices),
        "",
        results_table(rows, with_device=True),
        "",
        LEGEND,
    ]
    for rep, dev in zip(reports, devices, strict=True):
        extra = _remarks(rep)
        if extra:
            parts += ["", f"{dev['name']}:", *extra[1:]]
    return "\n".join(parts)
