"""Recurrent state-space model: observe with the posterior, imagine with the prior.

A state is a dict: ``deter`` (N, D) GRU state, ``stoch`` (N, S, C) straight-through one-hot
samples of S categoricals with C classes, ``logits`` (N, S, C) their unimixed log-probabilities.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dreamer.distributions import sample_one_hot, unimix_probs
from dreamer.nets import MLP, BlockGRU

State = dict[str, torch.Tensor]


class RSSM(nn.Module):
    """DreamerV3's RSSM with categorical latents and its block-GRU core (``BlockGRU``: dense
    projections of deter, stoch and action reach every one of ``gru_blocks`` blocks).

    The prior has ``imglayers`` hidden layers on deter, the posterior one on deter and the image
    embedding. ``is_first`` zeroes deter, stoch and the previous action before a step, both while
    observing training sequences and while acting.
    """

    def __init__(
        self,
        embed_dim: int,
        num_actions: int,
        deter: int,
        hidden: int,
        stoch: int,
        classes: int,
        gru_blocks: int = 1,
        unimix: float = 0.01,
        imglayers: int = 2,
        norm: str = "layer",
        block_fan_in: str = "block",
    ) -> None:
        super().__init__()
        self.num_actions, self.deter, self.stoch, self.classes = num_actions, deter, stoch, classes
        self.unimix = unimix
        self.dynamics = BlockGRU(deter, stoch * classes, num_actions, hidden, gru_blocks, norm=norm,
                                 block_fan_in=block_fan_in)
        self.prior_net = MLP(deter, hidden, imglayers, stoch * classes, norm=norm)
        self.post_net = MLP(deter + embed_dim, hidden, 1, stoch * classes, norm=norm)

    @property
    def feat_dim(self) -> int:
        return self.deter + self.stoch * self.classes

    def initial(self, n: int, device: torch.device | str) -> State:
        return {
            "deter": torch.zeros(n, self.deter, device=device),
            "stoch": torch.zeros(n, self.stoch, self.classes, device=device),
            "logits": torch.zeros(n, self.stoch, self.classes, device=device),
        }

    @staticmethod
    def features(state: State) -> torch.Tensor:
        """(..., D + S * C) model features of a state."""
        stoch = state["stoch"]
        return torch.cat([state["deter"], stoch.reshape(*stoch.shape[:-2], -1)], -1)

    def state_from_features(self, feat: torch.Tensor) -> State:
        """The state (N, ...) whose features are ``feat`` (N, F); its logits are left uniform (they
        only describe how the stored sample was drawn, and stepping from a state never reads them)."""
        stoch = feat[..., self.deter :].reshape(*feat.shape[:-1], self.stoch, self.classes)
        return {"deter": feat[..., : self.deter], "stoch": stoch, "logits": torch.zeros_like(stoch)}

    def _latent(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(straight-through one-hot sample, unimixed log-probs), both (N, S, C)."""
        probs = unimix_probs(logits.reshape(-1, self.stoch, self.classes), self.unimix)
        return sample_one_hot(None, probs), probs.log()

    def step_deter(self, state: State, action: torch.Tensor) -> torch.Tensor:
        """The next deter (N, D) after one-hot ``action`` (N, A) from ``state``."""
        return self.dynamics(state["deter"], state["stoch"].reshape(len(action), -1), action)

    def prior_logits(self, deter: torch.Tensor) -> torch.Tensor:
        """(..., S, C) raw prior logits of the stoch given deter (..., D)."""
        return self.prior_net(deter).reshape(*deter.shape[:-1], self.stoch, self.classes)

    def img_step(self, state: State, action: torch.Tensor) -> State:
        """Prior of the next state given the current state and a one-hot action (N, A)."""
        deter = self.step_deter(state, action)
        stoch, logits = self._latent(self.prior_net(deter))
        return {"deter": deter, "stoch": stoch, "logits": logits}

    def embed_projection(self, embed: torch.Tensor) -> torch.Tensor:
        """(..., hidden) the posterior's first layer applied to the image embedding (..., E) alone:
        one large matmul for a whole sequence instead of one per step."""
        return F.linear(embed, self.post_net[0].weight[:, self.deter :])

    def obs_step(
        self, state: State, action: torch.Tensor, embed: torch.Tensor, is_first: torch.Tensor,
        projected: bool = False,
    ) -> State:
        """Posterior after taking one-hot ``action`` from ``state`` and seeing ``embed`` (N, E), or
        with ``projected`` its ``embed_projection`` (N, hidden)."""
        keep = (~is_first).to(embed.dtype).unsqueeze(-1)  # (N, 1)
        state = {"deter": state["deter"] * keep, "stoch": state["stoch"] * keep.unsqueeze(-1)}
        deter = self.step_deter(state, action * keep)
        first = self.post_net[0]
        x = F.linear(deter, first.weight[:, : self.deter], first.bias)
        x = x + (embed if projected else self.embed_projection(embed))
        for layer in list(self.post_net)[1:]:  # norm, SiLU, output layer
            x = layer(x)
        stoch, logits = self._latent(x)
        return {"deter": deter, "stoch": stoch, "logits": logits}

    def observe(
        self,
        embed: torch.Tensor,
        action: torch.Tensor,
        is_first: torch.Tensor,
        state: State | None = None,
        prev_action: torch.Tensor | None = None,
    ) -> tuple[State, State]:
        """Posterior states (B, T, ...) of sequences, and the prior's ``deter`` and ``logits``
        (B, T, ...) at the same steps (computed once for all steps after the loop).

        ``embed`` (B, T, E); ``action`` (B, T) the actions taken at each step (action[t] leads to
        step t + 1); ``is_first`` (B, T). Without ``state`` the sequences start from zeros, as if
        every sequence began an episode.
        """
        batch, length = action.shape
        if state is None:
            state = self.initial(batch, embed.device)
            prev_action = torch.zeros(batch, dtype=torch.long, device=embed.device)
            is_first = is_first.clone()
            is_first[:, 0] = True
        onehot = F.one_hot(action, self.num_actions).float()  # (B, T, A)
        prev = F.one_hot(prev_action, self.num_actions).float()
        projected = self.embed_projection(embed)  # (B, T, hidden)
        posts = []
        for t in range(length):
            state = self.obs_step(state, prev, projected[:, t], is_first[:, t], projected=True)
            posts.append(state)
            prev = onehot[:, t]
        post = {k: torch.stack([s[k] for s in posts], 1) for k in posts[0]}
        logits = unimix_probs(self.prior_logits(post["deter"]), self.unimix).log()  # (B, T, S, C)
        return post, {"deter": post["deter"], "logits": logits}

    def imagine(
        self, start: State, policy: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor, horizon: int,
        keep_states: bool = True,
    ) -> tuple[State | None, torch.Tensor, torch.Tensor]:
        """Roll the prior ``horizon`` steps from ``start`` (N, ...), acting with ``policy(features)``
        or, given a tensor (H, N), with those actions (open loop).

        Returns states (H + 1, N, ...) with the start first (None without ``keep_states``), their
        features (H + 1, N, F) (the ones the policy saw, and the last), and the actions (H, N).
        """
        states, feats, actions = [start], [], []
        state = start
        for t in range(horizon):
            feats.append(self.features(state))
            action = policy[t] if isinstance(policy, torch.Tensor) else policy(feats[-1])
            state = self.img_step(state, F.one_hot(action, self.num_actions).float())
            states.append(state)
            actions.append(action)
        feats.append(self.features(state))
        stacked = {k: torch.stack([s[k] for s in states]) for k in start} if keep_states else None
        return stacked, torch.stack(feats), torch.stack(actions)
