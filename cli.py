"""Entry point: ``python cli.py fit|validate --config configs/<file>.yaml [--key value ...]``.

LightningCLI over ``Dreamer`` (or a subclass: ``model.class_path``, e.g. the goal framework's
``dreamer.goals.GoalDreamer`` that ``configs/dreams.yaml`` selects) and ``ReplayDataModule`` in
OmegaConf parser mode, with ``configs/default.yaml`` loaded first. A run gets the name ``<game>-<size>-seed<seed>``, its
directory ``runs/<name>`` (checkpoints, memmap replay, config) and an MLflow run of that name.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from callbacks.dreams import agent_problem
from callbacks.training import (
    EnvStepCheckpoint,
    EnvStepProgressBar,
    StopAtEnvSteps,
    TrainingLog,
    ValidationTable,
)
from callbacks.visualize import DreamVisualizer
from datamodules.checks import directory_problem, replay_space_problem
from datamodules.replay_datamodule import ReplayDataModule
from dreamer.agent import Dreamer
from dreamer.checkpoints import CheckpointError, checkpoint_mismatch, read_checkpoint
from dreamer.config import cuda_graph_problem, precision_problem
from dreamer.memory import keep_freed_memory
from dreamer.run_dir import (
    checkpoints_in,
    env_steps_of,
    fail_mlflow_run,
    free_dir,
    last_env_steps,
    lock_run,
    move_aside,
    run_files,
    saved_run_id,
)
from dreamer.tracking import RunLogger, params_to_log, run_exists

ROOT = Path(__file__).resolve().parent


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config as ``section.key`` params; a class's ``init_args`` keep their class's prefix
    (``model.size``, next to ``model.class_path``)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, prefix if key == "init_args" else f"{prefix}{key}."))
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
    """Writes the resolved config next to the run and logs it, flattened, as the run's params.

    Written once the checkpoint (if any) has been restored, so a refused or failed resume leaves
    the run's ``config.yaml`` as it was; a resume with another config keeps the earlier one as
    ``config.<n>.yaml``. A resumed MLflow run gets the params it lacks, and changed values as the
    tags ``resumed/<key>`` (MLflow never changes a param).
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        pass  # see on_fit_start / on_validation_start

    def on_fit_start(self, trainer, pl_module) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, RunLogger):
                logger.reopen()
        self._write(trainer, pl_module, "fit")

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validate")

    def _write(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        self.already_saved = True
        if not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        path = root / self.config_filename
        text = self.parser.dump(self.config, skip_none=False)
        if path.exists() and path.read_text() != text:
            n = 1
            while path.with_suffix(f".{n}.yaml").exists():
                n += 1
            os.replace(path, path.with_suffix(f".{n}.yaml"))
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        self.save_config(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.as_dict()
        params = {k: v for k, v in _flatten(config).items()
                  if k not in ("config", "start_over") and not k.endswith("run_id")}
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                new, changed = params_to_log(logger, params)
                logger.log_hyperparams(new)
                for key, value in changed.items():
                    logger.experiment.set_tag(logger.run_id, f"resumed/{key}", str(value)[:5000])
                name = "config.yaml" if not changed and len(new) == len(params) else \
                    f"config_resumed_{trainer.datamodule.total_env_steps}.yaml"
                logger.experiment.log_text(logger.run_id, text, name)
            else:
                logger.log_hyperparams(params)


def fail(message: str) -> None:
    """End the command with ``error: <message>`` and exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class DreamerCLI(LightningCLI):
    """LightningCLI that names runs and places their files from the resolved config.

    Unlike LightningCLI's default, a checkpoint's hyperparameters do not replace the config: the
    run keeps what it was given (e.g. a larger ``max_env_steps`` to train on), and a checkpoint
    whose model size or game differs is refused with what differs.

    A run owns its directory ``runs/<name>``: ``fit`` there again must resume it (``--ckpt_path``)
    or say ``--start_over true``, which moves the earlier run to ``runs/<name>.old-<n>``. ``validate``
    needs ``--ckpt_path`` and writes into a new directory of its own, ``runs/<name>-validate[-<n>]``.
    A resumed fit continues the MLflow run the checkpoint's run started (``mlflow_run.json``).
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        # the always-on callbacks as config sections: a config overrides checkpoint.every_env_steps
        # instead of repeating the trainer's callback list
        parser.add_lightning_class_args(EnvStepCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EnvStepProgressBar, "progress_bar")
        parser.add_lightning_class_args(DreamVisualizer, "dream_pictures")
        parser.add_argument("--start_over", type=bool, default=False,
                            help="fit: move an earlier run in the run directory aside "
                                 "(to <dir>.old-<n>) and start a new one")

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
            fail(str(e))
        optimizer = None
        if subcommand == "fit":  # a resume restores the optimiser's state: its kind must match
            optimizer = _optimizer_kind(cfg)
        model = cfg.model.init_args
        differences = checkpoint_mismatch(checkpoint, model.size, model.overrides, cfg.data.game, optimizer,
                                          model.get("world_model"), _canonical(cfg.model.class_path))
        if differences:
            fail(f"checkpoint {ckpt_path} does not match this run; " + "; ".join(differences))

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        model, agent = cfg.model.init_args, _class(cfg.model.class_path)
        if self.precision_auto:
            cfg.trainer.precision, why = auto_precision(cfg.trainer.accelerator, model.size)
            print(f"trainer.precision auto: {cfg.trainer.precision} ({why})", file=sys.stderr)
        problem = precision_problem(cfg.trainer.precision) or agent.argument_problem(model) \
            or ReplayDataModule.argument_problem(cfg.data) or _callbacks_problem(cfg, agent)
        if problem:  # before anything is built: a refused command leaves no files behind
            fail(problem)
        for key in ENV_SPACES:  # the agent's sizes are the env's, recorded in its hyperparameters
            env, given = getattr(ReplayDataModule, key), model.get(key)
            if given is not None and _as_list(given) != _as_list(env):
                fail(f"model.{key} is the env's ({env}), set by the CLI; got {given}: leave it out")
            model[key] = env
        if model.get("cuda_graph") and self.subcommand == "fit":
            problem = cuda_graph_problem(_device_type(cfg.trainer.accelerator), 1, model.get("compile"),
                                         _optimizer_kind(cfg))
            if problem:  # (the number of processes is checked at setup, once Lightning knows it)
                fail(problem)
        name = f"{cfg.data.game}-{model.size}-seed{cfg.data.seed}"
        validate_dir_given = cfg.trainer.default_root_dir is not None
        if self.subcommand == "validate":
            if not validate_dir_given:
                cfg.trainer.default_root_dir = str(free_dir(Path("runs") / f"{name}-validate"))
            cfg.data.replay_storage = "ram"  # validation plays fresh episodes and writes no replay
        elif self.subcommand == "fit" and cfg.trainer.default_root_dir is None:
            cfg.trainer.default_root_dir = os.path.join("runs", name)
        self._place_files(cfg, name)
        for args in _mlflow_args(cfg):
            if problem := _tracking_store_problem(args.get("tracking_uri")):
                fail(problem)
        if self.print_config is not None:
            print(self.config_text(cfg, self.print_config), end="")
            sys.exit(0)
        run_id = None
        # Lightning's DDP launcher starts ranks > 0 as copies of this command, after rank 0 has
        # locked and claimed (or moved aside) the directory: they must not take it again
        rank0 = int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
        if self.subcommand == "validate":
            if not cfg.get("ckpt_path"):
                fail("validate needs --ckpt_path: the checkpoint to evaluate "
                     "(e.g. runs/<name>/checkpoints/last.ckpt); without one it would score random weights")
            if cfg.get("start_over"):
                fail("--start_over applies to fit only; validate writes into a new directory of its own")
            if rank0:
                self._claim_validate_dir(cfg, name, validate_dir_given)
        elif self.subcommand == "fit":
            root = Path(cfg.trainer.default_root_dir)
            problem = directory_problem(root, "trainer.default_root_dir")
            if problem:
                fail(problem)
            if cfg.get("start_over") and cfg.get("ckpt_path"):
                fail("--start_over true starts a new run and --ckpt_path resumes one; give one of them")
            if rank0:
                _lock_or_fail(root)
                run_id = self._claim_run_dir(cfg)
        for args in _mlflow_args(cfg):
            if self.branched_from:
                args.tags = {**(args.get("tags") or {}), **self.branched_from}
            if run_id is not None and args.get("run_id") is None:
                if run_exists(args.get("tracking_uri") or "", run_id):
                    args.run_id = run_id
                else:
                    print(f"note: MLflow run {run_id} of this run is not in "
                          f"{args.get('tracking_uri')}; the resume logs to a new MLflow run")

    def _place_files(self, cfg, name: str) -> None:
        """Fill in what the run's name decides: replay and checkpoint directories, MLflow run name and tags."""
        root = cfg.trainer.default_root_dir
        if cfg.data.replay_dir is None:
            cfg.data.replay_dir = os.path.join(root, "replay")
        for args in _mlflow_args(cfg):
            if args.get("run_name") is None:
                args.run_name = f"{name}-{self.subcommand}" if self.subcommand != "fit" else name
            args.tags = {**(args.get("tags") or {}), "game": cfg.data.game,
                         "size": cfg.model.init_args.size, "seed": str(cfg.data.seed),
                         "subcommand": str(self.subcommand)}
        if cfg.checkpoint.get("dirpath") is None:
            cfg.checkpoint.dirpath = os.path.join(root, "checkpoints")

    # MLflow tags of a resume from an older checkpoint than the run's newest (``_claim_run_dir``)
    branched_from: dict[str, str] | None = None

    # ``--print_config`` is answered after the run's name and paths are filled in (jsonargparse's
    # own action prints before them, showing null)
    print_config: str | None = None

    # ``trainer.precision auto`` (Lightning's parser refuses the value): parsed as 32-true, then
    # decided by ``auto_precision`` once the accelerator is known
    precision_auto = False

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        argv, kept = list(sys.argv[1:] if args is None else args), []
        while argv:
            arg = argv.pop(0)
            if arg == "--print_config" or arg.startswith("--print_config="):
                self.print_config = arg.partition("=")[2]
                continue
            if arg in ("--trainer.precision", "--config") and argv:
                arg += "=" + argv.pop(0)
            key, _, value = arg.partition("=")
            if key == "--trainer.precision":
                if problem := _precision_value_problem(value):
                    fail(problem)
                self.precision_auto = value == "auto"
                arg = "--trainer.precision=32-true" if self.precision_auto else arg
            elif key == "--config":
                value = self._resolve_auto_precision(value)
                arg = f"--config={value}"
            kept.append(arg)
        self.config = parser.parse_args(kept)

    def _resolve_auto_precision(self, path: str) -> str:
        """A config file's path, or its text with ``trainer.precision: auto`` parsed as 32-true."""
        import yaml

        tree = yaml.safe_load(Path(path).read_text()) or {}
        trainer = tree.get("trainer")
        if not isinstance(trainer, dict) or trainer.get("precision") is None:
            return path  # no precision here (a malformed section is the parser's to refuse)
        if problem := _precision_value_problem(trainer["precision"]):
            fail(f"config file {path}: {problem}")
        self.precision_auto = trainer["precision"] == "auto"
        if not self.precision_auto:
            return path
        trainer["precision"] = "32-true"
        return yaml.safe_dump(tree, sort_keys=False)

    @staticmethod
    def config_text(cfg, flags: str = "") -> str:
        """The resolved config as YAML that ``--config`` reads back; ``flags`` may hold
        ``skip_null`` (jsonargparse's ``--print_config`` option)."""
        import yaml

        tree = _plain(cfg.as_dict(), skip_null="skip_null" in flags.split(","))
        tree.pop("config", None)
        return yaml.safe_dump(tree, sort_keys=False)

    def _claim_validate_dir(self, cfg, name: str, given: bool) -> None:
        """Lock and create validate's own directory: the one given (which must hold no run), or
        the first free ``runs/<name>-validate[-<n>]``, created exclusively so that two validates
        never share one."""
        while True:
            root = Path(cfg.trainer.default_root_dir) if given else free_dir(Path("runs") / f"{name}-validate")
            problem = directory_problem(root, "trainer.default_root_dir")
            if problem:
                fail(problem)
            _lock_or_fail(root)
            if given:
                if held := run_files(root):
                    fail(f"{root} holds a run ({', '.join(held)}); validate writes into a directory of "
                         "its own: leave --trainer.default_root_dir unset or name a new directory")
                break
            try:
                root.mkdir(parents=True)
                break
            except FileExistsError:  # another validate took this name first: try the next
                continue
        if str(root) != cfg.trainer.default_root_dir:  # the name first chosen was taken meanwhile
            cfg.trainer.default_root_dir = str(root)
            cfg.data.replay_dir = os.path.join(root, "replay")
            cfg.checkpoint.dirpath = os.path.join(root, "checkpoints")

    def _claim_run_dir(self, cfg) -> str | None:
        """Refuse to start a new run over an earlier one; returns the MLflow run id to continue on
        a resume of this directory's run."""
        root = Path(cfg.trainer.default_root_dir)
        held = run_files(root)
        if held and not cfg.get("ckpt_path") and not checkpoints_in(root):
            # a start that failed before its first checkpoint left these: not a run to keep
            aside = move_aside(root)
            failed = fail_mlflow_run(aside)
            print(f"note: {root} held no checkpoint, only the leftovers of a start that never saved one "
                  f"({', '.join(held)}); moved them to {aside}{failed}", file=sys.stderr)
            held = []
        replay_dir = Path(cfg.data.replay_dir) if cfg.data.replay_dir else None
        outside_replay = replay_dir is not None and root not in replay_dir.parents and replay_dir.is_dir() \
            and any(replay_dir.iterdir())
        ckpt = cfg.get("ckpt_path")
        if ckpt == "last":
            last = root / "checkpoints" / "last.ckpt"
            if not last.is_file():
                fail(f"--ckpt_path last: no checkpoint to resume at {last}; leave --ckpt_path out "
                     "to start a new run, or give the path of a .ckpt")
            ckpt = str(last)
        done = None
        if ckpt is not None:  # a resume that cannot work is refused before any file is opened
            try:
                saved = read_checkpoint(ckpt)
            except CheckpointError as e:
                fail(str(e))
            # the model first: a replay laid out for another model is a consequence, not the cause
            model = cfg.model.init_args
            differences = checkpoint_mismatch(saved, model.size, model.overrides, cfg.data.game,
                                              _optimizer_kind(cfg), model.get("world_model"),
                                              _canonical(cfg.model.class_path))
            if differences:
                fail(f"checkpoint {ckpt} does not match this run; " + "; ".join(differences))
            problem = ReplayDataModule.resume_problem(saved.get("ReplayDataModule") or {}, cfg.data) \
                or _missing_replay(saved, cfg)
            if problem:
                fail(problem)
            done = env_steps_of(saved)
            if done is not None and done >= model.max_env_steps:
                print(f"{ckpt} is finished: {done} env steps, and this command's model.max_env_steps is "
                      f"{model.max_env_steps}; nothing changed (a larger --model.max_env_steps trains on)")
                sys.exit(0)
        resuming_here = ckpt is not None and root.resolve() in Path(ckpt).resolve().parents
        if resuming_here:
            run_id, newest = saved_run_id(root), last_env_steps(root, ckpt)
            if run_id is not None and newest is not None and newest > (done or 0):
                # a rollback: the MLflow run keeps the steps it had; the branch gets a run of its own
                self.branched_from = {"branched_from_run": run_id, "branched_at_env_steps": str(done or 0)}
                print(f"note: {ckpt} ({done} env steps) is older than the run's newest checkpoint "
                      f"({newest} env steps); this resume logs to a new MLflow run tagged "
                      f"branched_from_run={run_id}", file=sys.stderr)
                return None
            return run_id
        if ckpt is None and not held and not outside_replay:
            if cfg.data.replay_storage == "memmap":
                if problem := replay_space_problem(replay_dir, cfg.data.replay_capacity):
                    fail(problem)
            return None
        if cfg.get("start_over"):
            if outside_replay:  # it may be another run's (whose resume would then fail): not ours to move
                fail(f"the replay directory {replay_dir} (outside {root}) holds a replay, and --start_over "
                     f"moves only {root}; move that replay aside yourself if it is this run's, or give "
                     "an empty --data.replay_dir")
            aside = move_aside(root)
            print(f"start over: moved the earlier run's {root} to {aside}")
            return None
        what = f"{root} holds a run ({', '.join(held)})" if held else \
            f"the replay directory {replay_dir} holds another run's replay"
        if ckpt is not None:
            fail(f"{what}, and --ckpt_path {cfg.get('ckpt_path')} is not one of its checkpoints; "
                 "resume a run in its own directory, or name a new one with --trainer.default_root_dir")
        fail(f"{what}; resume it with --ckpt_path last, start over with --start_over true "
             "(moves it aside), or name another directory with --trainer.default_root_dir")

    def before_fit(self) -> None:
        self._print_locations()
        self._record_mlflow_run()

    def after_fit(self) -> None:
        trainer, model, dm = self.trainer, self.model, self.datamodule
        if not trainer.is_global_zero:
            return
        episodes = list(dm.collector.recent_episodes)
        recent = (f", mean return of the last {len(episodes)} episodes "
                  f"{sum(e['return'] for e in episodes) / len(episodes):.2f}") if episodes else ""
        print(f"\ndone: {dm.total_env_steps} env steps, {model.updates} updates, {dm.collector.episodes} episodes{recent}")
        self._print_locations()

    def before_validate(self) -> None:
        self._print_locations()

    def _record_mlflow_run(self) -> None:
        """``<run dir>/mlflow_run.json``: the MLflow run a resume continues."""
        trainer = self.trainer
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and trainer.is_global_zero:
                path = Path(trainer.default_root_dir) / "mlflow_run.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                record = {"run_id": logger.run_id, "tracking_uri": logger.experiment.tracking_uri}
                tmp = path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(record) + "\n")
                os.replace(tmp, path)

    def _print_locations(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                client = logger.experiment
                name = client.get_experiment(logger.experiment_id).name
                print(f"MLflow: tracking URI {client.tracking_uri}, experiment '{name}', run {logger.run_id} "
                      f"(browse with: mlflow ui --backend-store-uri {client.tracking_uri})")
        if trainer.checkpoint_callback is not None:
            print(f"checkpoints: {trainer.checkpoint_callback.dirpath}")


def cpu_bf16(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """How this CPU multiplies bf16 matrices, from Linux's flags: ``amx_bf16`` (AMX tiles),
    ``avx512_bf16`` (AVX-512 bf16 dot products) or None (bf16 emulated in fp32 instructions)."""
    try:
        flags = set().union(*(line.split() for line in Path(cpuinfo).read_text().splitlines()
                              if line.startswith("flags")))
    except OSError:
        return None
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), None)


# the smallest preset whose update bf16-mixed made faster on an AVX512-BF16 CPU without AMX
# (2-core AMD EPYC, README "bf16 on an AVX512-BF16 CPU"): 12M 4.9 -> 3.4 s; tiny, 1M and
# small are bound by small operators, where autocast's casts cost more than the matmuls gain
AVX512_BF16_FROM = "12M"


def auto_precision(accelerator: Any, size: str) -> tuple[str, str]:
    """(``trainer.precision``, why) for ``trainer.precision auto``: bf16-mixed where it made
    updates of this ``size`` faster, 32-true elsewhere. Faster: CPUs with AMX (SheepRL's XS
    shape: 38%), and CPUs with AVX512-BF16 from the 12M preset up (12M: 30%; world-model
    reconstruction within 3% of fp32's per update, better per minute). Slower: smaller presets
    on AVX512-BF16 (1.1-1.9x), AVX2-only CPUs (14x), and GPUs at every size measured (H100, 12M
    to 200M: the update is bound by kernel launches, which autocast's casts add to)."""
    from dreamer.config import SIZES

    device = _device_type(accelerator)
    if device == "cuda":
        return "32-true", ("on GPUs bf16-mixed updates measured slower than fp32 (H100, 12M-200M: "
                           "README, GPU check)")
    if device != "cpu":
        return "32-true", f"accelerator {device}"
    flag = cpu_bf16()
    if flag == "amx_bf16":
        return "bf16-mixed", "the CPU has AMX bf16 tiles"
    if flag == "avx512_bf16":
        order = list(SIZES)
        if size in order and order.index(size) >= order.index(AVX512_BF16_FROM):
            return "bf16-mixed", f"the CPU has AVX512-BF16 and {size} updates are matmul-bound"
        return "32-true", (f"the CPU has AVX512-BF16 but no AMX, where {size} updates ran slower in "
                           f"bf16 than in fp32; bf16 pays from {AVX512_BF16_FROM} up")
    return "32-true", "the CPU has no bf16 matrix instructions, where bf16 is slower than fp32"


def _mlflow_args(cfg) -> list:
    """``init_args`` of each MLflow logger in the config."""
    loggers = cfg.trainer.logger
    return [logger.init_args for logger in (loggers if isinstance(loggers, list) else [loggers])
            if _is_mlflow(getattr(logger, "class_path", ""))]


def _plain(tree: Any, skip_null: bool) -> Any:
    """A parsed config as plain YAML types, without jsonargparse's ``__path__`` records."""
    if isinstance(tree, dict):
        return {k: _plain(v, skip_null) for k, v in tree.items()
                if k != "__path__" and not (skip_null and v is None)}
    if isinstance(tree, list):
        return [_plain(v, skip_null) for v in tree]
    return os.fspath(tree) if isinstance(tree, os.PathLike) else tree


def _is_mlflow(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, MLFlowLogger)


ENV_SPACES = ("num_actions", "obs_shape")  # the agent's arguments the DataModule's env decides


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _class(class_path: str) -> type:
    """The class a config's ``class_path`` names (the parser has checked that it imports)."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _canonical(class_path: str) -> str:
    """Where the class ``class_path`` names is defined (``dreamer.goals.GoalDreamer`` ->
    ``dreamer.goals.agent.GoalDreamer``), as checkpoints record it."""
    cls = _class(class_path)
    return f"{cls.__module__}.{cls.__qualname__}"


def _callbacks_problem(cfg, agent: type) -> str | None:
    """Why a callback in ``trainer.callbacks`` cannot train the config's agent class (a dream
    callback on a plain Dreamer), or None."""
    callbacks = cfg.trainer.get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        cls = _class(callback.class_path) if hasattr(callback, "class_path") else type(callback)
        if getattr(cls, "uses_goals", False) and (problem := agent_problem(cls.__name__, agent)):
            return problem
    return None


def _optimizer_kind(cfg) -> str:
    given = cfg.model.init_args.get("optimizer")
    return (given.get("kind") if hasattr(given, "get") else getattr(given, "kind", None)) or "adam"


def _device_type(accelerator: Any) -> str:
    """``cuda``, ``cpu`` (or another device type): where ``trainer.accelerator`` puts the model."""
    # (an Accelerator instance counts by its class name, e.g. CPUAccelerator)
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if name in ("gpu", "cuda") or "cuda" in name:
        return "cuda"
    return "cpu" if name.startswith("cpu") else name


def _tracking_store_problem(uri: str | None) -> str | None:
    """Why an MLflow ``sqlite:///`` store cannot be opened (a file that is not SQLite), or None."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    path = Path(uri[len("sqlite:///"):])
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None  # not there yet: MLflow creates it
    if head and head != b"SQLite format 3\x00":
        return (f"the MLflow store {path} is not an SQLite database (damaged, or another kind of file); "
                "move it aside, or give another --trainer.logger.init_args.tracking_uri")
    return None


