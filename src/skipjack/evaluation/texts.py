"""The harness's local text, with no download, kept apart from what the benchmark prompts and the drafters'
training text use: pydoc topics the benchmark prompts do not draw on, and the sources of stdlib modules that
neither the drafters' corpus (`skipjack.corpus`, `skipjack.vocab`) nor the prompts use. Windows are cut at
fixed places (every document in a fixed order, prose and code alternating), so a run is reproducible on one
Python version (the text ships with it)."""

from __future__ import annotations

import json
import re
import sysconfig
from importlib import resources
from pathlib import Path

SOURCES = (
    "configparser.py", "tarfile.py", "optparse.py", "logging/__init__.py", "email/message.py", "http/client.py",
    "inspect.py", "threading.py", "ftplib.py", "imaplib.py", "mailbox.py", "pydoc.py",
)  # fmt: skip


def bench_topics() -> set[str]:
    """pydoc topics the benchmark prompts use (named in their `source`)."""
    from pydoc_data.topics import topics

    used: set[str] = set()
    for name in ("full.jsonl", "quick.jsonl", "selfspec.jsonl"):
        text = resources.files("skipjack.bench").joinpath("prompts", name).read_text()
        for line in filter(None, text.splitlines()):
            used |= set(re.findall(r"[\w-]+", json.loads(line).get("source", ""))) & set(topics)
    return used


def documents() -> tuple[list[str], list[str]]:
    """(prose, code): the pydoc topics the prompts leave out, and the listed stdlib sources."""
    from pydoc_data.topics import topics

    skip = bench_topics()
    prose = [topics[k] for k in sorted(topics) if k not in skip and len(topics[k]) > 2000]
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = []
    for name in SOURCES:
        try:
            code.append((lib / name).read_text())
        except OSError:
            continue
    return prose, code


def windows(tokenizer, n: int, prompt: int, cont: int) -> list[tuple[list[int], list[int]]]:
    """`n` windows of (prompt ids [prompt], continuation ids [cont]), prose and code taking turns; within a
    kind, the documents take turns too (each gives its windows from its start, one after another)."""
    size, kinds = prompt + cont, []
    for docs in documents():
        per_doc = []
        for d in docs:
            ids = tokenizer.encode(d, add_special_tokens=False)
            per_doc.append([ids[i : i + size] for i in range(0, len(ids) - size + 1, size)])
        depth = max((len(x) for x in per_doc), default=0)
        kinds.append([w[d] for d in range(depth) for w in per_doc if d < len(w)])
    out = [w for pair in zip(*kinds) for w in pair]
    out += [w for k in kinds for w in k[len(out) // 2 :]]  # the longer kind's rest
    return [(w[:prompt], w[prompt:]) for w in out[:n]]
