"""`ngram`: adaptive n-gram drafts in the spirit of ADED (Liu et al. 2024, "Adaptive Draft-Verification").

Table: counts of the next token after each (a, b) bigram context (a tri-gram table), with a (b,) back-off,
built from the prompt (weight 1) and from the model's own outputs (weight 2: the model repeats itself), and
shared by every request in the process. It adapts online: every emitted token updates it.

Draft tree: ADED grows the tree with MCTS, balancing exploitation of likely continuations and exploration
of rarely seen ones. We use its cheaper one-step equivalent: best-first expansion from the context's last two
tokens, where a child's priority is its parent's priority times an upper-confidence value
min(1, p + c * sqrt(ln(1 + N) / (1 + n))) (p = count / N, N = the context's total count, n = the child's),
so well-attested branches come first and under-explored ones still get a place (a node whose calibrated
path probability is below pld's `MIN_SCORE` is not expanded: no cost model would verify it). Nodes come out in
expansion order (parents first); each carries a calibrated path probability (product of p along the path,
times an online calibration factor) that the engine's cost model uses to size the tree. The factor is the
ratio of realised to predicted acceptances over every table node the emitted tokens can judge, in this
request, shrunk towards the same ratio over all requests.

In-request matches (`lookup` > 0): the table's contexts are two tokens long, but within one request a
longer suffix match is much stronger evidence (ADED likewise retrieves by suffix match). So the drafter
also runs prompt lookup (`pld`, with `lookup` candidate matches and its own learned acceptance rates) over
the request's tokens and merges both trees into one trie (a shared node keeps its higher score), listed
best-first for the cost model. `lookup=0` is the table alone.

The target's own predictions (ADED's table stands in for the LLM's output distribution): the verify forward
computes the target's next token after every draft node, not only after the accepted ones. The argmax of a
rejected node's row is the model's continuation of a path that did not happen, which is still informative:
  - Jacobi guesses (`jacobi` > 0; Jacobi decoding, Santilli et al. 2023; lookahead decoding, Fu et al. 2024):
    a rejected child of the last accepted node stood where the bonus token now stands, so its row's argmax
    is a guess for the token after the bonus. Up to `jacobi` such guesses join the next step's tree as
    children of the root, scored by their acceptance rate per rank (learned online, across requests).
  - Table learning (`rows` > 0): every off-path row's argmax is counted after its path with weight `rows`.
Both cost nothing but a few Python operations: the rows are computed anyway.

Persistence (`path=FILE`): `prepare` checks that FILE can be written and merges its table into this one (a
damaged file fails there, before any request); each request merges it in again when it begins (what other
processes saved since) and merges the table back into FILE when it ends (`ngram_table.NGramTable.save`).

Memory cap: at most `max_contexts` contexts (least recently updated evicted first) with at most
`max_children` next tokens each (the rarest dropped), i.e. O(max_contexts * max_children) entries.
"""

from __future__ import annotations

import heapq
import itertools
import math

from skipjack import validate
from skipjack.decoding.proposal import DraftContext, Proposal, Verdict, calibration, judge, merge
from skipjack.drafters.base import Drafter, DraftSession, Resources
from skipjack.drafters.ngram_table import NGramTable
from skipjack.drafters.pld import MIN_SCORE, PromptLookup
from skipjack.errors import SkipjackError


