"""The results.json schema, as TypedDicts: what `skipjack bench` writes and the report reads.

The code passes plain dicts around (they come from and go to JSON); these types document the keys and
annotate the functions. Times are in seconds and sizes in bytes unless a key says MB/GB. Older files are
brought to the current keys by `upgrade`, which every reader of a results.json calls (`read_results`).
A speedup is a ratio of tokens/s over the prompts both sides completed (all of them unless interrupted).

Cold and warm (`skipjack.bench.runner`): a method with a drafter is measured with a fresh drafter on every prompt
(cold: a run's and a summary's top-level figures, the headline) and with the drafter its runs on the earlier
prompts left (warm: the `warm` key of a run and of a summary). `drafter` says which a set of figures is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NotRequired, TypedDict

SCHEMA_VERSION = 1
RENAMED = {"mean_accepted": "tokens_per_pass"}  # older key -> current key, in runs, summary and by_category


class Machine(TypedDict):
    cpu: str  # CPU model name
    cores: int  # logical cores (os.cpu_count)
    physical_cores: int  # physical cores (psutil)
    threads: int  # torch threads used
    ram_gb: float  # total memory
    platform: str  # platform.platform()
    python: str  # Python version
    torch: str  # torch version
    transformers: str | None  # transformers version
    llama_cpp_python: str | None  # llama-cpp-python version; null if not installed
    bandwidth_gbs: float  # measured copy bandwidth (read + write bytes)
    load_avg_1m: float | None  # at the start: other load on the machine skews timings
    isa: NotRequired[list[str] | None]  # SIMD instruction sets the CPU's flags name (skipjack.machine); null: unread
    isa_absent: NotRequired[list[str] | None]  # those of skipjack.machine's list the flags do not name
    date: str  # when the run started (ISO 8601)


class ModelInfo(TypedDict):
    name: str  # the model's name (a named model, or the file or folder's)
    source: str  # the path or hub id it was loaded from
    dtype: str  # the run's dtype (fp32 | bf16): the reference `plain` runs in it
    weight_bytes: int  # bytes of weights in that dtype
    params: int  # number of parameters
    context: int  # the model's context length (max positions)
    load_seconds: float  # this run's load
    load_cold_s: float | None  # GGUF -> conversion cache -> model, into an empty cache
    load_warm_s: float | None  # from the conversion cache
    weight_bytes_by_dtype: dict[str, int]  # {dtype: bytes} for the run's dtype and each `method@dtype`'s


class Settings(TypedDict):
    methods: list[str]  # method specs, `plain` first (`pld:k=8`, `ngram@bf16`, ...)
    peers: list[str]  # peer names asked for (hf, hf-pld, llamacpp, llamacpp-pld)
    max_new_tokens: int  # token budget per prompt
    temperature: float  # 0 = greedy
    seed: int  # sampling seed at temperature > 0
    repeats: int  # timed runs per prompt (median kept)


class PromptInfo(TypedDict):
    id: str  # prompt id in the suite
    category: str  # chat | summarization | rag | code | math | long (or the user's own)
    prompt_tokens: int  # prompt length after the chat template


class SkippedPrompt(PromptInfo):
    reason: str  # why it was not run (it does not fit the model's context)


class PeerInfo(TypedDict):
    status: str  # "ok" | "not installed" | "unavailable: ..." | "failed: ..."
    weight_bytes: int | None  # the peer's weights in memory (or its GGUF file); null if unknown


class Run(TypedDict):
    """One method or peer on one prompt."""

    id: str  # the prompt's id
    category: str  # the prompt's category
    method: str  # method spec or peer name
    kind: str  # "method" | "peer"
    prompt_tokens: int  # prompt length
    new_tokens: int  # tokens generated
    seconds: float  # median over the repeats, prefill included
    seconds_all: list[float]  # every repeat's seconds
    tokens_per_s: float  # new_tokens / seconds
    prefill_seconds: float | None  # median time to the first token; null for HF peers
    identical: bool | None  # output tokens == plain's on this prompt; null at T > 0
    draft_seconds: NotRequired[float | None]  # median time spent drafting (one-off searches excluded); null for peers
    tokens_per_pass: float  # tokens per decoding forward pass (`mean_accepted` in older files)
    accept_hist: dict[str, int]  # {accepted drafts per verify step: count}; {} for peers
    draft_steps: int | None  # verify steps with a draft; null for peers
    forward_passes: int  # decoding passes, prefill excluded
    finish: str  # "length" | "stop"
    tokens: list[int]  # the output tokens (first repeat)
    drafter: NotRequired[str | None]  # "cold" (a fresh drafter) | "warm" (in `warm`); null: no drafter
    warm: NotRequired[Run]  # the same prompt with the warm drafter (methods with a drafter only)


class CategorySummary(TypedDict):
    prompts: int  # prompts of this category that ran
    new_tokens: int  # their new tokens
    seconds: float  # their seconds
    tokens_per_s: float | None  # total tokens / total seconds
    speedup_vs_plain: float | None  # tokens/s ratio against plain on the same prompts
    tokens_per_pass: float | None  # new tokens per decoding forward pass (`mean_accepted` in older files)


class WarmSummary(TypedDict):
    """A method's figures with its warm drafter (learned on the run's earlier prompts), over the same prompts; the
    keys mean what they mean in `MethodSummary`."""

    drafter: str  # "warm"
    prompts: int
    new_tokens: int
    seconds: float
    tokens_per_s: float | None
    tokens_per_pass: float | None
    forward_passes: int
    speedup_vs_plain: float | None
    decode_tokens_per_s: float | None
    decode_speedup_vs_plain: float | None
    accept_hist: dict[str, int]
    draft_steps: int | None
    draft_share: float | None
    identical_fraction: float | None


class MethodSummary(TypedDict):
    """One method or peer over the whole run. Besides these keys: `speedup_vs_<peer>` for each peer that ran
    (e.g. speedup_vs_hf, speedup_vs_hf-pld). A peer that did not run has only kind, status and null numbers."""

    kind: str  # "method" | "peer"
    status: str  # "ok" for methods; a peer's PeerInfo status
    lossless: bool | None  # methods.MethodSpec.lossless; false for `method@dtype` off the run's dtype; null for peers
    prompts: int | None  # prompts it completed
    new_tokens: int | None  # total new tokens
    seconds: float | None  # total seconds
    tokens_per_s: float | None  # total tokens / total seconds
    tokens_per_pass: float | None  # new tokens per decoding forward pass (`mean_accepted` in older files)
    forward_passes: int  # decoding forward passes
    speedup_vs_plain: float | None  # tokens/s ratio against plain
    decode_tokens_per_s: float | None  # tokens after the first over seconds after the first token; null for HF
    decode_speedup_vs_plain: float | None  # the same ratio against plain's decoding phase; null for peers
    prompt_tokens_per_s: NotRequired[float | None]  # prompt tokens / seconds to the first token; null for HF
    long_prompt_tokens_per_s: NotRequired[float | None]  # the same over the long-document prompts
    accept_hist: dict[str, int]  # {accepted drafts per verify step: count}, summed over the prompts
    draft_steps: int | None  # verify steps with a draft; null for peers
    draft_share: NotRequired[float | None]  # drafting's share of the total seconds; null for peers and older files
    identical_fraction: float | None  # share of outputs equal to plain's; null at T > 0
    identical_in_dtype: float | None  # a `method@dtype`'s share of outputs equal to `plain@dtype`'s; null without
    peak_rss_mb: float | None  # process RSS peak sampled while it ran
    forward_passes_per_s: float | None  # forward passes / seconds
    weight_bytes: int | None  # the weights it ran on
    bandwidth_utilisation: float | None  # weight_bytes x forward passes/s / measured bandwidth
    by_category: dict[str, CategorySummary]  # the same numbers per prompt category
    drafter: NotRequired[str | None]  # "cold" for a method with a drafter; null for plain, strategies and peers
    warm: NotRequired[WarmSummary | None]  # the warm drafter's figures; null without a drafter


class LinearRows(TypedDict):
    """The linear layers timed by input rows (skipjack.bench.analysis.rows, skipjack.decoding.tuning)."""

    ms: dict[str, float]  # {rows: median ms of one pass over the model's packed linears, unpadded}
    ms_by_shape: dict[str, dict[str, float]]  # {"INxOUT": the same per weight shape}
    plain_ms_by_shape: dict[str, dict[str, float]]  # {"INxOUT": {rows: ms with the plain-layout weights}}
    pads: dict[str, list[int]]  # {"INxOUT": padded rows (-1: plain layout) for 0, 1, ... rows}
    pad_rows: NotRequired[int]  # older files (instead of pads): one padded row count for every layer


class CostCurve(TypedDict):
    """One context bucket of the verify-cost curves the shared cost model (skipjack.decoding.cost) learned by the end of
    the run; c(n) = seconds of a forward over n new tokens / a plain step's at typical_context."""

    context: list[int | None]  # [lo, hi]; hi null for the last bucket
    plain_steps: int  # plain steps observed in the bucket
    verify_steps: int  # verify steps observed in the bucket
    typical_context: int  # the context the curve is read at
    t1_seconds: float | None  # a plain step's seconds there
    cost: dict[str, float]  # {n: c(n)}


