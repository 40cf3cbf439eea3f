"""The drafter protocol: a `Drafter` (what a method learned across requests, and its resources) and a
`DraftSession` (one request's drafting state), with defaults in base classes.

A method spec is parsed without building anything (`skipjack.methods.MethodSpec.parse`). `build` makes the
drafter from its options; `prepare(resources)` then does its one-off work (load a draft model or an adapter,
search a skip set, count tokens) outside any request, reported as load time. Each request gets its own
`session()`: a batch holds N sessions of one drafter, as llama.cpp holds sequence ids. A session may read and
update its drafter's learned state (an n-gram table, acceptance statistics); the engine decodes one step at a
time under its lock, so those updates never interleave.

Nothing in a session's `propose` times passes, searches or writes files: `prepare` does that once.
Capabilities are declared on the class, and the plan's rules (`skipjack.plan`) read them, never names:
- `lossless`: its output provably equals plain decoding's (through the one verifier);
- `reads_past_keys`: it copies or rewrites cached keys of past positions (a skip-set search, an adapter's
  pass, a draft cache filled from the target's keys), so it cannot run over an evicting cache;
- `owns_cache`: it keeps a cache of its own aligned with the tokens (`cache.TrackedCache`);
- `copies_target_keys`: that cache is filled with the target's cached keys as stored, so it needs the full
  cache (a bf16/int8 cache stores them otherwise).

The bench's warm figures need a drafter's learned state and nothing else: `fork()` is a drafter sharing the
same resources with a deep copy of what it learned (the attributes named in `LEARNED`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from skipjack.decoding.proposal import DraftContext, Proposal, Verdict

if TYPE_CHECKING:
    from skipjack.models import DecoderLM


@dataclass
class Resources:
    """What the engine lends a drafter's `prepare`: typed, where a dict was matched by introspection before."""

    model: DecoderLM | None = None  # the target model
    target: Any = None  # the engine's `loading.load.Loaded`: a draft model checks its vocabulary against it
    token_counts: Callable[[], dict[int, int]] | None = None  # token frequencies over local text (reduced heads)
    text: Callable[[], list[int]] | None = None  # local text as the target's token ids, for one-off searches;
    # disjoint from every benchmark prompt (`skipjack.texts`)
    tables: dict = field(default_factory=dict)  # what drafters of one engine learn together (n-gram tables, by name)


class DraftSession:
    """One request's drafting state. `begin` starts the request with its prompt; `propose` drafts up to
    `ctx.budget` nodes after `ctx.tokens` (None: nothing this step); `observe` gets back every proposal that
    `propose` returned (cut to what was verified, possibly to nothing) with the verdict; `end` closes it."""

    model_free = False  # drafts from token ids alone (no model, no cache): it may be asked past forced tokens

    def begin(self, prompt: list[int]) -> None:
        pass

    def propose(self, ctx: DraftContext) -> Proposal | None:
        return None

    def observe(self, proposal: Proposal, verdict: Verdict) -> None:
        pass

    def end(self) -> None:
        pass


class Drafter:
    """A draft method: built from its options (no work), prepared once (`prepare`), shared by requests, each
    drafting through a `session()` of its own."""

    name: str = ""
    lossless: bool = True
    reads_past_keys: bool = False
    owns_cache: bool = False
    copies_target_keys: bool = False
    LEARNED: tuple[str, ...] = ()  # attributes holding what it learned across requests (`fork` copies them)

    def prepare(self, resources: Resources) -> None:
        """One-off work before any request (load, search, count); the engine reports it as load time."""

    def session(self) -> DraftSession:
        raise NotImplementedError

    @property
    def cost_prior(self) -> float:
        """Plain steps one drafted node costs, before any draft was timed (model-free drafters: 0)."""
        return 0.0

    def describe(self) -> dict:
        """What it settled on, for `--json` (a skip set, an exit layer); empty if nothing to say."""
        return {}

    def fork(self) -> Drafter:
        """A drafter with the same options and resources and a copy of what this one learned."""
        new = copy.copy(self)
        for name in self.LEARNED:
            setattr(new, name, copy.deepcopy(getattr(self, name)))
        return new
