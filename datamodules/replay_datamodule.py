"""ReplayDataModule: plays Procgen with the current policy and serves replayed sequences to Lightning."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules import checks
from datamodules.collector import Collector, Policy, evaluate
from datamodules.games import RandomPolicy
from datamodules.procgen import ProcgenConfig, ProcgenVectorEnv, make_env_pair
from datamodules.replay import SequenceReplay, read_rank_state, replay_batch, store_posteriors, write_rank_state


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
    """Wires the training envs, the ``Collector`` that plays them into a ``SequenceReplay`` (its
    docstring gives the replay layout) and the train ratio; serves replayed sequences to Lightning
    and plays the validation episodes.

    Train ratio (as in DreamerV3) = replayed steps per environment step: batch k is served once
    ``env_steps >= learning_starts + k * batch_size * seq_len / train_ratio``. Until
    ``learning_starts`` env steps, and whenever no LightningModule with an ``act`` method is
    attached, it acts uniformly at random.
    """

    argument_problem = staticmethod(checks.argument_problem)
    resume_problem = staticmethod(checks.resume_problem)

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
        self.test_env: ProcgenVectorEnv | None = None
        self.eval_train_env: ProcgenVectorEnv | None = None
        self.collector = Collector()  # its envs, replay and episode file are set up in setup
        self.batches_served = 0
        self.batches_trained = 0
        self._counts_trained = False  # batches reach training through Lightning (not next_batch alone)
        self._restored = False

    # ---------------------------------------------------------------- setup
    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def env_steps(self) -> int:
        """This rank's environment steps."""
        return self.collector.env_steps

    @property
    def train_env(self) -> ProcgenVectorEnv | None:
        """The training envs (the collector's), once set up."""
        return self.collector.env

    @property
    def replay(self) -> SequenceReplay | None:
        """The collector's replay, once set up for fit."""
        return self.collector.replay

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
            self.collector.env, self.test_env = make_env_pair(cfg, **(self.hparams.procgen_options or {}))
            self.random_policy = RandomPolicy(cfg.seed)
        self.collector.episodes_file = self.episodes_file()
        if stage == "validate" or self.replay is not None:
            return  # validation plays fresh episodes: no replay, no files
        hp = self.hparams
        self.collector.replay = SequenceReplay(
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
        """``collector.evaluate`` on ``episodes`` (default ``val_episodes``) fresh episodes of the
        training levels or of unseen levels."""
        return evaluate(self.eval_env(split), policy, episodes or self.hparams.val_episodes)

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
        if not self._restored and self.env_steps == 0:
            if len(self.replay):
                self.replay.clear()  # a fresh run never trains on a previous run's files
            self.collector.set_aside_episodes_file()
        self._restored = True
        self.collector.collect(self.policy, vector_steps)

    def episodes_file(self) -> Path | None:
        """``<run dir>/episodes_rank<r>.csv``: every finished training episode, one row each
        (this rank's env steps when it ended, return, length, level completion, level seed)."""
        if self.trainer is None:
            return None
        return Path(self.trainer.default_root_dir) / f"episodes_rank{self.rank}.csv"

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
        state = {
            **self.collector.state_dict(),
            "batches_served": self.batches_trained if self._counts_trained else self.batches_served,
            "replay": self.replay.state_dict() if self.replay is not None else None,
            "random_policy_rng": self.random_policy.rng.bit_generator.state if self.replay is not None else None,
        }
        if self.world_size == 1:
            return state
        name = write_rank_state(self._replay_dir(), state, self.total_env_steps)
        return {"world_size": self.world_size, "rank_state": name, "env_steps": self.env_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_world = int(state_dict.get("world_size", 1))
        validating = self.trainer is not None and self.trainer.state.fn == "validate"
        if saved_world != self.world_size and validating:
            # validation plays fresh episodes: it needs the step count (the x-axis), no replay
            self.collector.env_steps = int(state_dict["env_steps"]) * saved_world // self.world_size
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
            state_dict = read_rank_state(self._replay_dir(), state_dict["rank_state"], self.rank)
        self.collector.load_state_dict(state_dict)  # the envs restart from fresh episodes
        self.batches_served = self.batches_trained = int(state_dict["batches_served"])
        if not validating:
            self.collector.truncate_episodes_file()
        if state_dict["replay"] is not None:
            self.replay.load_state_dict(state_dict["replay"])
            self.random_policy.rng.bit_generator.state = state_dict["random_policy_rng"]
        self._restored = True
