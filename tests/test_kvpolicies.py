"""KV cache policies (`skipjack.kvpolicies`): budget 1 is the full cache token for token; eviction really
shrinks the cache and drops the lowest-scored keys; rollback and tree compaction leave the state a chain of
the accepted tokens would; speculation (mock, oracle, prompt-lookup and self-speculative drafters, batched or
alone) is exact relative to plain decoding with the same policy; decode-time compression happens only at its
points; bf16/int8 storage sizes and errors; masks with sinks; Gemma 3's sliding layers; TidalDecode's sparse
steps; bad input, through `make_policy`, the engine and the CLI. Known bugs are strict xfails (their reasons
say what is wrong). Policies come from the registry: a new one is picked up with generic expectations."""

from __future__ import annotations

import inspect
import json
import math
import random

import pytest
import torch
from conftest import hf_model, ours_from_hf
from drafters_mock import AlwaysAccept, NeverAccept, RandomDrafter, make

from skipjack.cache import CachePolicy, SlidingLayerKV
from skipjack.decoding import plan
from skipjack.decoding.cost import CostModel
from skipjack.decoding.proposal import Proposal
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.sequence import generate
from skipjack.decoding.session import prefill
from skipjack.decoding.sizing import CostSizer
from skipjack.decoding.verify import tree_mask
from skipjack.drafters.base import Drafter, DraftSession
from skipjack.errors import SkipjackError
from skipjack.kvpolicies import POLICIES, EvictingLayerKV, EvictionPolicy, make_policy, policy_names
from skipjack.kvpolicies.base import GROW, pooled
from skipjack.limits import MAX_DRAFT
from skipjack.models.common import attention_mask

_rng = random.Random(0)
_HEAD = [_rng.randrange(48) for _ in range(120)]
PROMPT = _HEAD + _HEAD[:40]  # 160 tokens; the repeat gives prompt lookup something to find
L = len(PROMPT)
GREEDY = SamplingParams(max_new_tokens=32)


def _takes(name: str, option: str) -> bool:
    return option in inspect.signature(POLICIES[name]).parameters


NAMES = policy_names()
EVICTING = [n for n in NAMES if isinstance(make_policy(n), EvictionPolicy)]
BUDGETED = [n for n in NAMES if _takes(n, "budget")]  # evicting policies and tidal (a selected fraction)
DTYPES = [n for n in ("bf16", "int8") if n in NAMES]
CHUNKED = [n for n in EVICTING if _takes(n, "chunk")]  # policies that can run a prompt in parts


