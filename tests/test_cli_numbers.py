"""Every number a command takes is bounded on the command line: a bad one is one clear line and
exit 2, before a model is loaded (no traceback, no terabyte attention table, no endless run)."""

from __future__ import annotations

import argparse

import pytest

from edgetalk import cli
from edgetalk.models.config import MAX_CHUNK, PRESETS


def _options(parser: argparse.ArgumentParser, prefix: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{prefix} {name}")
        else:
            yield prefix, action


def test_no_option_takes_an_unbounded_number():
    """int or float as an argparse type accepts 0, -1, 1e9 and nan alike: use cliargs."""
    loose = []
    for command in cli.COMMANDS:
        top = cli.build_parser(command, lazy=True)
        sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        for where, action in _options(sub.choices[command], command):
            if action.type in (int, float):
                loose.append(f"{where} {'/'.join(action.option_strings)}")
    assert not loose, f"options without bounds: {loose}"


@pytest.mark.parametrize(
    "argv, option",
    [
        (["run", "--chunk", "0"], "--chunk"),
        (["run", "--chunk", "100000"], "--chunk"),
        (["run", "--seed", "-1"], "--seed"),
        (["run", "--piece-ms", "0"], "--piece-ms"),
        (["live", "--pcm-stdin", "--null", "--seconds", "nan"], "--seconds"),
        (["live", "--pcm-stdin", "--null", "--rate", "0"], "--rate"),
        (["export", "--target", "onnx", "--chunk", "100000"], "--chunk"),
        (["export", "--target", "onnx", "--window", "100000"], "--window"),
        (["export", "--target", "onnx", "--steps", "0"], "--steps"),
        (["eval", "--chunk", "0"], "--chunk"),
        (["eval", "--seed", "-1"], "--seed"),
        (["eval", "--listen-clips", "-1"], "--listen-clips"),
        (["eval", "--long-minutes", "-1"], "--long-minutes"),
        (["eval", "--seconds", "inf"], "--seconds"),
        (["bench", "--seconds", "nan"], "--seconds"),
        (["bench", "--warmup", "nan"], "--warmup"),
        (["bench", "--seed", "-3"], "--seed"),
        (["bench", "--repeats", "0"], "--repeats"),
        (["soak", "--minutes", "0"], "--minutes"),
        (["soak", "--minutes", "-1"], "--minutes"),
        (["soak", "--chunk", "0"], "--chunk"),
        (["serve", "--max-session-minutes", "nan"], "--max-session-minutes"),
        (["serve", "--replica-cpus", "nan"], "--replica-cpus"),
        (["serve", "--port", "70000"], "--port"),
    ],
)
def test_a_bad_number_is_one_line_before_anything_runs(argv, option, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"edgetalk {argv[0]}: error: argument {option}"), err
    assert "must be" in err and f"edgetalk {argv[0]} --help" in err


def test_good_numbers_still_parse():
    args = cli.build_parser("run", lazy=True).parse_args(
        ["run", "--chunk", str(MAX_CHUNK), "--seed", "7", "--piece-ms", "40"]
    )
    assert (args.chunk, args.seed, args.piece_ms) == (MAX_CHUNK, 7, 40)
    args = cli.build_parser("bench", lazy=True).parse_args(["bench", "--warmup", "0"])
    assert args.warmup == 0.0


def test_the_config_refuses_what_the_command_line_refuses():
    """Library callers (Python API, bundles) meet the same bounds as a ValueError."""
    cfg = PRESETS["tiny"]
    assert cfg.with_streaming(chunk=MAX_CHUNK).chunk == MAX_CHUNK
    for bad in ({"chunk": MAX_CHUNK + 1}, {"chunk": 0}, {"window": 10**5}, {"steps": True}):
        with pytest.raises(ValueError, match="must be a whole number in 1.."):
            cfg.with_streaming(**bad)


@pytest.mark.parametrize(
    "command", [["eval"], ["bench"], ["soak"], ["bench", "report", "x.json", "--out"]]
)
def test_a_report_path_that_cannot_be_written_is_refused_before_the_run(command, tmp_path, capsys):
    """eval, soak and bench write their report at the end, after minutes of work: a folder, or
    a path under a file, used to end them in a traceback that lost everything measured."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    flag = [] if command[-1] == "--out" else ["--json"]
    for bad, why in ((tmp_path, "is a folder"), (blocker / "r.json", "is not a writable folder")):
        assert cli.main([*command, *flag, str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err, err
    assert blocker.read_text() == "mine"


def test_a_report_that_cannot_be_written_at_the_end_is_one_line(tmp_path):
    from edgetalk.cliargs import write_report
    from edgetalk.errors import InputError

    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="cannot write"):
        write_report(tmp_path / "f" / "r.json", "{}")
    write_report(tmp_path / "new" / "r.json", "{}")  # missing folders are made
    assert (tmp_path / "new" / "r.json").read_text() == "{}"
