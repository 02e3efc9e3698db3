"""GoalDreamer: plain DreamerV3 (``dreamer.agent.Dreamer``) with the goal framework added, the agent
the dream callbacks train (``configs/dreams.yaml`` selects it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dreamer import visuals
from dreamer.agent import Dreamer
from dreamer.checkpoints import trainer_of
from dreamer.compat import ignore_in_ddp
from dreamer.config import KNOBS, argument_problem, knob, module_args
from dreamer.goals.hard import ACTOR_TRIES
from dreamer.goals.matcher import GoalMatcher
from dreamer.goals.model import MATCHER_REWARDS, STRATEGIES, GoalStateModel
from dreamer.goals.pursuit import Acting, GoalPursuit, GoalTrack
from dreamer.goals.space import SPACES, make_goal_space
from dreamer.migrations import grouped
from dreamer.rssm import State


@dataclass(frozen=True)
class GoalKnobs:
    """``model.goals``: the goal space (``space``, and ``space_dim`` for the learned ``inverse`` and
    ``multistep``; see ``dreamer/goals/space.py``), goal proposals, matching, the matcher's
    optimiser and imagination (``matcher_horizon`` steps discounted by ``matcher_gamma``, entropy
    bonus ``matcher_entropy``), and ``track`` (measure goal success while acting without
    DreamWeaning); ``matcher_reward`` is the goal reward of the matcher's RL (``GoalMatcher``);
    ``actor_tries`` the imagined actor rollouts that must all miss a hard goal (``dreamer/goals/hard.py``,
    the one definition proposals, the matcher's RL goals and evaluation share);
    ``plan`` (0: off) the dreams of ``plan_horizon`` steps that choose each action while the
    matcher acts (``GoalPursuit.planned``)."""

    space: str = knob("deter", choices=SPACES)
    space_dim: int = knob(32, 1, 4096, integer=True)
    strategy: str = knob("value", choices=STRATEGIES)
    threshold: float = knob(0.7, 0, 1, False)
    rollouts: int = knob(8, 1, 4096, integer=True)
    offset: int = knob(8, 1, 10_000, integer=True)
    steps: int = knob(32, 1, 1_000_000, integer=True)
    matcher_lr: float = knob(3e-4, 0, 1, False)
    matcher_reward: str = knob("similarity", choices=MATCHER_REWARDS)
    matcher_horizon: int = knob(15, 1, 1000, integer=True)
    matcher_gamma: float = knob(0.95, 0, 1, False)
    matcher_entropy: float = knob(3e-4, 0, 1)
    track: bool = knob(False, choices=(False, True))
    actor_tries: int = knob(ACTOR_TRIES, 1, 64, integer=True)
    plan: int = knob(0, 0, 1024, integer=True)
    plan_horizon: int = knob(8, 1, 256, integer=True)


class GoalActingState(NamedTuple):
    """``ActingState`` with the lanes' goal pursuit."""

    post: State  # posterior (N, ...) after the latest frames
    action: torch.Tensor  # (N,) the actions just taken from it
    goals: GoalTrack | None = None  # goal pursuit, when goals are on


class GoalDreamer(Dreamer):
    """``Dreamer`` with a goal state model that proposes goals (``goal_model``), a goal matcher that
    learns to reach them in dreams (``goal_matcher``, with its own optimiser, the fourth) and goal
    pursuit while acting (``goals``: off, tracked, or DreamWeaning's mixture). ``goals`` holds the
    ``model.goals`` knobs (``GoalKnobs``); every other argument is ``Dreamer``'s.

    The goal modules are built and goals proposed on their own random streams, so with goal
    pursuit off and no dream callback a GoalDreamer trains bit for bit as a Dreamer of the same
    seed. Under DDP the matcher, a learned goal space and each rank's goal banks train outside
    DDP's gradient average.
    """

    KNOBS = {**KNOBS, "goals": GoalKnobs}
    OPTIMIZERS = (*Dreamer.OPTIMIZERS, "goal_matcher")

    def __init__(self, goals: GoalKnobs = GoalKnobs(), **kwargs: Any) -> None:
        super().__init__(**kwargs)  # checks and records ``goals`` with the rest (``KNOBS``)
        goal = self.hparams.goals
        arch, ac = self.arch, self.hparams.actor_critic
        num_actions, feat = self.hparams.num_actions, self.world_model.rssm.feat_dim
        with torch.random.fork_rng(devices=[]):  # plain DreamerV3 keeps its random stream
            space = make_goal_space(goal["space"], arch["deter"], arch["stoch"] * arch["classes"], num_actions,
                                    goal["space_dim"], arch["units"], steps=goal["offset"])
            self.goal_matcher = GoalMatcher(feat, space.dim, num_actions, arch["units"], arch["layers"],
                                            goal["matcher_lr"], horizon=goal["matcher_horizon"],
                                            gamma=goal["matcher_gamma"], entropy=goal["matcher_entropy"],
                                            reward=goal["matcher_reward"])
        self.goal_model = GoalStateModel(arch["deter"], goal["strategy"], goal["threshold"], goal["rollouts"],
                                         ac["horizon"], goal["offset"], gamma=ac["gamma"], space=space,
                                         actor_tries=goal["actor_tries"])
        self.goals = GoalPursuit(Acting(goal["steps"], goal["track"], plan=goal["plan"], plan_horizon=goal["plan_horizon"]))
        # DDP leaves alone what trains outside its forward (averaging its own gradients) and each rank's goal bank
        ignore_in_ddp(self, ("goal_matcher.", "goal_model.space.", "goal_model.bank_"))

    @classmethod
    def argument_problem(cls, args: Any) -> str | None:
        if problem := argument_problem(args, cls.KNOBS):
            return problem
        goals = module_args("goals", args.get("goals"), cls.KNOBS)
        if goals["space"] == "multistep" and goals["offset"] < 2:
            return (f"model.goals.space multistep learns from steps 2 or more apart, up to model.goals.offset; "
                    f"got offset {goals['offset']}: set it to 2 or more, or use the inverse space")
        return None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        trainer = trainer_of(self)
        if stage == "fit" and trainer is not None:  # the goal model follows training when goals are used
            self.goals.learning = self.goals.acting.track or any(getattr(cb, "uses_goals", False) for cb in trainer.callbacks)

    def configure_optimizers(self):
        return [*super().configure_optimizers(), self.goal_matcher.configure_optimizers()]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        out = super().training_step(batch, batch_idx)
        if self.goals.learning:  # on the random stream of the update just made
            out["metrics"].update(self.goal_model.observe(self.last_post, batch["is_first"], batch["action"],
                                                          seed=self.updates - 1))
        return out

    @torch.compiler.set_stance("force_eager")
    @torch.no_grad()
    def act(self, obs: torch.Tensor, is_first: torch.Tensor, state: GoalActingState | None = None,
            reward: torch.Tensor | None = None) -> tuple[torch.Tensor, GoalActingState]:
        """``Dreamer.act``, pursuing goals when ``goals`` is on (``GoalPursuit.act``); ``reward`` (N,)
        received on arriving at ``obs`` feeds the goal metrics."""
        if not self.goals.on:
            action, acting = super().act(obs, is_first, state, reward)
            return action, GoalActingState(*acting)
        is_first = is_first.to(self.device) if state is not None else torch.ones_like(is_first, device=self.device)
        post = self.observe_step(obs, is_first, state)
        track = GoalActingState(*state).goals if state is not None else None
        action, track = self.goals.act(self, post, self.world_model.rssm.features(post), is_first, reward, track)
        return action.cpu(), GoalActingState(post, action, track)

    def acting_metrics(self) -> dict[str, float]:
        """Goal success while collecting since the last call (``goal/<metric>``), when it was measured."""
        metric = self.goals.metrics["fit"]
        if not metric.update_called:
            return {}
        values = {f"goal/{k}": float(v) for k, v in metric.compute().items() if not torch.isnan(v)}
        metric.reset()
        return values

    @torch.no_grad()
    def decode_goal(self, goal: torch.Tensor) -> np.ndarray:
        """Frames (N, 64, 64, 3) of goals in the ``deter`` space (N, D): the prior's most likely
        latent is taken for the stochastic part."""
        rssm = self.world_model.rssm
        logits = rssm.prior_net(goal).reshape(len(goal), rssm.stoch, rssm.classes)
        stoch = F.one_hot(logits.argmax(-1), rssm.classes).float()
        return visuals.decode(self, rssm.features({"deter": goal, "stoch": stoch}))

    def play_validation(self, split: str) -> dict[str, float]:
        with self.goals.measuring(split) as goal_summary:
            summary = super().play_validation(split)
        return {**summary, **goal_summary}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        space = (grouped(checkpoint.get("hyper_parameters") or {}).get("goals") or {}).get("space", "deter")
        if space != self.hparams.goals["space"]:
            raise ValueError(f"the checkpoint's goal space is {space!r}, this run's {self.hparams.goals['space']!r}; "
                             f"resume with --model.goals.space {space}")
        super().on_load_checkpoint(checkpoint)

