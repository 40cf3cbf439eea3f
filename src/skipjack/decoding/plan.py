"""One plan per request: everything a request decodes with, resolved and checked once.

A `Plan` holds the drafter's session for this request (None: no drafter), the sizer, the lossy layer strategy
(None: every layer), superposed decoding's options (None: one stream), the KV cache policy (None: every key
kept), how the request starts (`session`) and whether the run is `lossless` (every front-end prints this one
answer). Which method combines with which cache policy is decided here, by one table of rules over the
capabilities the classes declare (a drafter's `reads_past_keys` and `copies_target_keys`, a policy's
`lossless`, `plain_only` and `holds_every_key`), never by lists of names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from skipjack import kvpolicies, validate
from skipjack.cache import CachePolicy
from skipjack.decoding.constraint import Constraint
from skipjack.decoding.session import Session
from skipjack.decoding.sizing import Sizer
from skipjack.decoding.superposed import Superposed
from skipjack.drafters.base import DraftSession
from skipjack.errors import SkipjackError
from skipjack.methods import MethodSpec
from skipjack.strategies import Strategy

# (refuses, message): a request whose method, cache policy (`kv`: its spec, `policy` the object; None: every key
# kept) and session make `refuses` true is refused with the message, before any work.
Rule = tuple[Callable[[MethodSpec, CachePolicy | None, bool], bool], str]
RULES: tuple[Rule, ...] = (
    (
        lambda m, p, s: p is not None and m.strategy_class is not None,
        "--kv {kv} and the lossy layer strategy {name} do not combine",
    ),
    (
        lambda m, p, s: p is not None and m.superposed_class is not None,
        "--kv {kv} and {name} do not combine: its one cache holds its drafts' superposed keys",
    ),
    (
        lambda m, p, s: p is not None and s,
        "--kv {kv} makes the request's own cache: it does not run with a session",
    ),
    (
        lambda m, p, s: p is not None and p.plain_only and m.drafts,
        "--kv {kv} runs plain steps only: it takes no drafter (--method plain)",
    ),
    (
        lambda m, p, s: p is not None and m.reads_past_keys and not p.holds_every_key,
        "{name} reads cached keys of past positions: it does not run with --kv {kv}",
    ),
    (
        lambda m, p, s: p is not None and m.copies_target_keys,
        "{name} copies the target's cached keys as stored: it runs with the full cache only, not --kv {kv}",
    ),
)


def resolve(
    method: str | MethodSpec, kv: str | None = None, session: bool = False
) -> tuple[MethodSpec, CachePolicy | None]:
    """Parse a method and a cache policy and check that they combine (with a `session`, if the request has
    one), before any model is loaded: (the method's spec, the policy or None where it keeps every key)."""
    spec = MethodSpec.parse(method)
    policy = None
    if kv is not None:
        policy = kvpolicies.make_policy(validate.text("--kv", kv, empty=False))
        policy = None if policy.lossless else policy
    for refuses, message in RULES:
        if refuses(spec, policy, session):
            raise SkipjackError(message.format(kv=kv, name=spec.name))
    return spec, policy


@dataclass
class Plan:
    """A request's decoding, resolved: `Sequence(model, plan, prompt, params)` runs it."""

    draft: DraftSession | None = None  # this request's drafting state; None: plain steps
    sizer: Sizer | None = None  # None: plain (no drafter) or a flat cost model
    strategy: Strategy | None = None  # a lossy layer plan for plain steps
    policy: CachePolicy | None = None  # the KV cache policy (None: every key kept)
    session: Session | None = None  # how the request starts (None: a fresh prefill)
    lossless: bool = True  # the method and the cache policy both keep plain decoding's output
    method: str = "plain"  # the spec, for reports
    constraint: Constraint | None = None  # a grammar every token obeys (structured output); None: free text
    superposed: Superposed | None = None  # superposed decoding's options: k drafts in one stream (`Superposition`)
