"""Dreamer: the LightningModule that owns the world model and the actor-critic, trains and acts."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch

from dreamer.actor_critic import ActorCritic
from dreamer.checkpoints import load_agent_state, save_agent_state, trainer_of
from dreamer.compat import count_optimizer_step
from dreamer.config import (
    CNN_MULTS,
    KNOBS,
    SIZES,
    ActorCriticKnobs,
    OptimizerKnobs,
    WorldModelKnobs,
    argument_problem,
    cuda_graph_problem,
    module_args,
    precision_problem,
    without_optimiser,
)
from dreamer.memory import keep_freed_memory
from dreamer.optim import LaProp
from dreamer.rssm import State
from dreamer.update import GraphedUpdate, compile_update, set_capturable, update
from dreamer.world_model import WorldModel


class ActingState(NamedTuple):
    """What ``Dreamer.act`` carries from one step to the next, per env lane."""

    post: State  # posterior (N, ...) after the latest frames
    action: torch.Tensor  # (N,) the actions just taken from it


class Dreamer(pl.LightningModule):
    """DreamerV3 on Procgen: world model and actor-critic trained together, one backward per update.

    ``size`` picks a preset from ``SIZES`` and ``overrides`` replaces single entries of it;
    ``world_model``, ``actor_critic`` and ``optimizer`` set those modules' knobs (``KNOBS`` in
    ``dreamer/config.py`` lists them with defaults and ranges). The networks follow the newest
    DreamerV3 reference; ``norm`` is LayerNorm or DreamerV3's RMSNorm (slower on CPUs).
    ``num_actions`` and ``obs_shape`` are the env's (the CLI takes them from the DataModule) and
    stay in the checkpoint, so an agent restores without an env. A batch with a replay context
    starts from the latents stored in replay and the update writes its posteriors back. A run
    stops once its envs have taken ``max_env_steps`` environment steps, the x-axis of every metric
    (``callbacks.training.StopAtEnvSteps``).

    The goal framework extends this class (``dreamer.goals.GoalDreamer``); this one knows nothing
    of it. ``compile`` applies ``compile_update`` at fit start.
    ``cuda_graph`` replays each update as one CUDA graph (``GraphedUpdate``: on one GPU, the same
    updates as eager, 3.7x faster at 12M on an H200); batches must keep their shapes.
    """

    def __init__(
        self,
        size: str = "tiny",
        overrides: dict[str, int | list[int]] | None = None,
        world_model: WorldModelKnobs = WorldModelKnobs(),
        actor_critic: ActorCriticKnobs = ActorCriticKnobs(),
        optimizer: OptimizerKnobs = OptimizerKnobs(),
        norm: str = "layer",
        max_env_steps: int = 100_000,
        compile: bool = False,
        cuda_graph: bool = False,
        num_actions: int = 15,
        obs_shape: tuple[int, int, int] = (64, 64, 3),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # a subclass's arguments too; the CLI logs the whole config
        problem = self.argument_problem(dict(self.hparams))
        if problem:
            raise ValueError(problem)
        keep_freed_memory()
        for group in self.KNOBS:  # a checkpoint records every knob, given or default
            self.hparams[group] = module_args(group, self.hparams.get(group), self.KNOBS)
        self.hparams.obs_shape = tuple(obs_shape)
        wm, ac = self.hparams.world_model, self.hparams.actor_critic
        self.arch = {**SIZES[size], "cnn_mults": CNN_MULTS, **(overrides or {})}
        self.world_model = WorldModel(num_actions, **{k: v for k, v in self.arch.items() if k != "layers"},
                                      norm=norm, obs_shape=tuple(obs_shape), **without_optimiser(wm))
        self.actor_critic = ActorCritic(self.world_model.rssm.feat_dim, num_actions, self.arch["units"],
                                        self.arch["layers"], norm=norm, **without_optimiser(ac))
        self.last_post: State | None = None  # posteriors of the latest batch, for the callbacks
        self.automatic_optimization = False
        self.updates = 0
        self.graphed_update: GraphedUpdate | None = None  # built at the first update under cuda_graph

    KNOBS = KNOBS  # the groups of knobs this agent takes

    @classmethod
    def argument_problem(cls, args: Any) -> str | None:
        """What is wrong with this class's arguments (a mapping of them), or None."""
        return argument_problem(args, cls.KNOBS)

    @property
    def latent_sizes(self) -> dict[str, int]:
        """What the replay keeps per step for its context: deter size and number of latents."""
        return {"deter": self.world_model.rssm.deter, "stoch": self.world_model.rssm.stoch}

    # ---------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        trainer = trainer_of(self)
        problem = trainer is not None and precision_problem(trainer.precision)
        if problem:
            raise ValueError(problem)
        if self.hparams.cuda_graph and stage == "fit" and trainer is not None:
            problem = cuda_graph_problem(trainer.strategy.root_device.type, trainer.world_size, self.hparams.compile,
                                         self.hparams.optimizer["kind"])
            if problem:
                raise ValueError(problem)
        if self.hparams.compile and stage == "fit":
            compile_update(self)
        if trainer is not None and trainer.world_size > 1:
            # Lightning seeds every rank alike (the weights start equal); from here each rank
            # draws its own acting and imagination noise. A resume restores each rank's stream.
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    OPTIMIZERS = ("world_model", "actor", "critic")  # configure_optimizers' order

    def optimizer(self, name: str):
        """The optimiser (Lightning's wrapper of it while training) of ``name`` in ``OPTIMIZERS``."""
        return self.optimizers()[self.OPTIMIZERS.index(name)]

    def configure_optimizers(self):
        wm, ac, opt = self.hparams.world_model, self.hparams.actor_critic, self.hparams.optimizer
        if opt["kind"] == "laprop":
            make = lambda params, lr, eps: LaProp(params, lr, eps=eps, agc=opt["agc"], warmup=opt["warmup"])  # noqa: E731
        else:
            make = lambda params, lr, eps: torch.optim.Adam(params, lr, eps=eps)  # noqa: E731
        return [
            make(self.world_model.parameters(), wm["lr"], wm["eps"]),
            make(self.actor_critic.actor.parameters(), ac["actor_lr"], ac["eps"]),
            make(self.actor_critic.critic.parameters(), ac["critic_lr"], ac["eps"]),
        ]

    def imagine(self, post: State, is_terminal: torch.Tensor):
        """Imagine ``horizon`` steps from every posterior state (B, T) -> features (H + 1, B * T, F)."""
        wm, ac = self.world_model, self.actor_critic
        start = {k: v.detach().reshape(-1, *v.shape[2:]) for k, v in post.items()}  # (B * T, ...)
        with torch.no_grad():
            _, feat, actions = wm.rssm.imagine(start, ac.sample, ac.hp.horizon, keep_states=False)  # (H + 1, N, F)
            reward = wm.reward(feat[1:])  # (H, N)
            cont = torch.cat([1.0 - is_terminal.reshape(1, -1).float(), wm.continue_prob(feat[1:])])  # (H + 1, N)
        return feat, actions, reward, cont

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """World-model loss on the batch plus actor-critic loss on dreams from its posteriors."""
        wm_loss, metrics, post = self.world_model.loss(batch)
        self.last_post = {k: v.detach() for k, v in post.items()}
        replay = None
        if "is_last" in batch:  # the critic also learns from the replayed returns (repval)
            replay = {k: batch[k] for k in ("reward", "is_last", "is_terminal")}
            replay["feat"] = self.world_model.rssm.features(post)
        ac_loss, ac_metrics = self.actor_critic.loss(*self.imagine(post, batch["is_terminal"]), replay)
        return wm_loss + ac_loss, {**metrics, **ac_metrics}

    def on_train_start(self) -> None:
        # after a resume too: Adam's step counts live where this run's update mode wants them
        set_capturable([self.optimizer(name).optimizer for name in self.OPTIMIZERS[:3]], self.hparams.cuda_graph)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        optimizers = [self.optimizer(name) for name in ("world_model", "actor", "critic")]
        if self.hparams.cuda_graph:
            if self.graphed_update is None:
                self.graphed_update = GraphedUpdate(self, [opt.optimizer for opt in optimizers])
            loss, metrics = self.graphed_update(batch)
            for opt in optimizers:  # the graph steps the raw optimisers: count the steps as Lightning does
                count_optimizer_step(opt)
        else:
            loss, metrics = update(self, optimizers, batch, backward=self.manual_backward)
        dm = self.trainer.datamodule
        if "context" in batch and dm is not None:
            dm.store_latents(batch, self.last_post)
        self.updates += 1
        return {"loss": loss.detach(), "metrics": metrics, "post": self.last_post}  # for the callbacks

    # ---------------------------------------------------------------- acting
    # eager under --model.compile: env counts and no-grad mode would recompile the training graphs
    @torch.compiler.set_stance("force_eager")
    @torch.no_grad()
    def act(
        self, obs: torch.Tensor, is_first: torch.Tensor, state: ActingState | None = None,
        reward: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ActingState]:
        """Sample actions (N,) for uint8 frames (N, 64, 64, 3), carrying an ``ActingState``; the
        recurrent state restarts where ``is_first``. ``reward`` (N,), received on arriving at
        ``obs``, is for extensions (goal metrics)."""
        is_first = is_first.to(self.device) if state is not None else torch.ones_like(is_first, device=self.device)
        post = self.observe_step(obs, is_first, state)
        action = self.actor_critic.sample(self.world_model.rssm.features(post))
        return action.cpu(), ActingState(post, action)

    @torch.compiler.set_stance("force_eager")
    @torch.no_grad()
    def observe_step(self, obs: torch.Tensor, is_first: torch.Tensor, state: Any = None) -> State:
        """``world_model.observe_step`` from ``state`` (an ``ActingState`` or (posterior, action))."""
        return self.world_model.observe_step(obs.to(self.device), is_first.to(self.device), *(state or ())[:2])

    def acting_metrics(self) -> dict[str, float]:
        """What acting measured since the last call, for the training log (every rank calls it
        together); plain DreamerV3 measures nothing beside the episodes."""
        return {}

    # ---------------------------------------------------------------- validation
    def play_validation(self, split: str) -> dict[str, float]:
        """Play this rank's share of the validation episodes of ``split`` on its own envs, in
        float32 as when collecting; the DataModule's summary (return, return_se, ...)."""
        dm = self.trainer.datamodule
        with torch.autocast(self.device.type, enabled=False):
            return dm.evaluate(self, split, episodes=-(-dm.hparams.val_episodes // self.trainer.world_size))

    def validation_step(self, split: str, batch_idx: int) -> None:
        dm = self.trainer.datamodule
        summary = self.play_validation(split)
        # the ranks' mean of return_se / sqrt(ranks): the pooled mean's SE when the ranks' spreads agree
        summary["return_se"] /= self.trainer.world_size ** 0.5
        for key, value in summary.items():
            self.log(f"val/{split}/{key}", value, on_step=False, on_epoch=True, batch_size=1,
                     sync_dist=True, reduce_fx="sum" if key == "episodes" else "mean")
        self.log("step", float(dm.total_env_steps), on_step=False, on_epoch=True, batch_size=1)

    # ---------------------------------------------------------------- checkpoints: updates, random streams, game
    on_save_checkpoint = save_agent_state
    on_load_checkpoint = load_agent_state

