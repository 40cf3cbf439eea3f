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

from skipjack import kvpolicies, validate, vocab
from skipjack.decoding import tuning
from skipjack.decoding.batch import Batch, BatchCost
from skipjack.decoding.cost import CostModel
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.sequence import Sequence, Step, generate
from skipjack.decoding.session import Session
from skipjack.decoding.sizing import Capped
from skipjack.drafters import Method, make_method
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT
from skipjack.loading import load as loading
from skipjack.loading.load import Loaded
from skipjack.loading.tokenizer import StreamDecoder
from skipjack.text import TextStream, texts


@dataclass
class Request:
    prompt: list[int]  # token ids (the tokenizer's `prompt_ids` makes them from text or chat messages)
    params: SamplingParams = field(default_factory=SamplingParams)
    method: str | Method = "plain"  # a spec (the engine's drafter for it) or a Method of the caller's own
    stop: tuple[str, ...] = ()  # stop strings (stop token ids are in params)
    session: Session | None = None  # how the request starts (`skipjack.decoding.session`); None: a fresh prefill
    draft_max: int | None = None  # at most this many draft nodes per step (llama-server's speculative.n_max)
    draft_p_min: float = 0.0  # no draft node whose score (path probability) is below this (speculative.p_min)
    kv: str | None = None  # the KV cache policy spec (`skipjack.kvpolicies`, `--kv`); None: every key kept


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

    def to_json(self) -> dict:
        return asdict(self)


class Engine:
    def __init__(self, loaded: Loaded, tuned: tuning.Tuning | None = None):
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.tuning = tuned  # None: tuning was switched off
        # Untuned, the cost model starts from "verifying costs nothing" and learns the real costs online.
        self.cost = tuned.prior if tuned is not None and tuned.prior is not None else CostModel.flat(learn=True)
        self.batch_cost = BatchCost(self.cost)  # a batched pass's cost, learned from the batches' passes
        self.shared = self.new_store()  # what the engine's methods share across requests
        self.lock = threading.RLock()
        self._methods: dict[str, Method] = {}
        self._busy: set[str] = set()  # specs whose engine method a batched sequence is using
        self._spare: dict[str, list[Method]] = {}  # more methods per spec, for batches

    @classmethod
    def load(cls, spec: str | None = None, dtype: str = "auto", tune: bool = True, remeasure: bool = False) -> Engine:
        """Load a model (`loading.load.load`) and tune it (`decoding.tuning.tune`; `remeasure`: afresh)."""
        loaded = loading.load(spec, dtype)
        return cls(loaded, tuning.tune(loaded.model, remeasure) if tune else None)

    @property
    def name(self) -> str:
        return self.loaded.name

    def method(self, spec: str) -> Method:
        """The engine's method for a spec, made once: its drafter keeps learning across requests."""
        validate.text("method", spec, empty=False)
        if spec not in self._methods:
            self._methods[spec] = self.new_method(spec)
        return self._methods[spec]

    def new_store(self) -> dict:
        """A drafters' store with nothing learned yet. Drafters read from it the target (a draft model checks its
        tokenizer) and token frequencies for reduced-vocabulary draft heads (computed on first use), and learn
        into it what they share across requests (n-gram tables, made on first use)."""
        return {"target": self.loaded, "token_counts": lambda: vocab.token_counts(self.loaded.tokenizer)}

    def new_method(self, spec: str, own_store: bool = False) -> Method:
        """A method of the caller's own; its drafter learns into the engine's shared store, or with `own_store` into
        a `new_store()` of its own (the bench's methods: none learns from another's runs)."""
        return make_method(spec, self.new_store() if own_store else self.shared)

    def check(self, request: Request) -> Method:
        """Validate a request at the API boundary (`skipjack.validate`: the CLI's and the server's checks), before
        any work; returns its method."""
        if not isinstance(request, Request):
            raise SkipjackError(f"a request must be a skipjack Request (got {type(request).__name__})")
        request.prompt = validate.token_ids("prompt", request.prompt, self.model.lm_head.out_features)
        if not isinstance(request.params, SamplingParams):
            raise SkipjackError(f"params must be SamplingParams (got {type(request.params).__name__})")
        request.params.__post_init__()  # fields may have been changed since it was made
        request.stop = validate.strings("stop", request.stop)
        if request.draft_max is not None:
            validate.integer("speculative n_max", request.draft_max, 0, MAX_DRAFT)
        request.draft_p_min = validate.number("speculative p_min", request.draft_p_min, 0.0, 1.0)
        if request.session is not None and not isinstance(request.session, Session):
            raise SkipjackError(f"session must be a skipjack Session or None (got {type(request.session).__name__})")
        if isinstance(request.method, str):
            if request.method.strip() == "auto" and request.params.temperature > 0 and request.params.seed is not None:
                request.method = "plain"  # a seeded draw must repeat: timing-sized drafts would change the draws
            m = self.method(request.method)
        elif isinstance(request.method, Method):
            m = request.method
        else:
            raise SkipjackError(f"method must be a method spec or a Method (got {type(request.method).__name__})")
        self.policy(request, m)
        return m

    def policy(self, request: Request, m: Method):
        """The request's KV cache policy, made fresh (None: every key kept); refused where it cannot combine."""
        if request.kv is None:
            return None
        policy = kvpolicies.make_policy(validate.text("--kv", request.kv, empty=False))
        if kvpolicies.is_lossless(request.kv):
            return None
        if m.strategy is not None:
            raise SkipjackError(f"--kv {request.kv} and the lossy layer strategy {m.name} do not combine")
        if request.session is not None:
            raise SkipjackError(f"--kv {request.kv} makes the request's own cache: it does not run with a session")
        if getattr(policy, "plain_only", False) and m.drafter is not None:
            raise SkipjackError(f"--kv {request.kv} runs plain steps only: it takes no drafter (--method plain)")
        if m.name == "triforce" or (m.name in kvpolicies.REWRITERS and not isinstance(policy, kvpolicies.KVDtype)):
            raise SkipjackError(f"{m.name} reads cached keys of past positions: it does not run with --kv {request.kv}")
        return policy

    def sizer(self, m: Method, request: Request):
        """The method's draft sizing for a request, under its own limits (`speculative` n_max / p_min)."""
        sizer = m.sizer(self.cost)
        if request.draft_max is not None or request.draft_p_min > 0:
            cap = MAX_DRAFT if request.draft_max is None else request.draft_max
            sizer = Capped(sizer, cap, request.draft_p_min)
        return sizer

    def stream(self, request: Request) -> Iterator[tuple[str, Step]]:
        """Yield (new text, step) pairs. Text never splits a character and never shows part of a stop string."""
        m = self.check(request)
        with self.lock:
            steps = generate(
                self.model,
                request.prompt,
                request.params,
                m.drafter,
                self.sizer(m, request),
                request.session,
                m.strategy,
                self.policy(request, m),
            )
            yield from texts(steps, StreamDecoder(self.tokenizer, request.prompt), request.stop)

    def complete(self, request: Request, on_text: Callable[[str], None] | None = None) -> Result:
        """Run one request to the end and summarise it; `on_text` gets the text as it streams."""
        tally = Tally(request)
        try:
            for delta, step in self.stream(request):
                tally.add(delta, step)
                if on_text and delta:
                    on_text(delta)
        except SkipjackError as e:  # after the last token (a drafter's file not saved): keep the result
            if not tally.ended:
                raise
            tally.problems.append(str(e))
        return tally.result()

    def generate_batch(self, requests: list[Request]) -> list[Result]:
        """Run requests together with continuous batching (`skipjack.decoding.batch`): one forward pass per step for all
        of them; each result as `complete` would give it alone where the forward is batch-invariant."""
        runner = self.runner()
        handles = [runner.add(r) for r in requests]
        tallies = {id(h): Tally(r) for h, r in zip(handles, requests)}
        for h in handles:
            tallies[id(h)].add(h.first_text, h.first)
        while runner.busy():
            for h, delta, step in runner.step():
                tallies[id(h)].add(delta, step)
        return [tallies[id(h)].result() for h in handles]

    def runner(self) -> BatchRunner:
        """A continuous batch on this engine: requests join (`add`) and leave (finished or `drop`) between steps."""
        return BatchRunner(self)

    def acquire(self, spec: str) -> Method:
        """A method for one sequence of a batch: the engine's own if free, else another made for the spec (a
        drafter holds one request's state)."""
        if spec not in self._busy:
            self._busy.add(spec)
            return self.method(spec)
        idle = self._spare.setdefault(spec, [])
        return idle.pop() if idle else self.new_method(spec)

    def release(self, spec: str, m: Method) -> None:
        if m is self._methods.get(spec):
            self._busy.discard(spec)
        else:
            self._spare.setdefault(spec, []).append(m)


