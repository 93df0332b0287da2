"""The live tests' FPS floors on a slower CPU class (conftest.floor_for_this_machine): scaled down
by the machine's measured capacity only when missed, never raised, and a stall still fails."""

from __future__ import annotations

from . import conftest


def test_a_floor_reached_is_kept_without_measuring(monkeypatch):
    monkeypatch.setattr(conftest, "machine_capacity_fps", lambda: 1 / 0)  # must not be called
    assert conftest.floor_for_this_machine(15.0, 15, "x") == 15


def test_a_missed_floor_scales_with_a_slower_machine_only(monkeypatch, capsys):
    ref = conftest.REFERENCE_FPS
    monkeypatch.setattr(conftest, "machine_capacity_fps", lambda: ref / 2)
    assert conftest.floor_for_this_machine(7.0, 11, "server FPS") == 5.5
    assert "this machine streams the shipped model at" in capsys.readouterr().out
    monkeypatch.setattr(conftest, "machine_capacity_fps", lambda: ref * 3)
    assert conftest.floor_for_this_machine(7.0, 11, "server FPS") == 11  # a fast machine: as set
    # a stalled stream fails on the slowest machine that can run the model in real time
    monkeypatch.setattr(conftest, "machine_capacity_fps", lambda: 25.0)
    assert conftest.floor_for_this_machine(0.5, 11, "server FPS") > 0.5


def test_capacity_is_the_shipped_models_stream_here():
    fps = conftest.machine_capacity_fps(seconds=0.5)
    assert 1.0 < fps < 10_000
