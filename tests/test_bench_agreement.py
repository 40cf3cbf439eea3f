"""The greedy-agreement table against llama.cpp (`skipjack.bench.agreement`): counted, not asserted."""

from __future__ import annotations

from skipjack.bench import agreement


def run(pid, method, tokens):
    return {"id": pid, "method": method, "tokens": tokens}


def test_tokens_alike_before_the_first_difference():
    res = {
        "runs": [
            run("a", "plain", [1, 2, 3, 4]),
            run("a", "llamacpp", [1, 2, 9, 4, 5, 6]),
            run("b", "plain", [7, 8]),
            run("b", "llamacpp", [7, 8, 9]),  # ours stopped: compared over the two both produced
            run("c", "plain", [1]),  # no peer run: left out
            run("a", "pld", [1, 2, 3, 4]),
        ]
    }
    assert agreement.rows(res) == [{"id": "a", "compared": 4, "alike": 2}, {"id": "b", "compared": 2, "alike": 2}]
    md = agreement.section(res)
    assert "1 of 2 prompts identical" in md and "67% of the compared tokens" in md
    assert agreement.section({"runs": [run("a", "plain", [1])]}) == ""
