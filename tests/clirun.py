"""Running ``cli.py`` in a subprocess, for the end-to-end tests."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
SMOKE_CKPT = Path("runs") / "coinrun-tiny-seed0" / "checkpoints" / "last.ckpt"


def cli(cwd, *args, timeout=300, check=True, extra_path=()):
    path = os.pathsep.join(map(str, [ROOT, *extra_path]))
    out = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "PYTHONPATH": path},
    )
    if check and out.returncode != 0:
        raise AssertionError(f"cli {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def start_cli(cwd, *args, **popen_kwargs) -> subprocess.Popen:
    """``cli.py`` started in the background (for tests that signal it), output discarded unless asked."""
    popen_kwargs = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen_kwargs}
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, **popen_kwargs)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def quick_checkpoints(path, *callbacks: str | tuple[str, dict]) -> str:
    """A config to layer over the smoke config: a checkpoint every 64 env steps from the start,
    no validation or pictures (not even at the end), plus ``callbacks`` (class paths, or (class path, init args))."""
    import yaml

    listed = []
    for callback in callbacks:
        class_path, init_args = callback if isinstance(callback, tuple) else (callback, {})
        listed.append({"class_path": class_path, "init_args": init_args})
    Path(path).write_text(yaml.safe_dump({
        "trainer": {"val_check_interval": 100000, "limit_val_batches": 0, "callbacks": listed},
        "checkpoint": {"every_env_steps": 64},
        "dream_pictures": {"enabled": False},
        "data": {"learning_starts": 64},
    }))
    return str(path)
