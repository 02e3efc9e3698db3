"""The cross-check of the sanity tasks: SheepRL's DreamerV3 (its Nature-version port, the reference's
1M preset) trained on the same task, one update per 16 env steps, in SheepRL's own venv (set up by
../shared/bench/sheeprl/setup.sh; SheepRL stays out of this project's dependencies):

    PYTHONPATH=benchmarks/sheeprl_sanity:. /tmp/bench-sheeprl/bin/python -c "from sheeprl.cli import run; run()" \
        "hydra.searchpath=[file://$PWD/benchmarks/sheeprl_sanity]" exp=dreamer_v3_5_sanity \
        env.id=sanity-colour algo.per_rank_sequence_length=16

It prints each finished episode's return (``reward_env_<i>`` at ``policy_step``, env steps of all
envs); ``docs/learning.md`` has the figures. This module makes one lane of a sanity task a
gymnasium.Env for SheepRL's gym wrapper."""
import gymnasium
import numpy as np
from gymnasium import spaces

from datamodules.procgen import vector_env


class SanityEnv(gymnasium.Env):
    """One lane of ``vector_env(id, 1, ...)``: same frames, rewards, terminations and truncations."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, id="sanity-colour", num_levels=1000, seed=None, render_mode="rgb_array"):
        self.env = vector_env(id, 1, "easy", num_levels, 0, seed)
        self.observation_space = spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.action_space = spaces.Discrete(15)
        self.render_mode = render_mode
        self._obs = None

    def reset(self, seed=None, options=None):
        obs, _ = self.env.reset(seed=seed)
        self._obs = obs[0]
        return obs[0], {}

    def step(self, action):
        obs, r, te, tr, info = self.env.step(np.array([int(action)]))
        self._obs = obs[0]
        return obs[0], float(r[0]), bool(te[0]), bool(tr[0]), {}

    def render(self):
        return self._obs


def make_sanity(id, num_levels=1000, seed=None, render_mode="rgb_array"):
    """SheepRL's ``env.wrapper._target_``."""
    return SanityEnv(id, num_levels, seed, render_mode)
