"""Small torch.distributed helpers that are no-ops in a single process."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (same shape on each) concatenated along dim 0, on every rank."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def step_optimizer(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params, clip: float) -> None:
    """One optimiser step on ``loss`` for ``params`` only, outside Lightning's training step.

    Under torch.distributed the gradients are averaged over ranks first (the dream callbacks run
    outside the DDP-wrapped forward, so DDP would not synchronise them).
    """
    params = list(params)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if world_size() > 1:
        for p in params:
            p.grad = mean_over_ranks(p.grad if p.grad is not None else torch.zeros_like(p))
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
