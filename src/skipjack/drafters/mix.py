"""`mix:of=A+B`: several drafters' proposals merged into one token tree, verified in one pass (for example a
model-free `pld` copy beside a layer draft: `mix:of=pld+swift`). `model=NAME` goes to the parts that draft
with another model (`mix:of=pld+draft,model=qwen2.5-coder-0.5b`).

Each drafter proposes on the same context (the cache is rewound between them: their scratch keys never
meet); the proposals are merged into one trie (a token under the same parent is one node, keeping the higher
score) and the best `budget` nodes by score are verified (`base.merge`). A proposal's `resume` is dropped:
the tree's verify pass runs every layer. Each drafter then observes its own proposal, cut to the nodes that
made it into the tree, with the verdict translated to its node indices.

The method registry builds the parts from `of=` (`part_names` checks it) and hands them over as `parts`; a
mix is as capable as its parts together: lossless only if every part is, reading past keys (or owning a
cache) if any part does. Each request's `MixSession` holds one session per part.
"""

from __future__ import annotations

from collections.abc import Iterable

from skipjack.decoding.proposal import DraftContext, Proposal, Verdict, merge
from skipjack.drafters.base import Drafter, DraftSession, Resources
from skipjack.errors import SkipjackError


def part_names(of: str, known: Iterable[str]) -> list[str]:
    """The drafter names in `of` ('pld+swift' -> ['pld', 'swift']), each one of `known` (never `mix`), two or
    more of them; a one-line error otherwise. The registry checks a spec with it before building the parts."""
    names, known = [n.strip() for n in str(of).split("+") if n.strip()], set(known) - {"mix"}
    if len(names) < 2 or any(n not in known for n in names):
        raise SkipjackError(f"mix: of= needs two or more of {', '.join(sorted(known))} joined by + (got {of!r})")
    return names


class Mix(Drafter):
    name = "mix"
    lossless = True

    def __init__(self, of: str = "pld+swift", model: str = "", parts: list[Drafter] | None = None):
        """`of`, `model`: the user's options (the registry builds the parts from them, handing `model` to the
        parts that take one). `parts`: the drafters built, never a user option."""
        self.of, self.model = of, model
        self.parts: list[Drafter] = list(parts or [])
        self.lossless = all(p.lossless for p in self.parts)
        self.reads_past_keys = any(p.reads_past_keys for p in self.parts)
        self.owns_cache = any(p.owns_cache for p in self.parts)
        self.copies_target_keys = any(p.copies_target_keys for p in self.parts)

    def prepare(self, resources: Resources) -> None:
        for p in self.parts:
            p.prepare(resources)

    def session(self) -> MixSession:
        if not self.parts:
            raise SkipjackError(f"mix: built without its parts (the method registry builds them from of={self.of!r})")
        return MixSession(self)

    @property
    def cost_prior(self) -> float:
        """A draft token's cost before one is timed: the parts' together (each drafts its own proposal)."""
        return sum(p.cost_prior for p in self.parts)

    def describe(self) -> dict:
        return {p.name: d for p in self.parts if (d := p.describe())}

    def fork(self) -> Mix:
        """A mix of the parts' forks (each part copies what it learned)."""
        new = super().fork()
        new.parts = [p.fork() for p in self.parts]
        return new


class MixSession(DraftSession):
    """One request: a session of each part."""

    def __init__(self, drafter: Mix):
        self.drafter = drafter
        self.parts = [p.session() for p in drafter.parts]

    def begin(self, prompt: list[int]) -> None:
        for s in self.parts:
            s.begin(prompt)

    def end(self) -> None:
        for s in self.parts:
            s.end()

    def propose(self, ctx: DraftContext) -> Proposal | None:
        at, props = ctx.cache.offset if ctx.cache is not None else 0, []
        for part in self.parts:
            prop = part.propose(ctx)
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


def _prefix_path(prop: Proposal, path: list[int]) -> list[int]:
    """The accepted path within `prop`: it must start at the root and follow parents; cut where it does not."""
    out, parent = [], -1
    for c in path:
        if prop.parents[c] != parent:
            break
        out.append(c)
        parent = c
    return out
