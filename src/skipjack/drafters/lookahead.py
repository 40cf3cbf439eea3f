"""`lookahead`: lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding"; the reference implementation is hao-ai-lab/LookaheadDecoding, llama.cpp's peer is
`examples/lookahead`).

Jacobi decoding guesses the next tokens all at once and refines every guess in parallel: one forward pass
over the guesses gives the model's next token after each prefix, and those become the new guesses. It rarely
gets many tokens right in one iteration, but its trajectories produce fluent n-grams. Lookahead decoding keeps
those n-grams in a pool and verifies the ones that start with the current token, in the same pass.

Options: window W, n-gram size N, guess set G. One verify pass per step, with two branches off the root (the
pending token, the last one emitted):
1. The lookahead branch: a 2-D window of N - 1 levels. Level 0 is the root followed by W - 1 guessed
   tokens (columns 1..W-1); each higher level holds W tokens (columns 0..W-1). The paper's attention mask:
   level 0 is a causal chain, and the token at level l, column j sees level 0 up to column j and its own
   column's lower levels. That is a tree (each cell's parent is the cell below it, level 0's the column
   before), so it is one more subtree of the verify pass's tree (positions by depth: j + l).
2. The model's argmax after the top level's column j is the column's next token: the column with it is an
   N-gram (its key: the column's level-0 token, the root for column 0), added to the pool, which keeps at
   most G n-grams per key (least recently added dropped, duplicates refreshed).
3. The verification branch: the pool's n-grams keyed by the root, each N - 1 tokens hanging off it.
   Both branches are merged into one trie (a token under the same parent is one node, so a window cell may
   share a verification node: the same path gives the same row). The one verifier decides (greedy: the longest
   path the model agrees with, plus its bonus token; sampling: SpecInfer's rule for deterministic drafts).
   A window node is an ordinary draft node: it is accepted if it matches, like any other.
4. The window shifts one level, whatever was accepted (the reference implementation's default,
   ALWAYS_FWD_ONE): level 0 takes level 1's columns 1..W-1 (the next root stands in column 0), level l takes
   level l + 1, the top level takes the new tokens.
Warm-up: the window starts as level 0 alone, its guesses drawn from the prompt (seeded: a prompt always gets
the same window); each of the first N - 2 steps puts the new tokens on top as one more level and collects
nothing (the reference implementation's fill steps, without its column shift). N = 2 is Jacobi decoding with
a pool of bigrams: level 0 alone, replaced by the new tokens each step (llama.cpp's behaviour there).

`prompt=1` (the reference implementation's POOL_FROM_PROMPT): the pool also gets the prompt's N-grams, and the
output's as it is emitted. `prompt=0` is the pool of the lookahead branch alone, as in the paper's main runs.

Sizes. The paper verifies the whole window and every guess each step, which pays where a wider pass costs
almost nothing (a GPU). On a CPU every verified token costs a share of a step (BENCHMARKS.md, "Verify cost"),
so by default a step verifies what the cost model says pays, as for every drafter, with one difference: a
window cell is worth more than its own chance of acceptance (its n-grams pay later), so the drafter sizes its
proposal itself and leaves it unscored. The units are each verification node (worth its path's acceptance
rate, learned per depth) and each window column, whole (worth, per cell, the tokens accepted per window cell
run that only the window's n-grams gave, learned). Listed best first (parents before children, column j before
j + 1) and cut at the budget, they are kept up to where the sizer would cut nodes of those worths
(`DraftContext.fit`: the cost model's best prefix); W, N and G are the most a step runs. With `k=N` (a fixed
size: the sizer keeps everything) it runs the whole method as published, within N nodes. Columns not run keep
their tokens; when the window's n-grams keep paying after it stopped (the pool outlives it), its worth rises and
it runs again. A proposal cut after `propose` (a grammar, a request's `n_max`, a `mix`) advances only the
columns it still holds whole.

Batches: it works there as alone (its drafts carry no scores, so a batch verifies them whole, within its
per-sequence cap). The pool and the window are per request; the worths are learned across requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from skipjack.decoding.proposal import DraftContext, Proposal, Verdict, judge
from skipjack.drafters.base import Drafter, DraftSession
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT

RATE_PRIOR = (0.6, 2.0)  # pseudo (accepted, tried) behind each depth's acceptance rate: 0.3
YIELD_PRIOR = (4.0, 16.0)  # pseudo (tokens, window cells) behind the window's worth: 0.25 tokens per cell


class Lookahead(Drafter):
    """The options and what is learned across requests: the verification branch's acceptance per depth
    (`rates`: [tried, accepted]) and the window's yield (`window_yield`: [tokens only its n-grams gave, cells
    run]). Each request's window and pool live in its `LookaheadSession`."""

    name = "lookahead"
    lossless = True
    LEARNED = ("rates", "window_yield")

    def __init__(self, window: int = 5, ngram: int = 4, guess: int = 5, prompt: int = 1):
        if not 1 <= window <= 16:
            raise SkipjackError(f"lookahead: window (columns of the 2-D window) must be in [1, 16] (got {window})")
        if not 2 <= ngram <= 8:
            raise SkipjackError(f"lookahead: ngram (n-gram size N, levels + 1) must be in [2, 8] (got {ngram})")
        if not 1 <= guess <= 16:
            raise SkipjackError(f"lookahead: guess (n-grams verified per step, G) must be in [1, 16] (got {guess})")
        if prompt not in (0, 1):
            raise SkipjackError(f"lookahead: prompt (pool from the prompt and output) must be 0 or 1 (got {prompt})")
        if window * (ngram - 1) > MAX_DRAFT:
            raise SkipjackError(
                f"lookahead: the window's window * (ngram - 1) = {window * (ngram - 1)} tokens must fit one "
                f"verify pass (at most {MAX_DRAFT})"
            )
        self.window, self.ngram, self.guess, self.prompt = window, ngram, guess, bool(prompt)
        self.rates = [[0.0, 0.0] for _ in range(ngram)]  # per depth 1..N-1 (index 0 unused): [tried, accepted]
        self.window_yield = [0.0, 0.0]  # [tokens that only the window's n-grams gave, window cells run]

    def session(self) -> LookaheadSession:
        return LookaheadSession(self)

    def rate(self, depth: int) -> float:
        """P(a verification node at this depth is accepted | its parent was)."""
        tried, hit = self.rates[depth]
        return (hit + RATE_PRIOR[0]) / (tried + RATE_PRIOR[1])

    @property
    def cell_worth(self) -> float:
        """Tokens a window cell gives, counting those accepted later from its n-grams (only those no n-gram of
        the prompt or output gave)."""
        got, cells = self.window_yield
        return (got + YIELD_PRIOR[0]) / (cells + YIELD_PRIOR[1])

    def describe(self) -> dict:
        return {
            "cell_worth": round(self.cell_worth, 3),
            "rates": [round(self.rate(d), 3) for d in range(1, self.ngram)],
        }


