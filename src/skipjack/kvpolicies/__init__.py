"""Cache policy registry: `--kv POLICY[:key=value,...]` in the CLI, the server, the benchmark and `skipjack eval`.

`full` keeps every key (the default). `bf16` / `int8` store keys and values in a smaller dtype. The evicting
policies keep `budget` (a fraction of the context) per layer: `streaming` (StreamingLLM), `h2o`, `snapkv`,
`pyramidkv`, `cake`, `actqkv`; `tidal` (TidalDecode) keeps every key but attends to a selected few. All but
`full` are lossy and labelled so. A policy object serves one request's cache (it keeps no state of its own: a cache's
state is in `KVCache.state`). Every policy is a `cache.CachePolicy`: its hooks and the capabilities the plan's
rules read (`lossless`, `plain_only`, `holds_every_key`) are declared there, with their defaults.
"""

from __future__ import annotations

import inspect

from skipjack import validate
from skipjack.cache import CachePolicy, FullKV
from skipjack.errors import SkipjackError
from skipjack.kvpolicies.actqkv import ActQKV
from skipjack.kvpolicies.base import EvictingLayerKV, EvictionPolicy
from skipjack.kvpolicies.cake import CAKE
from skipjack.kvpolicies.h2o import H2O
from skipjack.kvpolicies.pyramidkv import PyramidKV
from skipjack.kvpolicies.quantized import KVDtype
from skipjack.kvpolicies.snapkv import SnapKV
from skipjack.kvpolicies.streaming import StreamingLLM
from skipjack.kvpolicies.tidal import TidalDecode

POLICIES = {
    "full": FullKV,
    "bf16": lambda: KVDtype("bf16"),
    "int8": lambda: KVDtype("int8"),
    "streaming": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "cake": CAKE,
    "actqkv": ActQKV,
    "tidal": TidalDecode,
}


def policy_names() -> list[str]:
    return list(POLICIES)


def policy_help() -> str:
    """The `--kv` help, from the registry: every policy and its options."""
    parts = []
    for name, factory in POLICIES.items():
        opts = list(inspect.signature(factory).parameters)
        parts.append(f"{name}[:{','.join(opts)}]" if opts else name)
    return "full (default, every key kept) or a lossy one: " + "; ".join(p for p in parts if p != "full")


def make_policy(spec: str | None) -> CachePolicy:
    """The cache policy for a spec (None or "full": every key kept)."""
    if spec is None:
        return FullKV()
    name, opts = validate.spec_options("--kv", spec)
    if name not in POLICIES:
        raise SkipjackError(f"unknown cache policy {name!r}; choose one of: {', '.join(POLICIES)}")
    factory = POLICIES[name]
    params = inspect.signature(factory).parameters
    unknown = set(opts) - set(params)
    if unknown:
        allowed = ", ".join(sorted(params)) or "none"
        raise SkipjackError(f"--kv {name}: unknown option(s) {', '.join(sorted(unknown))}; allowed: {allowed}")
    return factory(**{k: validate.typed_option(f"--kv {name}", k, v, params[k].default) for k, v in opts.items()})


def is_lossless(spec: str | None) -> bool:
    """Whether a cache policy keeps plain decoding's output: only the full cache."""
    return spec is None or validate.spec_options("--kv", spec)[0] == "full"


__all__ = [
    "POLICIES",
    "KVDtype",
    "EvictingLayerKV",
    "EvictionPolicy",
    "is_lossless",
    "make_policy",
    "policy_help",
    "policy_names",
]
