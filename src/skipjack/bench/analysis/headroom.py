"""How far any prompt-lookup drafter could go on a benchmark run: the copy oracle's bound.

Lossless speculation never changes the greedy tokens, so a run's plain outputs fix what every lossless
method emits. A prompt-lookup drafter (input-guided aggressive decoding, `pld`) can only propose spans that
already occur in the prompt + output so far. The best any such drafter can do is the *copy oracle*:

- at every verify step it knows a(i), the longest prefix of the remaining output that occurs as a span of
  the text so far (the copy site a real drafter has to guess from a suffix match);
- it drafts the length k <= a(i) that minimises the total decoding time, by dynamic programming over the
  output: T(i) = min_k cost(k + 1 | context) + T(i + k + 1), all k drafted tokens being accepted;
- drafting itself is free.

Costs come from the run's own verify-cost curves (`cost_curves`: plain-step seconds and c(n) per context
bucket), for the oracle and for plain alike, so their ratio bounds the decoding-phase speedup of every
prompt-lookup drafter on that machine; with plain's measured prefill it bounds the end-to-end speedup.

`python -m skipjack.bench.analysis.headroom RUN_DIR` writes RUN_DIR/headroom.json; the report renders it under
the targets (`skipjack.bench.render.headroom_line`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from skipjack.bench.render import headroom_line
from skipjack.bench.schema import Results, read_results
from skipjack.decoding.cost import _interp, _isotonic
from skipjack.limits import MAX_DRAFT

CAP = MAX_DRAFT  # longest draft the engine verifies


def copyable(context: np.ndarray, rest: list[int], cap: int = CAP) -> int:
    """Length of the longest prefix of `rest` (at most `cap`) that occurs as a contiguous span of `context`."""
    if not rest or cap <= 0:
        return 0
    starts = np.flatnonzero(context == rest[0])  # spans matching rest[:1]
    a = 0
    while starts.size:
        a += 1  # rest[:a] occurs at every start left
        if a == len(rest) or a == cap:
            break
        starts = starts[starts + a < len(context)]
        starts = starts[context[starts + a] == rest[a]]
    return a


def cost_tables(curves: list[dict]) -> list[tuple[int, list[float]]]:
    """Per context bucket of a run's `cost_curves`: (its last context, seconds of a forward over n = 0..64 new
    tokens), non-decreasing in n, linear between the measured widths and extrapolated beyond the widest."""
    out = []
    for c in curves:
        widths = (1, *sorted(int(n) for n in c["cost"]))
        rel = _isotonic([1.0] + [c["cost"][str(n)] for n in widths[1:]])
        table = _interp(widths, rel, extrapolate=True)
        hi = c["context"][1]
        out.append((hi if hi is not None else sys.maxsize, [c["t1_seconds"] * v for v in table]))
    return out


def _seconds(tables, context: int, n: int) -> float:
    for hi, table in tables:
        if context <= hi:
            return table[n]
    return tables[-1][1][n]


def oracle(prompt: list[int], tokens: list[int], tables, cap: int = CAP) -> dict:
    """The copy oracle's decoding phase for one prompt (tokens[0] comes from the prefill): its modelled
    seconds and forward passes, plain's modelled seconds, and the passes with free, unlimited verification."""
    n, p = len(tokens), len(prompt)
    if n < 2:
        return {"seconds": 0.0, "passes": 0, "plain_seconds": 0.0, "free_passes": 0}
    text = np.asarray(prompt + tokens, dtype=np.int64)
    # reach[j]: with j tokens emitted, how many of the next ones (the last can only come as a bonus) copy a span
    reach = [0] + [copyable(text[: p + j], tokens[j : n - 1], cap) for j in range(1, n)]
    free, i = 0, 1
    while i < n:
        free, i = free + 1, i + reach[i] + 1
    best, passes, plain = [0.0] * (n + 1), [0] * (n + 1), 0.0
    for j in range(n - 1, 0, -1):
        cost = [_seconds(tables, p + j, k + 1) + best[min(n, j + k + 1)] for k in range(reach[j] + 1)]
        k = min(range(len(cost)), key=cost.__getitem__)
        best[j], passes[j] = cost[k], 1 + passes[min(n, j + k + 1)]
        plain += _seconds(tables, p + j, 1)
    return {"seconds": best[1], "passes": passes[1], "plain_seconds": plain, "free_passes": free}


def headroom(results: Results, prompt_ids: dict[str, list[int]]) -> dict:
    """The copy oracle over every prompt plain ran in `results`, against plain: modelled decoding-phase speedup,
    and the end-to-end speedup it implies with plain's measured prefill and decoding seconds."""
    from skipjack.errors import SkipjackError

    if not results.get("cost_curves"):
        raise SkipjackError("this run has no verify-cost curves (run a speculative method with plain)")
    rows = [r for r in results["runs"] if r["method"] == "plain" and r.get("tokens")]
    if not rows:
        raise SkipjackError("this run has no plain outputs to bound")
    tables = cost_tables(results["cost_curves"])
    tot = dict.fromkeys(("seconds", "passes", "plain_seconds", "free_passes"), 0.0)
    pre = dec = tokens = 0.0
    for r in rows:
        ids = prompt_ids.get(r["id"])
        if ids is None or len(ids) != r["prompt_tokens"]:
            raise SkipjackError(f"prompt {r['id']} is not the one this run used (its suite changed since)")
        for k, v in oracle(ids, r["tokens"], tables).items():
            tot[k] += v
        pre, dec = pre + r["prefill_seconds"], dec + r["seconds"] - r["prefill_seconds"]
        tokens += len(r["tokens"]) - 1
    speedup = tot["plain_seconds"] / tot["seconds"]
    return {
        "run_date": results["machine"]["date"],
        "prompts": len(rows),
        "decode_tokens": int(tokens),
        "oracle_tokens_per_pass": tokens / tot["passes"],
        "free_tokens_per_pass": tokens / tot["free_passes"],
        "decode_speedup": speedup,
        "end_to_end_speedup": (pre + dec) / (pre + dec / speedup),
        "plain_prefill_seconds": pre,
        "plain_decode_seconds": dec,
    }


def main(argv: list[str] | None = None) -> int:
    from skipjack.bench.suite import load_prompts_file, load_suite
    from skipjack.errors import run_command
    from skipjack.loading.load import load

    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.analysis.headroom", description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="a `skipjack bench --out` folder holding results.json")
    a = ap.parse_args(argv)

    def body() -> None:
        results = read_results(Path(a.dir))
        f = results.get("prompts_file")
        prompts = load_prompts_file(f) if f else load_suite(results["suite"])
        tok = load(results["model"]["name"], results["model"].get("dtype", "fp32")).tokenizer
        h = headroom(results, {p.id: tok.prompt_ids(p.messages) for p in prompts})
        (Path(a.dir) / "headroom.json").write_text(json.dumps(h, indent=1) + "\n")
        print(headroom_line(h))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
