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


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)
