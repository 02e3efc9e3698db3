"""Collect Procgen experience into replay with a random policy and print what was collected.

    python -m datamodules.collect --game coinrun --env-steps 50000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from datamodules.procgen import GAMES
from datamodules.replay_datamodule import ReplayDataModule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--game", default="coinrun", choices=GAMES)
    parser.add_argument("--distribution-mode", default="easy")
    parser.add_argument("--num-levels", type=int, default=200)
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--env-steps", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", default="ram", choices=("ram", "memmap"))
    parser.add_argument("--replay-dir", default="runs/collect/replay")
    args = parser.parse_args(argv)

    dm = ReplayDataModule(
        game=args.game, num_envs=args.num_envs, distribution_mode=args.distribution_mode,
        num_levels=args.num_levels, seed=args.seed, replay_capacity=max(args.env_steps * 2, 4096),
        replay_storage=args.storage, replay_dir=args.replay_dir,
    )
    dm.setup("fit")
    start = time.perf_counter()
    dm.collector.collect(dm.policy, -(-args.env_steps // args.num_envs))
    seconds = time.perf_counter() - start
    episodes = dm.pop_episodes()
    returns = np.array([e["return"] for e in episodes])
    complete = np.array([e["level_complete"] for e in episodes])
    batch = dm.next_batch()
    print(f"game {args.game} ({args.distribution_mode}, {args.num_levels} levels), random policy")
    print(f"env steps {dm.env_steps} in {seconds:.1f} s ({dm.env_steps / seconds:,.0f} steps/s)")
    if len(episodes):
        print(
            f"episodes {len(episodes)}: return mean {returns.mean():.2f} (min {returns.min():.1f}, "
            f"max {returns.max():.1f}), level completion {complete.mean():.1%}"
        )
    print(
        f"replay: {len(dm.replay)} steps stored, {dm.replay.bytes_per_step:,.0f} bytes/step, "
        f"storage {args.storage}"
    )
    print("one batch: " + ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in batch.items()))


if __name__ == "__main__":
    main()
