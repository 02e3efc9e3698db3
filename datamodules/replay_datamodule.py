"""ReplayDataModule: plays Procgen with the current policy and serves replayed sequences to Lightning."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules import checks
from datamodules.collector import Collector, Policy, TrainRatio, evaluate
from datamodules.games import NUM_ACTIONS, OBS_SHAPE, RandomPolicy
from datamodules.procgen import ProcgenConfig, ProcgenVectorEnv, make_env_pair, training_levels_env
from datamodules.replay import SequenceReplay, replay_batch, store_posteriors
from datamodules.resume import datamodule_state, load_datamodule_state

SPLITS = ("train_levels", "unseen_levels")  # what validation plays, in order


class _Iterable(IterableDataset):
    """What ``make_iterator()`` gives, afresh on every pass. Iterable, so that under DDP every rank
    gets all of it (a list would be split by Lightning's distributed sampler)."""

    def __init__(self, make_iterator: Callable[[], Iterator]) -> None:
        self.make_iterator = make_iterator

    def __iter__(self) -> Iterator:
        return self.make_iterator()


class ReplayDataModule(pl.LightningDataModule):
    """Wires the training envs, the ``Collector`` that plays them into a ``SequenceReplay`` (its
    docstring gives the replay layout) and the ``TrainRatio``; serves replayed sequences to
    Lightning and plays the validation episodes.

    Until ``learning_starts`` env steps, and whenever no LightningModule with an ``act`` method is
    attached, it acts uniformly at random. Checkpoints hold its state (``datamodules/resume.py``).
    With ``replay_context`` the replay keeps a latent state per step to start sequences from,
    written by training and, with ``acting_latents``, also while acting (the newest reference).
    """

    argument_problem = staticmethod(checks.argument_problem)
    resume_problem = staticmethod(checks.resume_problem)
    # the spaces of every game and sanity task, which the CLI hands to the agent
    num_actions = NUM_ACTIONS
    obs_shape = OBS_SHAPE

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
        acting_latents: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the CLI logs the whole config
        problem = self.argument_problem(self.hparams)
        if problem:
            raise ValueError(problem)
        self.env_config = ProcgenConfig(game, num_envs, distribution_mode, num_levels, start_level, seed, test_num_envs)
        self.eval_envs: dict[str, ProcgenVectorEnv] = {}  # per split, once set up
        self.collector = Collector(acting_latents=acting_latents)  # its envs, replay and episode file: in setup
        self.train_ratio = TrainRatio(train_ratio, batch_size, seq_len, learning_starts)

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
    def total_env_steps(self) -> int:
        """Environment steps of all ranks together. Every rank serves the same batches and so
        takes the same number of steps (``env_steps_needed`` depends only on the batch index)."""
        return self.env_steps * self.world_size

    @property
    def replay(self) -> SequenceReplay | None:
        """The collector's replay, once set up for fit."""
        return self.collector.replay

    def replay_dir(self) -> Path:
        """This rank's replay files: ``<replay_dir or run dir/replay>/rank<r>``."""
        base = self.hparams.replay_dir
        if base is None:
            root = self.trainer.default_root_dir if self.trainer is not None else os.getcwd()
            base = os.path.join(root, "replay")
        return Path(base) / f"rank{self.rank}"

    def _rank_config(self) -> ProcgenConfig:
        """Each DDP rank plays its own envs: different seeds, same levels."""
        return ProcgenConfig(**{**self.env_config.__dict__, "seed": self.env_config.seed + 7919 * self.rank})

    def setup(self, stage: str | None = None) -> None:
        cfg, hp = self._rank_config(), self.hparams
        # learning_starts counts every rank's steps together, as max_env_steps does
        self.train_ratio.learning_starts = -(-hp.learning_starts // self.world_size)
        if self.trainer is not None and self.rank == 0 and self.world_size > (os.cpu_count() or 1) \
                and self.trainer.strategy.root_device.type == "cpu":
            print(f"warning: {self.world_size} ranks share {os.cpu_count()} CPU cores; each rank runs "
                  "slower than one process on all of them would", file=sys.stderr)
        if self.collector.env is None:
            self.collector.env, self.eval_envs["unseen_levels"] = make_env_pair(cfg, **(hp.procgen_options or {}))
            self.random_policy = RandomPolicy(cfg.seed)
        if self.trainer is not None:  # <run dir>/episodes_rank<r>.csv: every finished training episode
            self.collector.episodes_file = Path(self.trainer.default_root_dir) / f"episodes_rank{self.rank}.csv"
        if stage == "validate" or self.replay is not None:
            return  # validation plays fresh episodes: no replay, no files
        # the replay keeps the attached model's latents for its context (replay_context)
        module = self.trainer.lightning_module if self.trainer is not None else None
        self.collector.replay = SequenceReplay(
            hp.replay_capacity, cfg.num_envs, storage=hp.replay_storage, seed=cfg.seed,
            directory=self.replay_dir() if hp.replay_storage == "memmap" else None,
            latents=getattr(module, "latent_sizes", None) if hp.replay_context else None,
        )

    @property
    def context_steps(self) -> int:
        """Steps each sampled sequence holds before its training steps (1 with replay context)."""
        return int(self.replay is not None and self.replay.latents is not None)

    def store_latents(self, batch: dict[str, torch.Tensor], post: dict[str, torch.Tensor]) -> None:
        """Write the posteriors (B, T, ...) the model computed for a ``batch`` with a replay context
        back into replay, to start later sequences from."""
        store_posteriors(self.replay, batch, post)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.train_ratio.count_trained()
        return batch

    def teardown(self, stage: str | None = None) -> None:
        if self.replay is not None:
            self.replay.flush()

    # ---------------------------------------------------------------- training batches
    def train_dataloader(self) -> DataLoader:
        # num_workers=0: a worker would hold a stale copy of the envs and replay
        return DataLoader(_Iterable(lambda: iter(self.next_batch, None)), batch_size=None, num_workers=0)

    def policy(self) -> Policy:
        """What collection acts with now: the attached module, or a random policy before learning starts."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.env_steps < self.train_ratio.learning_starts or not hasattr(module, "act"):
            return self.random_policy
        return module

    def next_batch(self) -> dict[str, torch.Tensor]:
        """Collect what the train ratio allows, then sample one batch of sequences."""
        hp, n = self.hparams, self.collector.env.num_envs
        needed, length = self.train_ratio.env_steps_needed(), hp.seq_len + self.context_steps
        while self.env_steps < needed or not self.replay.can_sample(length):
            self.collector.collect(self.policy, max(1, -(-(needed - self.env_steps) // n)))
        self.train_ratio.served += 1
        return replay_batch(self.replay.sample(hp.batch_size, length), context=self.context_steps > 0)

    # ---------------------------------------------------------------- validation
    def val_dataloader(self) -> DataLoader:
        # one item per level set; the LightningModule's validation_step plays its episodes
        return DataLoader(_Iterable(lambda: iter(SPLITS)), batch_size=None, num_workers=0)

    def eval_env(self, split: str) -> ProcgenVectorEnv:
        """The envs validation plays on: ``train_levels`` (its own envs on the training levels) or
        ``unseen_levels``."""
        if split not in SPLITS:
            raise ValueError(f"split must be 'train_levels' or 'unseen_levels', got {split!r}")
        if split not in self.eval_envs:
            cfg = self._rank_config()
            self.eval_envs[split] = training_levels_env(cfg, cfg.test_num_envs or cfg.num_envs, cfg.seed + 2_000_003,
                                                        **(self.hparams.procgen_options or {}))
        return self.eval_envs[split]

    @torch.inference_mode()
    def evaluate(self, policy: Policy, split: str, episodes: int | None = None) -> dict[str, float]:
        """``collector.evaluate`` on ``episodes`` (default ``val_episodes``) fresh episodes of
        ``split``'s levels."""
        return evaluate(self.eval_env(split), policy, episodes or self.hparams.val_episodes)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return datamodule_state(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_datamodule_state(self, state_dict)