def _plain_only(spec: str) -> bool:
    return make_policy(spec).plain_only


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP overhead (and oversubscription on a busy 2-core machine, where
    two threads make each forward ~100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(tiny_llama_q4):
    """2 layers, 2 KV heads of 16 dims, q4 weights: batch-invariant, so every comparison below is bit for bit."""
    return tiny_llama_q4


@pytest.fixture(scope="module")
def llama6():
    """6 layers: TidalDecode's layer roles (full, selection, sparse) all appear."""
    return ours_from_hf(hf_model("llama", seed=5, vocab=48, num_hidden_layers=6), weights="q4")


@pytest.fixture(scope="module")
def llama4():
    """4 layers: per-layer budgets (PyramidKV) have a slope to show."""
    return ours_from_hf(hf_model("llama", seed=4, vocab=48, num_hidden_layers=4), weights="q4")


def run(model, kv, method=None, params=GREEDY, prompt=PROMPT):
    """(tokens, steps) of `generate` with the policy for spec `kv` (or a policy object) and a method spec or
    drafter object (sized by a flat cost model: every node it proposes is verified)."""
    policy = make_policy(kv) if kv is None or isinstance(kv, str) else kv
    if method is None:
        draft = sizer = None
    elif isinstance(method, str):
        m = make(method, model)
        draft, sizer = m.drafter.session() if m.drafter is not None else None, m.sizer(CostModel.flat())
    else:
        draft, sizer = method.session(), CostSizer(CostModel.flat())
    steps = list(generate(model, prompt, params, plan.Plan(draft, sizer, policy=policy)))
    return [t for s in steps for t in s.tokens], steps


_PLAIN: dict = {}


def plain(model, spec, params=GREEDY, prompt=PROMPT) -> list[int]:
    """Plain decoding's tokens under a policy (computed once per model, spec, params and prompt)."""
    key = (id(model), spec, repr(params), tuple(prompt))
    if key not in _PLAIN:
        _PLAIN[key] = run(model, spec, params=params, prompt=prompt)[0]
    return _PLAIN[key]


class Oracle(Drafter, DraftSession):
    """A cheap drafter that knows the tokens plain decoding gives (`truth`): `mode` "always" proposes them,
    "never" proposes a wrong first token, "random" a true prefix of random length then random tokens, as a
    chain or (tree=True) a random tree that keeps the true prefix as a path. Its own session."""

    lossless = True
    name = "oracle"

    def session(self):
        return self

    def __init__(self, truth, n_prompt, mode="random", tree=False, k=6, seed=0, vocab=48):
        self.truth, self.n_prompt, self.mode, self.tree, self.k = list(truth), n_prompt, mode, tree, k
        self.rng, self.vocab = random.Random(seed), vocab

    def begin(self, prompt):
        self.proposed = self.accepted = 0

    def observe(self, proposal, verdict):
        self.proposed += len(proposal)
        self.accepted += len(verdict.path)

    def end(self):
        pass

    def propose(self, ctx):
        n = min(self.k, ctx.budget)
        if n <= 0:
            return None
        i = len(ctx.tokens) - self.n_prompt  # the next token is truth[i]
        truth = (self.truth[i : i + n] + [self.rng.randrange(self.vocab) for _ in range(n)])[:n]
        if self.mode == "always":
            return Proposal.chain(truth, [0.9] * n)
        if self.mode == "never":
            return Proposal.chain([(truth[0] + 1) % self.vocab] + truth[1:], [0.9] * n)
        cut = self.rng.randint(0, n)
        tokens = truth[:cut] + [self.rng.randrange(self.vocab) for _ in range(n - cut)]
        if not self.tree:
            return Proposal.chain(tokens, [0.5] * n)
        parents = [-1] + [self.rng.randrange(-1, j) for j in range(1, n)]
        if cut > 1:
            parents[:cut] = list(range(-1, cut - 1))
        return Proposal(tokens, parents, [0.5] * n)


def oracles(truth, n_prompt=L, seed=0) -> dict:
    return {
        "always": Oracle(truth, n_prompt, "always", k=7),
        "never": Oracle(truth, n_prompt, "never"),
        "chain": Oracle(truth, n_prompt, "random", seed=seed),
        "tree": Oracle(truth, n_prompt, "random", tree=True, k=8, seed=seed + 1),
    }


def evicting(cache) -> list[EvictingLayerKV]:
    return [layer for layer in cache if isinstance(layer, EvictingLayerKV)]


def layer_bytes(model, slots: int, element_size: int = 4) -> int:
    c = model.config
    return 2 * slots * c.num_key_value_heads * c.head_dim * element_size


def state(cache) -> list[dict]:
    """Everything a layer holds that later steps read: keys, values, positions, scores, kept queries, rows
    waiting to be accepted (copies)."""

    def c(x):
        return None if x is None else x.clone()

    out = []
    for layer in cache:
        if isinstance(layer, EvictingLayerKV):
            n = layer.n
            out.append(
                dict(
                    n=n,
                    offset=layer.offset,
                    holes=layer.holes,
                    k=c(layer.k[:, :, :n]),
                    v=c(layer.v[:, :, :n]),
                    pos=c(layer.pos[:, :n]),
                    acc=None if layer.acc is None else c(layer.acc[:, :n]),
                    wq=c(layer.wq),
                    wq_pos=c(layer.wq_pos),
                    pending=[(p, c(q), c(s), c(pr)) for p, q, s, pr in layer.pending],
                )
            )
        else:
            a, b = 0, layer.offset - layer._first()
            d = dict(offset=layer.offset, first=layer._first(), k=c(layer.k[:, :, a:b]), v=c(layer.v[:, :, a:b]))
            scales = getattr(layer, "scales", None)
            if scales is not None:
                d["scales"] = tuple(c(s[:, :, a:b]) for s in scales)
            out.append(d)
    return out


def assert_same_state(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), i
        for key in x:
            u, w = x[key], y[key]
            if key == "pending":
                assert len(u) == len(w), (i, key)
                for r, s in zip(u, w):
                    assert r[0] == s[0], (i, "pending position")
                    for t1, t2 in zip(r[1:], s[1:]):
                        assert (t1 is None) == (t2 is None)
                        assert t1 is None or torch.equal(t1, t2), (i, "pending row", r[0])
            elif isinstance(u, tuple):
                assert all(torch.equal(p, q) for p, q in zip(u, w)), (i, key)
            elif isinstance(u, torch.Tensor):
                assert torch.equal(u, w), (i, key)
            else:
                assert u == w, (i, key, u, w)


# ---- 1. budget >= context: the full cache, token for token ----


@pytest.mark.parametrize("name", BUDGETED)
def test_budget_one_is_the_full_cache(model, name):
    full, _ = run(model, None)
    same, _ = run(model, f"{name}:budget=1.0")
    assert same == full
    params = SamplingParams(temperature=0.8, seed=3, max_new_tokens=40)
    sampled_full, _ = run(model, None, params=params)
    sampled, _ = run(model, f"{name}:budget=1.0", params=params)
    assert sampled == sampled_full
    assert sampled != full  # the sampled run really sampled


@pytest.mark.parametrize("name", [n for n in ("snapkv", "h2o") if n in CHUNKED])
def test_budget_one_with_a_chunked_prompt_is_the_full_cache(model, name):
    assert plain(model, f"{name}:budget=1.0,chunk=64") == plain(model, None)


def test_full_policy_is_no_policy(model):
    assert run(model, "full")[0] == run(model, None)[0]


# ---- 2. eviction is real ----


def _allocation_ok(name: str, ns: list[int], keep: int) -> None:
    layers = len(ns)
    if name in ("snapkv", "h2o"):
        assert ns == [keep] * layers
    elif name == "streaming":  # the sinks and the window before the next query: sinks + (keep - sinks) - 1
        assert ns == [keep - 1] * layers
    elif name == "pyramidkv":
        assert all(a > b for a, b in zip(ns, ns[1:])), ns  # falling from the bottom layer to the top
        assert abs(sum(ns) / layers - keep) <= 1, ns
    else:  # cake and any newer policy: budgets shared out of keep x layers
        assert all(n >= 1 for n in ns)
        assert layers * keep - layers <= sum(ns) <= layers * keep, ns


@pytest.mark.parametrize("name", EVICTING)
def test_prefill_evicts_to_the_budget(model, name):
    full = prefill(model, PROMPT, 10).cache
    start = prefill(model, PROMPT, 10, policy=make_policy(f"{name}:budget=0.2"))
    cache, keep = start.cache, math.ceil(0.2 * L)
    layers = evicting(cache)
    assert len(layers) == len(cache) == model.num_layers
    ns = [layer.n for layer in layers]
    _allocation_ok(name, ns, keep)
    H = model.config.num_key_value_heads
    for layer, ref in zip(layers, full):
        n = layer.n
        assert layer.offset == L and layer.holes
        assert layer.k.shape[2] < L and layer.k.shape[2] <= n + GROW  # the tensors themselves shrank
        pos = layer.pos[:, :n]  # [H_kv, n]
        assert bool((pos[:, 1:] > pos[:, :-1]).all()), "held positions are sorted per head"
        assert int(pos.min()) >= 0 and int(pos.max()) == L - 1
        # each held key is the full cache's key at its position, bit for bit
        for h in range(H):
            assert torch.equal(layer.k[0, h, :n], ref.k[0, h, pos[h]])
            assert torch.equal(layer.v[0, h, :n], ref.v[0, h, pos[h]])
        if name == "streaming":
            sinks = 4
            want = torch.cat([torch.arange(sinks), torch.arange(L - (n - sinks), L)])
            assert torch.equal(pos, want.expand(H, -1))
        else:
            recent = make_policy(f"{name}:budget=0.2").recent(n)
            assert bool((pos[:, n - recent :] == torch.arange(L - recent, L)).all()), "the recent window is kept"
    assert cache.nbytes == sum(layer_bytes(model, n) for n in ns)
    assert cache.nbytes < full.nbytes * 0.25


def test_pyramid_budgets_fall_from_bottom_to_top(llama4):
    cache = prefill(llama4, PROMPT, 10, policy=make_policy("pyramidkv:budget=0.2")).cache
    ns = [layer.n for layer in cache]
    keep = math.ceil(0.2 * L)  # 32: top keep/20 = 1.6, bottom 2 * 32 - 1.6 = 62.4, linear between
    assert ns == [62, 42, 22, 2]
    assert sum(ns) == 4 * keep


def test_snapkv_keeps_the_window(model):
    cache = prefill(model, PROMPT, 10, policy=make_policy("snapkv:budget=0.2")).cache
    for layer in cache:  # budget 32 = the default window: only the last 32 prompt positions
        assert torch.equal(layer.pos[:, : layer.n], torch.arange(L - 32, L).expand(2, -1))


def test_memory_shrinks_in_proportion_to_the_budget(model):
    small = prefill(model, PROMPT, 10, policy=make_policy("snapkv:budget=0.1")).cache
    big = prefill(model, PROMPT, 10, policy=make_policy("snapkv:budget=0.5")).cache
    full = prefill(model, PROMPT, 10).cache
    assert full.nbytes == model.num_layers * layer_bytes(model, L)
    assert small.nbytes == model.num_layers * layer_bytes(model, math.ceil(0.1 * L))
    assert big.nbytes == model.num_layers * layer_bytes(model, math.ceil(0.5 * L))
    assert small.nbytes * 5 == big.nbytes  # 16 vs 80 slots
    assert sum(layer.allocated for layer in small) < sum(layer.allocated for layer in big)


@pytest.mark.parametrize("name", CHUNKED)
def test_a_chunked_prompt_bounds_the_memory(model, name):
    """chunk=64: the prompt runs in parts, compressed after each, so the layers never hold (or allocate) the
    whole prompt; the end state holds the same number of slots as one pass compressed once."""
    rng = random.Random(7)
    prompt = [rng.randrange(48) for _ in range(400)]
    peaks = {}
    for chunk in (0, 64):
        policy = make_policy(f"{name}:budget=0.1,chunk={chunk}")
        seen = []
        compress = policy.compress

        def spy(cache, compress=compress, seen=seen):
            seen.append((cache.offset, max(layer.k.shape[2] for layer in evicting(cache))))
            compress(cache)

        policy.compress = spy
        cache = prefill(model, prompt, 10, policy=policy).cache
        peaks[chunk] = max(a for _, a in seen)
        assert seen[-1][0] == 400
        if chunk:
            assert [o for o, _ in seen] == [64, 128, 192, 256, 320, 384, 400]  # after each part, then settled
        if name in ("snapkv", "h2o"):
            assert [layer.n for layer in cache] == [40, 40]
        else:
            assert sum(layer.n for layer in cache) <= 80
        assert max(layer.k.shape[2] for layer in cache) <= 40 * 2 + GROW
    assert peaks[0] >= 400 > 256 >= peaks[64]  # the first part's default allocation is the most it ever holds


# ---- 3. the evicted keys are the lowest-scored ----


def test_evict_to_keeps_the_best_scores_and_the_recent_slots(model):
    cache = model.make_cache(200, policy=make_policy("snapkv:budget=1.0"))
    model(torch.tensor([PROMPT[:20]]), cache)
    layer = cache[0]
    k0, v0 = layer.k[:, :, :20].clone(), layer.v[:, :, :20].clone()
    scores = torch.stack(
        [
            torch.arange(20.0),  # head 0: later is better
            -torch.arange(20.0),  # head 1: earlier is better
        ]
    )
    scores[0, 3] = 100.0  # head 0: position 3 is the best of all
    scores[1, 18] = 100.0  # head 1: position 18 is in the recent slots anyway
    layer.evict_to(8, scores, 3)  # keep 8: the last 3 and the best 5 of positions 0..16
    assert layer.n == 8 and layer.offset == 20 and layer.holes
    want = torch.tensor([[3, 13, 14, 15, 16, 17, 18, 19], [0, 1, 2, 3, 4, 17, 18, 19]])
    assert torch.equal(layer.pos[:, :8], want)
    for h in range(2):
        assert torch.equal(layer.k[0, h, :8], k0[0, h, want[h]])
        assert torch.equal(layer.v[0, h, :8], v0[0, h, want[h]])
    assert layer.k.shape[2] == 8 + GROW
    # the next write goes after the held slots; attention gets head 0's positions for the mask
    keys, vals, past = layer.update(torch.ones(1, 2, 1, 16), torch.ones(1, 2, 1, 16), 20)
    assert keys.shape[2] == 9 and torch.equal(past, want[0])
    assert layer.n == 9 and layer.offset == 21 and int(layer.pos[1, 8]) == 20
    layer.evict_to(20, scores, 3)  # keep >= held: nothing happens
    assert layer.n == 9


def _budget_one(spec: str) -> str:
    name, _, opts = spec.partition(":")
    opts = [o for o in opts.split(",") if o and not o.startswith("budget=")]
    return f"{name}:" + ",".join(["budget=1.0", *opts])


SCORED = [f"{n}:budget=0.2" + (",window=8" if _takes(n, "window") else "") for n in EVICTING if n != "streaming"]


@pytest.mark.parametrize("spec", SCORED)
def test_evicted_keys_are_the_lowest_scored(model, spec):
    """The same prompt with budget 1 keeps everything; its scores (the policy's own `scores`) rank the keys:
    every evicted key scores at most as high as every kept one outside the recent slots."""
    policy = make_policy(spec)
    # budget 1 keeps every key; a far compression point keeps it watching the queries (for the scores below)
    whole = prefill(model, PROMPT, 10, policy=make_policy(_budget_one(spec) + ",every=1000000")).cache
    cut = prefill(model, PROMPT, 10, policy=policy).cache
    scored = 0
    for ref, layer in zip(evicting(whole), evicting(cut)):
        assert ref.n == L and not ref.holes
        scores = policy.scores(ref, whole.scale)  # [H_kv, L]: slot = position here
        n = layer.n
        recent = policy.recent(n)
        if recent == n:  # a small layer (PyramidKV's top): only the recent slots
            continue
        scored += 1
        for h in range(scores.shape[0]):
            kept = layer.pos[h, :n]
            assert torch.equal(kept[n - recent :], torch.arange(L - recent, L))
            old = torch.zeros(L - recent, dtype=torch.bool)
            old[kept[: n - recent]] = True
            s = scores[h, : L - recent]
            assert float(s[old].min()) >= float(s[~old].max()), (h, spec)
    assert scored  # some layer kept keys by score


def test_h2o_scores_sum_the_accepted_rows_attention(model):
    """H2O's accumulated attention: each accepted query row adds one probability distribution per query head,
    so the scores of a KV head sum to (rows) x (query heads per KV head); rows rolled back add nothing, and
    speculation leaves exactly the scores of plain decoding."""
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    caches = {}
    params = SamplingParams(max_new_tokens=20)
    truth = plain(model, None, params)
    drafters = oracles(truth)
    for label, method in [("plain", None), ("never", drafters["never"]), ("tree", drafters["tree"])]:
        policy = make_policy("h2o:budget=1.0")
        seen = []
        policy.compress = lambda cache, seen=seen: seen.append(cache)  # budget 1: compress keeps all anyway
        tokens, steps = run(model, policy, method, params=params)
        cache = seen[0]
        for layer in cache:
            layer._commit(layer.offset)
            total = layer.acc[:, : layer.n].sum(1)  # [H_kv]
            torch.testing.assert_close(total, torch.full_like(total, float(layer.offset * G)), rtol=1e-5, atol=0)
        caches[label] = (tokens, [layer.acc[:, : layer.n].clone() for layer in cache])
        if method is not None:
            assert sum(s.drafted for s in steps) > 0
    for label in ("never", "tree"):
        assert caches[label][0] == caches["plain"][0] == truth
        for a, b in zip(caches[label][1], caches["plain"][1]):
            assert torch.equal(a, b), label


@pytest.mark.parametrize("n", [40, 65, 66, 300])  # a prompt pass of at most SMALL rows waits to be accepted
def test_h2o_prompt_scores_count_every_row_once(model, n):
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    rng = random.Random(n)
    prompt = [rng.randrange(48) for _ in range(n)]
    cache = prefill(model, prompt, 10, policy=make_policy("h2o:budget=1.0")).cache
    for layer in cache:
        layer._commit(layer.offset)
        torch.testing.assert_close(layer.acc[:, :n].sum(1), torch.full((2,), float(n * G)), rtol=1e-5, atol=0)
        assert bool((layer.acc[:, :n] > 0).all())  # every key drew some attention (the first from every row)
        assert float(layer.acc[0, 0]) >= G - 1e-5  # the first key: all of the first query's attention, G heads


def test_pooled_averages_neighbours():
    x = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    assert torch.equal(pooled(x, 1), x)
    for kernel in (3, 5):
        r = kernel // 2
        want = torch.stack(
            [torch.stack([row[max(0, i - r) : i + r + 1].mean() for i in range(8)]) for row in x]
        )  # the average of the neighbours that exist
        torch.testing.assert_close(pooled(x, kernel), want)


# ---- 4. rollback and tree compaction ----

ROLLBACK = [f"{n}:budget=0.2" for n in EVICTING] + ["snapkv:budget=0.2,window=8"] + DTYPES


@pytest.mark.parametrize("spec", ROLLBACK)
def test_trim_restores_the_cache(model, spec):
    start = prefill(model, PROMPT, 20, policy=make_policy(spec))
    cache = start.cache
    before = state(cache)
    pending = int(start.logits.argmax())
    logits = model(torch.tensor([[pending, 5, 6, 7, 8]]), cache).logits  # a rejected draft of 4
    assert cache.offset == L + 5
    cache.trim(4)  # keep the pending token's row only
    cache.trim(1)
    assert_same_state(state(cache), before)
    # and it goes on as a cache that never saw the draft
    out = model(torch.tensor([[pending, 9]]), cache).logits
    fresh = prefill(model, PROMPT, 20, policy=make_policy(spec)).cache
    ref = model(torch.tensor([[pending, 9]]), fresh).logits
    assert torch.equal(out, ref)
    assert torch.equal(logits[:, :1], ref[:, :1])
    assert_same_state(state(cache), state(fresh))


@pytest.mark.parametrize("spec", ROLLBACK)
def test_tree_keep_equals_the_accepted_chain(model, spec):
    a = prefill(model, PROMPT, 20, policy=make_policy(spec))
    b = prefill(model, PROMPT, 20, policy=make_policy(spec))
    pending = int(a.logits.argmax())
    # nodes: x1 (root's child), x2 (x1's), y1 (root's), y2 (y1's), y3 (y2's); accept the path y1, y2
    tokens, parents, depths = [11, 12, 21, 22, 23], [-1, 0, -1, 2, 3], [1, 2, 1, 2, 3]
    ids = torch.tensor([[pending, *tokens]])
    out = model(ids, a.cache, positions=L + torch.tensor([0, *depths]), tree_mask=tree_mask(parents)).logits
    a.cache.keep(L, [0, 3, 4])
    chain = model(torch.tensor([[pending, 21, 22]]), b.cache).logits
    assert torch.equal(out[:, [0, 3, 4]], chain)
    assert a.cache.offset == b.cache.offset == L + 3
    assert_same_state(state(a.cache), state(b.cache))
    nxt = int(chain[0, -1].argmax())
    for _ in range(3):  # plain steps after it commit the rows and stay identical
        la = model(torch.tensor([[nxt]]), a.cache).logits
        lb = model(torch.tensor([[nxt]]), b.cache).logits
        assert torch.equal(la, lb)
        nxt = int(la[0, -1].argmax())
    assert_same_state(state(a.cache), state(b.cache))


# ---- 5. speculation is exact relative to the same policy ----

SPECULATIVE = [
    s
    for s in [f"{n}:budget=0.2" for n in EVICTING]
    + ["snapkv:budget=0.2,window=8", "snapkv:budget=0.2,every=16", "h2o:budget=0.2,every=7", *DTYPES]
    + [f"{n}:budget=0.2,chunk=64" for n in CHUNKED if n in ("snapkv", "h2o", "cake")]
    if not _plain_only(s)
]


@pytest.mark.parametrize("spec", SPECULATIVE)
def test_speculation_is_exact_under_the_policy(model, spec):
    """Drafts that know the policy's own plain tokens (all accepted, none, random chains and trees) and prompt
    lookup: the tokens are plain decoding's under the same policy."""
    base = plain(model, spec)
    assert len(base) == GREEDY.max_new_tokens
    for label, d in [*oracles(base).items(), ("pld", "pld:k=4")]:
        tokens, steps = run(model, spec, d)
        assert tokens == base, label
        assert sum(s.drafted for s in steps) > 0, label
        accepted = sum(s.accepted for s in steps)
        if label == "always":
            assert accepted >= len(base) // 2
        if label == "never":
            assert accepted == 0


@pytest.mark.parametrize(
    "spec", ["snapkv:budget=0.3,window=8,every=8", "h2o:budget=0.3,every=5", "streaming:budget=0.3"]
)
def test_speculation_after_a_short_prompt(model, spec):
    """A prompt of at most SMALL tokens: its rows wait to be accepted like a verify pass's."""
    prompt = PROMPT[:50]
    base = plain(model, spec, prompt=prompt)
    assert base != plain(model, None, prompt=prompt)
    for label, d in oracles(base, len(prompt), seed=5).items():
        tokens, steps = run(model, spec, d, prompt=prompt)
        assert tokens == base, label
        assert sum(s.drafted for s in steps) > 0, label


@pytest.mark.parametrize("spec", SPECULATIVE)
def test_speculation_with_model_drafters(model, spec):
    """The model-driven mock drafters (the lossless suites' own) under a policy: the same tokens."""
    base = plain(model, spec)
    for d in [AlwaysAccept(model, 5), NeverAccept(model), RandomDrafter(model, 1), RandomDrafter(model, 2, tree=True)]:
        tokens, steps = run(model, spec, d)
        assert tokens == base, d.name
        assert sum(s.drafted for s in steps) > 0


def test_eviction_changes_the_output(model):
    """Not a vacuous comparison above: at budget 0.2 these policies decode differently from the full cache."""
    full = plain(model, None)
    differ = [s for s in SPECULATIVE if plain(model, s) != full]
    assert set(differ) >= {s for s in SPECULATIVE if s.split(":")[0] in EVICTING}, differ


# ---- 6. decode-time compression ----


def _spy(policy):
    """Record the offset of every compression and every `room` answer (offset, room)."""
    seen = {"compress": [], "room": [], "cache": None}
    compress, room = policy.compress, policy.room

    def spy_compress(cache):
        seen["compress"].append(cache.offset)
        seen["cache"] = cache
        compress(cache)

    def spy_room(cache):
        r = room(cache)
        seen["room"].append((cache.offset, r))
        return r

    policy.compress, policy.room = spy_compress, spy_room
    return seen


@pytest.mark.parametrize(
    "spec, every",
    [("snapkv:budget=0.2,every=16", 16), ("h2o:budget=0.2,every=7", 7)]
    + [(f"{n}:budget=0.2,every=16", 16) for n in ("pyramidkv", "cake") if n in EVICTING],
)
@pytest.mark.parametrize("method", ["plain", "tree", "always"])
def test_compression_only_at_its_points(model, spec, every, method):
    policy = make_policy(spec)
    seen = _spy(policy)
    params = SamplingParams(max_new_tokens=40)
    truth = plain(model, spec, params)
    drafter = None if method == "plain" else oracles(truth)[method]
    tokens, steps = run(model, policy, drafter, params=params)
    assert tokens == truth
    cache = seen["cache"]
    end = cache.offset
    assert seen["compress"] == list(range(L, end + 1, every))  # after the prompt, then every `every` positions
    for offset, r in seen["room"]:
        assert 1 <= r <= every and (offset - L) % every + r == every  # a step never crosses a point
    if method != "plain":
        assert sum(s.drafted for s in steps) > 0
    last = seen["compress"][-1]
    for layer in evicting(cache):
        assert layer.offset == end
        assert layer.n <= math.ceil(0.2 * last) * 2 + (end - last)  # x2: PyramidKV/CAKE's largest layer
        assert layer.k.shape[2] <= layer.n + GROW + every
    if spec.startswith(("snapkv", "h2o")):  # uniform budgets: exactly the budget at the last point, plus what came
        assert all(layer.n == math.ceil(0.2 * last) + (end - last) for layer in evicting(cache))


@pytest.mark.parametrize("spec", ["snapkv:budget=0.2", "streaming:budget=0.2"])
def test_no_decode_time_points_without_every(model, spec):
    policy = make_policy(spec)
    seen = _spy(policy)
    run(model, policy, oracles(plain(model, spec))["always"])
    assert seen["compress"] == ([] if spec.startswith("streaming") else [L])  # streaming evicts in `settle`
    capacity = L + GREEDY.max_new_tokens + MAX_DRAFT + 1
    assert seen["room"] and all(r == capacity for _, r in seen["room"])  # drafts are not capped


def test_streaming_holds_sinks_and_a_rolling_window(model):
    policy = make_policy("streaming:budget=0.2")
    cache = prefill(model, PROMPT, 200, policy=policy).cache
    span = math.ceil(0.2 * L) - 4
    nxt = 1
    for _ in range(150):  # evicted in batches: what is held is the sinks, the window and at most GROW stale
        model(torch.tensor([[nxt]]), cache)
        cache.settle()
        nxt = (nxt * 7 + 3) % 48
        for layer in cache:
            pos = layer.pos[0, : layer.n]
            assert torch.equal(pos[:4], torch.arange(4))
            tail = pos[4:]
            assert torch.equal(tail, torch.arange(layer.offset - len(tail), layer.offset))
            assert span - 1 <= len(tail) <= span - 1 + GROW
            assert layer.sight == (span, 4)


# ---- 7. storage dtypes ----


def test_storage_dtypes_sizes_and_errors(model):
    full = prefill(model, PROMPT, 10)
    H, D, layers = model.config.num_key_value_heads, model.config.head_dim, model.num_layers
    assert full.cache.nbytes == layers * 2 * L * H * D * 4
    bf16 = prefill(model, PROMPT, 10, policy=make_policy("bf16"))
    int8 = prefill(model, PROMPT, 10, policy=make_policy("int8"))
    assert bf16.cache.nbytes * 2 == full.cache.nbytes
    scales = layers * 2 * L * H * 4  # one fp32 scale per head and position, for keys and for values
    assert int8.cache.nbytes == full.cache.nbytes // 4 + scales
    assert all(layer.k.dtype == torch.bfloat16 for layer in bf16.cache)
    assert all(layer.k.dtype == torch.int8 for layer in int8.cache)
    # layer 0's keys come straight from the embeddings: bf16 stores their rounding, int8 is within half a step
    ref = full.cache[0]
    assert torch.equal(bf16.cache[0].k[:, :, :L], ref.k[:, :, :L].to(torch.bfloat16))
    q = int8.cache[0]
    for buf, scale, orig in ((q.k, q.scales[0], ref.k), (q.v, q.scales[1], ref.v)):
        torch.testing.assert_close(scale[:, :, :L], orig[:, :, :L].abs().amax(-1, keepdim=True) / 127)
        err = (buf[:, :, :L].float() * scale[:, :, :L] - orig[:, :, :L]).abs()
        assert bool((err <= scale[:, :, :L] * 0.5 + 1e-6).all())
    # the next-token logits stay close to the full cache's
    for start, tol in ((bf16, 0.05), (int8, 0.05)):
        err = float((start.logits - full.logits).abs().max())
        assert 0 < err < tol * float(full.logits.abs().max()), err


def test_bf16_storage_is_what_a_bf16_model_does(model):
    m = ours_from_hf(hf_model("llama", seed=1, vocab=48, num_hidden_layers=2), dtype=torch.bfloat16)
    params = SamplingParams(max_new_tokens=30)
    full, _ = run(m, None, params=params)
    same, _ = run(m, "bf16", params=params)
    assert same == full
    a = prefill(m, PROMPT, 10)
    b = prefill(m, PROMPT, 10, policy=make_policy("bf16"))
    assert a.cache.nbytes == b.cache.nbytes
    assert torch.equal(a.logits, b.logits)


# ---- 8. masks ----


def test_attention_mask_window_and_sinks():
    # keys: past positions 0..5, then the new queries' own 6, 7; window 4, sinks 2
    m = attention_mask(torch.tensor([6, 7]), range(0, 6), None, window=4, sinks=2)
    want = [
        [1, 1, 0, 1, 1, 1, 1, 0],  # q6: sinks 0, 1; window 3..6; not 7 (causal)
        [1, 1, 0, 0, 1, 1, 1, 1],  # q7: sinks 0, 1; window 4..7
    ]
    assert torch.equal(m, torch.tensor(want, dtype=torch.bool))
    # an evicting layer's past: positions with holes
    m = attention_mask(torch.tensor([10, 11]), torch.tensor([0, 1, 5, 8, 9]), None, window=3, sinks=1)
    want = [
        [1, 0, 0, 1, 1, 1, 0],  # q10: sink 0; 8, 9, 10
        [1, 0, 0, 0, 1, 1, 1],  # q11: sink 0; 9, 10, 11
    ]
    assert torch.equal(m, torch.tensor(want, dtype=torch.bool))
    # a tree over the new tokens (root, a child of root, b child of root), window 3, sinks 1
    m = attention_mask(torch.tensor([4, 5, 5]), range(0, 4), tree_mask([-1, -1]), window=3, sinks=1)
    want = [
        [1, 0, 1, 1, 1, 0, 0],  # root at 4: sink 0; 2, 3, itself
        [1, 0, 0, 1, 1, 1, 0],  # a at 5: sink 0; 3, root, itself; not its sibling
        [1, 0, 0, 1, 1, 0, 1],  # b at 5
    ]
    assert torch.equal(m, torch.tensor(want, dtype=torch.bool))
    # no sinks: the window alone
    m = attention_mask(torch.tensor([6, 7]), range(0, 6), None, window=4, sinks=0)
    assert torch.equal(m[:, :2], torch.zeros(2, 2, dtype=torch.bool))
    # one query that sees every key: no mask at all (SDPA's fast path)
    assert attention_mask(torch.tensor([3]), range(0, 3), None, window=4, sinks=2) is None
    assert attention_mask(torch.tensor([9]), torch.tensor([0, 4, 8]), None, window=None) is None
    # one query whose window is shorter than the past: a mask
    m = attention_mask(torch.tensor([6]), range(0, 6), None, window=4, sinks=2)
    assert torch.equal(m, torch.tensor([[1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool))


# ---- 9. Gemma 3: sliding layers keep their own cache ----


@pytest.mark.parametrize("name", EVICTING)
def test_gemma_sliding_layers_keep_their_cache(tiny_gemma_q4, name):
    m = tiny_gemma_q4
    prompt = PROMPT
    params = SamplingParams(max_new_tokens=40)  # a request of 265 positions: the sliding layers get SlidingLayerKV
    whole = prefill(m, prompt, params.max_new_tokens).cache
    start = prefill(m, prompt, params.max_new_tokens, policy=make_policy(f"{name}:budget=0.2"))
    kinds = [w for w, _ in m.kinds]
    assert None in kinds and any(w is not None for w in kinds)
    for layer, ref, window in zip(start.cache, whole, kinds):
        if window is None:
            assert isinstance(layer, EvictingLayerKV) and layer.n <= math.ceil(0.2 * L) and layer.holes
        else:
            assert isinstance(ref, SlidingLayerKV) and type(layer) is SlidingLayerKV
            assert layer.offset == ref.offset and torch.equal(layer.k, ref.k)
    full, _ = run(m, None, params=params, prompt=prompt)
    assert run(m, f"{name}:budget=1.0", params=params, prompt=prompt)[0] == full
    base, _ = run(m, f"{name}:budget=0.2", params=params, prompt=prompt)
    assert len(base) == params.max_new_tokens
    tree, steps = run(m, f"{name}:budget=0.2", oracles(base)["tree"], params=params, prompt=prompt)
    assert tree == base and sum(s.drafted for s in steps) > 0


# ---- tidal: sparse attention over a selection, every key kept ----


@pytest.mark.skipif("tidal" not in NAMES, reason="no tidal policy")
def test_tidal_attends_to_the_selected_keys(llama6):
    m = llama6
    params = SamplingParams(max_new_tokens=20)
    full, _ = run(m, None, params=params)
    assert run(m, "tidal:budget=1.0", params=params)[0] == full
    policy = make_policy("tidal:budget=0.2,correct=4")
    cache = prefill(m, PROMPT, 30, policy=policy).cache
    roles = [getattr(layer, "role", None) for layer in cache]
    assert "sparse" in roles and "select" in roles
    seen = []
    for layer in cache:  # how many keys each layer's one-token step attends to
        update = layer.update

        def spy(k, v, start, update=update, layer=layer):
            keys, vals, past = update(k, v, start)
            seen.append((layer.role, keys.shape[2]))
            return keys, vals, past

        layer.update = spy
    nxt = 1
    for step in range(6):
        seen.clear()
        model_out = m(torch.tensor([[nxt]]), cache).logits
        cache.settle()
        nxt = int(model_out[0, -1].argmax())
        S = L + step + 1
        dense = step == 3  # after 4 sparse steps (the prompt's settle counts), one dense step
        for role, n in seen:
            if role == "sparse" and not dense:
                assert n == math.ceil(0.2 * (S - 1)) + 1, (step, role, n)
            else:
                assert n == S, (step, role, n)
        assert cache.nbytes == m.num_layers * layer_bytes(m, S)  # every key stays in memory


# ---- 10. bad input ----


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("snapkv:budget=0", "budget"),
        ("snapkv:budget=1.5", "budget"),
        ("snapkv:budget=x", "budget"),
        ("snapkv:budget=nan", "budget"),
        ("snapkv:budget", "key=value"),
        ("nope", "unknown cache policy"),
        ("SNAPKV", "unknown cache policy"),
        ("snapkv:foo=1", "unknown option"),
        ("bf16:budget=0.5", "unknown option"),
        ("full:budget=1", "unknown option"),
        ("snapkv:window=0", "window"),
        ("snapkv:kernel=0", "kernel"),
        ("h2o:every=-1", "every"),
        ("streaming:sinks=-1", "sinks"),
    ]
    + [(f"{n}:chunk=10", "chunk") for n in CHUNKED if _takes(n, "window")]  # under twice the window
    + [(f"{n}:chunk=-1", "chunk") for n in CHUNKED]
    + [(f"{n}:budget=0", "budget") for n in BUDGETED]
    + [(f"{n}:budget=2", "budget") for n in BUDGETED],
)
def test_bad_policy_specs(spec, needle):
    with pytest.raises(SkipjackError) as e:
        make_policy(spec)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


@pytest.fixture(scope="module")
def engine(tiny_folder):
    from skipjack.engine import Engine

    return Engine.load(str(tiny_folder), "q4", tune=False)


def _ids(engine):
    return engine.tokenizer.prompt_ids("hello world the quick brown fox", raw=True)


@pytest.mark.parametrize(
    "method, kv, session, needle",
    [
        ("layer-skip", "snapkv", False, "do not combine"),
        ("skipdecode", "int8", False, "do not combine"),
        ("kangaroo", "snapkv", False, "reads cached keys of past positions"),
        ("triforce", "int8", False, "runs with the full cache only"),
        ("plain", "h2o", True, "session"),
        ("plain", "nope", False, "unknown cache policy"),
        ("plain", "snapkv:budget=0", False, "budget"),
        ("plain", "", False, "empty"),
    ]
    + ([("pld", "tidal", False, "plain steps only")] if "tidal" in NAMES else []),
)
def test_engine_refuses(engine, method, kv, session, needle):
    from skipjack.decoding.session import Session
    from skipjack.engine import Request

    req = Request(_ids(engine), SamplingParams(max_new_tokens=4), method, kv=kv, session=Session() if session else None)
    with pytest.raises(SkipjackError) as e:
        engine.complete(req)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_engine_full_equals_no_kv_and_labels_the_policy(engine):
    from skipjack.engine import Request

    def go(kv, method="plain"):
        return engine.complete(Request(_ids(engine), SamplingParams(max_new_tokens=8), method, kv=kv))

    none, full = go(None), go("full")
    assert none.tokens == full.tokens and none.kv == full.kv == "full"
    lossy = go("snapkv:budget=0.5")
    assert lossy.kv == "snapkv:budget=0.5" and lossy.new_tokens == 8
    spec = go("snapkv:budget=0.5", "pld:k=3")
    assert spec.tokens == lossy.tokens  # speculation under the policy: the policy's own plain tokens


def test_engine_swift_with_a_storage_dtype_runs(engine):
    from skipjack.engine import Request

    r = engine.complete(Request(_ids(engine), SamplingParams(max_new_tokens=4), "swift", kv="int8"))
    assert r.new_tokens == 4


@pytest.fixture(scope="module")
def engine4(tmp_path_factory):
    """A 4-layer q4 Llama behind an engine (room for self-speculative methods), its cache folder a temporary one."""
    from conftest import tiny_engine

    with tiny_engine(tmp_path_factory.mktemp("home"), layers=4, max_position_embeddings=512) as e:
        yield e


def _long_prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(1)
    base = [rng.randrange(vocab - 1) for _ in range(90)]
    return [base + base[:30], base[:70] + base[:25], base[10:]]


def _req(prompt, method, kv, n=24):
    from skipjack.engine import Request

    return Request(list(prompt), SamplingParams(max_new_tokens=n), method, kv=kv)


def test_batched_requests_with_their_own_policies(engine4):
    """Continuous batching with a policy per request (and drafters, self-speculative `del` included): every
    request's tokens are its tokens alone, which are plain decoding's under its policy."""
    prompts = _long_prompts(engine4.model.lm_head.out_features)
    kvs = [
        "snapkv:budget=0.2,every=16",
        "h2o:budget=0.3,every=7",
        "streaming:budget=0.3",
        None,
        "int8",
        "cake:budget=0.3",
    ]
    kvs = [kv for kv in kvs if kv is None or kv.split(":")[0] in NAMES]
    methods = ["pld", "del", "ngram", "plain", "del", "pld:k=3"]
    reqs = [(prompts[i % 3], methods[i % len(methods)], kv, 16 + 3 * i) for i, kv in enumerate(kvs)]
    plain_alone = [engine4.complete(_req(p, "plain", kv, n)).tokens for p, _, kv, n in reqs]
    alone = [engine4.complete(_req(*r)).tokens for r in reqs]
    assert alone == plain_alone
    batched = engine4.generate_batch([_req(*r) for r in reqs])
    assert [b.tokens for b in batched] == alone
    assert [b.kv for b in batched] == [kv or "full" for kv in kvs]


def test_int8_span_put_span_restores_the_keys(model):
    cache = model.make_cache(64, policy=make_policy("int8"))
    model(torch.tensor([PROMPT[:20]]), cache)
    before = state(cache)
    saved = cache.span(10, 20)
    model(torch.tensor([[40] * 10]), cache, positions=torch.arange(10, 20))  # a scratch pass over [10, 20)
    cache.put_span(10, saved)
    assert_same_state(state(cache), before)


@pytest.mark.parametrize(
    "method, kv",
    [("mix", "snapkv:budget=0.2"), ("triforce", "snapkv:budget=0.2")],
)
def test_methods_that_need_every_key_are_refused_or_exact(engine4, method, kv):
    """Under an evicting policy a method is either refused before any work or gives the policy's plain tokens."""
    prompt = _long_prompts(engine4.model.lm_head.out_features)[0]
    try:
        engine4.check(_req(prompt, method, kv))
    except SkipjackError:
        return  # refused up front, as swift is
    assert engine4.complete(_req(prompt, method, kv)).tokens == engine4.complete(_req(prompt, "plain", kv)).tokens


@pytest.mark.parametrize("name", [n for n in ("snapkv", "h2o", "cake") if n in EVICTING])
def test_span_of_an_evicting_cache_is_exact_or_refused(model, name):
    whole = prefill(model, PROMPT, 10).cache
    spec = f"{name}:budget=0.2" + (",window=8" if _takes(name, "window") else "")
    cache = prefill(model, PROMPT, 10, policy=make_policy(spec)).cache
    lo = L - 20  # below the recent window (8 or 16 slots), above offset - n (32 slots or so)
    assert all(layer.offset - layer.n <= lo for layer in cache)
    try:
        got = cache.span(lo, L)
    except SkipjackError:
        return
    for (k, v), ref in zip(got, whole):
        assert torch.equal(k, ref.k[:, :, lo:L]) and torch.equal(v, ref.v[:, :, lo:L])


@pytest.mark.skipif("cake" not in NAMES, reason="no cake policy")
def test_cake_scores_each_compression_afresh(model):
    spec = "cake:budget=0.6,tau1=0.05,tau2=0.05,every=16"  # sharp preferences: one layer keeps all it holds
    policy = make_policy(spec)
    cache = prefill(model, PROMPT, 60, policy=policy).cache
    assert L in [layer.n for layer in cache]  # that layer is not evicted: its cached window attention stays
    params = SamplingParams(max_new_tokens=60)
    fresh = make_policy(spec)
    compress = fresh.compress

    def afresh(c):
        fresh._attn.clear()
        compress(c)

    fresh.compress = afresh
    assert run(model, spec, params=params)[0] == run(model, fresh, params=params)[0]


@pytest.mark.skipif("tidal" not in NAMES, reason="no tidal policy")
def test_plain_only_policy_with_a_drafter_is_refused_or_exact(llama6):
    m = llama6
    params = SamplingParams(max_new_tokens=30)
    base = plain(m, "tidal:budget=0.2", params)
    try:
        plan.resolve("pld", "tidal:budget=0.2")  # the plan's rules, before any work
        tokens, _ = run(m, "tidal:budget=0.2", Oracle(base, L, "always"), params=params)
    except SkipjackError:
        return
    assert tokens == base


def test_policies_declare_their_capabilities():
    """Every policy is a `CachePolicy` with every hook; the capabilities the plan's rules read: only the full
    cache is lossless, the full cache and the storage dtypes hold every key in place (a drafter may read and
    rewrite past keys), tidal runs plain steps only."""
    for name in NAMES:
        p = make_policy(name)
        assert isinstance(p, CachePolicy), name
        assert p.lossless == (name == "full"), name
        assert p.holds_every_key == (name in ("full", "bf16", "int8")), name
        assert p.plain_only == (name == "tidal"), name
    assert all(isinstance(make_policy(n), EvictionPolicy) != make_policy(n).holds_every_key for n in EVICTING)


def test_cli_kv(capsys, tiny_folder):
    from skipjack.cli import main

    code = main(["generate", "--model", str(tiny_folder), "--no-tune", "--kv", "nope", "hi"])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "unknown cache policy" in lines[0] and "Traceback" not in err, err
    argv = ["generate", "--model", str(tiny_folder), "--no-tune", "-n", "6", "--json", "--kv", "snapkv:budget=0.5"]
    code = main([*argv, "hello world"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["lossless"] is False and res["kv"] == "snapkv:budget=0.5" and res["new_tokens"] == 6
    assert "lossy" in err
    code = main([*argv[:-2], "hello world"])  # without --kv: lossless, kv "full"
    out, _ = capsys.readouterr()
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and res["lossless"] is True and res["kv"] == "full"


def test_buffers_grown_inside_a_forward_take_writes_between_steps(model):
    """A prompt longer than the first allocation grows an evicting layer's tensors inside the forward (inference
    mode); the decode loop's tree compaction (`keep`) writes them outside it, so they must be normal tensors."""
    prompt = [i % 40 for i in range(300)]
    cache = model.make_cache(400, policy=make_policy("snapkv:budget=1.0"))
    model(torch.tensor([prompt]), cache)
    model(torch.tensor([[1, 2, 3]]), cache)
    cache.keep(300, [0, 2])  # rows 0 and 2 kept (a tree's accepted path)
    for layer in evicting(cache):
        assert layer.offset == 302 and not layer.k.is_inference()


def test_cli_chat_refuses_kv(capsys):
    from skipjack.cli import main

    code = main(["chat", "--kv", "snapkv:budget=0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--kv does not apply" in err[0]


@pytest.mark.parametrize(
    "spec",
    [
        "streaming:sinks=1024",
        "cake:tau1=0.001,tau2=100,gamma=0",
        "tidal:budget=1e-9,correct=1",
        "h2o:every=1,budget=0.01",
    ],
)
@pytest.mark.parametrize("n", [1, 3, 300])
def test_extreme_but_valid_options_decode(model, spec, n):
    """More sinks than tokens, preferences that overflow a float (CAKE works in logs), the smallest budgets:
    decoding runs (they once raised: a negative window, an overflow)."""
    prompt = [random.Random(n).randrange(40) for _ in range(n)]
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=1)
    tokens, _ = run(model, spec, params=params, prompt=prompt)
    assert len(tokens) == 12
