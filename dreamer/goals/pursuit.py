"""Goal pursuit while acting: the per-environment goal track, DreamWeaning's acting mixture,
planning in dreams, and goal success measured per split."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from dreamer.distributions import isolated_rng, sample_index
from dreamer.goals.metrics import GoalSuccess
from dreamer.goals.model import GoalStateModel, first_match
from dreamer.rssm import State


@dataclass
class GoalTrack:
    """Per-environment acting state of goal pursuit (all tensors (N,) or (N, G))."""

    goal: torch.Tensor
    active: torch.Tensor
    age: torch.Tensor
    in_episode: torch.Tensor
    matches: torch.Tensor

    @classmethod
    def empty(cls, n: int, goal_dim: int, device) -> "GoalTrack":
        z = torch.zeros(n, dtype=torch.long, device=device)
        f = torch.zeros(n, dtype=torch.bool, device=device)
        return cls(torch.zeros(n, goal_dim, device=device), f, z, f.clone(), z.clone())


def mixture_probs(actor_logits: torch.Tensor, matcher_logits: torch.Tensor, weight: float) -> torch.Tensor:
    """``w * pi_g + (1 - w) * pi_actor`` from normalised log-probabilities (..., A)."""
    return weight * matcher_logits.exp() + (1.0 - weight) * actor_logits.exp()


@dataclass(frozen=True)
class Acting:
    """How goal pursuit acts, one value (``GoalPursuit.acting``) that its owner replaces whole:
    off (plain DreamerV3 acting), ``track`` (propose goals and measure goal success while the
    actor acts) or ``mix_weight`` w set (DreamWeaning: act with ``w * matcher + (1 - w) * actor``).
    With ``greedy`` the mixture's most likely action is taken instead of a sample (goal-reaching
    evaluation; the actor acting alone still samples). With ``plan`` P > 0 and w > 0 each action
    is chosen in P dreams of ``plan_horizon`` steps (``GoalPursuit.planned``). A goal is dropped
    after ``goal_steps`` steps without a match."""

    goal_steps: int = 32
    track: bool = False
    mix_weight: float | None = None
    greedy: bool = False
    plan: int = 0
    plan_horizon: int = 8

    @property
    def on(self) -> bool:
        return bool(self.track) or self.mix_weight is not None


class GoalPursuit(nn.Module):
    """Goal pursuit while acting, as ``acting`` (an ``Acting``) says. Goals are proposed and scored
    only when it is on.

    With planning, acting is guided by dreams: each step imagines ``plan`` rollouts of
    ``plan_horizon`` steps per lane with the mixture policy and takes the first action of the
    rollout that matches the lane's goal soonest (or, where none matches, comes closest to it);
    see ``planned``.

    ``metrics`` hold goal success per split (``fit`` while collecting, and each validation split);
    ``split`` says which one acting updates. Proposals draw from their own random stream, so
    pursuing goals never changes the training's.
    """

    SPLITS = ("fit", "train_levels", "unseen_levels")

    def __init__(self, acting: Acting = Acting()) -> None:
        super().__init__()
        self.acting = acting
        self.metrics = nn.ModuleDict({split: GoalSuccess() for split in self.SPLITS})
        self.split = "fit"
        self.learning = False  # the goal model follows training (set at fit start)
        self._seed = 0

    @property
    def on(self) -> bool:
        return self.acting.on

    def act(self, agent, post: State, feat: torch.Tensor, is_first: torch.Tensor,
            reward: torch.Tensor | None, track: GoalTrack | None) -> tuple[torch.Tensor, GoalTrack]:
        """Actions (N,) of ``agent`` from its posteriors ``post`` (features ``feat``) while pursuing
        goals, and the goal track after scoring this step (``step``): the actor's samples, or
        DreamWeaning's mixture with the matcher toward each lane's goal."""
        acting = self.acting
        reward = torch.zeros(len(feat)) if reward is None else reward
        track = self.step(post, is_first.bool(), reward.to(feat.device), track, agent.goal_model,
                          agent.world_model, agent.actor_critic)
        if not acting.mix_weight:
            return agent.actor_critic.sample(feat), track
        if acting.plan:
            return self.planned(agent, post, track.goal, acting), track
        probs = self.probs(agent, feat, agent.goal_model.goal_of(post), track.goal, acting.mix_weight)
        return (probs.argmax(-1) if acting.greedy else sample_index(probs)), track

    @staticmethod
    def probs(agent, feat: torch.Tensor, here: torch.Tensor, goal: torch.Tensor, weight: float) -> torch.Tensor:
        """The acting mixture's action probabilities (N, A) at matcher weight ``weight``, at
        features ``feat`` (N, F) with goal vector ``here`` (N, G), toward ``goal`` (N, G)."""
        matcher_logits = agent.goal_matcher.policy_logits(feat, here, goal)
        return mixture_probs(agent.actor_critic.policy_logits(feat), matcher_logits, weight)

    def mixture(self, agent, goal: torch.Tensor, weight: float):
        """The acting policy ``feat -> actions`` toward ``goal`` (N, G), for ``rssm.imagine``."""
        space = agent.goal_model.space
        return lambda feat: sample_index(self.probs(agent, feat, space.of_features(feat), goal, weight))

    def planner(self, agent, goal: torch.Tensor, acting: Acting):
        """The policy ``feat -> actions`` that chooses each action toward ``goal`` (N, G) in dreams
        as ``acting`` says (``planned``), for ``rssm.imagine``: dreams planned inside a dream."""
        rssm = agent.world_model.rssm
        return lambda feat: self.planned(agent, rssm.state_from_features(feat), goal, acting)

    def plans(self, agent, post: State, goal: torch.Tensor, acting: Acting) -> tuple[torch.Tensor, torch.Tensor]:
        """From each state (N, ...) imagine ``acting.plan`` rollouts of ``acting.plan_horizon`` steps
        with the mixture at ``acting.mix_weight`` toward the lane's ``goal`` (N, G). Returns their
        first actions (N, P) and scores (N, P): ``1 + H - t`` for a first match at step t in 1..H
        (so at least 1), or else the rollout's best similarity (below the threshold, so below any
        match)."""
        n, p, h = len(goal), acting.plan, acting.plan_horizon
        start = {k: v.repeat_interleave(p, 0) for k, v in post.items()}  # (N * P, ...)
        goals = goal.repeat_interleave(p, 0)  # (N * P, G)
        states, _, actions = agent.world_model.rssm.imagine(start, self.mixture(agent, goals, acting.mix_weight), h)
        sim = agent.goal_model.similarity(goals.unsqueeze(0), {k: v[1:] for k, v in states.items()})  # (H, N * P)
        first, _ = first_match(sim, agent.goal_model.hp.threshold)
        steps_left = torch.arange(h, 0, -1, device=sim.device, dtype=sim.dtype).unsqueeze(-1)  # (H, 1): H..1
        score = torch.where(first.any(0), (first * steps_left).sum(0), sim.max(0).values).reshape(n, p)
        return actions[0].reshape(n, p), score

    def planned(self, agent, post: State, goal: torch.Tensor, acting: Acting) -> torch.Tensor:
        """Actions (N,) chosen in dreams (``plans``): the first action of each lane's best rollout."""
        first_action, score = self.plans(agent, post, goal, acting)
        best = score.argmax(-1)  # (N,)
        return first_action[torch.arange(len(best), device=best.device), best]

    @contextlib.contextmanager
    def measuring(self, split: str):
        """Acting inside the block scores goals into ``metrics[split]`` (reset first); yields a dict
        that holds the split's goal success (summed over ranks) after the block, when goals are on."""
        metric, self.split, summary = self.metrics[split], split, {}
        metric.reset()
        try:
            yield summary
        finally:
            self.split = "fit"
        if self.on:  # proposing goals costs 4x the acting itself: measured only when on
            summary.update({f"goal/{key}": float(value) for key, value in metric.compute().items()})

    def step(
        self, post: State, is_first: torch.Tensor, reward: torch.Tensor, track: GoalTrack | None,
        goal_model: GoalStateModel, world_model, actor_critic,
    ) -> GoalTrack:
        """Scores the states ``post`` (N, ...) against their goals, then gives new goals where
        needed (none yet, matched, or older than ``goal_steps``). ``is_first`` (N,) starts an
        episode: the previous one's matches are counted and its goal dropped."""
        metric = self.metrics[self.split]
        if track is None:
            track = GoalTrack.empty(len(reward), goal_model.space.dim, post["deter"].device)
        ended = is_first & track.in_episode
        if ended.any():
            metric.update(episode_matches=track.matches[ended])
        track.matches[is_first] = 0
        track.active &= ~is_first
        track.in_episode[:] = True
        if track.active.any():
            active = track.active.clone()
            matched = goal_model.matched(track.goal, post) & active
            metric.update(matched=matched[active], reward=reward[active], age=track.age[active] + 1)
            track.matches += matched.long()
            track.age += active.long()
            track.active &= ~matched & (track.age < self.acting.goal_steps)
        need = ~track.active
        if need.any():
            self._seed += 1
            with isolated_rng(post["deter"].device, self._seed):
                goal, usable = goal_model.propose_where({k: v[need] for k, v in post.items()}, world_model, actor_critic)
            track.goal[need] = goal
            track.active[need] = usable  # unscored (and asked again next step) where the strategy has none
            track.age[need] = 0
        return track
