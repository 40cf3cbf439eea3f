"""`skipjack serve`: an OpenAI-compatible HTTP server on FastAPI + uvicorn (llama-server's and vLLM's API).

Endpoints: /v1/chat/completions, /v1/completions (SSE streaming ending in `data: [DONE]`, usage in every
response, `timings` with draft counts and the method used), /v1/models, /health (503 while the model loads),
/metrics (Prometheus, also under vLLM's `vllm:` names), /tokenize, /detokenize, and from `extra`
/tokenizer_info, /v1/embeddings, /v1/responses. `null` in an optional field is its default. /v1/completions
takes text, token ids, or a list of up to `protocol.MAX_PROMPTS` (64) of either (n choices each, in order: n
independent streams, or with the method `superposed` the n best drafts of one run, n <= its k), and
`echo` (with `logprobs`: the prompt's, the first null; `max_tokens: 0` scores only). Errors are OpenAI-style
JSON `{"error": {...}}` with one line of message and a status by kind (`skipjack.errors`): bad JSON, types or
values (400), a wrong or missing API key (401), an unknown `model` (404, code "model_not_found"), a body over
the limit (413), a full queue, a server shutting down or a resource that is not available now, such as a held
lock or a full disk (503 + Retry-After), a fault such as non-finite logits or a bug (500).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from skipjack import engine as engine_mod
from skipjack.decoding.prefix import PrefixCache
from skipjack.errors import SkipjackError
from skipjack.methods import MethodSpec
from skipjack.server import protocol as P
from skipjack.server import tools
from skipjack.server.errors import ApiError, error, failure
from skipjack.server.extra import register as register_extra
from skipjack.server.metrics import Metrics
from skipjack.server.reply import Reply
from skipjack.server.scheduler import Job, QueueFull, Scheduler

MAX_BODY = 4 << 20  # bytes


@dataclass
class Settings:
    model: str | None = None
    dtype: str = "auto"
    method: str = "auto"
    api_key: str | None = None
    max_queue: int = 64
    max_batch: int = 8  # sequences decoded together at most (continuous batching)
    timeout: float = 600.0  # seconds per request
    tune: bool = True
    prefill_chunk: int = 128  # a joining prompt runs this many tokens between the batch's steps (0: whole)
    prefix_cache_mb: int = 512  # finished requests' caches kept for later prompts with the same prefix (0: off)


def create_app(settings: Settings, engine=None, scheduler=None, metrics=None) -> FastAPI:
    """The app; `engine` given (tests) or loaded in a thread after start (/health says 503 until then).
    `scheduler` and `metrics` given (`skipjack.deploy`'s ingress): `engine` is a front that tokenizes and checks,
    and the scheduler sends each job to a replica that owns an engine; the prefix cache lives there."""
    app = FastAPI(title="skipjack", version="1")
    state = app.state
    state.settings, state.metrics = settings, metrics or Metrics()
    state.engine = state.scheduler = state.load_error = state.prefix = None  # until the model has loaded

    def ready(e) -> None:
        state.engine, (state.scheduler, state.prefix) = e, local(settings, e, state.metrics)

    if scheduler is not None:
        state.engine, state.scheduler = engine, scheduler
    elif engine is not None:
        ready(engine)
    else:

        def load() -> None:
            try:
                ready(engine_mod.Engine.load(settings.model, settings.dtype, tune=settings.tune))
            except SkipjackError as e:
                state.load_error = str(e)

        threading.Thread(target=load, name="skipjack-load", daemon=True).start()

    _guards(app, settings)
    _routes(app, settings)
    return app


def local(settings: Settings, e, metrics: Metrics) -> tuple[Scheduler, PrefixCache | None]:
    """What decodes requests on an engine in this process: its default method prepared before the first request
    (others on first use), a scheduler over its continuous batch, and the prefix cache (None when off)."""
    e.method(settings.method)
    scheduler = Scheduler(e, metrics, settings.max_queue, settings.max_batch, settings.prefill_chunk)
    return scheduler, PrefixCache(settings.prefix_cache_mb << 20) if settings.prefix_cache_mb else None


def _guards(app: FastAPI, settings: Settings) -> None:
    """The body size limit, the API key, and every error as an OpenAI-style JSON body."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return error(413, f"the request body is over the limit of {MAX_BODY} bytes")
        key = settings.api_key
        if key and request.url.path not in ("/health", "/metrics"):
            if request.headers.get("authorization", "") != f"Bearer {key}":
                return error(401, "a wrong or missing API key (send Authorization: Bearer KEY)")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return error(400, "the body is not valid JSON (or not UTF-8)")
        return error(400, f"{loc or 'body'}: {first.get('msg')}", loc or None)

    @app.exception_handler(ApiError)
    async def apierror(request: Request, exc: ApiError):
        return error(exc.status, exc.message, exc.param, exc.headers, exc.code)

    @app.exception_handler(SkipjackError)
    async def bad_value(request: Request, exc: SkipjackError):  # 400, or 503 for an `Unavailable`
        return failure(exc)

    @app.exception_handler(HTTPException)
    async def httperror(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # a `Fault` or a bug: 500
        return failure(exc)


def _routes(app: FastAPI, settings: Settings) -> None:
    state = app.state

    def need_engine():
        if state.engine is None:
            why = state.load_error or "the model is loading"
            raise ApiError(503, why, headers={"Retry-After": "5"})
        return state.engine

    @app.get("/health")
    async def health():
        if state.engine is None:
            return error(503, state.load_error or "the model is loading", headers={"Retry-After": "5"})
        return {"status": "ok", "load_seconds": round(state.engine.load_seconds, 3), "method": settings.method}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(await state.metrics.render(state.engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        e = need_engine()
        card = {
            "id": e.name,
            "object": "model",
            "created": 0,
            "owned_by": "skipjack",
            "max_model_len": e.context,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(body: P.Tokenize):
        e = need_engine()
        served(settings, e, body.model)
        text = body.content if body.content is not None else body.prompt
        if text is None:
            raise ApiError(400, "send the text as content (or prompt)", "content")
        return tokens(e, body, text)

    @app.post("/detokenize")
    async def detokenize(body: P.Detokenize):
        e = need_engine()
        served(settings, e, body.model)
        vocab = e.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is not in [0, {vocab})", "tokens")
        text = e.tokenizer.decode(body.tokens)
        return {"content": text, "prompt": text}  # llama-server's name, vLLM's

    register_extra(app, settings, need_engine)  # /v1/embeddings, /v1/responses
    _generation(app, settings, need_engine)
    _unversioned(app)


UNVERSIONED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")


def _unversioned(app: FastAPI) -> None:
    """llama-server answers these without the /v1 prefix too: the same handlers, left out of the schema."""
    for route in list(app.routes):
        if getattr(route, "path", None) in UNVERSIONED:
            app.add_api_route(route.path[3:], route.endpoint, methods=list(route.methods), include_in_schema=False)


def _generation(app: FastAPI, settings: Settings, need_engine) -> None:
    state = app.state

    @app.post("/v1/completions")
    async def completions(body: P.Completion, request: Request):
        e = need_engine()
        served(settings, e, body.model)
        prompts = P.prompts(body, e.tokenizer, e.vocab_size)
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens 0 generates nothing: it needs echo (scoring the prompt)", "max_tokens")
        for _, ids in prompts:
            fits(e, ids, body.max_tokens, "prompt")
        echo = await echoes(e, prompts, body.logprobs) if body.echo else None
        ids = [ids for _, ids in prompts]
        return await _serve(request, body, e, ids, body.logprobs, chat=False, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat(body: P.Chat, request: Request):
        e = need_engine()
        served(settings, e, body.model)
        if not e.tokenizer.chat_template:
            raise ApiError(400, f"model {e.name!r} has no chat template; use /v1/completions")
        ids = chat_ids(e, body)
        top = (body.top_logprobs or 0) if body.logprobs else None
        body.max_tokens = body.max_completion_tokens or body.max_tokens
        fits(e, ids, body.max_tokens, "messages")
        return await _serve(request, body, e, [ids], top, chat=True)

    async def _serve(request: Request, body: P.Sampling, e, prompts: list[list[int]], top, chat: bool, echo=None):
        """Queue a request's jobs (`_jobs`) and answer, whole or streamed."""
        spec, jobs = _jobs(state, settings, body, e, prompts, top, chat)
        try:
            state.scheduler.submit([j for j in jobs if j is not None and (j.group is None or j is j.group[0])])
        except QueueFull as x:
            raise ApiError(503, str(x), headers={"Retry-After": "1"}) from None
        reply = Reply(e, body, prompts, spec, chat, top, echo)
        if body.stream:
            return StreamingResponse(reply.sse(jobs, request), media_type="text/event-stream")
        try:
            return await reply.whole(jobs, request)
        finally:
            for job in jobs:
                if job is not None:
                    job.cancelled.set()  # a no-op for finished jobs; frees the rest when the client left


def _jobs(state, settings: Settings, body: P.Sampling, e, prompts: list[list[int]], top, chat: bool):
    """n jobs per prompt (None for max_tokens 0: the echo alone), every value checked before any is queued:
    n independent streams, or with `superposed` one run whose n best drafts are the n choices (n <= its k;
    the jobs are one group, the first queued): (the method's spec, the jobs)."""
    ctx = e.context
    spec, n_max, p_min = P.method(body, settings.method)
    grammar = constraint(body, e, chat)
    stop = () if body.stop is None else ((body.stop,) if isinstance(body.stop, str) else tuple(body.stop))
    loop, deadline = asyncio.get_running_loop(), time.monotonic() + settings.timeout
    multi = MethodSpec.parse(spec).superposed_class is not None
    jobs = []
    for ids in prompts:
        for i in range(1 if multi and body.max_tokens != 0 else body.n):
            if body.max_tokens == 0:
                jobs.append(None)
                continue
            seed = None if body.seed is None else body.seed + i
            p = P.params(body, body.max_tokens or ctx - len(ids), seed, e.tokenizer.stop_ids, top)
            req = engine_mod.Request(ids, p, spec, stop, pooled(state, body), n_max, p_min, body.kv, grammar)
            req.n = body.n if multi else 1
            e.check(req)
            group = [Job(req, spec, loop, deadline) for _ in range(req.n)]
            for job in group:
                job.group = group if multi else None
            jobs += group
    return spec, jobs


async def echoes(e, prompts: list[tuple[str | None, list[int]]], top: int | None) -> list[tuple]:
    """What `echo` prepends to each prompt's choices: (its text, its ids, with logprobs its tokens' logprobs: one
    forward pass each, off the event loop)."""
    out = []
    for text, ids in prompts:
        lps = None if top is None else await asyncio.to_thread(e.prompt_logprobs, ids, top)
        out.append((e.tokenizer.decode(ids) if text is None else text, ids, lps))
    return out


def tokens(e, body: P.Tokenize, text: str) -> dict:
    """/tokenize's answer: the ids (llama-server's `with_pieces`: each {id, piece}), their count, the context, and
    vLLM's `token_strs` when asked (a piece is the token decoded alone)."""
    special = next((x for x in (body.add_special, body.add_special_tokens) if x is not None), True)
    ids = e.tokenizer.encode(text, add_special_tokens=special)
    strs = [e.tokenizer.decode([t]) for t in ids] if body.with_pieces or body.return_token_strs else None
    out = {
        "tokens": [{"id": t, "piece": s} for t, s in zip(ids, strs)] if body.with_pieces else ids,
        "count": len(ids),
        "max_model_len": e.context,
    }
    return out | ({"token_strs": strs} if body.return_token_strs else {})


def pooled(state, body: P.Sampling):
    """A request's start from the prefix cache (`decoding.prefix`), when there is one and it has no KV policy."""
    return state.prefix.session() if state.prefix is not None and body.kv is None else None


def chat_ids(e, body: P.Chat) -> list[int]:
    """A chat's prompt: its messages (and its tools) through the model's template."""
    msgs, fs = tools.prepare(body, P.messages(body), e.tokenizer.chat_template)
    return e.tokenizer.prompt_ids(msgs, tools=fs)


def constraint(body: P.Sampling, e, chat: bool):
    """A request's grammar (`decoding.constraint.Grammar`): its response format, or the tool-call format under
    tool_choice required or named (`tools`); None for free text."""
    grammar, calls = P.grammar(body), tools.grammar(body, e.tokenizer) if chat else None
    if calls is not None and grammar is not None:
        raise ApiError(400, "tool_choice required (or named) and a response format: send one")
    return grammar or calls


def served(settings: Settings, e, name: str | None) -> None:
    """A request's `model`: the served model's id (/v1/models), the --model spec it was loaded from or that
    spec's last path part; None (not sent) is the served model. Any other name: 404 model_not_found."""
    if name is None:
        return
    spec = settings.model
    names = {e.name, str(e.source)} | ({spec, spec.rstrip("/").rsplit("/", 1)[-1]} if spec else set())
    if name not in names:
        raise ApiError(
            404, f"the model {name!r} does not exist (this server serves {e.name!r})", "model", code="model_not_found"
        )


def fits(e, ids: list[int], max_tokens: int | None, param: str) -> None:
    """A prompt and its max_tokens within the model's context (max_tokens 0, scoring: the prompt may fill it)."""
    ctx = e.context
    if len(ids) > ctx or (len(ids) == ctx and max_tokens != 0):
        raise ApiError(400, f"the prompt has {len(ids)} tokens: the model's context is {ctx}", param)
    if max_tokens is not None and max_tokens > ctx - len(ids):
        raise ApiError(
            400,
            f"max_tokens {max_tokens} + the prompt's {len(ids)} tokens exceed the model's context of {ctx}",
            "max_tokens",
        )
