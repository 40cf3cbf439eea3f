"""Row padding for the packed linear layers, measured per weight shape on this machine.

oneDNN's packed fp32 kernels are not fastest at one input row on every CPU: on AVX-512 they block rows by
five or six, and one row costs more than five (`python -m skipjack.bench.rows` prints the table). Each output
row of a linear layer depends only on its own input row, so an input of m rows may be padded with zero rows
to any p >= m and the first m output rows kept. For each weight shape (in, out) we time one pass over the
model's linears of that shape at every row count up to MAX_ROWS (unpadded, rounds interleaved, median kept)
and pad m rows to the fastest p in [m, MAX_ROWS], if that is at least MIN_GAIN faster than m itself.

The choice is cached on disk per architecture and machine (like the verify-cost prior, which is measured
with the padding in place and keyed by it); `tune(model, remeasure=True)` measures afresh (the bench does).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import weakref
from collections import defaultdict
from pathlib import Path

import torch

from skipjack.cost import cpu_name
from skipjack.loading import cache_file, write_atomic
from skipjack.models.common import DecoderLM, Linear

MAX_ROWS = 12  # row counts measured: 1 .. MAX_ROWS (a verify step is rarely wider)
MIN_GAIN = 0.03  # pad only where the padded kernel is at least this much faster
ROUNDS = 7
FORMAT = 1  # bump when the measurement changes: older cached choices are then ignored
_TUNED: weakref.WeakKeyDictionary[DecoderLM, dict] = weakref.WeakKeyDictionary()  # {"pads": ..., "ms": ...}


def linears_by_shape(model: DecoderLM) -> dict[tuple[int, int], list[Linear]]:
    """The model's packed linear layers grouped by weight shape (in, out)."""
    out: dict[tuple[int, int], list[Linear]] = defaultdict(list)
    for m in model.modules():
        if isinstance(m, Linear) and m.packed:
            out[(m.in_features, m.out_features)].append(m)
    return dict(out)


def time_rows(linears: list[Linear], rows, rounds: int = ROUNDS) -> dict[int, float]:
    """Median milliseconds of one unpadded pass over `linears` with M input rows, for each M in `rows`
    (row counts interleaved round by round; round 0 is warm-up)."""
    widths = {lin.in_features for lin in linears}
    inputs = {(n, f): torch.randn(n, f, dtype=torch.float32) for n in rows for f in widths}
    times: dict[int, list[float]] = {n: [] for n in rows}
    for r in range(rounds + 1):
        for n in rows:
            t = time.perf_counter()
            for lin in linears:
                lin(inputs[(n, lin.in_features)], pad=1)
            if r:
                times[n].append(time.perf_counter() - t)
    return {n: round(1e3 * statistics.median(v), 3) for n, v in times.items()}


def choose(ms: dict[int, float]) -> list[int]:
    """pads[m] = the row count to run m rows at (m = 0 .. max measured): the fastest measured p >= m, if it
    beats m itself by MIN_GAIN; trailing entries that pad nothing are dropped."""
    top = max(ms)
    pads = [0]
    for m in range(1, top + 1):
        p = min(range(m, top + 1), key=lambda q: (ms[q], q))
        pads.append(p if ms[p] < (1 - MIN_GAIN) * ms[m] else m)
    while len(pads) > 1 and pads[-1] == len(pads) - 1:
        pads.pop()
    return pads


def tune(model: DecoderLM, remeasure: bool = False) -> dict[str, list[int]]:
    """Measure (or read from the disk cache) and apply the row padding of every packed linear layer.
    Returns {"IN x OUT": pads}; an empty dict where nothing is packed (no oneDNN, or not fp32)."""
    if model in _TUNED and not remeasure:
        return _TUNED[model]["pads"]
    groups = linears_by_shape(model) if model.dtype == torch.float32 else {}
    path = cache_path(model, groups)
    found = None if remeasure else _read(path, groups)
    if found is None:
        ms = {_name(s): time_rows(lins, range(1, MAX_ROWS + 1)) for s, lins in groups.items()}
        found = {"pads": {k: choose(v) for k, v in ms.items()}, "ms": ms}
        if groups:  # nothing packed (bf16, no oneDNN): nothing measured, nothing worth a file
            write_atomic(path, json.dumps(found))
    for shape, lins in groups.items():
        for lin in lins:
            lin.pad_to = tuple(found["pads"][_name(shape)])
    _TUNED[model] = found
    return found["pads"]


def tuned(model: DecoderLM) -> dict[str, list[int]]:
    """The padding in use for this model (empty before `tune`)."""
    return _TUNED[model]["pads"] if model in _TUNED else {}


def measured(model: DecoderLM) -> dict[str, dict[int, float]]:
    """The row timings behind it: {"IN x OUT": {rows: median ms of one pass over that shape's linears}}."""
    return _TUNED[model]["ms"] if model in _TUNED else {}


def _name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def cache_path(model: DecoderLM, groups) -> Path:
    return cache_file(
        "rows",
        {
            "shapes": sorted(groups),
            "config": dataclasses.asdict(model.config),
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "format": FORMAT,
        },
    )


def _read(path: Path, groups) -> dict | None:
    """The cached measurement, or None if missing, unreadable or malformed (then it is measured again)."""
    try:
        found = json.loads(path.read_text())
        found["ms"] = {k: {int(n): float(t) for n, t in v.items()} for k, v in found["ms"].items()}
        for shape in groups:
            p = found["pads"][_name(shape)]
            if not (isinstance(p, list) and p[:1] == [0] and all(type(q) is int and m <= q for m, q in enumerate(p))):
                return None
        return found
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
