"""The engine: the one object the CLI, the benchmark and the server use.

`Engine.load(spec, dtype)` loads a model, tunes its kernels for this machine once (`skipjack.decoding.tuning`: cached
on disk; `tune=False` switches it off) and owns what requests share: the cost model that sizes drafts, the
methods' drafters (what they learn carries over from request to request), the drafters' shared store (the
n-gram tables; `new_method(spec, own_store=True)` makes a method that learns alone: the bench's), and a lock
(one request decodes at a time). `stream(request)` yields (text, step) pairs; `complete(request)` runs one to
the end and summarises it. Nothing in a request's path times kernels or writes measurement files (an n-gram
table persisted with `ngram:path=` is written where the user asked).

The decode loop below works on token ids; text (stop strings, incremental detokenization) is handled here,
at the edge.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from skipjack import methods, texts, validate, vocab
from skipjack.batching import BatchRunner
from skipjack.cache import CachePolicy
from skipjack.decoding import plan, tuning
from skipjack.decoding.batch import BatchCost
from skipjack.decoding.constraint import Constraint, Grammar, check_grammar, llg_tokenizer
from skipjack.decoding.cost import CostModel
from skipjack.decoding.plan import Plan
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.sequence import Step, TokenLogprob, generate
from skipjack.decoding.session import Session
from skipjack.decoding.sizing import Capped
from skipjack.drafters.base import Drafter, Resources
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT
from skipjack.loading import load as loading
from skipjack.loading.load import Loaded
from skipjack.loading.tokenizer import StreamDecoder
from skipjack.methods import Method, MethodSpec
from skipjack.text import texts as texts_of


@dataclass
class Request:
    prompt: list[int]  # token ids (the tokenizer's `prompt_ids` makes them from text or chat messages)
    params: SamplingParams = field(default_factory=SamplingParams)
    method: str | Method = "plain"  # a spec (the engine's method for it) or a Method of the caller's own
    stop: tuple[str, ...] = ()  # stop strings (stop token ids are in params)
    session: Session | None = None  # how the request starts (`skipjack.decoding.session`); None: a fresh prefill
    draft_max: int | None = None  # at most this many draft nodes per step (llama-server's speculative.n_max)
    draft_p_min: float = 0.0  # no draft node whose score (path probability) is below this (speculative.p_min)
    kv: str | None = None  # the KV cache policy spec (`skipjack.kvpolicies`, `--kv`); None: every key kept
    grammar: Grammar | None = None  # structured output: every token obeys it (`decoding.constraint`)


@dataclass
class Result:
    text: str
    tokens: list[int]  # generated ids (stop token excluded)
    new_tokens: int
    prompt_tokens: int
    seconds: float  # generation only (prefill included, model load excluded)
    tokens_per_s: float
    method: str
    tokens_per_pass: float  # tokens per decoding forward pass: 1 + accepted drafts (1.0 for plain)
    draft_steps: int  # forward passes that verified a draft
    finish: str
    accept_hist: dict[int, int] = field(default_factory=dict)  # accepted drafts per verify step -> count
    forward_passes: int = 0  # decoding forward passes (prefill excluded)
    prefill_seconds: float = 0.0  # time to the first token (prompt forward pass + first pick)
    cached_tokens: int = 0  # prompt tokens not run again: taken from a session
    draft_seconds: float = 0.0  # time spent drafting (proposals; one-off searches excluded)
    problems: list[str] = field(default_factory=list)  # failures after the last token (the result still holds)
    kv: str = "full"  # the KV cache policy it ran with
    kv_bytes: int = 0  # keys/values the cache held at the end
    lossless: bool = True  # the plan's answer: the method and the cache policy keep plain decoding's output
    layers: dict = field(default_factory=dict)  # a lossy layer strategy's `stats()` over this request

    def to_json(self) -> dict:
        return asdict(self)


class Engine:
    def __init__(self, loaded: Loaded, tuned: tuning.Tuning | None = None):
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.tuning = tuned  # None: tuning was switched off
        # Untuned, the cost model starts from "verifying costs nothing" and learns the real costs online.
        self.cost = tuned.prior if tuned is not None and tuned.prior is not None else CostModel.flat(learn=True)
        self.batch_cost = BatchCost(self.cost)  # a batched pass's cost, learned from the batches' passes
        self.lock = threading.RLock()
        self.resources = self.new_resources()  # what the engine's drafters share (n-gram tables, token counts)
        self.prepare_seconds = 0.0  # methods' one-off preparation (load time, never a request's)
        self._methods: dict[str, Method] = {}

    @classmethod
    def load(cls, spec: str | None = None, dtype: str = "auto", tune: bool = True, remeasure: bool = False) -> Engine:
        """Load a model (`loading.load.load`) and tune it (`decoding.tuning.tune`; `remeasure`: afresh)."""
        loaded = loading.load(spec, dtype)
        return cls(loaded, tuning.tune(loaded.model, remeasure) if tune else None)

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def load_seconds(self) -> float:
        """Loading the model and preparing its methods (a draft model, a skip-set search): never a request's time."""
        return self.loaded.seconds + self.prepare_seconds

    def new_resources(self) -> Resources:
        """Drafters' resources with nothing learned yet: the target, its token frequencies and local text (each
        computed on first use, in some drafter's `prepare`), and an empty store of shared tables."""
        tok = self.tokenizer
        return Resources(
            model=self.model,
            target=self.loaded,
            token_counts=once(lambda: vocab.token_counts(tok)),
            text=once(lambda: tok.encode(texts.draft_text(), add_special_tokens=False)),
        )

    def method(self, spec: str | MethodSpec) -> Method:
        """The engine's method for a spec, built and prepared on first use (under the engine's lock, outside any
        request): its drafter keeps learning across requests, each request drafting in a session of its own."""
        ms = MethodSpec.parse(validate.text("method", spec, empty=False) if isinstance(spec, str) else spec)
        with self.lock:
            if ms.spec not in self._methods:
                self._methods[ms.spec] = self.new_method(ms)
            return self._methods[ms.spec]

    def new_method(self, spec: str | MethodSpec, own_store: bool = False) -> Method:
        """A method of the caller's own, built and prepared now; its drafter learns into the engine's shared
        tables, or with `own_store` into its own (the bench's methods: none learns from another's runs)."""
        ms = MethodSpec.parse(spec)
        built = methods.build(ms)
        drafter = built if isinstance(built, Drafter) else None
        if drafter is not None:
            t = time.perf_counter()
            drafter.prepare(self.new_resources() if own_store else self.resources)
            self.prepare_seconds += time.perf_counter() - t
        return Method.of(ms, drafter)

    def check(self, request: Request) -> MethodSpec:
        """The request checked (`_checked`), nothing built; its method's spec."""
        return self._checked(request)[0]

    def _checked(self, request: Request) -> tuple[MethodSpec, CachePolicy | None]:
        """Validate a request at the API boundary (`skipjack.validate`: the CLI's and the server's checks) and
        check that its method, cache policy and session combine (`decoding.plan.resolve`): pure, nothing is
        built or prepared, so the server runs it on its event loop: (the method's spec, the cache policy or None)."""
        if not isinstance(request, Request):
            raise SkipjackError(f"a request must be a skipjack Request (got {type(request).__name__})")
        request.prompt = validate.token_ids("prompt", request.prompt, self.model.lm_head.out_features)
        if not isinstance(request.params, SamplingParams):
            raise SkipjackError(f"params must be SamplingParams (got {type(request.params).__name__})")
        request.params.__post_init__()  # fields may have been changed since it was made
        request.params.check_vocab(self.model.lm_head.out_features)  # logit_bias's token ids
        request.stop = validate.strings("stop", request.stop)
        if request.draft_max is not None:
            validate.integer("speculative n_max", request.draft_max, 0, MAX_DRAFT)
        request.draft_p_min = validate.number("speculative p_min", request.draft_p_min, 0.0, 1.0)
        if request.session is not None and not isinstance(request.session, Session):
            raise SkipjackError(f"session must be a skipjack Session or None (got {type(request.session).__name__})")
        if isinstance(request.method, str):
            if request.method.strip() == "auto" and request.params.temperature > 0 and request.params.seed is not None:
                request.method = "plain"  # a seeded draw must repeat: timing-sized drafts would change the draws
            spec = MethodSpec.parse(validate.text("method", request.method, empty=False))
        elif isinstance(request.method, Method):
            spec = request.method.spec
        else:
            raise SkipjackError(f"method must be a method spec or a Method (got {type(request.method).__name__})")
        if request.grammar is not None:
            check_grammar(request.grammar, request.params)
        return plan.resolve(spec, request.kv, request.session is not None)

    def plan(self, request: Request) -> Plan:
        """A request checked (`check`) and resolved into its plan, once: the drafter's session, the sizer, a
        strategy of its own, the cache policy, the start and whether it is lossless. A method used for the first
        time is built and prepared here (under the engine's lock; its time goes to `prepare_seconds`)."""
        spec, policy = self._checked(request)
        m = request.method if isinstance(request.method, Method) else self.method(spec)
        strategy = methods.strategy(spec, self.tokenizer)  # one per request
        return Plan(
            draft=m.drafter.session() if m.drafter is not None else None,
            sizer=self.sizer(m, request),
            strategy=strategy,
            policy=policy,
            session=request.session,
            lossless=spec.lossless and policy is None,
            method=request.method if isinstance(request.method, str) else spec.spec,
            constraint=self._constraint(request),
        )

    def _constraint(self, request: Request) -> Constraint | None:
        """A request's grammar state (`decoding.constraint`); its end is the request's stop tokens."""
        if request.grammar is None:
            return None
        vocab = self.model.lm_head.out_features
        lltok = llg_tokenizer(self.tokenizer, vocab, request.params.stop_token_ids)
        return Constraint(request.grammar.text(), lltok, vocab)

    def sizer(self, m: Method, request: Request):
        """The method's draft sizing for a request, under its own limits (`speculative` n_max / p_min)."""
        sizer = m.sizer(self.cost)
        if m.drafter is not None and (request.draft_max is not None or request.draft_p_min > 0):
            cap = MAX_DRAFT if request.draft_max is None else request.draft_max
            sizer = Capped(sizer, cap, request.draft_p_min)
        return sizer

    def stream(self, request: Request, plan: Plan | None = None) -> Iterator[tuple[str, Step]]:
        """Yield (new text, step) pairs. Text never splits a character and never shows part of a stop string.
        `plan`: the request's, already made by `plan(request)` (default: made now)."""
        plan = plan or self.plan(request)
        with self.lock:
            steps = generate(self.model, request.prompt, request.params, plan)
            yield from texts_of(steps, StreamDecoder(self.tokenizer, request.prompt), request.stop)

    def complete(self, request: Request, on_text: Callable[[str], None] | None = None) -> Result:
        """Run one request to the end and summarise it; `on_text` gets the text as it streams."""
        plan = self.plan(request)
        tally = Tally(request, plan)
        try:
            for delta, step in self.stream(request, plan):
                tally.add(delta, step)
                if on_text and delta:
                    on_text(delta)
        except SkipjackError as e:  # after the last token (a drafter's file not saved): keep the result
            if not tally.ended:
                raise
            tally.problems.append(str(e))
        return tally.result()

    def generate_batch(self, requests: list[Request]) -> list[Result]:
        """Run requests together with continuous batching (`decoding.batch`): one forward pass per step for all
        of them; each result as `complete` would give it alone where the forward is batch-invariant."""
        runner = self.runner()
        handles = [runner.add(r) for r in requests]
        tallies = {id(h): Tally(r, h.plan) for h, r in zip(handles, requests)}
        for h in handles:
            tallies[id(h)].add(h.first_text, h.first)
        while runner.busy():
            for h, delta, step in runner.step():
                tallies[id(h)].add(delta, step)
        return [tallies[id(h)].result() for h in handles]

    def embed(self, ids: list[int]) -> list[float]:
        """The prompt's embedding: one forward pass, the last layer's hidden states after the final norm, mean
        pooled over the tokens and L2-normalised (llama-server with `--pooling mean`). Holds the engine's lock."""
        ctx = self.model.config.max_position_embeddings
        ids = validate.token_ids("input", ids, self.model.lm_head.out_features)
        if len(ids) > ctx:
            raise SkipjackError(f"the input has {len(ids)} tokens: the model's context is {ctx}")
        with self.lock:
            h = self.model(torch.tensor([ids]), logits="none").last_hidden  # [1, T, D]
            h = self.model.math.rms_norm(h, self.model.norm_weight, self.model.config.rms_norm_eps)
        v = h[0].float().mean(dim=0)
        return torch.nn.functional.normalize(v, dim=0).tolist()

    def prompt_logprobs(self, ids: list[int], top: int = 0) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (the first has none: None), with the
        `top` most likely tokens there: one forward pass over the prompt, every position's logits (under the lock)."""
        ids = validate.token_ids("prompt", ids, self.model.lm_head.out_features)
        validate.integer("top logprobs", top, 0, 20)
        with self.lock:
            logits = self.model.forward(torch.tensor([ids], dtype=torch.long), logits="all").logits[0]
        lp = torch.log_softmax(logits[:-1].float(), -1)  # row i: the distribution of token i + 1
        out: list[TokenLogprob | None] = [None]
        for i, t in enumerate(ids[1:]):
            vals, top_ids = lp[i].topk(top) if top else (lp[i][:0], lp[i][:0].long())
            out.append(TokenLogprob(float(lp[i, t]), list(zip(top_ids.tolist(), vals.tolist()))))
        return out

    def runner(self, chunk: int | None = None) -> BatchRunner:
        """A continuous batch on this engine: requests join (`add`) and leave (finished or `drop`) between steps
        (`chunk`: prompts run that many tokens per step, see `BatchRunner`)."""
        return BatchRunner(self, chunk)


