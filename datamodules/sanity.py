"""Sanity tasks: small games that any correct DreamerV3 learns fast, played through the same
interface as ``ProcgenVectorEnv`` (64x64x3 uint8 frames, 15 actions, same-step autoreset, level
seeds with a training / unseen split, the same ``info`` keys), so that the whole trainer runs on
them without procgen: ``cli.py fit --data.game sanity-colour``.

A task that does not learn points at a bug in the trainer, not at a small budget. The targets
(updates to half the optimal return) are measured by ``benchmarks/sanity_learning.py``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv

from datamodules.games import EPISODE_KEY, MAX_LEVEL_SEED, NUM_ACTIONS, OBS_SHAPE, SANITY_GAMES

# 15 colours, one per action, pairwise at least 128 apart in some channel; none is the grey
# background (96) nor the white reward stripe.
PALETTE = np.array([
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
    (0, 255, 255), (255, 128, 0), (128, 0, 255), (0, 128, 255), (255, 0, 128),
    (0, 255, 128), (128, 255, 0), (0, 0, 0), (128, 0, 0), (0, 128, 0),
], np.uint8)
BACKGROUND = 96
STRIPE_ROWS = 16  # the frame after a rewarded step shows a white stripe over its top rows

# Procgen's 15 actions as (dx, dy) on screen: LEFT+DOWN, LEFT, LEFT+UP, DOWN, none, UP,
# RIGHT+DOWN, RIGHT, RIGHT+UP, then six keys (D, A, W, S, Q, E) that do not move.
MOVES = np.array([(-1, 1), (-1, 0), (-1, -1), (0, 1), (0, 0), (0, -1), (1, 1), (1, 0), (1, -1)]
                 + [(0, 0)] * 6, np.int64)


class SanityVectorEnv(VectorEnv):
    """Base of the sanity tasks: ``num_envs`` lanes, levels chosen as procgen chooses them.

    Each episode plays one level: with ``num_levels > 0`` a seed drawn uniformly from
    ``[start_level, start_level + num_levels)``, else from all seeds. A level seed fixes the
    level's content (``_new_level``); the env's own ``seed`` fixes which levels are drawn. Spaces,
    autoreset and ``info`` are ``ProcgenVectorEnv``'s: the frame returned on the step where an
    episode ends is already the next episode's first; ``info["level_seed"]`` every step, and on
    steps where an episode ended ``info["procgen_episode"]`` (``r``, ``l``, ``level_complete``,
    ``level_seed``) and ``info["prev_level_complete"]``, valid where their ``_``-keys are true.

    Subclasses set ``TIMEOUT`` (steps after which an episode is truncated), ``RANDOM_RETURN`` and
    ``OPTIMAL_RETURN`` (the expected returns of the uniform random and the best policy, the range
    of ``normalized_score``) and implement ``_new_level``, ``_rewards`` and ``_render``.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": ["rgb_array"]}
    TIMEOUT = 64
    RANDOM_RETURN = 0.0
    OPTIMAL_RETURN = 1.0

    def __init__(self, game: str, num_envs: int, distribution_mode: str = "easy", num_levels: int = 0,
                 start_level: int = 0, seed: int | None = None) -> None:
        self.game, self.num_envs, self.distribution_mode = game, int(num_envs), distribution_mode
        self.num_levels, self.start_level = int(num_levels), int(start_level)
        self.timeout = self.TIMEOUT
        self.render_mode = "rgb_array"
        self.single_observation_space = gym.spaces.Box(0, 255, OBS_SHAPE, np.uint8)
        self.single_action_space = gym.spaces.Discrete(NUM_ACTIONS)
        self.observation_space = gym.spaces.Box(0, 255, (self.num_envs, *OBS_SHAPE), np.uint8)
        self.action_space = gym.spaces.MultiDiscrete(np.full(self.num_envs, NUM_ACTIONS))
        self._closed = False
        self._start(seed)

    # ---------------------------------------------------------------- what a task defines
    def _new_level(self, lanes: np.ndarray) -> None:
        """Set up the levels ``self.level_seed[lanes]`` in those lanes."""
        raise NotImplementedError

    def _rewards(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Apply ``actions`` (N,) at step ``self.t`` (before it counts this step): rewards (N,)
        float32 and level completed (N,) bool (which ends the episode as terminated)."""
        raise NotImplementedError

    def _render(self) -> np.ndarray:
        """The current frames (N, 64, 64, 3) uint8 (``self.t``: steps taken in each episode)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the vector env
    def _start(self, seed: int | None) -> None:
        n = self.num_envs
        self._lane_rngs = np.random.default_rng(seed).spawn(n)  # each lane draws its own levels
        self.level_seed = np.zeros(n, np.int64)
        self.t = np.zeros(n, np.int64)
        self.rewarded = np.zeros(n, bool)  # the last step paid: the stripe shows
        self._returns = np.zeros(n, np.float32)
        self._begin(np.arange(n))

    def _begin(self, lanes: np.ndarray) -> None:
        for i in lanes:
            if self.num_levels:
                self.level_seed[i] = self.start_level + self._lane_rngs[i].integers(0, self.num_levels)
            else:
                self.level_seed[i] = self._lane_rngs[i].integers(0, MAX_LEVEL_SEED)
        self.t[lanes] = 0
        self.rewarded[lanes] = False
        self._returns[lanes] = 0.0
        self._new_level(lanes)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start new episodes in every lane; with ``seed`` the level draws restart from it."""
        self._check_open()
        if seed is not None:
            self._start(seed)
        else:
            self._begin(np.arange(self.num_envs))
        return self._render(), {"level_seed": self.level_seed.copy()}

    def step(self, actions: np.ndarray):
        self._check_open()
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,) or actions.dtype.kind not in "iu":
            raise ValueError(f"actions must be integers of shape ({self.num_envs},), got {actions.dtype} {actions.shape}")
        if actions.astype(np.uint64).max() >= NUM_ACTIONS:
            raise ValueError(f"actions must lie in [0, {NUM_ACTIONS - 1}], got {actions}")
        rewards, complete = self._rewards(actions.astype(np.int64))
        self.t += 1
        self._returns += rewards
        self.rewarded = rewards > 0
        terminated = complete.copy()
        truncated = ~complete & (self.t >= self.TIMEOUT)
        done = terminated | truncated
        info: dict[str, Any] = {}
        if done.any():
            lanes = np.flatnonzero(done)
            info["prev_level_complete"] = complete & done
            info["_prev_level_complete"] = done
            info[EPISODE_KEY] = {
                "r": np.where(done, self._returns, 0.0).astype(np.float32),
                "l": np.where(done, self.t, 0),
                "level_complete": complete & done,
                "level_seed": self.level_seed.copy(),
            }
            info[f"_{EPISODE_KEY}"] = done
            self._begin(lanes)
        info["level_seed"] = self.level_seed.copy()
        return self._render(), rewards.astype(np.float32), terminated, truncated, info

    def render(self) -> np.ndarray:
        """The current frame of every lane, ``uint8 (num_envs, 64, 64, 3)``."""
        self._check_open()
        return self._render()

    LANE_STATE = ("level_seed", "t", "rewarded", "_returns")  # per-lane arrays; tasks add theirs

    def get_state(self) -> list[dict[str, np.ndarray]]:
        """Each lane's whole game state, for ``set_state`` (as procgen's ``get_state``)."""
        self._check_open()
        return [{**{k: np.copy(getattr(self, k)[i]) for k in self.LANE_STATE},
                 "rng": self._lane_rngs[i].bit_generator.state} for i in range(self.num_envs)]

    def set_state(self, states: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Put lane i into ``states[i]`` (from ``get_state`` of an env of the same task); returns
        the frames (N, 64, 64, 3). The lane's level draws follow the state too."""
        self._check_open()
        if len(states) != self.num_envs:
            raise ValueError(f"set_state needs {self.num_envs} states, one per lane, got {len(states)}")
        for i, state in enumerate(states):
            for k in self.LANE_STATE:
                getattr(self, k)[i] = state[k]
            self._lane_rngs[i].bit_generator.state = state["rng"]
        return self._render()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this {self.game} env is closed; make a new one to play on")

    def close_extras(self, **kwargs: Any) -> None:
        self._closed = True

    # ---------------------------------------------------------------- drawing helpers
    def _canvas(self) -> np.ndarray:
        """Grey frames (N, 64, 64, 3) with the reward stripe where the last step paid."""
        frames = np.full((self.num_envs, *OBS_SHAPE), BACKGROUND, np.uint8)
        frames[self.rewarded, :STRIPE_ROWS] = 255
        return frames

    def _level_rngs(self, lanes: np.ndarray) -> list[np.random.Generator]:
        # a level's content depends on its seed and the task only, never on the env's seed
        return [np.random.default_rng([int(self.level_seed[i]), sum(map(ord, self.game))]) for i in lanes]


