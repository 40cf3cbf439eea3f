"""A request's jobs' events turned into an OpenAI response: whole, or as SSE chunks ending in `data: [DONE]`,
with usage, `timings` (llama-server's, with draft counts) and the method used."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from starlette.requests import Request

from skipjack.decoding.plan import resolve
from skipjack.server import protocol as P
from skipjack.server import tools
from skipjack.server.errors import ApiError
from skipjack.server.scheduler import Job


class Reply:
    """Turns a request's jobs' events into an OpenAI response: whole, or as SSE chunks."""

    def __init__(self, e, body: P.Sampling, prompts: list[list[int]], spec: str, chat: bool, top, echo=None):
        """`prompts`: n choices each, in order; `echo`: per prompt (text, ids, prompt logprobs or None) to prepend
        to its choices (completions' `echo`), or None."""
        self.e, self.body, self.prompts, self.spec, self.chat, self.top = e, body, prompts, spec, chat, top
        self.echo, self.offsets = echo, {}  # offsets: each choice's text offset so far (logprobs.text_offset)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.t0 = time.perf_counter()
        self.generated = self.drafted = self.accepted = 0
        self.t_first: float | None = None
        self.cached: dict[tuple[int, int], int] = {}  # (prompt, choice) -> prompt tokens taken from the prefix cache

    def lossless(self) -> bool:
        """Whether the reply is what plain decoding with the full cache gives (method and cache policy)."""
        spec, policy = resolve(self.spec, self.body.kv)
        return spec.lossless and policy is None

    async def _events(self, job: Job, request: Request):
        """A job's events until it ends; a client gone away cancels it."""
        while True:
            try:
                ev = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return
                continue
            if ev[0] == "error":
                raise ApiError(ev[1], ev[2])
            yield ev
            if ev[0] == "done":
                return

    def _count(self, step, k: int) -> None:
        """Choice k's step: counts, and on its first step the prompt tokens it did not run (the prefix cache's)."""
        if self.t_first is None:
            self.t_first = time.perf_counter()
        p = k // self.body.n
        if (p, k) not in self.cached:
            self.cached[(p, k)] = len(self.prompts[p]) - step.forward_tokens
        self.generated += len(step.tokens)
        self.drafted += step.drafted
        self.accepted += step.accepted

    def _item(self, t: int, lp) -> dict:
        """One token's logprobs entry; `lp` None (a prompt's first token): no logprob, no top."""
        dec = self.e.tokenizer.decode
        tok = dec([t])
        top = (
            None
            if lp is None
            else [{"token": dec([i]), "logprob": v, "bytes": list(dec([i]).encode())} for i, v in lp.top]
        )
        return {
            "token": tok,
            "logprob": None if lp is None else lp.logprob,
            "bytes": list(tok.encode()),
            "top_logprobs": top,
        }

    def _logprobs(self, step) -> list[dict]:
        if self.top is None or not step.logprobs:
            return []
        return [self._item(t, lp) for t, lp in zip(step.tokens, step.logprobs)]

    def _echo(self, k: int) -> tuple[str, list[dict]]:
        """Choice k's echoed prompt: its text and, with logprobs, its tokens' entries (the first without one)."""
        if self.echo is None:
            return "", []
        text, ids, lps = self.echo[k // self.body.n]
        return text, [] if lps is None else [self._item(t, lp) for t, lp in zip(ids, lps)]

    def _lp_field(self, items: list[dict], k: int):
        """Choice k's logprobs for these entries (completions: text_offset continues from its earlier ones)."""
        if self.top is None:
            return None
        if self.chat:
            return {"content": items}
        offsets, at = [], self.offsets.get(k, 0)
        for x in items:
            offsets.append(at)
            at += len(x["token"])
        self.offsets[k] = at
        return {
            "tokens": [x["token"] for x in items],
            "token_logprobs": [x["logprob"] for x in items],
            "top_logprobs": [
                None if x["top_logprobs"] is None else {t["token"]: t["logprob"] for t in x["top_logprobs"]}
                for x in items
            ],
            "text_offset": offsets,
        }

    def usage(self) -> dict:
        n = sum(len(p) for p in self.prompts)  # each prompt once, however many choices (n) it has
        cached = {}
        for (p, _), c in self.cached.items():
            cached[p] = max(cached.get(p, 0), c)
        out = {"prompt_tokens": n, "completion_tokens": self.generated, "total_tokens": n + self.generated}
        return out | {"prompt_tokens_details": {"cached_tokens": sum(cached.values())}}

    def timings(self) -> dict:
        now = time.perf_counter()
        first = (self.t_first or now) - self.t0
        gen = max(now - (self.t_first or now), 1e-9)
        return {
            "prompt_n": sum(len(p) for p in self.prompts),
            "prompt_ms": round(first * 1000, 3),
            "predicted_n": self.generated,
            "predicted_ms": round(gen * 1000, 3),
            "predicted_per_second": round(self.generated / gen, 3),
            "draft_n": self.drafted,
            "draft_n_accepted": self.accepted,
        }

    def _choice(self, index: int, text: str, finish: str | None, lps) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": text}
            content, calls = self._calls(text)
            if calls:
                message, finish = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
            return {"index": index, "message": message, "finish_reason": finish, "logprobs": lps}
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": lps}

    def _calls(self, text: str) -> tuple[str | None, list[dict]]:
        """The tool calls in a chat answer (`server.tools`), when the request offered tools."""
        if not (self.chat and tools.active(self.body)):
            return text, []
        return tools.parse(text, {f["function"]["name"] for f in tools.functions(self.body)})

    def _head(self) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.e.name}

    async def whole(self, jobs: list[Job | None], request: Request) -> dict:
        """`jobs`: n per prompt, in order; None: no generation (max_tokens 0), the echo alone."""
        choices = []
        for i, job in enumerate(jobs):
            prefix, items = self._echo(i)
            text, finish = [prefix], "length"
            async for ev in self._events(job, request) if job is not None else _none():
                if ev[0] == "step":
                    text.append(ev[1])
                    items += self._logprobs(ev[2])
                    self._count(ev[2], i)
                else:
                    finish = _finish(ev[1])
            choices.append(self._choice(i, "".join(text), finish, self._lp_field(items, i)))
        return self._head() | {
            "choices": choices,
            "usage": self.usage(),
            "timings": self.timings(),
            "method": self.spec,
            "lossless": self.lossless(),
        }

    async def sse(self, jobs: list[Job], request: Request):
        head = self._head() | {"object": "chat.completion.chunk" if self.chat else "text_completion"}
        try:
            for i, job in enumerate(jobs):
                if self.chat:
                    yield _data(
                        head
                        | {
                            "choices": [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None,
                                    "logprobs": None,
                                }
                            ]
                        }
                    )
                prefix, items = self._echo(i)
                if prefix or items:
                    yield _data(head | {"choices": [self._delta(i, prefix, None, self._lp_field(items, i))]})
                if job is None:
                    yield _data(head | {"choices": [self._delta(i, "", "length", None)]})
                    continue
                held = [] if self.chat and tools.active(self.body) else None  # tool calls: sent when whole
                try:
                    async for ev in self._events(job, request):
                        if ev[0] == "step":
                            self._count(ev[2], i)
                            lps = self._lp_field(self._logprobs(ev[2]), i)
                            if held is not None:
                                held.append(ev[1])
                            elif ev[1] or lps:
                                yield _data(head | {"choices": [self._delta(i, ev[1], None, lps)]})
                        elif held is not None:
                            for d in self._held(i, "".join(held), _finish(ev[1])):
                                yield _data(head | {"choices": [d]})
                        else:
                            yield _data(head | {"choices": [self._delta(i, "", _finish(ev[1]), None)]})
                except ApiError as x:  # after the headers went out: the error is the stream's last event
                    yield _data({"error": {"message": x.message, "type": "server_error", "code": x.status}})
                    break
            opts = self.body.stream_options
            if opts is not None and opts.include_usage:
                yield _data(
                    head
                    | {"choices": [], "usage": self.usage(), "timings": self.timings(), "method": self.spec}
                    | {"lossless": self.lossless()}
                )
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                if job is not None:
                    job.cancelled.set()  # the client went away mid-stream (or all ended): free the slots

    def _held(self, index: int, text: str, finish: str) -> list[dict]:
        """A tool-offering chat's held answer as deltas: its content, then each call whole, then the finish."""
        content, calls = self._calls(text)
        out = [self._delta(index, content, None, None)] if content else []
        for k, c in enumerate(calls):
            call = {"index": k, "id": c["id"], "type": "function", "function": c["function"]}
            out.append({"index": index, "delta": {"tool_calls": [call]}, "finish_reason": None, "logprobs": None})
        return out + [self._delta(index, "", "tool_calls" if calls else finish, None)]

    def _delta(self, index: int, text: str, finish: str | None, lps) -> dict:
        if self.chat:
            return {
                "index": index,
                "delta": {"content": text} if text else {},
                "finish_reason": finish,
                "logprobs": lps,
            }
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": lps}


async def _none():
    """No events: a choice with no job (max_tokens 0)."""
    return
    yield


def _finish(reason: str) -> str:
    """OpenAI's finish reasons: a timed-out or cancelled request ended early, as "length" does."""
    return reason if reason in ("stop", "length") else "length"


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
