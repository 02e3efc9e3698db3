"""A callback for the disk-full test: once the first checkpoint is on disk, no file of this process
may grow beyond it, as on a disk that has just filled up."""

import resource
import signal
from pathlib import Path

import pytorch_lightning as pl


class FillDiskAfterFirstCheckpoint(pl.Callback):
    """After ``checkpoint`` exists, writes past ``size(checkpoint) - 1`` bytes of any file fail with
    an OSError (RLIMIT_FSIZE; SIGXFSZ ignored so the write returns the error instead)."""

    def __init__(self, checkpoint: str) -> None:
        self.checkpoint = Path(checkpoint)
        self.full = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.full and self.checkpoint.is_file():
            self.full = True
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            limit = self.checkpoint.stat().st_size - 1
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
