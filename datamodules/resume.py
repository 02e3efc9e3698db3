"""What a ReplayDataModule checkpoint holds, and resuming from it: the counters, the replay and the
random policy's stream. Under DDP every rank keeps its own in a file beside its replay."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def datamodule_state(dm) -> dict[str, Any]:
    """``dm``'s state for a checkpoint. Under DDP every rank writes its own state to
    ``<replay_dir>/rank<r>/state_<total env steps>.pt`` (the checkpoint itself is written by rank 0
    alone) and the checkpoint records the number of ranks and that file name."""
    state = {
        **dm.collector.state_dict(),
        **dm.train_ratio.state_dict(),
        "replay": dm.replay.state_dict() if dm.replay is not None else None,
        "random_policy_rng": dm.random_policy.rng.bit_generator.state if dm.replay is not None else None,
    }
    if dm.world_size == 1:
        return state
    name = write_rank_state(dm.replay_dir(), state, dm.total_env_steps)
    return {"world_size": dm.world_size, "rank_state": name, "env_steps": dm.env_steps}


def load_datamodule_state(dm, state: dict[str, Any]) -> None:
    """Restores ``datamodule_state``. Validation needs only the step count (the x-axis) and may run
    on any number of ranks; training resumes on as many ranks as wrote the checkpoint."""
    saved_world = int(state.get("world_size", 1))
    validating = dm.trainer is not None and dm.trainer.state.fn == "validate"
    if validating:  # the agent is what is scored: the replay (RAM, memmap, any layout) stays unread
        dm.collector.env_steps = int(state["env_steps"]) * saved_world // dm.world_size
        return
    if saved_world != dm.world_size:
        raise ValueError(
            f"the checkpoint was written by {saved_world} rank(s), each with its own "
            f"environments and replay, and this run has {dm.world_size}: resume it with "
            f"--trainer.devices {saved_world} (times the number of nodes it used)"
        )
    if dm.replay is None:
        dm.setup("fit")
    if saved_world > 1:
        state = read_rank_state(dm.replay_dir(), state["rank_state"], dm.rank)
    dm.collector.load_state_dict(state)  # the envs restart from fresh episodes
    dm.train_ratio.load_state_dict(state)
    if not validating:
        dm.collector.truncate_episodes_file()
    if state["replay"] is not None:
        dm.replay.load_state_dict(state["replay"])
        dm.random_policy.rng.bit_generator.state = state["random_policy_rng"]


def write_rank_state(directory: Path, state: dict[str, Any], total_env_steps: int) -> str:
    """Writes one DDP rank's DataModule state (counters, replay) to
    ``directory/state_<total env steps>.pt`` through a temporary file, keeps the previous file
    too (a kill before the checkpoint is replaced still needs it) and returns the file name."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"state_{total_env_steps}.pt"
    tmp = directory / (name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / name)
    for path in sorted(directory.glob("state_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[:-2]:
        path.unlink()
    return name


def read_rank_state(directory: Path, name: str, rank: int) -> dict[str, Any]:
    """The state ``write_rank_state`` wrote as ``name``; a ValueError if it is missing."""
    path = directory / name
    if not path.is_file():
        raise ValueError(f"rank {rank}'s replay state {path} is missing: the checkpoint "
                         "cannot be resumed without it (data.replay_dir must be the same)")
    return torch.load(path, map_location="cpu", weights_only=True)