class Handle:
    """One request in a `BatchRunner`: its sequence, its text, its method."""

    def __init__(self, request: Request, seq: Sequence, text: TextStream, method: Method):
        self.request, self.seq, self.text, self.method = request, seq, text, method
        self.first: Step | None = None
        self.first_text = ""


class BatchRunner:
    """Requests decoded together on one engine (the server's worker uses it). `add` prefills a request alone and
    returns its handle (its first step and text on it); `step` runs one batched step of every live request and
    returns (handle, new text, step) for each; `drop` ends one between steps. Each step holds the engine's lock."""

    def __init__(self, engine: Engine):
        self.engine, self.batch, self.handles = engine, Batch(engine.model, cost=engine.batch_cost), {}

    def busy(self) -> bool:
        return bool(self.batch.live)

    def add(self, request: Request) -> Handle:
        e = self.engine
        if len(self.batch.live) >= self.batch.rows:
            raise SkipjackError(f"the batch is full ({self.batch.rows} sequences)")
        m = e.check(request)  # validated; a spec's method is the engine's, or another if that one is busy
        if isinstance(request.method, str):
            m = e.acquire(request.method)
        with e.lock:
            policy = e.policy(request, m)
            seq = Sequence(
                e.model,
                request.prompt,
                request.params,
                m.drafter,
                e.sizer(m, request),
                request.session,
                m.strategy,
                policy,
            )
            h = Handle(request, seq, TextStream(StreamDecoder(e.tokenizer, request.prompt), request.stop), m)
            h.first = self.batch.add(seq)
        h.first_text = h.text.push(h.first)
        self.handles[id(seq)] = h
        if h.first.finish:
            self._end(h)
        return h

    def step(self) -> list[tuple[Handle, str, Step]]:
        with self.engine.lock:
            steps = self.batch.step()
        out = []
        for seq, step in steps:
            h = self.handles[id(seq)]
            out.append((h, h.text.push(step), step))
            if step.finish:
                self.drop(h)
        return out

    def drop(self, h: Handle) -> None:
        self.batch.drop(h.seq)
        self._end(h)

    def _end(self, h: Handle) -> None:
        if self.handles.pop(id(h.seq), None) is not None and isinstance(h.request.method, str):
            self.engine.release(h.request.method, h.method)


class Tally:
    """A request's steps summed into a `Result`."""

    def __init__(self, request: Request):
        self.request, self.text, self.tokens, self.hist = request, [], [], Counter()
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
            method=r.method if isinstance(r.method, str) else r.method.spec,
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
        )
