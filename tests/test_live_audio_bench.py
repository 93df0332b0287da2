"""`python -m edgetalk.benchmarks.live_audio`: how late a live Session hands out its audio with
busy processes beside it (the README's serve section quotes it)."""

from __future__ import annotations

import json

from edgetalk.benchmarks import live_audio


def test_live_audio_reports_lateness_within_the_late_bound_beside_a_busy_process(
    micro_ckpt, tmp_path, capsys
):
    out = tmp_path / "la.json"
    rc = live_audio.main(
        [
            *("--seconds", "2", "--load", "1", "--pause", "1"),
            *("--checkpoint", str(micro_ckpt), "--json", str(out)),
        ]
    )
    line = capsys.readouterr().out
    print(line)
    assert rc == 0 and "audio late p50" in line
    r = json.loads(out.read_text())
    assert r["mode"] == "gaps" and r["load"] == 1 and r["pause"] == 1.0
    assert 0 <= r["delay_lowered_ms"] <= r["delay_raised_ms"] and r["trimmed"] >= 0
    # every frame of the 2 s of speech and the 1 s pause is on the timeline, shown or dropped
    # (and idle frames before the first push may come too)
    assert r["frames_shown"] + r["frames_dropped"] >= 75, r
    a = r["audio_late_ms"]
    assert a["p50"] <= a["p95"] <= a["p99"] <= a["max"]
    # gaps: no audio leaves later than the late bound (a chunk), give or take a wake-up
    assert a["max"] < r["late_bound_ms"] + 100.0, r


def test_live_audio_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert live_audio.main(["--seconds", "2", "--bundle", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bundle not found") and "Traceback" not in err
