"""One DreamerV3 update, written once: ``Dreamer.training_step``, the benchmarks and the golden
test all run this function; ``compile_update`` compiles what it runs."""

from __future__ import annotations

from typing import Callable

import torch

from dreamer.distributed import mean_over_ranks

OPTIMIZED = ("world model", "actor", "critic")


def params_of(optimizer) -> list[torch.Tensor]:
    """The parameters an optimiser (or Lightning's wrapper of one) updates."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def update(
    model, optimizers, batch: dict[str, torch.Tensor],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """World-model and actor-critic loss on ``batch``, one backward, each gradient clipped to its
    norm (world model, actor, critic: ``optimizers`` in that order), their steps, the slow critic.

    A non-finite loss (averaged over ranks, so all stop together) or gradient norm raises
    ``FloatingPointError`` naming it, before any weight changes. ``backward`` is Lightning's
    ``manual_backward`` under the Trainer. Returns the loss and its metrics.
    """
    loss, metrics = model.loss(batch)
    number = model.updates + 1
    if not torch.isfinite(mean_over_ranks(loss.detach().float())):
        bad = [f"{k} = {float(v):g}" for k, v in sorted(metrics.items()) if not torch.isfinite(v).all()]
        raise FloatingPointError(
            f"the loss diverged at update {number} ({', '.join(bad) or 'loss = ' + str(float(loss))}); "
            "the run stopped without saving, so its last checkpoint holds the last good state; "
            "lower the learning rates (model.world_model.lr, model.actor_critic.actor_lr and critic_lr) and resume or start over"
        )
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    backward(loss)
    hp = model.hparams
    clips = (hp.world_model["clip"], hp.actor_critic["clip"], hp.actor_critic["clip"])
    norms = [torch.nn.utils.clip_grad_norm_(params_of(opt), clip) for opt, clip in zip(optimizers, clips)]
    if not torch.isfinite(torch.stack(norms)).all():  # gradients are all-reduced: ranks agree
        bad = [f"{n} {float(v):g}" for n, v in zip(OPTIMIZED, norms) if not torch.isfinite(v)]
        raise FloatingPointError(
            f"non-finite gradient norm at update {number} ({', '.join(bad)}); nothing was "
            "applied and the last checkpoint holds the last good state; lower the learning rates "
            "(model.world_model.lr, model.actor_critic.actor_lr and critic_lr) and resume or start over"
        )
    for opt in optimizers:
        opt.step()
    model.actor_critic.update_slow_critic()
    return loss, metrics


def compile_update(model) -> None:
    """``torch.compile`` a Dreamer's encoder, decoder, heads, actor, critic, the RSSM's step
    functions and the whole imagination loop, in place (instance attributes; the state dict keeps
    its names). The loop, actor sampling included, traces into one graph without breaks."""
    wm, ac = model.world_model, model.actor_critic
    for module in (wm.encoder, wm.decoder, wm.reward_head, wm.continue_head, ac.actor, ac.critic):
        module.compile()
    wm.rssm.img_step = torch.compile(wm.rssm.img_step)
    wm.rssm.obs_step = torch.compile(wm.rssm.obs_step)
    model.imagine = torch.compile(model.imagine)
