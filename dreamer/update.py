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
        raise diverged(loss, metrics, number, "the run stopped without saving")
    norms = clipped_gradients(model, optimizers, loss, backward)
    if not torch.isfinite(norms).all():  # gradients are all-reduced: ranks agree
        raise non_finite_norms(norms, number, "nothing was applied")
    take_steps(model, optimizers)
    return loss, metrics


def clipped_gradients(model, optimizers, loss: torch.Tensor,
                      backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> torch.Tensor:
    """Backward of ``loss`` and each optimiser's gradients clipped to its norm; the three norms
    before clipping (3,). Reads no value back to the host, so it can run inside a CUDA graph."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    backward(loss)
    hp = model.hparams
    clips = (hp.world_model["clip"], hp.actor_critic["clip"], hp.actor_critic["clip"])
    if hp.get("optimizer", {}).get("kind", "adam") != "adam":  # LaProp clips each tensor itself (agc)
        clips = (float("inf"),) * 3
    return torch.stack([torch.nn.utils.clip_grad_norm_(params_of(opt), clip)
                        for opt, clip in zip(optimizers, clips)])


def take_steps(model, optimizers) -> None:
    """The optimiser steps, then the slow critic's move toward the critic."""
    for opt in optimizers:
        opt.step()
    model.actor_critic.update_slow_critic()


def diverged(loss: torch.Tensor, metrics: dict[str, torch.Tensor], number: int, outcome: str) -> FloatingPointError:
    bad = [f"{k} = {float(v):g}" for k, v in sorted(metrics.items()) if not torch.isfinite(v).all()]
    return FloatingPointError(
        f"the loss diverged at update {number} ({', '.join(bad) or 'loss = ' + str(float(loss))}); "
        f"{outcome}, so its last checkpoint holds the last good state; lower the learning rates "
        "(model.world_model.lr, model.actor_critic.actor_lr and critic_lr) and resume or start over"
    )


def non_finite_norms(norms: torch.Tensor, number: int, outcome: str) -> FloatingPointError:
    bad = [f"{n} {float(v):g}" for n, v in zip(OPTIMIZED, norms) if not torch.isfinite(v)]
    return FloatingPointError(
        f"non-finite gradient norm at update {number} ({', '.join(bad)}); {outcome} and the last "
        "checkpoint holds the last good state; lower the learning rates "
        "(model.world_model.lr, model.actor_critic.actor_lr and critic_lr) and resume or start over"
    )


class GraphedUpdate:
    """``update`` on one CUDA device, captured once as a CUDA graph and replayed: the whole update
    (loss, backward, clipping, Adam steps, slow critic) costs one launch instead of thousands of
    kernel launches from Python, which bound it on GPUs (12M and 50M took the same 0.23 s per
    update on an H100, eager).

    The first ``warmup`` calls run ``update`` eagerly on a side stream (real updates; cuBLAS and
    autograd set themselves up), the next one captures and replays. Every call copies ``batch``
    into the captured input buffers, so its keys, shapes and dtypes must stay the same. The
    optimisers must be Adam with ``capturable=True`` (``set_capturable``).
    The loss and gradient norms are checked after the replay: a non-finite one raises
    ``FloatingPointError``, the weights in memory are then spoilt and the run must stop without
    saving. Returns what ``update`` returns, as fresh tensors (the captured outputs are
    overwritten by the next replay); ``model.last_post`` is a fresh copy too.
    """

    def __init__(self, model, optimizers, warmup: int = 3) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.model, self.optimizers, self.warmup = model, list(optimizers), warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss, metrics = update(self.model, self.optimizers, batch)
            torch.cuda.current_stream().wait_stream(side)
            return loss, metrics
        if self.graph is None:
            self._capture(batch)
        else:
            copy_into(self.inputs, batch)
            self.graph.replay()
        loss, metrics, norms = self.outputs
        number = self.model.updates + 1
        if not torch.isfinite(loss):
            raise diverged(loss, metrics, number, "the weights in memory are spoilt and the run must stop without saving")
        if not torch.isfinite(norms).all():
            raise non_finite_norms(norms, number, "the weights in memory are spoilt, the run must stop without saving,")
        self.model.last_post = {k: v.clone() for k, v in self.captured_post.items()}
        return loss.clone(), {k: v.clone() for k, v in metrics.items()}

    def _capture(self, batch: dict[str, torch.Tensor]) -> None:
        self.inputs = clone_tree(batch)
        # autocast's weight cache cannot live across replays: capture with it off, same dtype
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype is not None, cache_enabled=False)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)  # gradients are then allocated, and reused, by the graph
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), autocast:
            loss, metrics = self.model.loss(self.inputs)
            norms = clipped_gradients(self.model, self.optimizers, loss)
            take_steps(self.model, self.optimizers)
        self.outputs = (loss.detach(), metrics, norms)
        self.captured_post = self.model.last_post
        self.graph.replay()  # capturing runs nothing: this is the update


def set_capturable(optimizers, on: bool = True) -> None:
    """Adam's ``capturable`` switch for ``optimizers`` (raw torch optimisers), with the step
    counts of existing state moved where that mode keeps them: on the parameter's device when
    captured in a CUDA graph, on the CPU otherwise (a checkpoint written by a graphed run resumes
    eagerly on a CPU, and the other way round)."""
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Adam):
            continue
        for group in opt.param_groups:
            group["capturable"] = on
            for p in group["params"]:
                state = opt.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(p.device if on else "cpu", torch.float32)


def clone_tree(tree):
    if isinstance(tree, dict):
        return {k: clone_tree(v) for k, v in tree.items()}
    return tree.clone()


def copy_into(static, tree) -> None:
    if isinstance(static, dict):
        if static.keys() != tree.keys():
            raise ValueError(f"a CUDA-graphed update needs the same batch keys every time: captured "
                             f"{sorted(static)}, got {sorted(tree)}")
        for k in static:
            copy_into(static[k], tree[k])
    elif static.shape != tree.shape or static.dtype != tree.dtype:
        raise ValueError(f"a CUDA-graphed update needs the same batch shapes every time: captured "
                         f"{tuple(static.shape)} {static.dtype}, got {tuple(tree.shape)} {tree.dtype}")
    else:
        static.copy_(tree, non_blocking=True)


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
