"""What a learning agent must beat: the random policy and the best constant action.

    python benchmarks/policy_baselines.py --game coinrun --num-levels 10 --episodes 128
    python benchmarks/policy_baselines.py --config configs/learn_starpilot.yaml
    python benchmarks/policy_baselines.py --checkpoint runs/starpilot-1M-seed*/checkpoints/last.ckpt

Plays ``--episodes`` episodes per policy on the training levels and on unseen levels, with the
same envs and episode counting as validation (``ReplayDataModule.evaluate``), and prints mean
return with its standard error for the uniformly random policy and for each of the 15 constant
actions; the best constant action is chosen on the training levels. With ``--checkpoint`` (one or
more, of one game and level set, which they supply) the trained agents play the same episodes too,
and each gets its margin over random and over the best constant action in standard errors of the
difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datamodules.games import GAMES, NUM_ACTIONS  # noqa: E402
from datamodules.games import RandomPolicy
from datamodules.collector import mean_se, play_episodes
from datamodules.replay_datamodule import ReplayDataModule  # noqa: E402
from dreamer.checkpoints import CheckpointError, read_checkpoint, restore_agent  # noqa: E402

SPLITS = ("train_levels", "unseen_levels")


class ConstantPolicy:
    """Always the same action."""

    def __init__(self, action: int) -> None:
        self.action = action

    def act(self, obs, is_first, state=None, reward=None):
        return torch.full((len(obs),), self.action, dtype=torch.long), None


def baselines(game: str, num_levels: int, distribution_mode: str = "easy", start_level: int = 0,
              episodes: int = 128, num_envs: int = 16, seed: int = 0,
              actions: range | list[int] = range(NUM_ACTIONS)) -> dict[str, dict[str, tuple[float, float]]]:
    """{"random" | "action <a>": {split: (mean return, standard error)}} over ``episodes`` episodes."""
    dm = ReplayDataModule(game=game, num_levels=num_levels, distribution_mode=distribution_mode,
                          start_level=start_level, num_envs=num_envs, seed=seed, replay_capacity=1024,
                          seq_len=8)
    dm.setup("validate")
    policies = {"random": RandomPolicy(seed), **{f"action {a}": ConstantPolicy(a) for a in actions}}
    return {
        name: {split: mean_se(play_episodes(dm.eval_env(split), policy, episodes)[0]) for split in SPLITS}
        for name, policy in policies.items()
    }


def best_constant(table: dict[str, dict[str, tuple[float, float]]]) -> str:
    """The constant action with the highest mean return on the training levels."""
    return max((k for k in table if k.startswith("action")), key=lambda k: table[k]["train_levels"][0])


def margin(a: tuple[float, float], b: tuple[float, float]) -> float:
    """(mean_a - mean_b) in standard errors of the difference."""
    return (a[0] - b[0]) / float(np.hypot(a[1], b[1]))


def checkpoint_levels(path: str | Path) -> tuple[str, int, int, str]:
    """(game, num_levels, start_level, mode) a checkpoint was trained on."""
    data = read_checkpoint(path).get("datamodule_hyper_parameters") or {}
    if "game" not in data:
        raise CheckpointError(f"{path} does not say which game and levels it was trained on")
    return data["game"], data["num_levels"], data.get("start_level", 0), data.get("distribution_mode", "easy")


def agent_returns(path: str | Path, episodes: int = 128, num_envs: int = 16) -> dict[str, tuple[float, float]]:
    """{split: (mean return, standard error)} of a checkpoint's agent, on its own levels."""
    game, num_levels, start_level, mode = checkpoint_levels(path)
    agent = restore_agent(read_checkpoint(path), path)
    dm = ReplayDataModule(game=game, num_levels=num_levels, start_level=start_level, distribution_mode=mode,
                          num_envs=num_envs, replay_capacity=1024, seq_len=8)
    dm.setup("validate")
    with torch.inference_mode():
        return {split: mean_se(play_episodes(dm.eval_env(split), agent, episodes)[0]) for split in SPLITS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a training config: game, levels and mode are read from its data section")
    parser.add_argument("--game", default="coinrun")
    parser.add_argument("--num-levels", type=int, default=200)
    parser.add_argument("--start-level", type=int, default=0)
    parser.add_argument("--mode", default="easy")
    parser.add_argument("--episodes", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", nargs="+", default=[], help="trained agents to compare (same game and levels)")
    args = parser.parse_args(argv)
    if args.checkpoint:
        try:
            levels = {checkpoint_levels(path) for path in args.checkpoint}
        except CheckpointError as e:
            parser.error(str(e))
        if len(levels) > 1:
            parser.error(f"the checkpoints were trained on different games or levels: {sorted(levels)}")
        args.game, args.num_levels, args.start_level, args.mode = levels.pop()
    if args.config:
        try:
            data = (yaml.safe_load(Path(args.config).read_text()) or {}).get("data", {})
        except (OSError, yaml.YAMLError) as e:
            parser.error(f"cannot read config {args.config}: {e}")
        args.game = data.get("game", args.game)
        args.num_levels = data.get("num_levels", args.num_levels)
        args.start_level = data.get("start_level", args.start_level)
        args.mode = data.get("distribution_mode", args.mode)
    if args.game not in GAMES:
        parser.error(f"unknown game {args.game!r}; allowed: {', '.join(GAMES)}")
    if args.episodes < 2:
        parser.error("--episodes must be >= 2 (a standard error needs two)")
    try:
        table = baselines(args.game, args.num_levels, args.mode, args.start_level, args.episodes, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    best = best_constant(table)
    print(f"{args.game}, {args.mode}, levels [{args.start_level}, {args.start_level + args.num_levels}), "
          f"{args.episodes} episodes per policy and split")
    print(f"{'policy':<12}" + "".join(f"{s:>24}" for s in SPLITS))
    for name, row in table.items():
        mark = "  <- best constant" if name == best else ""
        print(f"{name:<12}" + "".join(f"{m:>16.2f} +- {se:<5.2f}" for m, se in row.values()) + mark)
    for path in args.checkpoint:
        row = agent_returns(path, args.episodes)
        print(f"{str(path)}\n{'trained':<12}" + "".join(f"{m:>16.2f} +- {se:<5.2f}" for m, se in row.values())
              + f"  margin over random {margin(row['train_levels'], table['random']['train_levels']):+.1f} SE"
              f" (unseen {margin(row['unseen_levels'], table['random']['unseen_levels']):+.1f}),"
              f" over {best} {margin(row['train_levels'], table[best]['train_levels']):+.1f} SE")


if __name__ == "__main__":
    main()
