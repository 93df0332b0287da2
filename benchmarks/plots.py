"""PNG plots of bench results (matplotlib, Agg): FFD vs throughput, and per-module latency bars.

Rows are result records tagged with "device". With one device, each backend+precision has its own
colour; with several, each device has its own colour and marker, and backend+precision its own
line style.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError

STACK = ("audio", "generator", "decoder", "convert")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
STYLES = ("-", "--", ":", "-.")


def _pyplot():
    from .deps import import_extra

    matplotlib = import_extra("matplotlib", "writing plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(r: dict) -> str:
    name = f"{r['backend']} {r['precision']}" + ("" if r["model"] == "tiny" else f" ({r['model']})")
    return name + (f", {r['threads']} thr" if r.get("threads") else "")


def ffd_vs_fps(rows: list[dict], path: Path) -> Path:
    """One point per chunk size, one line per backend+precision+threads (per device when
    several); quiet rows only, for a row under `--load` answers another question (× quiet)."""
    plt = _pyplot()
    rows = [r for r in rows if not r.get("load")] or rows
    devices = list(dict.fromkeys(r.get("device", "") for r in rows))
    series = list(dict.fromkeys(_series(r) for r in rows))
    multi = len(devices) > 1
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for di, dev in enumerate(devices):
        for si, name in enumerate(series):
            pts = sorted(
                (r for r in rows if r.get("device", "") == dev and _series(r) == name),
                key=lambda r: r["chunk"],
            )
            if not pts:
                continue
            if multi:
                colour, marker, style = (
                    colours[di % len(colours)],
                    MARKERS[di % len(MARKERS)],
                    STYLES[si % len(STYLES)],
                )
                label = f"{dev} · {name}"
            else:
                colour, marker, style = colours[si % len(colours)], MARKERS[si % len(MARKERS)], "-"
                label = name
            xs = [r["fps"] for r in pts]
            ys = [r["first_frame_delay_ms"] for r in pts]
            ax.plot(xs, ys, style, marker=marker, color=colour, label=label)
            for r in pts:
                ax.annotate(
                    f"C={r['chunk']}",
                    (r["fps"], r["first_frame_delay_ms"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=colour,
                )
                ax.plot(r["fps"], r["first_frame_floor_ms"], "_", color=colour, markersize=10)
    ax.axvline(25, color="grey", lw=0.8, ls=":")
    ax.text(25, ax.get_ylim()[1], " 25 fps", va="top", fontsize=7, color="grey")
    ax.set_xlabel("throughput, frames/s end to end (higher is better)")
    ax.set_ylabel("first-frame delay, ms (lower is better; – marks its floor)")
    ax.set_title("First-frame delay vs throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def module_bars(rows: list[dict], path: Path) -> Path:
    """Stacked p50 latency per frame of audio, generator, decoder and uint8 conversion (quiet
    rows)."""
    plt = _pyplot()
    rows = [r for r in rows if not r.get("load")] or rows
    multi = len({r.get("device", "") for r in rows}) > 1
    rows = sorted(rows, key=lambda r: (r.get("device", ""), _series(r), r["chunk"]))
    labels = [(f"{r['device']} · " if multi else "") + f"{_series(r)} c{r['chunk']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * len(rows)))
    left = [0.0] * len(rows)
    for module in STACK:
        widths = [r["modules"].get(module, {}).get("per_frame_p50_ms", 0.0) for r in rows]
        ax.barh(range(len(rows)), widths, left=left, label=module)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.axvline(40, color="grey", lw=0.8, ls=":")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per frame (p50 per call / frames per call); 40 ms = real time at 25 fps")
    ax.set_title("Per-module latency")
    ax.legend(fontsize=7, ncols=len(STACK), loc="best")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(rows: list[dict], folder: str | Path) -> list[Path]:
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the plot folder {out}: {e}") from None
    if not rows:
        return []
    return [
        ffd_vs_fps(rows, out / "ffd_vs_fps.png"),
        module_bars(rows, out / "module_latency.png"),
    ]
