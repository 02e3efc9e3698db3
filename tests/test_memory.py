"""dreamer/memory.py: freed tensor memory is reused instead of faulted in again, and a bad
setting is refused in one line."""

import os
import subprocess
import sys

import pytest

from tests.clirun import ROOT, SMOKE, cli

# an update's worth of activations above glibc's 32 MB mmap limit, repeated: the page faults of 5
# steps, the fewest of 3 such windows (a one-off event of a host under memory pressure, such as a
# huge page split, can fault in one tensor's pages again; a heap that maps afresh does it in every window)
PROBE = """
import resource, torch
from dreamer.memory import keep_freed_memory
applied = keep_freed_memory()
def step():
    x = torch.ones(1024, 24, 32, 32)  # 100 MB
    y = torch.nn.functional.silu(x)
    return float((x * y).sum())
for _ in range(8):  # the heap settles
    step()
windows = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    windows.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(windows))
"""


def faults(setting: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "DREAMER_KEEP_FREED_MEMORY": setting})
    applied, count = out.stdout.split()
    return applied == "True", int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc only")
def test_freed_tensor_memory_is_reused_not_faulted_in_again():
    applied, kept = faults("1")
    declined, default = faults("0")
    assert applied and not declined
    # 100 MB is 24,415 pages of 4 kB: glibc's default maps and faults in all three tensors again
    assert default > 5 * 3 * 20_000, default
    assert kept < 1_000, kept


def test_dreamer_applies_it(monkeypatch):
    from dreamer import memory
    from dreamer.agent import Dreamer

    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setattr(memory, "_mallopt", lambda: True)
    Dreamer(size="tiny")
    assert memory._applied is True


@pytest.mark.parametrize("value", ["yes", "2", ""])
def test_bad_setting_is_refused_in_one_line(value, monkeypatch):
    from dreamer import memory

    monkeypatch.setenv("DREAMER_KEEP_FREED_MEMORY", value)
    with pytest.raises(ValueError, match=f"DREAMER_KEEP_FREED_MEMORY={value!r} is not allowed; use 1"):
        memory.wanted()


def test_cli_refuses_a_bad_setting_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMER_KEEP_FREED_MEMORY", "yes")
    out = cli(tmp_path, "fit", "--config", SMOKE, check=False, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: DREAMER_KEEP_FREED_MEMORY='yes' is not allowed")
    assert not (tmp_path / "runs").exists()
