"""`/v1/embeddings` and a minimal `/v1/responses` (OpenAI's Responses API), registered by `register`.

Embeddings: each input's last hidden state after the final norm, mean pooled over its tokens and L2-normalised
(`Engine.embed`; llama-server with `--pooling mean`), computed in a worker thread under the engine's lock.
Responses: text in (a string or a list of messages, plus `instructions`), text out, whole or as SSE events
(`response.created` ... `response.output_text.delta` ... `response.completed`); decoded by the scheduler's
jobs, as `/v1/chat/completions` is. `text.format` asks for structured output (`json_object`, or
`json_schema` with its `schema`), decoded under the grammar as `response_format` is.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from skipjack import engine as engine_mod
from skipjack.decoding.constraint import Grammar
from skipjack.decoding.sampling import SamplingParams
from skipjack.server.errors import ApiError
from skipjack.server.protocol import Strict
from skipjack.server.scheduler import Job, QueueFull

MAX_INPUTS = 2048  # embedding inputs per request (OpenAI's cap)


class Embeddings(Strict):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None


class InputText(Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(Strict):
    type: Literal["message"] | None = None
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[InputText]


class TextFormat(Strict):
    """The Responses API's `text.format`: a `json_schema` carries its name, schema and strict flag flat, not nested."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseText(Strict):
    format: TextFormat | None = None


class Responses(Strict):
    input: str | list[InputMessage]
    text: ResponseText | None = None
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=100.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool | None = None


