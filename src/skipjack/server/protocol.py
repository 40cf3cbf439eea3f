"""The OpenAI-compatible request bodies (pydantic, strict types: "5" is not a number) and what turns them into
engine requests. Values are range-checked by `skipjack.validate` through `SamplingParams` and the tokenizer,
the same checks as the CLI's."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from skipjack.decoding.sampling import SamplingParams
from skipjack.errors import SkipjackError

MAX_N = 16  # choices per request


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False


class Speculative(Strict):
    """llama-server's per-request speculative settings: the method ("off" = plain), the most draft tokens per
    step, the least score a draft token needs."""

    method: str | None = None
    n_max: int | None = Field(default=None, ge=0, le=64)
    p_min: float = Field(default=0.0, ge=0.0, le=1.0)


class Sampling(Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculative: Speculative | None = None
    kv: str | None = None  # skipjack's extension: the KV cache policy (`--kv`), e.g. "snapkv:budget=0.25"


class Completion(Sampling):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class Chat(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class Tokenize(Strict):
    content: str | None = None
    prompt: str | None = None
    add_special: bool = True


class Detokenize(Strict):
    tokens: list[int]


def messages(body: Chat) -> list[dict]:
    """The chat's messages as the tokenizer takes them ("developer" is the system role; text parts joined)."""
    out = []
    for m in body.messages:
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


def params(body: Sampling, max_new: int, seed: int | None, stop_ids, logprobs: int | None) -> SamplingParams:
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
