"""Structured output: a grammar that every token obeys, in sampling and in verification (exact speculation).

The grammar library is llguidance (Microsoft's Rust engine behind Guidance; llama.cpp and vLLM use it too):
- it computes a token mask lazily, per step, in well under a millisecond on a 49k vocabulary, with no
  ahead-of-time pass over the vocabulary per grammar (xgrammar compiles a grammar against the vocabulary
  first; outlines-core builds an index per regex, slow for large JSON schemas);
- it takes JSON schemas, Lark grammars, regexes and (converted) llama.cpp GBNF;
- its matcher rolls back tokens, which speculative verification needs: every draft path is tried and undone;
- it has no Python dependencies (no torch pin).

How a grammar constrains decoding (`Constraint`, one per request, built by the engine from a `Grammar`):
- sampling: the logits of tokens the grammar forbids after the output so far are -inf (`sampling.adjust`),
  before every warper, so plain constrained decoding samples from the masked distribution;
- verification: each verify row gets the mask after its own path (the output plus the draft tokens from the
  root to the node): the matcher consumes the path, computes the mask and rolls back (`rows`). The verifier
  then compares each draft token with constrained plain's choice at that row, so a constrained speculative run
  yields exactly constrained plain decoding's tokens (greedy) or distribution (sampling);
- a draft token the grammar forbids ends the draft there (`cut`): it could never be accepted;
- jump-forward: where the grammar forces the next bytes (`"name":` once a schema's object has begun a key),
  their tokens (`forced`) are proposed as a draft. They are verified like any draft, so the output stays
  exactly constrained plain's (even where the model would have tokenized the bytes otherwise); accepted, they
  cost one forward pass for several tokens.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from skipjack.decoding.proposal import Proposal
from skipjack.errors import SkipjackError

KINDS = ("json_schema", "json_object", "lark", "gbnf", "regex")
MAX_SOURCE = 64 * 1024  # characters of a schema or grammar
MAX_DEPTH = 32  # nesting of a JSON schema's objects and arrays


def _depth(x, d: int = 0) -> int:
    if d > MAX_DEPTH:
        return d
    if isinstance(x, dict):
        return max([_depth(v, d + 1) for v in x.values()], default=d + 1)
    if isinstance(x, list):
        return max([_depth(v, d + 1) for v in x], default=d + 1)
    return d


@dataclass(frozen=True)
class Grammar:
    """A request's constraint as sent: `kind` (json_schema, json_object, lark, gbnf, regex) and its text (a JSON
    schema as JSON text; nothing for json_object). `text()` is llguidance's grammar, checked."""

    kind: str
    source: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SkipjackError(f"grammar kind must be one of {', '.join(KINDS)} (got {self.kind!r:.40})")
        if not isinstance(self.source, str):
            raise SkipjackError(f"the {self.kind} must be text")
        if len(self.source) > MAX_SOURCE:
            raise SkipjackError(f"the {self.kind} is {len(self.source)} characters; at most {MAX_SOURCE}")
        if self.kind != "json_object" and not self.source.strip():
            raise SkipjackError(f"the {self.kind} is empty")

    @classmethod
    def schema(cls, schema) -> Grammar:
        """A JSON schema given as an object (or as JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                raise SkipjackError("the JSON schema is not valid JSON") from None
        if not isinstance(schema, dict | bool):
            raise SkipjackError(f"a JSON schema must be an object (got {type(schema).__name__})")
        if _depth(schema) > MAX_DEPTH:
            raise SkipjackError(f"the JSON schema nests deeper than {MAX_DEPTH} levels")
        return cls("json_schema", json.dumps(schema))

    def text(self) -> str:
        """llguidance's grammar for this constraint; a one-line error if it is not valid (kept: a server sees the
        same schema request after request)."""
        return _compiled(self)


@functools.lru_cache(maxsize=128)
def _compiled(g: Grammar) -> str:
    import llguidance as llg

    if g.kind in ("json_schema", "json_object"):
        schema = json.loads(g.source) if g.kind == "json_schema" else {"type": "object"}
        try:
            text = llg.LLMatcher.grammar_from_json_schema(schema)
        except ValueError as x:
            raise SkipjackError(f"the JSON schema is not valid: {_line(x)}") from None
    elif g.kind == "regex":
        text = llg.LLMatcher.grammar_from_regex(g.source)
    else:
        lark = g.source
        if g.kind == "gbnf":
            try:
                lark = llg.gbnf_to_lark.gbnf_to_lark(g.source)
                rules = llg.gbnf_to_lark.GrammarParser().parse(g.source)
            except Exception as x:  # the converter's own errors (a parser on user text)
                raise SkipjackError(f"the GBNF grammar is not valid: {_line(x)}") from None
            if not _terminates(rules, "root"):
                raise SkipjackError("the GBNF grammar never terminates: its root derives no finite text")
        text = llg.LLMatcher.grammar_from_lark(lark)
    err = llg.LLMatcher.validate_grammar(text, None)
    if err:
        raise SkipjackError(f"the {g.kind.replace('_', ' ')} is not valid: {_line(err)}")
    return text


def _terminates(rules: dict, root: str) -> bool:
    """Whether `root` derives some finite text (a productive nonterminal), over the GBNF parser's rules: a
    literal or class is productive; a sequence when all its parts are, an alternative when one is, a repetition
    when it may repeat zero times or its part is; rules to a fixed point."""
    from llguidance import gbnf_to_lark as G

    done: set[str] = set()

    def ok(n) -> bool:
        if isinstance(n, G.RuleRefNode):
            return n.name in done
        if isinstance(n, G.RepetitionNode):
            return n.min_times == 0 or ok(n.node)
        if isinstance(n, G.SequenceNode):
            return all(ok(c) for c in n.children())
        if isinstance(n, G.AlternativeNode):
            return any(ok(c) for c in n.children())
        return not n.children() or all(ok(c) for c in n.children())  # literals, classes, wrappers

    while True:
        new = {name for name, r in rules.items() if name not in done and ok(r.alternatives)}
        if not new:
            return root in done
        done |= new


def check_grammar(grammar, params) -> None:
    """A request's grammar is well formed and combines with its sampling settings (its end is a stop token)."""
    if not isinstance(grammar, Grammar):
        raise SkipjackError(f"grammar must be a skipjack Grammar (got {type(grammar).__name__})")
    if params.ignore_eos or params.min_tokens:
        raise SkipjackError("a grammar ends the output itself: it does not combine with ignore_eos or min_tokens")
    if not params.stop_token_ids:
        raise SkipjackError("a grammar needs stop token ids: it ends the output with one")
    grammar.text()  # compiled and checked (kept for the plan)


