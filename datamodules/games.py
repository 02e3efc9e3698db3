"""Facts about the 16 Procgen games that need neither procgen nor gymnasium (the agent, the
benchmarks and the GPU check import them): names, distribution modes, action count, frame shape,
episode timeouts, and a uniformly random policy; and the names of the sanity tasks."""

from __future__ import annotations

import numpy as np
import torch

GAMES = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)
# small tasks with the same interface that any correct agent learns fast (datamodules/sanity.py)
SANITY_GAMES = ("sanity-colour", "sanity-sprite", "sanity-grid", "sanity-delay")
NUM_ACTIONS = 15
OBS_SHAPE = (64, 64, 3)
MAX_LEVEL_SEED = 2**31 - 1  # the largest level seed procgen accepts (its seeds are signed 32-bit)
EPISODE_KEY = "procgen_episode"  # where an env's step() reports finished episodes in info

_EXTRA_MODES = {
    "extreme": {"chaser", "dodgeball", "leaper", "starpilot"},
    "memory": {"caveflyer", "dodgeball", "heist", "jumper", "maze", "miner"},
    "exploration": {"caveflyer", "climber", "coinrun", "heist", "jumper", "leaper", "maze", "ninja"},
}
MODES = {
    game: ("easy", "hard") + tuple(mode for mode, games in _EXTRA_MODES.items() if game in games)
    for game in GAMES
}

# Steps after which procgen ends an episode by timeout (reported by procgen as an ordinary done).
TIMEOUTS = {game: 1000 for game in GAMES} | {
    "bigfish": 6000, "bossfight": 4000, "plunder": 4000, "leaper": 500, "maze": 500,
}


def unseen_mode(distribution_mode: str) -> str:
    """The mode unseen levels are played in: exploration mode's are hard mode's ordinary levels."""
    return "hard" if distribution_mode == "exploration" else distribution_mode


class RandomPolicy:
    """Uniformly random actions, seeded."""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)

    def actions(self, n: int) -> np.ndarray:
        return self.rng.integers(0, NUM_ACTIONS, size=n)

    def act(self, obs, is_first, state=None, reward=None):
        return torch.from_numpy(self.actions(len(obs))), None