class Results(TypedDict):
    schema: int  # SCHEMA_VERSION
    command: str  # the exact `skipjack bench ...` command line (shell-quoted)
    complete: bool  # false when interrupted (Ctrl-C); runs and summary then hold what was measured
    machine: Machine  # the machine and versions
    linear_rows: LinearRows | dict  # {} when not tuned
    tuning: NotRequired[bool]  # whether kernel tuning ran (false with --no-tune); absent in older files
    model: ModelInfo  # the model as loaded
    suite: str  # "quick" | "sample" | "full" | "custom" (--prompts)
    prompts_file: str | None  # the --prompts path or null
    settings: Settings  # the run's arguments
    prompts: list[PromptInfo]  # the prompts that were run
    skipped: list[SkippedPrompt]  # prompts that do not fit the model's context
    peers: dict[str, PeerInfo]  # every peer asked for
    peak_rss_mb: float  # the process's peak RSS (getrusage)
    runs: list[Run]  # one per method/peer x prompt
    cost_curves: NotRequired[list[CostCurve] | None]  # null when no speculative method ran; absent in older files
    drafters: NotRequired[dict[str, dict]]  # method -> what its drafter chose by the end (skip set, exit layer...)
    summary: dict[str, MethodSummary]  # method or peer -> its summary, in settings order, then the peers


def _rename(d: dict) -> None:
    """Rename older keys in place, keeping the keys' order."""
    if any(k in d for k in RENAMED):
        items = [(RENAMED.get(k, k), v) for k, v in d.items()]
        d.clear()
        d.update(items)


def upgrade(results: dict) -> Results:
    """An older results.json brought to the current keys, in place (`mean_accepted` -> `tokens_per_pass`)."""
    for r in results.get("runs") or []:
        _rename(r)
        _rename(r.get("warm") or {})
    for s in (results.get("summary") or {}).values():
        _rename(s)
        _rename(s.get("warm") or {})
        for c in (s.get("by_category") or {}).values():
            _rename(c)
    return results


def read_results(results_dir: Path) -> Results:
    """results_dir/results.json, upgraded; a one-line SkipjackError when it cannot be read."""
    from skipjack.errors import SkipjackError

    src = Path(results_dir) / "results.json"
    try:
        return upgrade(json.loads(src.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise SkipjackError(f"cannot read {src}: {e}") from None
