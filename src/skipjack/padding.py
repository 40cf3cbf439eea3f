"""Row padding and kernel choice for the packed linear layers, measured per weight shape on this machine.

oneDNN's packed fp32 kernels are not fastest at one input row on every CPU: on AVX-512 they block rows by
five or six, and one row costs more than five (`python -m skipjack.bench.rows` prints the table). Each output
row of a linear layer depends only on its own input row, so an input of m rows may be padded with zero rows
to any p >= m and the first m output rows kept. For each weight shape (in, out) we time one pass over the
model's linears of that shape at every row count up to MAX_ROWS (unpadded, rounds interleaved, median kept)
and pad m rows to the fastest p in [m, MAX_ROWS], if that is at least MIN_GAIN faster than m itself.

BLAS's matrix-vector kernel on the weight in its plain [out, in] layout (`F.linear`) can beat every packed
option at one or two rows (a plain decoding step), and loses from about four. So up to PLAIN_ROWS rows the
plain layout is timed too, and chosen (`PLAIN`) where it beats the best packed option by PLAIN_GAIN. That
keeps a second copy of the shape's weights in memory, so a shape that never chooses it drops the copy.

The choice is cached on disk per architecture and machine (like the verify-cost prior, which is measured
with the choice in place and keyed by it); `tune(model, remeasure=True)` measures afresh (the bench does;
shapes whose plain copies an earlier choice dropped are then timed packed only).
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
import torch.nn.functional as F

from skipjack.cost import cpu_name
from skipjack.loading import cache_file, write_atomic
from skipjack.models.common import PLAIN, DecoderLM, Linear

MAX_ROWS = 12  # row counts measured: 1 .. MAX_ROWS (a verify step is rarely wider)
PLAIN_ROWS = 4  # row counts at which the plain layout is timed too
MIN_GAIN = 0.03  # pad only where the padded kernel is at least this much faster
PLAIN_GAIN = 0.05  # use the plain layout (a second copy of the weights) only where it is this much faster
ROUNDS = 7
FORMAT = 2  # bump when the measurement changes: older cached choices are then ignored
_TUNED: weakref.WeakKeyDictionary[DecoderLM, dict] = weakref.WeakKeyDictionary()  # {"pads": ..., "ms": ...}


def linears_by_shape(model: DecoderLM) -> dict[tuple[int, int], list[Linear]]:
    """The model's packed linear layers grouped by weight shape (in, out)."""
    out: dict[tuple[int, int], list[Linear]] = defaultdict(list)
    for m in model.modules():
        if isinstance(m, Linear) and m.packed:
            out[(m.in_features, m.out_features)].append(m)
    return dict(out)


def time_rows(linears: list[Linear], rows, rounds: int = ROUNDS, plain: bool = False) -> dict[int, float]:
    """Median milliseconds of one unpadded pass over `linears` with M input rows, for each M in `rows`
    (row counts interleaved round by round; round 0 is warm-up): packed, or in the plain layout."""
    widths = {lin.in_features for lin in linears}
    inputs = {(n, f): torch.randn(n, f, dtype=torch.float32) for n in rows for f in widths}
    times: dict[int, list[float]] = {n: [] for n in rows}
    for r in range(rounds + 1):
        for n in rows:
            t = time.perf_counter()
            for lin in linears:
                x = inputs[(n, lin.in_features)]
                F.linear(x, lin.plain, lin.bias) if plain else lin(x, pad=1)
            if r:
                times[n].append(time.perf_counter() - t)
    return {n: round(1e3 * statistics.median(v), 3) for n, v in times.items()}


def choose(ms: dict[int, float], plain_ms: dict[int, float] | None = None) -> list[int]:
    """pads[m] = the row count to run m rows at (m = 0 .. max measured): the fastest measured p >= m, if it
    beats m itself by MIN_GAIN; or PLAIN where the plain layout's time for m rows beats that by PLAIN_GAIN.
    Trailing entries that change nothing are dropped."""
    top = max(ms)
    pads = [0]
    for m in range(1, top + 1):
        p = min(range(m, top + 1), key=lambda q: (ms[q], q))
        q = p if ms[p] < (1 - MIN_GAIN) * ms[m] else m
        if plain_ms and m in plain_ms and plain_ms[m] < (1 - PLAIN_GAIN) * ms[q]:
            q = PLAIN
        pads.append(q)
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
        plain = {
            _name(s): time_rows(lins, range(1, PLAIN_ROWS + 1), plain=True)
            for s, lins in groups.items()
            if all(lin.plain is not None for lin in lins)
        }
        found = {"pads": {k: choose(v, plain.get(k)) for k, v in ms.items()}, "ms": ms, "plain_ms": plain}
        if groups:  # nothing packed (bf16, no oneDNN): nothing measured, nothing worth a file
            write_atomic(path, json.dumps(found))
    for shape, lins in groups.items():
        pads = tuple(found["pads"][_name(shape)])
        for lin in lins:
            lin.pad_to = pads
            if PLAIN not in pads:
                lin.plain = None  # the plain copy is never used: free it
    _TUNED[model] = found
    return found["pads"]


def tuned(model: DecoderLM) -> dict[str, list[int]]:
    """The padding in use for this model (empty before `tune`)."""
    return _TUNED[model]["pads"] if model in _TUNED else {}


def measured(model: DecoderLM, plain: bool = False) -> dict[str, dict[int, float]]:
    """The row timings behind it: {"IN x OUT": {rows: median ms of one pass over that shape's linears}},
    packed (unpadded), or in the plain layout (the shapes and row counts where that was timed)."""
    return _TUNED[model].get("plain_ms" if plain else "ms", {}) if model in _TUNED else {}


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
        for key in ("ms", "plain_ms"):
            found[key] = {k: {int(n): float(t) for n, t in v.items()} for k, v in found[key].items()}
        for shape in groups:
            p = found["pads"][_name(shape)]
            ok = all(type(q) is int and (m <= q or q == PLAIN) for m, q in enumerate(p))
            if not (isinstance(p, list) and p[:1] == [0] and ok):
                return None
        return found
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
