"""torchmetrics for goal pursuit in the real game (sum states, so DDP reduces them exactly)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class GoalSuccess(Metric):
    """Goal success while acting, next to the game's reward.

    ``update`` takes the steps that had an active goal (whether the state matched it, the game
    reward received on arriving at that state, and how many steps the goal had been pursued, 1 on
    the first step after its proposal) and the goal matches of each finished episode.
    ``compute`` returns:

    - ``step_success``: matched steps / steps with an active goal;
    - ``episode_success``: episodes with at least one match / episodes;
    - ``matches_per_episode``: matches / episodes;
    - ``steps_to_reach``: mean steps from a goal's proposal to its match, over matched goals (NaN
      until one is matched);
    - ``alignment``: mean game reward received on arriving at a matched state minus the mean over
      all steps with an active goal. Positive when reaching goals pays in the game; NaN until a
      goal has been matched.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("steps", "matched", "reward", "matched_reward", "episodes", "episodes_matched",
                     "matches", "matched_age"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        matched: torch.Tensor | None = None,
        reward: torch.Tensor | None = None,
        episode_matches: torch.Tensor | None = None,
        age: torch.Tensor | None = None,
    ) -> None:
        """Steps with an active goal (``matched`` bool, ``reward`` and optionally ``age``, same
        shape), and/or finished episodes (``episode_matches``: goal matches of each)."""
        if matched is not None:
            matched, reward = matched.double(), reward.double()
            if age is not None:
                self.matched_age += (matched * age.double()).sum()
            self.steps += matched.numel()
            self.matched += matched.sum()
            self.reward += reward.sum()
            self.matched_reward += (matched * reward).sum()
        if episode_matches is not None:
            self.episodes += episode_matches.numel()
            self.episodes_matched += (episode_matches > 0).double().sum()
            self.matches += episode_matches.double().sum()

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.steps.device)
        ratio = lambda a, b: a / b if b > 0 else nan  # noqa: E731
        alignment = (
            self.matched_reward / self.matched - self.reward / self.steps if self.matched > 0 else nan
        )
        return {
            "step_success": ratio(self.matched, self.steps),
            "episode_success": ratio(self.episodes_matched, self.episodes),
            "matches_per_episode": ratio(self.matches, self.episodes),
            "steps_to_reach": ratio(self.matched_age, self.matched),
            "alignment": alignment,
        }
