"""Benchmark inputs: the method / peer lists and the output folder. The prompt suites and a user's `--prompts`
file are read by `skipjack.prompts` (re-exported here).

Everything here validates the user's input and raises `SkipjackError` with a one-line message, so the runner
can check all of it before the (slow) model load.
"""

from __future__ import annotations

from pathlib import Path

from skipjack.errors import SkipjackError
from skipjack.prompts import (  # noqa: F401 (re-exported: the bench's prompts)
    HUMANEVAL_EVERY,
    SAMPLE,
    SUITES,
    Prompt,
    humaneval,
    load_prompts_file,
    load_suite,
    parse_prompts,
)

PEERS = ("hf", "hf-pld", "hf-assist", "hf-early-exit", "llamacpp", "llamacpp-pld", "llamacpp-draft")
FIXED_LENGTHS = (2, 4, 8, 16)  # `--methods all` adds pld:k=N for these (the draft-length plot)


def split_dtype(spec: str) -> tuple[str, str | None]:
    """A benchmark method spec may name the model's dtype after `@`: 'ngram:width=2@bf16' -> ('ngram:width=2',
    'bf16'); without `@` the run's --dtype applies (None)."""
    method, at, dtype = spec.partition("@")
    return method.strip(), (dtype.strip() if at else None)


def parse_methods(spec: str) -> list[str]:
    """`plain,pld,plain@bf16,...` or `all` -> validated method specs, `plain` first, duplicates dropped. An item
    `key=value` with no method name continues the method before it: `pld:k=8,max_ngram=4,ngram` is two."""
    from skipjack.loading.load import CHOICES
    from skipjack.methods import MethodSpec, method_names

    dtypes = [c for c in CHOICES if c != "auto"]

    if spec.strip() == "all":
        items = [
            *(m for m in method_names() if m != "auto"),
            *(f"pld:k={k}" for k in FIXED_LENGTHS),
        ]  # auto: a named one
    else:
        items = []
        for s in filter(None, (s.strip() for s in spec.split(","))):
            if "=" in s and ":" not in s.split("=")[0] and items and ":" in items[-1]:
                items[-1] += "," + s
            else:
                items.append(s)
    if not items:
        raise SkipjackError("--methods is empty")
    out = ["plain"]
    for m in items:
        method, dtype = split_dtype(m)
        MethodSpec.parse(method)  # raises SkipjackError for an unknown method or option; builds nothing
        if dtype is not None and dtype not in dtypes:
            raise SkipjackError(f"{m}: unknown dtype {dtype!r}; choose one of {', '.join(dtypes)}")
        if m not in out:
            out.append(m)
    return out


def parse_peers(spec: str | None) -> list[str]:
    items = [s.strip() for s in (spec or "").split(",") if s.strip()]
    if items == ["all"]:
        return list(PEERS)
    for p in items:
        if p not in PEERS:
            raise SkipjackError(f"unknown peer {p!r}; choose from: {', '.join(PEERS)}")
    return list(dict.fromkeys(items))


def probe_out_dir(path: str) -> Path:
    """Create `path` and write a probe file into it, so an unwritable --out fails before the model load."""
    out = Path(path).expanduser()
    probe = out / ".skipjack-write-probe"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SkipjackError(f"--out {path} is not writable: {e.strerror or e}") from None
    return out
