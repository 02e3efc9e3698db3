"""Checkpoint reading and checking, and what a Dreamer checkpoint carries beside the weights:
the update count, every rank's random streams, the game and the agent's class."""

from __future__ import annotations

import importlib
import inspect
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from dreamer.distributed import gather_objects
from dreamer.migrations import agent_class_path, grouped, upgrade


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch random state: the CPU stream, and ``device``'s when it is a GPU."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Return to ``rng_state(device)``; a GPU stream is restored only onto a GPU."""
    torch.set_rng_state(state["cpu"].clone())  # a copy: a view with a storage offset crashes it
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].clone(), device)


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not a Dreamer's; the message says which."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by ``cli.py fit``, read onto the CPU with ``torch.load(weights_only=True)``.

    ``weights_only`` admits tensors and plain containers only, never code, so a file from elsewhere
    cannot run anything. Raises ``CheckpointError`` for a missing or unreadable file and for one
    without the ``state_dict`` and ``hyper_parameters`` that every Dreamer checkpoint holds.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint: give the path of a .ckpt file written by "
                              "`cli.py fit` (runs/<name>/checkpoints/last.ckpt)")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give the path of a .ckpt file written by "
                              "`cli.py fit` (runs/<name>/checkpoints/last.ckpt)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint (no zip "
                              "archive inside); expected a .ckpt written by `cli.py fit`")
    try:
        # mmap: a checkpoint holding a RAM replay can be many GB; only what is read is loaded
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same answer
        # torch's message for a refused pickle goes on to advise weights_only=False: never for us
        reason = (str(e).strip().splitlines() or [""])[0].split(" In PyTorch 2.6")[0][:200]
        raise CheckpointError(f"cannot read checkpoint {path}: torch.load(weights_only=True) refused "
                              f"it ({type(e).__name__}: {reason}); expected a .ckpt written by "
                              "`cli.py fit`") from None
    if not isinstance(ckpt, dict) or not {"state_dict", "hyper_parameters"} <= set(ckpt):
        raise CheckpointError(f"{path} is not a Dreamer checkpoint: it has no state_dict and "
                              "hyper_parameters (write one with `cli.py fit`)")
    return ckpt


# world-model knobs that change the weights' shapes, with the value of checkpoints written before them
SHAPING_KNOBS = {"downsample": "stride", "upsample": "transposed"}


def checkpoint_mismatch(
    checkpoint: dict[str, Any], size: str, overrides: dict | None, game: str | None, optimizer: str | None = None,
    world_model: Any = None, agent_class: str | None = None,
) -> list[str]:
    """What differs between a checkpoint and a run (with ``agent_class`` the agent's class, model
    size, size overrides, the world-model knobs that shape its weights, game, and with
    ``optimizer`` the kind of optimiser, whose state would not carry over)."""
    saved = checkpoint.get("hyper_parameters", {})
    differences = []
    theirs = agent_class_path(checkpoint)
    if agent_class is not None and theirs != agent_class:
        differences.append(f"model class: checkpoint {theirs.rpartition('.')[2]} ({theirs}), this run "
                           f"{agent_class.rpartition('.')[2]} ({agent_class}); a run with the dream callbacks "
                           "(configs/dreams.yaml) trains a GoalDreamer, a plain run a Dreamer")
    for key, value in (("size", size), ("overrides", overrides)):
        if saved.get(key) != value:
            differences.append(f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}")
    if world_model is not None:
        saved_wm = grouped(saved).get("world_model") or {}
        for key, before in SHAPING_KNOBS.items():
            theirs, ours = saved_wm.get(key, before), world_model.get(key, before)
            if theirs != ours:
                differences.append(f"model.world_model.{key}: checkpoint {theirs!r}, this run {ours!r}")
    saved_kind = (saved.get("optimizer") or {}).get("kind", "adam")  # written before the knob: Adam
    if optimizer is not None and saved_kind != optimizer:
        differences.append(f"model.optimizer.kind: checkpoint {saved_kind!r}, this run {optimizer!r}")
    ckpt_game = checkpoint.get("dreamer", {}).get("game")
    if game is not None and ckpt_game is not None and ckpt_game != game:
        differences.append(f"game: checkpoint {ckpt_game!r}, this run {game!r}")
    return differences


