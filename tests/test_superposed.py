"""Superposed Decoding (`decoding.superposed`, lossy): k = 1 is plain greedy decoding, token for token (a
property test on tiny random models, fp64 and q4); the k completions are distinct, come from one cache position
per step, and each one's reported log-probability (and per-token logprobs) is what a plain forward scoring of
it gives; n <= k picks the best n; a session is reused and left holding the prompt; bad options and requests are
one-line errors; it is labelled lossy in the CLI, --json and the bench; the bench's numbers add up."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_model, tiny_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.sequence import generate
from skipjack.decoding.session import Session
from skipjack.decoding.superposed import Ngrams, Superposed, Superposition
from skipjack.drafters.ngram_table import NGramTable
from skipjack.engine import Request
from skipjack.errors import SkipjackError
from skipjack.methods import MethodSpec


def _superposed(model, prompt, params, **opts) -> tuple[Superposition, list]:
    run = Superposition(model, Superposed(**opts), prompt, params)
    while not run.ended:
        run.advance()
    return run, run.finish()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.lists(st.integers(0, 47), min_size=1, max_size=16),
    max_new=st.integers(1, 20),
    stops=st.sets(st.integers(0, 47), max_size=3),
    min_tokens=st.integers(0, 3),
    ignore_eos=st.booleans(),
    family=st.sampled_from(["llama", "llama-q4"]),
    alpha=st.sampled_from([0.0, 0.5, 0.9]),
)
def test_k1_is_plain_greedy(tiny_llama64, tiny_llama_q4, prompt, max_new, stops, min_tokens, ignore_eos, family, alpha):
    model = tiny_llama64 if family == "llama" else tiny_llama_q4
    p = SamplingParams(max_new_tokens=max_new, stop_token_ids=frozenset(stops), ignore_eos=ignore_eos,
                       min_tokens=min(min_tokens, max_new))  # fmt: skip
    steps = list(generate(model, prompt, p))
    _, (one,) = _superposed(model, prompt, p, k=1, alpha=alpha, score=0)
    assert one.tokens == [t for s in steps for t in s.tokens]
    assert one.finish == steps[-1].finish


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with tiny_engine(tmp_path_factory.mktemp("home")) as e:
        yield e


PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.lists(st.integers(3, 250), min_size=2, max_size=12), k=st.integers(2, 4), top=st.sampled_from([0, 6]))
def test_completions_are_distinct_and_scored_as_a_plain_forward_scores_them(engine, prompt, k, top):
    p = SamplingParams(max_new_tokens=10, stop_token_ids=engine.tokenizer.stop_ids, logprobs=2)
    res = engine.completions(Request(prompt, p, f"superposed:k={k},top={top}", n=k))
    assert 1 <= len(res) <= k and len({tuple(r.tokens) for r in res}) == len(res)
    assert [r.superposed["rank"] for r in res] == list(range(len(res)))
    scores = [r.superposed["score"] for r in res]
    assert scores == sorted(scores, reverse=True)
    choices = [c for c in engine.superpose(Request(prompt, p, f"superposed:k={k},top={top}", n=k)) if c][0]
    assert [c.step.tokens for c in choices] == [r.tokens for r in res]  # deterministic
    for r, c in zip(res, choices):
        plain = engine.prompt_logprobs(prompt + r.tokens, top=2)[len(prompt) :]  # one forward over all of it
        assert r.logprob == pytest.approx(sum(x.logprob for x in plain), abs=1e-4)
        assert r.new_tokens == len(r.tokens) and not r.lossless and r.method == f"superposed:k={k},top={top}"
        assert [x.logprob for x in c.step.logprobs] == pytest.approx([x.logprob for x in plain], abs=1e-4)
        assert [[t for t, _ in x.top] for x in c.step.logprobs] == [[t for t, _ in x.top] for x in plain]


def test_one_cache_position_per_step_whatever_k(engine):
    p = SamplingParams(max_new_tokens=9, ignore_eos=True)
    for k in (1, 3, 5):
        run = Superposition(engine.model, Superposed(k=k), PROMPT, p)
        while not run.advance():
            pass
        assert run.steps == 8 and run.cache.offset == len(PROMPT) + 8  # the first token came from the prompt's pass
        out = run.finish()
        assert run.cache.offset == len(PROMPT)  # the scoring passes leave the prompt's keys only
        assert len(out) == k and all(len(d.tokens) == 9 and d.finish == "length" for d in out)


def test_long_completions_are_scored_in_native_sized_passes_or_afresh(engine, monkeypatch):
    """A completion longer than one native pass (65 rows) is scored in several passes after the prompt; where the
    cache cannot be cut back to the prompt (a sliding window that dropped keys), one fresh pass: the same values
    (to the rounding of passes of other widths: a pass over more than 65 rows attends with SDPA)."""
    p = SamplingParams(max_new_tokens=90, ignore_eos=True)
    run, out = _superposed(engine.model, PROMPT, p, k=2)
    for d in out:
        plain = engine.prompt_logprobs(PROMPT + d.tokens)[len(PROMPT) :]
        assert len(d.tokens) == 90 and d.logprob == pytest.approx(sum(x.logprob for x in plain), rel=1e-4)
    again = Superposition(engine.model, Superposed(k=2), PROMPT, p)
    while not again.advance():
        pass
    monkeypatch.setattr(again.cache, "resumable", lambda n: False)
    assert [d.logprob for d in again.finish()] == pytest.approx([d.logprob for d in out], rel=1e-4)


def test_n_picks_the_best_n_and_complete_the_best(engine):
    p = SamplingParams(max_new_tokens=8, stop_token_ids=engine.tokenizer.stop_ids)
    three = engine.completions(Request(PROMPT, p, "superposed:k=3", n=3))
    two = engine.completions(Request(PROMPT, p, "superposed:k=3", n=2))
    assert [r.tokens for r in two] == [r.tokens for r in three[:2]]
    best = engine.complete(Request(PROMPT, p, "superposed:k=3"))
    assert best.tokens == three[0].tokens and best.logprob == pytest.approx(three[0].logprob)
    assert best.forward_passes == three[0].forward_passes <= 7
    ((text, step),) = engine.stream(Request(PROMPT, p, "superposed:k=3"))  # one step: the best, whole
    assert step.tokens == best.tokens and text == best.text
    plain = engine.completions(Request(PROMPT, p, "plain", n=2))  # independent streams, greedy: the same twice
    assert len(plain) == 2 and plain[0].tokens == plain[1].tokens == engine.complete(Request(PROMPT, p)).tokens


def test_a_session_is_reused_and_keeps_the_prompt_only(engine):
    p = SamplingParams(max_new_tokens=8, ignore_eos=True)
    fresh = engine.completions(Request(PROMPT, p, "superposed:k=3", n=3))
    copied = Session.prefilled(engine.model, PROMPT, 8)
    again = engine.completions(Request(PROMPT, p, "superposed:k=3", session=copied, n=3))
    assert [r.tokens for r in again] == [r.tokens for r in fresh] and again[0].cached_tokens == len(PROMPT)
    convo = Session()
    engine.completions(Request(PROMPT, p, "superposed:k=3", session=convo, n=3))
    assert convo.tokens == PROMPT and convo.cache.offset == len(PROMPT)
    nxt = engine.complete(Request(PROMPT + [40, 41], p, session=convo))  # a later turn runs only what is new
    assert nxt.tokens == engine.complete(Request(PROMPT + [40, 41], p)).tokens and nxt.cached_tokens == len(PROMPT)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("superposed:k=0", r"k \(drafts decoded together\) must be an integer in \[1, 16\]"),
        ("superposed:k=17", r"in \[1, 16\] \(got 17\)"),
        ("superposed:k=2.5", "option k must be an integer"),
        ("superposed:top=-1", r"top .* in \[0, 64\]"),
        ("superposed:alpha=1", r"alpha .* in \[0, 1\)"),
        ("superposed:alpha=x", "option alpha must be a number"),
        ("superposed:temp=0", r"temp must be a number in \(0, 10\]"),
        ("superposed:order=7", r"order .* in \[2, 6\]"),
        ("superposed:score=2", "score must be 0 or 1"),
        ("superposed:width=2", "unknown option"),
    ],
)
def test_bad_options_are_one_line_errors(spec, message):
    with pytest.raises(SkipjackError, match=message) as e:
        MethodSpec.parse(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n": 4}, "n = 4 completions, but k = 3"),
        ({"params": SamplingParams(temperature=0.7)}, "send temperature 0"),
        ({"params": SamplingParams(repetition_penalty=1.2)}, "penalties and logit_bias do not apply"),
        ({"params": SamplingParams(logit_bias={3: 1.0})}, "penalties and logit_bias do not apply"),
        ({"draft_max": 4}, "speculative n_max / p_min do not apply"),
        ({"kv": "snapkv:budget=0.5"}, "do not combine"),
        ({"n": 17}, r"n \(completions\) must be in \[1, 16\]"),
    ],
)
def test_bad_requests_are_one_line_errors(engine, fields, message):
    with pytest.raises(SkipjackError, match=message) as e:
        engine.check(Request(list(PROMPT), **({"method": "superposed:k=3"} | fields)))
    assert "\n" not in str(e.value)


def test_logprobs_need_the_scoring_pass_and_streams_need_their_own_cache(engine):
    with pytest.raises(SkipjackError, match="need score=1"):
        engine.check(Request(list(PROMPT), SamplingParams(logprobs=1), "superposed:score=0"))
    with pytest.raises(SkipjackError, match="cannot share one session"):
        engine.check(Request(list(PROMPT), method="pld", session=Session(), n=2))
    res = engine.completions(Request(list(PROMPT), SamplingParams(max_new_tokens=4), "superposed:score=0", n=2))
    assert all(r.logprob is None for r in res) and res[0].superposed["score_seconds"] == 0.0


def test_it_is_labelled_lossy():
    spec = MethodSpec.parse("superposed:k=3")
    assert not spec.lossless and not spec.identical_to_plain("q4") and spec.superposed_class is Superposed
    from skipjack.methods import method_help

    assert "superposed[:k,top,alpha,temp,order,table,score] (lossy)" in method_help()


def test_the_ngram_store_prefers_the_prompt_then_the_engines_table(engine):
    """Counts after a context the prompt holds come from the prompt; others from the engine's table (`table=`),
    smoothed towards the model: q = (c + β·p) / (N + β); no counts: q = p."""
    learned = NGramTable()
    learned.add([1, 2, 9, 1, 2, 9, 1, 2, 4], 0, 1.0)  # after (1, 2): 9 twice, 4 once
    store = Ngrams([5, 6, 7, 5, 6, 8], 3, learned)  # after (5, 6): 7 once, 8 once
    logp = torch.log(torch.tensor([0.5, 0.25], dtype=torch.float64))
    own = store.logq([0, 5, 6], [7, 9], logp).exp()
    assert own.tolist() == pytest.approx([(1 + 0.5) / 3, (0 + 0.25) / 3])
    theirs = store.logq([1, 2], [9, 4], logp).exp()
    assert theirs.tolist() == pytest.approx([(2 + 0.5) / 4, (1 + 0.25) / 4])
    assert torch.equal(store.logq([40, 41], [9, 4], logp), logp)  # nobody knows (40, 41) or (41,)
    p = SamplingParams(max_new_tokens=3)
    engine.completions(Request(PROMPT, p, "superposed:table=t", n=2))
    assert isinstance(engine.resources.tables.get("t/3"), NGramTable)  # the engine's, shared with ngram:table=t


def test_bench_counts_and_diversity():
    from skipjack.bench.superposed import distinct, summarise, table

    assert distinct([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert distinct([[1], []], 2) is None
    row = {"lossless": True, "score_seconds": 0.0, "distinct_1": 0.5, "distinct_2": 0.8, "prompt": "a"}
    sup = {"variant": "superposed:k=3", "lossless": False, "seconds": 1.0, "tokens": 30, "perplexity": [2, 4]}
    rows = [
        row | sup | {"score_seconds": 0.25},
        row | {"variant": "3 streams", "seconds": 2.0, "tokens": 30, "perplexity": [3, None]},
        row | {"variant": "plain", "seconds": 1.0, "tokens": 10, "perplexity": [2.0]},
    ]
    s = summarise(rows)
    assert s["ratios"]["throughput_x_streams"] == pytest.approx(2.0)
    assert s["ratios"]["throughput_unscored_x_streams"] == pytest.approx(30 / 0.75 / 15)
    assert s["ratios"]["perplexity_x_plain"] == pytest.approx(1.5) and s["ratios"]["perplexity_x_streams"] == 1.0
    md = table({"summary": s})
    assert "| superposed:k=3 | no | 30.0 | 3.00 |" in md and "| plain | yes |" in md


def test_bench_runs_end_to_end(tmp_path, monkeypatch):
    from skipjack.bench.superposed import main

    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path / "home"))
    model = str(make_tiny_model(tmp_path / "model"))  # a word-level tokenizer over the quick suite's words
    assert main(["--model", model, "--prompts", "2", "--max-new-tokens", "5", "--no-tune", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "superposed.json").read_text())
    rows = res["rows"]
    assert {r["variant"] for r in rows} == {"superposed:k=3", "3 streams", "plain"} and len(rows) == 6
    for r in rows:
        assert r["lossless"] == (r["variant"] != "superposed:k=3")
        assert len(r["texts"]) == len(r["perplexity"]) == (1 if r["variant"] == "plain" else 3) and r["tokens"] > 0
        assert all(p is None or (p >= 1 and math.isfinite(p)) for p in r["perplexity"])
    want = {"throughput_x_streams", "throughput_unscored_x_streams", "perplexity_x_plain", "perplexity_x_streams"}
    assert set(res["summary"]["ratios"]) == want


def test_the_superposed_input_is_the_weighted_sum_of_the_drafts_embeddings(engine):
    """One step by hand: the cache position the step writes holds the keys of Σ w_i E[x_i], w = softmax(S)."""
    p = SamplingParams(max_new_tokens=4, ignore_eos=True)
    run = Superposition(engine.model, Superposed(k=3), PROMPT, p)
    ids, scores = [d.tokens[-1] for d in run.alive], [d.score for d in run.alive]
    run.advance()
    w = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).float()  # [3]
    h = (w[None, :, None] * engine.model.embed(torch.tensor([ids]))).sum(1, keepdim=True)  # [1, 1, D]
    cache = Session.prefilled(engine.model, PROMPT, 4).cache
    engine.model(None, cache, hidden=h, logits="none")
    at = len(PROMPT)  # the step's one position: layer 0's keys there are a function of its input alone
    assert run.cache.offset == cache.offset == at + 1
    assert torch.equal(run.cache[0].k[:, :, at], cache[0].k[:, :, at])


def test_cli_num(capsys, tiny_folder):
    from skipjack.cli import main

    def cli(*argv):
        code = main(["generate", "--model", str(tiny_folder), "-n", "6", "--raw", *argv, "hello world"])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = cli("--method", "superposed:k=3", "--num", "3", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["lossless"] is False and len(res["completions"]) == 3 and "lossy" in err
    assert len({tuple(c["tokens"]) for c in res["completions"]}) == 3
    assert all(c["lossless"] is False and c["logprob"] is not None for c in res["completions"])
    code, out, err = cli("--method", "superposed:k=2", "--num", "2")
    assert code == 0 and "--- completion 2 of 2" in out and "(lossy)" in err.splitlines()[-1]
    code, out, err = cli("--method", "superposed")  # --num 1: its best completion, as one result
    assert code == 0 and "superposed (lossy)" in err.splitlines()[-1]
    code, out, err = cli("--num", "2", "--json")  # independent streams (greedy: the same twice)
    res = json.loads(out)
    assert code == 0 and res["lossless"] is True and res["completions"][0]["tokens"] == res["completions"][1]["tokens"]
    for argv, needle in (
        (["--model", "/nonexistent.gguf", "--method", "superposed:k=3", "--num", "4"], "n = 4 completions, but k = 3"),
        (["--num", "0"], "--num must be in [1, 16]"),
        (["--method", "superposed", "--temperature", "0.5"], "send temperature 0"),
    ):
        code, _, err = cli(*argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
