"""`python -m skipjack.bench.analysis.rows [MODEL]`: time the model's linear layers by the number of rows they multiply.

Why the row tuning exists (`skipjack.decoding.tuning`): oneDNN's packed fp32 kernels are not fastest at one row on every
CPU, so a plain step can be made faster by padding its one row with zero rows, or by BLAS's matrix-vector
kernel on the plain layout. This measures afresh, for each weight shape, one pass over the model's linears of
that shape, unpadded, at each row count (rounds interleaved, median kept), and in the plain layout at one to a
few rows, and prints the choice made from it. The bench records the same measurement in results.json
(`linear_rows`).
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from skipjack.decoding.tuning import tune_rows
    from skipjack.errors import SkipjackError
    from skipjack.loading.load import load

    try:
        loaded = load(argv[0] if argv else None)
    except SkipjackError as e:
        print(f"skipjack: {e}", file=sys.stderr)
        return 2
    rows = tune_rows(loaded.model, remeasure=True).linear_rows()
    if not rows["ms"]:
        print("no packed linear layers (oneDNN unavailable or a non-fp32 dtype): nothing is padded")
        return 0
    shapes = list(rows["ms_by_shape"])
    print(f"{loaded.name}: one pass over its packed linear layers, median ms by input rows (unpadded)")
    print(f"{'rows':>4}  {'all':>8}" + "".join(f"  {s:>11}" for s in shapes))
    for n, v in rows["ms"].items():
        print(f"{n:>4}  {v:8.2f}" + "".join(f"  {rows['ms_by_shape'][s][n]:11.3f}" for s in shapes))
    plain = rows["plain_ms_by_shape"]
    if plain:
        print("the same in the plain [out, in] layout (F.linear), at the row counts where it is timed:")
        for s, v in plain.items():
            print(f"  {s}: " + ", ".join(f"{n} rows {t:.3f}" for n, t in v.items()))
    print("in use (rows -> padded rows, or -> plain layout), per shape:")
    for s, p in rows["pads"].items():
        print(f"  {s}: " + (", ".join(f"{m}->{'plain' if q < 0 else q}" for m, q in enumerate(p) if q != m) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
