"""Run plumbing on our own counters: env-step checkpoints, the progress bar, config to MLflow."""

from __future__ import annotations

import os
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar


def env_steps_of(trainer: pl.Trainer) -> int:
    """Environment steps of all ranks together."""
    dm = trainer.datamodule
    return int(dm.total_env_steps) if dm is not None else 0


class EnvStepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves ``last.ckpt`` every ``every_env_steps`` environment steps and
    when training ends, writing to a temporary file first so a kill mid-write leaves the previous
    checkpoint intact. With ``keep_every`` it also keeps ``env_steps=N.ckpt`` snapshots.
    """

    def __init__(self, every_env_steps: int = 10_000, keep_every: bool = False, **kwargs: Any) -> None:
        if every_env_steps < 1:
            raise ValueError(f"every_env_steps must be a positive integer, got {every_env_steps}")
        # LightningCLI passes every ModelCheckpoint argument, unset ones as None
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.setdefault("save_last", True)
        kwargs.setdefault("filename", "env_steps={env_steps}")
        kwargs.setdefault("auto_insert_metric_name", False)
        for fixed in ("save_top_k", "every_n_epochs", "every_n_train_steps", "train_time_interval"):
            kwargs.pop(fixed, None)
        super().__init__(save_top_k=-1 if keep_every else 0, every_n_epochs=0, **kwargs)
        self.every_env_steps = every_env_steps
        self._saved_at = 0

    def _save_now(self, trainer: pl.Trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        candidates["env_steps"] = env_steps_of(trainer)
        # set first: the checkpoint records it, so a resume from it does not save it again
        before, self._saved_at = self._saved_at, env_steps_of(trainer)
        try:
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        except BaseException:
            self._saved_at = before
            raise

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps = env_steps_of(trainer)
        if steps // self.every_env_steps > self._saved_at // self.every_env_steps:
            self._save_now(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if env_steps_of(trainer) != self._saved_at:
            self._save_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        pass  # checkpoints follow env steps, not validation

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        tmp = filepath + ".tmp"
        try:
            trainer.save_checkpoint(tmp, self.save_weights_only)
        except BaseException as e:
            # e.g. a full disk: no partial file stays behind, the previous checkpoint is untouched
            if trainer.is_global_zero and os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(e, OSError):
                raise OSError(f"could not write checkpoint {filepath} ({e.strerror or e}); the earlier "
                              "checkpoints are intact: free disk space, then resume with --ckpt_path last") from e
            raise
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier("EnvStepCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "saved_at_env_steps": self._saved_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._saved_at = state_dict.get("saved_at_env_steps", 0)


class EnvStepProgressBar(TQDMProgressBar):
    """Lightning's progress bar counting environment steps up to ``max_env_steps``, with updates/s
    and the latest episode return."""

    _rate_window: tuple[float, int] | None = None  # (time, updates) where the window began
    _rate: float | None = None  # updates/s over the last finished window

    def _reset_to_env_steps(self, trainer, pl_module) -> None:
        bar = self.train_progress_bar
        bar.reset(total=getattr(pl_module.hparams, "max_env_steps", None))
        bar.unit = " env steps"
        bar.n = env_steps_of(trainer)
        bar.set_description("training")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._reset_to_env_steps(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._rate_window = (time.perf_counter(), getattr(pl_module, "updates", 0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        dm = trainer.datamodule
        if bar.total is None:  # Lightning resets the bar without a total on a resume
            bar.total = getattr(pl_module.hparams, "max_env_steps", None)
        bar.n = env_steps_of(trainer)
        updates = getattr(pl_module, "updates", 0)
        postfix = {"updates": updates}
        now = time.perf_counter()
        if self._rate_window is not None:
            t0, u0 = self._rate_window
            if now - t0 >= 5.0:
                self._rate = (updates - u0) / (now - t0)
                self._rate_window = (now, updates)
        if self._rate is not None:
            postfix["upd/s"] = f"{self._rate:.2f}"
        if dm is not None and dm.recent_episodes:
            postfix["return"] = f"{dm.recent_episodes[-1]['return']:.1f}"
        bar.set_postfix(postfix, refresh=False)
        if batch_idx % self.refresh_rate == 0 or (bar.total is not None and bar.n >= bar.total):
            bar.refresh()
