"""A request and what it gives back: `Request`, `Result` (a request's steps summed by `Tally`), and a superposed
request's completions (`Choice`, each made a `Result` by `chosen`). The engine (`skipjack.engine`) takes the one
and gives the other."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from skipjack.decoding.constraint import Grammar
from skipjack.decoding.plan import Plan
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.sequence import Step
from skipjack.decoding.session import Session
from skipjack.decoding.superposed import Draft
from skipjack.methods import Method


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
    n: int = 1  # completions (`Engine.completions`): superposed's n best drafts (n <= its k), else n streams


@dataclass
class Choice:
    """One of a superposed request's completions (`Engine.superpose`)."""

    text: str  # cut at a stop string
    step: Step  # the whole completion as one step: its tokens, finish, logprobs
    draft: Draft  # its score and its log-probability under the model
    passes: int  # the run's superposed forward passes (shared by its completions)
    score_seconds: float  # the run's scoring passes


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
    logprob: float | None = None  # the completion's log-probability under the model (superposed's scoring pass)
    superposed: dict = field(default_factory=dict)  # superposed: its rank, score, k and scoring seconds

    def to_json(self) -> dict:
        return asdict(self)


def chosen(request: Request, plan: Plan, c: Choice, rank: int, seconds: float, first: float) -> Result:
    """A superposed completion's `Result` (`seconds`: the whole run's, which made all of them)."""
    toks = c.step.tokens
    return Result(
        text=c.text,
        tokens=toks,
        new_tokens=len(toks),
        prompt_tokens=len(request.prompt),
        seconds=seconds,
        tokens_per_s=len(toks) / seconds if seconds > 0 else 0.0,
        method=plan.method,
        tokens_per_pass=1.0,
        draft_steps=0,
        finish=c.step.finish or "length",
        forward_passes=c.passes,
        prefill_seconds=first,
        cached_tokens=len(request.prompt) - c.step.forward_tokens,
        kv_bytes=c.step.kv_bytes or 0,
        lossless=plan.lossless,
        logprob=c.draft.logprob,
        superposed={"rank": rank, "score": c.draft.score, "k": plan.superposed.k, "score_seconds": c.score_seconds},
    )


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
