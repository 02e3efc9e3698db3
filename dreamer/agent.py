"""Dreamer: the LightningModule that owns the world model and the actor-critic, trains and acts."""

from __future__ import annotations

import inspect
import os
import time
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from datamodules.games import NUM_ACTIONS
from dreamer.actor_critic import ActorCritic
from dreamer.checkpoints import CheckpointError, checkpoint_mismatch, rng_state, set_rng_state
from dreamer.distributed import gather_objects, mean_over_ranks
from dreamer.distributions import sample_index
from dreamer.goals import STRATEGIES, GoalMatcher, GoalStateModel, GoalTrack, isolated_rng, mixture_probs
from dreamer.metrics import GoalSuccess
from dreamer.nets import NORMS
from dreamer.rssm import State
from dreamer.tracking import log_points
from dreamer.update import update
from dreamer.world_model import WorldModel

# deter / hidden / stoch (categoricals) / classes / cnn depth / mlp units / actor, critic and goal
# matcher layers / gru blocks. 1M and up are DreamerV3's presets (32 latents throughout); tiny is for
# tests. 1M is the CPU configs' preset: it ties with small on benchmarks/world_model_quality.py by
# quality per CPU-minute and is cheaper to act and imagine with.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(deter=64, hidden=64, stoch=32, classes=4, depth=4, units=64, layers=1, gru_blocks=1),
    "1M": dict(deter=512, hidden=64, stoch=32, classes=4, depth=4, units=64, layers=3, gru_blocks=8),
    "small": dict(deter=512, hidden=128, stoch=32, classes=8, depth=8, units=128, layers=3, gru_blocks=8),
    "12M": dict(deter=2048, hidden=256, stoch=32, classes=16, depth=16, units=256, layers=3, gru_blocks=8),
    "25M": dict(deter=3072, hidden=384, stoch=32, classes=24, depth=24, units=384, layers=3, gru_blocks=8),
    "50M": dict(deter=4096, hidden=512, stoch=32, classes=32, depth=32, units=512, layers=3, gru_blocks=8),
    "100M": dict(deter=6144, hidden=768, stoch=32, classes=48, depth=48, units=768, layers=3, gru_blocks=8),
    "200M": dict(deter=8192, hidden=1024, stoch=32, classes=64, depth=64, units=1024, layers=3, gru_blocks=8),
}
# CNN channels per stage are depth x these (DreamerV3's); an override (``cnn_mults``) can match
# another implementation exactly, e.g. SheepRL's (1, 2, 4, 8)
CNN_MULTS = (2, 3, 4, 4)


class ActingState(NamedTuple):
    """What ``Dreamer.act`` carries from one step to the next, per env lane."""

    post: State  # posterior (N, ...) after the latest frames
    action: torch.Tensor  # (N,) the actions just taken from it
    goals: GoalTrack | None = None  # goal pursuit, when goals are on


PRECISIONS = ("32-true", "bf16-mixed")


def precision_problem(precision: str | int | None) -> str | None:
    """Why a Lightning ``trainer.precision`` cannot train a Dreamer, or None if it can."""
    aliases = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "64": "64-true"}
    if precision is None or aliases.get(str(precision), str(precision)) in PRECISIONS:
        return None
    return (f"trainer.precision {precision!r} is not supported; allowed: {', '.join(PRECISIONS)}. "
            "16-mixed's gradient scaler does not cover the updates the dream callbacks make, and "
            "half-precision weights (bf16-true, 16-true) merge the two-hot bins, which reach 4.9e8")


# (lowest, highest, whether the lowest is allowed) for each numeric argument of Dreamer
RANGES: dict[str, tuple[float, float, bool]] = {
    "horizon": (1, 1000, True), "gamma": (0, 1, False), "lam": (0, 1, True), "entropy": (0, 1, True),
    "free_bits": (0, 100, True), "scale_dyn": (0, 100, True), "scale_rep": (0, 100, True),
    "world_model_lr": (0, 1, False), "actor_lr": (0, 1, False), "critic_lr": (0, 1, False),
    "matcher_lr": (0, 1, False), "world_model_eps": (0, 1, False), "actor_critic_eps": (0, 1, False),
    "world_model_clip": (0, float("inf"), False), "actor_critic_clip": (0, float("inf"), False),
    "max_env_steps": (1, float("inf"), True), "goal_threshold": (0, 1, False),
    "goal_rollouts": (1, 4096, True), "goal_offset": (1, 10_000, True), "goal_steps": (1, 1_000_000, True),
    "repval": (0, 100, True),
}
INTEGER_ARGUMENTS = ("horizon", "max_env_steps", "goal_rollouts", "goal_offset", "goal_steps")


