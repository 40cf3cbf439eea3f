"""Facts about this machine's CPU, read from the operating system and never assumed: which SIMD instruction sets
its flags name (Linux: the `flags` line of /proc/cpuinfo on x86, `Features` on Arm).

`cpu_flags()` is None where no flags can be read (another OS, a sandbox without /proc): unknown, not absent.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# (name shown, the flag that names it), in the order shown
X86_SETS = (
    ("AVX2", "avx2"),
    ("FMA", "fma"),
    ("F16C", "f16c"),
    ("AVX-512 F", "avx512f"),
    ("AVX-512 BW", "avx512bw"),
    ("AVX-512 VL", "avx512vl"),
    ("AVX-512 VNNI", "avx512_vnni"),
    ("AVX-512 BF16", "avx512_bf16"),
    ("AVX-VNNI", "avx_vnni"),
    ("AMX-TILE", "amx_tile"),
    ("AMX-INT8", "amx_int8"),
    ("AMX-BF16", "amx_bf16"),
)
ARM_SETS = (("NEON", "asimd"), ("NEON dot product", "asimddp"), ("I8MM", "i8mm"), ("BF16", "bf16"), ("SVE", "sve"))


def parse_flags(cpuinfo: str) -> set[str] | None:
    """The flags of the first processor in /proc/cpuinfo's text; None if it lists none."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_flags() -> set[str] | None:
    """This CPU's flags, from /proc/cpuinfo; None where it cannot be read."""
    try:
        return parse_flags(CPUINFO.read_text())
    except OSError:
        return None


def instruction_sets(flags: set[str] | None) -> tuple[list[str], list[str]] | None:
    """(the instruction sets that the flags name, those they do not), each in table order, from the table of the
    flags' architecture (x86: every x86-64 CPU has SSE2; else Arm); None for unknown flags."""
    if flags is None:
        return None
    table = X86_SETS if "sse2" in flags else ARM_SETS
    return [n for n, f in table if f in flags], [n for n, f in table if f not in flags]
