"""The factual question set (`evaluation.facts`, from countryinfo and periodictable) and its scoring: a few
hundred items of one right answer each with four distinct options; exact match; multiple choice by the summed
log-probability of each option, checked by hand on a tiny model, plain and DoLa; the bench's table."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model, ours_from_hf

from skipjack.bench.factual import table
from skipjack.evaluation.facts import SHOWN, Fact, choice, facts, right
from skipjack.strategies.dola import DoLa


def test_a_few_hundred_items_each_with_one_right_answer_among_four_options():
    items = facts()
    kinds = {k: [f for f in items if f.kind == k] for k in ("capital", "symbol", "number")}
    assert len(items) >= 400 and all(len(v) >= 100 for v in kinds.values())
    for f in items:
        assert len(set(f.choices)) == 4 and f.choices[f.gold] == f.answer and f.subject not in SHOWN
    assert {f.gold for f in items} == {0, 1, 2, 3}
    got = {(f.kind, f.subject): f.answer for f in items}
    assert got[("capital", "France")] == "Paris" and got[("symbol", "gold")] == "Au" and got[("number", "gold")] == "79"
    assert len(facts(every=10)) < len(items) / 5


def test_exact_match_reads_the_first_line_case_blind():
    f = Fact("capital", "France", "Paris", ("Paris", "Rome", "Oslo", "Lima"), 0)
    assert right(" paris\nQ: next", f) and right("Paris ", f) and not right("Paris, France", f) and not right("", f)
    assert f.prompt.endswith("Q: What is the capital of France?\nA:")


class Chars:
    """A toy tokenizer: one id per character (mod the tiny model's vocabulary)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 64 for c in text]


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(hf_model("llama", seed=3, vocab=64, num_hidden_layers=4), torch.float64)


def _hand(model, prompt: list[int], cont: list[int]) -> float:
    lp = torch.log_softmax(model(torch.tensor([prompt + cont]), logits="all").logits[0].double(), -1)
    return sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont))


def test_multiple_choice_is_the_option_of_largest_summed_log_probability(model):
    tok = Chars()
    for f in facts(every=60):
        prompt = tok.encode(f.prompt)
        sums = [_hand(model, prompt, tok.encode(f.prompt + " " + o)[len(prompt) :]) for o in f.choices]
        assert choice(model, None, tok, f) == max(range(4), key=sums.__getitem__)
        assert choice(model, DoLa(weight=0.0, penalty=1.0), tok, f) == choice(model, None, tok, f)


def test_the_table_shows_each_method_accuracy_and_time():
    kinds = {"capital": {"items": 4, "exact": 1, "choice": 3}}
    row = {"lossless": True, "exact": 0.25, "choice": 0.75, "kinds": kinds, "ms_per_token": 5.0, "x_plain_time": 1.0}
    md = table({"rows": {"plain": row, "dola": row | {"lossless": False, "x_plain_time": 1.5}}})
    assert "| plain | no | 25.0% | 75.0% | 25.0% / 75.0% | 5.0 | 1.00 |" in md and "| dola | yes |" in md


def test_benchmarks_md_appends_the_runs_section_and_keeps_its_raw_data(tmp_path):
    import json

    from skipjack.bench.benchmarks_md import bench_section
    from skipjack.errors import SkipjackError

    kinds = {"number": {"items": 2, "exact": 2, "choice": 1}}
    row = {"lossless": True, "exact": 1.0, "choice": 0.5, "kinds": kinds, "ms_per_token": 4.0, "x_plain_time": 1.0}
    res = {"model": "m", "items": 2, "every": 1, "machine": {"cpu": "c", "cores": 2}, "rows": {"plain": row}}
    run, docs = tmp_path / "fact-smol", tmp_path / "docs"
    run.mkdir(), docs.mkdir()
    (run / "factual.json").write_text(json.dumps(res))
    md = bench_section("factual", run, docs)
    assert md.startswith("## Factual accuracy") and "| plain | no | 100.0% | 50.0% |" in md
    assert "docs/bench/bench-factual--fact-smol.json" in md and (docs / "bench-factual--fact-smol.json").exists()
    with pytest.raises(SkipjackError, match="no benchmark module"):
        bench_section("nosuch", run, docs)
