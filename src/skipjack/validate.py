"""The one validation layer for inputs: the CLI, the Python API and the server check values here, before any
work, and get the same one-line `SkipjackError`s.

Each check names the setting, says what it must be and what it got. Numbers must be finite and of the right
kind (a bool is not an integer), text must be valid Unicode that encodes as UTF-8, paths get `~` expanded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from skipjack.errors import SkipjackError


def _shown(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def integer(name: str, v, lo: int | None = None, hi: int | None = None) -> int:
    """`v` as an int in [lo, hi]; a bool, a float or a string is refused."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise SkipjackError(f"{name} must be an integer (got {_shown(v)})")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise SkipjackError(
            f"{name} must be in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}] (got {v})"
        )
    return v


def number(name: str, v, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """`v` as a finite float in the interval (brackets as given); NaN, inf, bools and strings are refused."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise SkipjackError(f"{name} must be a number (got {_shown(v)})")
    x = float(v)
    if not math.isfinite(x):
        raise SkipjackError(f"{name} must be a finite number (got {v})")
    if x < lo or x > hi or (lo_open and x == lo) or (hi_open and x == hi):
        shown_hi = "inf" if math.isinf(hi) else f"{hi:g}"
        raise SkipjackError(
            f"{name} must be in {'(' if lo_open else '['}{lo:g}, {shown_hi}{')' if hi_open else ']'} (got {v})"
        )
    return x


def text(name: str, v, empty: bool = True) -> str:
    """`v` as a str that encodes as UTF-8 (no lone surrogates: what undecodable bytes become in argv)."""
    if not isinstance(v, str):
        raise SkipjackError(f"{name} must be a string (got {type(v).__name__})")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SkipjackError(f"{name} is not valid UTF-8 (an undecodable byte at character {e.start})") from None
    if not empty and not v.strip():
        raise SkipjackError(f"{name} is empty")
    return v


def utf8(name: str, data: bytes) -> str:
    """Bytes decoded as UTF-8, or a one-line error with the offending byte and its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipjackError(f"{name} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def strings(name: str, v) -> tuple[str, ...]:
    """A list or tuple of non-empty strings (a single string is one item), each valid UTF-8."""
    if isinstance(v, str):
        v = (v,)
    if not isinstance(v, list | tuple):
        raise SkipjackError(f"{name} must be a string or a list of strings (got {type(v).__name__})")
    for i, s in enumerate(v):
        if text(f"{name}[{i}]", s) == "":
            raise SkipjackError(f"{name}[{i}] is an empty string")
    return tuple(v)


ROLES = ("system", "user", "assistant", "tool")


def messages(v) -> list[dict]:
    """Chat messages: a non-empty list of {"role": system|user|assistant|tool, "content": str (null with
    "tool_calls")}, some content not blank, not ending in two assistant messages."""
    if not isinstance(v, list) or not v:
        raise SkipjackError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(v):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SkipjackError(f"messages[{i}] must be an object with a role and a content")
        if m["role"] not in ROLES:
            raise SkipjackError(f"messages[{i}].role must be one of {', '.join(ROLES)} (got {_shown(m['role'])})")
        if m["content"] is not None or not m.get("tool_calls"):  # null content: an assistant's tool calls
            text(f"messages[{i}].content", m["content"])
    if not any((m["content"] or "").strip() or m.get("tool_calls") for m in v):
        raise SkipjackError("the prompt is empty")
    if len(v) > 1 and v[-1]["role"] == v[-2]["role"] == "assistant":  # as llama-server refuses them
        raise SkipjackError("cannot have 2 or more assistant messages at the end of the list")
    return v


def token_ids(name: str, v, vocab: int) -> list[int]:
    """A non-empty list of token ids, each an int in [0, vocab)."""
    if not isinstance(v, list | tuple) or not v:
        raise SkipjackError(f"{name} must be a non-empty list of token ids (got {_shown(v)})")
    for i, t in enumerate(v):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise SkipjackError(f"{name}[{i}] must be a token id in [0, {vocab}) (got {_shown(t)})")
    return list(v)


def path(name: str, v) -> Path:
    """A user-given path with `~` expanded (the shell does not expand it after `=`)."""
    if isinstance(v, Path):
        v = str(v)
    text(name, v, empty=False)
    if "\x00" in v:
        raise SkipjackError(f"{name} contains a NUL byte")
    return Path(v).expanduser()


def writable_file(name: str, p: Path) -> Path:
    """Check before any work that `p` can be written later: not a folder, its nearest existing folder
    writable (missing folders are created when it is saved), the file itself writable if it exists."""
    if p.is_dir():
        raise SkipjackError(f"{name} {p} is a folder, not a file")
    if p.exists() and not os.access(p, os.W_OK):
        raise SkipjackError(f"{name} {p} is not writable")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SkipjackError(f"{name} {p}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SkipjackError(f"{name} {p}: the folder {parent} is not writable")
    return p


def env_number(var: str, lo: float, hi: float, whole: bool = False) -> float | None:
    """An environment variable as a number in [lo, hi] (`whole`: an integer), None when unset; a one-line
    error naming the variable otherwise."""
    raw = os.environ.get(var)
    if raw is None:
        return None
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = math.nan
    if not lo <= value <= hi:
        kind = "a whole number" if whole else "a number"
        raise SkipjackError(f"{var} must be {kind} in [{lo:g}, {hi:g}] (got {raw!r})")
    return value


def threads() -> int | None:
    """`SKIPJACK_THREADS` as a thread count, or None when unset."""
    n = env_number("SKIPJACK_THREADS", 1, 1024, whole=True)
    return None if n is None else int(n)


def spec_options(kind: str, spec: str) -> tuple[str, dict]:
    """A `NAME[:key=value,...]` spec (a method, a cache policy) -> (name, {key: int | float | str value})."""
    name, _, rest = text(kind, spec, empty=False).partition(":")
    opts: dict = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise SkipjackError(f"{kind} option {item!r} must look like key=value")
        if key.strip() in opts:
            raise SkipjackError(f"{kind} option {key.strip()!r} is given twice")
        opts[key.strip()] = _option_value(val.strip())
    return name.strip(), opts


def _option_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def typed_option(owner: str, key: str, val, default):
    """An option's value as its default's type: `k=1.5` is not a draft length, `path=1` is a file name."""
    import inspect

    if isinstance(default, bool) or default is inspect.Parameter.empty:
        return val
    if isinstance(default, str):
        return str(val)
    if isinstance(default, float) and isinstance(val, int):
        return float(val)
    if not isinstance(val, type(default)):
        kind = "an integer" if isinstance(default, int) else "a number"
        raise SkipjackError(f"{owner}: option {key} must be {kind} (got {val!r})")
    return val


def id_values(name: str, items: list[str]) -> dict[int, float]:
    """`ID=VALUE` flags (`--logit-bias 42=-100`, repeatable) as a map; the values' ranges are the caller's."""
    out = {}
    for item in items:
        tok, _, value = item.partition("=")
        try:
            out[int(tok)] = float(value)
        except ValueError:
            raise SkipjackError(f"{name} must be ID=VALUE, e.g. 42=-100 (got {item[:40]!r})") from None
    return out
