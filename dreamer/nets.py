"""Building blocks: MLPs, block-linear layers, the conv encoder and decoder, and DreamerV3's
block-GRU recurrent core."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

NORMS = ("rms", "layer")


class RMSNorm(nn.RMSNorm):
    """DreamerV3's RMSNorm (scale, no shift, eps 1e-4), computed in float32 whatever the input's
    dtype (under bf16 autocast too) and returned in the input's dtype."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, eps=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps).to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    """RMSNorm (DreamerV3's) or LayerNorm over the last axis."""
    if kind == "rms":
        return RMSNorm(dim)
    if kind == "layer":
        return nn.LayerNorm(dim)
    raise ValueError(f"unknown norm {kind!r}; allowed: {', '.join(NORMS)}")


BLOCK_INITS = ("block", "whole")  # a block-linear weight's fan-in: its block's inputs, or all its inputs


@torch.no_grad()
def trunc_normal_fan_in_(module: nn.Module, scale: float = 1.0, block_fan_in: str = "block") -> None:
    """DreamerV3's initialisation of every Linear, BlockLinear and conv weight below ``module``:
    a normal truncated at 2 standard deviations with standard deviation ``scale / sqrt(fan_in)``
    (1.1368 undoes the truncation's shrinkage); biases zero; ``scale`` 0 zeroes the weights. A
    BlockLinear's fan-in is the inputs of one block (``block``), or as in the newest reference all
    its inputs (``whole``: ``sqrt(blocks)`` times smaller weights)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, BlockLinear)):
            weight = m.weight
            fan_in = weight.shape[1] if isinstance(m, nn.Linear) else \
                weight.shape[-2] * (m.blocks if block_fan_in == "whole" else 1)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            weight = m.weight
            cin = weight.shape[1] if isinstance(m, nn.Conv2d) else weight.shape[0]
            fan_in = cin * weight.shape[2] * weight.shape[3]
        else:
            continue
        if scale == 0:
            weight.zero_()
        else:
            nn.init.trunc_normal_(weight, 0.0, 1.0, -2.0, 2.0)
            weight.mul_(1.1368 * scale * fan_in**-0.5)
        if getattr(m, "bias", None) is not None:
            m.bias.zero_()


