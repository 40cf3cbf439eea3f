"""The copy oracle (`skipjack.bench.analysis.headroom`): span search, the dynamic programme, and the run-level bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skipjack.bench.analysis import headroom
from skipjack.errors import SkipjackError


def _naive(context: list[int], rest: list[int], cap: int) -> int:
    spans = {tuple(context[i:j]) for i in range(len(context)) for j in range(i + 1, len(context) + 1)}
    return max([a for a in range(1, min(cap, len(rest)) + 1) if tuple(rest[:a]) in spans], default=0)


def test_copyable_finds_the_longest_prefix_that_occurs_as_a_span():
    ctx = np.array([1, 2, 3, 1, 2, 4])
    assert headroom.copyable(ctx, [1, 2, 4, 9]) == 3  # the second occurrence of 1 2 goes on with 4
    assert headroom.copyable(ctx, [2, 3, 1, 2, 4, 5]) == 5
    assert headroom.copyable(ctx, [1, 2, 4, 9], cap=2) == 2
    assert headroom.copyable(ctx, [4, 1]) == 1  # a span may end at the context's last token
    assert headroom.copyable(ctx, [7, 1]) == 0 and headroom.copyable(ctx, []) == 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=12),
    st.lists(st.integers(0, 3), max_size=8),
    st.integers(1, 8),
)
def test_copyable_agrees_with_a_brute_force_search(context, rest, cap):
    assert headroom.copyable(np.array(context), rest, cap) == _naive(context, rest, cap)


def _curves(rel) -> list[dict]:
    """One context bucket: a plain step of 10 ms and c(n) = rel(n) at the report's widths."""
    return [{"context": [0, None], "t1_seconds": 0.01, "cost": {str(n): rel(n) for n in (2, 4, 8, 12, 16)}}]


def test_oracle_drafts_a_whole_copied_span_in_one_pass_when_width_is_free():
    prompt, tokens = list(range(1, 9)), list(range(1, 9))  # the answer repeats the prompt
    o = headroom.oracle(prompt, tokens, headroom.cost_tables(_curves(lambda n: 1.0)))
    # tokens[0] comes from the prefill; one pass drafts tokens[1:7] (all copyable) and adds tokens[7] as its bonus
    assert o["passes"] == 1 and o["free_passes"] == 1
    assert o["seconds"] == pytest.approx(0.01) and o["plain_seconds"] == pytest.approx(0.07)


def test_oracle_never_beats_plain_when_each_token_costs_a_plain_step():
    prompt, tokens = [5, 6, 7, 8, 5, 6, 7, 8], [5, 6, 7, 8, 9, 5, 6, 7, 8, 9]
    o = headroom.oracle(prompt, tokens, headroom.cost_tables(_curves(float)))  # c(n) = n
    assert o["seconds"] == pytest.approx(o["plain_seconds"]) and o["plain_seconds"] == pytest.approx(0.09)
    assert o["free_passes"] < 9  # free verification would copy the repeats


def test_oracle_weighs_width_against_passes():
    """c(n) = 1 up to 4 tokens, then steep: a copyable run of 8 goes in two passes of 4, not one of 8."""
    prompt, tokens = list(range(10, 20)), [0, *range(10, 19), 0]
    tables = headroom.cost_tables(_curves(lambda n: 1.0 if n <= 4 else 10.0))
    o = headroom.oracle(prompt, tokens, tables)
    assert headroom.copyable(np.array(prompt + [0]), tokens[1:10]) == 9
    # passes of 4 new tokens (3 drafts + bonus): emitted 1 -> 5 -> 9, then 1 draft + bonus -> 11, all at c = 1
    assert o["passes"] == 3 and o["seconds"] == pytest.approx(0.03)


def _results(rows, curves) -> dict:
    return {"machine": {"date": "d"}, "cost_curves": curves, "runs": rows}


def test_headroom_sums_prompts_and_implies_the_end_to_end_bound():
    prompt = list(range(1, 9))
    row = {"id": "a", "method": "plain", "prompt_tokens": 8, "tokens": prompt, "seconds": 1.0, "prefill_seconds": 0.3}
    other = dict(row, method="pld", seconds=0.5)
    h = headroom.headroom(_results([row, other], _curves(lambda n: 1.0)), {"a": prompt})
    # modelled decoding: plain 7 steps of 10 ms, the oracle one pass of 10 ms -> 7x
    assert h["decode_speedup"] == pytest.approx(7.0) and h["oracle_tokens_per_pass"] == pytest.approx(7.0)
    assert h["end_to_end_speedup"] == pytest.approx(1.0 / (0.3 + 0.7 / 7.0))
    assert h["prompts"] == 1 and h["run_date"] == "d"
    with pytest.raises(SkipjackError, match="suite changed"):
        headroom.headroom(_results([row], _curves(lambda n: 1.0)), {"a": prompt[:-1]})
    with pytest.raises(SkipjackError, match="no verify-cost curves"):
        headroom.headroom(_results([row], None), {"a": prompt})
    with pytest.raises(SkipjackError, match="no plain outputs"):
        headroom.headroom(_results([other], _curves(lambda n: 1.0)), {"a": prompt})
