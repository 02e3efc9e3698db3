"""A run's directory: what shows a run lives there, the checkpoints it holds, where its MLflow run
is recorded, and the lock that lets one process own it.

The lock: an OS file lock beside the run directory, held for the life of the process.
The lock file is ``<parent>/.<run dir name>.lock``. It lies beside the directory, not in it, so a
start that fails leaves the directory as it found it and a moved directory carries no lock with it.
The lock is ``flock``'s: the kernel drops it when its process ends, however it ends (SIGKILL
included), so it is never stale. The file names its holder (pid, command, start time) for the
refusal of a second process; readers such as ``demo.py`` take no lock and are never blocked.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from dreamer.checkpoints import CheckpointError, read_checkpoint

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


RUN_FILES = ("checkpoints", "replay", "config.yaml", "dreams", "mlflow_run.json")


def run_files(root: Path) -> list[str]:
    """What in ``root`` shows that a run lives there (empty for a new or empty directory)."""
    if not root.is_dir():
        return []
    found = [name for name in RUN_FILES if (root / name).exists()
             and not ((root / name).is_dir() and not any((root / name).iterdir()))]
    return found + sorted(p.name for p in root.glob("episodes_rank*.csv"))


def move_aside(root: Path) -> Path:
    """Move ``root`` to the first free ``<root>.old[-<n>]`` and return where it went (nothing deleted)."""
    aside = free_dir(root.with_name(root.name + ".old"))
    os.replace(root, aside)
    return aside


def free_dir(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``... : the first that does not exist."""
    n, free = 1, path
    while free.exists():
        n += 1
        free = path.with_name(f"{path.name}-{n}")
    return free


def checkpoints_in(root: Path) -> list[Path]:
    return sorted((root / "checkpoints").glob("*.ckpt")) if (root / "checkpoints").is_dir() else []


def env_steps_of(checkpoint: dict) -> int | None:
    """All ranks' env steps together at ``checkpoint`` (None if it does not say)."""
    state = checkpoint.get("ReplayDataModule") or {}
    if "env_steps" not in state:
        return None
    return int(state["env_steps"]) * int(state.get("world_size", 1))


def last_env_steps(root: Path, resumed: str) -> int | None:
    """Env steps of ``root``'s ``last.ckpt`` (the newest state of the run's timeline), or None
    when that is the checkpoint ``resumed`` or there is none to read."""
    last = root / "checkpoints" / "last.ckpt"
    if not last.is_file() or last.resolve() == Path(resumed).resolve():
        return None
    try:
        return env_steps_of(read_checkpoint(last))
    except CheckpointError:
        return None


def saved_run_id(root: Path) -> str | None:
    try:
        return json.loads((root / "mlflow_run.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fail_mlflow_run(root: Path) -> str:
    """Mark the MLflow run recorded in ``root/mlflow_run.json`` FAILED if it never ended; what
    was done, for the note."""
    try:
        record = json.loads((root / "mlflow_run.json").read_text())
        import mlflow

        client = mlflow.MlflowClient(record["tracking_uri"])
        if client.get_run(record["run_id"]).info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(record["run_id"], "FAILED")
            return f"; its MLflow run {record['run_id']} is marked FAILED"
    except Exception:  # noqa: BLE001 - no record, store or run: nothing to mark
        return ""
    return ""
