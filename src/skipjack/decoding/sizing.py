"""How many draft nodes a step verifies: one small protocol, three sizers.

- `NoDraft`: plain decoding (no drafter, or drafting switched off).
- `FixedSizer(k)`: always ask for, and verify, up to k nodes (`--method pld:k=8`).
- `CostSizer(cost, draft)`: ask for as many nodes as could ever pay (`CostModel.max_useful`), then verify the
  prefix that maximises expected tokens per unit of verify cost (`CostModel.best_size`), learning the cost
  curve from every timed step (`CostModel.observe`).

Drafting is not free: a draft that runs the model's own layers, or a smaller model, costs a share of a plain
step per node. `DraftCost` learns that share online (the decode loop times every `propose`), and
`CostSizer.more` tells a drafter that drafts node by node whether one more node can still pay: with nodes
of scores s_1..s_n drafted at d plain steps each, the step is worth (1 + S_m) / (c(m + 1) + n·d) tokens per
plain step for the best prefix m; one more node (at best as likely as the last) must raise that.
`fit` is `size` on a list of worths: a drafter whose nodes are worth more than their own acceptance (lookahead
decoding's window: its n-grams pay in later steps) sizes its unscored proposal with it.

The decode loop calls `budget` before the drafter proposes, passes `more` and `fit` to it, reports the draft's time to
`observe_draft`, calls `size` on what it proposed, and `observe` with the width, wall time and context of
every forward it ran.
"""

from __future__ import annotations

from typing import Protocol

from skipjack.decoding.cost import CostModel
from skipjack.decoding.proposal import Proposal
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT


class Sizer(Protocol):
    fixed: bool  # the user's size (`k`): a batch verifies its drafts whole

    def budget(self, room: int, context: int) -> int:
        """Most draft nodes worth asking the drafter for (<= room) at `context` cached tokens; 0 = none."""
        ...

    def size(self, proposal: Proposal, context: int) -> Proposal:
        """The prefix of `proposal` to verify (possibly empty: a plain step)."""
        ...

    def observe(self, width: int, seconds: float, context: int) -> None:
        """A forward over `width` new tokens after `context` cached ones took `seconds`."""
        ...

    def more(self, scores: list[float]) -> bool:
        """Whether drafting one more node after nodes with these scores can still pay."""
        ...

    def fit(self, worths: list[float]) -> int:
        """How many leading nodes worth these expected tokens each it would verify (a drafter sizing itself)."""
        ...

    def observe_draft(self, nodes: int, seconds: float, context: int) -> None:
        """A `propose` call drafted `nodes` nodes in `seconds` at `context` cached tokens."""
        ...

    def observe_accept(self, scored: float, accepted: int) -> None:
        """A verify accepted `accepted` of nodes whose scores summed to `scored`."""
        ...

    @property
    def trust(self) -> float:
        """Accepted nodes per unit of the drafter's score (1: its scores are taken as they are)."""
        ...


class DraftCost:
    """A drafter's own cost, learned online: seconds per drafted node, in plain steps (EMAs of a call's
    seconds over the plain-step time, and of its nodes). Kept by the method, so it carries over requests."""

    DECAY = 0.1

    def __init__(self, prior=None):
        self.call, self.nodes, self.seen = 0.0, 0.0, 0
        self.prior = prior  # () -> plain steps per node before any draft was timed (the drafter's estimate)
        self.scored, self.accepted = 1.0, 1.0  # EMAs of verified nodes' summed scores and of their accepted nodes

    def observe_accept(self, scored: float, accepted: int) -> None:
        self.scored += self.DECAY * (scored - self.scored)
        self.accepted += self.DECAY * (accepted - self.accepted)

    @property
    def trust(self) -> float:
        """Accepted nodes per unit of score, at most 1: a drafter's overconfident scores, calibrated."""
        return min(1.0, self.accepted / self.scored) if self.scored > 0 else 1.0

    def observe(self, nodes: int, seconds: float, t1: float) -> None:
        if t1 <= 0:
            return  # no plain step measured yet to compare with
        a = 1.0 if not self.seen else self.DECAY
        self.call += a * (seconds / t1 - self.call)
        self.nodes += a * (max(nodes, 1) - self.nodes)
        self.seen += 1

    @property
    def per_node(self) -> float:
        """Plain steps a drafted node costs (before any draft was timed: the prior, else 0)."""
        if self.seen:
            return self.call / self.nodes
        return float(self.prior()) if self.prior is not None else 0.0


class _Free:
    """Sizers that ignore draft cost and take scores as they are."""

    fixed = False
    trust = 1.0

    def observe_accept(self, scored: float, accepted: int) -> None:
        pass

    def more(self, scores: list[float]) -> bool:
        return True

    def fit(self, worths: list[float]) -> int:
        return len(worths)

    def observe_draft(self, nodes: int, seconds: float, context: int) -> None:
        pass