class NGramDrafter(Drafter):
    """The options and what is learned across requests: the table (shared by the engine's drafters of the same
    `table` name and order, through `Resources.tables`), the calibration over all requests (`pred`, `got`), the
    Jacobi guesses' rates (`jstats`) and the in-request prompt lookup's rates (`lookup`, a `PromptLookup`)."""

    name = "ngram"
    lossless = True
    LEARNED = ("table", "pred", "got", "jstats", "lookup")

    def __init__(
        self,
        width: int = 4,
        explore: float = 0.3,
        table: str = "",
        path: str = "",
        lookup: int = 4,
        order: int = 3,
        jacobi: int = 2,
        rows: float = 1.0,
    ):
        if not 1 <= width <= 8:
            raise SkipjackError(f"ngram: width (children per node) must be in [1, 8] (got {width})")
        if not 0 <= explore <= 4:
            raise SkipjackError(f"ngram: explore must be in [0, 4] (got {explore})")
        if not 0 <= lookup <= 8:
            raise SkipjackError(f"ngram: lookup (in-request match branches, 0 = off) must be in [0, 8] (got {lookup})")
        if not 2 <= order <= 6:
            raise SkipjackError(f"ngram: order (table n-gram length) must be in [2, 6] (got {order})")
        if not 0 <= jacobi <= 8:
            raise SkipjackError(f"ngram: jacobi (guesses from rejected rows, 0 = off) must be in [0, 8] (got {jacobi})")
        if not 0 <= rows <= 4:
            raise SkipjackError(f"ngram: rows (table weight of verify-row predictions) must be in [0, 4] (got {rows})")
        self.width, self.explore, self.order = width, explore, order
        self.key = f"{table or 'default'}/{order}"  # its table's name in `Resources.tables`
        # checked now (a stat: nothing is read or written), read by `prepare`
        self.path = validate.writable_file("ngram: path", validate.path("ngram: path", path)) if path else None
        self.table: NGramTable | None = None  # the engine's table of this name, set by `prepare`
        self.lookup = PromptLookup(branches=lookup) if lookup else None
        self.pred, self.got = 1.0, 1.0  # calibration over all requests: predicted vs realised acceptances
        self.jacobi, self.rows = jacobi, rows
        self.jstats = [[1.0, 4.0] for _ in range(jacobi)]  # per guess rank: (hits, tries), a weak prior of 0.25

    def prepare(self, resources: Resources) -> None:
        """Take the engine's table of this name (a new one if none yet) and merge the persisted one into it."""
        self.table = resources.tables.setdefault(self.key, NGramTable(order=self.order))
        if self.lookup is not None:
            self.lookup.prepare(resources)
        if self.path is not None:
            self.table.load(self.path)

    def session(self) -> NGramSession:
        if self.table is None:
            raise SkipjackError("ngram: the drafter was not prepared (its table comes from `prepare`)")
        return NGramSession(self)