class BlockLinear(nn.Module):
    """``blocks`` independent Linear maps, block ``g`` from input slice ``g`` to output slice ``g``:
    (..., in) -> (..., out), with ``in`` and ``out`` split evenly over the blocks."""

    def __init__(self, inp: int, out: int, blocks: int, bias: bool = True) -> None:
        super().__init__()
        if inp % blocks or out % blocks:
            raise ValueError(f"block-linear sizes {inp} -> {out} are not divisible by {blocks} blocks")
        self.blocks = blocks
        self.weight = nn.Parameter(torch.empty(blocks, inp // blocks, out // blocks))
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None
        nn.init.uniform_(self.weight, -(inp // blocks) ** -0.5, (inp // blocks) ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.blocks, x.shape[-1] // self.blocks)  # (N, G, in/G)
        if self.blocks == 1:
            y = x[:, 0] @ self.weight[0]
        else:
            y = torch.bmm(x.transpose(0, 1), self.weight).transpose(0, 1)  # (N, G, out/G)
        y = y.reshape(*lead, -1)
        return y if self.bias is None else y + self.bias

    def with_shared_input(self, own: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """This layer applied to every block's input ``[own[:, g], shared]`` without building it:
        each block's own slice (N, G, k) through its block of weights, plus the input every block
        shares (N, S) through all blocks' weights for it at once, one dense matmul. (In the block
        GRU the (N, G, k + S) input it avoids was 30 MB per step when imagining 2048 states.)"""
        n, g, k = own.shape
        y = torch.bmm(own.transpose(0, 1), self.weight[:, :k]).transpose(0, 1)  # (N, G, out/G)
        shared_weight = self.weight[:, k:].transpose(0, 1).reshape(self.weight.shape[1] - k, -1)  # (S, out)
        y = y.reshape(n, -1) + shared @ shared_weight
        return y if self.bias is None else y + self.bias


def init_args(local_vars: dict[str, Any]) -> SimpleNamespace:
    """A nested module's constructor arguments (pass ``locals()``), as plain attributes.

    Not ``save_hyperparameters()``: under LightningCLI that records the owning Dreamer's arguments
    for every LightningModule constructed inside it.
    """
    return SimpleNamespace(**{k: v for k, v in local_vars.items() if k not in ("self", "__class__")})


class MLP(nn.Sequential):
    """``layers`` x (Linear, norm, SiLU), then an optional output Linear, initialised as DreamerV3
    (``trunc_normal_fan_in_``); ``outscale`` scales the output layer's initial weights (0 for the
    reward and value heads, 0.01 for the actor)."""

    def __init__(
        self, inp: int, units: int, layers: int, out: int | None = None, outscale: float = 1.0,
        norm: str = "layer",
    ) -> None:
        mods: list[nn.Module] = []
        for _ in range(layers):
            mods += [nn.Linear(inp, units, bias=norm != "layer"), make_norm(norm, units), nn.SiLU()]
            inp = units
        if out is not None:
            mods.append(nn.Linear(inp, out))
        super().__init__(*mods)
        trunc_normal_fan_in_(self)
        if out is not None:
            trunc_normal_fan_in_(self[-1], outscale)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


DOWNSAMPLES, UPSAMPLES = ("stride", "pool"), ("transposed", "nearest")


class Encoder(nn.Module):
    """uint8 (..., H, W, C) frames -> (..., embed_dim) features; one conv stage per entry of
    ``mults``, each halving the resolution (64x64 -> 4x4 with four): ``downsample`` ``stride``, a
    kernel-4 stride-2 conv; ``pool``, the newest reference's kernel-5 stride-1 conv then 2x2 max-pool
    (the pool keeps a 1-3 pixel sprite's strongest response, where a stride mixes it into a
    weighted sum with its surroundings). Norm and SiLU after each."""

    def __init__(self, depth: int, mults: tuple[int, ...] = (2, 3, 4, 4),
                 obs_shape: tuple[int, int, int] = (64, 64, 3), downsample: str = "stride") -> None:
        super().__init__()
        if downsample not in DOWNSAMPLES:
            raise ValueError(f"unknown downsample {downsample!r}; allowed: {', '.join(DOWNSAMPLES)}")
        layers: list[nn.Module] = []
        ch = obs_shape[2]
        for m in mults:
            if downsample == "pool":
                layers += [nn.Conv2d(ch, depth * m, 5, 1, 2, bias=False), nn.MaxPool2d(2)]
            else:
                layers += [nn.Conv2d(ch, depth * m, 4, 2, 1, bias=False)]
            layers += [ChannelNorm(depth * m), nn.SiLU()]
            ch = depth * m
        self.net = nn.Sequential(*layers)
        self.embed_dim = ch * (obs_shape[0] // 2 ** len(mults)) * (obs_shape[1] // 2 ** len(mults))
        trunc_normal_fan_in_(self)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        lead = obs.shape[:-3]
        x = obs.reshape(-1, *obs.shape[-3:]).permute(0, 3, 1, 2).float() / 255.0 - 0.5  # (N, C, H, W)
        return self.net(x).reshape(*lead, -1)


class Decoder(nn.Module):
    """(..., feat_dim) latent features -> (..., H, W, C) images in [0, 1]: a Linear to the smallest
    grid (4x4 for 64x64 and four stages; norm, SiLU), then stages that double the resolution
    (norm, SiLU): ``upsample`` ``transposed``, kernel-4 stride-2 transposed convs; ``nearest``, the
    newest reference's nearest-neighbour upsampling then a kernel-5 conv."""

    def __init__(self, feat_dim: int, depth: int, mults: tuple[int, ...] = (2, 3, 4, 4),
                 obs_shape: tuple[int, int, int] = (64, 64, 3), upsample: str = "transposed") -> None:
        super().__init__()
        if upsample not in UPSAMPLES:
            raise ValueError(f"unknown upsample {upsample!r}; allowed: {', '.join(UPSAMPLES)}")
        chans = [depth * m for m in reversed(mults)]
        self.obs_shape = tuple(obs_shape)
        self.start = (obs_shape[0] // 2 ** len(mults), obs_shape[1] // 2 ** len(mults))
        self.chans0 = chans[0]
        self.project = nn.Linear(feat_dim, chans[0] * self.start[0] * self.start[1])

        def up(cin: int, cout: int, bias: bool) -> list[nn.Module]:
            if upsample == "nearest":
                return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 5, 1, 2, bias=bias)]
            return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias)]

        layers: list[nn.Module] = [ChannelNorm(chans[0]), nn.SiLU()]
        for cin, cout in zip(chans, chans[1:]):
            layers += [*up(cin, cout, False), ChannelNorm(cout), nn.SiLU()]
        layers += up(chans[-1], obs_shape[2], True)
        self.net = nn.Sequential(*layers)
        trunc_normal_fan_in_(self)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        lead = feat.shape[:-1]
        x = self.project(feat.reshape(-1, feat.shape[-1]))
        x = x.reshape(-1, self.chans0, *self.start)  # (N, C, 4, 4) for 64x64
        x = torch.sigmoid(self.net(x))  # (N, C, H, W)
        return x.permute(0, 2, 3, 1).reshape(*lead, *self.obs_shape)


class BlockGRU(nn.Module):
    """DreamerV3's recurrent core: next ``deter`` from (deter, stoch, action).

    The whole deter, the flattened stoch sample and the action each pass a Linear (width
    ``hidden``) with norm and SiLU; every one of the ``blocks`` slices of deter receives those
    three projections next to its own slice, then ``dynlayers`` block-linear layers (norm, SiLU)
    and a block-linear layer to its reset, candidate and update gates (update bias -1). Blocks
    exchange information every step through the dense projection of the whole deter.
    """

    def __init__(self, deter: int, stoch: int, num_actions: int, hidden: int, blocks: int = 8,
                 dynlayers: int = 1, norm: str = "layer", block_fan_in: str = "block") -> None:
        super().__init__()
        if deter % blocks:
            raise ValueError(f"deter size {deter} is not divisible by its {blocks} blocks")
        self.blocks, self.deter, self.hidden = blocks, deter, hidden

        def dense(inp: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(inp, hidden), make_norm(norm, hidden), nn.SiLU())

        self.deter_in, self.stoch_in, self.action_in = dense(deter), dense(stoch), dense(num_actions)
        layers: list[nn.Module] = []
        inp = deter + blocks * 3 * hidden
        for _ in range(dynlayers):
            layers += [BlockLinear(inp, deter, blocks), make_norm(norm, deter), nn.SiLU()]
            inp = deter
        self.hidden_layers = nn.Sequential(*layers)
        self.gates = BlockLinear(inp, 3 * deter, blocks)
        trunc_normal_fan_in_(self, block_fan_in=block_fan_in)

    def forward(self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """``deter`` (N, D), ``stoch`` (N, S * C), ``action`` (N, A) one-hot -> next deter (N, D).
        (DreamerV3 divides actions by max(1, |a|): one-hot actions are unchanged.)"""
        n, g = deter.shape[0], self.blocks
        x = torch.cat([self.deter_in(deter), self.stoch_in(stoch), self.action_in(action)], -1)  # (N, 3H)
        first, *rest = [*self.hidden_layers, self.gates]
        x = first.with_shared_input(deter.reshape(n, g, -1), x)  # (N, out of the first layer)
        for layer in rest:
            x = layer(x)
        reset, cand, update = x.reshape(n, g, -1).chunk(3, -1)  # each (N, G, D/G)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1)
        return (update * cand + (1 - update) * deter.reshape(n, g, -1)).reshape(n, -1)
