"""The method registry: `--method NAME[:key=value,...]` in the CLI, the server, the benchmark and `skipjack eval`.

`plain` means no drafter. The lossy per-layer strategies (`skipjack.strategies`: `ffn-skip`, `layer-skip`,
`skipdecode`) are methods too: no drafter, a layer plan for each plain step. `superposed` (lossy,
`decoding.superposed`) decodes k completions in one stream; its `k` is its number of drafts. `pld:max_ngram=4`
passes options to the drafter's constructor; the option `k` (any drafter) fixes the draft size instead of
letting the cost model size each draft.

Three stages, kept apart:
- `MethodSpec.parse(spec)` is pure: the name, the options' names, types and ranges, and what the method can
  do (its capabilities, read from the classes), with no model, no file and no timing. Front-ends validate
  with it only. Ranges are checked by the options' constructor, which by the drafter contract does no work.
- `build(spec)` makes the drafter or strategy from its options.
- `Drafter.prepare(resources)` does the one-off work (load a draft model or an adapter, search a skip set,
  count tokens); the engine runs it outside any request and reports it as load time.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from skipjack import validate
from skipjack.decoding.cost import CostModel
from skipjack.decoding.sizing import CostSizer, DraftCost, FixedSizer, NoDraft, Sizer
from skipjack.decoding.superposed import Superposed
from skipjack.drafters.base import Drafter
from skipjack.drafters.draft_model import DraftModel
from skipjack.drafters.early_exit import EarlyExit
from skipjack.drafters.kangaroo import Kangaroo
from skipjack.drafters.lookahead import Lookahead
from skipjack.drafters.mix import Mix, part_names
from skipjack.drafters.ngram import NGramDrafter
from skipjack.drafters.pld import PromptLookup
from skipjack.drafters.swift import Swift
from skipjack.drafters.triforce import TriForce
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT
from skipjack.strategies import STRATEGIES, Strategy

REGISTRY: dict[str, type[Drafter]] = {
    "pld": PromptLookup,
    "ngram": NGramDrafter,
    "swift": Swift,
    "del": EarlyExit,
    "kangaroo": Kangaroo,
    "draft": DraftModel,
    "mix": Mix,
    "triforce": TriForce,
    "lookahead": Lookahead,
}
MULTI = {"superposed": Superposed}  # methods that decode several completions of one request in one stream
INTERNAL = {"parts"}  # constructor arguments the registry passes, never a user option
# Dtypes whose rounding keeps a lossless method's tokens identical to plain decoding's in practice. A verify
# pass runs several tokens through the model at once, and the CPU kernels (attention above all) round a
# pass over several tokens differently from a pass over one. In fp32 the differences are far below the gaps
# between logits: every benchmark prompt gives identical tokens (a real-model test checks them). In bf16
# they are not: see the "fp32 and bf16 in one run" section of BENCHMARKS.md.
EXACT_DTYPES = {"fp32", "fp64", "q4", "q8"}  # q4 / q8: a batch-invariant forward, identical by construction
# `--method auto`: the fastest lossless method overall in BENCHMARKS.md (regenerate: `make bench`), its drafts
# sized by the cost model, so it falls back to plain steps where drafting does not pay (and, in a batch, as the
# batch grows: `skipjack.decoding.batch.BatchCost`). A sampled request with a seed is decoded plain under `auto`
# (`Engine.plan`): rejection sampling keeps the distribution for any draft, but drafts sized by measured
# time consume the seeded draws differently from run to run, and a seed promises the same text each time.
AUTO = "ngram"


def register(name: str, factory: type[Drafter]) -> None:
    """Add a drafter class under `name`; its class attributes declare what it can do (`drafters.base`)."""
    REGISTRY[name] = factory


def method_names() -> list[str]:
    return ["plain", "auto", *REGISTRY, *STRATEGIES, *MULTI]


def method_help() -> str:
    """The `--method` help, from the registry: every name and its options."""
    parts = ["plain", f"auto (= {AUTO}, sized by the cost model)"]
    for name, cls in [*REGISTRY.items(), *STRATEGIES.items(), *MULTI.items()]:
        opts = [*_options(cls), *(["k"] if name in REGISTRY else [])]
        parts.append(name + (f"[:{','.join(opts)}]" if opts else "") + ("" if cls.lossless else " (lossy)"))
    return "NAME[:key=value,...], one of: " + "; ".join(parts)


def _options(cls) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls).parameters.items() if n not in INTERNAL}


@dataclass(frozen=True)
class MethodSpec:
    """A parsed, checked method spec: what to build and what it can do. Making one builds nothing."""

    spec: str
    name: str  # the registry's name (`auto` resolved)
    options: dict = field(default_factory=dict)  # typed constructor options (k excluded)
    k: int = 0  # a fixed draft size; 0: sized by the cost model
    parts: tuple[MethodSpec, ...] = ()  # mix: its parts' specs

    @classmethod
    def parse(cls, spec: str) -> MethodSpec:
        """'pld:k=8,max_ngram=4' -> MethodSpec('pld', {'max_ngram': 4}, k=8); 'auto' -> AUTO's."""
        if isinstance(spec, MethodSpec):
            return spec
        name, opts = validate.spec_options("method", spec)
        if name == "auto":
            if spec.partition(":")[2].strip():
                raise SkipjackError("method 'auto' takes no options (it is " + AUTO + ", sized by the cost model)")
            return cls.parse(AUTO)
        if name not in ("plain", *REGISTRY, *STRATEGIES, *MULTI):
            raise SkipjackError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}")
        if name == "plain":
            if opts:
                raise SkipjackError("method 'plain' takes no options")
            return cls(spec, name)
        k = opts.pop("k", 0) if name not in MULTI else 0  # superposed's own k is its option
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_DRAFT:
            raise SkipjackError(f"{name}: k (fixed draft length, 0 = cost model) must be in [0, {MAX_DRAFT}] (got {k})")
        if name in STRATEGIES and k:
            raise SkipjackError(f"{name}: k (a draft length) does not apply: {name} drafts nothing")
        factory = STRATEGIES.get(name) or MULTI.get(name) or REGISTRY[name]
        params = _options(factory)
        unknown = set(opts) - set(params)
        if unknown:
            allowed = ", ".join(sorted([*params, *(["k"] if name in REGISTRY else [])]))
            raise SkipjackError(f"{name}: unknown option(s) {', '.join(sorted(unknown))}; allowed: {allowed}")
        typed = {key: validate.typed_option(name, key, val, params[key].default) for key, val in opts.items()}
        parts = _mix_parts(typed) if factory is Mix else ()
        factory(**typed)  # the ranges: a constructor checks its options and does no other work
        return cls(spec, name, typed, k, parts)

    @property
    def drafter_class(self) -> type[Drafter] | None:
        return REGISTRY.get(self.name)

    @property
    def strategy_class(self) -> type[Strategy] | None:
        return STRATEGIES.get(self.name)

    @property
    def superposed_class(self) -> type[Superposed] | None:
        return MULTI.get(self.name)

    @property
    def drafts(self) -> bool:
        return self.name in REGISTRY

    @property
    def lossless(self) -> bool:
        """Whether its output provably equals plain decoding's: plain, and a drafter that says so."""
        if self.parts:
            return all(p.lossless for p in self.parts)
        return self.name == "plain" or (self.drafts and bool(self.drafter_class.lossless))

    def _any(self, capability: str) -> bool:
        if self.parts:
            return any(p._any(capability) for p in self.parts)
        return self.drafts and bool(getattr(self.drafter_class, capability))

    @property
    def reads_past_keys(self) -> bool:
        return self._any("reads_past_keys")

    @property
    def owns_cache(self) -> bool:
        return self._any("owns_cache")

    @property
    def copies_target_keys(self) -> bool:
        return self._any("copies_target_keys")

    def identical_to_plain(self, dtype: str) -> bool:
        """Whether, with the model in `dtype`, it is expected to give plain decoding's exact tokens."""
        return self.name == "plain" or (self.lossless and dtype in EXACT_DTYPES)


