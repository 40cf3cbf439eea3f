"""The OpenAI-compatible request bodies (pydantic, strict types: "5" is not a number) and what turns them into
engine requests. Values are range-checked by `skipjack.validate` through `SamplingParams` and the tokenizer,
the same checks as the CLI's."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from skipjack import validate
from skipjack.decoding.constraint import Grammar
from skipjack.decoding.sampling import SamplingParams
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_N  # choices per request

MAX_PROMPTS = 64  # prompts in one /v1/completions request (a list of strings or of token-id lists)


class Strict(BaseModel):
    """A request body: strict types, unknown fields ignored, and `null` in a field meaning its default (OpenAI's
    schema: the official client sends null for a caller's None)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(Strict):
    include_usage: bool = False


class Speculative(Strict):
    """llama-server's per-request speculative settings: the method ("off" = plain), the most draft tokens per
    step, the least score a draft token needs."""

    method: str | None = None
    n_max: int | None = Field(default=None, ge=0, le=64)
    p_min: float = Field(default=0.0, ge=0.0, le=1.0)


class JsonSchemaFormat(Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    """OpenAI's `response_format`: free text, any JSON object, or JSON obeying a schema; llama-server's
    extension: `{"type": "json_object", "schema": ...}` constrains to that schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict | bool | None = Field(default=None, alias="schema")


class Sampling(Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)
    # OpenAI's logit_bias (token id, a string in JSON -> bias in [-100, 100]) and penalties; vLLM's ignore_eos and
    # min_tokens. Ranges and the vocabulary are checked by SamplingParams and the engine (one-line errors).
    logit_bias: dict[int | str, float] | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = Field(default=1, ge=1, le=MAX_N)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculative: Speculative | None = None
    kv: str | None = None  # skipjack's extension: the KV cache policy (`--kv`), e.g. "snapkv:budget=0.25"
    # structured output: OpenAI's response_format; llama-server's json_schema and grammar (GBNF)
    response_format: ResponseFormat | None = None
    json_schema: dict | bool | None = None
    grammar: str | None = None


class Completion(Sampling):
    # text, token ids, a list of texts or a list of token-id lists (at most MAX_PROMPTS; checked in `prompts`)
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for completions; 0: echo only (scoring)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class CallFunction(Strict):
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=1 << 20)


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CallFunction


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None  # null in an assistant message that calls tools
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: str | None = None


class Function(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema (checked when a grammar is made from it)
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: Function


class ChoiceName(Strict):
    name: str


class NamedChoice(Strict):
    type: Literal["function"]
    function: ChoiceName


class Chat(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool = True


class Tokenize(Strict):
    """llama-server's fields (content, add_special, with_pieces) and vLLM's (prompt, add_special_tokens,
    return_token_strs)."""

    content: str | None = None
    prompt: str | None = None
    add_special: bool | None = None
    add_special_tokens: bool | None = None
    with_pieces: bool = False
    return_token_strs: bool = False
    model: str | None = None


class Detokenize(Strict):
    tokens: list[int]
    model: str | None = None


def messages(body: Chat) -> list[dict]:
    """The chat's messages as the tokenizer takes them ("developer" is the system role; text parts joined)."""
    out = []
    for m in body.messages:
        if m.content is None and not m.tool_calls:
            raise SkipjackError(f"a {m.role} message needs content (null only with tool_calls)")
        text = m.content if m.content is None or isinstance(m.content, str) else "".join(p.text for p in m.content)
        msg = {"role": "system" if m.role == "developer" else m.role, "content": text}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def params(body: Sampling, max_new: int, seed: int | None, stop_ids, logprobs: int | None) -> SamplingParams:
    bias = None  # OpenAI's logit_bias, its keys (strings in JSON) as token ids
    if body.logit_bias is not None:
        bias = {}
        for k, v in body.logit_bias.items():
            if isinstance(k, str) and not (k.isascii() and k.isdigit() and len(k) <= 18):
                raise SkipjackError(f"logit_bias keys must be token ids (got {k[:40]!r})")
            bias[int(k)] = v
    return SamplingParams(
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        seed=seed,
        max_new_tokens=max_new,
        stop_token_ids=stop_ids,
        logprobs=logprobs,
        logit_bias=bias,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
    )


def method(body: Sampling, default: str) -> tuple[str, int | None, float]:
    """(method spec, draft cap, score floor) for a request: its `speculative` settings over the server's."""
    spec = body.speculative
    if spec is None:
        return default, None, 0.0
    name = spec.method or default
    if name == "off":
        name = "plain"
    if not name.strip():
        raise SkipjackError("speculative.method is empty")
    return name, spec.n_max, spec.p_min


def prompts(body: Completion, tokenizer, vocab: int) -> list[tuple[str | None, list[int]]]:
    """A completion request's prompts, each (its text if given as text, its token ids): one text, one id list,
    or a list of either, in order."""
    p = body.prompt
    items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if len(items) > MAX_PROMPTS:
        raise SkipjackError(f"prompt: {len(items)} prompts in one request; at most {MAX_PROMPTS}")
    out = []
    for i, x in enumerate(items):
        if isinstance(x, str):
            out.append((x, tokenizer.prompt_ids(x, raw=True)))
        else:
            out.append((None, validate.token_ids(f"prompt[{i}]" if len(items) > 1 else "prompt", x, vocab)))
    return out


def grammar(body: Sampling) -> Grammar | None:
    """A request's structured output (`decoding.constraint.Grammar`), from one of `response_format`,
    `json_schema` or `grammar`; None for free text."""
    rf = body.response_format
    rf = None if rf is None or rf.type == "text" else rf
    sent = [x for x in (rf, body.json_schema, body.grammar) if x is not None]
    if len(sent) > 1:
        raise SkipjackError("send one of response_format, json_schema and grammar")
    if rf is not None and rf.type == "json_object":
        return Grammar("json_object") if rf.schema_ is None else Grammar.schema(rf.schema_)
    if rf is not None:
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise SkipjackError("response_format json_schema needs json_schema.schema")
        return Grammar.schema(rf.json_schema.schema_)
    if body.json_schema is not None:
        return Grammar.schema(body.json_schema)
    return None if body.grammar is None else Grammar("gbnf", body.grammar)
