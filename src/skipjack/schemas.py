"""Every file skipjack reads, checked at the boundary: its shape as a pydantic model (or any type pydantic
validates), and three ways in.

- `parse(what, data, model)`: data already read (a config dict from a GGUF, a row of a JSONL file);
- `read_json(what, path, model)`: a file the user points at (a model folder's config, an n-gram table, a prompt
  cache's metadata): a one-line `SchemaError` names the file and its first problem;
- `read_cache(path, model)`: a measurement cache under the home folder: None when missing, unreadable or
  malformed, so that it is measured again (a damaged cache only costs time, never a traceback).

A reader never indexes into `json.loads(...)` itself (tests/test_schemas.py checks the sources for it): an
unexpected shape then fails here, with the file's name, instead of as a KeyError, TypeError or
ZeroDivisionError deep in the code that uses it.

The shapes of the files are below, in one place. A check that needs more than the file stays with its reader (a
measurement cache's shapes against the model's, a prompt cache's layers against the model's, a config's sizes
once its family has completed it).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Json,
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from skipjack.errors import SkipjackError, Unavailable, one_line
from skipjack.store import reason

T = TypeVar("T")

JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
              float: "a number", type(None): "null"}  # fmt: skip


class SchemaError(SkipjackError):
    """A file (or data) that does not have the shape its reader expects. `problem` is the first problem alone
    (where in the data, what is wrong), for a caller that phrases the message its own way."""

    def __init__(self, message: str, problem: str):
        super().__init__(message)
        self.problem = problem


@functools.cache
def _adapter(model) -> TypeAdapter:
    return TypeAdapter(model)


def json_type(value: object) -> str:
    """What a JSON value is, in words ("a list", "a string")."""
    return JSON_TYPES.get(type(value), type(value).__name__)


def first_problem(e: ValidationError) -> str:
    """The first error of a validation, as one short phrase: "rows.3: ...". A check of our own (a validator's
    ValueError) is phrased whole by the validator, which names what it checks."""
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in err["loc"])
    kind, msg = err["type"], err["msg"]
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        msg = f"expected a JSON object (got {json_type(err['input'])})"
    elif kind == "missing":
        msg = "is missing"
    else:
        msg = msg[:1].lower() + msg[1:]
        if not isinstance(err.get("input"), dict | list):
            msg += f" (got {err.get('input')!r:.40})"
    if not loc:
        return msg
    return f"{loc} {msg}" if kind == "missing" else f"{loc}: {msg}"


def parse(what: str, data: object, model: type[T]) -> T:
    """`data` checked (and converted) as `model`, or a one-line `SchemaError`: "<what>: <first problem>"."""
    try:
        return _adapter(model).validate_python(data)
    except ValidationError as e:
        problem = first_problem(e)
        raise SchemaError(one_line(f"{what}: {problem}"), problem) from None


def read_json(what: str, path: Path, model: type[T]) -> T:
    """The JSON file `path` checked as `model`; a one-line `SkipjackError` naming the file when it cannot be read,
    and a `SchemaError` ("<what> <path>: <first problem>") when it is not JSON or does not have the shape."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise Unavailable(f"cannot read {what} {path}: {reason(e)}") from None
    except UnicodeDecodeError:
        raise SchemaError(f"{what} {path}: not UTF-8 text", "not UTF-8 text") from None
    return loads(f"{what} {path}", text, model)


def read_cache(path: Path, model: type[T]) -> T | None:
    """A cache file checked as `model`, or None when it is missing, unreadable, not JSON or of another shape
    (then the caller measures again and rewrites it)."""
    try:
        return read_json("cache", path, model)
    except SkipjackError:
        return None


def loads(what: str, text: str, model: type[T]) -> T:
    """JSON text (a file's content or line, a metadata field) checked as `model`; a one-line `SchemaError`
    ("<what>: <first problem>") otherwise."""
    try:
        data = json.loads(text)
    except ValueError as e:
        problem = f"not valid JSON ({e})"
        raise SchemaError(one_line(f"{what}: {problem}"), problem) from None
    return parse(what, data, model)


# ---- the shapes of the files skipjack reads ----

Count = Annotated[int, Strict(), Field(ge=0)]
Positive = Annotated[int, Strict(), Field(gt=0)]
NonNegative = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
Flag = Annotated[bool, Strict()]
TokenIds = Annotated[int, Strict(), Field(ge=0)] | list[Annotated[int, Strict(), Field(ge=0)]]
MODEL_SIZES = "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads"


class Open(BaseModel):
    """A JSON object whose keys other than the declared ones pass through unchecked (a file written by
    another tool, or by a later skipjack)."""

    model_config = ConfigDict(extra="allow")