class NoDraft(_Free):
    def budget(self, room: int, context: int) -> int:
        return 0

    def fit(self, worths: list[float]) -> int:
        return 0

    def size(self, proposal: Proposal, context: int) -> Proposal:
        return proposal.prefix(0)

    def observe(self, width: int, seconds: float, context: int) -> None:
        pass


class FixedSizer(_Free):
    fixed = True  # the user's size: a batch verifies it whole

    def __init__(self, k: int):
        if not 1 <= k <= MAX_DRAFT:
            raise SkipjackError(f"k (fixed draft length) must be in [1, {MAX_DRAFT}] (got {k})")
        self.k = k

    def budget(self, room: int, context: int) -> int:
        return min(room, self.k)

    def size(self, proposal: Proposal, context: int) -> Proposal:
        return proposal

    def observe(self, width: int, seconds: float, context: int) -> None:
        pass


class CostSizer:
    fixed = False

    def __init__(self, cost: CostModel, draft: DraftCost | None = None):
        self.cost, self.draft = cost, draft or DraftCost()
        self.context = 0
        self.step_s = 0.0  # EMA of a forward's seconds over its relative cost: a plain step's time, from verifies too

    def budget(self, room: int, context: int) -> int:
        self.context = context
        return min(room, self.cost.max_useful(MAX_DRAFT, context))

    @property
    def trust(self) -> float:
        return self.draft.trust

    def observe_accept(self, scored: float, accepted: int) -> None:
        self.draft.observe_accept(scored, accepted)

    def size(self, proposal: Proposal, context: int) -> Proposal:
        if proposal.scores is None:
            return proposal
        trust = self.draft.trust
        return proposal.prefix(self.cost.best_size([s * trust for s in proposal.scores], context))

    def fit(self, worths: list[float]) -> int:
        """The best prefix at the context `budget` was asked at, as `size` picks one (the worths as they are: an
        unscored proposal's acceptances never calibrate `trust`)."""
        return self.cost.best_size(worths, self.context)

    def observe(self, width: int, seconds: float, context: int) -> None:
        self.cost.observe(width, seconds, context)
        one = seconds / self.cost.cost(width, context)
        self.step_s = one if not self.step_s else self.step_s + 0.1 * (one - self.step_s)

    def observe_draft(self, nodes: int, seconds: float, context: int) -> None:
        self.draft.observe(nodes, seconds, self.cost.t1(context) or self.step_s)

    def more(self, scores: list[float]) -> bool:
        n, d = len(scores), self.draft.per_node
        if not n or not d:
            return True
        best, acc, c, trust = 1.0 / (1 + n * d), 1.0, 1.0, self.draft.trust
        for m, s in enumerate(scores, start=1):
            acc += s * trust
            c = max(c, self.cost.cost(m + 1, self.context))
            best = max(best, acc / (c + n * d))
        c = max(c, self.cost.cost(n + 2, self.context))
        return (acc + scores[-1] * trust) / (c + (n + 1) * d) > best


class Capped:
    """Another sizer under a request's own limits (llama-server's `speculative.n_max` / `p_min`): at most
    `n_max` draft nodes, and none from the first node whose score (its path probability) is below `p_min`."""

    def __init__(self, inner: Sizer, n_max: int, p_min: float = 0.0):
        self.inner, self.n_max, self.p_min = inner, n_max, p_min
        self.fixed = inner.fixed

    def budget(self, room: int, context: int) -> int:
        return min(self.n_max, self.inner.budget(room, context))

    def size(self, proposal: Proposal, context: int) -> Proposal:
        keep = self.inner.size(proposal, context)
        n = min(len(keep), self.n_max)
        if self.p_min > 0 and keep.scores is not None:
            n = next((i for i, s in enumerate(keep.scores[:n]) if s < self.p_min), n)
        return keep.prefix(n)

    def observe(self, width: int, seconds: float, context: int) -> None:
        self.inner.observe(width, seconds, context)

    def more(self, scores: list[float]) -> bool:
        return len(scores) < self.n_max and self.inner.more(scores)

    def fit(self, worths: list[float]) -> int:
        n = min(self.n_max, self.inner.fit(worths))
        return next((i for i, s in enumerate(worths[:n]) if s < self.p_min), n) if self.p_min > 0 else n

    def observe_draft(self, nodes: int, seconds: float, context: int) -> None:
        self.inner.observe_draft(nodes, seconds, context)

    def observe_accept(self, scored: float, accepted: int) -> None:
        self.inner.observe_accept(scored, accepted)

    @property
    def trust(self) -> float:
        return self.inner.trust