def _line(x) -> str:
    s = " ".join(str(x).split())
    return s[:300]


def llg_tokenizer(tokenizer, vocab: int, stop_ids):
    """llguidance's view of a skipjack `Tokenizer` (its tokens' bytes; the stop ids end a grammar), built once
    per tokenizer (about 0.3 s for 49k tokens) and kept on it."""
    import llguidance as llg

    key = (vocab, tuple(sorted(stop_ids)))
    got = getattr(tokenizer, "_llg", None)
    if got is not None and got[0] == key:
        return got[1]
    hf = tokenizer.hf
    raw = getattr(hf, "raw", None) or getattr(hf, "backend_tokenizer", None)
    if raw is None:
        raise SkipjackError("structured output needs a fast (tokenizers) tokenizer")
    lt = llg.LLTokenizer(raw.to_str(), n_vocab=vocab, eos_token=list(key[1]) or None)
    tokenizer._llg = (key, lt)
    return lt


def _bits(mask: bytes, vocab: int) -> torch.Tensor:
    """llguidance's bitmask (32-bit little-endian words) as a bool tensor [vocab]."""
    x = torch.frombuffer(bytearray(mask), dtype=torch.uint8)  # [W * 4]
    return ((x[:, None] >> _SHIFTS) & 1).flatten()[:vocab].bool()  # [vocab]


_SHIFTS = torch.arange(8, dtype=torch.uint8)  # [8] a byte's bits, least significant first (made once)


class Constraint:
    """One request's grammar state (an llguidance matcher) over a vocabulary of `vocab` tokens."""

    def __init__(self, grammar: str, lltok, vocab: int):
        import llguidance as llg

        self.vocab, self.lltok = vocab, lltok
        self.matcher = llg.LLMatcher(lltok, grammar, log_level=0)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise SkipjackError(f"the grammar cannot go on: {_line(self.matcher.get_error())}")

    def allowed(self) -> torch.Tensor:
        """The tokens the grammar allows next [V] bool (none left: a one-line error)."""
        self._check()
        m = _bits(self.matcher.compute_bitmask(), self.vocab)  # [V]
        if not m.any():
            raise SkipjackError("the grammar allows no token here")
        return m

    def advance(self, tokens: list[int]) -> None:
        """Emitted tokens: the grammar's state moves past them."""
        if tokens and self.matcher.try_consume_tokens(tokens) != len(tokens):
            self._check()
            raise SkipjackError("a token the grammar forbids was emitted")

    def cut(self, proposal: Proposal | None) -> Proposal | None:
        """The proposal up to its first node (in order) whose path the grammar forbids: that token could never
        be accepted, and every later node is kept only if all earlier ones were (a prefix stays a tree)."""
        if not proposal:
            return proposal
        for i, path in enumerate(_paths(proposal)):
            n = self.matcher.try_consume_tokens(path)
            self.matcher.rollback(n)
            if n < len(path):
                return proposal.prefix(i) if i else None
        return proposal

    def rows(self, proposal: Proposal) -> torch.Tensor:
        """The mask [1 + N, V] for each verify row: after the output (row 0) and after each node's path."""
        out = [self.allowed()]
        for path in _paths(proposal):
            n = self.matcher.try_consume_tokens(path)
            try:  # a forbidden path (none after `cut`) or one past the grammar's end token: a row never reached
                m = _bits(self.matcher.compute_bitmask(), self.vocab) if n == len(path) else None  # [V]
                out.append(m if m is not None and m.any() else torch.ones(self.vocab, dtype=torch.bool))
            finally:
                self.matcher.rollback(n)
        return torch.stack(out)  # [1 + N, V]

    def forced(self) -> list[int]:
        """The bytes the grammar forces next, tokenized (jump-forward; may be empty). All of them, the last token
        too (llguidance's own `compute_ff_tokens` keeps back a token a longer one could cover): they are only a
        draft, verified like any other."""
        forced = self.matcher.compute_ff_bytes()
        return list(self.lltok.tokenize_bytes(forced)) if forced else []


def _paths(proposal: Proposal) -> list[list[int]]:
    """Each node's tokens from the root (its ancestors' and its own)."""
    paths: list[list[int]] = []
    for tok, par in zip(proposal.tokens, proposal.parents):
        paths.append((paths[par] if par >= 0 else []) + [tok])
    return paths