def register(app: FastAPI, settings, need_engine) -> None:
    """Add /v1/embeddings, /v1/responses and /tokenizer_info to the app (`need_engine()`: the engine, or a 503
    while loading)."""
    state = app.state

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """vLLM's: the named special tokens, the chat template, the context length (lm-eval's remote tokenizer
        reads it, then tokenizes through /tokenize and /detokenize)."""
        e = need_engine()
        names = getattr(e.tokenizer.hf, "special_tokens_map", {}) or {}
        special = {k: names.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return special | {
            "tokenizer_class": type(e.tokenizer.hf).__name__,
            "chat_template": e.tokenizer.chat_template,
            "model_max_length": e.context,
            "vocab_size": e.tokenizer.vocab_size,
        }

    @app.post("/v1/embeddings")
    async def embeddings(body: Embeddings):
        e = need_engine()
        if state.scheduler is not None and state.scheduler.draining:
            raise ApiError(503, "the server is shutting down")
        inputs = embedding_inputs(e, body)
        if body.dimensions is not None and body.dimensions != e.hidden_size:
            raise ApiError(400, f"dimensions must be the model's {e.hidden_size}", "dimensions")
        vectors = await asyncio.to_thread(lambda: [e.embed(ids) for ids in inputs])
        b64 = body.encoding_format == "base64"
        data = [{"object": "embedding", "index": i, "embedding": _b64(v) if b64 else v} for i, v in enumerate(vectors)]
        n = sum(len(ids) for ids in inputs)
        return {"object": "list", "data": data, "model": e.name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/responses")
    async def responses(body: Responses, request: Request):
        e = need_engine()
        if not e.tokenizer.chat_template:
            raise ApiError(400, f"model {e.name!r} has no chat template; use /v1/completions")
        ids = e.tokenizer.prompt_ids(response_messages(body))
        job = _submit(state, settings, e, body, ids)
        reply = ResponseReply(e, body, ids, job, request)
        if body.stream:
            return StreamingResponse(reply.sse(), media_type="text/event-stream")
        try:
            return await reply.whole()
        finally:
            job.cancelled.set()  # a no-op for a finished job; frees it when the client left


def embedding_inputs(e, body: Embeddings) -> list[list[int]]:
    """The inputs as token id lists, every one checked (non-empty, in the vocabulary, within the context)."""
    raw = body.input
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise ApiError(400, "input is empty", "input")
    if len(raw) > MAX_INPUTS:
        raise ApiError(400, f"input has {len(raw)} items: at most {MAX_INPUTS} per request", "input")
    vocab, ctx = e.vocab_size, e.context
    out = []
    for i, x in enumerate(raw):
        if isinstance(x, str):
            if not x:
                raise ApiError(400, f"input[{i}] is an empty string", "input")
            x = e.tokenizer.prompt_ids(x, raw=True)
        if not x:
            raise ApiError(400, f"input[{i}] is an empty list of token ids", "input")
        bad = next((t for t in x if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"input[{i}]: token id {bad} is not in [0, {vocab})", "input")
        if len(x) > ctx:
            raise ApiError(400, f"input[{i}] has {len(x)} tokens: the model's context is {ctx}", "input")
        out.append(list(x))
    return out


def _b64(v: list[float]) -> str:
    """OpenAI's base64 encoding: the vector's little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()


def response_messages(body: Responses) -> list[dict]:
    """The request as chat messages: `instructions` as the system message, then the input."""
    out = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        if not body.input:
            raise ApiError(400, "input is empty", "input")
        return out + [{"role": "user", "content": body.input}]
    if not body.input:
        raise ApiError(400, "input is empty", "input")
    for m in body.input:
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


def text_format(body: Responses) -> Grammar | None:
    """The structured output `text.format` asks for; None for free text."""
    f = body.text.format if body.text is not None else None
    if f is None or f.type == "text":
        return None
    if f.type == "json_object":
        return Grammar("json_object")
    if f.schema_ is None:
        raise ApiError(400, "text.format json_schema needs a schema", "text.format.schema")
    return Grammar.schema(f.schema_)


def _submit(state, settings, e, body: Responses, ids: list[int]) -> Job:
    """One job on the scheduler (the chat path's), every value checked before it is queued."""
    ctx = e.context
    if len(ids) >= ctx:
        raise ApiError(400, f"the input has {len(ids)} tokens: the model's context is {ctx}", "input")
    room = ctx - len(ids)
    n = body.max_output_tokens
    if n is not None and n > room:
        msg = f"max_output_tokens {n} + the input's {len(ids)} tokens exceed the model's context of {ctx}"
        raise ApiError(400, msg, "max_output_tokens")
    p = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        max_new_tokens=n or room,
        stop_token_ids=e.tokenizer.stop_ids,
    )
    req = engine_mod.Request(ids, p, settings.method, grammar=text_format(body))
    spec = e.check(req)
    job = Job(req, spec.spec, asyncio.get_running_loop(), time.monotonic() + settings.timeout)
    try:
        state.scheduler.submit([job])
    except QueueFull as x:
        raise ApiError(503, str(x), headers={"Retry-After": "1"}) from None
    return job


class ResponseReply:
    """A job's events as a Responses API object, whole or as SSE events."""

    def __init__(self, e, body: Responses, ids: list[int], job: Job, request: Request):
        self.e, self.body, self.ids, self.job, self.request = e, body, ids, job, request
        self.id, self.msg_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text: list[str] = []
        self.generated, self.finish, self.seq = 0, None, 0

    async def events(self):
        """The job's text deltas until it ends; a client gone away cancels it."""
        while True:
            try:
                ev = await asyncio.wait_for(self.job.events.get(), timeout=0.5)
            except TimeoutError:
                if await self.request.is_disconnected():
                    self.job.cancelled.set()
                    return
                continue
            if ev[0] == "error":
                raise ApiError(ev[1], ev[2])
            if ev[0] == "done":
                self.finish = ev[1]
                return
            self.generated += len(ev[2].tokens)
            self.text.append(ev[1])
            yield ev[1]

    def message(self, status: str) -> dict:
        part = {"type": "output_text", "text": "".join(self.text), "annotations": []}
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant", "content": [part]}

    def response(self, status: str) -> dict:
        done = status != "in_progress"
        b = self.body
        n = len(self.ids)
        usage = {
            "input_tokens": n,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": self.generated,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": n + self.generated,
        }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.e.name,
            "output": [self.message(status)] if done else [],
            "output_text": "".join(self.text),
            "usage": usage if done else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "temperature": 1.0 if b.temperature is None else b.temperature,
            "top_p": 1.0 if b.top_p is None else b.top_p,
            "metadata": {},
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
            "text": {"format": {"type": "text"}},
        }

    def status(self) -> str:
        return "completed" if self.finish == "stop" else "incomplete"

    async def whole(self) -> dict:
        async for _ in self.events():
            pass
        return self.response(self.status())

    def event(self, kind: str, **fields) -> str:
        self.seq += 1
        data = {"type": kind, "sequence_number": self.seq - 1} | fields
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def sse(self):
        at = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}
        try:
            yield self.event("response.created", response=self.response("in_progress"))
            yield self.event("response.in_progress", response=self.response("in_progress"))
            item = self.message("in_progress") | {"content": []}
            yield self.event("response.output_item.added", output_index=0, item=item)
            part = {"type": "output_text", "text": "", "annotations": []}
            yield self.event("response.content_part.added", part=part, **at)
            try:
                async for delta in self.events():
                    if delta:
                        yield self.event("response.output_text.delta", delta=delta, logprobs=[], **at)
            except ApiError as x:  # after the headers went out: the error is the stream's last event
                yield self.event("error", code=str(x.status), message=x.message, param=None)
                return
            status = self.status()
            msg = self.message(status)
            yield self.event("response.output_text.done", text=msg["content"][0]["text"], logprobs=[], **at)
            yield self.event("response.content_part.done", part=msg["content"][0], **at)
            yield self.event("response.output_item.done", output_index=0, item=msg)
            # always `response.completed` (its status says "incomplete" when cut short): the SDK's helpers wait for it
            yield self.event("response.completed", response=self.response(status))
        finally:
            self.job.cancelled.set()  # the client went away mid-stream (or it ended): free the slot
