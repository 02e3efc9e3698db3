"""Run plumbing on our own counters: env-step checkpoints, the progress bar, the stop at
``model.max_env_steps``, what every update logs, and the validation table. The CLI adds the last
three to every run (``cli.py``: ``trainer_defaults``)."""

from __future__ import annotations

import os
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar

from dreamer.compat import save_env_step_checkpoint
from dreamer.distributed import gather_objects, mean_over_ranks
from dreamer.tracking import log_points


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
        kwargs["auto_insert_metric_name"] = False  # the file name spells it: env_steps=N.ckpt
        # a run owns its directory: last.ckpt is always replaced, never shadowed by last-v1.ckpt
        # (Lightning versions it when the run directory was moved since the checkpoint)
        kwargs["enable_version_counter"] = False
        for fixed in ("save_top_k", "every_n_epochs", "every_n_train_steps", "train_time_interval"):
            kwargs.pop(fixed, None)
        super().__init__(save_top_k=-1 if keep_every else 0, every_n_epochs=0, **kwargs)
        self.every_env_steps = every_env_steps
        self._saved_at = 0

    def _save_now(self, trainer: pl.Trainer) -> None:
        bad = non_finite_state(trainer.lightning_module, trainer.optimizers)
        if bad:
            raise FloatingPointError(
                f"{bad} holds non-finite values after update {getattr(trainer.lightning_module, 'updates', '?')}; "
                f"nothing was saved, and {self.last_good()} holds the last finite state; lower the learning "
                "rates or raise the optimisers' eps (model.world_model.eps, model.actor_critic.eps), then "
                "resume or start over")
        # set first: the checkpoint records it, so a resume from it does not save it again
        before, self._saved_at = self._saved_at, env_steps_of(trainer)
        try:
            save_env_step_checkpoint(self, trainer, env_steps_of(trainer))
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

    def last_good(self) -> str:
        """Which checkpoint a stopped run resumes from, for its error line."""
        if not self._saved_at:
            return "no checkpoint (none was written yet)"
        return f"{os.path.join(self.dirpath or '', 'last.ckpt')} ({self._saved_at} env steps)"

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # a diverged update names the checkpoint to go back to (every saved one is finite)
        if isinstance(exception, FloatingPointError) and exception.args and "last finite state" not in str(exception):
            exception.args = (f"{exception.args[0]} (the last checkpoint: {self.last_good()})", *exception.args[1:])

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


def non_finite_state(module: torch.nn.Module, optimizers) -> str | None:
    """The first weight or optimiser-state tensor of ``module`` holding NaN or inf, by name, or None."""
    for name, tensor in module.state_dict().items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"weight {name}"
    for i, opt in enumerate(optimizers):
        for state in opt.state.values():
            for key, tensor in state.items():
                if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    return f"optimiser {i}'s {key}"
    return None


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
        if dm is not None and dm.collector.recent_episodes:
            postfix["return"] = f"{dm.collector.recent_episodes[-1]['return']:.1f}"
        bar.set_postfix(postfix, refresh=False)
        if batch_idx % self.refresh_rate == 0 or (bar.total is not None and bar.n >= bar.total):
            bar.refresh()


class UpdateClock:
    """Seconds spent inside updates. On the CPU the wall time between ``start`` and ``stop``; on a
    GPU the time between two CUDA events around the update, read once per ``take``, so that no
    update is waited for (a synchronisation per update would stall the next one's launch)."""

    def __init__(self) -> None:
        self._seconds, self._began = 0.0, 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # (start, stop) per GPU update

    def start(self, device: torch.device) -> None:
        if device.type == "cuda":
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._events[-1][0].record()
        else:
            self._began = time.perf_counter()

    def stop(self) -> None:
        if self._events:
            self._events[-1][1].record()
        else:
            self._seconds += time.perf_counter() - self._began

    def take(self) -> float:
        """The seconds since the last ``take``."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1000  # ms
            self._events = []
        seconds, self._seconds = self._seconds, 0.0
        return seconds


class StopAtEnvSteps(Callback):
    """Ends fit once the envs of all ranks have taken the model's ``max_env_steps`` environment
    steps (checked after every update; the DataModule counts them)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if env_steps_of(trainer) >= pl_module.hparams.max_env_steps:
            trainer.should_stop = True


