"""ActorCritic: policy and value learned on imagined trajectories (DreamerV3)."""

from __future__ import annotations

import copy

import pytorch_lightning as pl
import torch

from dreamer.distributions import TwoHot, categorical_entropy, sample_index, unimix_logits
from dreamer.distributed import gather_cat
from dreamer.nets import MLP, init_args


def lambda_returns(
    reward: torch.Tensor, cont: torch.Tensor, value: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """TD(lambda) returns of an imagined trajectory.

    ``reward`` (H, N) and ``cont`` (H, N) are received / predicted on arriving at steps 1..H,
    ``value`` (H + 1, N) at steps 0..H. Returns (H, N) for steps 0..H-1:
    ``R_h = r_{h+1} + gamma c_{h+1} ((1 - lam) v_{h+1} + lam R_{h+1})`` with ``R_H = v_H``.
    """
    out = []
    ret = value[-1]
    for h in reversed(range(reward.shape[0])):
        ret = reward[h] + gamma * cont[h] * ((1 - lam) * value[h + 1] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1])


def replay_returns(
    reward: torch.Tensor, is_last: torch.Tensor, is_terminal: torch.Tensor, boot: torch.Tensor,
    gamma: float, lam: float,
) -> torch.Tensor:
    """Lambda-returns (B, T - 1) of replayed sequences for steps 0..T-2 (DreamerV3's repval).

    ``reward``, ``is_last``, ``is_terminal`` (B, T) as stored in replay (the reward received on
    arriving at each step); ``boot`` (B, T) the imagined lambda-return from each step's state.
    ``R_t = r_{t+1} + gamma (1 - term_{t+1}) ((1 - c) boot_{t+1} + c R_{t+1})`` with
    ``c = lam (1 - last_{t+1})``, and ``R_{T-1} = boot_{T-1}``: an episode's end stops the sum.
    """
    live = gamma * (1.0 - is_terminal.float())
    cont = lam * (1.0 - is_last.float())
    ret = boot[:, -1]
    out = []
    for t in reversed(range(reward.shape[1] - 1)):
        ret = reward[:, t + 1] + live[:, t + 1] * ((1 - cont[:, t + 1]) * boot[:, t + 1] + cont[:, t + 1] * ret)
        out.append(ret)
    return torch.stack(out[::-1], 1)


