"""The engine: the one object the CLI, the benchmark and the server use.

`Engine.load(spec, dtype)` loads a model, tunes its kernels for this machine once (`skipjack.tuning`: cached
on disk; `tune=False` switches it off) and owns what requests share: the cost model that sizes drafts, the
methods' drafters (what they learn carries over from request to request), the drafters' shared store (the
n-gram tables), and a lock (one request decodes at a time). `stream(request)` yields (text, step) pairs;
`complete(request)` runs one to the end and summarises it. Nothing in a request's path times kernels or
writes measurement files (an n-gram table persisted with `ngram:path=` is written where the user asked).

The decode loop below works on token ids; text (stop strings, incremental detokenization) is handled here,
at the edge.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from skipjack import loading, tuning, validate, vocab
from skipjack.cost import CostModel
from skipjack.decode import Step, generate
from skipjack.drafters import Method, make_method
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT
from skipjack.loading import Loaded
from skipjack.sampling import SamplingParams
from skipjack.session import Session
from skipjack.sizing import Capped
from skipjack.tokenizer import StreamDecoder


@dataclass
class Request:
    prompt: list[int]  # token ids (the tokenizer's `prompt_ids` makes them from text or chat messages)
    params: SamplingParams = field(default_factory=SamplingParams)
    method: str | Method = "plain"  # a spec (the engine's drafter for it) or a Method of the caller's own
    stop: tuple[str, ...] = ()  # stop strings (stop token ids are in params)
    session: Session | None = None  # how the request starts (`skipjack.session`); None: a fresh prefill
    draft_max: int | None = None  # at most this many draft nodes per step (llama-server's speculative.n_max)
    draft_p_min: float = 0.0  # no draft node whose score (path probability) is below this (speculative.p_min)


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

    def to_json(self) -> dict:
        return asdict(self)


class Engine:
    def __init__(self, loaded: Loaded, tuned: tuning.Tuning | None = None):
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.tuning = tuned  # None: tuning was switched off
        # Untuned, the cost model starts from "verifying costs nothing" and learns the real costs online.
        self.cost = tuned.prior if tuned is not None and tuned.prior is not None else CostModel.flat(learn=True)
        # what drafters share across requests: n-gram tables; the target (a draft model checks its tokenizer);
        # token frequencies for reduced-vocabulary draft heads (computed on first use)
        self.shared: dict = {"target": loaded, "token_counts": lambda: vocab.token_counts(loaded.tokenizer)}
        self.lock = threading.RLock()
        self._methods: dict[str, Method] = {}

    @classmethod
    def load(cls, spec: str | None = None, dtype: str = "auto", tune: bool = True, remeasure: bool = False) -> Engine:
        """Load a model (`skipjack.loading.load`) and tune it (`skipjack.tuning.tune`; `remeasure`: afresh)."""
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

    def new_method(self, spec: str) -> Method:
        """A method of the caller's own (the bench keeps one per method and copies it per repeat)."""
        return make_method(spec, self.shared)

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
            return self.method(request.method)
        if not isinstance(request.method, Method):
            raise SkipjackError(f"method must be a method spec or a Method (got {type(request.method).__name__})")
        return request.method

    def stream(self, request: Request) -> Iterator[tuple[str, Step]]:
        """Yield (new text, step) pairs. Text never splits a character and never shows part of a stop string."""
        m = self.check(request)
        with self.lock:
            sizer = m.sizer(self.cost)
            if request.draft_max is not None or request.draft_p_min > 0:
                sizer = Capped(
                    sizer, MAX_DRAFT if request.draft_max is None else request.draft_max, request.draft_p_min
                )
            steps = generate(self.model, request.prompt, request.params, m.drafter, sizer, request.session)
            yield from _texts(steps, StreamDecoder(self.tokenizer, request.prompt), request.stop)

    def complete(self, request: Request, on_text: Callable[[str], None] | None = None) -> Result:
        """Run one request to the end and summarise it; `on_text` gets the text as it streams."""
        text, tokens, hist = [], [], Counter()
        accepted = passes = drafts = 0
        drafting = 0.0
        finish, t_first, cached, ended = "length", None, 0, False
        t0 = time.perf_counter()
        problems: list[str] = []
        try:
            for i, (delta, step) in enumerate(self.stream(request)):
                text.append(delta)
                tokens.extend(step.tokens)
                if on_text and delta:
                    on_text(delta)
                if i == 0:
                    t_first, cached = time.perf_counter() - t0, len(request.prompt) - step.forward_tokens
                else:
                    passes += 1
                    accepted += step.accepted
                if step.drafted:
                    drafts += 1
                    hist[step.accepted] += 1
                finish, ended = step.finish or finish, bool(step.finish)
                drafting += step.draft_seconds
        except SkipjackError as e:  # after the last token (a drafter's file not saved): keep the result
            if not ended:
                raise
            problems.append(str(e))
        dt = time.perf_counter() - t0
        spec = request.method if isinstance(request.method, str) else request.method.spec
        return Result(
            text="".join(text),
            tokens=tokens,
            new_tokens=len(tokens),
            prompt_tokens=len(request.prompt),
            seconds=dt,
            tokens_per_s=len(tokens) / dt if dt > 0 else 0.0,
            method=spec,
            tokens_per_pass=1.0 + accepted / passes if passes else 1.0,
            draft_steps=drafts,
            finish=finish,
            accept_hist=dict(sorted(hist.items())),
            forward_passes=passes,
            prefill_seconds=t_first or 0.0,
            cached_tokens=cached,
            draft_seconds=drafting,
            problems=problems,
        )


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _texts(steps: Iterator[Step], dec: StreamDecoder, stop: tuple[str, ...]) -> Iterator[tuple[str, Step]]:
    """The steps with their new text: cut at the first stop string (which ends the generation), holding back
    a suffix that may start one, and an unfinished multi-byte character."""
    shown = 0
    for step in steps:
        dec.push(step.tokens)
        if step.finish:
            dec.flush()
        text = dec.text
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            step.finish = "stop"
            yield text[shown:cut], step
            steps.close()
            return
        upto = len(text) - (0 if step.finish else _held_back(text, stop))
        if text.endswith("\ufffd") and not step.finish:
            upto = min(upto, len(text) - 1)
        yield text[shown:upto], step
        shown = max(shown, upto)
