"""Checkpoint reading and checking, and the random streams a checkpoint carries."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch


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


def checkpoint_mismatch(
    checkpoint: dict[str, Any], size: str, overrides: dict | None, game: str | None
) -> list[str]:
    """What differs between a checkpoint and a run (model size, size overrides, game)."""
    saved = checkpoint.get("hyper_parameters", {})
    differences = []
    for key, value in (("size", size), ("overrides", overrides)):
        if saved.get(key) != value:
            differences.append(f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}")
    ckpt_game = checkpoint.get("dreamer", {}).get("game")
    if game is not None and ckpt_game is not None and ckpt_game != game:
        differences.append(f"game: checkpoint {ckpt_game!r}, this run {game!r}")
    return differences
