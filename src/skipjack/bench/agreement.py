"""How closely our greedy q4 output follows llama.cpp's on the same GGUF file: measured, never asserted.

Both multiply the file's own 4-bit weights by 8-bit activations, but they round differently (llama.cpp
quantises a k-quant's activations per 256 values and sums in another order; its attention and norms differ
too), so their greedy tokens agree until a near-tie between two tokens falls the other way; after that the
texts go their own ways. Per prompt of a run with both our `plain` and the `llamacpp` peer: the tokens the
two produced alike before the first difference, out of those both produced (ours stop at the end-of-turn
token, llama.cpp's run to the limit).
"""

from __future__ import annotations


def rows(results: dict) -> list[dict]:
    """Per prompt: tokens compared, tokens alike before the first difference."""
    by = {(r["id"], r["method"]): r for r in results.get("runs", []) if r.get("tokens") is not None}
    out = []
    for (pid, method), ours in by.items():
        theirs = by.get((pid, "llamacpp"))
        if method != "plain" or theirs is None:
            continue
        a, b = ours["tokens"], theirs["tokens"]
        n = min(len(a), len(b))
        same = next((i for i in range(n) if a[i] != b[i]), n)
        out.append({"id": pid, "compared": n, "alike": same})
    return out


def section(results: dict) -> str:
    """A BENCHMARKS.md paragraph and table ('' where the run has no llama.cpp peer beside plain)."""
    rs = rows(results)
    if not rs:
        return ""
    whole = sum(r["alike"] == r["compared"] for r in rs)
    share = sum(r["alike"] for r in rs) / max(1, sum(r["compared"] for r in rs))
    md = "## Greedy agreement with llama.cpp on the same file\n\n"
    md += (
        f"Our q4 `plain` against the `llamacpp` peer, greedy, in the main run above: {whole} of {len(rs)} prompts "
        f"identical over all the tokens both produced; {share:.0%} of the compared tokens come before the first "
        "difference. Same 4-bit weights, different rounding of activations and sums: agreement until a near-tie "
        "flips (`skipjack.bench.agreement`).\n\n"
    )
    md += "| prompt | tokens compared | alike before the first difference |\n|---|---|---|\n"
    md += "".join(f"| {r['id']} | {r['compared']} | {r['alike']} |\n" for r in rs)
    return md
