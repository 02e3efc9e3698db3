"""The newest DreamerV3 reference's optimiser: LaProp (normalise the gradient by its running RMS,
then take momentum of that) after adaptive gradient clipping, with a linear learning-rate warm-up.
``model.optimizer.kind laprop`` selects it for the world model, actor and critic alike."""

from __future__ import annotations

import torch


class LaProp(torch.optim.Optimizer):
    """Per parameter tensor ``p`` with gradient ``g``, at step ``t`` (1, 2, ...):

    1. adaptive gradient clipping: ``g *= 1 / max(1, |g| / (agc * max(pmin, |p|)))`` (norms of the
       whole tensor; ``agc`` 0 turns it off);
    2. ``v = beta2 v + (1 - beta2) g^2``, ``u = g / (sqrt(v / (1 - beta2^t)) + eps)``;
    3. ``m = beta1 m + (1 - beta1) u``, ``p -= lr_t m / (1 - beta1^t)`` with
       ``lr_t = lr * min(1, (t - 1) / warmup)`` (the reference's schedule: 0 at the first step).

    Written with tensor operations only, the step count kept on the parameter's device, so a step
    can be captured in a CUDA graph and replayed (``dreamer/update.py``'s ``GraphedUpdate``).
    """

    def __init__(self, params, lr: float = 4e-5, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-20, agc: float = 0.3, pmin: float = 1e-3, warmup: int = 1000) -> None:
        if not 0 < lr or not 0 <= eps or not 0 <= agc or not 0 <= warmup:
            raise ValueError(f"LaProp needs lr > 0, eps, agc and warmup >= 0; got {lr}, {eps}, {agc}, {warmup}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, agc=agc, pmin=pmin, warmup=warmup))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                g = p.grad
                if group["agc"] > 0:
                    upper = group["agc"] * torch.linalg.vector_norm(p).clamp(min=group["pmin"])
                    g = g / (torch.linalg.vector_norm(g) / upper).clamp(min=1.0)
                step.add_(1)
                t = step.double()  # 1 - 0.999**t loses 4 digits in float32 early on
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                u = g / ((v / (1 - beta2**t)).sqrt() + group["eps"])
                m.mul_(beta1).add_(u, alpha=1 - beta1)
                ramp = ((t - 1) / group["warmup"]).clamp(max=1.0) if group["warmup"] else 1.0
                p.sub_((group["lr"] * ramp / (1 - beta1**t)) * m)
        return loss
