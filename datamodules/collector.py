"""Playing the game with a policy: the ``Rollout`` every env loop runs on, the ``Collector`` that
writes the training envs' experience into replay and keeps the episode statistics, the
``TrainRatio`` that says how much to collect before each batch, and ``evaluate`` for validation."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np
import torch

from datamodules.games import RandomPolicy
from datamodules.procgen import EPISODE_KEY, ProcgenVectorEnv, normalized_score
from datamodules.replay import SequenceReplay


class Policy(Protocol):
    """What the envs are played with (``Dreamer`` implements it).

    ``obs`` is uint8 (N, 64, 64, 3) and ``is_first`` bool (N,), both on the CPU; ``state`` is
    whatever the policy returned last time (None at the start); ``reward`` (N,) float32 the reward
    received on arriving at ``obs`` (0 on an episode's first frame). It must reset its recurrent
    state where ``is_first`` is true and return int actions (N,) in [0, 15) and its new state.
    """

    def act(
        self, obs: torch.Tensor, is_first: torch.Tensor, state: Any, reward: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]: ...


def policy_actions(policy: Policy, obs: np.ndarray, is_first: np.ndarray, state: Any,
                   reward: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
    """``policy.act`` on numpy arrays: actions (N,) int64 and the policy's next state. A
    ``RandomPolicy`` draws without a torch round trip."""
    if isinstance(policy, RandomPolicy):
        return policy.actions(len(obs)), None
    with torch.inference_mode():
        actions, state = policy.act(torch.from_numpy(obs), torch.from_numpy(is_first), state,
                                    reward=None if reward is None else torch.from_numpy(reward))
    return actions.cpu().numpy().astype(np.int64), state


class Transition(NamedTuple):
    """One vector step (N lanes): the frame acted from, the action taken from it and what the env
    gave back. ``reward_in`` was received on arriving at ``obs`` (0 on an episode's first frame);
    ``reward`` is the step's own. Where ``terminated | truncated`` the episode ended and procgen has
    already reset that lane: the next frame is a new episode's first, and ``info`` holds the
    finished episode's statistics."""

    obs: np.ndarray
    is_first: np.ndarray
    reward_in: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    info: dict[str, Any]


class Rollout:
    """A vector env played by a policy one step at a time: the one env loop that collection,
    evaluation, the dream pictures and the demo share.

    It carries what the policy sees between steps: the current frames ``obs``, ``is_first``, the
    reward received on arriving (``reward_in``) and the policy's ``state``. ``act`` draws the
    actions for the current frames, ``step`` takes them; ``reset`` starts fresh episodes.
    """

    def __init__(self, env: ProcgenVectorEnv) -> None:
        self.env = env
        self.obs: np.ndarray | None = None  # None: fresh episodes at the next act
        self.state: Any = None

    def reset(self) -> None:
        n = self.env.num_envs
        self.obs, _ = self.env.reset()
        self.is_first, self.reward_in, self.state = np.ones(n, bool), np.zeros(n, np.float32), None

    def act(self, policy: Policy) -> np.ndarray:
        """The policy's actions (N,) for the current frames (after a reset if none yet)."""
        if self.obs is None:
            self.reset()
        self.action, self.state = policy_actions(policy, self.obs, self.is_first, self.state, self.reward_in)
        return self.action

    def step(self) -> Transition:
        """Take the actions of the last ``act``."""
        obs, reward, terminated, truncated, info = self.env.step(self.action)
        done = terminated | truncated
        out = Transition(self.obs, self.is_first, self.reward_in, self.action, reward, terminated, truncated, info)
        self.obs, self.is_first = obs, done
        self.reward_in = np.where(done, 0.0, reward).astype(np.float32)
        return out


def play_episodes(env: ProcgenVectorEnv, policy: Policy, episodes: int) -> tuple[list[float], list[float]]:
    """Returns and level completions of ``episodes`` fresh episodes of ``policy`` on ``env``.

    Every env counts the same number of its first episodes (``ceil(episodes / num_envs)``), so long
    episodes are not under-represented.
    """
    per_env = -(-episodes // env.num_envs)
    counted = np.zeros(env.num_envs, np.int64)
    returns, completes = [], []
    rollout = Rollout(env)
    while (counted < per_env).any():
        rollout.act(policy)
        t = rollout.step()
        for i in np.flatnonzero((t.terminated | t.truncated) & (counted < per_env)):
            returns.append(float(t.info[EPISODE_KEY]["r"][i]))
            completes.append(float(t.info[EPISODE_KEY]["level_complete"][i]))
            counted[i] += 1
    return returns, completes


def mean_se(values) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation over sqrt(n); nan below two values)."""
    v = np.asarray(values, np.float64)
    mean = float(v.mean()) if len(v) else float("nan")
    return mean, float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def evaluate(env: ProcgenVectorEnv, policy: Policy, episodes: int) -> dict[str, float]:
    """Mean return (with its standard error), normalised score and level completion of ``episodes``
    fresh episodes (see ``play_episodes``), and the number of episodes played."""
    returns, completes = play_episodes(env, policy, episodes)
    game, mode = env.game, env.distribution_mode
    mean, se = mean_se(returns)
    return {
        "return": mean,
        "return_se": se,
        "normalized_score": float(np.mean([normalized_score(game, mode, r) for r in returns])),
        "level_complete": float(np.mean(completes)),
        "episodes": float(len(returns)),
    }


class Collector:
    """Steps the training envs with a policy and writes every step into ``replay``.

    Replay layout: each env writes the step it acts from (frame, action, reward received on
    arriving there, is_first). Procgen never shows a terminal frame, so when an episode ends one
    extra step is written for it: the episode's last frame again, with the final reward,
    ``is_last`` and ``is_terminal`` (false on a timeout), and no action (0). The next episode's
    first frame follows with ``is_first``.

    Episode statistics: ``episodes`` finished, the latest 100 (``recent_episodes``), those not yet
    taken by ``pop_episodes``, and with ``episodes_file`` one CSV row per finished episode.

    With ``acting_latents`` and a replay that keeps latents, each step also gets the posterior the
    policy acted from (its state's ``post``: ``deter`` (N, D), ``stoch`` (N, S, C)), as the newest
    DreamerV3 reference does; training overwrites it with its own posterior once it samples the step.
    """

    COLUMNS = ("env_steps", "return", "length", "level_complete", "level_seed")

    def __init__(self, env: ProcgenVectorEnv | None = None, replay: SequenceReplay | None = None,
                 episodes_file: Path | None = None, acting_latents: bool = False) -> None:
        self.replay, self.episodes_file, self.acting_latents = replay, episodes_file, acting_latents
        self.rollout: Rollout | None = None
        self.env = env
        self.env_steps = 0  # this collector's (this rank's)
        self.episodes = 0
        self.recent_episodes: deque[dict[str, float]] = deque(maxlen=100)
        self._new_episodes: list[dict[str, float]] = []
        self.restored = False  # collecting continues a run (after load_state_dict or a first collect)

    @property
    def env(self) -> ProcgenVectorEnv | None:
        return self.rollout.env if self.rollout is not None else None

    @env.setter
    def env(self, env: ProcgenVectorEnv | None) -> None:
        self.rollout = Rollout(env) if env is not None else None

    def restart(self) -> None:
        """The envs start fresh episodes at the next step (after a restore)."""
        if self.rollout is not None:
            self.rollout.obs = None

    def collect(self, policy: Callable[[], Policy], vector_steps: int) -> None:
        """Step every env ``vector_steps`` times with the policy ``policy()`` gives at each step.
        A fresh run (not restored, no steps yet) first empties a replay left by an earlier run in
        the same files and sets its episode file aside: it never trains on another run's data."""
        replay, rollout = self.replay, self.rollout
        if not self.restored and self.env_steps == 0:
            if len(replay):
                replay.clear()
            self.set_aside_episodes_file()
        self.restored = True
        zeros = np.zeros(rollout.env.num_envs, bool)
        for _ in range(vector_steps):
            rollout.act(policy())
            latent = self._latent(rollout.state)
            t = rollout.step()
            replay.add(t.obs, t.action, t.reward_in, t.is_first, zeros, zeros, **latent)
            self.env_steps += len(t.action)
            done = t.terminated | t.truncated
            if done.any():
                lanes = np.flatnonzero(done)
                replay.add(
                    t.obs[lanes], np.zeros(len(lanes), np.int64), t.reward[lanes],
                    np.zeros(len(lanes), bool), np.ones(len(lanes), bool), t.terminated[lanes],
                    lanes=lanes,
                )
                self._record_episodes(t.info[EPISODE_KEY], lanes)

    def _latent(self, state: Any) -> dict[str, np.ndarray]:
        """The posterior the policy acted from, as ``replay.add`` takes it ({} when not kept)."""
        post = getattr(state, "post", None)
        if not self.acting_latents or post is None or self.replay.latents is None:
            return {}
        return {"deter": post["deter"].to(torch.float16).cpu().numpy(),
                "stoch": post["stoch"].argmax(-1).to(torch.uint8).cpu().numpy()}

    def _record_episodes(self, episode: dict[str, np.ndarray], lanes: np.ndarray) -> None:
        rows = [{"return": float(episode["r"][i]), "length": int(episode["l"][i]),
                 "level_complete": float(episode["level_complete"][i]),
                 "level_seed": int(episode["level_seed"][i]), "env_steps": self.env_steps} for i in lanes]
        self.episodes += len(rows)
        self.recent_episodes.extend(rows)
        self._new_episodes.extend(rows)
        path = self.episodes_file
        if path is None:
            return
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            if new:
                f.write(",".join(self.COLUMNS) + "\n")
            f.writelines(",".join(str(row[c]) for c in self.COLUMNS) + "\n" for row in rows)

    def pop_episodes(self) -> list[dict[str, float]]:
        """Episodes finished since the last call: return, length, level_complete, level_seed, env_steps."""
        new, self._new_episodes = self._new_episodes, []
        return new

    def set_aside_episodes_file(self) -> None:
        """A fresh run in a directory that holds an earlier run's episode file keeps that file,
        renamed to ``<name>.<n>.csv``, and starts its own."""
        path = self.episodes_file
        if path is None or not path.exists():
            return
        n = 1
        while path.with_suffix(f".{n}.csv").exists():
            n += 1
        os.replace(path, path.with_suffix(f".{n}.csv"))

    def truncate_episodes_file(self) -> None:
        """After a resume: drop the rows of episodes that ended after the checkpoint (the run that
        wrote them died; they will be played again)."""
        path = self.episodes_file
        if path is None or not path.exists():
            return
        lines = path.read_text().splitlines(keepends=True)
        keep = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= self.env_steps]
        if len(keep) != len(lines):
            tmp = path.with_suffix(".csv.tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)

    def state_dict(self) -> dict[str, Any]:
        return {"env_steps": self.env_steps, "episodes": self.episodes,
                "recent_episodes": list(self.recent_episodes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.env_steps, self.episodes = int(state["env_steps"]), int(state["episodes"])
        self.recent_episodes = deque(state["recent_episodes"], maxlen=100)
        self.restored = True
        self.restart()


class TrainRatio:
    """DreamerV3's train ratio: replayed steps per environment step. Batch k may be served once
    ``learning_starts + k * batch_size * seq_len / ratio`` environment steps have been taken.

    Counts the batches served and those that reached training: Lightning fetches one batch ahead,
    so a checkpoint records the trained ones and a resume serves the fetched one again.
    """

    def __init__(self, ratio: float, batch_size: int, seq_len: int, learning_starts: int) -> None:
        self.ratio, self.batch_size, self.seq_len = ratio, batch_size, seq_len
        self.learning_starts = learning_starts
        self.served = self.trained = 0
        self.counts_trained = False  # batches reach training through Lightning (not next_batch alone)

    def env_steps_needed(self, batch_index: int | None = None) -> int:
        """Environment steps needed before batch ``batch_index`` (default: the next) is served."""
        k = self.served if batch_index is None else batch_index
        return self.learning_starts + int(np.ceil(k * self.batch_size * self.seq_len / self.ratio))

    def count_trained(self) -> None:
        self.trained += 1
        self.counts_trained = True

    def state_dict(self) -> dict[str, int]:
        return {"batches_served": self.trained if self.counts_trained else self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.served = self.trained = int(state["batches_served"])
