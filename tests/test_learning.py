"""Slow: the agent learns. Trains configs/learn_bigfish.yaml (about 25 minutes on 2 CPU cores)
and compares its validation return with a random policy's on the same training levels.

This check does not pass yet: see the README's status (the tiny world model does not learn to
predict bigfish's rewards within this budget).

    python3 run.py test -m slow
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules.replay_datamodule import RandomPolicy, ReplayDataModule

ROOT = Path(__file__).resolve().parents[1]


def random_policy_return(episodes: int = 64) -> float:
    dm = ReplayDataModule(game="bigfish", num_levels=10, num_envs=8, test_num_envs=16,
                          val_episodes=episodes, replay_capacity=1024, seq_len=8)
    dm.setup("validate")
    return dm.evaluate(RandomPolicy(0), "train_levels")["return"]


@pytest.mark.slow
def test_tiny_agent_beats_random_on_bigfish(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "fit", "--config",
         str(ROOT / "configs" / "learn_bigfish.yaml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=3600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-5000:]
    ckpt = tmp_path / "runs" / "bigfish-tiny-seed0" / "checkpoints" / "last.ckpt"
    trained = torch.load(ckpt, weights_only=False, map_location="cpu")
    assert trained["ReplayDataModule"]["env_steps"] == 80_000
    # the validation table printed at the end of training
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("train_levels")]
    trained_return = float(rows[-1][1])
    random_return = random_policy_return()
    assert trained_return > random_return + 2.0, (trained_return, random_return)
