"""The goal state model: goal similarity, the banks of real goals, and goal proposals.

A goal is a vector in a goal space (``dreamer/goals/space.py``; by default the world model's
deterministic state ``deter``). Similarity is ``cosine_max(g, s) = g.s / max(|g|, |s|)^2`` (1 only
when ``s == g``) of goal and state standardised by running statistics of replayed posterior states; a state matches its goal
when the similarity reaches ``threshold``. Standardising matters: raw GRU states share a large
common component, so any two states of a game score above 0.7 and every goal would count as
reached.
"""

from __future__ import annotations

import torch
from torch import nn

from dreamer.distributed import mean_over_ranks, world_size
from dreamer.distributions import isolated_rng
from dreamer.goals.hard import ACTOR_TRIES, controllable, hard
from dreamer.goals.space import GoalSpace, continuing
from dreamer.nets import init_args
from dreamer.rssm import State

STRATEGIES = ("value", "replay", "hard", "control")
REPLAYED = ("replay", "hard", "control")  # the strategies that draw goals from the bank of real pairs
MATCHER_REWARDS = ("similarity", "reach")


def paths(action: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T - k, k): for each step t of replayed actions (B, T) (``action[t]`` taken at step t) the
    k actions taken at steps t..t+k-1, the ones that led to the state k steps later."""
    return action.unfold(1, k, 1)[:, :-1]


def imagined_return(world_model, actor_critic, feat: torch.Tensor, gamma: float) -> torch.Tensor:
    """(N,) predicted return of imagined trajectories with features (H + 1, N, F): discounted
    predicted rewards of steps 1..H weighted by predicted continuation, plus the end value."""
    alive = torch.cumprod(world_model.continue_prob(feat[1:]), 0)  # (H, N)
    disc = gamma ** torch.arange(1, len(alive) + 1, device=alive.device).unsqueeze(-1)
    return (disc * alive * world_model.reward(feat[1:])).sum(0) + disc[-1] * alive[-1] * actor_critic.value(feat[-1])


def cosine_max(goal: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """``g.s / max(|g|, |s|)^2`` over the last axis (1 only for identical vectors)."""
    norm = torch.maximum(goal.norm(dim=-1), state.norm(dim=-1)).clamp(min=1e-8)
    return (goal * state).sum(-1) / norm**2


def first_match(similarity: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``reach`` goal reward of imagined steps 1..H with goal similarities (H, N): 1 on the
    first step that matches (similarity >= ``threshold``) and 0 elsewhere, and (H, N) 1 while no
    step up to and including this one has matched (the dream toward the goal goes on), else 0."""
    hit = similarity >= threshold
    matches = torch.cumsum(hit.float(), 0)  # (H, N) matches up to each step
    return (hit & (matches == 1)).float(), (matches == 0).float()


