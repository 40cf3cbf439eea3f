"""`mix:of=A+B`: several drafters' proposals merged into one token tree, verified in one pass (for example a
model-free `pld` copy beside a layer draft: `mix:of=pld+swift`). `model=NAME` goes to the parts that draft
with another model (`mix:of=pld+draft,model=qwen2.5-coder-0.5b`).

Each drafter proposes on the same context (the cache is rewound between them: their scratch keys never
meet); the proposals are merged into one trie (a token under the same parent is one node, keeping the higher
score) and the best `budget` nodes by score are verified (`base.merge`). A proposal's `resume` is dropped:
the tree's verify pass runs every layer. Each drafter then observes its own proposal, cut to the nodes that
made it into the tree, with the verdict translated to its node indices.
"""

from __future__ import annotations

import inspect

from skipjack.decoding.proposal import DraftContext, Proposal, Verdict, merge
from skipjack.errors import SkipjackError


class Mix:
    name = "mix"
    lossless = True

    def __init__(
        self, of: str = "pld+swift", model: str = "", shared: dict | None = None, registry: dict | None = None
    ):
        names = [n.strip() for n in str(of).split("+") if n.strip()]
        registry = registry or {}
        bad = [n for n in names if n not in registry or n == "mix"]
        if len(names) < 2 or bad:
            raise SkipjackError(
                f"mix: of= needs two or more of {', '.join(sorted(set(registry) - {'mix'}))} joined by + (got {of!r})"
            )
        self.parts = []
        for n in names:
            factory = registry[n]
            kw = {"shared": shared} if _takes(factory, "shared") else {}
            kw |= {"model": model} if model and _takes(factory, "model") else {}
            self.parts.append(factory(**kw))
        self.lossless = all(p.lossless for p in self.parts)
        self.search_seconds = 0.0

    def begin(self, prompt: list[int]) -> None:
        for p in self.parts:
            p.begin(prompt)

    def end(self) -> None:
        for p in self.parts:
            p.end()

    def propose(self, ctx: DraftContext) -> Proposal | None:
        at, props = ctx.cache.offset if ctx.cache is not None else 0, []
        self.search_seconds = 0.0
        for part in self.parts:
            prop = part.propose(ctx)
            self.search_seconds += getattr(part, "search_seconds", 0.0)
            if ctx.cache is not None:
                ctx.cache.rewind(at)
            props.append(prop)
        live = [p for p in props if p]
        if not live:
            return None
        for p in live:
            if p.scores is None:
                p.scores = [1.0] * len(p)
        merged = merge(live, ctx.budget)
        if merged is not None:
            merged.state = props
        return merged

    def observe(self, proposal: Proposal, verdict: Verdict) -> None:
        node = {(p, t): i for i, (t, p) in enumerate(zip(proposal.tokens, proposal.parents))}
        for part, prop in zip(self.parts, proposal.state):
            if prop is None:
                continue
            ids: list[int] = []  # this proposal's node -> merged node, up to the first one not verified
            for tok, par in zip(prop.tokens, prop.parents):
                up = ids[par] if par >= 0 else -1
                i = node.get((up, tok))
                if i is None:
                    break
                ids.append(i)
            own = prop.prefix(len(ids))
            where = {m: j for j, m in enumerate(ids)}
            path = []
            for m in verdict.path:
                if m not in where:
                    break
                path.append(where[m])
            argmax = [verdict.argmax[0], *(verdict.argmax[m + 1] for m in ids)] if verdict.argmax else []
            part.observe(own, Verdict(verdict.tokens, _prefix_path(own, path), argmax))

    @property
    def cost_prior(self) -> float:
        """A draft token's cost before one is timed: the parts' together (each drafts its own proposal)."""
        return sum(getattr(p, "cost_prior", 0.0) for p in self.parts)

    def describe(self) -> dict:
        return {p.name: p.describe() for p in self.parts if hasattr(p, "describe")}


def _prefix_path(prop: Proposal, path: list[int]) -> list[int]:
    """The accepted path within `prop`: it must start at the root and follow parents; cut where it does not."""
    out, parent = [], -1
    for c in path:
        if prop.parents[c] != parent:
            break
        out.append(c)
        parent = c
    return out


def _takes(factory, name: str) -> bool:
    return name in inspect.signature(factory).parameters
