"""How much of a drafter's speedup comes from outputs that repeat themselves.

A small model decoding greedily often falls into a loop, and a loop is the easiest text there is to draft:
prompt lookup and n-grams copy it from the output itself. A speedup measured on looping outputs therefore says
little about text a user wants. So the report splits every speculative method's speedup over plain by how much
plain's output on the same prompt repeats itself:

- `self_repeat_share(tokens, n)`: the share of output positions whose n-gram (the n tokens ending there) already
  occurred earlier in the same output. 0 for text that never repeats an 8-token span; near 1 for a loop.
- A prompt *loops* when plain's output has a share above `LOOP_SHARE`; the rest are *clean*.
- `loop_split(results)`: per lossless speculative method, its speedup over plain end to end and over the
  decoding phase, on the clean prompts and on the looping ones (the same ratios as the overall table, on a
  subset of the prompts).
"""

from __future__ import annotations

N = 8  # tokens: long enough that ordinary phrasing ("of the", list markup) seldom repeats a whole span
LOOP_SHARE = 0.2


def self_repeat_share(tokens: list[int], n: int = N) -> float:
    """Share of positions i >= n-1 whose n-gram tokens[i-n+1 : i+1] occurred earlier in `tokens` (over all tokens)."""
    if not tokens:
        return 0.0
    seen, repeats = set(), 0
    for i in range(n, len(tokens) + 1):
        gram = tuple(tokens[i - n : i])
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(tokens)


def _rates(runs: list[dict]) -> tuple[float, float | None]:
    """(seconds, decoding-phase seconds or None when a run lacks its prefill time) summed over runs."""
    total = sum(r["seconds"] for r in runs)
    if any(r.get("prefill_seconds") is None for r in runs):
        return total, None
    return total, sum(r["seconds"] - r["prefill_seconds"] for r in runs)


def _x(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def loop_split(results: dict) -> tuple[list[str], list[list[str]], str] | None:
    """A table (header, rows) of each lossless speculative method's speedup over plain on clean and on looping
    prompts, and the paragraph that defines the split; None when the run has no greedy plain outputs or no such
    method. Every method ran the same prompts to the same tokens (it is lossless), so a ratio of summed seconds
    is the ratio of tokens/s."""
    runs = results.get("runs", [])
    plain = {r["id"]: r for r in runs if r["method"] == "plain" and r.get("tokens")}
    summary = results.get("summary", {})
    methods = [
        m for m, s in summary.items() if m != "plain" and s.get("kind") == "method" and s.get("identical_fraction") == 1
    ]
    if not plain or not methods:
        return None
    loops = {i for i, r in plain.items() if self_repeat_share(r["tokens"]) > LOOP_SHARE}
    rows = []
    for m in methods:
        mine = {r["id"]: r for r in runs if r["method"] == m and r["id"] in plain}
        cells = [f"`{m}`"]
        for group in ({i for i in mine if i not in loops}, {i for i in mine if i in loops}):
            p, q = _rates([plain[i] for i in group]), _rates([mine[i] for i in group])
            cells += [_x(p[0], q[0]), _x(p[1], q[1])] if group else ["–", "–"]
        rows.append(cells)
    clean = len(plain) - len(loops)
    head = [
        "method",
        f"× plain, clean ({clean})",
        "× plain (decode), clean",
        f"× plain, looping ({len(loops)})",
        "× plain (decode), looping",
    ]
    note = (
        f"Clean and looping prompts: plain's output on {len(loops)} of the {len(plain)} prompts loops, i.e. more "
        f"than {LOOP_SHARE:.0%} of its positions end an {N}-token span that already occurred earlier in the same "
        "output (`skipjack.bench.loops`). Drafters copy such loops easily, so the clean columns are the fairer "
        "measure of what speculation gives on text a user wants."
    )
    return head, rows, note
