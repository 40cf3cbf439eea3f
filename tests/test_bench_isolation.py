"""The bench's compared methods share no learned state: one method's run on a prompt never changes another's
figures on it, and the warm figure (a drafter that learned on the run's earlier prompts) never sees the measured
prompt's own answer before it is measured. On a tiny random q4 model with fixed draft sizes (no timing decides a
draft, so acceptance is deterministic)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
from conftest import tiny_engine

from skipjack.bench.machine import RssSampler
from skipjack.bench.runner import Bench

TEXTS = ["the quick brown fox", "hello world this is a tiny tokenizer for tests", "def add ( a , b ) : return a + b"]
FIGURES = ("tokens", "tokens_per_pass", "accept_hist", "draft_steps", "forward_passes")


class Quiet:
    """The progress bar's interface, silent."""

    console = SimpleNamespace(is_terminal=True)

    def update(self, *args, **kw) -> None:
        pass

    def advance(self, *args, **kw) -> None:
        pass


def measure(engine, methods: list[str], texts: list[str], new: int = 24) -> dict[tuple[str, str], dict]:
    """One bench run (warm-up, then every prompt); its runs by (method, prompt id)."""
    a = argparse.Namespace(max_new_tokens=new, temperature=0.0, seed=0, repeats=2)
    ids = [engine.tokenizer.prompt_ids([{"role": "user", "content": t}]) for t in texts]
    prompts = [(SimpleNamespace(id=f"p{i}", category="chat"), x) for i, x in enumerate(ids)]
    bench = Bench(a, {None: engine}, ["plain", *methods], {}, prompts, RssSampler())
    bench.warm_up(Quiet(), None)
    bench.measure(Quiet(), None)
    return {(r["method"], r["id"]): r for r in bench.runs}


def figures(run: dict) -> dict:
    return {k: run[k] for k in FIGURES}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with tiny_engine(tmp_path_factory.mktemp("home")) as e:
        yield e


def test_a_method_run_beside_another_measures_as_alone(engine):
    """`ngram:k=3` and `ngram:k=5` would count into one n-gram table if they shared the engine's store: the one run
    second on a prompt would find that prompt's answer learned by the other. Each has its own store, so
    `ngram:k=5`'s cold and warm figures are the same whether `ngram:k=3` ran beside it or not."""
    both = measure(engine, ["ngram:k=3", "ngram:k=5"], TEXTS)
    alone = measure(engine, ["ngram:k=5"], TEXTS)
    for i in range(len(TEXTS)):
        b, a = both["ngram:k=5", f"p{i}"], alone["ngram:k=5", f"p{i}"]
        assert b["drafter"] == "cold" and b["warm"]["drafter"] == "warm"
        assert figures(b) == figures(a), f"p{i} cold"
        assert figures(b["warm"]) == figures(a["warm"]), f"p{i} warm"
    assert max(r["draft_steps"] for r in both.values() if r["method"] != "plain") > 0  # the drafters drafted
    assert both["plain", "p0"]["drafter"] is None and "warm" not in both["plain", "p0"]


def test_warm_learns_from_earlier_prompts_only(engine):
    """Warm on the first prompt is cold (no earlier prompt; the warm-up's drafters are thrown away). A later
    prompt with the same text as an earlier one (a different prompt of the suite) finds its answer learned in the
    warm table, and only there: cold is the same as on the first."""
    runs = measure(engine, ["ngram:k=5"], [TEXTS[2], TEXTS[0], TEXTS[2]])
    first, again = runs["ngram:k=5", "p0"], runs["ngram:k=5", "p2"]
    assert figures(first["warm"]) == figures(first)
    assert figures(again) == figures(first)
    assert again["warm"]["tokens_per_pass"] > again["tokens_per_pass"]
    assert again["warm"]["tokens"] == again["tokens"]  # greedy, lossless: the same output either way


def test_a_forked_method_reads_its_own_drafters_cost_prior(monkeypatch):
    """The bench forks methods (every cold run, every warm repeat): a fork's draft-cost prior is its own
    drafter's estimate, not the original's, and its n-gram table is its own."""
    from drafters_mock import make

    m = make("ngram")
    c = m.fork()
    assert c.draft_cost.prior.drafter is c.drafter and c.drafter.table is not m.drafter.table
    monkeypatch.setattr(type(c.drafter), "cost_prior", property(lambda self: 0.25 if self is c.drafter else 0.0))
    assert c.draft_cost.per_node == 0.25 and m.draft_cost.per_node == 0.0
