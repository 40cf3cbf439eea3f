"""Token frequencies for reduced-vocabulary draft heads (FR-Spec): counts of each token id over local text
(the stdlib's pydoc topics and a few of its module sources) through the model's tokenizer, cached on disk
per tokenizer. The engine hands them to drafters (the shared store's `token_counts`), lazily."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections import Counter
from pathlib import Path

from skipjack import store

SOURCES = ("os.py", "json/__init__.py", "argparse.py", "collections/__init__.py", "pathlib/__init__.py", "typing.py")
CHUNK = 20_000  # characters tokenised per call


def local_text(limit: int = 1_500_000) -> str:
    """Offline English and Python text: pydoc's topics, then stdlib sources, up to `limit` characters."""
    from pydoc_data.topics import topics

    return "\n".join([*topics.values(), stdlib_sources()])[:limit]


def stdlib_sources() -> str:
    """The source of a few stdlib modules (`SOURCES`), joined."""
    lib, parts = Path(sysconfig.get_paths()["stdlib"]), []
    for name in SOURCES:
        try:
            parts.append((lib / name).read_text())
        except OSError:
            continue
    return "\n".join(parts)


def token_counts(tokenizer) -> dict[int, int]:
    """{token id: count} over `local_text()`, cached per tokenizer."""
    vocab = json.dumps(sorted(tokenizer.hf.get_vocab().items()))
    path = store.cache_file("vocab", {"tokenizer": hashlib.sha256(vocab.encode()).hexdigest(), "v": 1})
    n = len(tokenizer.hf)
    try:
        counts = {int(k): int(v) for k, v in json.loads(path.read_text()).items()}
        if all(0 <= k < n and v >= 0 for k, v in counts.items()):
            return counts
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # missing, unreadable or out of range: counted again and rewritten
    text, counts = local_text(), Counter()
    for i in range(0, len(text), CHUNK):
        counts.update(tokenizer.encode(text[i : i + CHUNK], add_special_tokens=False))
    store.write_atomic(path, json.dumps(counts))
    return dict(counts)