@dataclass
class Layout:
    """What `propose` laid out, for `observe`."""

    root: int
    levels: list[list[int]]  # [levels][W]: the window as run (level 0, column 0: a placeholder for the root)
    context: list[tuple[int, ...]]  # the root's n-grams from the prompt or output (not the window's alone)
    checks: list[tuple[int, ...]] = field(default_factory=list)  # each verification node's path
    tops: dict[int, int] = field(default_factory=dict)  # column run -> the verify row of its top cell (0: root)
    cells: list[int] = field(default_factory=list)  # the window's own nodes (not shared with verification's)


class LookaheadSession(DraftSession):
    """One request: its 2-D window (`levels`), its n-gram pool and how far the context was added to it."""

    def __init__(self, drafter: Lookahead):
        self.d = drafter
        self.begin([])

    def begin(self, prompt: list[int]) -> None:
        d = self.d
        rng = random.Random(0)  # a fixed seed: the same prompt always starts from the same window
        self.levels = [[rng.choice(prompt) if prompt else 0 for _ in range(d.window)]]  # [levels][W]
        # key token -> {n-gram's N - 1 tokens: from the window only}, oldest first
        self.pool: dict[int, dict[tuple[int, ...], bool]] = {}
        self.seen = 0  # context positions whose n-gram (ending there) went into the pool, with `prompt=1`
        if d.prompt:
            self._add_context(prompt)

    def _add_context(self, tokens: list[int]) -> None:
        """Every N-gram of the context ending after position `seen` (prompt and output: POOL_FROM_PROMPT)."""
        n = self.d.ngram
        for end in range(max(self.seen, n - 1), len(tokens)):
            self._remember(tokens[end - n + 1], tuple(tokens[end - n + 2 : end + 1]), False)
        self.seen = len(tokens)

    def _remember(self, key: int, gram: tuple[int, ...], window: bool) -> None:
        """Add an n-gram to the pool: at most G per key, the least recently added one dropped first."""
        grams = self.pool.setdefault(key, {})
        if gram in grams:
            window = grams.pop(gram) and window  # from the context once: the window did not make it
        elif len(grams) >= self.d.guess:
            del grams[next(iter(grams))]
        grams[gram] = window

    def propose(self, ctx: DraftContext) -> Proposal | None:
        """Both branches as units of worth (a verification node; a window column, whole), best first, within
        `ctx.budget` nodes and cut where the sizer would cut nodes of these worths (`ctx.fit`); one trie."""
        d, tokens = self.d, ctx.tokens
        if d.prompt:
            self._add_context(tokens)
        root, L = tokens[-1], len(self.levels)
        grams = list(self.pool.get(root, {}).items())[::-1]  # most recent first
        units = self._checks([gram for gram, _ in grams])  # (worth per node, nodes, path)
        units += [(d.cell_worth, (j > 0) + L - 1, j) for j in range(d.window)]  # (..., column)
        units.sort(key=lambda u: -u[0])  # stable: parents before children, column j before j + 1
        worths: list[float] = []
        for k, (worth, n, _) in enumerate(units):
            if len(worths) + n > ctx.budget:
                units = units[:k]
                break
            worths += [worth] * n
        keep = ctx.fit(worths)
        lay, trie, used = Layout(root, self.levels, [gram for gram, window in grams if not window]), Trie(), 0
        for _, n, what in units:
            used += n
            if used > keep:
                break
            if isinstance(what, int):
                size = len(trie.tokens)
                lay.tops[what] = trie.column(self.levels, what)
                lay.cells += range(size, len(trie.tokens))
            else:
                lay.checks.append(what)
                trie.add(trie.path.get(what[:-1], -1), what[-1], what)
        if not trie.tokens:
            return None
        return Proposal(trie.tokens, trie.parents, state=lay)

    def _checks(self, grams: list[tuple[int, ...]]) -> list[tuple[float, int, tuple[int, ...]]]:
        """The verification branch's nodes, by depth, the most recent n-gram first: (its path's acceptance
        rate, learned per depth; 1 node; its path from the root)."""
        out, seen, rate = [], set(), 1.0
        for depth in range(1, self.d.ngram):
            rate *= self.d.rate(depth)
            for gram in grams:
                if gram[:depth] not in seen:
                    seen.add(gram[:depth])
                    out.append((rate, 1, gram[:depth]))
        return out

    def observe(self, proposal: Proposal, verdict: Verdict) -> None:
        """Learn the worths; collect the top level's next tokens into n-grams (once the window is full) and shift
        the window, in the columns whose cells all ran (a proposal may come back cut)."""
        st, d = proposal.state, self.d
        if not verdict.argmax:
            return  # sized down to nothing: no row ran
        self._learn(st, verdict, len(proposal))
        new = {j: verdict.argmax[row] for j, row in st.tops.items() if row <= len(proposal)}
        levels, n = st.levels, d.ngram
        if len(levels) == n - 1:  # full: each column run, with its next token, is an N-gram
            for j, nxt in new.items():
                key = st.root if j == 0 else levels[0][j]
                self._remember(key, tuple(level[j] for level in levels[1:]) + (nxt,), True)
        self.levels = _advance(levels, new, n - 1)

    def _learn(self, st: Layout, verdict: Verdict, ran: int) -> None:
        """Acceptance per depth from every verification node the emitted tokens can judge; the window's yield:
        its cells run, and the accepted tokens beyond what the context's n-grams alone gave."""
        d, emitted = self.d, verdict.tokens
        for path in st.checks:
            ok = judge(list(path), emitted)
            if ok is not None:
                d.rates[len(path)][0] += 1
                d.rates[len(path)][1] += ok
        accepted = emitted[: len(verdict.path)]
        ours = max((_common(gram, accepted) for gram in st.context), default=0)
        d.window_yield[0] += len(accepted) - ours
        d.window_yield[1] += sum(i < ran for i in st.cells)


