"""Hard and controllable goals: the one definition that goal proposals, the matcher's RL goals and
goal evaluation all use.

A goal is **hard** from a state when none of ``tries`` imagined rollouts of the goal-blind actor,
``steps`` steps long from that state, matches it at any step 1..steps. A hard goal is
**controllable** when the actions that really led to it (the replayed path), played open loop in
one of ``tries`` imagined rollouts from the state, match it: then some policy can reach it in the
model, and a miss is the policy's, not the model's drift. ``tries`` is ``model.goals.actor_tries``
(``ACTOR_TRIES`` by default).
"""

from __future__ import annotations

import torch

from dreamer.rssm import State

ACTOR_TRIES = 2  # imagined actor rollouts that must all miss a hard goal (model.goals.actor_tries)


def matched_on_the_way(goal_model, goals: torch.Tensor, visited: torch.Tensor) -> torch.Tensor:
    """(N, ...): whether goals (N, ..., G) match the goal vectors of any imagined step
    (k, N, G) of their lane."""
    extra = goals.dim() - 2  # the goals' axes between the lane and the goal vector
    visited = visited.reshape(*visited.shape[:2], *([1] * extra), visited.shape[-1])  # (k, N, 1.., G)
    return (goal_model.between(goals.unsqueeze(0), visited) >= goal_model.hp.threshold).any(0)


def reached(world_model, goal_model, start: State, goals: torch.Tensor, policy, steps: int,
            tries: int = 1) -> torch.Tensor:
    """(N, ...): whether one of ``tries`` rollouts of ``steps`` steps imagined from ``start``
    (N, ...) with ``policy`` (``feat -> actions``, or actions (steps, N) played open loop) matches
    the lane's goals (N, ..., G) at some step 1..steps."""
    hit = torch.zeros(goals.shape[:-1], dtype=torch.bool, device=goals.device)
    for _ in range(tries):
        states, _, _ = world_model.rssm.imagine(start, policy, steps)
        hit |= matched_on_the_way(goal_model, goals, goal_model.goal_of(states)[1:])
    return hit


def hard(world_model, goal_model, actor_critic, start: State, goals: torch.Tensor, steps: int,
         tries: int) -> torch.Tensor:
    """(N, ...): whether goals (N, ..., G) are hard from ``start`` (N, ...): no rollout of
    ``tries`` actor rollouts of ``steps`` steps matches them."""
    return ~reached(world_model, goal_model, start, goals, actor_critic.sample, steps, tries)


def controllable(world_model, goal_model, start: State, goals: torch.Tensor, path: torch.Tensor,
                 tries: int) -> torch.Tensor:
    """(N, R): whether the replayed actions ``path`` (N, R, k) (-1: unknown), played open loop
    from each state (N, ...) in one of ``tries`` imagined rollouts, match their goals (N, R, G);
    False where any action is unknown."""
    n, r, k = path.shape
    lanes = {key: v.repeat_interleave(r, 0) for key, v in start.items()}  # (N * R, ...)
    open_loop = path.reshape(n * r, k).clamp(min=0).T.contiguous()  # (k, N * R)
    hit = reached(world_model, goal_model, lanes, goals.reshape(n * r, -1), open_loop, k, tries).reshape(n, r)
    return hit & (path >= 0).all(-1)


def hard_pairs(agent, post: State, is_first: torch.Tensor, steps: int, n: int,
               action: torch.Tensor | None = None) -> tuple[State, torch.Tensor, float | None, torch.Tensor | None]:
    """Hard real goals of a replayed batch: up to ``n`` pairs (replayed state, the real state
    ``steps`` later in the same episode) whose start does not already match the goal
    (``GoalStateModel.heldout``), kept where the goal is ``hard`` from the start. Returns (start
    (M, ...), goal (M, G), the fraction of open pairs kept, None without any, and with the
    replayed ``action`` (B, T) the actions (M, steps) that led to each goal)."""
    start, goal, path = agent.goal_model.heldout(post, is_first, n, steps, action)
    if len(goal) == 0:
        return start, goal, None, path
    kept = hard(agent.world_model, agent.goal_model, agent.actor_critic, start, goal, steps,
                agent.goal_model.hp.actor_tries)
    path = None if path is None else path[kept]
    return {k: v[kept] for k, v in start.items()}, goal[kept], float(kept.float().mean()), path


def uniform_policy(num_actions: int):
    """The policy ``feat -> actions`` (N,) drawing each action uniformly from ``num_actions``."""
    return lambda feat: torch.randint(0, num_actions, feat.shape[:-1], device=feat.device)

