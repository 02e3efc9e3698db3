"""Builds the carry of ``benchmarks/gpu_learn.sh``: one archive with what the GPU machine lacks to
play Procgen through ``cli.py`` (Python 3.12, numpy 2, no network, no procgen there).

procgen's game library ``procgen/data/prebuilt/libenv.so`` is not a Python extension: gym3 opens
it through cffi, and it links no Python, so the cp311 files of the installed ``procgen2`` wheel run
under 3.12 beside cffi's cp312 build. The archive holds

- ``site/``: the installed files of procgen (with its Qt libraries, ``procgen2.libs/``) and of the
  pure-Python distributions on the path from ``cli.py`` to it (gym3, gym, gymnasium, imageio,
  cloudpickle, omegaconf, jsonargparse with its signatures extras, ...), each with its
  ``.dist-info`` so that Lightning's requirement checks see them;
- ``wheels/``: the binary wheels for the target Python (cffi, pillow), taken by ``pip download``
  (pip's cache first), installed there with ``pip install --no-deps --no-index --target site``;
- ``syslibs/``: the system libraries libenv.so loads from outside its wheel (libGL, glib, X11, ...),
  put on ``LD_LIBRARY_PATH`` there only where ``ldd`` finds them missing.

Not carried: MLflow (``gpu_learn.sh`` logs to CSV), imageio-ffmpeg, matplotlib (pictures are drawn
here), procgen's examples and tests, and libenv.so's debug information (17 MB of its 17.6 MB,
removed with ``objcopy --strip-debug``; the code is unchanged, tests/test_gpu_carry.py steps both).
procgen reads its whole asset set when a game starts, whatever the game (traced on coinrun: 857
of 1,452 files, 25.4 of 25.9 MB), so the assets are carried whole.

The device tool moves the working tree and the carry together, at most 64 MiB: this fails in one
line when the tree's files plus the archive exceed that.

    python benchmarks/gpu_carry.py                          # -> benchmarks/gpu_carry/carry.tar.xz
    python benchmarks/gpu_carry.py --python-version 3.11 --out /tmp/carry.tar.xz   # (the test's)
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "gpu_carry" / "carry.tar.xz"
LIMIT = 64 * 2**20  # what the device tool moves: working tree plus carried paths

# Pure-Python distributions between cli.py and procgen that the GPU machine lacks. Present there:
# torch, pytorch-lightning (with PyYAML, tqdm, fsspec, packaging, typing-extensions), torchmetrics,
# numpy.
PURE = ("gym3", "gym", "gym-notices", "cloudpickle", "imageio", "gymnasium", "farama-notifications",
        "omegaconf", "jsonargparse", "docstring-parser", "typeshed-client", "pycparser")
BINARY = ("cffi", "pillow")  # wheels of the target Python
PROCGEN = "procgen2"
PROCGEN_SKIP = ("procgen/examples/", "_test.py")
# libraries every Linux has (glibc, the C++ runtime): never carried
SYSTEM = ("linux-vdso", "ld-linux", "libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so",
          "libresolv.so", "libstdc++.so", "libgcc_s.so")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def copy_distribution(name: str, site: Path, skip: tuple[str, ...] = ()) -> int:
    """Copies the installed files of ``name`` (its ``.dist-info`` included) under ``site``."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        fail(f"{name} is not installed here; run the README's setup first")
    copied = 0
    for file in dist.files or ():
        rel = file.as_posix()
        if rel.startswith("..") or "__pycache__" in rel or rel.endswith(".pyc") or any(s in rel for s in skip):
            continue
        source = Path(dist.locate_file(file))
        if name in PURE and source.suffix == ".so":
            fail(f"{name} holds a compiled extension ({rel}); it belongs in BINARY")
        if source.is_file():
            target = site / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            copied += 1
    return copied


def strip_debug(library: Path) -> None:
    """Removes the debug sections (not the code or the symbols the loader uses)."""
    if shutil.which("objcopy"):
        subprocess.run(["objcopy", "--strip-debug", str(library)], check=True)


def download_wheels(python_version: str, wheels: Path) -> None:
    """The target Python's binary wheels of ``BINARY``, at the versions installed here."""
    abi = "cp" + python_version.replace(".", "")
    pins = [f"{name}=={metadata.version(name)}" for name in BINARY]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "--abi", abi,
               "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--platform", "manylinux_2_28_x86_64", "-d", str(wheels), *pins]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        fail(f"pip could not get the {abi} wheels of {', '.join(pins)}: {last}")


def system_libraries(library: Path, site: Path, syslibs: Path) -> list[str]:
    """Copies the libraries ``library`` loads from the system (not from its wheel, not glibc's)."""
    done = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True)
    copied = []
    for line in done.stdout.splitlines():
        parts = line.split("=>")
        if len(parts) != 2 or not parts[1].strip().startswith("/"):
            continue
        name, path = parts[0].strip(), Path(parts[1].split("(")[0].strip())
        if any(name.startswith(s) for s in SYSTEM) or site.resolve() in path.resolve().parents:
            continue  # glibc's, or the wheel's own (procgen2.libs, found through libenv.so's RPATH)
        shutil.copy2(path.resolve(), syslibs / name)
        copied.append(name)
    return sorted(copied)


def tree_bytes() -> int:
    """Bytes of the files the device tool moves with the working tree (tracked and untracked, not
    ignored)."""
    done = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          capture_output=True, check=True)
    paths = [ROOT / p for p in done.stdout.decode().split("\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file())


def build(out: Path, python_version: str, check_size: bool, preset: int = 6) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        site, wheels, syslibs = stage / "site", stage / "wheels", stage / "syslibs"
        for d in (site, wheels, syslibs):
            d.mkdir()
        files = copy_distribution(PROCGEN, site, PROCGEN_SKIP)
        libenv = site / "procgen" / "data" / "prebuilt" / "libenv.so"
        if not libenv.is_file():
            fail(f"the installed {PROCGEN} has no procgen/data/prebuilt/libenv.so")
        strip_debug(libenv)
        for name in PURE:
            files += copy_distribution(name, site)
        download_wheels(python_version, wheels)
        libs = system_libraries(libenv, site, syslibs)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w:xz", preset=preset) as tar:
            for d in (site, wheels, syslibs):
                tar.add(d, arcname=d.name)
        os.replace(partial, out)
    summary = {"archive": out, "bytes": out.stat().st_size, "files": files, "syslibs": libs}
    if check_size:
        tree = tree_bytes()
        summary["tree_bytes"] = tree
        if tree + summary["bytes"] > LIMIT:
            fail(f"the working tree ({tree / 2**20:.1f} MiB) plus the carry ({summary['bytes'] / 2**20:.1f} MiB) "
                 f"exceed the device tool's {LIMIT / 2**20:.0f} MiB; {out} is left for inspection")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the archive (.tar.xz)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (for the binary wheels)")
    parser.add_argument("--no-size-check", action="store_true", help="skip the 64 MiB check (an archive for tests)")
    parser.add_argument("--preset", type=int, default=6, choices=range(10), help="xz compression level")
    args = parser.parse_args(argv)
    summary = build(args.out, args.python_version, not args.no_size_check, args.preset)
    line = f"{summary['archive']}: {summary['bytes'] / 2**20:.1f} MiB, {summary['files']} files"
    if "tree_bytes" in summary:
        total = summary["tree_bytes"] + summary["bytes"]
        line += f"; with the working tree {total / 2**20:.1f} of {LIMIT / 2**20:.0f} MiB"
    print(line)
    print(f"system libraries carried for hosts without them: {', '.join(summary['syslibs']) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
