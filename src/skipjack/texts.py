"""Every local text source, in one place: offline text that ships with Python (pydoc's topics, stdlib sources
and documentation), cut at fixed places, so a run is reproducible on one Python version. Two users, kept
disjoint from each other and from every benchmark prompt (`skipjack.prompts`; tests/test_texts.py checks it):

- **the drafters** learn from `local_text` (token counts for reduced-vocabulary heads, `skipjack.vocab`; the
  layer-wise quantizer's calibration; the layer probes), `corpus_prompts` and `source_text` (distillation,
  `skipjack.corpus`), and search on `draft_text` (one-off skip-set searches);
- **the eval harness** measures on `eval_documents`.

pydoc topics: those that share a passage with a benchmark prompt are nobody's; of the others, the long ones
(over `EVAL_MIN_CHARS`) are the eval harness's, and the short ones that share no passage with those the
drafters'. Stdlib sources: the
drafters read `DRAFT_SOURCES` and the functions of `CORPUS_MODULES`, the harness `EVAL_SOURCES`.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import sysconfig
from functools import cache
from pathlib import Path

DRAFT_SOURCES = (
    "os.py", "json/__init__.py", "argparse.py", "collections/__init__.py", "pathlib/__init__.py", "typing.py",
)  # fmt: skip
EVAL_SOURCES = (
    "configparser.py", "tarfile.py", "optparse.py", "logging/__init__.py", "email/message.py", "http/client.py",
    "inspect.py", "threading.py", "ftplib.py", "imaplib.py", "mailbox.py", "pydoc.py",
)  # fmt: skip
# stdlib modules that neither the benchmark prompts nor the eval harness use: the corpus's prompts, the drafters' docs
CORPUS_MODULES = (
    "textwrap", "string", "heapq", "bisect", "statistics", "fractions", "shlex", "difflib", "calendar", "colorsys",
    "fnmatch", "posixpath", "functools", "base64", "html", "urllib.parse", "ipaddress", "copy", "pprint", "random",
    "csv", "glob", "shutil", "zipfile", "gettext", "operator", "keyword", "quopri", "tokenize", "ast", "dis",
    "traceback", "linecache", "secrets", "uuid", "hashlib", "hmac", "getopt", "netrc", "plistlib", "sched",
    "graphlib", "reprlib", "numbers", "decimal", "enum", "dataclasses", "contextlib", "abc", "queue", "weakref",
)  # fmt: skip
EVAL_MIN_CHARS = 2000  # a pydoc topic longer than this is the eval harness's; a shorter one the drafters'
DRAFT_CHARS = 16_000  # `draft_text`: a few thousand tokens


def stdlib_sources(names: tuple[str, ...] = DRAFT_SOURCES) -> str:
    """The source of the stdlib files `names` (paths under the stdlib folder), joined; a missing one is skipped."""
    return "\n".join(_stdlib_files(names))


def _stdlib_files(names: tuple[str, ...]) -> list[str]:
    lib, parts = Path(sysconfig.get_paths()["stdlib"]), []
    for name in names:
        try:
            parts.append((lib / name).read_text())
        except OSError:
            continue
    return parts


SHARED_WORDS = 24  # a run of this many words found in two texts is shared text (shorter common runs are phrases
# such as stdlib docstrings copied between modules)


def passages(text: str, n: int = SHARED_WORDS) -> set[int]:
    """Every run of `n` words in `text` (lower-cased, punctuation dropped), hashed: two texts share a passage
    when these sets meet."""
    w = re.findall(r"\w+", text.lower())
    return {hash(tuple(w[i : i + n])) for i in range(len(w) - n + 1)}


@cache
def _topic_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the eval harness's pydoc topics, the drafters'), each in name order. pydoc's topics nest (`compound`
    holds `with` and `for`, `specialnames` holds `customization`), so they are told apart by content: a topic
    that shares a passage with a shipped prompt is nobody's; of the rest, the long ones are the harness's, and
    the short ones that share no passage with those are the drafters'."""
    from pydoc_data.topics import topics

    from skipjack.prompts import every_shipped_prompt

    bench = passages("\n".join(m["content"] for p in every_shipped_prompt() for m in p.messages))
    free = [(topics[k], passages(topics[k])) for k in sorted(topics)]
    free = [(t, ps) for t, ps in free if not ps & bench]
    long = [(t, ps) for t, ps in free if len(t) > EVAL_MIN_CHARS]
    held = set().union(*(ps for _, ps in long))
    short = [t for t, ps in free if len(t) <= EVAL_MIN_CHARS and not ps & held]
    return tuple(t for t, _ in long), tuple(short)


def eval_documents() -> tuple[list[str], list[str]]:
    """(prose, code): the eval harness's text: the long pydoc topics no prompt draws on, and `EVAL_SOURCES`."""
    return list(_topic_split()[0]), _stdlib_files(EVAL_SOURCES)


def drafter_topics() -> list[str]:
    """The short pydoc topics that share no passage with a prompt or the eval harness's topics."""
    return list(_topic_split()[1])


def _modules() -> list:
    out = []
    for name in CORPUS_MODULES:
        try:
            out.append(importlib.import_module(name))
        except ImportError:
            continue
    return out


def module_docs() -> list[str]:
    """The documentation of `CORPUS_MODULES`: each module's docstring, then its functions' docstrings."""
    docs = []
    for mod in _modules():
        parts = [inspect.cleandoc(mod.__doc__)] if mod.__doc__ else []
        parts += [f"{f.__name__}{_signature(f)}: {inspect.cleandoc(f.__doc__)}" for f in _functions(mod)]
        docs.append("\n\n".join(parts))
    return docs


def local_text(limit: int = 1_500_000) -> str:
    """The drafters' offline English and Python text, up to `limit` characters: the short pydoc topics, the
    documentation of `CORPUS_MODULES`, then the `DRAFT_SOURCES` sources."""
    return "\n".join([*drafter_topics(), *module_docs(), stdlib_sources()])[:limit]


def draft_text(limit: int = DRAFT_CHARS) -> str:
    """A few thousand tokens of the drafters' text for a one-off search (a skip set), prose and code taking turns
    a paragraph-sized piece at a time, so that its start already holds both."""
    prose, code = "\n\n".join(module_docs()), stdlib_sources()
    piece, out = 1000, []
    for i in range(0, limit, 2 * piece):
        out += [prose[i // 2 : i // 2 + piece], code[i // 2 : i // 2 + piece]]
    return "".join(out)[:limit]


def source_text(limit: int) -> str:
    """Raw stdlib source (`DRAFT_SOURCES`), up to `limit` characters."""
    return stdlib_sources()[:limit]


def _functions(mod) -> list:
    out = []
    for name, f in inspect.getmembers(mod, inspect.isfunction):
        if f.__module__ == mod.__name__ and f.__doc__ and not name.startswith("_"):
            out.append(f)
    return out


def _signature(f) -> str:
    try:
        return str(inspect.signature(f))
    except (TypeError, ValueError):
        return "(...)"


def _first_paragraph(doc: str, limit: int) -> str:
    para = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip()
    return para[:limit].rsplit(" ", 1)[0] if len(para) > limit else para


def corpus_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` chat prompts built from `CORPUS_MODULES` (write a function from its signature and docstring, explain
    a function's source, summarise a module's documentation, say when to use a function), the same for the
    same (n, seed): listed in a fixed order, then shuffled by the seed."""
    pool: list[str] = []
    for mod in _modules():
        m = mod.__name__
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
