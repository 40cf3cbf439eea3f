"""Facts about this machine's CPU, read from the operating system and never assumed, in one place (nothing else
reads /proc/cpuinfo; tests/test_architecture.py checks it): its model name (`cpu_name`: measurement caches are
keyed by it), which SIMD instruction sets its flags name (Linux: the `flags` line of /proc/cpuinfo on x86,
`Features` on Arm), and the flags the q4/q8 kernels' build is keyed by (`kernel_flags`).

`cpu_flags()` is None where no flags can be read (another OS, a sandbox without /proc): unknown, not absent.
"""

from __future__ import annotations

import os
import platform
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


def cpuinfo() -> str:
    """/proc/cpuinfo's text; "" where it cannot be read."""
    try:
        return CPUINFO.read_text()
    except OSError:
        return ""


def field(text: str, key: str) -> str | None:
    """The value of the first line of /proc/cpuinfo's `text` whose key is `key`; None if there is none."""
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return None


def cpu_flags() -> set[str] | None:
    """This CPU's flags, from /proc/cpuinfo; None where it cannot be read."""
    return parse_flags(cpuinfo())


def cpu_name() -> str:
    """The CPU's model name (verify costs, and the cached measurements keyed by it, belong to one CPU); the
    platform's processor or architecture where /proc/cpuinfo names none."""
    return field(cpuinfo(), "model name") or platform.processor() or platform.machine()


KERNEL_FLAGS = ("avx", "fma", "f16c", "amx")  # the x86 flags that change what `-march=native` compiles to


def kernel_flags() -> str:
    """What the q4/q8 kernels' build is keyed by (`skipjack.weights.kernels.build_name`): the x86 flags that
    start with `KERNEL_FLAGS`, sorted; the architecture's name on a CPU with no x86 `flags` line."""
    flags = field(cpuinfo(), "flags")
    if flags is None:
        return os.uname().machine
    return " ".join(sorted(f for f in flags.split() if f.startswith(KERNEL_FLAGS)))


def instruction_sets(flags: set[str] | None) -> tuple[list[str], list[str]] | None:
    """(the instruction sets that the flags name, those they do not), each in table order, from the table of the
    flags' architecture (x86: every x86-64 CPU has SSE2; else Arm); None for unknown flags."""
    if flags is None:
        return None
    table = X86_SETS if "sse2" in flags else ARM_SETS
    return [n for n, f in table if f in flags], [n for n, f in table if f not in flags]
