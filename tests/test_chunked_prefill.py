"""Chunked prefill (issue 37): a prompt run in parts writes the same cache and gives the same logits as one
pass (bitwise at q4), and in a batch a joining prompt runs a chunk per step while the running requests keep
stepping; every request's tokens are its tokens alone."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_engine

from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.session import Prefill
from skipjack.engine import Request


@pytest.mark.parametrize("n", [1, 3, 7, 64])
def test_a_prompt_in_parts_is_the_prompt_at_once(tiny_llama_q4, n):
    model, prompt = tiny_llama_q4, [(7 * i + 3) % 48 for i in range(40)]
    whole = Prefill(model, prompt, 8).run()
    parts, runs = Prefill(model, prompt, 8), 0
    while (start := parts.run(n)) is None:
        runs += 1
        assert parts.left > 0
    assert runs == max(0, -(-len(prompt) // n) - 1) and start.ran == len(prompt)
    assert torch.equal(start.logits, whole.logits)
    for a, b in zip(start.cache, whole.cache):
        assert torch.equal(a.k[:, :, : len(prompt)], b.k[:, :, : len(prompt)])


def test_running_requests_keep_stepping_while_a_long_prompt_joins(tmp_path):
    with tiny_engine(tmp_path / "home") as e:
        params = SamplingParams(max_new_tokens=12)
        short = Request([5, 6, 7, 8], params, "pld")
        long = Request([(3 * i + 1) % 200 + 10 for i in range(300)], params, "plain")
        alone = [e.complete(Request(list(r.prompt), params, r.method)).tokens for r in (short, long)]
        runner = e.runner(chunk=32)
        hs = runner.add(short)
        got = {id(hs): []}
        for h, _, step in runner.step():  # the short prompt runs in one chunk and joins
            got[id(h)] += step.tokens
        hl = runner.add(long)
        got[id(hl)], while_waiting = [], 0
        while runner.busy():
            steps = runner.step()
            if hl in runner.waiting:
                while_waiting += sum(1 for h, _, _ in steps if h is hs)
            for h, _, step in steps:
                got[id(h)] += step.tokens
        assert while_waiting >= 5  # the short request stepped while the long prompt ran its chunks
        assert [got[id(hs)], got[id(hl)]] == alone


def test_a_request_dropped_while_its_prompt_runs(tmp_path):
    with tiny_engine(tmp_path / "home") as e:
        runner = e.runner(chunk=16)
        h = runner.add(Request(list(range(10, 110)), SamplingParams(max_new_tokens=4)))
        runner.step()
        assert h in runner.waiting
        runner.drop(h)
        assert not runner.busy() and not runner.handles
