"""Goal spaces: which part of a latent state a goal pins down.

A goal is a vector in a goal space; a state reaches it when the state's own vector there is
similar enough (``GoalStateModel.similarity``). The space decides what "reaching" means:

- ``deter``: the recurrent state (D values). It carries the history and everything the game does
  by itself (fish swim, platforms move), so a goal is often reached by waiting.
- ``stoch``: the categorical latent sample (S x C one-hots, flattened): what the current frame
  shows, without the history.
- ``inverse``: a learned linear projection (``dim`` values) of the categorical latent, trained with
  an inverse-dynamics head to tell which action led from one replayed state to the next. It keeps
  what the agent's actions change and drops what moves by itself.
- ``multistep``: the same projection trained with a multi-step inverse-dynamics head: from the
  state at t and the state k = 1..K steps later (K the goal offset), the first action, taken at
  t. One step says little where many actions look alike for a frame (jumper's 15 actions have
  about 6 effects); over k steps the first action's consequences add up, and what the agent
  cannot steer over k steps is still dropped (as in AC-State, Lamb et al. 2022).

Each space reads a vector from a state or from model features (``source``), then maps it into
the goal space (``project``; the identity for the fixed spaces). The goal banks store sources, so
a learned projection never leaves stale goals behind.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dreamer.distributed import step_optimizer
from dreamer.nets import MLP

SPACES = ("deter", "stoch", "inverse", "multistep")
State = dict[str, torch.Tensor]


def continuing(is_first: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T - k) mask of the steps t of sequences (B, T) whose step t + k is in the same episode
    (no episode starts at t + 1 .. t + k)."""
    return is_first[:, 1:].float().unfold(1, k, 1).sum(-1) == 0


class GoalSpace(nn.Module):
    """A fixed goal space, ``deter`` or ``stoch`` (see the module docstring), of a world model with
    ``deter`` recurrent units and ``latent`` = S x C categorical latent values."""

    def __init__(self, kind: str = "deter", deter: int = 0, latent: int = 0) -> None:
        super().__init__()
        if kind not in SPACES:
            raise ValueError(f"unknown goal space {kind!r}; allowed: {', '.join(SPACES)}")
        self.kind, self.deter, self.latent = kind, deter, latent
        self.source_dim = deter if kind == "deter" else latent

    @property
    def dim(self) -> int:
        """Size of a goal vector."""
        return self.source_dim

    def source(self, state: State) -> torch.Tensor:
        """(..., source_dim) what the space reads of states (...)."""
        if self.kind == "deter":
            return state["deter"]
        return state["stoch"].flatten(-2)

    def source_of_features(self, feat: torch.Tensor) -> torch.Tensor:
        """(..., source_dim) the same read from model features (..., D + S x C)."""
        return feat[..., : self.deter] if self.kind == "deter" else feat[..., self.deter :]

    def project(self, source: torch.Tensor) -> torch.Tensor:
        return source

    def of_state(self, state: State) -> torch.Tensor:
        """(..., dim) goal vectors of states."""
        return self.project(self.source(state))

    def of_features(self, feat: torch.Tensor) -> torch.Tensor:
        """(..., dim) goal vectors of model features."""
        return self.project(self.source_of_features(feat))

    def learn(self, post: State, action: torch.Tensor, is_first: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step of a learned space on replayed posteriors (B, T, ...); nothing here."""
        return {}


class InverseDynamicsSpace(GoalSpace):
    """The ``inverse`` goal space: ``z = W s`` of the categorical latent ``s``, trained, together
    with a head that reads ``[z_t, z_{t+1} - z_t]``, to predict the action taken at step t
    (cross-entropy on replayed pairs inside one episode). With ``steps`` K > 1 it is the
    ``multistep`` space: the head reads ``[z_t, z_{t+k} - z_t]`` for every k = 1..K and predicts
    the same first action (k is not given: a one-hot of it would swamp the zero-initialised
    projection's first signals under the head's LayerNorm, measured to stall learning). Its Adam
    state rides in the module's state dict (``get_extra_state``), so a resumed run continues the
    same optimisation."""

    def __init__(self, deter: int, latent: int, num_actions: int, dim: int = 32, units: int = 256,
                 lr: float = 3e-4, steps: int = 1) -> None:
        if steps < 1:
            raise ValueError(f"inverse-dynamics steps must be >= 1, got {steps}")
        super().__init__("inverse" if steps == 1 else "multistep", deter, latent)
        self.steps = steps
        self.proj = nn.Linear(latent, dim)
        nn.init.zeros_(self.proj.weight)  # what the actions never move gets no weight, rather than a random one
        nn.init.zeros_(self.proj.bias)
        self.head = MLP(2 * dim, units, 1, num_actions)
        self.optimizer = torch.optim.Adam(self.parameters(), lr)

    @property
    def dim(self) -> int:
        return self.proj.out_features

    def project(self, source: torch.Tensor) -> torch.Tensor:
        return self.proj(source)

    def action_logits(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """(..., A) the head's logits for the first action on the way from goal vector ``before``
        to ``after`` (one step later, or up to ``steps`` later)."""
        return self.head(torch.cat([before, after - before], -1))

    def learn(self, post: State, action: torch.Tensor, is_first: torch.Tensor) -> dict[str, torch.Tensor]:
        """One Adam step of the inverse-dynamics loss on posteriors (B, T, ...) and the actions
        (B, T) taken at each step, over the pairs (t, t + k) for k = 1..``steps`` (shorter than the
        sequences); pairs that cross an episode start count for nothing. Every rank steps, so
        under DDP the gradient average never waits for one."""
        source = self.source(post).detach().float()  # (B, T, latent)
        offsets = range(1, min(self.steps, source.shape[1] - 1) + 1)
        with torch.enable_grad(), torch.autocast(post["deter"].device.type, enabled=False):
            z = self.project(source)  # (B, T, dim), each step projected once
            logits = torch.cat([self.action_logits(z[:, :-k], z[:, k:]).flatten(0, 1) for k in offsets])
            target = torch.cat([action[:, :-k].flatten() for k in offsets])  # the first action, at t
            keep = torch.cat([continuing(is_first, k).flatten() for k in offsets]).float()
            nll = F.cross_entropy(logits, target, reduction="none")
            loss = (nll * keep).sum() / keep.sum().clamp(min=1)
            step_optimizer(self.optimizer, loss, self.parameters(), clip=100.0)
        correct = (logits.argmax(-1) == target).float()
        accuracy = (correct * keep).sum() / keep.sum().clamp(min=1)
        return {"goal_space/inverse_loss": loss.detach(), "goal_space/inverse_accuracy": accuracy.detach()}

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # Adam would keep the given moments


def make_goal_space(kind: str, deter: int, latent: int, num_actions: int, dim: int = 32,
                    units: int = 256, lr: float = 3e-4, steps: int = 8) -> GoalSpace:
    """The goal space ``kind`` (one of ``SPACES``) of a world model with ``deter`` recurrent units
    and ``latent`` categorical latent values; ``dim``, ``units`` and ``lr`` are the learned ones',
    ``steps`` the multi-step one's K (the goal offset)."""
    if kind == "inverse":
        return InverseDynamicsSpace(deter, latent, num_actions, dim, units, lr)
    if kind == "multistep":
        if steps < 2:
            raise ValueError(f"the multistep goal space needs goals 2 or more steps ahead (goals.offset), got {steps}")
        return InverseDynamicsSpace(deter, latent, num_actions, dim, units, lr, steps)
    return GoalSpace(kind, deter, latent)
