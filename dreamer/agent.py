"""Dreamer: the LightningModule that owns the world model and the actor-critic, trains and acts."""

from __future__ import annotations

import inspect
import os
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from callbacks.training import TrainingLog, ValidationTable
from datamodules.games import NUM_ACTIONS, OBS_SHAPE
from dreamer.actor_critic import ActorCritic
from dreamer.checkpoints import CheckpointError, load_agent_state, save_agent_state, trainer_of
from dreamer.compat import ignore_in_ddp
from dreamer.config import CNN_MULTS, SIZES, argument_problem, precision_problem
from dreamer.distributions import sample_index
from dreamer.goals import GoalMatcher, GoalPursuit, GoalStateModel, GoalTrack, isolated_rng, mixture_probs
from dreamer.rssm import State
from dreamer.update import update
from dreamer.world_model import WorldModel


class ActingState(NamedTuple):
    """What ``Dreamer.act`` carries from one step to the next, per env lane."""

    post: State  # posterior (N, ...) after the latest frames
    action: torch.Tensor  # (N,) the actions just taken from it
    goals: GoalTrack | None = None  # goal pursuit, when goals are on


class Dreamer(pl.LightningModule):
    """DreamerV3 on Procgen: world model and actor-critic trained together, one backward per update.

    ``size`` picks a preset from ``SIZES``; ``overrides`` replaces single entries of it. Training
    stops once the DataModule has taken ``max_env_steps`` environment steps; updates and env steps
    (not Lightning's ``global_step``, which counts every optimiser step) are the x-axis of every
    logged metric.

    The networks follow the newest DreamerV3 (block-GRU core, truncated-normal initialisation,
    reward and continue heads of one layer, actor and critic of ``layers``, actor output scale
    0.01) with ``norm`` LayerNorm (or ``rms``, DreamerV3's, slower on CPUs); the critic also
    learns from replayed returns at scale ``repval``. ``world_model_args`` and ``actor_critic_args``
    set those modules' remaining DreamerV3 knobs (``MODULE_KNOBS``: unimix, loss scales, slow
    critic, return normalisation). A batch with a replay context
    (``replay_batch``) starts from the latents stored in replay, and the update writes its
    posteriors back (``latent_sizes`` says what the replay keeps).

    Goals (see ``dreamer/goals.py``): ``goal_model`` proposes goals with ``goal_strategy``
    (``value`` or ``replay``; ``goal_rollouts`` imagined rollouts, ``goal_offset`` steps ahead in
    replay), a state matches its goal at similarity >= ``goal_threshold``, and an unmatched goal
    is replaced after ``goal_steps`` environment steps. ``goal_matcher`` is trained only by the
    dream callbacks. Goal success is measured (while collecting and in validation) when
    ``track_goals`` is set or DreamWeaning mixes the matcher into acting; the measurement draws
    from its own random stream, so it never changes training.

    ``compile`` compiles the networks and the RSSM steps (the body of the observe and imagine
    loops) with ``torch.compile`` when fitting starts; parameter names and checkpoints are
    unchanged.
    """

    def __init__(
        self,
        size: str = "tiny",
        overrides: dict[str, int | list[int]] | None = None,
        horizon: int = 15,
        gamma: float = 1 - 1 / 333,
        lam: float = 0.95,
        entropy: float = 3e-4,
        free_bits: float = 1.0,
        scale_dyn: float = 1.0,
        scale_rep: float = 0.1,
        world_model_lr: float = 1e-4,
        world_model_eps: float = 1e-8,
        world_model_clip: float = 1000.0,
        actor_lr: float = 3e-5,
        critic_lr: float = 3e-5,
        actor_critic_eps: float = 1e-5,
        actor_critic_clip: float = 100.0,
        max_env_steps: int = 100_000,
        goal_strategy: str = "value",
        goal_threshold: float = 0.7,
        goal_rollouts: int = 8,
        goal_offset: int = 8,
        goal_steps: int = 32,
        matcher_lr: float = 3e-4,
        track_goals: bool = False,
        compile: bool = False,
        repval: float = 0.3,
        norm: str = "layer",
        world_model_args: dict[str, float] | None = None,
        actor_critic_args: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        problem = argument_problem(dict(locals()))
        if problem:
            raise ValueError(problem)
        self.save_hyperparameters(logger=False)  # the CLI logs the whole config
        arch = {**SIZES[size], "cnn_mults": CNN_MULTS, **(overrides or {})}
        self.world_model = WorldModel(
            NUM_ACTIONS, **{k: v for k, v in arch.items() if k != "layers"}, free_bits=free_bits, obs_shape=OBS_SHAPE,
            scale_dyn=scale_dyn, scale_rep=scale_rep, norm=norm, **(world_model_args or {}),
        )
        self.actor_critic = ActorCritic(
            self.world_model.rssm.feat_dim, NUM_ACTIONS, arch["units"], arch["layers"], horizon,
            gamma, lam, entropy, repval=repval, norm=norm, **(actor_critic_args or {}),
        )
        with torch.random.fork_rng(devices=[]):  # plain DreamerV3 keeps its random stream
            self.goal_matcher = GoalMatcher(
                self.world_model.rssm.feat_dim, arch["deter"], NUM_ACTIONS, arch["units"],
                arch["layers"], matcher_lr,
            )
        self.goal_model = GoalStateModel(
            arch["deter"], goal_strategy, goal_threshold, goal_rollouts, horizon, goal_offset,
            gamma=gamma,
        )
        self.goals = GoalPursuit(goal_steps, track_goals)  # acting's goal mode and success metrics
        self.last_post: State | None = None  # posteriors of the latest batch, for the callbacks
        self.automatic_optimization = False
        # DDP leaves alone: the goal matcher (trained only in callbacks, which average its gradients
        # themselves) and each rank's bank of its own replayed goal pairs
        ignore_in_ddp(self, [f"goal_matcher.{name}" for name, _ in self.goal_matcher.named_parameters()]
                      + [f"goal_model.{name}" for name in ("bank_start", "bank_goal", "bank_count")])
        self.updates = 0

    @property
    def latent_sizes(self) -> dict[str, int]:
        """What the replay keeps per step for its context: deter size and number of latents."""
        rssm = self.world_model.rssm
        return {"deter": rssm.deter, "stoch": rssm.stoch}

    # ---------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        trainer = trainer_of(self)
        problem = trainer is not None and precision_problem(trainer.precision)
        if problem:
            raise ValueError(problem)
        if self.hparams.compile and stage == "fit":
            self.compile_networks()
        if trainer is not None and trainer.world_size > 1:
            # Lightning seeds every rank alike (the weights start equal); from here each rank
            # draws its own acting and imagination noise. A resume restores each rank's stream.
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def compile_networks(self) -> None:
        """``torch.compile`` the encoder, decoder, heads, actor, critic, the RSSM's step functions
        and the whole imagination loop, in place (instance attributes; the state dict keeps its
        names). The loop, actor sampling included, traces into one graph without breaks."""
        wm, ac = self.world_model, self.actor_critic
        for module in (wm.encoder, wm.decoder, wm.reward_head, wm.continue_head, ac.actor, ac.critic):
            module.compile()
        wm.rssm.img_step = torch.compile(wm.rssm.img_step)
        wm.rssm.obs_step = torch.compile(wm.rssm.obs_step)
        self.imagine = torch.compile(self.imagine)

    OPTIMIZERS = ("world_model", "actor", "critic", "goal_matcher")  # configure_optimizers' order

    def optimizer(self, name: str):
        """The optimiser (Lightning's wrapper of it while training) of ``name`` in ``OPTIMIZERS``."""
        return self.optimizers()[self.OPTIMIZERS.index(name)]

    def configure_optimizers(self):
        hp = self.hparams
        return [
            torch.optim.Adam(self.world_model.parameters(), hp.world_model_lr, eps=hp.world_model_eps),
            torch.optim.Adam(self.actor_critic.actor.parameters(), hp.actor_lr, eps=hp.actor_critic_eps),
            torch.optim.Adam(self.actor_critic.critic.parameters(), hp.critic_lr, eps=hp.actor_critic_eps),
            self.goal_matcher.configure_optimizers(),
        ]

    def imagine(self, post: State, is_terminal: torch.Tensor):
        """Imagine ``horizon`` steps from every posterior state (B, T) -> features (H + 1, B * T, F)."""
        wm, ac = self.world_model, self.actor_critic
        start = {k: v.detach().reshape(-1, *v.shape[2:]) for k, v in post.items()}  # (B * T, ...)
        with torch.no_grad():
            _, feat, actions = wm.rssm.imagine(start, ac.sample, self.hparams.horizon, keep_states=False)  # (H + 1, N, F)
            reward = wm.reward(feat[1:])  # (H, N)
            cont = torch.cat(
                [1.0 - is_terminal.reshape(1, -1).float(), wm.continue_prob(feat[1:])]
            )  # (H + 1, N)
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

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        hp = self.hparams
        optimizers = [self.optimizer(name) for name in ("world_model", "actor", "critic")]
        loss, metrics = update(self, optimizers, batch, backward=self.manual_backward)
        dm = self.trainer.datamodule
        if "context" in batch and dm is not None:
            dm.store_latents(batch, self.last_post)
        self.goal_model.update_statistics(self.last_post)
        if hp.goal_strategy == "replay":
            with isolated_rng(self.device, self.updates):
                self.goal_model.add_replay(self.last_post, batch["is_first"])
        self.updates += 1
        if dm is not None and dm.total_env_steps >= hp.max_env_steps:
            self.trainer.should_stop = True
        return {"loss": loss.detach(), "metrics": metrics, "post": self.last_post}  # for the callbacks

    def configure_callbacks(self) -> list[pl.Callback]:
        return [TrainingLog(), ValidationTable()]

    # ---------------------------------------------------------------- acting
    # Acting runs eagerly under --model.compile: its env counts and no-grad mode would make the
    # compiled training functions recompile past dynamo's limit.
    @torch.compiler.set_stance("force_eager")
    @torch.no_grad()
    def act(
        self, obs: torch.Tensor, is_first: torch.Tensor, state: ActingState | None = None,
        reward: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ActingState]:
        """Sample actions (N,) for uint8 frames (N, 64, 64, 3), carrying an ``ActingState``
        (posterior, last action, goal track). The recurrent state and previous action are zeroed
        where ``is_first``.

        ``reward`` (N,), received on arriving at ``obs``, only feeds the goal metrics.
        """
        is_first = is_first.to(self.device) if state is not None else torch.ones_like(is_first, device=self.device)
        track = ActingState(*state).goals if state is not None else None
        post = self.observe_step(obs, is_first, state)
        feat = self.world_model.rssm.features(post)
        goals = self.goals
        if not goals.on:
            action = self.actor_critic.sample(feat)
            return action.cpu(), ActingState(post, action)
        reward = torch.zeros(len(obs)) if reward is None else reward
        track = goals.step(post, is_first.bool(), reward.to(self.device), track, self.goal_model,
                           self.world_model, self.actor_critic)
        if not goals.mix_weight:
            action = self.actor_critic.sample(feat)
        else:
            matcher_logits = self.goal_matcher.policy_logits(feat, post["deter"], track.goal)
            probs = mixture_probs(self.actor_critic.policy_logits(feat), matcher_logits, goals.mix_weight)
            action = sample_index(probs)
        return action.cpu(), ActingState(post, action, track)

    @torch.compiler.set_stance("force_eager")
    @torch.no_grad()
    def observe_step(self, obs: torch.Tensor, is_first: torch.Tensor, state: Any = None) -> State:
        """Posterior (N, ...) after seeing uint8 frames ``obs`` (N, 64, 64, 3); ``state`` starts with
        (previous posterior, previous action) or is None at the start (every lane then begins)."""
        obs, is_first = obs.to(self.device), is_first.to(self.device).bool()
        rssm = self.world_model.rssm
        if state is None:
            prev = rssm.initial(len(obs), self.device)
            prev_action = torch.zeros(len(obs), dtype=torch.long, device=self.device)
            is_first = torch.ones_like(is_first)
        else:
            prev, prev_action = state[0], state[1]  # an ActingState or (posterior, action)
        embed = self.world_model.encoder(obs)
        post = rssm.obs_step(prev, F.one_hot(prev_action, NUM_ACTIONS).float(), embed, is_first)
        return post

    # ---------------------------------------------------------------- validation
    def validation_step(self, split: str, batch_idx: int) -> None:
        dm = self.trainer.datamodule
        metric = self.goals.metrics[split]
        metric.reset()
        measure_goals = self.goals.on  # proposing goals costs 4x the acting itself
        self.goals.split = split
        world = self.trainer.world_size
        # each rank plays its share of the episodes on its own envs; in float32, as when collecting
        try:
            with torch.autocast(self.device.type, enabled=False):
                summary = dm.evaluate(self, split, episodes=-(-dm.hparams.val_episodes // world))
        finally:
            self.goals.split = "fit"
        for key, value in metric.compute().items() if measure_goals else ():  # summed over ranks
            summary[f"goal/{key}"] = float(value)
        for key, value in summary.items():
            self.log(f"val/{split}/{key}", value, on_step=False, on_epoch=True, batch_size=1,
                     sync_dist=True, reduce_fx="sum" if key == "episodes" else "mean")
        self.log("step", float(dm.total_env_steps), on_step=False, on_epoch=True, batch_size=1)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_agent_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_agent_state(self, checkpoint)


def restore_agent(ckpt: dict[str, Any], path: str | os.PathLike = "the checkpoint") -> Dreamer:
    """The Dreamer saved in ``ckpt`` (from ``read_checkpoint``), its weights loaded, in eval mode."""
    allowed = inspect.signature(Dreamer.__init__).parameters
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if k in allowed}
    try:
        agent = Dreamer(**hparams)
        agent.load_state_dict(ckpt["state_dict"])
    except (ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path} does not hold a Dreamer this code can restore: "
                              f"{str(e).splitlines()[0][:300]}") from None
    return agent.eval()
