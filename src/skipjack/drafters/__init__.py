"""Drafter registry: `--method NAME[:key=value,...]` in the CLI, the server and the benchmark.

`plain` means no drafter. A method spec such as `pld:k=8` passes options to the drafter's constructor
(here: a fixed draft length instead of the cost model).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from skipjack.drafters.base import Drafter, Proposal
from skipjack.drafters.ngram import NGramDrafter
from skipjack.drafters.pld import PromptLookup
from skipjack.errors import SkipjackError

REGISTRY: dict[str, Callable[..., Drafter]] = {"pld": PromptLookup, "ngram": NGramDrafter}
LOSSLESS = {"plain", "pld", "ngram"}  # methods whose output provably equals plain decoding
# Dtypes whose rounding keeps a lossless method's tokens identical to plain decoding's in practice. A verify
# pass runs several tokens through the model at once, and the CPU kernels (attention above all) round a
# pass over several tokens differently from a pass over one. In fp32 the differences are far below the gaps
# between logits: every benchmark prompt gives identical tokens (a real-model test checks them). In bf16
# they are not: see the "fp32 and bf16 in one run" section of BENCHMARKS.md.
EXACT_DTYPES = {"fp32", "fp64"}


def identical_to_plain(spec: str, dtype: str) -> bool:
    """Whether method `spec` with the model in `dtype` is expected to give plain decoding's exact tokens."""
    name, _ = parse_method(spec)
    return name == "plain" or (name in LOSSLESS and dtype in EXACT_DTYPES)


def register(name: str, factory: Callable[..., Drafter], lossless: bool) -> None:
    REGISTRY[name] = factory
    if lossless:
        LOSSLESS.add(name)


def method_names() -> list[str]:
    return ["plain", *REGISTRY]


def parse_method(spec: str) -> tuple[str, dict]:
    """'pld:k=8,max_ngram=4' -> ('pld', {'k': 8, 'max_ngram': 4})."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name != "plain" and name not in REGISTRY:
        raise SkipjackError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}")
    opts: dict = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise SkipjackError(f"method option {item!r} must look like key=value")
        opts[key.strip()] = _value(val.strip())
    if name == "plain" and opts:
        raise SkipjackError("method 'plain' takes no options")
    return name, opts


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def make_drafter(spec: str) -> Drafter | None:
    """A fresh drafter for a method spec, or None for plain decoding."""
    name, opts = parse_method(spec)
    if name == "plain":
        return None
    factory = REGISTRY[name]
    params = inspect.signature(factory).parameters
    unknown = set(opts) - set(params)
    if unknown:
        raise SkipjackError(
            f"{name}: unknown option(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(params))}"
        )
    return factory(**{key: _typed(name, key, val, params[key].default) for key, val in opts.items()})


def _typed(method: str, key: str, val, default):
    """An option's value as its default's type: `k=1.5` is not a draft length, `path=1` is a file name."""
    if isinstance(default, bool) or default is inspect.Parameter.empty:
        return val
    if isinstance(default, str):
        return str(val)
    if isinstance(default, float) and isinstance(val, int):
        return float(val)
    if not isinstance(val, type(default)):
        kind = "an integer" if isinstance(default, int) else "a number"
        raise SkipjackError(f"{method}: option {key} must be {kind} (got {val!r})")
    return val


__all__ = [
    "Drafter",
    "Proposal",
    "REGISTRY",
    "LOSSLESS",
    "EXACT_DTYPES",
    "identical_to_plain",
    "make_drafter",
    "method_names",
    "parse_method",
    "register",
]
