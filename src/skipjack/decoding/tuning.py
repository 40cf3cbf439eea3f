"""Tuning: what this machine's kernels do fastest, measured once per model and machine at load, cached on disk.

`tune(model)` runs at `Engine.load` (never in a request's path) and returns a `Tuning`. Two measurements:

1. **Row padding and the plain layout** of the packed linears (`skipjack.weights.linear.PackedLinear`). oneDNN's packed
   fp32 kernels are not fastest at one input row on every CPU (on AVX-512 they block rows by five or six), and
   each output row of a linear layer depends only on its own input row, so an input of m rows may be padded
   with zero rows to any p >= m and the first m output rows kept. For each weight shape (in, out) we time one
   pass over the model's linears of that shape at every row count up to MAX_ROWS (unpadded, rounds
   interleaved, median kept) and pad m rows to the fastest p in [m, MAX_ROWS], if that is at least MIN_GAIN
   faster than m itself. BLAS's matrix-vector kernel on the weight's plain [out, in] layout (`F.linear`) can
   beat every packed option at one or two rows and loses from about four, so up to PLAIN_ROWS rows it is
   timed too and chosen (`PLAIN`) where it beats the best packed option by PLAIN_GAIN. That keeps a second
   copy of the shape's weights, so a shape that never chooses it drops the copy.
2. **The verify-cost prior** of the cost model (`skipjack.decoding.cost.CostModel.measure`): forwards over 1..32 new
   tokens at two contexts, measured with the padding in place (its cache key includes the padding).

Both are cached under `$SKIPJACK_HOME/rows/` and `$SKIPJACK_HOME/costs/`, keyed by what they depend on (the
architecture and dtype, the CPU, torch's threads and version, the weight format), never by the weights'
values; `remeasure=True` measures afresh (the bench does, so its numbers reflect the run's conditions).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from skipjack.decoding.cost import CostModel
from skipjack.machine import cpu_name
from skipjack.models import DecoderLM
from skipjack.schemas import CostPrior, RowsCache, read_cache
from skipjack.store import cache_file, write_atomic
from skipjack.weights.linear import PLAIN, PackedLinear

MAX_ROWS = 12  # row counts measured: 1 .. MAX_ROWS (a verify step is rarely wider)
PLAIN_ROWS = 4  # row counts at which the plain layout is timed too
MIN_GAIN = 0.03  # pad only where the padded kernel is at least this much faster
PLAIN_GAIN = 0.05  # use the plain layout (a second copy of the weights) only where it is this much faster
ROUNDS = 7
ROWS_FORMAT = 2  # bump when the row measurement changes: older cached choices are then ignored
PRIOR_FORMAT = 2  # the same for the cost prior


@dataclass
class Tuning:
    """What `tune` chose and measured for one model."""

    pads: dict[str, list[int]] = field(default_factory=dict)  # "IN x OUT" -> padded rows (or PLAIN) per row count
    ms: dict[str, dict[int, float]] = field(default_factory=dict)  # "IN x OUT" -> {rows: median ms, packed}
    plain_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # the same in the plain layout
    prior: CostModel | None = None  # the measured verify-cost prior (None when not asked for)

    def linear_rows(self) -> dict:
        """The bench's `linear_rows` record: {"ms": {rows: ms of one pass over all packed linears}, ...}."""
        first = next(iter(self.ms.values()), {})
        total = {n: round(sum(v[n] for v in self.ms.values()), 2) for n in first}
        return {"ms": total, "pads": self.pads, "ms_by_shape": self.ms, "plain_ms_by_shape": self.plain_ms}


def tune(model: DecoderLM, remeasure: bool = False, cost: bool = True) -> Tuning:
    """Measure (or read from the disk cache) and apply the row padding, then the cost prior (if `cost`)."""
    t = tune_rows(model, remeasure)
    if cost:
        t.prior = cost_prior(model, t.pads, remeasure)
    return t


def _notice(what: str) -> None:
    if sys.stderr.isatty():  # a person waiting; pipes and tests get results and errors only
        print(f"skipjack: measuring {what} on this machine, once (cached)", file=sys.stderr)


# ---- 1. row padding and the plain layout ----


