"""How much of a drafter's speedup comes from outputs that repeat themselves.

A small model decoding greedily often falls into a loop, and a loop is the easiest text there is to draft:
prompt lookup and n-grams copy it from the output itself. A speedup measured on looping outputs therefore says
little about text a user wants. So the report splits every speculative method's speedup over plain by how much
plain's output on the same prompt repeats itself:

- `self_repeat_share(tokens, n)`: the share of output positions whose n-gram (the n tokens ending there) already
  occurred earlier in the same output. 0 for text that never repeats an 8-token span; near 1 for a loop.
- A prompt *loops* when plain's output has a share above `LOOP_SHARE`; the rest are *clean*.
- `looping_prompts(results)` sorts a run's prompts; `loop_split(results)` is the report's table of each
  lossless speculative method's speedup over plain end to end and over the decoding phase, on the clean
  prompts and on the looping ones (the same ratios as the overall table, on a subset of the prompts:
  `skipjack.bench.summary.group_speedups`).
"""

from __future__ import annotations

from skipjack.bench.render import fmt
from skipjack.bench.schema import Results
from skipjack.bench.summary import group_speedups

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


def looping_prompts(results: Results) -> tuple[set[str], set[str]]:
    """(the prompts whose greedy plain output the run holds, those among them whose output loops)."""
    plain = {r["id"]: r["tokens"] for r in results.get("runs", []) if r["method"] == "plain" and r.get("tokens")}
    return set(plain), {i for i, t in plain.items() if self_repeat_share(t) > LOOP_SHARE}


def explain(loops: int, prompts: int) -> str:
    """The paragraph under the split's table that defines it."""
    return (
        f"Clean and looping prompts: plain's output on {loops} of the {prompts} prompts loops, i.e. more "
        f"than {LOOP_SHARE:.0%} of its positions end an {N}-token span that already occurred earlier in the same "
        "output (`skipjack.bench.loops`). Drafters copy such loops easily, so the clean columns are the fairer "
        "measure of what speculation gives on text a user wants."
    )


def loop_split(results: Results) -> tuple[list[str], list[list[str]], str] | None:
    """A table (header, rows) of each lossless speculative method's speedup over plain on the prompts whose plain
    output is clean and on those where it loops, and the paragraph that defines the split; None when the run has
    no greedy plain outputs or no such method."""
    prompts, looping = looping_prompts(results)
    ratios = group_speedups(results, [prompts - looping, looping])
    if not prompts or not ratios:
        return None
    rows = [[f"`{m}`", *(fmt(x, "{:.2f}×") for pair in groups for x in pair)] for m, groups in ratios.items()]
    head = ["method", f"× plain, clean ({len(prompts - looping)})", "× plain (decode), clean"]
    head += [f"× plain, looping ({len(looping)})", "× plain (decode), looping"]
    return head, rows, explain(len(looping), len(prompts))
