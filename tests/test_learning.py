"""Slow: the whole trainer learns the sanity tasks within their targets (``datamodules/sanity.py``),
one seed each, through ``benchmarks/sanity_learning.py`` (which runs the real ``cli.py fit``):
half the optimal return within 2,000 updates on sanity-colour at ``tiny`` and ``1M``, within
5,000 on sanity-sprite and sanity-grid. The benchmark itself reports 3 seeds.

    python3 run.py test -m slow
"""

import json
import subprocess
import sys

import pytest

from clirun import ROOT


@pytest.mark.slow
@pytest.mark.timeout(6 * 3600)
@pytest.mark.parametrize("task, size", [("sanity-colour", "tiny"), ("sanity-colour", "1M"),
                                        ("sanity-sprite", "tiny"), ("sanity-grid", "tiny")])
def test_the_trainer_learns_each_sanity_task_within_its_target(tmp_path, task, size):
    out = subprocess.run([sys.executable, "benchmarks/sanity_learning.py", "--tasks", task, "--sizes", size,
                          "--seeds", "0", "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.loads((tmp_path / "out" / f"{task}-{size}-seed0.json").read_text())
    print(out.stdout)
    assert record["updates_to_half_optimal"] is not None, record["return_curve"][-5:]