class Rope(Open):
    rope_type: str | None = None
    type: str | None = None
    factor: PositiveFloat | None = None
    rope_theta: PositiveFloat | None = None


class HFConfig(Open):
    """A model's config.json (HF), as far as skipjack reads it: the sizes, RoPE, the attention layout and the
    special token ids. The family's `normalise` completes it; `models.normalise_config` checks the result."""

    model_type: str | None = None
    text_config: HFConfig | None = None  # a multimodal Gemma 3's text part
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: Positive | None = None
    max_position_embeddings: Positive | None = None
    rms_norm_eps: PositiveFloat | None = None
    rope_theta: PositiveFloat | None = None
    rope_local_base_freq: PositiveFloat | None = None
    rope_scaling: Rope | None = None
    rope_parameters: dict | None = None  # a `Rope`, or one per layer type (Gemma 3): checked below
    layer_types: list[str] | None = None
    sliding_window: Positive | None = None
    use_sliding_window: Flag | None = None
    max_window_layers: Count | None = None
    sliding_window_pattern: Positive | None = None
    tie_word_embeddings: Flag | None = None
    attention_bias: Flag | None = None
    query_pre_attn_scalar: PositiveFloat | None = None
    final_logit_softcapping: PositiveFloat | None = None
    bos_token_id: TokenIds | None = None
    eos_token_id: TokenIds | None = None

    @field_validator("rope_parameters", mode="after")
    @classmethod
    def _rope(cls, v):
        kinds = {"full_attention", "sliding_attention"}
        per_kind = v is not None and v and set(v) <= kinds
        for kind, rope in (v or {}).items() if per_kind else [("", v)]:
            try:
                _adapter(Rope | None).validate_python(rope)
            except ValidationError as e:
                raise ValueError(f"rope_parameters{'.' * bool(kind)}{kind}: {first_problem(e)}") from None
        return v

    @field_validator(*MODEL_SIZES.split(), mode="before")
    @classmethod
    def _size(cls, v, info):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{info.field_name} must be a positive integer (got {v!r})")
        return v


class LwqMeta(Open):
    high: list[Count]
    bits: NonNegative


class EntryMeta(Open):
    """A converted model's `skipjack.json` (`skipjack.loading.load`), sealed by `skipjack.integrity`."""

    format: int | None = None
    source: str | None = None
    weights: str = "fp32"
    chat_template: str | None = None
    blocks: dict | None = None
    lwq: dict | None = None  # a layer-wise quantization artefact's section (`LwqMeta`, checked where it is used)


class TokenizerSettings(Open):
    """The tokenizer config a GGUF's metadata gives (transformers' reading of it)."""

    chat_template: str | None = None


class RowsCache(BaseModel):
    """`$SKIPJACK_HOME/rows/*.json` (`skipjack.decoding.tuning`): per weight shape, the row padding chosen and the
    times it was chosen from."""

    pads: dict[str, list[Annotated[int, Strict()]]]
    ms: dict[str, dict[int, NonNegative]]
    plain_ms: dict[str, dict[int, NonNegative]]


class SkipSet(BaseModel):
    """`$SKIPJACK_HOME/swift/*.json` (`drafters.swift`): the skip set found for a model and how well it matched."""

    skip: list[tuple[Literal["attn", "ffn"], Annotated[int, Strict(), Field(ge=0)]]]
    match: float = Field(0.0, ge=0.0, le=1.0)


class CostPrior(BaseModel):
    """`$SKIPJACK_HOME/costs/*.json`: the verify-cost prior (`CostModel.prior_json`)."""

    widths: list[Positive] = Field(min_length=1)
    rel: list[NonNegative]
    slope: list[NonNegative]
    beta: NonNegative


class LlamacppBuild(Open):
    """`$SKIPJACK_HOME/llamacpp-build.json`: the llama.cpp build that tools/build-llamacpp.sh made and tested."""

    build: str
    cmake_args: str


TokenCounts = dict[int, Count]  # `$SKIPJACK_HOME/vocab/*.json`: {token id: count} over local text


MAX_ID = 1 << 31  # token ids in a persisted n-gram table
MAX_CONTEXT = 5  # tokens of context in a persisted n-gram row


