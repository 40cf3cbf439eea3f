"""Structured output (issue 37): a grammar constrains sampling and verification alike, so constrained
speculation gives exactly constrained plain decoding's tokens (greedy identity for every drafter, chains and
trees, a drafter that only proposes forbidden tokens) and law (χ² of the verifier with each row's mask taken
along its own path); jump-forward drafts; hostile grammars are one-line errors."""

from __future__ import annotations

import itertools
import json

import llguidance as llg
import pytest
import torch
from drafters_mock import NeverAccept, _Base, decode, drafter_or_spec, make, plan_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_distribution import V, chi2_pvalue, draft_chain, draft_tree, markov

from skipjack.decoding.constraint import Constraint, Grammar, check_grammar
from skipjack.decoding.cost import CostModel
from skipjack.decoding.plan import Plan
from skipjack.decoding.proposal import Proposal
from skipjack.decoding.sampling import SamplingParams, adjust, probs
from skipjack.decoding.sequence import generate
from skipjack.decoding.sizing import CostSizer
from skipjack.decoding.verify import verify
from skipjack.errors import SkipjackError

EOS = 0


class Chars:
    """A tokenizer for llguidance over a small vocabulary (id 0 is the end token): single characters and some
    pairs, so a text has several tokenizations, as with a real BPE."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces
        self.tokens = [b"<eos>"] + [p.encode() for p in pieces]
        self.eos_token_id, self.bos_token_id, self.special_token_ids = EOS, None, [EOS]

    def __call__(self, data: bytes | str) -> list[int]:
        """Longest match first; a byte no token covers is dropped."""
        data = data.encode() if isinstance(data, str) else data
        out, i = [], 0
        while i < len(data):
            best = max((j for j, t in enumerate(self.tokens) if j and data.startswith(t, i)), key=self.size, default=0)
            out += [best] if best else []
            i += len(self.tokens[best]) if best else 1
        return out

    def size(self, j: int) -> int:
        return len(self.tokens[j])

    def ids(self, text: str) -> list[int]:
        return self(text.encode())


PIECES_48 = list('{}[]":, 0123456789abcdeflnrstuq') + ['{"', '":', '",', '"}', "tr", "ue", "al", "se", ": ", ", "]
PIECES_48 += ["ab", "ba", "12", "00", '"a', 'a"'][: 47 - len(PIECES_48)]
SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}, "c": {"enum": ["ab", "ba"]}},
    "required": ["a", "b", "c"],
    "additionalProperties": False,
}
GRAMMARS = [
    Grammar.schema(SCHEMA),
    Grammar("lark", 'start: ("a" | "b" "a"+ | "12" | "[" start "]")+ "!"'),
    Grammar("lark", 'start: "ab" | "ba" "a" | "12"'),  # ends within a step: the end token is verified too
]


def lltok(pieces: list[str]):
    return llg.LLTokenizer(llg.TokenizerWrapper(Chars(pieces)))


@pytest.fixture(scope="module")
def tok48():
    assert len(PIECES_48) == 47
    return lltok(PIECES_48)


def constrained(model, lt, grammar: Grammar, prompt, params, method="plain"):
    """(tokens, steps) of `generate` under the grammar, with a method spec or a drafter object."""
    c = Constraint(grammar.text(), lt, model.lm_head.out_features)
    if isinstance(method, str):
        plan = plan_of(make(method, model), constraint=c)
    else:
        plan = Plan(method.session(), CostSizer(CostModel.flat()), constraint=c)
    steps = list(generate(model, prompt, params, plan))
    return [t for s in steps for t in s.tokens], steps


class Forbidden(_Base):
    """Proposes only "q", a character no grammar here allows: every draft is cut before it is verified."""

    name = "forbidden"

    def __init__(self, q: int):
        self.q, self.verified = q, 0

    def observe(self, proposal, verdict):
        self.verified += 1

    def propose(self, ctx):
        return Proposal.chain([self.q] * min(4, ctx.budget), [0.9] * min(4, ctx.budget))


def accepts(lt, grammar: Grammar, tokens: list[int]) -> bool:
    m = llg.LLMatcher(lt, grammar.text(), log_level=0)
    return m.try_consume_tokens(tokens) == len(tokens)


DRAFTERS = ["pld", "ngram", "pld:k=3", "always", "never", "random", "random-tree", "forbidden"]


def drafter(name, model, seed):
    return Forbidden(1 + PIECES_48.index("q")) if name == "forbidden" else drafter_or_spec(name, model, seed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.lists(st.integers(1, 47), min_size=1, max_size=12),
    max_new=st.integers(4, 20),
    grammar=st.sampled_from(range(len(GRAMMARS))),
    name=st.sampled_from(DRAFTERS),
    seed=st.integers(0, 1000),
)
def test_constrained_speculation_is_constrained_plain(tiny_llama64, tok48, prompt, max_new, grammar, name, seed):
    g = GRAMMARS[grammar]
    params = SamplingParams(max_new_tokens=max_new, stop_token_ids=frozenset({EOS}))
    plain, steps = constrained(tiny_llama64, tok48, g, prompt, params)
    assert accepts(tok48, g, plain)
    d = drafter(name, tiny_llama64, seed)
    spec, spec_steps = constrained(tiny_llama64, tok48, g, prompt, params, d)
    assert spec == plain and spec_steps[-1].finish == steps[-1].finish
    if name == "forbidden":  # cut before any forward: none of its drafts reached verification
        assert d.verified == 0


def test_unconstrained_and_constrained_differ_and_the_output_parses(tiny_llama64, tok48):
    prompt, g = [5, 6, 7], GRAMMARS[0]
    params = SamplingParams(max_new_tokens=40, stop_token_ids=frozenset({EOS}))
    free, _ = decode(tiny_llama64, prompt, params)
    out, steps = constrained(tiny_llama64, tok48, g, prompt, params, "pld")
    assert out != free and accepts(tok48, g, out)
    text = "".join(PIECES_48[t - 1] for t in out)
    if steps[-1].finish == "stop":
        assert set(json.loads(text)) == {"a", "b", "c"}


def test_jump_forward_drafts_the_forced_bytes(tiny_llama64, tok48):
    """After `{"` the schema forces `a"` (white space may follow): proposed as one draft (verified, so exact),
    several tokens for one forward."""
    c = Constraint(GRAMMARS[0].text(), tok48, 48)
    c.advance(Chars(PIECES_48).ids('{"'))
    assert "".join(PIECES_48[t - 1] for t in c.forced()) == 'a"'
    assert "".join(PIECES_48[t - 1] for t in c.forced()) == 'a"'  # computing it moves nothing
    params = SamplingParams(max_new_tokens=30, stop_token_ids=frozenset({EOS}))
    plain, _ = constrained(tiny_llama64, tok48, GRAMMARS[0], [3, 4], params)
    spec, steps = constrained(tiny_llama64, tok48, GRAMMARS[0], [3, 4], params, NeverAccept(tiny_llama64))
    assert spec == plain and len(steps) < len(plain)  # forced tokens came several per step


class Oracle(_Base):
    """A model-free drafter that copies a known continuation (plain's output) after whatever context it is
    given, and records (its context's length, the tokens emitted when it was asked)."""

    name = "oracle"
    model_free = True

    def __init__(self, full: list[int], emitted: list[int]):
        self.full, self.emitted, self.calls = full, emitted, []

    def propose(self, ctx):
        n = len(ctx.tokens)
        self.calls.append((n, self.emitted[0]))
        tail = self.full[n : n + min(3, ctx.budget)]
        return Proposal.chain(tail, [0.9] * len(tail)) if tail and ctx.tokens == self.full[:n] else None


def test_a_model_free_drafter_drafts_past_the_forced_tokens_in_the_same_step(tiny_llama64, tok48):
    """Jump-forward and speculation in one draft: a model-free drafter is asked for what follows the forced
    tokens (its context ends with them, before they were emitted), its nodes hang off the forced chain, and
    the tokens stay constrained plain's."""
    prompt, g = [3, 4], GRAMMARS[0]
    params = SamplingParams(max_new_tokens=30, stop_token_ids=frozenset({EOS}))
    plain, plain_steps = constrained(tiny_llama64, tok48, g, prompt, params)
    emitted = [len(prompt)]
    oracle = Oracle(prompt + plain, emitted)
    c = Constraint(g.text(), tok48, 48)
    out, steps = [], []
    for step in generate(
        tiny_llama64, prompt, params, Plan(oracle.session(), CostSizer(CostModel.flat()), constraint=c)
    ):
        out += step.tokens
        steps.append(step)
        emitted[0] = len(prompt) + len(out)
    assert out == plain
    assert any(n > e for n, e in oracle.calls)  # asked after forced tokens not yet emitted


def test_cut_and_rows_follow_each_path(tok48):
    c = Constraint(GRAMMARS[1].text(), tok48, 48)
    a, b, q = (1 + PIECES_48.index(x) for x in "abq")
    tree = Proposal([a, q, b, a, q], [-1, -1, 0, 2, 3])  # a; q; a->b; a->b->a; a->b->a->q
    assert c.cut(tree).tokens == [a]  # the first forbidden node (in order) ends it
    chain = Proposal.chain([b, a, a, b])
    rows = c.rows(chain)  # [5, V]
    assert rows.shape == (5, 48)
    assert rows[0, a] and rows[0, b] and not rows[1, b] and rows[1, a]  # after "b" only "a"
    assert rows[2, a] and rows[2, b]  # after "ba": more "a"s or a new item


# The χ² proof: a grammar over V = 10 tokens whose mask depends on the path ("(" must be followed by "c", "x"
# by "y"), never satisfied within 3 tokens except through pairs; the verifier gets each row's mask from the
# matcher along that row's path, and must keep the law of constrained plain sampling.
PIECES_10 = ["a", "b", "ab", "(", "c", ")", "x", "y", "(c"]
LAW_GRAMMAR = Grammar("lark", 'start: item item item item+\nitem: "a" | "b" | "(" "c" ")" | "x" "y"')


def _masked_law(table, params, lt, n=3):
    law = {}
    for seq in itertools.product(range(V), repeat=n):
        pr, prev = 1.0, V
        m = llg.LLMatcher(lt, LAW_GRAMMAR.text(), log_level=0)
        for t in seq:
            c = Constraint.__new__(Constraint)
            c.vocab, c.matcher = V, m
            row = adjust(table[prev][None], params, None, None, torch.tensor([0]), c.allowed()[None])
            pr *= float(probs(row, params)[0, t])
            if pr == 0 or not m.consume_token(t):
                pr = 0.0
                break
            prev = t
        law[seq] = pr
    return law


@pytest.mark.parametrize("kind", ["tree", "cut-chain"])
def test_verifier_law_under_a_grammar(kind):
    torch.set_num_threads(1)
    lt = lltok(PIECES_10)
    table = markov(seed=7)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, stop_token_ids=frozenset({EOS}))
    rng = torch.Generator().manual_seed(11)
    samples = []
    for _ in range(3000):
        c = Constraint(LAW_GRAMMAR.text(), lt, V)
        seq = []
        while len(seq) < 3:
            k = int(torch.randint(1, 5, (1,), generator=rng))
            prop = draft_tree(rng, k + 2) if kind == "tree" else draft_chain(rng, k)
            if kind == "cut-chain":
                prop = c.cut(prop) or Proposal.chain([])
            logits = table[[seq[-1] if seq else V] + prop.tokens]
            toks = verify(logits, prop, params, rng, allowed=c.rows(prop)).tokens
            toks = toks[: toks.index(EOS) + 1] if EOS in toks else toks  # the output ends there
            c.advance(toks)
            seq += toks
            if EOS in toks:
                break
        samples.append(tuple(seq[:3]))
    law = _masked_law(table, params, lt)
    assert chi2_pvalue(samples, law) > 1e-3


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda: Grammar("yaml", "x"), "grammar kind must be one of"),
        (lambda: Grammar("lark", "  "), "is empty"),
        (lambda: Grammar("lark", "x" * 70_000), "at most"),
        (lambda: Grammar.schema("{nope"), "not valid JSON"),
        (lambda: Grammar.schema([1]), "must be an object"),
        (lambda: Grammar.schema(json.loads('{"a":' * 40 + "1" + "}" * 40)), "deeper than"),
        (lambda: Grammar.schema({"type": "nope"}).text(), "not valid"),
        (lambda: Grammar("lark", "start: undefined_rule").text(), "not valid"),
        (lambda: Grammar("gbnf", 'root ::= ("a"').text(), "not valid"),
        (lambda: Grammar("regex", "(unclosed").text(), "not valid"),
    ],
)
def test_hostile_grammars_are_one_line_errors(make, says):
    with pytest.raises(SkipjackError) as e:
        make()
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_grammar_refuses_settings_that_fight_its_end():
    g = GRAMMARS[0]
    for params, says in [
        (SamplingParams(min_tokens=2, stop_token_ids=frozenset({0})), "min_tokens"),
        (SamplingParams(ignore_eos=True, stop_token_ids=frozenset({0})), "ignore_eos"),
        (SamplingParams(), "needs stop token ids"),
    ]:
        with pytest.raises(SkipjackError, match=says):
            check_grammar(g, params)