def _common(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _advance(levels: list[list[int]], new: dict[int, int], full: int) -> list[list[int]]:
    """The window after a step that got `new[j]` after column j's top cell. Warming up (fewer than `full`
    levels), the new tokens are one more level (a column not run repeats its top token there). Full, each column
    run shifts down one level (its level-0 token leaves: the next root stands in column 0) and takes its new
    token on top; a column not run keeps its tokens."""
    if len(levels) < full:
        return [list(lv) for lv in levels] + [[new.get(j, t) for j, t in enumerate(levels[-1])]]
    out = [list(lv) for lv in levels]
    for j, nxt in new.items():
        for lv in range(full - 1):
            out[lv][j] = levels[lv + 1][j]
        out[full - 1][j] = nxt
    return out


class Trie:
    """Draft nodes as a trie under the root: a token under the same parent is one node (parents first)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        self.path: dict[tuple[int, ...], int] = {}  # a verification node's path from the root -> node
        self.chain = [-1]  # the window's level-0 nodes so far, by column (column 0: the root, -1)

    def add(self, parent: int, token: int, path: tuple[int, ...] | None = None) -> int:
        i = self.index.get((parent, token))
        if i is None:
            i = self.index[(parent, token)] = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
        if path is not None:
            self.path[path] = i
        return i

    def column(self, levels: list[list[int]], j: int) -> int:
        """Column j of the lookahead branch (after columns 0..j-1): its level-0 cell after column j - 1's, each
        higher level's cell under the cell below it. Returns its top cell's verify row (0: the root)."""
        if j:
            self.chain.append(self.add(self.chain[-1], levels[0][j]))
        node = self.chain[j]
        for level in levels[1:]:
            node = self.add(node, level[j])
        return node + 1
