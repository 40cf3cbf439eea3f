"""The engine: the one object the CLI, the benchmark and the server use.

`Engine.load(spec, dtype)` loads a model, tunes its kernels for this machine once (`skipjack.decoding.tuning`: cached
on disk; `tune=False` switches it off) and owns what requests share: the cost model that sizes drafts, the
methods' drafters (what they learn carries over from request to request), the drafters' shared store (the
n-gram tables; `new_method(spec, own_store=True)` makes a method that learns alone: the bench's), and a lock
(one request decodes at a time). `stream(request)` yields (text, step) pairs; `complete(request)` runs one to
the end and summarises it; `completions(request)` gives its `n` completions (superposed decoding's n best
drafts from one stream, `superpose`, or n independent streams in one batch). Nothing in a request's path
times kernels or writes measurement files (an n-gram table persisted with `ngram:path=` is written where the
user asked).

The decode loop below works on token ids; text (stop strings, incremental detokenization) is handled here,
at the edge.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

import torch

from skipjack import methods, texts, validate, vocab
from skipjack.batching import BatchRunner
from skipjack.cache import CachePolicy
from skipjack.decoding import plan, tuning
from skipjack.decoding.batch import BatchCost
from skipjack.decoding.constraint import Constraint, check_grammar, llg_tokenizer
from skipjack.decoding.cost import CostModel
from skipjack.decoding.plan import Plan
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.sequence import Step, TokenLogprob, generate
from skipjack.decoding.session import Session
from skipjack.decoding.sizing import Capped
from skipjack.decoding.superposed import Superposition
from skipjack.drafters.base import Drafter, Resources
from skipjack.drafters.ngram_table import NGramTable
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT, MAX_N
from skipjack.loading import load as loading
from skipjack.loading.load import Loaded
from skipjack.loading.tokenizer import StreamDecoder
from skipjack.methods import Method, MethodSpec
from skipjack.request import Choice, Request, Result, Tally, chosen
from skipjack.text import TextStream
from skipjack.text import texts as texts_of


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
    def source(self):
        """Where the model was loaded from (a file or a folder; None for a model built in memory)."""
        return self.loaded.source

    @property
    def context(self) -> int:
        """The model's context: prompt and generated tokens together, at most."""
        return self.model.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        """The LM head's rows: the token ids the model scores (may exceed the tokenizer's)."""
        return self.model.lm_head.out_features

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

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
        return checked(request, self.vocab_size)

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
            superposed=methods.build(spec) if spec.superposed_class is not None else None,
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
        if plan.superposed is not None:  # its best completion, whole at the end (a draft can change until then)
            best = [c for c in self.superpose(request, plan) if c is not None][0][0]
            yield best.text, best.step
            return
        with self.lock:
            steps = generate(self.model, request.prompt, request.params, plan)
            yield from texts_of(steps, StreamDecoder(self.tokenizer, request.prompt), request.stop)

    def superpose(self, request: Request, plan: Plan | None = None) -> Iterator[list[Choice] | None]:
        """A superposed request (`decoding.superposed`) step by step: None after its prompt and after each
        step (each under the engine's lock, so that a server's batch steps in between), then its `request.n`
        best completions, best first. Closed early (a client gone), it ends cleanly."""
        plan = plan or self.plan(request)
        m, p = plan.superposed, request.params
        learned = self.resources.tables.setdefault(m.table_key, NGramTable(order=m.order)) if m.table_key else None
        with self.lock:
            run = Superposition(self.model, m, request.prompt, p, request.session, learned)
        try:
            while not run.ended:
                yield None
                with self.lock:
                    run.advance()
            with self.lock:
                drafts = run.finish()[: request.n]
        finally:
            with self.lock:
                run.close()
        out = []
        for d in drafts:
            lps = [TokenLogprob(lp, top) for lp, top in d.logprobs] if p.logprobs is not None else None
            step = Step(d.tokens, forward_tokens=run.ran, finish=d.finish, logprobs=lps, kv_bytes=run.cache.nbytes)
            text = TextStream(StreamDecoder(self.tokenizer, request.prompt), request.stop).push(step)
            out.append(Choice(text, step, d, run.steps, run.score_seconds))
        yield out

    def complete(self, request: Request, on_text: Callable[[str], None] | None = None) -> Result:
        """Run one request to the end and summarise it; `on_text` gets the text as it streams (superposed: its
        best completion, at the end)."""
        if self.check(request).superposed_class is not None:
            res = self.completions(dataclasses.replace(request, n=1))[0]
            if on_text and res.text:
                on_text(res.text)
            return res
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

    def completions(self, request: Request) -> list[Result]:
        """`request.n` completions of one prompt: superposed's n best drafts from one stream (`superpose`), else
        n independent streams in one batch (`generate_batch`; a seed s gives stream i the seed s + i, as the
        server's `n` does)."""
        if self.check(request).superposed_class is None:
            seed = request.params.seed
            params = [
                dataclasses.replace(request.params, seed=None if seed is None else seed + i) for i in range(request.n)
            ]
            return self.generate_batch([dataclasses.replace(request, n=1, params=q) for q in params])
        plan, t0, first = self.plan(request), time.perf_counter(), None
        for out in self.superpose(request, plan):
            first = first if first is not None else time.perf_counter() - t0
            picked = out
        dt = time.perf_counter() - t0
        return [chosen(request, plan, c, rank, dt, first) for rank, c in enumerate(picked)]

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


def checked(request: Request, vocab_size: int) -> tuple[MethodSpec, CachePolicy | None]:
    """Validate a request at the API boundary (`skipjack.validate`: the CLI's and the server's checks) and
    check that its method, cache policy and session combine (`decoding.plan.resolve`): pure, nothing is
    built or prepared, so the server runs it on its event loop: (the method's spec, the cache policy or None)."""
    if not isinstance(request, Request):
        raise SkipjackError(f"a request must be a skipjack Request (got {type(request).__name__})")
    request.prompt = validate.token_ids("prompt", request.prompt, vocab_size)
    if not isinstance(request.params, SamplingParams):
        raise SkipjackError(f"params must be SamplingParams (got {type(request.params).__name__})")
    request.params.__post_init__()  # fields may have been changed since it was made
    request.params.check_vocab(vocab_size)  # logit_bias's token ids
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
    validate.integer("n (completions)", request.n, 1, MAX_N)
    spec, policy = plan.resolve(spec, request.kv, request.session is not None)
    if spec.superposed_class is not None:
        speculative = request.draft_max is not None or request.draft_p_min > 0
        methods.build(spec).check(request.params, request.n, request.grammar is not None, speculative)
    elif request.n > 1 and request.session is not None:
        raise SkipjackError("n > 1 independent streams cannot share one session (each takes its cache over)")
    return spec, policy


def once(make: Callable):
    """`make`, called on first use only (its value kept)."""
    box: list = []

    def get():
        if not box:
            box.append(make())
        return box[0]

    return get
