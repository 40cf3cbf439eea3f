"""Where skipjack keeps files: the home folder, measurement caches keyed by what they depend on, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def home() -> Path:
    """`$SKIPJACK_HOME`, or `~/.cache/skipjack`."""
    return Path(os.environ.get("SKIPJACK_HOME", Path.home() / ".cache" / "skipjack"))


def cache_file(kind: str, key: dict) -> Path:
    """A measurement's cache file under home()/kind, named by a digest of what the measurement depends on."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return home() / kind / f"{digest}.json"


def write_atomic(path: Path, text: str) -> None:
    """Write a temporary file, then rename it over `path`: concurrent processes never read a partial file.
    A cache directory that cannot be written only costs the next process a new measurement."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass
