"""ReplayDataModule: plays Procgen with the current policy and serves replayed sequences to Lightning."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.procgen import (
    EPISODE_KEY, ProcgenConfig, ProcgenVectorEnv, make_env_pair, normalized_score, validate_procgen_args,
)
from datamodules.games import RandomPolicy
from datamodules.replay import SequenceReplay, replay_batch, store_posteriors


class Policy(Protocol):
    """What the DataModule acts with (``Dreamer`` implements it).

    ``obs`` is uint8 (N, 64, 64, 3) and ``is_first`` bool (N,), both on the CPU; ``state`` is
    whatever the policy returned last time (None at the start); ``reward`` (N,) float32 the reward
    received on arriving at ``obs`` (0 on an episode's first frame). It must reset its recurrent
    state where ``is_first`` is true and return int actions (N,) in [0, 15) and its new state.
    """

    def act(
        self, obs: torch.Tensor, is_first: torch.Tensor, state: Any, reward: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]: ...


def directory_problem(path: Path, name: str) -> str | None:
    """Why files cannot be kept under directory ``path`` (a virtual file system, a file in the way,
    no write permission), or None."""
    resolved = path.expanduser().resolve()
    if resolved.parts[1:2] and resolved.parts[1] in ("proc", "sys", "dev"):
        return f"{name} {path} lies in /{resolved.parts[1]}, which holds no files; give a directory on a disk"
    for parent in [resolved, *resolved.parents]:
        if parent.exists():
            if not parent.is_dir():
                return f"{name} {path}: {parent} is a file, not a directory; give a directory path"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{name} {path}: cannot write in {parent}; give a directory you can write to"
            return None
    return None


def play_episodes(env: ProcgenVectorEnv, policy: Policy, episodes: int) -> tuple[list[float], list[float]]:
    """Returns and level completions of ``episodes`` fresh episodes of ``policy`` on ``env``.

    Every env counts the same number of its first episodes (``ceil(episodes / num_envs)``), so long
    episodes are not under-represented.
    """
    per_env = -(-episodes // env.num_envs)
    counted = np.zeros(env.num_envs, np.int64)
    returns, completes = [], []
    obs, _ = env.reset()
    is_first, state = np.ones(env.num_envs, bool), None
    reward = np.zeros(env.num_envs, np.float32)
    while (counted < per_env).any():
        actions, state = policy.act(
            torch.from_numpy(obs), torch.from_numpy(is_first), state, reward=torch.from_numpy(reward)
        )
        obs, reward, terminated, truncated, info = env.step(actions.cpu().numpy().astype(np.int64))
        is_first = terminated | truncated
        reward = np.where(is_first, 0.0, reward).astype(np.float32)
        for i in np.flatnonzero(is_first & (counted < per_env)):
            returns.append(float(info[EPISODE_KEY]["r"][i]))
            completes.append(float(info[EPISODE_KEY]["level_complete"][i]))
            counted[i] += 1
    return returns, completes


class _ForeverBatches(IterableDataset):
    """Endless iterable of replay batches; each ``next`` first collects what the train ratio allows."""

    def __init__(self, datamodule: "ReplayDataModule") -> None:
        self.dm = datamodule

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.dm.next_batch()


class _Splits(IterableDataset):
    """The two level sets validation plays, in order, on every rank."""

    def __iter__(self) -> Iterator[str]:
        yield from ("train_levels", "unseen_levels")


class ReplayDataModule(pl.LightningDataModule):
    """Owns the train and test ``ProcgenVectorEnv`` and the ``SequenceReplay``.

    Train ratio (as in DreamerV3) = replayed steps per environment step: batch k is served once
    ``env_steps >= learning_starts + k * batch_size * seq_len / train_ratio``. Until
    ``learning_starts`` env steps, and whenever no LightningModule with an ``act`` method is
    attached, it acts uniformly at random.

    Replay layout: each env writes the step it acts from (frame, action, reward received on
    arriving there, is_first). Procgen never shows a terminal frame, so when an episode ends one
    extra step is written for it: the episode's last frame again, with the final reward,
    ``is_last`` and ``is_terminal`` (false on a timeout), and no action (0). The next episode's
    first frame follows with ``is_first``.
    """

    def __init__(
        self,
        game: str = "coinrun",
        num_envs: int = 16,
        distribution_mode: str = "easy",
        num_levels: int = 200,
        start_level: int = 0,
        seed: int = 0,
        test_num_envs: int | None = None,
        procgen_options: dict[str, Any] | None = None,
        batch_size: int = 16,
        seq_len: int = 64,
        train_ratio: float = 64.0,
        learning_starts: int = 1024,
        replay_capacity: int = 1_000_000,
        replay_storage: str = "ram",
        replay_dir: str | None = None,
        val_episodes: int = 16,
        replay_context: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the CLI logs the whole config
        problem = self.argument_problem(self.hparams)
        if problem:
            raise ValueError(problem)
        self.env_config = ProcgenConfig(
            game, num_envs, distribution_mode, num_levels, start_level, seed, test_num_envs
        )
        self.train_env: ProcgenVectorEnv | None = None
        self.test_env: ProcgenVectorEnv | None = None
        self.eval_train_env: ProcgenVectorEnv | None = None
        self.replay: SequenceReplay | None = None
        self.env_steps = 0
        self.episodes = 0
        self.batches_served = 0
        self.batches_trained = 0
        self._counts_trained = False  # batches reach training through Lightning (not next_batch alone)
        self.recent_episodes: deque[dict[str, float]] = deque(maxlen=100)
        self._new_episodes: list[dict[str, float]] = []
        self._restored = False
        self._obs: np.ndarray | None = None
        self._policy_state: Any = None

    @staticmethod
    def argument_problem(hp: Any) -> str | None:
        """What is wrong with the DataModule's arguments (the first problem, with what is allowed),
        procgen's included; the CLI asks before it builds anything."""
        positive = ("num_envs", "batch_size", "seq_len", "replay_capacity", "val_episodes")
        for name in positive + ("learning_starts", "test_num_envs"):
            value = hp[name]
            if name == "test_num_envs" and value is None:
                continue
            low = 1 if name != "learning_starts" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                return f"data.{name} must be an integer >= {low}, got {value!r}"
        if isinstance(hp.train_ratio, bool) or not isinstance(hp.train_ratio, (int, float)) \
                or not 0 < hp.train_ratio < float("inf"):
            return f"data.train_ratio must be a positive number, got {hp.train_ratio!r}"
        if hp.replay_storage not in ("ram", "memmap"):
            return f"data.replay_storage must be 'ram' or 'memmap', got {hp.replay_storage!r}"
        if hp.replay_capacity // hp.num_envs < hp.seq_len + 1:
            return (f"data.replay_capacity ({hp.replay_capacity}) split over {hp.num_envs} envs leaves "
                    f"{hp.replay_capacity // hp.num_envs} steps per env, fewer than seq_len + 1 "
                    f"({hp.seq_len + 1}); allowed: replay_capacity >= num_envs * (seq_len + 1)")
        if hp.replay_storage == "memmap" and hp.replay_dir is not None:
            problem = directory_problem(Path(hp.replay_dir), "data.replay_dir")
            if problem:
                return problem
        try:  # game, levels, mode, seed and options: what procgen would abort on
            validate_procgen_args(hp.game, hp.num_envs, hp.distribution_mode, hp.num_levels,
                                  hp.start_level, hp.seed, hp.procgen_options or {})
        except ValueError as e:
            return str(e)
        return None

    @staticmethod
    def resume_problem(saved: dict[str, Any], hp: Any) -> str | None:
        """Why a checkpoint's DataModule state (``saved``) cannot be resumed with arguments ``hp``
        (replay storage and layout), or None; asked before any replay file is opened."""
        replay = saved.get("replay") if int(saved.get("world_size", 1)) == 1 else None
        if not replay:
            return None
        if replay.get("storage") not in (None, hp["replay_storage"]):
            return (f"the checkpoint's replay used storage {replay['storage']!r}, this run "
                    f"{hp['replay_storage']!r}; resume with --data.replay_storage {replay['storage']}")
        lanes, capacity = replay.get("num_lanes"), replay.get("lane_capacity")
        if lanes is not None and (lanes != hp["num_envs"] or capacity != hp["replay_capacity"] // hp["num_envs"]):
            return (f"the checkpoint's replay holds {lanes} envs x {capacity} steps, this run's "
                    f"{hp['num_envs']} x {hp['replay_capacity'] // hp['num_envs']}; resume with "
                    f"--data.num_envs {lanes} --data.replay_capacity {lanes * capacity}")
        return None

    # ---------------------------------------------------------------- setup
    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def total_env_steps(self) -> int:
        """Environment steps of all ranks together. Every rank serves the same batches and so
        takes the same number of steps (``env_steps_needed`` depends only on the batch index)."""
        return self.env_steps * self.world_size

    def _replay_dir(self) -> Path:
        base = self.hparams.replay_dir
        if base is None:
            root = self.trainer.default_root_dir if self.trainer is not None else os.getcwd()
            base = os.path.join(root, "replay")
        return Path(base) / f"rank{self.rank}"

    def _rank_config(self) -> ProcgenConfig:
        """Each DDP rank plays its own envs: different seeds, same levels."""
        return ProcgenConfig(**{**self.env_config.__dict__, "seed": self.env_config.seed + 7919 * self.rank})

    def setup(self, stage: str | None = None) -> None:
        cfg = self._rank_config()
        if self.train_env is None:
            self.train_env, self.test_env = make_env_pair(cfg, **(self.hparams.procgen_options or {}))
            self.random_policy = RandomPolicy(cfg.seed)
        if stage == "validate" or self.replay is not None:
            return  # validation plays fresh episodes: no replay, no files
        hp = self.hparams
        self.replay = SequenceReplay(
            hp.replay_capacity,
            cfg.num_envs,
            storage=hp.replay_storage,
            directory=self._replay_dir() if hp.replay_storage == "memmap" else None,
            seed=cfg.seed,
            latents=self._latent_sizes(),
        )

    def _latent_sizes(self) -> dict[str, int] | None:
        """Sizes of the latents the replay keeps for its context: the attached model's
        ``latent_sizes`` when ``replay_context`` is on, else none."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if not self.hparams.replay_context or module is None:
            return None
        return getattr(module, "latent_sizes", None)

    @property
    def context_steps(self) -> int:
        """Steps each sampled sequence holds before its training steps (1 with replay context)."""
        return int(self.replay is not None and self.replay.latents is not None)

    def store_latents(self, batch: dict[str, torch.Tensor], post: dict[str, torch.Tensor]) -> None:
        """Write the posterior states (B, T, ...) the model computed for ``batch`` back into the
        replay, to start later sequences from (replay context)."""
        if self.context_steps:
            store_posteriors(self.replay, batch, post)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning fetches one batch ahead: a checkpoint counts the batches trained on, so a
        # resume serves the fetched-but-untrained one again instead of skipping it
        if self.trainer is not None and self.trainer.training:
            self.batches_trained += 1
            self._counts_trained = True
        return batch

    def teardown(self, stage: str | None = None) -> None:
        if self.replay is not None:
            self.replay.flush()

    def train_dataloader(self) -> DataLoader:
        # num_workers=0: a worker would hold a stale copy of the envs and replay.
        return DataLoader(_ForeverBatches(self), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        # one item per level set; the LightningModule's validation_step plays its episodes. An
        # iterable dataset, so that under DDP every rank gets both (a list would be split by
        # Lightning's distributed sampler)
        return DataLoader(_Splits(), batch_size=None, num_workers=0)

    def eval_env(self, split: str) -> ProcgenVectorEnv:
        """The envs validation plays on: ``train_levels`` (its own envs on the training levels) or
        ``unseen_levels``."""
        if split not in ("train_levels", "unseen_levels"):
            raise ValueError(f"split must be 'train_levels' or 'unseen_levels', got {split!r}")
        if split == "unseen_levels":
            return self.test_env
        if self.eval_train_env is None:
            cfg = self.env_config
            self.eval_train_env = ProcgenVectorEnv(
                cfg.game, cfg.test_num_envs or cfg.num_envs,
                cfg.distribution_mode, cfg.num_levels, cfg.start_level,
                seed=cfg.seed + 2_000_003 + 7919 * self.rank,
                **(self.hparams.procgen_options or {}),
            )
        return self.eval_train_env

    @torch.inference_mode()
    def evaluate(self, policy: Policy, split: str, episodes: int | None = None) -> dict[str, float]:
        """Play ``episodes`` (default ``val_episodes``) episodes on the training levels or on
        unseen levels.

        Returns mean return, normalised score, level completion and episodes (see ``play_episodes``).
        """
        env = self.eval_env(split)
        cfg = self.env_config
        returns, completes = play_episodes(env, policy, episodes or self.hparams.val_episodes)
        mode = env.distribution_mode
        return {
            "return": float(np.mean(returns)),
            "normalized_score": float(np.mean([normalized_score(cfg.game, mode, r) for r in returns])),
            "level_complete": float(np.mean(completes)),
            "episodes": float(len(returns)),
        }

    # ---------------------------------------------------------------- collection
    def policy(self) -> Policy:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.env_steps < self.hparams.learning_starts or not hasattr(module, "act"):
            return self.random_policy
        return module

    def env_steps_needed(self, batch_index: int) -> int:
        """Environment steps that must have been taken before batch ``batch_index`` is served."""
        hp = self.hparams
        return hp.learning_starts + int(np.ceil(batch_index * hp.batch_size * hp.seq_len / hp.train_ratio))

    def collect(self, vector_steps: int) -> None:
        """Step every train env ``vector_steps`` times with the current policy, writing replay."""
        env, replay = self.train_env, self.replay
        if not self._restored and self.env_steps == 0:
            if len(replay):
                replay.clear()  # a fresh run never trains on a previous run's files
            self._set_aside_episodes()
        self._restored = True
        n = env.num_envs
        if self._obs is None:
            self._obs, _ = env.reset()
            self._is_first = np.ones(n, bool)
            self._reward = np.zeros(n, np.float32)
            self._policy_state = None
        zeros = np.zeros(n, bool)
        for _ in range(vector_steps):
            obs, is_first = self._obs, self._is_first
            policy = self.policy()
            if policy is self.random_policy:  # no torch round trip for random actions
                actions = policy.actions(n)
            else:
                with torch.inference_mode():
                    actions, self._policy_state = policy.act(
                        torch.from_numpy(obs), torch.from_numpy(is_first), self._policy_state,
                        reward=torch.from_numpy(self._reward),
                    )
                actions = actions.cpu().numpy().astype(np.int64)
            replay.add(obs, actions, self._reward, is_first, zeros, zeros)
            next_obs, reward, terminated, truncated, info = env.step(actions)
            self.env_steps += n
            done = terminated | truncated
            if done.any():
                lanes = np.flatnonzero(done)
                replay.add(
                    obs[lanes], np.zeros(len(lanes), np.int64), reward[lanes],
                    np.zeros(len(lanes), bool), np.ones(len(lanes), bool), terminated[lanes],
                    lanes=lanes,
                )
                self._record_episodes(info[EPISODE_KEY], lanes)
            self._obs, self._is_first = next_obs, done
            reward[done] = 0.0
            self._reward = reward

    def _record_episodes(self, episode: dict[str, np.ndarray], lanes: np.ndarray) -> None:
        rows = []
        for i in lanes:
            stats = {
                "return": float(episode["r"][i]),
                "length": int(episode["l"][i]),
                "level_complete": float(episode["level_complete"][i]),
                "level_seed": int(episode["level_seed"][i]),
                "env_steps": self.env_steps,
            }
            self.episodes += 1
            self.recent_episodes.append(stats)
            self._new_episodes.append(stats)
            rows.append(stats)
        self._write_episodes(rows)

    EPISODE_COLUMNS = ("env_steps", "return", "length", "level_complete", "level_seed")

    def episodes_file(self) -> Path | None:
        """``<run dir>/episodes_rank<r>.csv``: every finished training episode, one row each
        (this rank's env steps when it ended, return, length, level completion, level seed)."""
        if self.trainer is None:
            return None
        return Path(self.trainer.default_root_dir) / f"episodes_rank{self.rank}.csv"

    def _write_episodes(self, rows: list[dict[str, float]]) -> None:
        path = self.episodes_file()
        if path is None or not rows:
            return
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            if new:
                f.write(",".join(self.EPISODE_COLUMNS) + "\n")
            f.writelines(",".join(str(row[c]) for c in self.EPISODE_COLUMNS) + "\n" for row in rows)

    def _set_aside_episodes(self) -> None:
        """A fresh run in a directory that holds an earlier run's episode file keeps that file,
        renamed to ``episodes_rank<r>.<n>.csv``, and starts its own."""
        path = self.episodes_file()
        if path is None or not path.exists():
            return
        n = 1
        while path.with_suffix(f".{n}.csv").exists():
            n += 1
        os.replace(path, path.with_suffix(f".{n}.csv"))

    def _truncate_episodes(self) -> None:
        """After a resume: drop the rows of episodes that ended after the checkpoint (the run that
        wrote them died; they will be played again)."""
        path = self.episodes_file()
        if path is None or not path.exists():
            return
        lines = path.read_text().splitlines(keepends=True)
        keep = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= self.env_steps]
        if len(keep) != len(lines):
            tmp = path.with_suffix(".csv.tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)

    def pop_episodes(self) -> list[dict[str, float]]:
        """Episodes finished since the last call: return, length, level_complete, level_seed, env_steps."""
        new, self._new_episodes = self._new_episodes, []
        return new

    def next_batch(self) -> dict[str, torch.Tensor]:
        """Collect what the train ratio allows, then sample one batch of sequences."""
        hp = self.hparams
        n = self.train_env.num_envs
        needed = self.env_steps_needed(self.batches_served)
        length = hp.seq_len + self.context_steps
        while self.env_steps < needed or not self.replay.can_sample(length):
            self.collect(max(1, -(-(needed - self.env_steps) // n)))
        batch = self.replay.sample(hp.batch_size, length)
        self.batches_served += 1
        return replay_batch(batch, context=self.context_steps > 0)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Counters and replay. Under DDP every rank writes its own state to
        ``<replay_dir>/rank<r>/state_<total env steps>.pt`` (the checkpoint itself is written by
        rank 0 alone) and the checkpoint records the number of ranks and that file name."""
        state = self._rank_state()
        if self.world_size == 1:
            return state
        directory = self._replay_dir()
        directory.mkdir(parents=True, exist_ok=True)
        name = f"state_{self.total_env_steps}.pt"
        tmp = directory / (name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, directory / name)
        # keep the previous file too: a kill before the checkpoint is replaced still needs it
        old = sorted(directory.glob("state_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[:-2]
        for path in old:
            path.unlink()
        return {"world_size": self.world_size, "rank_state": name, "env_steps": self.env_steps}

    def _rank_state(self) -> dict[str, Any]:
        return {
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "batches_served": self.batches_trained if self._counts_trained else self.batches_served,
            "recent_episodes": list(self.recent_episodes),
            "replay": self.replay.state_dict() if self.replay is not None else None,
            "random_policy_rng": self.random_policy.rng.bit_generator.state
            if self.replay is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_world = int(state_dict.get("world_size", 1))
        validating = self.trainer is not None and self.trainer.state.fn == "validate"
        if saved_world != self.world_size and validating:
            # validation plays fresh episodes: it needs the step count (the x-axis), no replay
            self.env_steps = int(state_dict["env_steps"]) * saved_world // self.world_size
            return
        if saved_world != self.world_size:
            raise ValueError(
                f"the checkpoint was written by {saved_world} rank(s), each with its own "
                f"environments and replay, and this run has {self.world_size}: resume it with "
                f"--trainer.devices {saved_world} (times the number of nodes it used)"
            )
        if self.replay is None:
            self.setup("fit")
        if saved_world > 1:
            path = self._replay_dir() / state_dict["rank_state"]
            if not path.is_file():
                raise ValueError(f"rank {self.rank}'s replay state {path} is missing: the checkpoint "
                                 "cannot be resumed without it (data.replay_dir must be the same)")
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        self.env_steps = int(state_dict["env_steps"])
        self.episodes = int(state_dict["episodes"])
        self.batches_served = self.batches_trained = int(state_dict["batches_served"])
        self.recent_episodes = deque(state_dict["recent_episodes"], maxlen=100)
        if not validating:
            self._truncate_episodes()
        if state_dict["replay"] is not None:
            self.replay.load_state_dict(state_dict["replay"])
            self.random_policy.rng.bit_generator.state = state_dict["random_policy_rng"]
        self._restored = True
        # The envs restart from fresh episodes; the next written step carries is_first.
        self._obs = None