def _missing_replay(checkpoint: dict, cfg) -> str | None:
    """Why the memmap replay a checkpoint resumes with is not where this run looks, or None."""
    state = checkpoint.get("ReplayDataModule") or {}
    replay = state.get("replay") or {}
    if cfg.data.replay_storage != "memmap" or (replay.get("storage") != "memmap" and "world_size" not in state):
        return None
    directory = Path(cfg.data.replay_dir) / "rank0"
    missing = [name for name in ("meta.json", "frames.bin") if not (directory / name).is_file()]
    if not missing:
        return None
    return (f"the checkpoint's replay is not in {directory} ({', '.join(missing)} missing), and a resume "
            "continues from it; point --data.replay_dir at the run's replay, or start a new run")


def _lock_or_fail(root: Path) -> None:
    """Take ``root``'s run lock (``dreamer/run_dir.py``) or end the command naming its holder."""
    holder = lock_run(root)
    if holder:
        fail(f"{root} is in use by {holder}; wait for it to end or stop it, "
             "or name another directory with --trainer.default_root_dir")


# errors a user's input causes: their message is the answer, a traceback only on request
# (Lightning's MisconfigurationException: e.g. trainer.devices 0, or a GPU accelerator without a GPU)
USER_ERRORS = (ValueError, CheckpointError, OSError, FloatingPointError, MisconfigurationException)


