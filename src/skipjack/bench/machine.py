"""Facts about the machine for results.json: CPU (its instruction sets read from its flags: `skipjack.machine`),
versions, measured memory bandwidth, and RSS sampling."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
import threading
import time

from skipjack.machine import cpu_flags, cpu_name, instruction_sets

BANDWIDTH_MB = 512  # size of the array copied to measure memory bandwidth


def measure_bandwidth(mb: int | None = None) -> float:
    """Memory bandwidth in GB/s: best of 3 copies of an `mb` MB float32 tensor (read + write bytes)."""
    import torch

    mb = mb or BANDWIDTH_MB
    a = torch.ones(mb * (1 << 20) // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def _llamacpp_build() -> str | None:
    """Which llama.cpp build `make bench-peers` made and smoke-tested (tools/build-llamacpp.sh), if any."""
    from skipjack.schemas import LlamacppBuild, read_cache
    from skipjack.store import home

    b = read_cache(home() / "llamacpp-build.json", LlamacppBuild)
    return None if b is None else f"{b.build} build ({b.cmake_args})"


def machine_info(bandwidth_gbs: float) -> dict:
    import psutil
    import torch

    def version(mod: str):
        try:
            from importlib.metadata import version as v

            return v(mod)
        except Exception:
            return None

    isa = instruction_sets(cpu_flags())  # None: no flags could be read (not: none present)
    return {
        "cpu": cpu_name(),
        "isa": isa and isa[0],
        "isa_absent": isa and isa[1],
        "kernels_isa": _kernels_isa(),
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "llama_cpp_python": version("llama-cpp-python"),
        "llama_cpp_build": _llamacpp_build(),
        "bandwidth_gbs": round(bandwidth_gbs, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,  # busy machine?
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _kernels_isa() -> str | None:
    """The instruction set skipjack's kernels were built for here (`SKIPJACK_ISA`), None where none build."""
    from skipjack.weights.kernels import available, kernels

    return kernels().isa() if available() else None


class RssSampler(threading.Thread):
    """Samples the process RSS every `period` s; `peaks[label]` is the max seen while `label` was current."""

    def __init__(self, period: float = 0.02):
        import psutil

        super().__init__(daemon=True)
        self.proc, self.period, self.label = psutil.Process(), period, None
        self.peaks: dict[str, float] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            self.sample()

    def sample(self) -> None:
        label = self.label
        if label is not None:
            mb = self.proc.memory_info().rss / 2**20
            self.peaks[label] = max(self.peaks.get(label, 0.0), mb)

    def stop(self) -> None:
        self.stopped.set()


def peak_rss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)