class GoalStateModel(nn.Module):
    """Proposes goals for states: ``propose(state, world_model, actor_critic) -> goal``.

    Strategies:
      - ``value``: imagine ``rollouts`` trajectories of ``horizon`` steps with the actor from the
        state; the goal is the end state of the one with the highest predicted return
        (discounted predicted rewards, weighted by predicted continuation, plus the end value)
        among those whose end the state does not already match.
      - ``replay``: real experience. A bank holds pairs (posterior state, the posterior state
        ``offset`` steps later in the same episode) from replayed batches; the goal is the later
        state of the pair whose start is most similar to the state. Until the bank has pairs,
        proposals fall back to ``value``.
      - ``hard``: as ``replay``, but among the ``rollouts`` most similar pairs it takes the first
        goal that the goal-blind actor, imagined ``offset`` steps from the state, does not reach
        in any of ``actor_tries`` dreams.
        Where the actor reaches them all there is no hard goal (``propose_where`` says where):
        goal pursuit then steers toward the most similar candidate without scoring that step,
        and asks again at the next.
      - ``control``: as ``hard``, but only goals that are also reachable from the state: the
        replayed actions that led from the pair's start to its goal, imagined open loop from the
        state, match it. Goals out of any policy's reach in the model (the bank's start was only
        similar to the state, or the dream drifts) are left out, as in the controllable set of
        ``DreamGeneration.evaluate_hard``. Pairs stored without their actions are never chosen.
    ``heldout(post, is_first)`` gives evaluation pairs from real experience, goals the matcher
    never generated (it trains on goals relabelled inside its own dreams).

    Goals live in ``space`` (``dreamer/goal_space.py``), by default the ``deter`` of ``goal_dim``
    values. The banks hold what the space reads of states (its ``source``), projected when used.
    """

    def __init__(
        self, goal_dim: int, strategy: str = "value", threshold: float = 0.7, rollouts: int = 8,
        horizon: int = 15, offset: int = 8, bank_size: int = 4096, gamma: float = 1 - 1 / 333,
        space: GoalSpace | None = None, actor_tries: int = ACTOR_TRIES,
    ) -> None:
        super().__init__()
        self.space = space or GoalSpace("deter", goal_dim)
        goal_dim, source_dim = self.space.dim, self.space.source_dim
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown goal strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"goal threshold must be in (0, 1], got {threshold}")
        if min(rollouts, horizon, offset, bank_size, actor_tries) < 1:
            raise ValueError("goal rollouts, horizon, offset, bank_size and actor_tries must be >= 1")
        self.hp = init_args({k: v for k, v in locals().items() if k != "space"})
        self.register_buffer("bank_start", torch.zeros(bank_size, source_dim))
        self.register_buffer("bank_goal", torch.zeros(bank_size, source_dim))
        self.register_buffer("bank_path", torch.full((bank_size, offset), -1, dtype=torch.long))  # -1: unknown
        self.register_buffer("bank_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(goal_dim))
        self.register_buffer("var", torch.ones(goal_dim))
        self.register_buffer("stats_seen", torch.zeros((), dtype=torch.bool))

    def goal_of(self, state: State) -> torch.Tensor:
        """(..., G) goal vectors of states (...)."""
        return self.space.of_state(state)

    @torch.no_grad()
    def update_statistics(self, post: State, decay: float = 0.99) -> None:
        """EMA of the mean and variance of replayed posterior goal vectors (no randomness used)."""
        flat = self.goal_of(post).reshape(-1, self.mean.shape[0]).float()
        mean, var = flat.mean(0), flat.var(0, unbiased=False)
        if world_size() > 1:  # over all ranks (equal counts on each): E[x^2] - mean^2
            second = mean_over_ranks(var + mean**2)
            mean = mean_over_ranks(mean)
            var = (second - mean**2).clamp(min=0)
        if not self.stats_seen:
            self.mean.copy_(mean), self.var.copy_(var), self.stats_seen.fill_(True)
        else:
            self.mean.lerp_(mean, 1 - decay), self.var.lerp_(var, 1 - decay)

    def standardize(self, goal: torch.Tensor) -> torch.Tensor:
        return (goal - self.mean) / (self.var + 1e-6).sqrt()

    def between(self, goal: torch.Tensor, here: torch.Tensor) -> torch.Tensor:
        """Similarity of goal vectors and the goal vectors of states (broadcast over all but the last axis)."""
        return cosine_max(self.standardize(goal), self.standardize(here))

    def similarity(self, goal: torch.Tensor, state: State) -> torch.Tensor:
        return self.between(goal, self.goal_of(state))

    def matched(self, goal: torch.Tensor, state: State) -> torch.Tensor:
        return self.similarity(goal, state) >= self.hp.threshold

    # ------------------------------------------------------------- real experience
    def real_pairs(self, post: State, is_first: torch.Tensor, offset: int | None = None,
                   action: torch.Tensor | None = None) -> tuple[State, torch.Tensor, torch.Tensor | None]:
        """(start states (M, ...), goals (M, G), paths): states of (B, T) posteriors and the state
        ``offset`` (default ``hp.offset``) steps later when no episode starts in between; with the
        replayed ``action`` (B, T) (``action[t]`` taken at step t) the actions (M, k) that led
        from each start to its goal, else None."""
        k, starts = self._pairs(post, is_first, offset)
        start = {key: v[:, :-k][starts] for key, v in post.items()}
        path = None if action is None else paths(action, k)[starts]
        return start, self.goal_of(post)[:, k:][starts], path

    def _pairs(self, post: State, is_first: torch.Tensor, offset: int | None) -> tuple[int, torch.Tensor]:
        """(k, (B, T - k) mask of the steps whose state k steps later is in the same episode)."""
        k = offset or self.hp.offset
        if post["deter"].shape[1] <= k:
            raise ValueError(f"goal offset {k} needs sequences longer than {k} steps")
        return k, continuing(is_first, k)

    @torch.no_grad()
    def observe(self, post: State, is_first: torch.Tensor, action: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """Follow training: a step of a learned goal space, statistics of the batch's posteriors
        (B, T, ...) and, with the ``REPLAYED`` strategies, its goal pairs (drawn on the random stream
        ``seed``). Returns the goal space's training metrics."""
        metrics = self.space.learn(post, action, is_first)
        self.update_statistics(post)
        if self.hp.strategy in REPLAYED:
            with isolated_rng(post["deter"].device, seed):
                self.add_replay(post, is_first, action)
        return metrics

    def add_replay(self, post: State, is_first: torch.Tensor, action: torch.Tensor | None = None) -> None:
        """Store real (start, goal) pairs in the ring bank used by the ``replay`` strategies, with
        the replayed ``action`` (B, T) the actions that led from start to goal (else unknown)."""
        k, pairs = self._pairs(post, is_first, None)
        source = self.space.source(post)  # (B, T, source_dim)
        start, goal = source[:, :-k][pairs], source[:, k:][pairs]
        path = paths(action, k)[pairs] if action is not None else torch.full((len(goal), k), -1, device=goal.device)
        n, size = len(goal), self.hp.bank_size
        if n == 0:
            return
        if n > size:
            keep = torch.randperm(n, device=goal.device)[:size]
            start, goal, path, n = start[keep], goal[keep], path[keep], size
        idx = (self.bank_count + torch.arange(n, device=goal.device)) % size
        self.bank_start[idx] = start.to(self.bank_start.dtype)
        self.bank_goal[idx] = goal.to(self.bank_goal.dtype)
        self.bank_path[idx] = path.to(self.bank_path.dtype)
        self.bank_count += n

    def heldout(self, post: State, is_first: torch.Tensor, n: int, offset: int | None = None,
                action: torch.Tensor | None = None) -> tuple[State, torch.Tensor, torch.Tensor | None]:
        """Up to ``n`` real (state, goal ``offset`` (default ``hp.offset``) steps later) pairs for
        evaluation, leaving out pairs whose start already matches the goal (they would count as
        reached at no effort), and their paths with ``action`` as ``real_pairs`` gives them."""
        start, goal, path = self.real_pairs(post, is_first, offset, action)
        open_ = ~self.matched(goal, start)
        pick = open_.nonzero().squeeze(-1)
        pick = pick[torch.randperm(len(pick), device=goal.device)[:n]]
        return {k: v[pick] for k, v in start.items()}, goal[pick], None if path is None else path[pick]

    # ------------------------------------------------------------- proposals
    @torch.no_grad()
    def propose(self, state: State, world_model, actor_critic) -> torch.Tensor:
        """Goals (N, G) for states (N, ...); with ``hard``, a state where the actor reaches every
        candidate gets the most similar one (``propose_where`` tells which)."""
        return self.propose_where(state, world_model, actor_critic)[0]

    @torch.no_grad()
    def propose_where(self, state: State, world_model, actor_critic) -> tuple[torch.Tensor, torch.Tensor]:
        """Goals (N, G) for states (N, ...) and where they are what the strategy asks for (N,):
        everywhere, except with ``hard`` (``control``) where no candidate is missed by the goal-blind
        actor (and reached by its replayed actions)."""
        filled = int(min(self.bank_count.item(), self.hp.bank_size))
        if self.hp.strategy in REPLAYED and filled > 0:
            project = self.space.project
            sim = self.between(self.goal_of(state)[:, None, :], project(self.bank_start[None, :filled, :]))  # (N, filled)
            if self.hp.strategy in ("hard", "control"):
                return self._unreached_replay_goal(state, sim, world_model, actor_critic)
            goal = project(self.bank_goal[sim.argmax(-1)])
        else:
            goal = self._best_imagined_end(state, world_model, actor_critic)
        return goal, torch.ones(len(goal), dtype=torch.bool, device=goal.device)

    def _unreached_replay_goal(self, state: State, sim: torch.Tensor, world_model,
                               actor_critic) -> tuple[torch.Tensor, torch.Tensor]:
        """Among the ``rollouts`` bank pairs whose starts are most similar to each state (``sim``
        (N, filled)), the goal of the most similar one that is hard from the state over ``offset``
        steps (with ``control``: and controllable by the pair's replayed actions), by
        ``dreamer/goals/hard.py``'s definition, and whether there was one (N,); where there is
        none, the most similar one."""
        top = sim.topk(min(self.hp.rollouts, sim.shape[1]), -1).indices  # (N, R), most similar first
        candidates = self.space.project(self.bank_goal[top])  # (N, R, G)
        tries = self.hp.actor_tries
        wanted = hard(world_model, self, actor_critic, state, candidates, self.hp.offset, tries)  # (N, R)
        if self.hp.strategy == "control":
            wanted &= controllable(world_model, self, state, candidates, self.bank_path[top], tries)
        free = wanted.float().argmax(-1)  # first wanted candidate, 0 if none
        return candidates[torch.arange(len(free), device=free.device), free], wanted.any(-1)

    def _best_imagined_end(self, state: State, world_model, actor_critic) -> torch.Tensor:
        hp = self.hp
        n, r = len(state["deter"]), hp.rollouts
        start = {k: v.repeat_interleave(r, 0) for k, v in state.items()}  # (N * R, ...)
        states, feat, _ = world_model.rssm.imagine(start, actor_critic.sample, hp.horizon)  # feat (H + 1, N * R, F)
        score = imagined_return(world_model, actor_critic, feat, hp.gamma)  # (N * R,)
        ends = self.goal_of(states)[-1].reshape(n, r, -1)  # (N, R, G)
        # a goal the state already matches is not worth proposing: rank only the others, and
        # where every rollout ends there, take the least similar end
        sim = self.between(ends, self.goal_of(state).unsqueeze(1))  # (N, R)
        already = sim >= hp.threshold
        score = score.reshape(n, r).masked_fill(already, float("-inf"))
        best = torch.where(already.all(-1), sim.argmin(-1), score.argmax(-1))  # (N,)
        return ends[torch.arange(n, device=best.device), best]
