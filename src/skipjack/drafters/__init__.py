"""Method registry: `--method NAME[:key=value,...]` in the CLI, the server and the benchmark.

`plain` means no drafter. The lossy per-layer strategies (`skipjack.strategies`: `ffn-skip`, `layer-skip`,
`skipdecode`) are methods too: no drafter, a layer plan for each plain step. A spec such as
`pld:max_ngram=4` passes options to the drafter's constructor; the option `k` (any drafter) fixes the draft
size instead of letting the cost model size each draft. A `Method` is what a spec makes: the drafter (None
for plain and the strategies), the fixed size, the strategy, and whether it is lossless.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from skipjack import validate
from skipjack.decoding.cost import CostModel
from skipjack.decoding.proposal import DraftContext, Drafter, Proposal, Verdict
from skipjack.decoding.sizing import CostSizer, DraftCost, FixedSizer, NoDraft, Sizer
from skipjack.drafters.draft_model import DraftModel
from skipjack.drafters.early_exit import EarlyExit
from skipjack.drafters.kangaroo import Kangaroo
from skipjack.drafters.mix import Mix
from skipjack.drafters.ngram import NGramDrafter
from skipjack.drafters.pld import PromptLookup
from skipjack.drafters.swift import Swift
from skipjack.drafters.triforce import TriForce
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT
from skipjack.strategies import STRATEGIES, Strategy

REGISTRY: dict[str, Callable[..., Drafter]] = {
    "pld": PromptLookup,
    "ngram": NGramDrafter,
    "swift": Swift,
    "del": EarlyExit,
    "kangaroo": Kangaroo,
    "draft": DraftModel,
    "mix": Mix,
    "triforce": TriForce,
}
INTERNAL = {"shared", "registry"}  # constructor arguments the engine passes, never a user option
# Dtypes whose rounding keeps a lossless method's tokens identical to plain decoding's in practice. A verify
# pass runs several tokens through the model at once, and the CPU kernels (attention above all) round a
# pass over several tokens differently from a pass over one. In fp32 the differences are far below the gaps
# between logits: every benchmark prompt gives identical tokens (a real-model test checks them). In bf16
# they are not: see the "fp32 and bf16 in one run" section of BENCHMARKS.md.
EXACT_DTYPES = {"fp32", "fp64", "q4", "q8"}  # q4 / q8: a batch-invariant forward, identical by construction
# `--method auto`: the fastest lossless method overall in BENCHMARKS.md (regenerate: `make bench`), its drafts
# sized by the cost model, so it falls back to plain steps where drafting does not pay (and, in a batch, as the
# batch grows: `skipjack.decoding.batch.BatchCost`). A sampled request with a seed is decoded plain under `auto`
# (`Engine.check`): rejection sampling keeps the distribution for any draft, but drafts sized by measured
# time consume the seeded draws differently from run to run, and a seed promises the same text each time.
AUTO = "ngram"


def lossless_methods() -> set[str]:
    """Methods whose output provably equals plain decoding's: plain, and every drafter that says so."""
    return {"plain"} | {name for name, f in REGISTRY.items() if getattr(f, "lossless", False)}


def is_lossless(spec: str) -> bool:
    """Whether a method spec is lossless (plain or a lossless drafter); the strategies are lossy."""
    return parse_method(spec)[0] in lossless_methods()


def identical_to_plain(spec: str, dtype: str) -> bool:
    """Whether method `spec` with the model in `dtype` is expected to give plain decoding's exact tokens."""
    name, _ = parse_method(spec)
    return name == "plain" or (name in lossless_methods() and dtype in EXACT_DTYPES)


def register(name: str, factory: Callable[..., Drafter]) -> None:
    """Add a drafter class (or factory) under `name`; its `lossless` attribute says whether it is lossless."""
    REGISTRY[name] = factory


def method_names() -> list[str]:
    return ["plain", "auto", *REGISTRY, *STRATEGIES]


def parse_method(spec: str) -> tuple[str, dict]:
    """'pld:k=8,max_ngram=4' -> ('pld', {'k': 8, 'max_ngram': 4}); 'auto' -> AUTO's."""
    name, opts = validate.spec_options("method", spec)
    if name == "auto":
        if spec.partition(":")[2].strip():
            raise SkipjackError("method 'auto' takes no options (it is " + AUTO + ", sized by the cost model)")
        return parse_method(AUTO)
    if name != "plain" and name not in REGISTRY and name not in STRATEGIES:
        raise SkipjackError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}")
    if name == "plain" and opts:
        raise SkipjackError("method 'plain' takes no options")
    return name, opts


@dataclass
class Method:
    """A parsed method spec: its drafter (None for plain) and its draft sizing (k > 0: fixed size)."""

    spec: str
    name: str
    drafter: Drafter | None
    k: int = 0
    draft_cost: DraftCost = field(default_factory=DraftCost)  # what its drafts cost, learned over requests
    strategy: Strategy | None = None  # a lossy layer plan for plain steps (`skipjack.strategies`)

    @property
    def lossless(self) -> bool:
        return self.strategy is None and (self.drafter is None or bool(self.drafter.lossless))

    def sizer(self, cost: CostModel) -> Sizer:
        """How this method's drafts are sized: a fixed k, the cost model, or not at all (plain)."""
        if self.drafter is None:
            return NoDraft()
        return FixedSizer(self.k) if self.k else CostSizer(cost, self.draft_cost)


def make_method(spec: str, shared: dict | None = None) -> Method:
    """A fresh `Method` for a spec. `shared`: the engine's store for what drafters share across requests."""
    name, opts = parse_method(spec)
    k = opts.pop("k", 0)
    if not isinstance(k, int) or not 0 <= k <= MAX_DRAFT:
        raise SkipjackError(f"{name}: k (fixed draft length, 0 = cost model) must be in [0, {MAX_DRAFT}] (got {k})")
    if name == "plain":
        return Method(spec, name, None)
    if name in STRATEGIES and k:
        raise SkipjackError(f"{name}: k (a draft length) does not apply: {name} drafts nothing")
    factory = STRATEGIES.get(name) or REGISTRY[name]
    params = {n: p for n, p in inspect.signature(factory).parameters.items() if n not in INTERNAL}
    unknown = set(opts) - set(params)
    if unknown:
        allowed = ", ".join(sorted([*params, "k"]))
        raise SkipjackError(f"{name}: unknown option(s) {', '.join(sorted(unknown))}; allowed: {allowed}")
    kwargs = {key: validate.typed_option(name, key, val, params[key].default) for key, val in opts.items()}
    if "shared" in inspect.signature(factory).parameters:
        kwargs["shared"] = shared
    if "registry" in inspect.signature(factory).parameters:
        kwargs["registry"] = REGISTRY
    if name in STRATEGIES:
        return Method(spec, name, None, strategy=factory(**kwargs))
    drafter = factory(**kwargs)
    return Method(spec, name, drafter, k, DraftCost(CostPrior(drafter)))


@dataclass
class CostPrior:
    """A draft's cost before one is timed: the drafter's own estimate, read when asked. An object rather than a
    closure so that a deep copy of a `Method` (the bench copies methods) reads its own drafter's estimate."""

    drafter: Drafter

    def __call__(self) -> float:
        return getattr(self.drafter, "cost_prior", 0.0)


__all__ = [
    "AUTO",
    "DraftContext",
    "Drafter",
    "EXACT_DTYPES",
    "Method",
    "Proposal",
    "REGISTRY",
    "Verdict",
    "identical_to_plain",
    "is_lossless",
    "lossless_methods",
    "make_method",
    "method_names",
    "parse_method",
    "register",
]
