"""skipjack's C++ kernels (`qk.cpp`): block-quantised matmuls and batch-invariant attention, built on first use.

The extension is compiled once per machine with `-O3 -march=native` (gcc, through torch's cpp_extension and
ninja) into `$SKIPJACK_HOME/kernels/<name>/` (or `$SKIPJACK_KERNELS/<name>/`), where the name carries a digest
of the source and of the CPU's instruction-set flags: a cache made on another CPU is never loaded. `kernels()`
returns the module; `available()` says whether it could be built here (a one-line reason otherwise).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from skipjack import store
from skipjack.errors import SkipjackError
from skipjack.machine import kernel_flags
from skipjack.store import home

if TYPE_CHECKING:
    import torch

SOURCE = Path(__file__).with_name("qk.cpp")  # includes the headers beside it (simd, matmul, attention, ...)


ISA = "SKIPJACK_ISA"  # which instruction set the kernels are built for (ISAS); `native` by default
# native: everything the CPU has (-march=native: AVX-512 VNNI where present); avx2: the AVX2 path on a CPU that
# has more (its fallback, testable there); scalar: the portable C++ path. All give the same matmul bits.
ISAS = {
    "native": [],
    "avx2": ["-mno-avx512f", "-mno-avxvnni"],
    "scalar": ["-mno-avx2", "-mno-fma", "-mno-avx512f", "-mno-avxvnni"],
}


def isa() -> str:
    raw = os.environ.get(ISA, "native").strip() or "native"
    if raw not in ISAS:
        raise SkipjackError(f"{ISA}={raw!r}: expected one of {', '.join(ISAS)}")
    return raw


def build_name(which: str | None = None) -> str:
    which = which or isa()
    sources = [SOURCE, *sorted(SOURCE.parent.glob("*.h"))]
    raw = b"".join(p.read_bytes() for p in sources) + kernel_flags().encode()
    raw += b"" if which == "native" else which.encode()
    return f"skipjack_qk_{hashlib.sha256(raw).hexdigest()[:12]}"


def kernels_home() -> Path:
    """Where builds are kept: `$SKIPJACK_KERNELS`, else `kernels/` under the skipjack home (a build depends on
    the source and the CPU only, so one folder can serve several homes: the test suite's temporary ones)."""
    raw = os.environ.get("SKIPJACK_KERNELS")
    return Path(raw).expanduser().absolute() if raw and raw.strip() else home() / "kernels"


@functools.cache
def _load(which: str):
    name = build_name(which)
    where = kernels_home() / name
    where.mkdir(parents=True, exist_ok=True)
    if sys.stderr.isatty() and not any(where.glob("*.so")):
        print("skipjack: compiling the CPU kernels for this machine, once (about a minute)", file=sys.stderr)
    # torch's own build lock is a plain file that a killed build leaves behind, and then every later build
    # waits for it forever. Ours is an flock (released when its process dies), with a bounded wait; holding
    # it, no other skipjack process is building here, so a torch lock file left here is stale.
    with store.locked(where / ".skipjack.lock", "building the CPU kernels", wait=max(store.lock_wait(), 300.0)):
        (where / "lock").unlink(missing_ok=True)
        return _built(name, where) or _build(name, where, which)


def _built(name: str, where: Path):
    """The finished build, imported as it is (without torch's build machinery, which imports setuptools), or
    None where there is none or it does not load."""
    import importlib.util

    import torch  # noqa: F401  (the extension links against torch's libraries)

    so = where / f"{name}.so"
    if not so.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, so)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except ImportError:
        return None


def _build(name: str, where: Path, which: str):
    import torch.utils.cpp_extension as ext

    return ext.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", *ISAS[which], "-ffp-contract=off", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(where),
        verbose=False,
    )


def kernels(which: str | None = None):
    """The compiled extension (built on first use) for instruction set `which` (None: `SKIPJACK_ISA`)."""
    which = which or isa()
    try:
        return _load(which)
    except Exception as e:  # no compiler, no ninja, a failed build: a clear message rather than a traceback
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise SkipjackError(f"the q4/q8 CPU kernels could not be built here ({last}); use --dtype fp32") from None


def available() -> bool:
    try:
        kernels()
        return True
    except SkipjackError:
        return False


HUGEPAGES = "SKIPJACK_HUGEPAGES"  # 0: weights in plain allocations (for measuring what huge pages give)


class Arena:
    """Memory for weights in 2 MB huge pages (`huge_empty`: madvise before first touch): tensors are copied
    into chunks, 64-byte aligned, so that small ones waste no page of their own. Each tensor starts at its own
    offset modulo 4 KB (a stagger of 17 cache lines per tensor): a weight's values, scales and mins are read
    side by side, and streams starting at the same offset in their pages would evict each other from the same
    cache sets (measured: 25% slower on Qwen2.5-Coder-1.5B). A chunk is freed when its last tensor is."""

    CHUNK = 32 << 20
    SMALL = 1 << 16  # smaller tensors stay where they are
    STAGGER = 17 * 64

    def __init__(self):
        self.buf, self.used, self.count = None, 0, 0

    def hold(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        if n < self.SMALL or os.environ.get(HUGEPAGES, "1") == "0" or not t.is_contiguous():
            return t
        self.count += 1
        skew = self.count * self.STAGGER % 4096
        if n > self.CHUNK // 4:  # a large tensor gets its own chunk: no tail of a shared one wasted on it
            return self._copy(kernels().huge_empty(n + skew, True), skew, t)
        at = (self.used + 4095) // 4096 * 4096 + skew
        if self.buf is None or at + n > self.buf.numel():
            self.buf, at = kernels().huge_empty(self.CHUNK, True), skew
        out = self._copy(self.buf, at, t)
        self.used = at + n
        return out

    @staticmethod
    def _copy(buf: torch.Tensor, at: int, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        out = buf[at : at + n].view(t.dtype).view(t.shape)
        out.copy_(t)
        return out


_arena = Arena()


def hold(t: torch.Tensor) -> torch.Tensor:
    """`t` copied into huge-page memory (a weight the kernels stream every pass), or `t` itself where small."""
    return _arena.hold(t)
