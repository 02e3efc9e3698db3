"""Procgen as a gymnasium ``VectorEnv``: one call into C++ steps every game of the batch.

Procgen aborts the whole Python process on a bad game name, mode or option type, so every
argument is checked here, in Python, before procgen is called.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper

from datamodules.games import EPISODE_KEY, GAMES, MAX_LEVEL_SEED, MODES, NUM_ACTIONS, OBS_SHAPE, TIMEOUTS, unseen_mode
from datamodules.sanity import SANITY_TASKS
from dreamer.compat import gym3_buffers, resolve_gym3_close

# Procgen options this wrapper passes through, with their types.
OPTION_TYPES = {
    "use_backgrounds": bool,
    "restrict_themes": bool,
    "use_monochrome_assets": bool,
    "use_generated_assets": bool,
    "center_agent": bool,
    "paint_vel_info": bool,
    "use_sequential_levels": bool,
    "num_threads": int,
}


def _check_int(name: str, value: Any, minimum: int, maximum: int = MAX_LEVEL_SEED) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value}")
    return int(value)


def validate_procgen_args(
    game: str,
    num_envs: int,
    distribution_mode: str,
    num_levels: int,
    start_level: int,
    seed: int | None,
    options: dict[str, Any],
) -> None:
    """Raise ``ValueError`` naming what is allowed for any argument procgen would abort on (the
    sanity tasks of ``datamodules/sanity.py`` take the same arguments, in easy mode, no options)."""
    if not isinstance(game, str) or (game not in GAMES and game not in SANITY_TASKS):
        raise ValueError(f"unknown game {game!r}; allowed: {', '.join(GAMES)}, or a sanity task: "
                         f"{', '.join(SANITY_TASKS)}")
    if game in SANITY_TASKS and distribution_mode != "easy":
        raise ValueError(f"distribution_mode {distribution_mode!r} is not available for {game}; allowed: easy")
    if game in SANITY_TASKS and options:
        raise ValueError(f"{game} takes no procgen options, got {', '.join(sorted(options))}")
    if game in GAMES and distribution_mode not in MODES[game]:
        raise ValueError(
            f"distribution_mode {distribution_mode!r} is not available for {game}; "
            f"allowed for {game}: {', '.join(MODES[game])}"
        )
    _check_int("num_envs", num_envs, 1, 4096)
    _check_int("num_levels", num_levels, 0)
    _check_int("start_level", start_level, 0)
    if num_levels and start_level + num_levels > MAX_LEVEL_SEED + 1:
        raise ValueError(
            f"start_level + num_levels must not exceed 2**31 (procgen's seeds are 32-bit), "
            f"got {start_level} + {num_levels}"
        )
    if distribution_mode == "exploration" and (num_levels or start_level):
        raise ValueError(
            "exploration mode plays procgen's single fixed exploration level; "
            "set num_levels and start_level to 0 with it"
        )
    if seed is not None:
        _check_int("seed", seed, 0)
    for name, value in options.items():
        if name not in OPTION_TYPES:
            raise ValueError(
                f"unknown procgen option {name!r}; allowed: {', '.join(sorted(OPTION_TYPES))} "
                "(plus the constructor arguments game, num_envs, distribution_mode, num_levels, "
                "start_level, seed)"
            )
        kind = OPTION_TYPES[name]
        if kind is bool and not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"procgen option {name} must be true or false, got {value!r}")
        if kind is int:
            _check_int(name, value, 1, 64)


def raw_procgen_env(**kwargs: Any):
    """``procgen.ProcgenGym3Env(**kwargs)``, made safe to garbage-collect at any moment.

    gym3 closes an env from ``__del__`` by looking up ``libenv_close`` on its cffi library, which
    takes the lock that every gym3 env shares while it is being constructed. A collection that runs
    inside another env's construction then deadlocks the process. Resolving the name now means the
    later lookup needs no lock.
    """
    # procgen imports the unmaintained ``gym`` package, which prints a banner to stderr.
    with contextlib.redirect_stderr(io.StringIO()):
        import procgen
    env = procgen.ProcgenGym3Env(**kwargs)
    resolve_gym3_close(env)
    return env



class ProcgenVectorEnv(VectorEnv):
    """A batch of ``num_envs`` Procgen games stepped by one call into procgen's C++ (gym3 API).

    Spaces: observations ``uint8 (num_envs, 64, 64, 3)``; actions ``MultiDiscrete([15] * num_envs)``
    (``single_action_space`` is ``Discrete(15)``); rewards ``float32 (num_envs,)``.

    Episode ends: procgen reports a single ``done``. It becomes ``truncated`` when the episode
    reached the game's timeout (``TIMEOUTS``) without completing the level, and ``terminated``
    otherwise (death or level complete).

    Autoreset is ``SAME_STEP``, as procgen does it: the observation returned on the step where an
    episode ends is already the first frame of the next episode. **The terminal frame is never
    observable** (procgen does not render it), so unlike gymnasium's other same-step envs there is
    no ``info["final_obs"]``; ``info["final_info"]`` is not provided either, because the episode's
    statistics are reported directly in ``info`` on that step:

    - ``info["level_seed"]`` (int, every step): the level each env is playing now;
    - ``info["prev_level_complete"]`` (bool, on steps where an episode ended, valid where
      ``info["_prev_level_complete"]``): the episode that just ended completed its level;
    - ``info["procgen_episode"]`` = ``{"r": return, "l": length, "level_complete": bool,
      "level_seed": seed of the finished level}``, arrays valid where ``info["_procgen_episode"]``
      is true. Not ``info["episode"]``: that key belongs to gymnasium's ``RecordEpisodeStatistics``,
      which can wrap this env and then reports the same returns and lengths.

    Gymnasium's vector observation wrappers (``ResizeObservation``, ``GrayscaleObservation``, ...)
    refuse every same-step env, because they cannot reach the terminal frames in
    ``info["final_obs"]``; this env has none, so ``TransformObservations`` transforms its frames
    correctly instead.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": ["rgb_array"]}

    def __init__(
        self,
        game: str,
        num_envs: int,
        distribution_mode: str = "easy",
        num_levels: int = 0,
        start_level: int = 0,
        seed: int | None = None,
        **procgen_options: Any,
    ) -> None:
        if game in SANITY_TASKS:  # procgen would abort the process on the name
            raise ValueError(f"{game} is a sanity task, not a procgen game: build it with vector_env")
        validate_procgen_args(
            game, num_envs, distribution_mode, num_levels, start_level, seed, procgen_options
        )
        self.game = game
        self.num_envs = int(num_envs)
        self.distribution_mode = distribution_mode
        self.num_levels = int(num_levels)
        self.start_level = int(start_level)
        self.procgen_options = dict(procgen_options)
        self.timeout = TIMEOUTS[game]
        self.render_mode = "rgb_array"

        self.single_observation_space = gym.spaces.Box(0, 255, OBS_SHAPE, np.uint8)
        self.single_action_space = gym.spaces.Discrete(NUM_ACTIONS)
        self.observation_space = gym.spaces.Box(0, 255, (self.num_envs, *OBS_SHAPE), np.uint8)
        self.action_space = gym.spaces.MultiDiscrete(np.full(self.num_envs, NUM_ACTIONS))

        self._seed_rng = np.random.default_rng(seed)
        self._env = None
        self._fresh = False
        self._make(self._next_seed())

    def _next_seed(self) -> int:
        return int(self._seed_rng.integers(0, MAX_LEVEL_SEED))

    def _make(self, rand_seed: int) -> None:
        if self._env is not None:
            self._env.close()
        self.rand_seed = rand_seed  # procgen's own seed for this batch of games
        kwargs = dict(self.procgen_options)
        if self.distribution_mode != "exploration":
            kwargs.update(num_levels=self.num_levels, start_level=self.start_level)
        self._env = raw_procgen_env(
            num=self.num_envs,
            env_name=self.game,
            distribution_mode=self.distribution_mode,
            rand_seed=rand_seed,
            **kwargs,
        )
        # Read procgen's own buffers (filled in place by libenv_observe) instead of gym3's
        # get_info(), which builds a Python dict per env on every call.
        buf = gym3_buffers(self._env)
        self._c_lib, self._c_env = buf.c_lib, buf.c_env
        self._act_buf, self._rew_buf, self._first_buf, self._obs_buf = buf.action, buf.reward, buf.first, buf.obs
        self._seed_buf, self._complete_buf = buf.level_seed, buf.level_complete
        self._returns = np.zeros(self.num_envs, np.float32)
        self._lengths = np.zeros(self.num_envs, np.int64)
        self._c_lib.libenv_observe(self._c_env)
        self._seeds = self._seed_buf.astype(np.int64)
        self._fresh = True

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start new episodes in every env. With ``seed``, the batch is rebuilt from that seed."""
        self._check_open()
        if seed is not None:
            _check_int("seed", seed, 0)
            self._seed_rng = np.random.default_rng(seed)
            self._make(self._next_seed())
        elif not self._fresh:
            self._make(self._next_seed())
        self._fresh = False
        self._c_lib.libenv_observe(self._c_env)
        self._seeds = self._seed_buf.astype(np.int64)
        return self._obs_buf.copy(), {"level_seed": self._seeds}

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        self._check_open()
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,) or actions.dtype.kind not in "iu":
            raise ValueError(
                f"actions must be integers of shape ({self.num_envs},), got "
                f"{actions.dtype} {actions.shape}"
            )
        # one comparison covers both ends: negative actions become huge unsigned ones
        if actions.astype(np.uint64).max() >= NUM_ACTIONS:
            raise ValueError(f"actions must lie in [0, {NUM_ACTIONS - 1}], got {actions}")
        self._fresh = False
        self._act_buf[:] = actions
        self._c_lib.libenv_act(self._c_env)
        self._c_lib.libenv_observe(self._c_env)

        obs = self._obs_buf.copy()
        rewards = self._rew_buf.copy()
        done = self._first_buf.astype(bool)
        self._returns += rewards
        self._lengths += 1
        seeds_before, self._seeds = self._seeds, self._seed_buf.astype(np.int64)
        info: dict[str, Any] = {"level_seed": self._seeds}
        if not done.any():
            return obs, rewards, done, done.copy(), info
        complete = self._complete_buf.astype(bool) & done
        info["prev_level_complete"] = complete
        info["_prev_level_complete"] = done
        truncated = done & (self._lengths >= self.timeout) & ~complete
        terminated = done & ~truncated
        info[EPISODE_KEY] = {
            "r": np.where(done, self._returns, 0.0).astype(np.float32),
            "l": np.where(done, self._lengths, 0),
            "level_complete": complete,
            "level_seed": seeds_before,
        }
        info[f"_{EPISODE_KEY}"] = done
        self._returns[done] = 0.0
        self._lengths[done] = 0
        return obs, rewards, terminated, truncated, info

    def render(self) -> np.ndarray:
        """The current observation of every env, ``uint8 (num_envs, 64, 64, 3)``."""
        self._check_open()
        self._c_lib.libenv_observe(self._c_env)
        return self._obs_buf.copy()

    def get_state(self) -> list[bytes]:
        """Each env's whole game state (procgen's serialised bytes, RNG included), for ``set_state``."""
        self._check_open()
        return self._env.get_state()

    def set_state(self, states: list[bytes]) -> np.ndarray:
        """Put env i into ``states[i]`` (from ``get_state`` of an env of the same game); returns
        the frames (N, 64, 64, 3). Episode returns and lengths count from here."""
        self._check_open()
        if len(states) != self.num_envs:
            raise ValueError(f"set_state needs {self.num_envs} states, one per env, got {len(states)}")
        self._env.set_state(list(states))
        self._c_lib.libenv_observe(self._c_env)
        self._seeds = self._seed_buf.astype(np.int64)
        self._returns[:] = 0.0
        self._lengths[:] = 0
        self._fresh = False
        return self._obs_buf.copy()

    def _check_open(self) -> None:
        # procgen's C++ env is freed on close: using it afterwards would crash the process
        if self._env is None:
            raise RuntimeError(f"this {self.game} ProcgenVectorEnv is closed; make a new one to play on")

    def close_extras(self, **kwargs: Any) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


class TransformObservations(VectorWrapper):
    """Applies ``func`` to the batch of frames ``(num_envs, 64, 64, 3)`` a ``ProcgenVectorEnv``
    returns from ``reset`` and ``step``; ``observation_space`` is the space of the result (a batched
    ``Box``, whose first axis is the envs: ``single_observation_space`` is one env's slice of it).

    The same-step counterpart of gymnasium's ``TransformObservation``: Procgen shows no terminal
    frame, so every frame the env returns is one to transform, and nothing else needs it.
    """

    def __init__(self, env: VectorEnv, func: Any, observation_space: gym.Space | None = None) -> None:
        super().__init__(env)
        self.func = func
        if observation_space is not None:
            self.observation_space = observation_space
            if isinstance(observation_space, gym.spaces.Box):
                self.single_observation_space = gym.spaces.Box(
                    observation_space.low[0], observation_space.high[0], dtype=observation_space.dtype)

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        return self.func(obs), info

    def step(self, actions: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(actions)
        return self.func(obs), reward, terminated, truncated, info


@dataclass
class ProcgenConfig:
    """Which Procgen levels to train on; the unseen test levels are derived from it."""

    game: str = "coinrun"
    num_envs: int = 16
    distribution_mode: str = "easy"
    num_levels: int = 200
    start_level: int = 0
    seed: int = 0
    test_num_envs: int | None = None


def unseen_levels(cfg: ProcgenConfig) -> tuple[int, int]:
    """``(start_level, num_levels)`` of a level range that never overlaps the training levels.

    Training on ``num_levels = 0`` (the full distribution) leaves no unseen levels; so does
    exploration mode's single level, for which the unseen levels are the game's ordinary ones.
    """
    if cfg.distribution_mode == "exploration":
        return 0, 0
    if cfg.num_levels == 0:
        raise ValueError(
            "num_levels = 0 trains on every level, so there are no unseen levels to test on; "
            "set num_levels to a positive number of training levels (Procgen's protocol: 200 "
            "on easy, 500 on hard)"
        )
    start = cfg.start_level + cfg.num_levels
    if start >= MAX_LEVEL_SEED:
        raise ValueError("the training levels leave no level seeds above them for testing")
    return start, MAX_LEVEL_SEED + 1 - start


def vector_env(game: str, num_envs: int, distribution_mode: str = "easy", num_levels: int = 0,
               start_level: int = 0, seed: int | None = None, **procgen_options: Any) -> VectorEnv:
    """The env a game name plays: a ``ProcgenVectorEnv``, or for ``sanity-*`` names the sanity
    task (``datamodules/sanity.py``), which needs no procgen. Arguments are checked first."""
    validate_procgen_args(game, num_envs, distribution_mode, num_levels, start_level, seed, procgen_options)
    if game in SANITY_TASKS:
        return SANITY_TASKS[game](game, num_envs, distribution_mode, num_levels, start_level, seed)
    return ProcgenVectorEnv(game, num_envs, distribution_mode, num_levels, start_level, seed, **procgen_options)


def unseen_env(cfg: ProcgenConfig, num_envs: int, seed: int, **procgen_options: Any) -> VectorEnv:
    """``num_envs`` envs on the unseen levels of a run trained with ``cfg`` (see ``unseen_levels``)."""
    start, count = unseen_levels(cfg)
    return vector_env(cfg.game, num_envs, unseen_mode(cfg.distribution_mode), count, start,
                      seed=seed, **procgen_options)


def training_levels_env(cfg: ProcgenConfig, num_envs: int, seed: int, **procgen_options: Any) -> VectorEnv:
    """``num_envs`` envs on the training levels ``[start_level, start_level + num_levels)``."""
    return vector_env(cfg.game, num_envs, cfg.distribution_mode, cfg.num_levels, cfg.start_level,
                      seed=seed, **procgen_options)


def make_env_pair(cfg: ProcgenConfig, **procgen_options: Any) -> tuple[VectorEnv, VectorEnv]:
    """Train env on levels ``[start_level, start_level + num_levels)``; test env on levels outside it.

    The test env plays the same game (exploration mode: its ``hard`` levels) from a disjoint seed
    range above the training levels, with its own env seed.
    """
    train = training_levels_env(cfg, cfg.num_envs, cfg.seed, **procgen_options)
    test = unseen_env(cfg, cfg.test_num_envs or cfg.num_envs, cfg.seed + 1_000_003, **procgen_options)
    return train, test


# (R_min, R_max) per game for normalised scores (Cobbe et al. 2020), easy and hard.
SCORE_RANGES = {
    "easy": {
        "bigfish": (1, 40), "bossfight": (0.5, 13), "caveflyer": (3.5, 12), "chaser": (0.5, 13),
        "climber": (2, 12.6), "coinrun": (5, 10), "dodgeball": (1.5, 19), "fruitbot": (-1.5, 32.4),
        "heist": (3.5, 10), "jumper": (1, 10), "leaper": (1.5, 10), "maze": (5, 10),
        "miner": (1.5, 13), "ninja": (3.5, 10), "plunder": (4.5, 30), "starpilot": (2.5, 64),
    },
    "hard": {
        "bigfish": (0, 40), "bossfight": (0.5, 13), "caveflyer": (2, 13.4), "chaser": (0.5, 14.2),
        "climber": (1, 12.6), "coinrun": (5, 10), "dodgeball": (1.5, 19), "fruitbot": (-0.5, 27.2),
        "heist": (2, 10), "jumper": (1, 10), "leaper": (1.5, 10), "maze": (4, 10),
        "miner": (1.5, 20), "ninja": (2, 10), "plunder": (3, 30), "starpilot": (1.5, 35),
    },
}


def normalized_score(game: str, distribution_mode: str, episode_return: float) -> float:
    """(R - R_min) / (R_max - R_min); modes other than easy use the hard-mode constants. A sanity
    task's range runs from its random to its optimal return."""
    if game in SANITY_TASKS:
        lo, hi = SANITY_TASKS[game].RANDOM_RETURN, SANITY_TASKS[game].OPTIMAL_RETURN
    else:
        lo, hi = SCORE_RANGES["easy" if distribution_mode == "easy" else "hard"][game]
    return (episode_return - lo) / (hi - lo)