class ColourTask(SanityVectorEnv):
    """``sanity-colour``: every frame is filled with one of 15 colours, and the action of that
    colour's index pays +1 this step; every other action pays 0. The frame after a rewarded step
    shows a white stripe over its top 16 rows. The level seed fixes the 64 colours in order.

    Episode: 64 steps (then truncated; never terminated). Optimal return 64; uniform random
    64 / 15 = 4.27. Target: half the optimal return (32) within 2,000 updates at ``tiny`` and ``1M``.
    """

    TIMEOUT = 64
    RANDOM_RETURN = 64 / 15
    OPTIMAL_RETURN = 64.0
    LANE_STATE = (*SanityVectorEnv.LANE_STATE, "cues")

    def _new_level(self, lanes: np.ndarray) -> None:
        if not hasattr(self, "cues"):
            self.cues = np.zeros((self.num_envs, self.TIMEOUT), np.int64)
        for i, rng in zip(lanes, self._level_rngs(lanes)):
            self.cues[i] = rng.integers(0, NUM_ACTIONS, self.TIMEOUT)

    def paying_action(self) -> np.ndarray:
        """The action (N,) that pays this step."""
        return self.cues[np.arange(self.num_envs), np.minimum(self.t, self.TIMEOUT - 1)]

    def _rewards(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (actions == self.paying_action()).astype(np.float32), np.zeros(self.num_envs, bool)

    def _render(self) -> np.ndarray:
        frames = self._canvas()
        colour = PALETTE[self.paying_action()][:, None, None, :]  # (N, 1, 1, 3)
        frames[:, STRIPE_ROWS:] = colour
        frames[~self.rewarded, :STRIPE_ROWS] = colour[~self.rewarded]
        return frames


class SpriteTask(ColourTask):
    """``sanity-sprite``: ``sanity-colour`` with the cue carried by a 2x2-pixel dot at rows and
    columns 40-41 on a grey frame (Procgen-sized sprites: can the encoder see them?). The white
    stripe over the top 16 rows still marks the frame after a rewarded step.

    Episode: 64 steps (truncated). Optimal return 64; uniform random 4.27. Target: half the optimal
    return within 5,000 updates.
    """

    DOT = (slice(40, 42), slice(40, 42))

    def _render(self) -> np.ndarray:
        frames = self._canvas()
        frames[(slice(None), *self.DOT)] = PALETTE[self.paying_action()][:, None, None, :]
        return frames


class DelayTask(ColourTask):
    """``sanity-delay``: the frame at step t is filled with the colour of the action that pays at
    step t + 3 (grey when no step is left to pay): the agent must remember what it saw 3 steps
    ago. Nothing pays in the first 3 steps. The white stripe marks the frame after a reward.

    Episode: 64 steps (truncated). Optimal return 61; uniform random 61 / 15 = 4.07. Target: half
    the optimal return within 5,000 updates.
    """

    DELAY = 3
    RANDOM_RETURN = (64 - DELAY) / 15
    OPTIMAL_RETURN = 64.0 - DELAY

    def _rewards(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        paid = (actions == self.paying_action()) & (self.t >= self.DELAY)
        return paid.astype(np.float32), np.zeros(self.num_envs, bool)

    def _render(self) -> np.ndarray:
        frames = self._canvas()
        ahead = self.t + self.DELAY
        shown = np.flatnonzero(ahead < self.TIMEOUT)
        colour = PALETTE[self.cues[shown, ahead[shown]]][:, None, None, :]  # (n, 1, 1, 3)
        striped = self.rewarded[shown]
        frames[shown, STRIPE_ROWS:] = colour
        frames[shown[~striped], :STRIPE_ROWS] = colour[~striped]
        return frames


class GridTask(SanityVectorEnv):
    """``sanity-grid``: walk to a target cell on an 8x8 grid of 8x8-pixel cells drawn into the
    frame (dark grid lines; the agent a blue square, the target a green one). Actions move as
    Procgen's do (diagonals included; the six key actions and action 4 stay put; the edges stop).
    Arriving pays +1 and ends the episode (terminated); every other step costs 0.01. The level seed
    fixes the start and target cells (distinct).

    Episode: at most 32 steps (then truncated). Optimal return 1 - 0.01 (d - 1) for a target d
    moves away, 0.97 on average over levels; uniform random -0.13 (100k simulated episodes, 16% of
    them reach the target). Target: half the optimal return (0.49) within 5,000 updates.
    """

    TIMEOUT = 32
    STEP_COST = 0.01
    RANDOM_RETURN = -0.13
    OPTIMAL_RETURN = 0.97
    CELLS = 8
    LANE_STATE = (*SanityVectorEnv.LANE_STATE, "agent", "target")

    def _new_level(self, lanes: np.ndarray) -> None:
        if not hasattr(self, "agent"):
            self.agent = np.zeros((self.num_envs, 2), np.int64)
            self.target = np.zeros((self.num_envs, 2), np.int64)
        for i, rng in zip(lanes, self._level_rngs(lanes)):
            start, target = rng.choice(self.CELLS**2, 2, replace=False)
            self.agent[i] = divmod(int(start), self.CELLS)[::-1]  # (x, y)
            self.target[i] = divmod(int(target), self.CELLS)[::-1]

    def _rewards(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.agent = np.clip(self.agent + MOVES[actions], 0, self.CELLS - 1)
        arrived = (self.agent == self.target).all(1)
        return np.where(arrived, 1.0, -self.STEP_COST).astype(np.float32), arrived

    def _render(self) -> np.ndarray:
        frames = np.full((self.num_envs, *OBS_SHAPE), BACKGROUND, np.uint8)
        frames[:, ::8] = 40  # grid lines
        frames[:, :, ::8] = 40
        lanes = np.arange(self.num_envs)[:, None, None]
        offsets = np.arange(1, 7)
        for cells, colour in ((self.target, (0, 220, 0)), (self.agent, (40, 80, 255))):
            rows = (cells[:, 1, None] * 8 + offsets)[:, :, None]  # (N, 6, 1)
            cols = (cells[:, 0, None] * 8 + offsets)[:, None, :]  # (N, 1, 6)
            frames[lanes, rows, cols] = colour
        return frames


SANITY_TASKS: dict[str, type[SanityVectorEnv]] = dict(zip(SANITY_GAMES, (ColourTask, SpriteTask, GridTask, DelayTask)))
