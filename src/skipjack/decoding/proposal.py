"""What a drafter sees, what it proposes, what it learns from, and the protocol every drafter implements.

The engine owns all state that verification changes: a drafter gets a read-only `DraftContext` in `propose`,
returns a `Proposal` (which may carry the drafter's own working data in `state`, handed back to it), and in
`observe` gets that proposal back with the `Verdict`. Nothing is written into a proposal after it is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from skipjack.cache import KVCache
    from skipjack.models import DecoderLM


@dataclass(frozen=True)
class DraftContext:
    """What a drafter may look at to propose. Read-only by contract: a drafter may run the model's layers
    (self-speculation does), but it must leave `cache` as it found it; the engine owns the cache state."""

    tokens: list[int]  # prompt + everything emitted; the last one is the pending root (not yet in the cache)
    budget: int  # most draft nodes the engine will verify this step (>= 1)
    model: DecoderLM | None = None
    cache: KVCache | None = None  # holds every token of `tokens` but the last
    more: Callable[[list[float]], bool] = lambda scores: True  # the sizer: given the scores of the nodes
    # drafted so far, whether drafting one more can still pay (drafting is not free: `sizing.CostSizer.more`)
    fit: Callable[[list[float]], int] = len  # the sizer: how many leading nodes of these worths it would verify
    # (`sizing.CostSizer.fit`), for a drafter whose nodes are worth more than their own acceptance (lookahead's
    # window) and which so sizes its unscored proposal itself


@dataclass(frozen=True)
class Verdict:
    """What verification decided about a proposal."""

    tokens: list[int]  # emitted: accepted draft tokens followed by the bonus token
    path: list[int]  # accepted node indices (into proposal.tokens), root first
    argmax: list[int]  # [1 + N] the target's raw argmax per verify row (after the root, then after node i);
    # empty when the proposal was sized down to nothing and no verify forward ran
    hidden: dict = field(default_factory=dict)  # layer -> [1 + N, D] its output per verify row, for the
    # layers the proposal asked for (`Proposal.want`) that the verify forward ran


@dataclass
class Proposal:
    """A chain or token tree of draft tokens hanging off the pending token (the root).

    Nodes are listed parents-first, so any prefix of the list is itself a valid tree.
    """

    tokens: list[int]  # [N] draft tokens
    parents: list[int]  # [N] parent node index, -1 for the root
    scores: list[float] | None = None  # [N] drafter's estimate that each node gets accepted (for sizing)
    q: torch.Tensor | None = None  # [N, V] distribution each token was sampled from; None = deterministic
    state: Any = None  # the drafter's own working data for `observe` (kept by `prefix`)
    resume: tuple[int, torch.Tensor] | None = None  # (E, hidden [1, 1 + N, D] after layer E for root + nodes):
    # a chain whose draft ran the model's own layers 0..E on every verify row and left their keys in the
    # cache; verification runs only layers E+1.. from there (exact where the model is batch-invariant)
    want: tuple[int, ...] = ()  # layers whose per-row output the verify forward returns (`Verdict.hidden`)

    @classmethod
    def chain(cls, tokens: list[int], scores: list[float] | None = None, q=None, state=None) -> Proposal:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), scores, q, state)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def depths(self) -> list[int]:
        """Depth of each node (children of the root have depth 1)."""
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def children(self) -> list[dict[int, int]]:
        """Per verify row (0 = root, i+1 = node i): token -> child node index, in proposal order."""
        out: list[dict[int, int]] = [{} for _ in range(len(self.tokens) + 1)]
        for i, (t, p) in enumerate(zip(self.tokens, self.parents)):
            out[p + 1].setdefault(t, i)
        return out

    def valid_length(self, vocab: int) -> int:
        """How many leading nodes are well formed: a token id in [0, vocab) and a parent listed before it.
        The engine verifies only that prefix, so a drafter trained on another vocabulary (a shared or
        persisted table) cannot crash the forward pass; its out-of-range guesses are simply not tried."""
        for i, (t, p) in enumerate(zip(self.tokens, self.parents)):
            if not (0 <= t < vocab and -1 <= p < i):
                return i
        return min(len(self.tokens), len(self.parents))

    def graft(self, tail: Proposal | None) -> Proposal:
        """This chain with `tail` (a tree drafted after its last token) hung off its end: the jump-forward's
        forced tokens (scored 1: sized by nobody) and a model-free drafter's continuation, as one draft. Neither
        carries drafter state (`observe` is not asked of a forced step)."""
        if not tail:
            return self
        assert self.is_chain and self.q is None and tail.q is None and tail.resume is None
        n = len(self.tokens)
        parents = self.parents + [p + n if p >= 0 else n - 1 for p in tail.parents]
        scores = None if tail.scores is None else [1.0] * n + list(tail.scores)
        return Proposal(self.tokens + tail.tokens, parents, scores)

    def prefix(self, n: int) -> Proposal:
        if n >= len(self.tokens) == len(self.parents):
            return self  # the common case in the decode loop: nothing to cut, nothing to copy
        sc = None if self.scores is None else self.scores[:n]
        q = None if self.q is None else self.q[:n]
        resume = None if self.resume is None else (self.resume[0], self.resume[1][:, : n + 1])
        return Proposal(self.tokens[:n], self.parents[:n], sc, q, self.state, resume, self.want)


def merge(proposals: list[Proposal], budget: int) -> Proposal | None:
    """Merge scored proposals into one trie (a token under the same parent becomes one node, keeping the
    highest score) and list the best `budget` nodes best-first (ties: shallower first). Scores never grow
    along a path, so every parent sorts before its children and any prefix is a valid tree."""
    node: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    tokens, parents, depth, score = [], [], [], []
    for prop in proposals:
        ids: list[int] = []  # this proposal's node -> merged node
        for tok, par, s in zip(prop.tokens, prop.parents, prop.scores or [1.0] * len(prop)):
            up = ids[par] if par >= 0 else -1
            i = node.get((up, tok))
            if i is None:
                i = node[(up, tok)] = len(tokens)
                tokens.append(tok)
                parents.append(up)
                depth.append(1 if up < 0 else depth[up] + 1)
                score.append(s)
            else:
                score[i] = max(score[i], s)
            ids.append(i)
    return best_first(tokens, parents, score, budget, depth)


def best_first(
    tokens: list[int], parents: list[int], score: list[float], budget: int, depth=None, state=None
) -> Proposal | None:
    """A trie (parents listed before children) re-listed best-first by score (ties: shallower first), cut to
    `budget` nodes. Scores never grow along a path, so parents still come before their children."""
    if depth is None:
        depth = []
        for p in parents:
            depth.append(1 if p < 0 else depth[p] + 1)
    order = sorted(range(len(tokens)), key=lambda i: (-score[i], depth[i], i))[:budget]
    new = {old: k for k, old in enumerate(order)}
    if not order:
        return None
    kept = [tokens[i] for i in order], [new.get(parents[i], -1) for i in order], [score[i] for i in order]
    return Proposal(*kept, state=state)


REQUEST_PRIOR = 3.0  # pseudo-acceptances behind a request's calibration factor


def calibration(got: float, pred: float, prior: float, lo: float, hi: float) -> float:
    """A request's calibration factor: realised over predicted acceptances so far, starting at `prior`
    (REQUEST_PRIOR pseudo-acceptances behind it), clipped to [lo, hi]."""
    return min(hi, max(lo, (got + REQUEST_PRIOR * prior) / (pred + REQUEST_PRIOR)))


def judge(path: list[int], emitted: list[int]) -> bool | None:
    """Would a draft path (tokens from the root) have been accepted, given what the model emitted (accepted
    drafts + the bonus token)? None when the emitted tokens cannot tell (the path goes past them or leaves
    them before its last token). Used to score every candidate, verified or pruned (greedy-exact)."""
    d = len(path)
    if d > len(emitted) or path[: d - 1] != emitted[: d - 1]:
        return None
    return path[-1] == emitted[d - 1]


class Drafter(Protocol):
    """A draft source. `begin` starts a request with its prompt; `propose` drafts up to `ctx.budget` nodes
    after `ctx.tokens`; `observe` gets back every proposal that `propose` returned (cut to what was verified,
    possibly to nothing) with the verdict; `end` closes the request. `lossless`: whether its output provably
    equals plain decoding's (through the one verifier)."""

    name: str
    lossless: bool

    def begin(self, prompt: list[int]) -> None: ...

    def propose(self, ctx: DraftContext) -> Proposal | None: ...

    def observe(self, proposal: Proposal, verdict: Verdict) -> None: ...

    def end(self) -> None: ...
