"""One process owns a run: an OS file lock beside the run directory, held for the life of the process.

The lock file is ``<parent>/.<run dir name>.lock``. It lies beside the directory, not in it, so a
start that fails leaves the directory as it found it and a moved directory carries no lock with it.
The lock is ``flock``'s: the kernel drops it when its process ends, however it ends (SIGKILL
included), so it is never stale. The file names its holder (pid, command, start time) for the
refusal of a second process; readers such as ``demo.py`` take no lock and are never blocked.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not guarded against a second process
    fcntl = None

_held: dict[Path, int] = {}  # lock path -> open descriptor, kept open until the process exits


def lock_path(run_dir: str | os.PathLike) -> Path:
    """The lock file of ``run_dir``: ``.<name>.lock`` in its parent (absolute)."""
    path = Path(run_dir).expanduser().absolute()
    path = path.parent.resolve() / path.name
    return path.parent / f".{path.name}.lock"


def lock_run(run_dir: str | os.PathLike) -> str | None:
    """Take the lock of ``run_dir`` for the rest of this process; None when taken (or already held
    by this process), else what holds it, for the refusal (nothing is written then)."""
    path = lock_path(run_dir)
    if path in _held or fcntl is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return holder
    os.ftruncate(fd, 0)
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]
    os.write(fd, f"process {os.getpid()} ({command}), since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    _held[path] = fd
    return None


def release_run(run_dir: str | os.PathLike) -> None:
    """Give the lock of ``run_dir`` back before the process ends (tests, or a CLI used as a library)."""
    fd = _held.pop(lock_path(run_dir), None)
    if fd is not None:
        os.close(fd)
