"""Building blocks: MLPs, the conv encoder and decoder, the normalised GRU cell."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


def init_args(local_vars: dict[str, Any]) -> SimpleNamespace:
    """A nested module's constructor arguments (pass ``locals()``), as plain attributes.

    Not ``save_hyperparameters()``: under LightningCLI that records the owning Dreamer's arguments
    for every LightningModule constructed inside it.
    """
    return SimpleNamespace(**{k: v for k, v in local_vars.items() if k not in ("self", "__class__")})


class MLP(nn.Sequential):
    """``layers`` x (Linear, LayerNorm, SiLU), then an optional output Linear (zero-init if asked)."""

    def __init__(
        self, inp: int, units: int, layers: int, out: int | None = None, zero_init: bool = False
    ) -> None:
        mods: list[nn.Module] = []
        for _ in range(layers):
            mods += [nn.Linear(inp, units, bias=False), nn.LayerNorm(units), nn.SiLU()]
            inp = units
        if out is not None:
            head = nn.Linear(inp, out)
            if zero_init:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
            mods.append(head)
        super().__init__(*mods)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Encoder(nn.Module):
    """uint8 (..., 64, 64, 3) frames -> (..., embed_dim) features; 4 stride-2 conv stages to 4x4."""

    def __init__(self, depth: int, mults: tuple[int, ...] = (2, 3, 4, 4)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = 3
        for m in mults:
            layers += [nn.Conv2d(ch, depth * m, 4, 2, 1, bias=False), ChannelNorm(depth * m), nn.SiLU()]
            ch = depth * m
        self.net = nn.Sequential(*layers)
        self.embed_dim = ch * (64 // 2 ** len(mults)) ** 2

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        lead = obs.shape[:-3]
        x = obs.reshape(-1, *obs.shape[-3:]).permute(0, 3, 1, 2).float() / 255.0 - 0.5  # (N, 3, 64, 64)
        return self.net(x).reshape(*lead, -1)


class Decoder(nn.Module):
    """(..., feat_dim) latent features -> (..., 64, 64, 3) images in [0, 1]."""

    def __init__(self, feat_dim: int, depth: int, mults: tuple[int, ...] = (2, 3, 4, 4)) -> None:
        super().__init__()
        chans = [depth * m for m in reversed(mults)]
        self.start = 64 // 2 ** len(mults)
        self.chans0 = chans[0]
        self.project = nn.Linear(feat_dim, chans[0] * self.start**2)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), ChannelNorm(cout), nn.SiLU()]
        layers.append(nn.ConvTranspose2d(chans[-1], 3, 4, 2, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        lead = feat.shape[:-1]
        x = self.project(feat.reshape(-1, feat.shape[-1]))
        x = x.reshape(-1, self.chans0, self.start, self.start)  # (N, C, 4, 4)
        x = torch.sigmoid(self.net(x))  # (N, 3, 64, 64)
        return x.permute(0, 2, 3, 1).reshape(*lead, 64, 64, 3)


class NormGRUCell(nn.Module):
    """GRU cell with LayerNorm on the gates and update-gate bias -1 (DreamerV2/V3).

    With ``blocks > 1`` the recurrent weights are block-diagonal (DreamerV3's block GRU): each of
    the ``blocks`` slices of the state sees the whole input but only its own slice of the state,
    which divides the recurrent parameters by ``blocks``.
    """

    def __init__(self, inp: int, size: int, blocks: int = 1) -> None:
        super().__init__()
        if size % blocks:
            raise ValueError(f"GRU size {size} is not divisible by its {blocks} blocks")
        self.blocks, self.size = blocks, size
        per = size // blocks
        # input weights are dense (every block sees all of x); recurrent weights block-diagonal
        self.input = nn.Linear(inp, 3 * size, bias=False)
        self.recurrent = nn.Parameter(torch.empty(blocks, per, 3 * per))
        nn.init.uniform_(self.recurrent, -per**-0.5, per**-0.5)
        self.norm = nn.LayerNorm(3 * per)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        g = self.blocks
        hb = h.reshape(h.shape[0], g, -1)  # (N, G, D/G)
        parts = self.input(x).reshape(h.shape[0], g, -1)  # (N, G, 3D/G)
        if g == 1:
            parts = parts + (hb @ self.recurrent[0])
        else:
            parts = parts + torch.bmm(hb.transpose(0, 1), self.recurrent).transpose(0, 1)
        reset, cand, update = self.norm(parts).chunk(3, -1)  # each (N, G, D/G)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1)
        return (update * cand + (1 - update) * hb).reshape(h.shape)
