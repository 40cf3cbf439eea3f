"""The bench's machine header names the instruction sets the CPU's flags name, read and never assumed
(`skipjack.machine`), on synthetic /proc/cpuinfo text."""

from __future__ import annotations

import pytest

from skipjack import machine
from skipjack.bench import render
from skipjack.bench.machine import machine_info

EPYC = "fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c bmi1 avx2 bmi2 sha_ni vaes vpclmulqdq"  # Zen 2/3
ICELAKE = EPYC + " avx512f avx512dq avx512cd avx512bw avx512vl avx512ifma avx512vbmi avx512_vnni avx512_bitalg"
SAPPHIRE = ICELAKE + " avx_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
NONE_AT_ALL = "fpu vme de pse tsc msr pae mce cx8 sse sse2"  # x86-64 without AVX (a minimal VM)
GRAVITON = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm asimddp i8mm bf16"


def cpuinfo(key: str, flags: str) -> str:
    head = "processor\t: 0\nvendor_id\t: X\nmodel name\t: Some CPU\n"
    return head + f"{key}\t\t: {flags}\nbugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\n{key}\t\t: other\n"


@pytest.mark.parametrize(
    "flags, present",
    [
        (EPYC, ["AVX2", "FMA", "F16C"]),
        (ICELAKE, ["AVX2", "FMA", "F16C", "AVX-512 F", "AVX-512 BW", "AVX-512 VL", "AVX-512 VNNI"]),
        (SAPPHIRE, [n for n, _ in machine.X86_SETS]),
        (NONE_AT_ALL, []),
    ],
)
def test_x86_flags_name_the_sets_present_and_absent(flags, present):
    found = machine.parse_flags(cpuinfo("flags", flags))
    assert found == set(flags.split())  # the first processor's line only
    have, lack = machine.instruction_sets(found)
    assert have == present
    assert lack == [n for n, _ in machine.X86_SETS if n not in present]


def test_arm_features_and_unreadable_flags():
    have, lack = machine.instruction_sets(machine.parse_flags(cpuinfo("Features", GRAVITON)))
    assert have == ["NEON", "NEON dot product", "I8MM", "BF16"] and lack == ["SVE"]
    assert machine.parse_flags("processor\t: 0\nmodel name\t: no flags here\n") is None
    assert machine.instruction_sets(None) is None  # unknown, not "none present"


def test_header_names_what_this_run_read(monkeypatch, tmp_path):
    """machine_info records what the flags say; the header shows present and absent sets; no flags: unknown."""
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "cpuinfo")
    (tmp_path / "cpuinfo").write_text(cpuinfo("flags", ICELAKE))
    m = machine_info(10.0)
    assert "AVX-512 VNNI" in m["isa"] and "AVX-VNNI" in m["isa_absent"]
    line = render.isa_text(m)
    assert "instruction sets: AVX2, FMA, F16C, AVX-512 F" in line and "(not: AVX-512 BF16, AVX-VNNI, AMX" in line
    (tmp_path / "cpuinfo").unlink()
    m = machine_info(10.0)
    assert m["isa"] is None and "unknown" in render.isa_text(m)
    assert render.isa_text({"cpu": "an older results.json"}) == ""
