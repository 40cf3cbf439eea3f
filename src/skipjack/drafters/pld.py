"""`pld`: prompt lookup decoding / input-guided aggressive decoding (Ge et al. 2022; Saxena 2023).

Find the longest suffix of the context (max_ngram down to min_ngram tokens) that occurred earlier in the
prompt + output, take its most recent earlier occurrence, and copy the tokens that followed it. An index
from n-gram to the end positions of its latest occurrences is updated incrementally as tokens arrive, so a
proposal costs O(max_ngram) dictionary lookups rather than a rescan.

Token tree (`branches` > 1): verifying a few more tokens is cheap on this CPU, so besides that primary
copy we also propose the continuations of up to `branches - 1` other matches (older occurrences of the
same suffix, then shorter suffixes), merged into a trie; `branches=1` is classic single-chain pld.

Node scores for the cost model: a node is accepted only if the path to it was, so its score is the product
of conditional acceptance rates along the path. Each candidate is scored only on the branch it adds to the
trie (from the first token where it departs from every better candidate; shared nodes keep the better
candidate's score), with rates per depth of that branch for each (match length, primary or alternative)
bucket, shrunk towards the depth's pooled rate, times a per-request calibration factor (realised over
predicted acceptances in this request so far, from 1 with a few pseudo-counts: how much copying pays depends
on the text far more than on the match). Learning the same way, every candidate's own branch is
compared with what the model actually emitted. (Scoring an alternative on its whole copy would count the
steps where it agrees with the primary, which makes a diverging branch look far likelier than it is.)
Nodes are listed best-first (ties: shallower first), which keeps parents before children.
"""

from __future__ import annotations

from skipjack.decoding.proposal import DraftContext, Proposal, Verdict, best_first, calibration
from skipjack.drafters.base import Drafter, DraftSession
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT

DEPTHS = MAX_DRAFT + 1  # acceptance statistics per depth of a candidate's own branch (index 0 unused)
MIN_SCORE = 0.01  # a copied token whose estimated acceptance falls below this ends its candidate
_UNSEEN = ((0,) * DEPTHS, (0,) * DEPTHS)  # (tried, hit) of a bucket with no observations yet


class PromptLookup(Drafter):
    """The options and what is learned across requests: acceptance rates per bucket and depth (`stats`) and per
    depth over all buckets (`pooled`). Each request's index and calibration live in its `PromptLookupSession`."""

    name = "pld"
    lossless = True
    LEARNED = ("pooled", "stats")

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, branches: int = 4):
        if not 1 <= min_ngram <= max_ngram <= 16:
            raise SkipjackError(f"pld: need 1 <= min_ngram <= max_ngram <= 16 (got {min_ngram}, {max_ngram})")
        if not 1 <= branches <= 8:
            raise SkipjackError(f"pld: branches (copied candidates per step) must be in [1, 8] (got {branches})")
        self.max_ngram, self.min_ngram, self.branches = max_ngram, min_ngram, branches
        self.pooled = ([0] * DEPTHS, [0] * DEPTHS)  # per depth: (times tried, times accepted), all buckets
        self.stats: dict[tuple[int, bool], tuple[list[int], list[int]]] = {}

    def session(self) -> PromptLookupSession:
        return PromptLookupSession(self)

    def _base(self, bucket: tuple[int, bool], d: int) -> float:
        """Estimated P(the d-th token of a candidate's own branch is accepted | the path to it was), over
        every request so far: the bucket's rate shrunk towards the depth's pooled rate. A proposal scores it
        times this request's calibration factor (copying pays far more in code or retrieval answers than in a
        summary; the factor is realised / predicted acceptances so far), capped at 0.98."""
        tried, hit = self.stats.get(bucket, _UNSEEN)
        pooled = (self.pooled[1][d] + 1) / (self.pooled[0][d] + 2)
        if bucket[1]:
            pooled *= 0.5  # an alternative copy starts out less trusted than the primary one
        return (hit[d] + 2 * pooled) / (tried[d] + 2)


