#!/usr/bin/env python3
"""Set up the project (virtual environment in .venv, dependencies) and run the main job or the tests.

    python3 run.py train [args]   # the main job: a short CPU training run (cli.py fit, quickstart)
    python3 run.py test [args]    # the default test suite (pytest args pass through)

Needs only Python >= 3.11. Set DREAMER_TORCH to install another torch (default: torch==2.13.0,
the CPU build these machines carry; pass e.g. "torch" for a CUDA build on a GPU machine).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
TORCH = os.environ.get("DREAMER_TORCH", "torch==2.13.0")


def setup() -> Path:
    """Create .venv and install the project with its test extras; redone when pyproject.toml changes."""
    if sys.version_info < (3, 11):
        sys.exit(f"Python >= 3.11 is required, this is {sys.version.split()[0]}")
    python = BIN / "python"
    stamp = VENV / ".installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest and python.exists():
        return python
    if not python.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    # torch first: left to the resolver, an unpinned torch would pull gigabytes of CUDA packages.
    subprocess.check_call([*pip, TORCH])
    subprocess.check_call([*pip, "-e", f"{ROOT}[dev]"])
    stamp.write_text(digest)
    return python


def ensure_chromium() -> None:
    """The web demo's browser test drives Debian's Chromium (/usr/bin/chromium, or DREAMER_CHROMIUM);
    install it with apt when it is missing and this user can."""
    if os.path.exists(os.environ.get("DREAMER_CHROMIUM", "/usr/bin/chromium")):
        return
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.call(install, env=env) != 0:
            subprocess.call(["apt-get", "update"], env=env)
            subprocess.call(install, env=env)
    if not os.path.exists(os.environ.get("DREAMER_CHROMIUM", "/usr/bin/chromium")):
        print("warning: no Chromium found, so the web demo's browser test will fail; install "
              "Debian's `chromium` package or set DREAMER_CHROMIUM to a Chromium binary",
              file=sys.stderr)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "test", "setup"):
        print(__doc__)
        return 2
    command, args = sys.argv[1], sys.argv[2:]
    python = setup()
    if command == "setup":
        return 0
    if command == "train":
        # the main job runs again on every call: an earlier quickstart run is moved aside
        # (runs/<name>.old...), never overwritten, unless the call resumes it
        again = [] if any(a.split("=")[0] in ("--ckpt_path", "--start_over") for a in args) else ["--start_over", "true"]
        cmd = [str(python), "cli.py", "fit", "--config", "configs/quickstart.yaml", *again, *args]
    else:
        ensure_chromium()
        cmd = [str(python), "-m", "pytest", *args]
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
