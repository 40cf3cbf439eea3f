"""A prompt cache kept in a file between runs (llama.cpp's `--prompt-cache`, mlx-lm's `cache_prompt`).

`skipjack generate --prompt-cache FILE` loads FILE's keys/values into a `Session` before the request and
saves the request's state (prompt and output) back after it, so a later run whose prompt starts the same way
(the same long document, a new question) runs only the tokens after the shared prefix. The reuse is
`Session.start`'s, so the output is what a fresh request gives (see `skipjack.decoding.session`).

- Format: safetensors. Tensors `{layer}.k`, `{layer}.v` hold each layer's valid positions [B, H_kv, n, D],
  stored exactly (the cache's dtype). Metadata: `format`, `version`, `fingerprint` (the model's), `tokens`
  (the ids the cache holds, JSON), `first` (per layer: the absolute position of its first stored key, > 0
  only for a sliding-window layer that has dropped old keys, JSON) and `capacity` (the saving request's cache
  size: a cache made at that size has the same kind of layer, full or sliding, at every depth).
- Fingerprint: a hash of the model's config, dtype and a few of its weights, so a cache made by another model
  or precision is never reused (a notice says it will be replaced).
- Writes go to a temporary file in the same folder, then replace FILE in one rename: a crash or a concurrent
  run never leaves a half-written cache, only the old one or a whole new one.
- A FILE that exists but is not a skipjack prompt cache is an error, and it is left untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from skipjack import integrity, schemas, store
from skipjack.decoding.session import Session
from skipjack.errors import SkipjackError, Unavailable
from skipjack.models import fingerprint
from skipjack.models.common import DecoderLM

FORMAT, VERSION = "skipjack-prompt-cache", "2"  # 2: a checksum of the tensors in the metadata


def check_path(path: Path) -> None:
    """Fail early (before any model load) on a path that could not be read back or written."""
    if path.is_dir():
        raise SkipjackError(f"prompt cache {path} is a folder, not a file")
    if not path.parent.is_dir():
        raise SkipjackError(f"prompt cache folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise SkipjackError(f"prompt cache folder {path.parent} is not writable")
    if path.exists():
        _read_meta(path)


def _read_meta(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # safetensors raises its own error types for a header it cannot parse
        raise SkipjackError(f"{path} is not a skipjack prompt cache; not touching it") from None
    if meta.get("format") != FORMAT:
        raise SkipjackError(f"{path} is not a skipjack prompt cache; not touching it")
    return meta


def load_prompt_cache(path: Path, model: DecoderLM, notice=print) -> Session:
    """The prompt cache saved in `path` for `model`; an empty one if there is no file or it is another model's."""
    from safetensors import safe_open

    pc = Session()
    if not path.exists():
        return pc
    meta = _read_meta(path)
    if meta.get("version") != VERSION:
        notice(
            f"skipjack: prompt cache {path} is of an older format (version {meta.get('version')}); it will be replaced"
        )
        return pc
    if meta.get("fingerprint") != fingerprint(model):
        notice(f"skipjack: prompt cache {path} was made by another model or precision; it will be replaced")
        return pc
    try:
        m = schemas.parse("its metadata", meta, schemas.PromptCacheMeta)
        tokens, first, capacity = m.tokens, m.first, m.capacity
        cache = model.make_cache(capacity)  # the saving request's size: every layer is of the kind it was
        if len(first) != len(cache) or not len(tokens) <= capacity:
            raise SkipjackError(f"it does not match the model's {len(cache)} layers")
        if not all(t < model.lm_head.out_features for t in tokens):
            raise SkipjackError("a token id outside the model's vocabulary")
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if integrity.digest(tensors) != m.digest:
            raise SkipjackError("its tensors do not match their checksum")
        for i, layer in enumerate(cache):
            layer.restore(tensors[f"{i}.k"], tensors[f"{i}.v"], first[i])
    except (SkipjackError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise SkipjackError(f"{path} is damaged ({e}); delete it to rebuild") from None
    pc.model, pc.tokens, pc.cache = model, tokens, cache
    return pc


def save_prompt_cache(path: Path, pc: Session) -> None:
    """Write `pc` to `path` atomically (temporary file + rename). An empty cache writes nothing."""
    from safetensors.torch import save_file

    if pc.cache is None or pc.model is None:
        return
    tensors, first = {}, []
    for i, layer in enumerate(pc.cache):
        k, v, f = layer.stored()
        tensors[f"{i}.k"], tensors[f"{i}.v"] = k.contiguous(), v.contiguous()
        first.append(f)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint(pc.model),
        "tokens": json.dumps(pc.tokens),
        "first": json.dumps(first),
        "capacity": str(pc.cache.capacity),
        "digest": integrity.digest(tensors),
    }
    try:
        with store.atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    except OSError as e:
        raise Unavailable(f"cannot write the prompt cache {path}: {store.reason(e)}") from None
