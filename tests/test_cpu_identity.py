"""The CPU's family, model and kernel-relevant extensions in `doctor` and in bench reports: VMs
that all call themselves "AMD EPYC" ran INT8 at 0.95x and at 1.16x fp32 (README, Benchmarks)."""

from __future__ import annotations

import json

from edgetalk import cli
from edgetalk.benchmarks import device
from edgetalk.benchmarks.report import device_table

ZEN1 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx f16c fma avx2 bmi2
processor\t: 1
cpu family\t: 23
model\t\t: 1
flags\t\t: fpu vme sse sse2 avx f16c fma avx2 bmi2 avx512f
"""

XEON = """cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480C
flags\t\t: avx avx2 fma f16c avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 avx_vnni
"""

GRAVITON = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp sve i8mm bf16
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""

MAC = """hw.optional.arm.FEAT_DotProd: 1
hw.optional.arm.FEAT_I8MM: 0
hw.optional.arm.FEAT_FP16: 1
hw.optional.neon: 1
hw.optional.arm.FEAT_SME: 0
"""


def test_x86_family_model_and_extensions_from_the_first_cpu():
    features, ident = device.parse_cpuinfo(ZEN1)
    assert ident == "family 23 model 1"
    # the first processor's flags only (the second's avx512f is not this machine's first CPU)
    assert features == ["avx", "avx2", "fma", "f16c"]
    features, ident = device.parse_cpuinfo(XEON)
    assert ident == "family 6 model 143"
    assert {"avx512_vnni", "amx_int8", "avx_vnni", "avx512_bf16"} <= set(features)


def test_arm_features_are_named_as_arm_names_them():
    features, ident = device.parse_cpuinfo(GRAVITON)
    assert ident is None
    assert features == ["neon", "dotprod", "fp16", "i8mm", "bf16", "sve"]
    assert device.parse_sysctl(MAC) == ["neon", "dotprod", "fp16"]


def test_garbage_gives_nothing_not_an_error():
    assert device.parse_cpuinfo("") == ([], None)
    assert device.parse_cpuinfo("model\t: Raspberry Pi 4\nflags : \x00\xff") == ([], None)
    assert device.parse_sysctl("not: a: sysctl\n") == []


def test_device_record_and_merged_table_carry_them(monkeypatch):
    monkeypatch.setattr(device, "measure_peaks", lambda *a: {"cpu": 1.0})
    monkeypatch.setattr(device, "cpu_identity", lambda: device.parse_cpuinfo(ZEN1))
    d = device.device_info("zen1")
    assert d["cpu_id"] == "family 23 model 1" and d["cpu_features"] == [
        "avx",
        "avx2",
        "fma",
        "f16c",
    ]
    json.dumps(d)  # the bench JSON holds it as is
    old = {k: v for k, v in d.items() if k not in ("cpu_id", "cpu_features")}  # an older file
    table = device_table([d, {**old, "name": "older"}])
    row = next(line for line in table.splitlines() if line.startswith("| zen1"))
    assert "(family 23 model 1)" in row and "avx avx2 fma f16c" in row
    row = next(line for line in table.splitlines() if line.startswith("| older"))
    assert "–" in row


def test_the_bench_schema_checks_the_record_and_accepts_older_files(monkeypatch):
    from edgetalk.benchmarks.schema import DEVICE, validate

    monkeypatch.setattr(device, "measure_peaks", lambda *a: {"cpu": 1.0})
    d = device.device_info("x")
    assert validate(d, DEVICE) == []
    older = {k: v for k, v in d.items() if k not in ("cpu_id", "cpu_features")}
    assert validate(older, DEVICE) == []
    assert validate({**d, "cpu_features": "avx2"}, DEVICE)  # a string is not a list
    assert validate({**d, "cpu_id": 23}, DEVICE)


def test_doctor_names_this_cpu(capsys):
    assert cli.main(["doctor"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("CPU"))
    features, ident = device.cpu_identity()
    assert device.cpu_model() in line
    assert (ident or "") in line
    assert " ".join(features) in line if features else "extensions unknown" in line
