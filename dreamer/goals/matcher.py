"""The goal matcher: a goal-conditioned policy with its own critic, trained by hindsight imitation
and by reinforcement learning in dreams."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from dreamer.actor_critic import ActorCritic
from dreamer.distributions import sample_index
from dreamer.goals.model import MATCHER_REWARDS, first_match
from dreamer.goals.space import GoalSpace
from dreamer.nets import init_args
from dreamer.rssm import State


class GoalMatcher(pl.LightningModule):
    """Goal-conditioned policy ``pi_g(a | s, g)`` over the 15 actions, with its own critic and Adam
    optimiser: DreamerV3's ``ActorCritic`` over the state's features joined with the goal's offset
    from the state's own goal vector, ``[feat, g - here]``.

    It learns two ways: by imitation of dream actions that reached a later state of the same dream
    (``loss``, hindsight relabelling), and by reinforcement learning in imagination on the goal
    reward (``rl_loss``), by ``reward``:

    - ``similarity``: the goal similarity of each imagined state, 1 exactly at the goal;
    - ``reach``: 1 on the first imagined state that matches the goal (similarity at least the goal
      model's threshold), where the dream ends; 0 before. This is what goal success counts: a
      match within k steps, the sooner the better.
    """

    def __init__(
        self, feat_dim: int, goal_dim: int, num_actions: int = 15, units: int = 256,
        layers: int = 2, lr: float = 3e-4, eps: float = 1e-5, clip: float = 100.0,
        unimix: float = 0.01, horizon: int = 15, gamma: float = 0.95, entropy: float = 3e-4,
        reward: str = "similarity",
    ) -> None:
        super().__init__()
        if reward not in MATCHER_REWARDS:
            raise ValueError(f"unknown goal matcher reward {reward!r}; allowed: {', '.join(MATCHER_REWARDS)}")
        self.hp = init_args(locals())
        self.ac = ActorCritic(feat_dim + goal_dim, num_actions, units, layers, horizon, gamma,
                              entropy=entropy, unimix=unimix, repval=0.0)

    def inputs(self, feat: torch.Tensor, here: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """(..., F + G) what the matcher sees of a state (features, goal vector ``here``) and its
        goal (..., G)."""
        return torch.cat([feat, goal - here], -1)

    def policy_logits(self, feat: torch.Tensor, here: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """Normalised log-probabilities (..., A) for states (features, goal vector) and goals."""
        return self.ac.policy_logits(self.inputs(feat, here, goal))

    def toward(self, goal: torch.Tensor, space: GoalSpace):
        """The policy ``feat -> actions`` that pursues ``goal`` (N, G) of ``space``, for ``rssm.imagine``."""
        return lambda feat: sample_index(self.policy_logits(feat, space.of_features(feat), goal).exp())

    def loss(self, feat, here, goal, action) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the actions that reached ``goal`` (goal-conditioned supervised learning):
        ``action`` holds action indices (...,) or a target distribution over them (..., A). Also
        returns the matcher's normalised log-probabilities (..., A)."""
        logits = self.policy_logits(feat, here, goal)
        if action.is_floating_point():
            return -(action * logits).sum(-1).mean(), logits
        return -logits.gather(-1, action.unsqueeze(-1)).squeeze(-1).mean(), logits

    def rl_loss(self, world_model, goal_model, start: State, goal: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Actor-critic loss of pursuing ``goal`` (N, G) from ``start`` (N, ...) for ``horizon``
        imagined steps: the reward on arriving at each step is the goal reward (``hp.reward``), the
        continuation the world model's (ending at the first match with ``reach``)."""
        with torch.no_grad():
            states, feat, actions = world_model.rssm.imagine(start, self.toward(goal, goal_model.space), self.hp.horizon)
            reward = goal_model.similarity(goal.unsqueeze(0), {k: v[1:] for k, v in states.items()})  # (H, N)
            cont = world_model.continue_prob(feat[1:])  # (H, N)
            if self.hp.reward == "reach":
                reward, open_ = first_match(reward, goal_model.hp.threshold)
                cont = cont * open_
            cont = torch.cat([torch.ones_like(reward[:1]), cont])  # (H + 1, N)
            inputs = self.inputs(feat, goal_model.goal_of(states), goal.unsqueeze(0).expand(len(feat), -1, -1))
        loss, metrics = self.ac.loss(inputs, actions, reward, cont)
        return loss, {"goal_matcher/rl_" + k.split("/")[-1]: v for k, v in metrics.items()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), self.hp.lr, eps=self.hp.eps)
