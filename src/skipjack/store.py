"""Where skipjack keeps files: the home folder, measurement caches keyed by what they depend on, atomic writes of
files and folders (`atomic_file`, its quiet form for caches `write_atomic`, and `atomic_folder`: a reader sees
the old content or the whole new one, never a part), and locks with a bounded wait.

Everything under the home folder is a cache: deleting it (or one entry) costs only the time to rebuild it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from skipjack.errors import SkipjackError, Unavailable

LOCK_WAIT_S = 30.0  # default bound on waiting for another process's lock (`SKIPJACK_LOCK_TIMEOUT`)


def home() -> Path:
    """`$SKIPJACK_HOME` (`~` expanded, made absolute), or `~/.cache/skipjack`. An empty value, or one that names
    something other than a folder, is a one-line error."""
    raw = os.environ.get("SKIPJACK_HOME")
    if raw is None:
        return Path.home() / ".cache" / "skipjack"
    if not raw.strip() or "\x00" in raw:
        raise SkipjackError("SKIPJACK_HOME is set but empty; unset it or name a folder")
    path = Path(raw).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise SkipjackError(f"SKIPJACK_HOME={raw} is not a folder")
    return path


def check_home() -> Path:
    """home(), created if needed and checked writable before any work is done there."""
    path = home()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Unavailable(f"cannot create the cache folder SKIPJACK_HOME={path}: {reason(e)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise Unavailable(f"the cache folder {path} is not writable; set SKIPJACK_HOME to a writable folder")
    return path


def reason(e: OSError) -> str:
    """An OS error in words, the way a user can act on it."""
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.EROFS:
        return "read-only file system"
    return e.strerror or str(e)


def cache_file(kind: str, key: dict) -> Path:
    """A measurement's cache file under home()/kind, named by a digest of what the measurement depends on."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return home() / kind / f"{digest}.json"


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write (`.NAME.<pid>.<random>.tmp`: in the same folder, so
    the rename is atomic; unique per writer, thread or process); renamed over `path` when the block ends, so a
    concurrent reader never sees a partial file. When the block or the rename raises, the temporary file is
    deleted and the error propagates (`write_atomic` is the quiet form, for caches)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through `atomic_file`. A cache folder that cannot be written (read-only, full) only
    costs the next process a new measurement: the error is dropped, and no temporary file is left behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(text)
    except OSError:
        pass


TMP_FOLDER = ".tmp-"  # in the name of a folder being written: `<entry>.tmp-<pid>-<random>`


@contextlib.contextmanager
def atomic_folder(entry: Path, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside `entry` for the block to fill, renamed to `entry` when the block ends: a reader
    sees the whole folder or none. If `entry` exists by then, another process finished first and theirs is kept
    (`replace`: ours replaces it). When the block raises, the temporary folder is removed and the error
    propagates; a writer killed mid-way leaves it, for `drop_abandoned` to remove."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{entry.name}{TMP_FOLDER}{os.getpid()}-", dir=entry.parent))
    try:
        yield tmp
        if replace and entry.exists():
            shutil.rmtree(entry)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def drop_abandoned(parent: Path) -> None:
    """Delete the folders under `parent` that `atomic_folder` left half-written in a process that no longer
    runs (killed mid-way)."""
    for old in parent.glob(f"*{TMP_FOLDER}*"):
        pid = old.name.rpartition(TMP_FOLDER)[2].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_wait() -> float:
    """Seconds to wait for another process's lock: `SKIPJACK_LOCK_TIMEOUT`, default 30."""
    from skipjack.validate import env_number

    wait = env_number("SKIPJACK_LOCK_TIMEOUT", 0, 86_400)
    return LOCK_WAIT_S if wait is None else wait


@contextlib.contextmanager
def locked(path: Path, what: str, wait: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed), waiting at most `wait` seconds (default
    `SKIPJACK_LOCK_TIMEOUT`, 30 s) for another process to release it; then a one-line error naming the file."""
    wait = lock_wait() if wait is None else wait
    try:
        f = open(path, "a")
    except OSError as e:
        raise Unavailable(f"cannot open the lock file {path} for {what}: {reason(e)}") from None
    with f:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Unavailable(
                        f"{what}: {path} is locked by another process (waited {wait:g} s); retry when it is done, "
                        f"or delete {path} if no skipjack process is running"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
