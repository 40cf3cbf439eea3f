"""The integrity layer for what skipjack writes and later trusts: a content check at write time, verified at
load.

- Folders (a converted model's cache entry): `seal` records every file's size and SHA-256 in the entry's
  metadata file; `check` says why an entry is damaged (metadata missing or unreadable, a file missing, of
  another size, or of other content), or None. Hashing a large entry on every load would cost a second or
  more, so a successful check leaves a stamp with each file's (size, mtime, ctime, inode): while the stamp
  matches, the sizes suffice. Any write to a file changes its ctime, which no user tool can set back, so a
  file modified in place is hashed again and its damage found.
- Single files with tensors (adapters, prompt caches): `digest` over the tensors' names, dtypes, shapes and
  bytes, stored in the file's own metadata and compared at load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from skipjack.store import write_atomic

STAMP = ".verified"


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path, meta_name: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name not in (meta_name, STAMP))


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def seal(folder: Path, meta_name: str, meta: dict) -> None:
    """Write `meta` plus every file's size and hash as `folder/meta_name` (last: its presence marks the
    entry whole), and the stamp that spares the next load the hashing."""
    files = {p.name: {"size": p.stat().st_size, "sha256": file_hash(p)} for p in _files(folder, meta_name)}
    (folder / meta_name).write_text(json.dumps(meta | {"files": files}, indent=1))
    write_atomic(folder / STAMP, json.dumps({p.name: _stat(p) for p in _files(folder, meta_name)}))


def check(folder: Path, meta_name: str) -> str | None:
    """Why the sealed entry `folder` is damaged, or None when it is whole."""
    meta_file = folder / meta_name
    try:
        meta = json.loads(meta_file.read_text())
        files = meta["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError
    except FileNotFoundError:
        return f"its metadata file {meta_name} is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its metadata file {meta_name} is unreadable or from an older version"
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        stamp = {}
    fresh = {}
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        try:
            size = p.stat().st_size
            if size != want["size"]:
                return f"{name} has {size} bytes, {want['size']} expected (truncated or overwritten)"
            fresh[name] = _stat(p)
            if stamp.get(name) != fresh[name] and file_hash(p) != want["sha256"]:
                return f"{name}'s content does not match its checksum (modified or corrupted)"
        except (OSError, KeyError, TypeError) as e:
            return f"{name} cannot be checked ({e})"
    if fresh != stamp:
        write_atomic(folder / STAMP, json.dumps(fresh))  # a read-only cache just hashes again next time
    return None


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.sum")


def seal_file(path: Path, sha256: str | None = None) -> None:
    """Record a single file's size and hash (and a stamp of its stat) beside it, in `.NAME.sum`."""
    sha256 = sha256 or file_hash(path)
    write_atomic(_sidecar(path), json.dumps({"size": path.stat().st_size, "sha256": sha256, "stat": _stat(path)}))


def check_file(path: Path, sha256: str | None = None) -> str | None:
    """Why the file is damaged, or None. Its sidecar (`seal_file`) gives the size and hash it had when written;
    `sha256`, when known in advance, must match too. A file without a sidecar is hashed and sealed now (or
    refused, if it does not match `sha256`)."""
    try:
        side = json.loads(_sidecar(path).read_text())
        size, want, stamp = int(side["size"]), str(side["sha256"]), side.get("stat")
    except (OSError, ValueError, KeyError, TypeError):
        size, want, stamp = None, sha256, None
    if sha256 and want != sha256:
        want = sha256
    now = _stat(path)
    if size is not None and now[0] != size:
        return f"it has {now[0]} bytes, {size} expected (truncated or overwritten)"
    if stamp == now:
        return None
    got = file_hash(path)
    if want is not None and got != want:
        return "its content does not match its checksum (modified or corrupted)"
    seal_file(path, got)
    return None


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of named tensors (names, dtypes, shapes and bytes), for a file's own metadata."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
