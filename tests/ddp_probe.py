"""A callback for the DDP test: every rank saves what it ends training with."""

from pathlib import Path

import pytorch_lightning as pl
import torch


class RankDump(pl.Callback):
    """On train end, rank r writes ``rank<r>.pt`` in ``directory``: its module state (parameters and
    buffers), its DataModule's own and total env steps, and its updates."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_end(self, trainer, pl_module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        dm = trainer.datamodule
        torch.save({
            "state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "env_steps": dm.env_steps, "total_env_steps": dm.total_env_steps,
            "world_size": trainer.world_size, "updates": pl_module.updates,
            "replay_count": dm.replay.state_dict()["count"].clone(),
        }, self.directory / f"rank{trainer.global_rank}.pt")