class TrainingLog(Callback):
    """Logs what an update returned (its losses, averaged over ranks), the update and env-step
    counters, and, once each at their own env step: updates/s, env steps/s and the share of wall
    time spent in updates (every 5 s or more), the episodes that finished (every rank's) and what
    the agent measured while acting (``acting_metrics``: an extension's, e.g. goal success).

    Lightning keeps only every ``log_every_n_steps``-th step's values (counting batches from 1, as
    ``updates`` does): this logs, and takes the finished episodes, only then, so none is dropped.
    """

    # Losses that move with every live update. The same value at this many logs in a row, for the
    # image loss or for three of them together, is a collapse. One or two alone may legitimately
    # settle at exactly 0 in float32: a game without rewards saturates the reward and critic heads.
    WATCHED = ("loss/image", "loss/reward", "loss/continue", "loss/critic")
    FROZEN_LOGS = 5

    def __init__(self) -> None:
        self._perf = (time.perf_counter(), 0, 0)  # (time, updates, env steps) where the rates start
        self._in_update = UpdateClock()
        self._frozen: dict[str, tuple[float, int, int]] = {}  # loss -> (value, logs in a row, since update)

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed run's counters do not start at 0
        self._perf = (time.perf_counter(), pl_module.updates, env_steps_of(trainer))
        self._in_update = UpdateClock()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # the batch is already sampled (and the envs stepped) when this runs: what follows is the update
        self._in_update.start(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_update.stop()
        if pl_module.updates % trainer.log_every_n_steps and not trainer.should_stop:
            return
        env_steps = env_steps_of(trainer)
        names = sorted(outputs["metrics"])  # the mean over ranks, in one all-reduce
        averaged = mean_over_ranks(torch.stack([outputs["metrics"][k].float() for k in names]))
        metrics = dict(zip(names, averaged.unbind()))
        self._check_collapse(metrics, pl_module)
        metrics["counters/updates"] = torch.tensor(float(pl_module.updates))
        metrics["counters/env_steps"] = torch.tensor(float(env_steps))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        pl_module.log("step", float(env_steps), on_step=True, on_epoch=False)
        # facts of their own moment go to the loggers once (self.log would repeat the latest value
        # at every later logging step)
        points = []
        now = time.perf_counter()
        t0, u0, e0 = self._perf
        if now - t0 >= 5.0:
            points.append((env_steps, {"perf/updates_per_s": (pl_module.updates - u0) / (now - t0),
                                       "perf/env_steps_per_s": (env_steps - e0) / (now - t0),
                                       "perf/update_share": self._in_update.take() / (now - t0)}))
            self._perf = (now, pl_module.updates, env_steps)
        dm = trainer.datamodule
        episodes = dm.collector.pop_episodes() if dm is not None else []
        for rank_episodes in gather_objects(episodes):
            for e in rank_episodes:  # each rank counts its own env steps; the axis counts all ranks'
                points.append((e["env_steps"] * trainer.world_size,
                               {f"episode/{k}": e[k] for k in ("return", "length", "level_complete")}))
        if acting := pl_module.acting_metrics():
            points.append((env_steps, acting))
        log_points(trainer.loggers, points)


    def _check_collapse(self, metrics: dict[str, torch.Tensor], pl_module) -> None:
        """Stop a run whose watched losses stopped moving (a dead model: e.g. learning rate 1 leaves
        the reward, continue and critic losses at exactly 0 from the first log)."""
        frozen = []
        for name in self.WATCHED:
            if name not in metrics:
                continue
            value = float(metrics[name])
            last, count, since = self._frozen.get(name, (None, 0, pl_module.updates))
            self._frozen[name] = (value, count + 1, since) if value == last else (value, 1, pl_module.updates)
            if self._frozen[name][1] >= self.FROZEN_LOGS:
                frozen.append(f"{name} = {value:g}")
        if len(frozen) >= 3 or any(n.startswith("loss/image ") for n in frozen):
            since = min(self._frozen[n.split(' = ')[0]][2] for n in frozen)
            hp = pl_module.hparams
            raise FloatingPointError(
                f"training collapsed: {', '.join(frozen)} did not change in {self.FROZEN_LOGS} logs "
                f"(updates {since} to {pl_module.updates}), which no live model does; the learning rates "
                f"(model.world_model.lr {hp.world_model['lr']:g}, model.actor_critic.actor_lr "
                f"{hp.actor_critic['actor_lr']:g}, critic_lr {hp.actor_critic['critic_lr']:g}) are likely too "
                "high: lower them and start over (--start_over true)")


class ValidationTable(Callback):
    """Prints the validation results, one row per level split (training levels, unseen levels),
    with goal success when it was measured."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        keys = ("return", "normalized_score", "level_complete", "episodes")
        if any(f"val/{split}/goal/step_success" in metrics for split in ("train_levels", "unseen_levels")):
            keys += ("goal/step_success", "goal/episode_success")
        rows = []
        for split in ("train_levels", "unseen_levels"):
            vals = [metrics.get(f"val/{split}/{k}") for k in keys]
            if vals[0] is not None:
                rows.append(f"{split:<14}" + "".join(
                    f"{float(v) if v is not None else float('nan'):>22.3f}" for v in vals))
        if rows:
            header = f"{'levels':<14}" + "".join(f"{k.replace('goal/', 'goal_'):>22}" for k in keys)
            print("\n" + header + "\n" + "\n".join(rows))