def linears_by_shape(model: DecoderLM) -> dict[tuple[int, int], list[PackedLinear]]:
    """The model's packed linear layers grouped by weight shape (in, out)."""
    out: dict[tuple[int, int], list[PackedLinear]] = defaultdict(list)
    for m in model.modules():
        if isinstance(m, PackedLinear):
            out[(m.in_features, m.out_features)].append(m)
    return dict(out)


def time_rows(linears: list[PackedLinear], rows, rounds: int = ROUNDS, plain: bool = False) -> dict[int, float]:
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
                if plain:
                    F.linear(x, lin.plain, lin.bias)
                else:
                    lin(x, pad=1)
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


def tune_rows(model: DecoderLM, remeasure: bool = False) -> Tuning:
    """Measure (or read) and apply the row padding of every packed fp32 linear layer. Nothing is packed in
    fp32 (bf16, fp64, no oneDNN): an empty `Tuning`, and no file."""
    groups = linears_by_shape(model) if model.dtype == torch.float32 else {}
    if not groups:
        return Tuning()
    path = rows_path(model, groups)
    found = None if remeasure else _read_rows(path, groups)
    if found is None:
        _notice("the linear layers' fastest row counts")
        ms = {_name(s): time_rows(lins, range(1, MAX_ROWS + 1)) for s, lins in groups.items()}
        plain = {
            _name(s): time_rows(lins, range(1, PLAIN_ROWS + 1), plain=True)
            for s, lins in groups.items()
            if all(lin.plain is not None for lin in lins)
        }
        found = Tuning({k: choose(v, plain.get(k)) for k, v in ms.items()}, ms, plain)
        write_atomic(path, json.dumps({"pads": found.pads, "ms": found.ms, "plain_ms": found.plain_ms}))
    for shape, lins in groups.items():
        pads = tuple(found.pads[_name(shape)])
        for lin in lins:
            lin.pad_to = pads
            if PLAIN not in pads:
                lin.plain = None  # the plain copy is never used: free it
    return found


def _name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _machine() -> dict:
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def rows_path(model: DecoderLM, groups) -> Path:
    key = {"shapes": sorted(groups), "config": dataclasses.asdict(model.config), "format": ROWS_FORMAT}
    return cache_file("rows", key | _machine())


KEYS = ("ms", "plain_ms")


def _read_rows(path: Path, groups) -> Tuning | None:
    """The cached measurement, or None if missing, unreadable, of another shape (`schemas.RowsCache`) or not
    about these shapes at every row count (then it is measured again and rewritten)."""
    found = read_cache(path, RowsCache)
    if found is None or set(found.ms) != {_name(shape) for shape in groups}:
        return None
    for shape in groups:
        name = _name(shape)
        p, ms = found.pads.get(name), found.ms.get(name, {})
        if p is None or p[:1] != [0] or not all(m <= q or q == PLAIN for m, q in enumerate(p)):
            return None
        if set(ms) != set(range(1, MAX_ROWS + 1)):
            return None
    return Tuning(found.pads, found.ms, found.plain_ms)


# ---- 2. the verify-cost prior ----


def cost_prior(model: DecoderLM, pads: dict[str, list[int]], remeasure: bool = False) -> CostModel:
    """The measured prior of the cost model (a fresh, learning `CostModel`), read from its cache file or
    measured (several seconds of forwards) and written there."""
    path = prior_path(model, pads)
    cm = None if remeasure else _read_prior(path)
    if cm is None:
        _notice("the cost of verifying drafts")
        cm = CostModel.measure(model)
        write_atomic(path, json.dumps(cm.prior_json()))
    return cm


def prior_path(model: DecoderLM, pads: dict[str, list[int]]) -> Path:
    """Keyed by what the cost depends on: the architecture and dtype, the CPU, torch's threads and version,
    the weight format and its row padding, and the build of the q4/q8 kernels that multiply it."""
    formats = sorted({type(m).__name__ for m in model.linears()})
    key = {"config": dataclasses.asdict(model.config), "dtype": str(model.dtype), "formats": formats, "pads": pads}
    if "QuantLinear" in formats:
        from skipjack.weights.kernels import build_name

        key["kernels"] = build_name()
    return cache_file("costs", key | _machine() | {"format": PRIOR_FORMAT})


def _read_prior(path: Path) -> CostModel | None:
    """The cached prior; None if missing, unreadable or malformed (then it is measured again and rewritten)."""
    found = read_cache(path, CostPrior)
    return None if found is None else CostModel.from_prior_json(found.model_dump())
