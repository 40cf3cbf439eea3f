"""Local text for training drafts, with no download: chat prompts built from the Python stdlib, the model's own
answers to them, and raw stdlib source.

The prompts come from stdlib modules that the benchmark prompts do not use (the bench draws on pydoc topics,
licenses and HumanEval): write a function from its signature and docstring, explain a function's source,
summarise a module's documentation, say when to use a function. They are listed in a fixed order and
shuffled by a seed, so a corpus is reproducible. `answers` has the model answer them greedily (through the
engine, with prompt lookup: the same tokens as plain decoding, sooner); distilling on those answers trains a
draft on the text it will be asked to predict, which is the model's own (Kangaroo, Medusa-2 and EAGLE
regenerate their training answers with the target model for the same reason).
"""

from __future__ import annotations

import importlib
import inspect
import random
from collections.abc import Callable

from skipjack.vocab import stdlib_sources

MODULES = (
    "textwrap", "string", "heapq", "bisect", "statistics", "fractions", "shlex", "difflib", "calendar", "colorsys",
    "fnmatch", "posixpath", "functools", "base64", "html", "urllib.parse", "ipaddress", "copy", "pprint", "random",
    "csv", "glob", "shutil", "zipfile", "gettext", "operator", "keyword", "quopri", "tokenize", "ast", "dis",
    "traceback", "linecache", "secrets", "uuid", "hashlib", "hmac", "getopt", "netrc", "plistlib", "sched",
    "graphlib", "reprlib", "numbers", "decimal", "enum", "dataclasses", "contextlib", "abc", "queue", "weakref",
)  # fmt: skip


def _functions(mod) -> list:
    out = []
    for name, f in inspect.getmembers(mod, inspect.isfunction):
        if f.__module__ == mod.__name__ and f.__doc__ and not name.startswith("_"):
            out.append(f)
    return out


def _first_paragraph(doc: str, limit: int) -> str:
    para = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip()
    return para[:limit].rsplit(" ", 1)[0] if len(para) > limit else para


def prompts(n: int, seed: int = 0) -> list[str]:
    """`n` user messages (module doc), the same for the same (n, seed)."""
    pool: list[str] = []
    for m in MODULES:
        try:
            mod = importlib.import_module(m)
        except ImportError:
            continue
        if mod.__doc__ and len(mod.__doc__) > 400:
            pool.append(f"Summarize the documentation of Python's `{m}` module:\n\n{mod.__doc__.strip()[:2000]}")
        for f in _functions(mod):
            try:
                sig, src = str(inspect.signature(f)), inspect.getsource(f)
            except (TypeError, ValueError, OSError):
                continue
            what = _first_paragraph(f.__doc__, 300)
            pool.append(f"Write a Python function `{f.__name__}{sig}`: {what}")
            if len(src) < 1500:
                pool.append(f"Explain what this Python function does:\n```python\n{src}```")
            pool.append(f"In Python, when would you use `{m}.{f.__name__}`? Give a short example.")
    random.Random(seed).shuffle(pool)
    return pool[:n]


def answers(engine, texts: list[str], max_new: int, keep: Callable[[list[int]], None] | None = None) -> list[list[int]]:
    """Each prompt through the chat template followed by the model's greedy answer (token ids), each also handed
    to `keep` as it comes; a prompt too long for the model's context gets [] (no answer)."""
    from skipjack.decoding.sampling import SamplingParams
    from skipjack.engine import Request

    tok, room = engine.tokenizer, engine.model.config.max_position_embeddings - max_new
    params = SamplingParams(max_new_tokens=max_new, stop_token_ids=tok.stop_ids)
    out = []
    for text in texts:
        ids = tok.prompt_ids(text)
        out.append(ids + engine.complete(Request(ids, params, "pld")).tokens if len(ids) <= room else [])
        if keep is not None:
            keep(out[-1])
    return out


def source_text(limit: int) -> str:
    """Raw stdlib source (`vocab.stdlib_sources`; not pydoc's topics, which the benchmark prompts draw on)."""
    return stdlib_sources()[:limit]