def _mix_parts(opts: dict) -> tuple[MethodSpec, ...]:
    """mix's `of=A+B` as its parts' specs (`model=` goes to the parts that take it)."""
    of, model = opts.get("of", inspect.signature(Mix).parameters["of"].default), opts.get("model", "")
    names = part_names(of, REGISTRY)
    takes = lambda n: "model" in _options(REGISTRY[n])  # noqa: E731
    return tuple(MethodSpec.parse(n + (f":model={model}" if model and takes(n) else "")) for n in names)


def strategy(spec: MethodSpec, tokenizer=None) -> Strategy | None:
    """A request's own lossy layer strategy (None for a method that is not one); a strategy with an instruction
    of its own (LOL's refocus) gets its token ids from `tokenizer` (the engine's: text stays at the edges)."""
    if spec.strategy_class is None:
        return None
    made = build(spec)
    if getattr(made, "guidance", None) and tokenizer is not None:
        made.guide_ids = tokenizer.encode(made.guidance, add_special_tokens=False)
    return made


def build(spec: MethodSpec) -> Drafter | Strategy | Superposed | None:
    """The method's drafter, strategy or superposed options, made from its options (no work: `prepare` does
    that); None for plain."""
    if spec.strategy_class is not None:
        return spec.strategy_class(**spec.options)
    if spec.superposed_class is not None:
        return spec.superposed_class(**spec.options)
    if spec.drafter_class is None:
        return None
    if spec.parts:
        return Mix(**spec.options, parts=[build(p) for p in spec.parts])
    return spec.drafter_class(**spec.options)


@dataclass
class Method:
    """A method as the engine holds it: its spec, its drafter (built and prepared once; what it learns carries
    over from request to request; None for plain and the strategies) and what its drafts cost."""

    spec: MethodSpec
    drafter: Drafter | None = None
    draft_cost: DraftCost = field(default_factory=DraftCost)  # learned over requests

    @classmethod
    def of(cls, spec: MethodSpec, drafter: Drafter | None) -> Method:
        return cls(spec, drafter, DraftCost(CostPrior(drafter)) if drafter is not None else DraftCost())

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def lossless(self) -> bool:
        return self.spec.lossless

    def sizer(self, cost: CostModel) -> Sizer:
        """How this method's drafts are sized: a fixed k, the cost model, or not at all (plain, strategies)."""
        if self.drafter is None:
            return NoDraft()
        return FixedSizer(self.spec.k) if self.spec.k else CostSizer(cost, self.draft_cost)

    def drafter_description(self) -> dict:
        """What its drafter settled on (a skip set, an exit layer), for `--json`; empty if nothing."""
        return self.drafter.describe() if self.drafter is not None else {}

    def fork(self) -> Method:
        """The same method with a copy of what it learned (the bench's warm runs)."""
        drafter = self.drafter.fork() if self.drafter is not None else None
        cost = DraftCost(CostPrior(drafter) if drafter is not None else None)
        cost.call, cost.nodes, cost.seen = self.draft_cost.call, self.draft_cost.nodes, self.draft_cost.seen
        return Method(self.spec, drafter, cost)


@dataclass
class CostPrior:
    """A draft's cost before one is timed: the drafter's own estimate, read when asked (after `prepare`)."""

    drafter: Drafter

    def __call__(self) -> float:
        return self.drafter.cost_prior