def argument_problem(args: Any) -> str | None:
    """What is wrong with Dreamer's arguments, a mapping of them (the first problem, with what is
    allowed), or None. The CLI asks before it builds anything."""
    size, overrides = args["size"], args["overrides"] or {}
    if size not in SIZES:
        return f"unknown model size {size!r}; allowed: {', '.join(SIZES)}"
    unknown = set(overrides) - set(SIZES[size]) - {"cnn_mults"}
    if unknown:
        return f"unknown size overrides {sorted(unknown)}; allowed: {', '.join(SIZES[size])}, cnn_mults"
    for key, value in overrides.items():
        if key == "cnn_mults":
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 6 or \
                    any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in value):
                return (f"model.overrides.cnn_mults must be a list of 1 to 6 positive integers "
                        f"(channels per 64x64 -> 4x4 conv stage, in units of depth), got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"model.overrides.{key} must be a positive integer, got {value!r}"
    for name, (low, high, low_ok) in RANGES.items():
        value = args[name]
        integer = name in INTEGER_ARGUMENTS
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
            return f"model.{name} must be {'an integer' if integer else 'a number'}, got {value!r}"
        if not (low <= value if low_ok else low < value) or not value <= high or value != value:
            interval = f"{'[' if low_ok else '('}{low:g}, {high:g}]"
            return f"model.{name} must lie in {interval}, got {value!r}"
    if args["goal_strategy"] not in STRATEGIES:
        return f"unknown model.goal_strategy {args['goal_strategy']!r}; allowed: {', '.join(STRATEGIES)}"
    if args["norm"] not in NORMS:
        return f"unknown model.norm {args['norm']!r}; allowed: {', '.join(NORMS)}"
    return None


class Dreamer(pl.LightningModule):
    """DreamerV3 on Procgen: world model and actor-critic trained together, one backward per update.

    ``size`` picks a preset from ``SIZES``; ``overrides`` replaces single entries of it. Training
    stops once the DataModule has taken ``max_env_steps`` environment steps; updates and env steps
    (not Lightning's ``global_step``, which counts every optimiser step) are the x-axis of every
    logged metric.

    The networks follow the newest DreamerV3 (block-GRU core, truncated-normal initialisation,
    reward and continue heads of one layer, actor and critic of ``layers``, actor output scale
    0.01) with ``norm`` LayerNorm (or ``rms``, DreamerV3's, slower on CPUs); the critic also
    learns from replayed returns at scale ``repval``. A batch with a replay context
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
    ) -> None:
        super().__init__()
        problem = argument_problem(dict(locals()))
        if problem:
            raise ValueError(problem)
        self.save_hyperparameters(logger=False)  # the CLI logs the whole config
        arch = {**SIZES[size], "cnn_mults": CNN_MULTS, **(overrides or {})}
        self.world_model = WorldModel(
            NUM_ACTIONS, **{k: v for k, v in arch.items() if k != "layers"}, free_bits=free_bits,
            scale_dyn=scale_dyn, scale_rep=scale_rep, norm=norm,
        )
        self.actor_critic = ActorCritic(
            self.world_model.rssm.feat_dim, NUM_ACTIONS, arch["units"], arch["layers"], horizon,
            gamma, lam, entropy, repval=repval, norm=norm,
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
        self.goal_metrics = torch.nn.ModuleDict(
            {split: GoalSuccess() for split in ("fit", "train_levels", "unseen_levels")}
        )
        self.goal_split = "fit"  # which metric acting updates
        self.mix_weight: float | None = None  # set by DreamWeaning: weight of the matcher
        self._goal_seed = 0
        self.last_post: State | None = None  # posteriors of the latest batch, for the callbacks
        self.automatic_optimization = False
        # DDP leaves alone: the goal matcher (trained only in callbacks, which average its gradients
        # themselves) and each rank's bank of its own replayed goal pairs
        self._ddp_params_and_buffers_to_ignore = [
            f"goal_matcher.{name}" for name, _ in self.goal_matcher.named_parameters()
        ] + [f"goal_model.{name}" for name in ("bank_start", "bank_goal", "bank_count")]
        self.updates = 0
        self._perf = (time.perf_counter(), 0, 0)

    @property
    def latent_sizes(self) -> dict[str, int]:
        """What the replay keeps per step for its context: deter size and number of latents."""
        rssm = self.world_model.rssm
        return {"deter": rssm.deter, "stoch": rssm.stoch}

    # ---------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        problem = self._trainer is not None and precision_problem(self._trainer.precision)
        if problem:
            raise ValueError(problem)
        if self.hparams.compile and stage == "fit":
            self.compile_networks()
        if self._trainer is not None and self.trainer.world_size > 1:
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
            _, feat, actions = wm.rssm.imagine(start, ac.sample, self.hparams.horizon)  # feat (H + 1, N, F)
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

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        hp = self.hparams
        optimizers = self.optimizers()[:3]  # world model, actor, critic (the matcher's is the 4th)
        _, metrics = update(self, optimizers, batch, backward=self.manual_backward)
        dm = self.trainer.datamodule
        if "context" in batch and dm is not None:
            dm.store_latents(batch, self.last_post)
        self.goal_model.update_statistics(self.last_post)
        if hp.goal_strategy == "replay":
            with isolated_rng(self.device, self.updates):
                self.goal_model.add_replay(self.last_post, batch["is_first"])
        self.updates += 1
        self._log_training(metrics)
        if dm is not None and dm.total_env_steps >= hp.max_env_steps:
            self.trainer.should_stop = True

    def _log_training(self, metrics: dict[str, torch.Tensor]) -> None:
        # Lightning keeps only every log_every_n_steps-th step's values (counting batches from 1,
        # as ``updates`` does); log (and take the finished episodes) only then, so no episode is
        # dropped between two logged steps.
        if self.updates % self.trainer.log_every_n_steps and not self.trainer.should_stop:
            return
        dm = self.trainer.datamodule
        env_steps = dm.total_env_steps if dm is not None else 0
        names = sorted(metrics)  # losses: the mean over ranks, in one all-reduce
        averaged = mean_over_ranks(torch.stack([metrics[k].float() for k in names]))
        metrics = dict(zip(names, averaged.unbind()))
        metrics["counters/updates"] = torch.tensor(float(self.updates))
        metrics["counters/env_steps"] = torch.tensor(float(env_steps))
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        self.log("step", float(env_steps), on_step=True, on_epoch=False)
        # facts of their own moment go to the loggers once, at their own env step (self.log would
        # repeat the latest value at every later logging step)
        points = []
        now = time.perf_counter()
        t0, u0, e0 = self._perf
        if now - t0 >= 5.0:
            points.append((env_steps, {"perf/updates_per_s": (self.updates - u0) / (now - t0),
                                       "perf/env_steps_per_s": (env_steps - e0) / (now - t0)}))
            self._perf = (now, self.updates, env_steps)
        episodes = dm.pop_episodes() if dm is not None else []
        world = self.trainer.world_size
        for rank_episodes in gather_objects(episodes):
            for e in rank_episodes:  # each rank counts its own env steps; the axis counts all ranks'
                points.append((e["env_steps"] * world, {f"episode/{k}": e[k] for k in
                                                        ("return", "length", "level_complete")}))
        goal_metric = self.goal_metrics["fit"]
        if goal_metric.update_called:
            goals = {f"goal/{k}": float(v) for k, v in goal_metric.compute().items() if not torch.isnan(v)}
            goal_metric.reset()
            if goals:
                points.append((env_steps, goals))
        log_points(self.trainer.loggers, points)

    def on_train_start(self) -> None:
        # rates are measured from here: a resumed run's counters do not start at 0
        dm = self.trainer.datamodule
        self._perf = (time.perf_counter(), self.updates, dm.total_env_steps if dm is not None else 0)

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
        if not self.goals_on and self.goal_split == "fit":
            action = self.actor_critic.sample(feat)
            return action.cpu(), ActingState(post, action)
        if reward is None:
            reward = torch.zeros(len(obs))
        track = self._pursue_goals(post, is_first.bool(), reward.to(self.device), track)
        if not self.mix_weight:
            action = self.actor_critic.sample(feat)
        else:
            matcher_logits = self.goal_matcher.policy_logits(feat, post["deter"], track.goal)
            probs = mixture_probs(self.actor_critic.policy_logits(feat), matcher_logits, self.mix_weight)
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

    def _pursue_goals(
        self, post: State, is_first: torch.Tensor, reward: torch.Tensor, track: GoalTrack | None
    ) -> GoalTrack:
        """Score the current states against their goals, then give new goals where needed."""
        gm, metric = self.goal_model, self.goal_metrics[self.goal_split]
        if track is None:
            track = GoalTrack.empty(len(reward), post["deter"].shape[-1], self.device)
        ended = is_first & track.in_episode
        if ended.any():
            metric.update(episode_matches=track.matches[ended])
        track.matches[is_first] = 0
        track.active &= ~is_first
        track.in_episode[:] = True
        if track.active.any():
            active = track.active.clone()
            matched = gm.matched(track.goal, post) & active
            metric.update(matched=matched[active], reward=reward[active])
            track.matches += matched.long()
            track.age += active.long()
            track.active &= ~matched & (track.age < self.hparams.goal_steps)
        need = ~track.active
        if need.any():
            self._goal_seed += 1
            with isolated_rng(self.device, self._goal_seed):
                goal = gm.propose({k: v[need] for k, v in post.items()}, self.world_model, self.actor_critic)
            track.goal[need] = goal
            track.active[need] = True
            track.age[need] = 0
        return track

    # ---------------------------------------------------------------- validation
    @property
    def goals_on(self) -> bool:
        """Whether acting pursues goals: ``track_goals``, or DreamWeaning mixing in the matcher."""
        return bool(self.hparams.track_goals) or self.mix_weight is not None

    def validation_step(self, split: str, batch_idx: int) -> None:
        dm = self.trainer.datamodule
        metric = self.goal_metrics[split]
        metric.reset()
        measure_goals = self.goals_on  # proposing goals costs 4x the acting itself
        if measure_goals:
            self.goal_split = split
        world = self.trainer.world_size
        # each rank plays its share of the episodes on its own envs; in float32, as when collecting
        try:
            with torch.autocast(self.device.type, enabled=False):
                summary = dm.evaluate(self, split, episodes=-(-dm.hparams.val_episodes // world))
        finally:
            self.goal_split = "fit"
        for key, value in metric.compute().items() if measure_goals else ():  # summed over ranks
            summary[f"goal/{key}"] = float(value)
        for key, value in summary.items():
            self.log(f"val/{split}/{key}", value, on_step=False, on_epoch=True, batch_size=1,
                     sync_dist=True, reduce_fx="sum" if key == "episodes" else "mean")
        self.log("step", float(dm.total_env_steps), on_step=False, on_epoch=True, batch_size=1)

    def on_validation_epoch_end(self) -> None:
        metrics = self.trainer.callback_metrics
        keys = ("return", "normalized_score", "level_complete", "episodes")
        if any(f"val/{split}/goal/step_success" in metrics for split in ("train_levels", "unseen_levels")):
            keys += ("goal/step_success", "goal/episode_success")
        rows = []
        for split in ("train_levels", "unseen_levels"):
            vals = [metrics.get(f"val/{split}/{k}") for k in keys]
            if vals[0] is not None:
                rows.append(f"{split:<14}" + "".join(
                    f"{float(v) if v is not None else float('nan'):>22.3f}" for v in vals))
        if rows and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            header = f"{'levels':<14}" + "".join(f"{k.replace('goal/', 'goal_'):>22}" for k in keys)
            print("\n" + header + "\n" + "\n".join(rows))

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        checkpoint["dreamer"] = {
            "updates": self.updates,
            "torch_rng": torch.get_rng_state(),
            # as objects: nccl gathers no CPU tensors
            "rng_per_rank": gather_objects(rng_state(self.device)),
            "game": dm.hparams.game if dm is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        differences = checkpoint_mismatch(
            checkpoint, self.hparams.size, self.hparams.overrides,
            dm.hparams.game if dm is not None else None,
        )
        if differences:
            raise ValueError("checkpoint does not match this run; " + "; ".join(differences))
        saved = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        if saved and saved != own:
            changed = sorted(set(saved) ^ set(own)) or sorted(k for k in own if saved[k] != own[k])
            raise ValueError(f"checkpoint holds a model of another architecture (e.g. {changed[0]}), written "
                             "by an earlier version of this code; start a new run or use that version")
        state = checkpoint.get("dreamer", {})
        self.updates = int(state.get("updates", 0))
        # checkpoints before the CUDA stream was saved hold the CPU states only
        per_rank = state.get("rng_per_rank") or [{"cpu": s} for s in state.get("torch_rng_per_rank", [])]
        rank = self.trainer.global_rank if self._trainer is not None else 0
        # the model is not on its device yet: the strategy's device is where it will run
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        if rank < len(per_rank):
            set_rng_state(per_rank[rank], device)
        elif "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])


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