def once(make: Callable):
    """`make`, called on first use only (its value kept)."""
    box: list = []

    def get():
        if not box:
            box.append(make())
        return box[0]

    return get


class Tally:
    """A request's steps summed into a `Result`."""

    def __init__(self, request: Request, plan: Plan):
        self.request, self.plan, self.text, self.tokens, self.hist = request, plan, [], [], Counter()
        self.accepted = self.passes = self.drafts = self.cached = self.kv_bytes = 0
        self.drafting, self.finish, self.t_first, self.ended = 0.0, "length", None, False
        self.problems: list[str] = []
        self.t0 = time.perf_counter()

    def add(self, delta: str, step: Step) -> None:
        self.text.append(delta)
        self.tokens.extend(step.tokens)
        if self.t_first is None:
            self.t_first = time.perf_counter() - self.t0
            self.cached = len(self.request.prompt) - step.forward_tokens
        else:
            self.passes += 1
            self.accepted += step.accepted
        if step.drafted:
            self.drafts += 1
            self.hist[step.accepted] += 1
        self.finish, self.ended = step.finish or self.finish, bool(step.finish)
        self.drafting += step.draft_seconds
        self.kv_bytes = step.kv_bytes if step.kv_bytes is not None else self.kv_bytes

    def result(self) -> Result:
        dt, r = time.perf_counter() - self.t0, self.request
        return Result(
            text="".join(self.text),
            tokens=self.tokens,
            new_tokens=len(self.tokens),
            prompt_tokens=len(r.prompt),
            seconds=dt,
            tokens_per_s=len(self.tokens) / dt if dt > 0 else 0.0,
            method=self.plan.method,
            lossless=self.plan.lossless,
            tokens_per_pass=1.0 + self.accepted / self.passes if self.passes else 1.0,
            draft_steps=self.drafts,
            finish=self.finish,
            accept_hist=dict(sorted(self.hist.items())),
            forward_passes=self.passes,
            prefill_seconds=self.t_first or 0.0,
            cached_tokens=self.cached,
            draft_seconds=self.drafting,
            problems=self.problems,
            kv=r.kv or "full",
            kv_bytes=self.kv_bytes,
            layers=self.plan.strategy.stats() if self.plan.strategy is not None else {},
        )
