"""Every private attribute of another library this project relies on, read or overridden in one
place, with the reason no public API does the job.

``PRIVATE`` lists them; ``tests/test_compat.py`` checks each against the installed versions, so an
upgrade that removes one fails there, by name, instead of deep inside a run. The version upper
bounds in pyproject.toml guard the same list. Nothing here imports procgen, gymnasium or mlflow.
"""

from __future__ import annotations

import mmap
from types import SimpleNamespace
from typing import Any

import numpy as np

# (where, attribute, why no public API does it)
PRIVATE: list[tuple[str, str, str]] = [
    ("torch.nn.parallel.DistributedDataParallel", "_ddp_params_and_buffers_to_ignore",
     "DDP skips the module's parameters and buffers named there; the goal matcher and each rank's "
     "goal bank must not be synchronised by it, and DDP has no public switch per parameter"),
    ("pytorch_lightning.loggers.MLFlowLogger", "_run_id, _experiment_id",
     "the public run_id / experiment_id create the run on first access; RunLogger must know "
     "whether a run id was given before that"),
    ("pytorch_lightning.callbacks.ModelCheckpoint",
     "_monitor_candidates, _save_topk_checkpoint, _save_last_checkpoint, _save_checkpoint",
     "EnvStepCheckpoint saves at env-step counts (no epoch or step trigger fits) and writes "
     "through a temporary file; the public hooks only save on Lightning's own triggers"),
    ("pytorch_lightning.core.optimizer.LightningOptimizer", "_on_before_step, _on_after_step",
     "a CUDA graph steps the raw optimisers; Lightning counts optimiser steps (global_step) only "
     "through its wrapper's step(), which would step them a second time"),
    ("pytorch_lightning.cli.LightningCLI", "_parse_ckpt_path",
     "overridden to check a checkpoint's size and game before Lightning reads its hyperparameters"),
    ("procgen.ProcgenGym3Env (gym3)", "_c_lib, _c_env, _ac, _rew, _first, _ob, _info",
     "procgen's own buffers, filled in place by libenv_observe; gym3's public observe() and "
     "get_info() build a Python dict per env on every step"),
    ("numpy.memmap", "_mmap",
     "madvise(MADV_DONTNEED) on the replay's memory map keeps its resident memory small; numpy "
     "exposes no mmap object"),
]


def ignore_in_ddp(module: Any, prefixes: tuple[str, ...]) -> None:
    """Makes DistributedDataParallel leave ``module``'s parameters and buffers whose names start
    with one of ``prefixes`` alone."""
    names = [name for name, _ in [*module.named_parameters(), *module.named_buffers()] if name.startswith(prefixes)]
    module._ddp_params_and_buffers_to_ignore = names


def count_optimizer_step(optimizer: Any) -> None:
    """Counts one step of a Lightning-wrapped optimiser whose raw optimiser was stepped outside it."""
    optimizer._on_before_step()
    optimizer._on_after_step()


def save_env_step_checkpoint(callback: Any, trainer: Any, env_steps: int) -> None:
    """A ``ModelCheckpoint``'s save now, as its own triggers would save: its top-k file (named
    with ``env_steps``) and ``last.ckpt``."""
    candidates = callback._monitor_candidates(trainer)
    candidates["env_steps"] = env_steps
    callback._save_topk_checkpoint(trainer, candidates)
    callback._save_last_checkpoint(trainer, candidates)


def mlflow_ids(logger: Any) -> tuple[str | None, str | None]:
    """(run id, experiment id) an MLFlowLogger holds so far, without creating the run."""
    return logger._run_id, logger._experiment_id


def release_memmap_pages(array: np.memmap) -> None:
    """Drops ``array``'s pages from this process's resident memory (the data stays in its file)."""
    array._mmap.madvise(mmap.MADV_DONTNEED)


def gym3_buffers(env: Any) -> SimpleNamespace:
    """A ``procgen.ProcgenGym3Env``'s C library, env handle and the numpy buffers procgen fills in
    place: action, reward, first, rgb frames, level seed, previous level complete."""
    return SimpleNamespace(
        c_lib=env._c_lib, c_env=env._c_env, action=env._ac["action"], reward=env._rew,
        first=env._first, obs=env._ob["rgb"], level_seed=env._info["level_seed"],
        level_complete=env._info["prev_level_complete"],
    )


def resolve_gym3_close(env: Any) -> None:
    """Looks up ``libenv_close`` now: gym3 looks it up from ``__del__`` under the lock that every
    env's construction takes, and a garbage collection during another construction deadlocks."""
    env._c_lib.libenv_close  # noqa: B018
