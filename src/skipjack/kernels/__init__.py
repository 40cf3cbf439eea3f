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

from skipjack import store
from skipjack.errors import SkipjackError
from skipjack.store import home

SOURCE = Path(__file__).with_name("qk.cpp")  # includes the headers beside it (simd, matmul, attention, ...)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(
                    sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "f16c", "amx")))
                )
    except OSError:
        pass
    return os.uname().machine


def build_name() -> str:
    sources = [SOURCE, *sorted(SOURCE.parent.glob("*.h"))]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + _cpu_flags().encode()).hexdigest()[:12]
    return f"skipjack_qk_{digest}"


def kernels_home() -> Path:
    """Where builds are kept: `$SKIPJACK_KERNELS`, else `kernels/` under the skipjack home (a build depends on
    the source and the CPU only, so one folder can serve several homes: the test suite's temporary ones)."""
    raw = os.environ.get("SKIPJACK_KERNELS")
    return Path(raw).expanduser().absolute() if raw and raw.strip() else home() / "kernels"


@functools.cache
def _load():
    name = build_name()
    where = kernels_home() / name
    where.mkdir(parents=True, exist_ok=True)
    if sys.stderr.isatty() and not any(where.glob("*.so")):
        print("skipjack: compiling the CPU kernels for this machine, once (about a minute)", file=sys.stderr)
    # torch's own build lock is a plain file that a killed build leaves behind, and then every later build
    # waits for it forever. Ours is an flock (released when its process dies), with a bounded wait; holding
    # it, no other skipjack process is building here, so a torch lock file left here is stale.
    with store.locked(where / ".skipjack.lock", "building the CPU kernels", wait=max(store.lock_wait(), 300.0)):
        (where / "lock").unlink(missing_ok=True)
        return _built(name, where) or _build(name, where)


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


def _build(name: str, where: Path):
    import torch.utils.cpp_extension as ext

    return ext.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(where),
        verbose=False,
    )


def kernels():
    """The compiled extension (built on first use)."""
    try:
        return _load()
    except Exception as e:  # no compiler, no ninja, a failed build: a clear message rather than a traceback
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise SkipjackError(f"the q4/q8 CPU kernels could not be built here ({last}); use --dtype fp32") from None


def available() -> bool:
    try:
        kernels()
        return True
    except SkipjackError:
        return False