def trainer_of(module) -> Any:
    """The Trainer ``module`` is attached to, or None (Lightning's ``module.trainer`` raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def save_agent_state(agent, checkpoint: dict[str, Any]) -> None:
    """Adds ``checkpoint["dreamer"]``: updates, the random streams of every rank, the game."""
    trainer = trainer_of(agent)
    dm = trainer.datamodule if trainer is not None else None
    checkpoint["dreamer"] = {
        "updates": agent.updates,
        "torch_rng": torch.get_rng_state(),
        "rng_per_rank": gather_objects(rng_state(agent.device)),  # objects: nccl gathers no CPU tensors
        "game": dm.hparams.game if dm is not None else None,
        "agent_class": f"{type(agent).__module__}.{type(agent).__qualname__}",
    }


def load_agent_state(agent, checkpoint: dict[str, Any]) -> None:
    """Refuses (ValueError) a checkpoint of another size, game or architecture; restores the update
    count and this rank's random streams."""
    trainer = trainer_of(agent)
    dm = trainer.datamodule if trainer is not None else None
    hp = agent.hparams
    resuming = trainer is not None and trainer.state.fn == "fit"  # the optimiser state is restored
    differences = checkpoint_mismatch(checkpoint, hp.size, hp.overrides, dm.hparams.game if dm is not None else None,
                                      hp.optimizer["kind"] if resuming else None, hp.world_model)
    if differences:
        raise ValueError("checkpoint does not match this run; " + "; ".join(differences))
    upgrade(agent, checkpoint)
    # (module extra state, e.g. a learned goal space's optimiser, is a dict: no shape)
    saved = {k: tuple(getattr(v, "shape", ())) for k, v in checkpoint.get("state_dict", {}).items()}
    own = {k: tuple(getattr(v, "shape", ())) for k, v in agent.state_dict().items()}
    if saved and saved != own:
        changed = sorted(set(saved) ^ set(own)) or sorted(k for k in own if saved[k] != own[k])
        raise ValueError(f"checkpoint holds a model of another architecture (e.g. {changed[0]}), written "
                         "by an earlier version of this code; start a new run or use that version")
    state = checkpoint.get("dreamer", {})
    agent.updates = int(state.get("updates", 0))
    # checkpoints before the CUDA stream was saved hold the CPU states only
    per_rank = state.get("rng_per_rank") or [{"cpu": s} for s in state.get("torch_rng_per_rank", [])]
    rank = trainer.global_rank if trainer is not None else 0
    # the model is not on its device yet: the strategy's device is where it will run
    device = trainer.strategy.root_device if trainer is not None else agent.device
    if rank < len(per_rank):
        set_rng_state(per_rank[rank], device)
    elif "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])


def agent_class(checkpoint: dict[str, Any]) -> type:
    """The class ``checkpoint`` restores into (``migrations.agent_class_path``), imported by name."""
    module, _, name = agent_class_path(checkpoint).rpartition(".")
    return getattr(importlib.import_module(module), name)


def restore_agent(ckpt: dict[str, Any], path: str | os.PathLike = "the checkpoint"):
    """The agent saved in ``ckpt`` (from ``read_checkpoint``; a ``Dreamer``, or the class it
    records), its weights loaded, in eval mode."""
    cls = agent_class(ckpt)
    allowed = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in allowed.values()):  # an extension passes the rest on
        allowed = {**allowed, **inspect.signature(cls.__mro__[1].__init__).parameters}
    hparams = {k: v for k, v in grouped(ckpt["hyper_parameters"]).items() if k in allowed}
    try:
        agent = cls(**hparams)
        upgrade(agent, ckpt)
        agent.load_state_dict(ckpt["state_dict"])
    except (ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path} does not hold a {cls.__name__} this code can restore: "
                              f"{str(e).splitlines()[0][:300]}") from None
    return agent.eval()
