"""`pld`: prompt lookup decoding / input-guided aggressive decoding (Ge et al. 2022; Saxena 2023).

Find the longest suffix of the context (max_ngram down to min_ngram tokens) that occurred earlier in the
prompt + output, take its most recent earlier occurrence, and copy the tokens that followed it. An index
from n-gram to the end position of its latest occurrence is updated incrementally as tokens arrive, so a
proposal costs O(max_ngram) dictionary lookups rather than a rescan.

Node scores for the cost model: node d is accepted only if nodes 1..d-1 were, so its score is the product
of conditional acceptance rates a_1..a_d, estimated online per depth with a Beta(1, 1) prior.
"""

from __future__ import annotations

from skipjack.drafters.base import Proposal
from skipjack.errors import SkipjackError


class PromptLookup:
    name = "pld"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, k: int = 0):
        if not 1 <= min_ngram <= max_ngram <= 16:
            raise SkipjackError(f"pld: need 1 <= min_ngram <= max_ngram <= 16 (got {min_ngram}, {max_ngram})")
        if not 0 <= k <= 64:
            raise SkipjackError(f"pld: k (fixed draft length, 0 = cost model) must be in [0, 64] (got {k})")
        self.max_ngram, self.min_ngram, self.fixed_length = max_ngram, min_ngram, k
        self.tried = [0] * 65  # per depth: times node d was reached (its parent accepted)
        self.hit = [0] * 65  # per depth: times node d was accepted

    def begin(self, prompt: list[int]) -> None:
        self.index: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # positions [0, indexed) have their n-grams in the index

    def _index_upto(self, ctx: list[int], end: int) -> None:
        for j in range(self.indexed, end):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if j - n + 1 >= 0:
                    self.index[tuple(ctx[j - n + 1 : j + 1])] = j
        self.indexed = max(self.indexed, end)

    def propose(self, context: list[int], budget: int) -> Proposal | None:
        self._index_upto(context, len(context) - 1)  # never match the suffix with itself
        L = len(context)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            j = self.index.get(tuple(context[L - n :]))
            if j is not None:
                draft = context[j + 1 : j + 1 + budget]
                if draft:
                    return Proposal.chain(draft, self._scores(len(draft)))
        return None

    def _scores(self, n: int) -> list[float]:
        out, p = [], 1.0
        for d in range(1, n + 1):
            p *= (self.hit[d] + 1) / (self.tried[d] + 2)
            out.append(p)
        return out

    def observe(self, emitted: list[int], proposal: Proposal) -> None:
        for d in range(1, min(len(proposal), len(proposal.path) + 1) + 1):
            self.tried[d] += 1
            self.hit[d] += d <= len(proposal.path)

    def end(self) -> None:
        pass