class NGramSession(DraftSession):
    """One request: how far its tokens are counted into the table, its own calibration, the Jacobi guesses
    from its last verify and its prompt lookup session."""

    model_free = True

    def __init__(self, drafter: NGramDrafter):
        self.drafter = drafter
        self.lookup = drafter.lookup.session() if drafter.lookup is not None else None
        self.seen = 0
        self.req_pred, self.req_got = 0.0, 0
        self.guesses: list[int] = []  # Jacobi guesses for the token after the last bonus token

    def begin(self, prompt: list[int]) -> None:
        d = self.drafter
        if d.path is not None:  # what other processes saved since (and counts the table dropped: the file's max)
            d.table.load(d.path)
        d.table.add(prompt, 0, 1.0)
        self.seen = len(prompt)
        self.req_pred, self.req_got = 0.0, 0  # the drafter's calibration, this request only
        self.guesses = []
        if self.lookup is not None:
            self.lookup.begin(prompt)

    def propose(self, ctx: DraftContext) -> Proposal | None:
        """The table's best-first tree, the Jacobi guesses and prompt lookup's trie, merged. `state` keeps what
        `observe` scores: each table node's edge probability and path, the table context before the root, the
        guesses asked, and prompt lookup's own proposal."""
        d, context, budget = self.drafter, ctx.tokens, ctx.budget
        d.table.add(context, self.seen, 2.0)  # the model's own outputs since the last step
        self.seen = len(context)
        cal = calibration(self.req_got, self.req_pred, d.got / d.pred, 0.1, 3.0)  # this request's
        tokens, parents, scores, edges, paths = [], [], [], [], []
        heap: list = []  # (-priority, tiebreak, token, parent node, path score, edge p, table context)
        tick = itertools.count()
        tail = tuple(context[-(d.table.order - 1) :])
        self._push(heap, tick, tail, -1, 1.0, 1.0, cal)
        while heap and len(tokens) < budget:
            negpri, _, tok, par, score, p, key = heapq.heappop(heap)
            tokens.append(tok)
            parents.append(par)
            scores.append(score)
            edges.append(p)
            paths.append((paths[par] if par >= 0 else []) + [tok])
            self._push(heap, tick, key[1:] + (tok,), len(tokens) - 1, score, -negpri, cal)
        props = [Proposal(tokens, parents, scores)] if tokens else []
        asked, self.guesses = self.guesses, []
        if asked:  # Jacobi guesses from the last verify (see `_learn_rows`), at their learned rates
            rates = [min(0.98, h / t) for h, t in d.jstats[: len(asked)]]
            props.append(Proposal(asked, [-1] * len(asked), rates))
        copied = self.lookup.propose(ctx) if self.lookup is not None else None
        if copied is not None:
            props.append(copied)
        merged = merge(props, budget)
        if merged is not None:
            merged.state = {"edges": edges, "paths": paths, "tail": tail, "asked": asked, "lookup": copied}
        return merged

    def _push(self, heap, tick, ctx, parent, score, pri, cal):
        d = self.drafter
        kids = d.table.lookup(*ctx)
        if not kids:
            return
        total = sum(kids.values())
        for tok, c in sorted(kids.items(), key=lambda kv: -kv[1])[: d.width]:
            p = c / total
            if score * p * cal < MIN_SCORE:
                break  # never worth a verify slot (children are sorted by count: the rest score lower)
            ucb = min(1.0, p + d.explore * math.sqrt(math.log1p(total) / (1.0 + c)))
            heapq.heappush(heap, (-pri * ucb, next(tick), tok, parent, score * min(1.0, p * cal), p, ctx))

    def observe(self, proposal: Proposal, verdict: Verdict) -> None:
        """Calibrate: the raw edge probabilities of the table's nodes that the emitted tokens can judge
        (verified or pruned) against how many of them would have been accepted."""
        d, st, emitted = self.drafter, proposal.state, verdict.tokens
        if st["lookup"] is not None:
            self.lookup.observe(st["lookup"], verdict)
        for r, g in enumerate(st["asked"]):
            d.jstats[r][0] += g == emitted[0]
            d.jstats[r][1] += 1
        if verdict.argmax:
            self._learn_rows(proposal, verdict, st["tail"])
        for p, path in zip(st["edges"], st["paths"]):
            ok = judge(path, emitted)
            if ok is not None:
                d.pred += p
                d.got += ok
                self.req_pred += p
                self.req_got += ok

    def _learn_rows(self, proposal: Proposal, verdict: Verdict, tail: tuple[int, ...]) -> None:
        """Learn from the verify rows off the accepted path: the target's argmax there is its own next token
        after a path that did not happen. Those of the bonus row's rejected children become Jacobi guesses
        for the next step; all of them are counted in the table after their path (weight `rows`)."""
        d = self.drafter
        pred, row = verdict.argmax, (verdict.path[-1] + 1 if verdict.path else 0)
        if d.jacobi:
            for i, p in enumerate(proposal.parents):
                if p + 1 == row and pred[i + 1] not in self.guesses and len(self.guesses) < d.jacobi:
                    self.guesses.append(pred[i + 1])
        if d.rows:
            on, keep, ends = set(verdict.path), d.table.order - 1, []
            for i, (t, p) in enumerate(zip(proposal.tokens, proposal.parents)):
                ends.append(((ends[p] if p >= 0 else tail) + (t,))[-keep:])  # table context at node i
                if i not in on:
                    d.table.count(ends[i], len(ends[i]), pred[i + 1], d.rows)

    def end(self) -> None:
        if self.lookup is not None:
            self.lookup.end()
        if self.drafter.path is not None:
            self.drafter.table.save(self.drafter.path)
