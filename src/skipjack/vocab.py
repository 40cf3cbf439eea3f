"""Token frequencies for reduced-vocabulary draft heads (FR-Spec): counts of each token id over the drafters'
local text (`skipjack.texts.local_text`: short pydoc topics, stdlib documentation and sources, none of it in a
benchmark prompt or the eval harness's text) through the model's tokenizer, cached on disk per tokenizer. The
engine counts them while it prepares a drafter that asks for them (`Resources.token_counts`), never in a request."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

from skipjack import schemas, store
from skipjack.texts import local_text

CHUNK = 20_000  # characters tokenised per call
VERSION = 2  # 2: the text leaves out what the benchmark prompts and the eval harness use


def token_counts(tokenizer) -> dict[int, int]:
    """{token id: count} over `local_text()`, cached per tokenizer (a cache file of another shape, or with ids
    outside the vocabulary, is counted again and rewritten)."""
    vocab = json.dumps(sorted(tokenizer.hf.get_vocab().items()))
    path = store.cache_file("vocab", {"tokenizer": hashlib.sha256(vocab.encode()).hexdigest(), "v": VERSION})
    n = len(tokenizer.hf)
    counts = schemas.read_cache(path, schemas.TokenCounts)
    if counts is not None and all(k < n for k in counts):
        return counts
    text, counts = local_text(), Counter()
    for i in range(0, len(text), CHUNK):
        counts.update(tokenizer.encode(text[i : i + CHUNK], add_special_tokens=False))
    store.write_atomic(path, json.dumps(counts))
    return dict(counts)
