"""How many draft nodes a step verifies: one small protocol, three sizers.

- `NoDraft`: plain decoding (no drafter, or drafting switched off).
- `FixedSizer(k)`: always ask for, and verify, up to k nodes (`--method pld:k=8`).
- `CostSizer(cost)`: ask for as many nodes as could ever pay (`CostModel.max_useful`), then verify the prefix
  that maximises expected tokens per unit of verify cost (`CostModel.best_size`), learning the cost curve
  from every timed step (`CostModel.observe`).

The decode loop calls `budget` before the drafter proposes, `size` on what it proposed, and `observe` with the
width, wall time and context of every forward it ran.
"""

from __future__ import annotations

from typing import Protocol

from skipjack.cost import CostModel
from skipjack.drafters.base import Proposal
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT


class Sizer(Protocol):
    def budget(self, room: int, context: int) -> int:
        """Most draft nodes worth asking the drafter for (<= room) at `context` cached tokens; 0 = none."""
        ...

    def size(self, proposal: Proposal, context: int) -> Proposal:
        """The prefix of `proposal` to verify (possibly empty: a plain step)."""
        ...

    def observe(self, width: int, seconds: float, context: int) -> None:
        """A forward over `width` new tokens after `context` cached ones took `seconds`."""
        ...


class NoDraft:
    def budget(self, room: int, context: int) -> int:
        return 0

    def size(self, proposal: Proposal, context: int) -> Proposal:
        return proposal.prefix(0)

    def observe(self, width: int, seconds: float, context: int) -> None:
        pass


class FixedSizer:
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
    def __init__(self, cost: CostModel):
        self.cost = cost

    def budget(self, room: int, context: int) -> int:
        return min(room, self.cost.max_useful(MAX_DRAFT, context))

    def size(self, proposal: Proposal, context: int) -> Proposal:
        if proposal.scores is None:
            return proposal
        return proposal.prefix(self.cost.best_size(proposal.scores, context))

    def observe(self, width: int, seconds: float, context: int) -> None:
        self.cost.observe(width, seconds, context)
