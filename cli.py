"""Entry point: ``python cli.py fit|validate --config configs/<file>.yaml [--key value ...]``.

LightningCLI over ``Dreamer`` and ``ReplayDataModule`` in OmegaConf parser mode, with
``configs/default.yaml`` loaded first. A run gets the name ``<game>-<size>-seed<seed>``, its
directory ``runs/<name>`` (checkpoints, memmap replay, config) and an MLflow run of that name.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import MLFlowLogger

from datamodules.replay_datamodule import ReplayDataModule
from dreamer.agent import Dreamer, precision_problem
from dreamer.checkpoints import CheckpointError, checkpoint_mismatch, read_checkpoint

ROOT = Path(__file__).resolve().parent


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list):
        if all(not isinstance(v, (dict, list)) for v in tree):
            return {prefix[:-1]: str(tree)}
        out = {}
        for i, value in enumerate(tree):
            out.update(_flatten(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


class LogConfigToLoggers(SaveConfigCallback):
    """Writes the resolved config next to the run and logs it, flattened, as the run's params."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, root / self.config_filename, skip_none=False,
                             overwrite=True, multifile=False)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.as_dict()
        params = {k: v for k, v in _flatten(config).items() if k != "config"}
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_text(logger.run_id, text, "config.yaml")


class DreamerCLI(LightningCLI):
    """LightningCLI that names runs and places their files from the resolved config.

    Unlike LightningCLI's default, a checkpoint's hyperparameters do not replace the config: the
    run keeps what it was given (e.g. a larger ``max_env_steps`` to train on), and a checkpoint
    whose model size or game differs is refused with what differs.
    """

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        cfg = self.config[subcommand]
        ckpt_path = cfg.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        try:
            checkpoint = read_checkpoint(ckpt_path)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
        differences = checkpoint_mismatch(
            checkpoint, cfg.model.size, cfg.model.overrides, cfg.data.game
        )
        if differences:
            sys.exit(f"error: checkpoint {ckpt_path} does not match this run; " + "; ".join(differences))

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        problem = precision_problem(cfg.trainer.precision)
        if problem:
            sys.exit(f"error: {problem}")
        name = f"{cfg.data.game}-{cfg.model.size}-seed{cfg.data.seed}"
        if cfg.trainer.default_root_dir is None:
            cfg.trainer.default_root_dir = os.path.join("runs", name)
        root = cfg.trainer.default_root_dir
        if cfg.data.replay_dir is None:
            cfg.data.replay_dir = os.path.join(root, "replay")
        loggers = cfg.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if getattr(logger, "class_path", "").endswith("MLFlowLogger"):
                args = logger.init_args
                if args.get("run_name") is None:
                    args.run_name = f"{name}-{self.subcommand}" if self.subcommand != "fit" else name
                args.tags = {**(args.get("tags") or {}), "game": cfg.data.game,
                             "size": cfg.model.size, "seed": str(cfg.data.seed),
                             "subcommand": str(self.subcommand)}
        for callback in cfg.trainer.callbacks or []:
            if getattr(callback, "class_path", "").endswith("EnvStepCheckpoint"):
                if callback.init_args.get("dirpath") is None:
                    callback.init_args.dirpath = os.path.join(root, "checkpoints")

    def before_fit(self) -> None:
        self._print_locations()

    def after_fit(self) -> None:
        trainer, model, dm = self.trainer, self.model, self.datamodule
        if not trainer.is_global_zero:
            return
        episodes = list(dm.recent_episodes)
        recent = (f", mean return of the last {len(episodes)} episodes "
                  f"{sum(e['return'] for e in episodes) / len(episodes):.2f}") if episodes else ""
        print(f"\ndone: {dm.total_env_steps} env steps, {model.updates} updates, {dm.episodes} episodes{recent}")
        self._print_locations()

    def before_validate(self) -> None:
        self._print_locations()

    def _print_locations(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                print(f"MLflow: tracking URI {logger._tracking_uri}, experiment "
                      f"'{logger._experiment_name}', run {logger.run_id} "
                      f"(browse with: mlflow ui --backend-store-uri {logger._tracking_uri})")
        if trainer.checkpoint_callback is not None:
            print(f"checkpoints: {trainer.checkpoint_callback.dirpath}")


def main(args: list[str] | None = None, run: bool = True) -> DreamerCLI:
    defaults = {"default_config_files": [str(ROOT / "configs" / "default.yaml")]}
    if run:
        parser_kwargs = {"parser_mode": "omegaconf", **{
            command: defaults for command in ("fit", "validate", "test", "predict")}}
    else:
        parser_kwargs = {"parser_mode": "omegaconf", **defaults}
    return DreamerCLI(
        Dreamer,
        ReplayDataModule,
        parser_kwargs=parser_kwargs,
        save_config_callback=LogConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