class PromptLookupSession(DraftSession):
    """One request: the index of its n-grams and its calibration (predicted vs realised acceptances)."""

    model_free = True

    def __init__(self, drafter: PromptLookup):
        self.drafter = drafter
        self.begin([])

    def begin(self, prompt: list[int]) -> None:
        self.pred, self.got = 0.0, 0  # this request: sum of predicted vs realised acceptances of own nodes
        self.index: dict[tuple[int, ...], list[int]] = {}  # n-gram -> end positions, oldest first
        self.indexed = 0  # positions [0, indexed) have their n-grams in the index

    def _index_upto(self, ctx: list[int], end: int) -> None:
        d = self.drafter
        for j in range(self.indexed, end):
            for n in range(d.min_ngram, d.max_ngram + 1):
                if j - n + 1 >= 0:
                    ends = self.index.setdefault(tuple(ctx[j - n + 1 : j + 1]), [])
                    ends.append(j)
                    if len(ends) > d.branches:
                        del ends[0]
        self.indexed = max(self.indexed, end)

    def _candidates(self, context: list[int], budget: int) -> list[tuple[tuple[int, bool], list[int]]]:
        """(bucket, copied tokens) for the longest and most recent match first, then the others."""
        d = self.drafter
        L, out, seen = len(context), [], set()
        for n in range(min(d.max_ngram, L - 1), d.min_ngram - 1, -1):
            for j in reversed(self.index.get(tuple(context[L - n :]), ())):
                draft = context[j + 1 : j + 1 + budget]
                if draft and tuple(draft) not in seen:
                    seen.add(tuple(draft))
                    out.append(((n, bool(out)), draft))
                    if len(out) == d.branches:
                        return out
        return out

    def propose(self, ctx: DraftContext) -> Proposal | None:
        """The candidates' trie, best-first; `state` lists (bucket, copy, first own depth) per candidate."""
        context, budget, base = ctx.tokens, ctx.budget, self.drafter._base
        self._index_upto(context, len(context) - 1)  # never match the suffix with itself
        found = self._candidates(context, budget)
        if not found:
            return None
        f = self.factor()
        nodes: dict[tuple[int, int], int] = {}  # (parent, token) -> node of this step's trie
        tokens, parents, scores = [], [], []
        cands: list[tuple[tuple[int, bool], list[int], int]] = []
        for bucket, draft in found:
            par, s, own = -1, 1.0, 0
            for d, tok in enumerate(draft, start=1):
                hit = nodes.get((par, tok)) if not own else None
                if hit is not None:  # shared with a better candidate: its score stands
                    par, s = hit, scores[hit]
                    continue
                own = own or d  # first depth this candidate adds to the tree
                s *= min(0.98, base(bucket, d - own + 1) * f)
                if s < MIN_SCORE and d > 1:
                    break  # never worth a verify slot; stops long copies costing Python time per step
                nodes[(par, tok)] = len(tokens)
                tokens.append(tok)
                parents.append(par)
                scores.append(s)
                par = len(tokens) - 1
            cands.append((bucket, draft, own or len(draft) + 1))
        return best_first(tokens, parents, scores, budget, state=cands)

    def factor(self) -> float:
        """This request's calibration factor: realised over predicted acceptances of its own nodes so far."""
        return calibration(self.got, self.pred, 1.0, 0.25, 4.0)

    def observe(self, proposal: Proposal, verdict: Verdict) -> None:
        """Score every candidate (verified or pruned) against the tokens the model actually emitted: the
        part it added to the tree, from its own first depth, when the shared path before it was accepted."""
        emitted, dr = verdict.tokens, self.drafter
        for bucket, draft, own in proposal.state:
            if draft[: own - 1] != emitted[: own - 1]:
                continue
            tried, hit = dr.stats.setdefault(bucket, ([0] * DEPTHS, [0] * DEPTHS))
            for d in range(own, min(len(draft), len(emitted), own + DEPTHS - 2) + 1):
                ok = draft[d - 1] == emitted[d - 1]
                e = d - own + 1  # depth within the candidate's own branch
                self.pred += dr._base(bucket, e)
                self.got += ok
                for t, h in ((tried, hit), dr.pooled):
                    t[e] += 1
                    h[e] += ok
                if not ok:
                    break
