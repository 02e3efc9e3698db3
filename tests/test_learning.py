"""Slow: the agent learns. Each learning config is trained from scratch (at most about 30 minutes on
2 CPU cores), its checkpoint plays 128 episodes on its training levels and 128 on unseen levels,
and its returns are compared with those of the random policy and of the best constant action
(chosen on the training levels), each over 128 episodes of the same levels:

- on the training levels it must beat both by at least 3 standard errors of the difference;
- on unseen levels it must beat the random policy by at least 2.

    python3 run.py test -m slow
"""

import pytest
import yaml

from clirun import ROOT, cli
from scripts.policy_baselines import agent_returns, baselines, best_constant, margin

EPISODES = 128


@pytest.mark.slow
@pytest.mark.timeout(4000)
@pytest.mark.parametrize("name", ["learn_starpilot"])
def test_agent_beats_random_and_the_best_constant_action(tmp_path, name):
    config_path = ROOT / "configs" / f"{name}.yaml"
    config = yaml.safe_load(config_path.read_text())
    data = config["data"]
    cli(tmp_path, "fit", "--config", str(config_path), timeout=3600)
    size = config["model"]["size"]
    ckpt = tmp_path / "runs" / f"{data['game']}-{size}-seed0" / "checkpoints" / "last.ckpt"
    envs = data.get("test_num_envs") or data["num_envs"]
    trained = agent_returns(ckpt, EPISODES, num_envs=envs)
    table = baselines(data["game"], data["num_levels"], data.get("distribution_mode", "easy"),
                      episodes=EPISODES, num_envs=envs)
    constant = best_constant(table)
    print(f"trained {trained}, random {table['random']}, best constant ({constant}) {table[constant]}")
    assert margin(trained["train_levels"], table["random"]["train_levels"]) >= 3
    assert margin(trained["train_levels"], table[constant]["train_levels"]) >= 3
    assert margin(trained["unseen_levels"], table["random"]["unseen_levels"]) >= 2
