"""`edgetalk --help` and `edgetalk doctor` answer at once: nothing heavy is imported for them."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from edgetalk import cli, doctor

HEAVY = ("torch", "onnxruntime", "onnx", "coremltools", "mlx", "matplotlib", "cv2")

PROBE = """
import sys
from edgetalk.cli import main
try:
    code = main({argv!r})
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY", ",".join(heavy), "CODE", code, file=sys.stderr)
"""


def imported_by(argv: list[str]) -> tuple[str, str, str]:
    src = PROBE.format(argv=argv, heavy=HEAVY)
    out = subprocess.run(
        [sys.executable, "-c", src], capture_output=True, text=True, timeout=120, check=False
    )
    line = [x for x in out.stderr.splitlines() if x.startswith("HEAVY")][-1]
    _, heavy, _, code = line.split(" ")
    return heavy, code, out.stdout


@pytest.mark.parametrize("argv", [["--help"], ["doctor"], ["--version"]])
def test_help_and_doctor_import_nothing_heavy(argv):
    heavy, code, out = imported_by(argv)
    assert heavy == "", f"edgetalk {' '.join(argv)} imported {heavy}"
    assert code == "0"
    if argv == ["--help"]:
        assert all(name in out for name in cli.COMMANDS)


def test_listed_help_matches_what_each_command_registers():
    for name, (module, help_) in cli.COMMANDS.items():
        p = argparse.ArgumentParser()
        sub = p.add_subparsers()
        importlib.import_module(module).register(sub)
        registered = {a.dest: a.help for a in sub._choices_actions}
        assert registered.get(name) == help_, name


def test_a_command_still_gets_its_full_options():
    args = cli.build_parser("bench", lazy=True).parse_args(["bench", "--load", "1"])
    assert args.load == 1 and args.func is not None


def test_doctor_lists_installed_and_missing_extras(monkeypatch, capsys):
    real = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda d: "not installed" if d == "psutil" else real(d))
    monkeypatch.setattr(
        doctor, "extra_requirements", lambda: {"bench": ["matplotlib", "psutil"], "x": ["pip"]}
    )
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    extras = out.split("\nextras\n")[1].split("\n\n")[0].splitlines()
    rows = {r.split()[0]: r.strip() for r in extras}
    assert rows["bench"] == "bench  missing psutil: pip install 'edgetalk[bench]'"
    assert rows["x"].startswith("x      installed (pip ")


def test_extras_come_from_the_package_metadata():
    extras = doctor.extra_requirements()
    if extras is None:
        pytest.skip("edgetalk is not installed as a package")
    assert extras["bench"] == ["matplotlib", "psutil"]
    assert "onnxruntime" in extras["onnx"] and "all" not in extras and "test" not in extras


def test_doctor_says_whether_the_composite_is_built(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    for built in (True, False):
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a, built=built: (
                (real(name, *a) if built else None)
                if name == "edgetalk.runtime._composite"
                else real(name, *a)
            ),
        )
        if built and real("edgetalk.runtime._composite") is None:
            continue  # an install without a C compiler (test_composite.py fails that on CI)
        assert cli.main(["doctor"]) == 0
        out = capsys.readouterr().out
        row = out.split("\ncompiled\n")[1].splitlines()[0]
        assert (
            ("built (_composite" in row) if built else ("not built" in row and "C compiler" in row)
        )
