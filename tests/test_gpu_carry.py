"""The carry of benchmarks/gpu_learn.sh (benchmarks/gpu_carry.py): procgen unpacked from it plays
exactly as the installed procgen, in a fresh interpreter whose path holds the carry and numpy and
nothing else; and, where this machine has Python 3.12, the same in a 3.12 venv with numpy 2 (slow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# coinrun on training and unseen levels, 120 steps of 3 envs under a fixed action sequence: a digest
# of every frame, reward and first flag, and where procgen came from
STEP_SCRIPT = r"""
import hashlib, sys
import numpy as np
import procgen
h = hashlib.sha256()
for start, levels in ((0, 200), (10**6, 0)):
    env = procgen.ProcgenGym3Env(num=3, env_name="coinrun", distribution_mode="easy", start_level=start,
                                 num_levels=levels, rand_seed=7)
    rng = np.random.default_rng(0)
    for _ in range(120):
        env.act(rng.integers(0, 15, 3).astype(np.int32))
        reward, ob, first = env.observe()
        for x in (ob["rgb"], np.asarray(reward, np.float32), np.asarray(first, np.uint8)):
            h.update(np.ascontiguousarray(x).tobytes())
print(procgen.__file__)
print("numpy", np.__version__)
print(h.hexdigest())
"""


def step_digest(python: str, env: dict | None = None) -> tuple[str, str, str]:
    done = subprocess.run([python, "-c", STEP_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    origin, numpy_version, digest = done.stdout.strip().splitlines()[-3:]
    return origin, numpy_version, digest


def build_carry(tmp_path: Path, python_version: str) -> Path:
    archive = tmp_path / "carry.tar.xz"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_carry.py"), "--python-version",
                           python_version, "--out", str(archive), "--no-size-check", "--preset", "0"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    carry = tmp_path / "carry"
    with tarfile.open(archive) as tar:
        tar.extractall(carry, filter="tar")
    return carry


def install_wheels(pip_python: str, carry: Path) -> None:
    """What gpu_learn.sh does on the device: the binary wheels into ``site``, offline."""
    wheels = sorted(str(p) for p in (carry / "wheels").glob("*.whl"))
    assert {Path(w).name.split("-")[0] for w in wheels} == {"cffi", "pillow"}
    done = subprocess.run([pip_python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--target", str(carry / "site"), *wheels], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_procgen_from_the_carry_steps_as_the_installed_one(tmp_path):
    installed = step_digest(sys.executable)
    carry = build_carry(tmp_path, f"{sys.version_info.major}.{sys.version_info.minor}")
    libenv = carry / "site" / "procgen" / "data" / "prebuilt" / "libenv.so"
    if shutil.which("objcopy"):
        assert libenv.stat().st_size < 4 * 2**20, "libenv.so keeps its debug information"
    install_wheels(sys.executable, carry)
    # A fresh venv (standard library only) whose path gets the carry and numpy: the installed
    # procgen, gym3, cffi and gym cannot be reached from it.
    venv = tmp_path / "fresh"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    numpy_only = tmp_path / "numpy_only"
    numpy_only.mkdir()
    installed_site = Path(np.__file__).parents[1]
    for name in ("numpy", "numpy.libs"):
        if (installed_site / name).exists():
            (numpy_only / name).symlink_to(installed_site / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = f"{carry / 'site'}{os.pathsep}{numpy_only}"
    fresh = step_digest(str(venv / "bin" / "python"), env)
    assert fresh[0].startswith(str(carry / "site")), fresh[0]
    assert not installed[0].startswith(str(carry)), installed[0]
    assert fresh[2] == installed[2]


def python312() -> str | None:
    """A working Python 3.12 interpreter: pyenv's, or one on PATH (a pyenv shim may name a version
    that is not selected, so each candidate is asked its version)."""
    candidates = []
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(Path(root).glob("versions/3.12*/bin/python3.12")) if root else []
    candidates += [shutil.which("python3.12")] if shutil.which("python3.12") else []
    for candidate in candidates:
        done = subprocess.run([str(candidate), "-c", "import sys; print(sys.version_info[:2])"],
                              capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == "(3, 12)":
            return str(candidate)
    return None


@pytest.mark.slow
def test_procgen_from_the_carry_steps_alike_under_python_312_and_numpy_2(tmp_path):
    python = python312()
    if python is None:
        pytest.skip("no Python 3.12 on this machine (pyenv versions)")
    installed = step_digest(sys.executable)
    carry = build_carry(tmp_path, "3.12")
    venv = tmp_path / "py312"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    vpython = str(venv / "bin" / "python")
    # what the GPU machine has beside torch and Lightning: numpy 2, and their typing_extensions and PyYAML
    done = subprocess.run([vpython, "-m", "pip", "install", "--quiet", "numpy>=2,<3", "typing_extensions", "PyYAML"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    install_wheels(vpython, carry)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(carry / "site")
    origin, numpy_version, digest = step_digest(vpython, env)
    assert origin.startswith(str(carry / "site")) and numpy_version.startswith("numpy 2."), (origin, numpy_version)
    assert digest == installed[2]
    # the rest of the carry imports there too (torch and Lightning are the GPU machine's own)
    imports = "import gymnasium, gym3, imageio, PIL.Image, omegaconf, jsonargparse, docstring_parser, typeshed_client"
    done = subprocess.run([vpython, "-c", imports], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
