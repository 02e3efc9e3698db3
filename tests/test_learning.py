"""Slow: the agent learns. Trains configs/learn_fruitbot.yaml (about 38 minutes on 2 CPU cores)
and compares its validation return on the training levels and on unseen levels with a random
policy's on the same levels.

    python3 run.py test -m slow
"""

import pytest
import torch
import yaml

from clirun import ROOT, cli
from datamodules.replay_datamodule import RandomPolicy, ReplayDataModule

CONFIG = ROOT / "configs" / "learn_fruitbot.yaml"


def random_policy_returns(data: dict, episodes: int = 64) -> dict[str, float]:
    dm = ReplayDataModule(game=data["game"], num_levels=data["num_levels"], num_envs=data["num_envs"],
                          test_num_envs=data["test_num_envs"], val_episodes=episodes,
                          replay_capacity=1024, seq_len=8)
    dm.setup("validate")
    return {split: dm.evaluate(RandomPolicy(0), split)["return"] for split in ("train_levels", "unseen_levels")}


@pytest.mark.slow
@pytest.mark.timeout(4000)
def test_small_agent_beats_random_on_fruitbot(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    out = cli(tmp_path, "fit", "--config", str(CONFIG), timeout=3600)
    ckpt = tmp_path / "runs" / "fruitbot-small-seed0" / "checkpoints" / "last.ckpt"
    trained = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert trained["ReplayDataModule"]["env_steps"] == config["model"]["max_env_steps"]
    # the validation table printed at the end of training
    rows = {line.split()[0]: float(line.split()[1]) for line in out.stdout.splitlines()
            if line.startswith(("train_levels", "unseen_levels"))}
    random = random_policy_returns(config["data"])
    print(f"trained {rows}, random {random}")
    for split in ("train_levels", "unseen_levels"):
        assert rows[split] > random[split] + 1.0, (split, rows[split], random[split])