class ActorCritic(pl.LightningModule):
    """Categorical actor (REINFORCE with entropy bonus) and two-hot critic with a slow EMA copy.

    As in DreamerV3, the actor's output layer starts near zero (scale 0.01: a nearly uniform
    policy) and the critic's at zero.

    Advantages are scaled by ``max(1, S)`` where ``S = EMA(P95(R)) - EMA(P5(R))`` of the
    lambda-returns; both losses are weighted by the cumulative product of predicted continues.
    With ``repval > 0`` the critic is also trained, at that scale, on lambda-returns of the
    replayed sequences that bootstrap from the imagined returns (DreamerV3's ``repval``).
    """

    def __init__(
        self,
        feat_dim: int,
        num_actions: int = 15,
        units: int = 256,
        layers: int = 2,
        horizon: int = 15,
        gamma: float = 1 - 1 / 333,
        lam: float = 0.95,
        entropy: float = 3e-4,
        unimix: float = 0.01,
        slow_rate: float = 0.02,
        slow_reg: float = 1.0,
        retnorm_decay: float = 0.99,
        repval: float = 0.3,
        norm: str = "layer",
    ) -> None:
        super().__init__()
        self.hp = init_args(locals())
        self.actor = MLP(feat_dim, units, layers, num_actions, outscale=0.01, norm=norm)
        self.critic = MLP(feat_dim, units, layers, 255, outscale=0.0, norm=norm)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.twohot = TwoHot()
        self.register_buffer("ret_lo", torch.zeros(()))
        self.register_buffer("ret_hi", torch.zeros(()))
        self.register_buffer("ret_init", torch.zeros((), dtype=torch.bool))

    def policy_logits(self, feat: torch.Tensor) -> torch.Tensor:
        return unimix_logits(self.actor(feat), self.hp.unimix)

    def sample(self, feat: torch.Tensor) -> torch.Tensor:
        return sample_index(self.policy_logits(feat).exp())

    def value(self, feat: torch.Tensor) -> torch.Tensor:
        return self.twohot.mean(self.critic(feat))

    @property
    def return_scale(self) -> torch.Tensor:
        return torch.clamp(self.ret_hi - self.ret_lo, min=1.0)

    @torch.no_grad()
    def update_return_scale(self, returns: torch.Tensor) -> None:
        flat = gather_cat(returns.detach().flatten().float())  # percentiles over every rank's returns
        lo, hi = torch.quantile(flat, 0.05), torch.quantile(flat, 0.95)
        d = self.hp.retnorm_decay
        # branch-free (no read-back of ret_init): the first update takes the percentiles as they are
        self.ret_lo.copy_(torch.where(self.ret_init, self.ret_lo * d + (1 - d) * lo, lo))
        self.ret_hi.copy_(torch.where(self.ret_init, self.ret_hi * d + (1 - d) * hi, hi))
        self.ret_init.fill_(True)

    @torch.no_grad()
    def update_slow_critic(self) -> None:
        rate = self.hp.slow_rate
        for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters()):
            slow.lerp_(fast, rate)

    def critic_loss(self, feat: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
        """Per-step critic loss: two-hot cross-entropy to ``returns`` plus the pull toward the
        slow critic's prediction (``slow_reg``)."""
        logits = self.critic(feat)
        with torch.no_grad():
            slow_value = self.twohot.mean(self.slow_critic(feat))
        return self.twohot.loss(logits, returns) + self.hp.slow_reg * self.twohot.loss(logits, slow_value)

    def loss(
        self, feat: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, cont: torch.Tensor,
        replay: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Actor + critic loss of an imagined trajectory.

        ``feat`` (H + 1, N, F) detached features of steps 0..H; ``action`` (H, N) taken at 0..H-1;
        ``reward`` (H, N) predicted on arriving at 1..H; ``cont`` (H + 1, N) continue probabilities
        of steps 0..H (step 0's from the real data). ``replay``, for the repval loss: the replayed
        batch's ``feat`` (B, T, F) (gradients flow into the world model, as in DreamerV3),
        ``reward``, ``is_last`` and ``is_terminal`` (B, T), with B * T = N imagination starts.
        """
        hp = self.hp
        with torch.no_grad():
            value = self.value(feat)  # (H + 1, N)
            returns = lambda_returns(reward, cont[1:], value, hp.gamma, hp.lam)  # (H, N)
            weight = torch.cumprod(cont, 0)[:-1]  # (H, N)
            self.update_return_scale(returns)
            advantage = (returns - value[:-1]) / self.return_scale

        logits = self.policy_logits(feat[:-1])  # (H, N, A)
        logp = logits.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        entropy = categorical_entropy(logits)
        actor_loss = -(weight * (logp * advantage + hp.entropy * entropy)).mean()

        critic_loss = (weight * self.critic_loss(feat[:-1], returns)).mean()
        metrics = {}
        if replay is not None and hp.repval > 0:
            with torch.no_grad():
                boot = returns[0].reshape(replay["reward"].shape)  # (B, T)
                targets = replay_returns(replay["reward"], replay["is_last"], replay["is_terminal"],
                                         boot, hp.gamma, hp.lam)  # (B, T - 1)
            keep = 1.0 - replay["is_last"][:, :-1].float()  # no target across an episode's end
            repval = (keep * self.critic_loss(replay["feat"][:, :-1], targets)).mean()
            critic_loss = critic_loss + hp.repval * repval
            metrics["loss/repval"] = repval.detach()
        metrics.update({
            "loss/actor": actor_loss.detach(),
            "loss/critic": critic_loss.detach(),
            "actor/entropy": entropy.mean().detach(),
            "actor/return_scale": self.return_scale.detach(),
            "actor/advantage_abs": advantage.abs().mean(),
            "imagine/return": returns.mean(),
            "imagine/value": value.mean(),
        })
        return actor_loss + critic_loss, metrics
