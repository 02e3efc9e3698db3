"""Slow: the agent learns. Trains configs/learn_fruitbot.yaml (about 38 minutes on 2 CPU cores),
evaluates the checkpoint on 128 episodes of its training levels and 128 of unseen levels, and
compares with a random policy's return over 256 episodes of the same levels.

    python3 run.py test -m slow
"""

import pytest
import torch
import yaml

from clirun import ROOT, cli
from datamodules.replay_datamodule import RandomPolicy, ReplayDataModule

CONFIG = ROOT / "configs" / "learn_fruitbot.yaml"
# about 3 standard errors of the difference at these episode counts (returns vary by about 2.5)
MARGIN = 0.75


def random_policy_returns(data: dict, episodes: int = 256) -> dict[str, float]:
    dm = ReplayDataModule(game=data["game"], num_levels=data["num_levels"], num_envs=data["num_envs"],
                          test_num_envs=data["test_num_envs"], val_episodes=episodes,
                          replay_capacity=1024, seq_len=8)
    dm.setup("validate")
    return {split: dm.evaluate(RandomPolicy(0), split)["return"] for split in ("train_levels", "unseen_levels")}


def table(stdout: str) -> dict[str, list[float]]:
    """The validation table a run prints: split -> [return, normalised score, completion, episodes, ...]."""
    return {line.split()[0]: [float(x) for x in line.split()[1:]] for line in stdout.splitlines()
            if line.startswith(("train_levels", "unseen_levels"))}


@pytest.mark.slow
@pytest.mark.timeout(4000)
def test_small_agent_beats_random_on_fruitbot(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    cli(tmp_path, "fit", "--config", str(CONFIG), timeout=3600)
    ckpt = tmp_path / "runs" / "fruitbot-small-seed0" / "checkpoints" / "last.ckpt"
    trained = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert trained["ReplayDataModule"]["env_steps"] == config["model"]["max_env_steps"]
    (tmp_path / "eval").mkdir()
    out = cli(tmp_path / "eval", "validate", "--config", str(CONFIG), "--ckpt_path", str(ckpt),
              "--data.val_episodes", "128", timeout=900)
    rows = table(out.stdout)
    random = random_policy_returns(config["data"])
    print(f"trained {rows}, random {random}")
    for split in ("train_levels", "unseen_levels"):
        assert rows[split][3] == 128
        assert rows[split][0] > random[split] + MARGIN, (split, rows[split][0], random[split])