def main(args: list[str] | None = None, run: bool = True) -> DreamerCLI:
    """Run the CLI; an error caused by the input ends with one line ``error: ...`` (exit status 2)
    unless ``DREAMER_TRACEBACK=1`` asks for the traceback."""
    argv = sys.argv[1:] if args is None else args
    for path in _config_files(argv):
        problem = config_file_problem(path)
        if problem:
            fail(problem)
    try:
        keep_freed_memory()  # before the replay and the model allocate (dreamer/memory.py)
        return _cli(args, run)
    except SIGTERMException:  # Lightning stops at the next batch and would exit with status 0
        print("stopped by SIGTERM; resume from the last checkpoint with --ckpt_path last", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:  # Ctrl-C outside Lightning's loop
        _stopped_by_ctrl_c()
    except SystemExit as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # Lightning's handler of Ctrl-C exits 1
            _stopped_by_ctrl_c()
        raise
    except ArgumentError as e:  # the parser's: the option's name and what it accepts
        if os.environ.get("DREAMER_TRACEBACK") == "1":
            raise
        message = model_parser_message(parser_message(e))
        if "unrecognized arguments: --model.goals." in message:
            fail("model.goals.* are the goal framework's knobs (model dreamer.goals.GoalDreamer): give "
                 "--config configs/dreams.yaml before them, or --model dreamer.goals.GoalDreamer")
        fail(f"{message}; `python cli.py fit --help` lists every option")
    except USER_ERRORS as e:
        if os.environ.get("DREAMER_TRACEBACK") == "1":
            raise
        fail(one_line(e) + " (DREAMER_TRACEBACK=1 shows the traceback)")


def _precision_value_problem(value) -> str | None:
    """Why ``trainer.precision value`` is refused, before Lightning's parser lists the precisions
    it knows (most of which a Dreamer cannot train with), or None."""
    if str(value) == "auto":
        return None
    problem = precision_problem(value)
    return problem.replace("; allowed: ", "; allowed: auto, ", 1) if problem else None


def _stopped_by_ctrl_c() -> None:
    print("stopped by Ctrl-C; resume from the last checkpoint with --ckpt_path last", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


def parser_message(e: BaseException) -> str:
    """jsonargparse's (often multi-line) message as one line."""
    lines = [line.strip().rstrip(".:") for line in str(e).splitlines() if line.strip()]
    return ": ".join(lines)[:600] if lines else type(e).__name__


def model_parser_message(message: str) -> str:
    """jsonargparse's answer about a ``model`` option (a union over the model classes, long) as
    the option and what is wrong with it; other messages unchanged."""
    found = re.search(r"Problem with given class_path '([\w.]+)': (.*?): - Expected a <class 'NoneType'>.*?"
                      r"NestedArg\(key='([^']*)', val='([^']*)'\)", message)
    if not found:
        return message
    class_path, problem, key, value = found.groups()
    if problem.startswith(("unrecognized arguments", "Option ")):
        return f"unrecognized arguments: --model.{key} {value} ({class_path} has no such option)"
    prefix = f'Parser key "{key}": '
    return f"model.{key}: {problem.removeprefix(prefix)}"


def one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    if isinstance(e, OSError) and not lines[:1]:
        text = f"{type(e).__name__}: {e.strerror or ''} {e.filename or ''}".strip()
    return text


def _config_files(argv: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


SECTIONS = ("trainer", "model", "data", "checkpoint", "progress_bar", "dream_pictures")  # config mappings


def config_file_problem(path: str) -> str | None:
    """Why ``--config path`` cannot be read as a YAML mapping, or None."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        return f"cannot read config file {path}: {e.strerror or e}; give the path of a YAML file (e.g. configs/quickstart.yaml)"
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        return f"config file {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}"
    if tree is None:
        return (f"config file {path} is empty; give a YAML mapping of sections (trainer, model, data), "
                "e.g. configs/quickstart.yaml")
    if not isinstance(tree, dict):
        return f"config file {path} must hold a mapping of sections (trainer, model, data), got {type(tree).__name__}"
    for section in SECTIONS:
        value = (tree or {}).get(section)
        if value is not None and not isinstance(value, dict):
            return f"config file {path}: section {section} must be a mapping of its settings, got {value!r}"
    return None


def _cli(args: list[str] | None, run: bool) -> DreamerCLI:
    defaults = {"default_config_files": [str(ROOT / "configs" / "default.yaml")]}
    # a parser error raises (main turns it into one line) instead of printing the usage first
    if run:
        parser_kwargs = {"parser_mode": "omegaconf", "exit_on_error": False, **{
            command: {**defaults, "exit_on_error": False} for command in ("fit", "validate")}}
    else:
        parser_kwargs = {"parser_mode": "omegaconf", "exit_on_error": False, **defaults}
    return DreamerCLI(
        Dreamer,
        ReplayDataModule,
        subclass_mode_model=True,
        # the run plumbing every run has, after the config's callbacks
        trainer_defaults={"callbacks": [TrainingLog(), ValidationTable(), StopAtEnvSteps()]},
        parser_kwargs=parser_kwargs,
        save_config_callback=LogConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
