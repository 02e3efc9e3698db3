"""WorldModel: encoder, RSSM, decoder, reward and continue heads, and their loss."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from dreamer.distributions import TwoHot, categorical_kl
from dreamer.nets import MLP, Decoder, Encoder, init_args
from dreamer.rssm import RSSM, State


class WorldModel(pl.LightningModule):
    """Learns the game from replayed sequences (DreamerV3).

    Loss per step: image MSE summed over pixels and channels, two-hot reward cross-entropy,
    Bernoulli continue loss with target ``1 - is_terminal``, and the KL terms
    ``dyn = KL(sg(post) || prior)`` and ``rep = KL(post || sg(prior))``, each summed over the
    latents and clipped below at ``free_bits``. The reward and continue heads have one hidden
    layer of ``units`` (DreamerV3); ``norm`` is ``layer`` (LayerNorm) or ``rms`` (RMSNorm).
    ``downsample`` / ``upsample`` pick the encoder's and decoder's resolution steps (``Encoder``,
    ``Decoder``), ``block_init`` the block GRU's initial scale (``trunc_normal_fan_in_``).
    """

    def __init__(
        self,
        num_actions: int = 15,
        deter: int = 512,
        hidden: int = 256,
        stoch: int = 32,
        classes: int = 16,
        depth: int = 16,
        cnn_mults: tuple[int, ...] = (2, 3, 4, 4),
        units: int = 256,
        gru_blocks: int = 1,
        unimix: float = 0.01,
        free_bits: float = 1.0,
        scale_image: float = 1.0,
        scale_reward: float = 1.0,
        scale_continue: float = 1.0,
        scale_dyn: float = 1.0,
        scale_rep: float = 0.1,
        norm: str = "layer",
        obs_shape: tuple[int, int, int] = (64, 64, 3),
        downsample: str = "stride",
        upsample: str = "transposed",
        block_init: str = "block",
    ) -> None:
        super().__init__()
        self.hp = init_args(locals())
        self.encoder = Encoder(depth, tuple(cnn_mults), obs_shape, downsample)
        self.rssm = RSSM(self.encoder.embed_dim, num_actions, deter, hidden, stoch, classes,
                         gru_blocks, unimix, norm=norm, block_fan_in=block_init)
        feat = self.rssm.feat_dim
        self.decoder = Decoder(feat, depth, tuple(cnn_mults), obs_shape, upsample)
        self.reward_head = MLP(feat, units, 1, 255, outscale=0.0, norm=norm)
        self.continue_head = MLP(feat, units, 1, 1, norm=norm)
        self.twohot = TwoHot()

    def reward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.twohot.mean(self.reward_head(feat))

    def continue_prob(self, feat: torch.Tensor) -> torch.Tensor:
        # float32: in bf16 the spacing near 1 (2^-8) is as large as 1 - gamma
        return torch.sigmoid(self.continue_head(feat).squeeze(-1).float())

    def observe_step(self, obs: torch.Tensor, is_first: torch.Tensor, prev: State | None = None,
                     prev_action: torch.Tensor | None = None) -> State:
        """Posterior (N, ...) after uint8 frames ``obs`` (N, 64, 64, 3), from the previous posterior
        and the action (N,) taken from it; without them every lane starts an episode."""
        if prev is None:
            prev, prev_action = self.rssm.initial(len(obs), obs.device), torch.zeros(len(obs), dtype=torch.long, device=obs.device)
            is_first = torch.ones_like(is_first)
        action = F.one_hot(prev_action, self.hp.num_actions).float()
        return self.rssm.obs_step(prev, action, self.encoder(obs), is_first.bool())

    def start_state(self, batch: dict[str, torch.Tensor]) -> tuple:
        """(is_first, state, prev_action) for ``rssm.observe`` of a batch: from the batch's replay
        context where it holds a stored latent (see ``replay_batch``), else a fresh start (the first
        step is treated as an episode start)."""
        start = batch.get("context")
        if start is None:
            return batch["is_first"], None, None
        valid = start["valid"]
        keep = valid.float()
        state = {
            "deter": start["deter"] * keep[:, None],
            "stoch": F.one_hot(start["stoch"], self.rssm.classes).float() * keep[:, None, None],
        }
        is_first = batch["is_first"].clone()
        is_first[:, 0] |= ~valid
        return is_first, state, start["action"]

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], State]:
        """Total loss (scalar), per-term metrics, and the posterior states (B, T, ...).

        ``batch`` as ``replay_batch`` makes it: obs, action, reward, is_first, is_terminal (B, T),
        and optionally ``context``, the replay context to start from."""
        hp = self.hp
        obs = batch["obs"]  # (B, T, 64, 64, 3) uint8
        embed = self.encoder(obs)
        post, prior = self.rssm.observe(embed, batch["action"], *self.start_state(batch))
        feat = self.rssm.features(post)  # (B, T, F)

        target = obs.float() / 255.0
        image = ((self.decoder(feat) - target) ** 2).sum((-3, -2, -1))  # (B, T)
        reward = self.twohot.loss(self.reward_head(feat), batch["reward"])
        cont_target = 1.0 - batch["is_terminal"].float()
        cont = F.binary_cross_entropy_with_logits(
            self.continue_head(feat).squeeze(-1), cont_target, reduction="none"
        )
        post_lp, prior_lp = post["logits"], prior["logits"]
        dyn = categorical_kl(post_lp.detach(), prior_lp).sum(-1)  # (B, T), summed over latents
        rep = categorical_kl(post_lp, prior_lp.detach()).sum(-1)
        dyn_loss = dyn.clamp(min=hp.free_bits)
        rep_loss = rep.clamp(min=hp.free_bits)
        total = (
            hp.scale_image * image + hp.scale_reward * reward + hp.scale_continue * cont
            + hp.scale_dyn * dyn_loss + hp.scale_rep * rep_loss
        ).mean()
        metrics = {
            "loss/world_model": total.detach(),
            "loss/image": image.mean().detach(),
            "loss/reward": reward.mean().detach(),
            "loss/continue": cont.mean().detach(),
            "loss/kl_dyn": dyn.mean().detach(),
            "loss/kl_rep": rep.mean().detach(),
        }
        return total, metrics, post