def ngram_row(i: int, row) -> tuple[tuple[int, ...], dict[int, float]]:
    """One persisted n-gram row, checked: [context ids (1-5 of them), {next id: count >= 0}], with at least
    one count above zero (a context seen zero times has no next-token distribution)."""
    try:
        key, kids = row
        ids = [*key, *(int(t) for t in kids)]
        counts = {int(t): c for t, c in kids.items()}
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"row {i}: not [context ids, {{next id: count}}] ({e})") from None
    if not 1 <= len(key) <= MAX_CONTEXT or not all(type(t) is int and 0 <= t < MAX_ID for t in ids):
        raise ValueError(f"row {i}: token ids must be integers in [0, 2^31) and contexts 1-5 tokens long")
    if not all(type(c) in (int, float) and math.isfinite(c) and c >= 0 for c in counts.values()):
        raise ValueError(f"row {i}: counts must be finite numbers >= 0")
    if not any(c > 0 for c in counts.values()):
        raise ValueError(f"row {i}: every count is zero (a context needs a count above zero)")
    return tuple(key), {t: float(c) for t, c in counts.items()}


class NGramTableFile(BaseModel):
    """An n-gram table (`ngram:path=FILE`, `skipjack.drafters.ngram_table`): {"format": 1, "rows": [row, ...]}."""

    format: Literal[1]
    rows: list[tuple[tuple[int, ...], dict[int, float]]]

    @model_validator(mode="before")
    @classmethod
    def _rows(cls, d):
        if not isinstance(d, dict) or d.get("format") != 1 or not isinstance(d.get("rows"), list):
            raise ValueError("not a skipjack n-gram table")
        return {"format": 1, "rows": [ngram_row(i, r) for i, r in enumerate(d["rows"])]}


class PromptCacheMeta(Open):
    """A prompt cache file's safetensors metadata (`skipjack.prompt_file`), every value a string."""

    format: str
    version: str
    fingerprint: str | None = None
    tokens: Json[list[Count]]
    first: Json[list[Count]]
    capacity: Annotated[int, Field(gt=0)]  # a decimal string
    digest: str | None = None


ROLES = ("system", "user", "assistant")


class PromptLine(Open):
    """One line of a prompt suite or a `--prompts` file (`skipjack.prompts`): {"id", "category", "messages":
    [{"role", "content"}, ...], "source"}; `id` and `category` may be left out of a user's file."""

    id: object = None  # a non-empty string or an integer (checked by the reader, which knows the defaults)
    category: object = None
    messages: list[dict]
    source: str = ""

    @model_validator(mode="before")
    @classmethod
    def _check(cls, d):
        if not isinstance(d, dict):
            raise ValueError('expected a JSON object like {"id", "category", "messages"}')
        msgs = d.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError('"messages" must be a non-empty list')
        for m in msgs:
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError("each message needs a role (system/user/assistant) and a string content")
        if msgs[-1]["role"] != "user":
            raise ValueError("the last message must be from the user")
        if not any(m["content"].strip() for m in msgs):
            raise ValueError("the prompt is empty")
        return d | {"source": str(d.get("source", ""))}


class AiperfMetric(Open):
    """One metric of aiperf's exports: a unit and statistics (avg, p50, p95, ...), or one record's value."""

    unit: str | None = None
    avg: float | None = None
    p50: float | None = None
    p95: float | None = None
    value: float | None = None


class FactualRun(Open):
    """`bench.factual`'s factual.json, read back to put a quiet machine's speed figures into an accuracy run."""

    model: str
    rows: dict[str, dict]


class AiperfSummary(Open):
    """aiperf's `profile_export_aiperf.json` (`bench.loadgen`): its metrics by name (other keys are kept)."""

    def metric(self, name: str) -> AiperfMetric:
        raw = (self.model_extra or {}).get(name)
        return parse(f"aiperf metric {name}", raw, AiperfMetric) if isinstance(raw, dict) else AiperfMetric()


class AiperfRecordMeta(Open):
    turn_index: Count = 0
    benchmark_phase: str = "profiling"


class AiperfRecord(Open):
    """One line of aiperf's `profile_export.jsonl`: a request's metadata and metrics."""

    metadata: AiperfRecordMeta
    metrics: dict[str, AiperfMetric] = {}


class DeployArgs(BaseModel):
    """The `args` of the Ray Serve application `skipjack.deploy:app` (`serve run skipjack.deploy:app k=v ...`, or a
    Serve config file's `args:`): `skipjack serve`'s settings by their long names (`max_batch` for --max-batch)
    and the fleet's. Values from the command line are text, converted here; ranges are checked by `deploy`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    dtype: str = "auto"
    method: str = "auto"
    api_key: str | None = None
    max_queue: int = 64
    max_batch: int = 8
    timeout: float = 600.0
    tune: bool = True
    prefill_chunk: int = 128
    prefix_cache_mb: int = 512
    replicas: int = 1
    max_replicas: int | None = None  # autoscaling between `replicas` and this many
    threads: int = 1  # per replica
    routing: Literal["prefix", "random"] = "prefix"
    share: float = 60.0  # seconds between n-gram table merges (0: each replica keeps its own)
    drain: float = 30.0  # seconds a stopping replica waits for its running requests
