"""The ReplayDataModule's checks: bad arguments, a checkpoint's replay that does not fit this run,
and directories where no files can be kept, each answered with one line saying what is allowed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from datamodules.procgen import ProcgenConfig, unseen_levels, validate_procgen_args


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


def argument_problem(hp: Any) -> str | None:
    """What is wrong with the ReplayDataModule's arguments (the first problem, with what is allowed),
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
        unseen_levels(ProcgenConfig(hp.game, distribution_mode=hp.distribution_mode,
                                    num_levels=hp.num_levels, start_level=hp.start_level))
    except ValueError as e:
        return str(e)
    return None

# bytes a replay keeps per step besides the frame: action, reward, flags and the latents' room
STEP_EXTRA_BYTES = 4096


def replay_space_problem(replay_dir: Path, capacity: int, frame_bytes: int = 64 * 64 * 3) -> str | None:
    """Why a new memmap replay of ``capacity`` steps cannot be reserved under ``replay_dir`` (its
    disk lacks the room), or None; asked before any file is written."""
    import shutil

    existing = next((p for p in [replay_dir.expanduser().absolute(), *replay_dir.expanduser().absolute().parents]
                     if p.exists()), None)
    if existing is None:
        return None
    free = shutil.disk_usage(existing).free
    if capacity * frame_bytes > free:
        return (f"data.replay_capacity {capacity} needs {capacity * frame_bytes / 2**30:.1f} GiB of frames "
                f"in {replay_dir}, and its disk has {free / 2**30:.1f} GiB free; lower "
                f"data.replay_capacity (at most about {free // (frame_bytes + STEP_EXTRA_BYTES)} here), "
                "or choose another data.replay_dir")
    return None


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
