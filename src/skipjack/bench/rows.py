"""`python -m skipjack.bench.rows [MODEL]`: time the model's linear layers by the number of rows they multiply.

Why `skipjack.models.common.PAD_ROWS` exists: oneDNN's packed fp32 kernels are not fastest at one row on every
CPU (on AVX-512 they block rows in sixes), so a plain step can be made faster by padding its one row with zero
rows. This times one pass over every packed linear layer of the model (lm_head excluded), unpadded, for each
row count, interleaving the counts round by round and keeping the median. The bench records the same
measurement in results.json (`linear_rows`), so the padding rule can be checked on the machine of the run.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def linear_ms_by_rows(model, rows: tuple[int, ...] = tuple(range(1, 13)), rounds: int = 7) -> dict[int, float]:
    """Median milliseconds of one pass over the model's packed linears (lm_head excluded) with M input rows."""
    from skipjack.models.common import Linear

    linears = [m for m in model.modules() if isinstance(m, Linear) and m.packed and m is not model.lm_head]
    if not linears:
        return {}
    inputs = {(n, f): torch.randn(n, f, dtype=model.dtype) for n in rows for f in {lin.in_features for lin in linears}}
    times: dict[int, list[float]] = {n: [] for n in rows}
    for r in range(rounds + 1):  # round 0 is warm-up
        for n in rows:
            t = time.perf_counter()
            for lin in linears:
                lin(inputs[(n, lin.in_features)], pad=1)
            if r:
                times[n].append(time.perf_counter() - t)
    return {n: round(1e3 * statistics.median(v), 2) for n, v in times.items()}


def main(argv: list[str]) -> int:
    from skipjack.errors import SkipjackError
    from skipjack.loading import load
    from skipjack.models.common import PAD_ROWS

    try:
        loaded = load(argv[0] if argv else None)
    except SkipjackError as e:
        print(f"skipjack: {e}", file=sys.stderr)
        return 2
    ms = linear_ms_by_rows(loaded.model)
    if not ms:
        print("no packed linear layers (oneDNN unavailable or a non-fp32 dtype): nothing is padded")
        return 0
    print(f"{loaded.name}: one pass over its packed linear layers, median ms by input rows (unpadded)")
    for n, v in ms.items():
        note = f"  (padded to {PAD_ROWS} in use)" if n < PAD_ROWS else ""
        print(f"{n:>3} rows  {v:7.2f} ms{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
