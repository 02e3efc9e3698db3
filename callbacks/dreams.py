"""Dream-based goal achievement as Lightning callbacks.

- ``DreamGeneration``: imagine dreams from replayed posterior states, keep the best in a bounded
  buffer, and train the goal matcher on them with hindsight goals (and in dreams toward goals that
  need control); ``callbacks/goal_metrics.py``'s ``GoalEvaluation`` measures it.
- ``BridgeDistillation``: pull the actor toward the matcher on dream states with goals from the
  state model (gradients into the actor only).
- ``DreamWeaning``: act with ``w * pi_g + (1 - w) * pi_actor``, ``w`` falling with env steps.

Each one is optional and each needs the goal framework's agent, ``dreamer.goals.GoalDreamer``
(``configs/dreams.yaml`` selects it); without them a GoalDreamer trains exactly as plain DreamerV3.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from callbacks.training import env_steps_of
from dreamer.distributed import step_optimizer
from dreamer.distributions import categorical_entropy
from dreamer.goals import GoalDreamer
from dreamer.goals.hard import hard_pairs, uniform_policy
from dreamer.goals.model import imagined_return
from dreamer.goals.pursuit import Acting
from dreamer.rssm import State


def agent_problem(callback: str, agent_class: type) -> str | None:
    """Why a dream callback cannot train an agent of ``agent_class``, or None."""
    if issubclass(agent_class, GoalDreamer):
        return None
    return (f"{callback} trains the goal framework's agent, dreamer.goals.GoalDreamer, and this run's model "
            f"is {agent_class.__module__}.{agent_class.__qualname__}: give --config configs/dreams.yaml (it "
            "selects model.class_path dreamer.goals.GoalDreamer), or leave the dream callbacks out")


class GoalCallback(pl.Callback):
    """A callback of the goal framework: refuses a model that is not a ``GoalDreamer``, and makes
    the model's goal state follow training (``GoalPursuit.learning``)."""

    uses_goals = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        if problem := agent_problem(type(self).__name__, type(pl_module)):
            raise ValueError(problem)


def _log(pl_module: pl.LightningModule, metrics: dict[str, float]) -> None:
    if metrics:
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)


class DreamBuffer:
    """Bounded FIFO of dreams: features (n, H + 1, F), actions (n, H), quality (n,)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.feat: torch.Tensor | None = None
        self.action: torch.Tensor | None = None
        self.quality: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.quality is None else len(self.quality)

    def add(self, feat: torch.Tensor, action: torch.Tensor, quality: torch.Tensor) -> None:
        if self.quality is not None:
            feat, action = torch.cat([self.feat, feat]), torch.cat([self.action, action])
            quality = torch.cat([self.quality, quality])
        self.feat, self.action = feat[-self.capacity :], action[-self.capacity :]
        self.quality = quality[-self.capacity :]

    def hindsight(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` samples (feat, later, action): the features of a step t of a dream, those of a
        step j > t reached later in the same dream (the goal, relabelled), and the action taken at t."""
        dreams, steps = self.action.shape
        device = self.action.device
        d = torch.randint(dreams, (n,), device=device)
        t = torch.randint(steps, (n,), device=device)
        j = t + 1 + (torch.rand(n, device=device) * (steps - t)).long().clamp(max=steps - 1 - t)
        return self.feat[d, t], self.feat[d, j], self.action[d, t]

    def states(self, n: int) -> torch.Tensor:
        """Features (n, F) of random steps of the stored dreams."""
        d = torch.randint(len(self), (n,), device=self.feat.device)
        t = torch.randint(self.feat.shape[1], (n,), device=self.feat.device)
        return self.feat[d, t]

    def state_dict(self) -> dict[str, Any]:
        return {"feat": self.feat, "action": self.action, "quality": self.quality}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.feat, self.action, self.quality = state["feat"], state["action"], state["quality"]

    def to(self, device: torch.device) -> None:
        """Move the stored dreams (a checkpoint restores them onto the CPU)."""
        if self.quality is not None:
            self.feat, self.action, self.quality = (
                t.to(device) for t in (self.feat, self.action, self.quality))


def random_dream_goals(pl_module, start: State, steps: int) -> torch.Tensor:
    """Goals (N, G) a policy must control to reach: for each start the state of an imagined
    uniformly random rollout after a random number of steps in 1..``steps``."""
    states, _, _ = pl_module.world_model.rssm.imagine(start, uniform_policy(pl_module.hparams.num_actions), steps)
    goals = pl_module.goal_model.goal_of(states)  # (steps + 1, N, G)
    k = torch.randint(1, steps + 1, (len(goals[0]),), device=goals.device)
    return goals[k, torch.arange(len(k), device=goals.device)]


class DreamGeneration(GoalCallback):
    """Every ``every_n_updates`` updates: imagine ``num_dreams`` dreams of ``horizon`` steps with
    the actor from replayed posterior states, score them, keep the best ``keep_fraction`` in a
    buffer of ``buffer_size`` dreams, and train the goal matcher ``matcher_updates`` times on
    ``matcher_batch`` hindsight samples from the buffer. ``GoalEvaluation`` (``callbacks/goal_metrics.py``)
    measures the matcher.

    Quality of a dream (each term in [0, 1], weighted mean): predicted continuation (product of
    continue probabilities), world-model confidence (1 - mean normalised entropy of the prior
    latents), and predicted return (discounted rewards plus end value, placed within the actor's
    5th-95th return percentiles).

    With ``matcher_rl > 0`` each matcher update adds, at that scale, reinforcement learning in
    imagination (``GoalMatcher.rl_loss``) toward ``rl_goals`` goals that need control: states a
    uniformly random dream reaches within ``rl_goal_steps`` steps of a replayed start. With
    ``rl_real_fraction > 0`` up to that fraction of them are instead real hard pairs of the batch
    (``dreamer/goals/hard.py``: a replayed state and the real state ``rl_goal_steps`` later that
    the goal-blind actor misses, drawn once per phase), the kind of goal the hard sets and the real
    game measure; where the batch holds fewer, random-dream goals fill the rest. With
    ``plan_distill`` P > 0 each matcher update also learns, at ``plan_distill_weight``, the first
    actions of its best dreams when it chooses in P dreams toward ``plan_distill_goals`` such goals
    (``distill_plans``, policy improvement by search as in expert iteration; logs
    ``goal_matcher/plan_agreement``, how often its most likely action already is one of them).
    """

    def __init__(
        self, every_n_updates: int = 4, num_dreams: int = 256, horizon: int = 15,
        keep_fraction: float = 0.5, buffer_size: int = 2048, matcher_updates: int = 4,
        matcher_batch: int = 256, weight_continuation: float = 1.0,
        weight_confidence: float = 1.0, weight_return: float = 1.0, matcher_rl: float = 1.0,
        rl_goals: int = 256, rl_goal_steps: int = 8, rl_real_fraction: float = 0.0, plan_distill: int = 0,
        plan_distill_goals: int = 64, plan_distill_weight: float = 1.0,
    ) -> None:
        for name, value in (("every_n_updates", every_n_updates), ("num_dreams", num_dreams),
                            ("horizon", horizon), ("buffer_size", buffer_size),
                            ("matcher_batch", matcher_batch), ("rl_goals", rl_goals),
                            ("rl_goal_steps", rl_goal_steps), ("plan_distill_goals", plan_distill_goals)):
            if value < 1:
                raise ValueError(f"DreamGeneration {name} must be >= 1, got {value}")
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"DreamGeneration keep_fraction must be in (0, 1], got {keep_fraction}")
        weights = (weight_continuation, weight_confidence, weight_return)
        if min(weights) < 0 or sum(weights) == 0:
            raise ValueError("DreamGeneration quality weights must be >= 0 and not all 0")
        if matcher_rl < 0:
            raise ValueError(f"DreamGeneration matcher_rl must be >= 0, got {matcher_rl}")
        if not 0.0 <= rl_real_fraction <= 1.0:
            raise ValueError(f"DreamGeneration rl_real_fraction must be in [0, 1], got {rl_real_fraction}")
        if plan_distill < 0:
            raise ValueError(f"DreamGeneration plan_distill must be >= 0 (0: off), got {plan_distill}")
        if plan_distill_weight <= 0:
            raise ValueError(f"DreamGeneration plan_distill_weight must be > 0, got {plan_distill_weight}")
        self.plan_distill, self.plan_distill_goals = plan_distill, plan_distill_goals
        self.plan_distill_weight = plan_distill_weight
        self.rl_real_fraction = rl_real_fraction
        self.matcher_rl, self.rl_goals, self.rl_goal_steps = matcher_rl, rl_goals, rl_goal_steps
        self.every_n_updates, self.num_dreams, self.horizon = every_n_updates, num_dreams, horizon
        self.keep_fraction, self.matcher_updates, self.matcher_batch = keep_fraction, matcher_updates, matcher_batch
        self.weights = torch.tensor(weights) / sum(weights)
        self.buffer = DreamBuffer(buffer_size)
        self.metrics: dict[str, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.buffer.to(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.updates % self.every_n_updates == 0:  # outputs: what training_step returned
            self.metrics = self.generate(pl_module, outputs["post"], batch["is_first"])
        _log(pl_module, self.metrics)

    def generate(self, pl_module, post: State, is_first: torch.Tensor) -> dict[str, float]:
        """One phase: dreams, buffer, matcher updates. Returns metrics."""
        wm, ac, matcher = pl_module.world_model, pl_module.actor_critic, pl_module.goal_matcher
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in post.items()}  # (B * T, ...)
        pick = torch.randperm(len(flat["deter"]), device=flat["deter"].device)[: self.num_dreams]
        with torch.no_grad():
            states, feat, actions = wm.rssm.imagine(  # feat (H + 1, N, F)
                {k: v[pick] for k, v in flat.items()}, ac.sample, self.horizon)
            quality = self.quality(pl_module, states, feat)
        keep = quality.topk(max(1, int(len(quality) * self.keep_fraction))).indices
        self.buffer.add(feat.transpose(0, 1)[keep], actions.transpose(0, 1)[keep], quality[keep])

        space = pl_module.goal_model.space
        losses, rl_metrics, agreement = [], {}, {}
        optimizer = pl_module.optimizer("goal_matcher")
        real = self.real_rl_goals(pl_module, post, is_first)
        for _ in range(self.matcher_updates):
            feat, later, action = self.buffer.hindsight(self.matcher_batch)
            with torch.no_grad():
                here, goal = space.of_features(feat), space.of_features(later)
            loss, _ = matcher.loss(feat, here, goal, action)
            if self.matcher_rl > 0:
                start, goal = self.control_goals(pl_module, flat, real, self.rl_goals)
                rl_loss, rl_metrics = matcher.rl_loss(wm, pl_module.goal_model, start, goal)
                loss = loss + self.matcher_rl * rl_loss
            if self.plan_distill:
                start, goal = self.control_goals(pl_module, flat, real, self.plan_distill_goals)
                distill_loss, agreement["goal_matcher/plan_agreement"] = self.distill_plans(pl_module, start, goal)
                loss = loss + self.plan_distill_weight * distill_loss
            step_optimizer(optimizer, loss, matcher.parameters(), matcher.hp.clip)
            matcher.ac.update_slow_critic()
            losses.append(float(loss.detach()))

        metrics = {
            "dream/quality": float(self.buffer.quality.mean()),
            "dream/count": float(len(self.buffer)),
            **{k: float(v) for k, v in rl_metrics.items()},
            **agreement,
        }
        if losses:
            metrics["goal_matcher/loss"] = sum(losses) / len(losses)
        return metrics

    def control_goals(self, pl_module, flat: State, real: tuple[State, torch.Tensor], n: int) -> tuple[State, torch.Tensor]:
        """``n`` (start (n, ...), goal (n, G)) pairs that need control: the phase's ``real`` hard
        pairs first, then goals of uniformly random dreams from replayed states ``flat`` (B * T, ...)."""
        start, goal = real
        start, goal = {k: v[:n] for k, v in start.items()}, goal[:n]
        if len(goal) < n:
            pick = torch.randint(len(flat["deter"]), (n - len(goal),), device=goal.device)
            dream_start = {k: v[pick].detach() for k, v in flat.items()}
            with torch.no_grad():
                dream_goal = random_dream_goals(pl_module, dream_start, self.rl_goal_steps)
            start = {k: torch.cat([start[k], v]) for k, v in dream_start.items()}
            goal = torch.cat([goal, dream_goal])
        return start, goal

    def distill_plans(self, pl_module, start: State, goal: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Policy improvement by search: the matcher chooses in ``plan_distill`` dreams of
        ``rl_goal_steps`` steps from ``start`` (N, ...) toward ``goal`` (N, G) (``GoalPursuit.plans``
        at matcher weight 1); its loss is the cross-entropy of the first actions of each lane's
        best-scoring dreams (ties shared equally). Also returns how often its most likely action
        is one of them."""
        with torch.no_grad():
            acting = Acting(mix_weight=1.0, plan=self.plan_distill, plan_horizon=self.rl_goal_steps)
            first_action, score = pl_module.goals.plans(pl_module, start, goal, acting)  # (N, P) each
            best = (score == score.max(-1, keepdim=True).values).float()  # (N, P)
            target = (F.one_hot(first_action, pl_module.hparams.num_actions).float() * best.unsqueeze(-1)).sum(1)  # (N, A)
            target = target / target.sum(-1, keepdim=True)
            feat, here = pl_module.world_model.rssm.features(start), pl_module.goal_model.goal_of(start)
        loss, logits = pl_module.goal_matcher.loss(feat, here, goal, target)  # logits (N, A)
        agreement = float((target.gather(-1, logits.detach().argmax(-1, keepdim=True)) > 0).float().mean())
        return loss, agreement

    @torch.no_grad()
    def real_rl_goals(self, pl_module, post: State, is_first: torch.Tensor) -> tuple[State, torch.Tensor]:
        """The phase's real hard pairs for the matcher's RL and search (start (M, ...), goal (M, G)),
        M at most ``rl_real_fraction`` of the larger goal count of the two that are on (``rl_goals``,
        ``plan_distill_goals``); none when that is 0 or the batch holds none."""
        wanted = max(self.rl_goals if self.matcher_rl > 0 else 0, self.plan_distill_goals if self.plan_distill else 0)
        n = int(round(wanted * self.rl_real_fraction))
        if n > 0:
            start, goal, _, _ = hard_pairs(pl_module, post, is_first, self.rl_goal_steps, n)
            if len(goal):
                return {k: v.detach() for k, v in start.items()}, goal
        flat = {k: v.reshape(-1, *v.shape[2:])[:0].detach() for k, v in post.items()}  # (0, ...)
        return flat, pl_module.goal_model.goal_of(flat)

    def quality(self, pl_module, states: State, feat: torch.Tensor) -> torch.Tensor:
        """(N,) quality of dreams given their states (H + 1, N, ...) and features."""
        wm, ac = pl_module.world_model, pl_module.actor_critic
        continuation = torch.prod(wm.continue_prob(feat[1:]), 0)  # (N,)
        classes = states["logits"].shape[-1]
        entropy = categorical_entropy(states["logits"][1:]) / torch.log(torch.tensor(float(classes)))
        confidence = 1.0 - entropy.mean((0, 2))  # mean over steps and latents
        ret = imagined_return(wm, ac, feat, ac.hp.gamma)
        ret01 = ((ret - ac.ret_lo) / ac.return_scale).clamp(0, 1)
        terms = torch.stack([continuation, confidence, ret01], -1)  # (N, 3)
        return terms @ self.weights.to(terms.device)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state_dict["buffer"])


class BridgeDistillation(GoalCallback):
    """Every ``every_n_updates`` updates, on ``batch_size`` states from the dream buffer with goals
    from the state model, one actor step on ``coef * KL(pi_g(.|s,g) || pi_actor(.|s))``: the
    matcher is held fixed and only the actor's parameters change.

    ``schedule``: ``constant``, or ``linear`` (``coef`` falling to 0 at ``decay_env_steps``).
    Logs ``bridge/kl`` (before the step), ``bridge/transferred`` (KL removed by the step, nats)
    and ``bridge/coef``. Needs ``DreamGeneration`` earlier in the callback list.
    """

    def __init__(
        self, coef: float = 1.0, schedule: str = "constant", decay_env_steps: int = 100_000,
        every_n_updates: int = 4, batch_size: int = 256,
    ) -> None:
        if schedule not in ("constant", "linear"):
            raise ValueError(f"BridgeDistillation schedule must be 'constant' or 'linear', got {schedule!r}")
        if coef < 0 or decay_env_steps < 1 or every_n_updates < 1 or batch_size < 1:
            raise ValueError("BridgeDistillation needs coef >= 0 and decay_env_steps, "
                             "every_n_updates, batch_size >= 1")
        self.coef, self.schedule, self.decay_env_steps = coef, schedule, decay_env_steps
        self.every_n_updates, self.batch_size = every_n_updates, batch_size
        self.generation: DreamGeneration | None = None
        self.metrics: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        found = [c for c in trainer.callbacks if isinstance(c, DreamGeneration)]
        if not found or trainer.callbacks.index(found[0]) > trainer.callbacks.index(self):
            raise ValueError("BridgeDistillation needs a DreamGeneration callback listed before it "
                             "(it distils on DreamGeneration's dream buffer)")
        self.generation = found[0]

    def coef_at(self, env_steps: int) -> float:
        if self.schedule == "constant":
            return self.coef
        return self.coef * max(0.0, 1.0 - env_steps / self.decay_env_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        buffer = self.generation.buffer
        coef = self.coef_at(env_steps_of(trainer))
        if len(buffer) and coef > 0 and pl_module.updates % self.every_n_updates == 0:
            self.metrics = self.distil(pl_module, buffer.states(self.batch_size), coef)
        _log(pl_module, self.metrics)

    def kl(self, pl_module, feat: torch.Tensor, matcher_logits: torch.Tensor) -> torch.Tensor:
        actor_logits = pl_module.actor_critic.policy_logits(feat)
        return (matcher_logits.exp() * (matcher_logits - actor_logits)).sum(-1).mean()

    def distil(self, pl_module, feat: torch.Tensor, coef: float) -> dict[str, float]:
        """One actor step toward the matcher on dream states ``feat`` (N, F)."""
        wm, ac, gm = pl_module.world_model, pl_module.actor_critic, pl_module.goal_model
        with torch.no_grad():
            goal = gm.propose(wm.rssm.state_from_features(feat), wm, ac)
            matcher_logits = pl_module.goal_matcher.policy_logits(feat, gm.space.of_features(feat), goal)
        kl = self.kl(pl_module, feat, matcher_logits)
        optimizer = pl_module.optimizer("actor")
        step_optimizer(optimizer, coef * kl, ac.actor.parameters(), pl_module.hparams.actor_critic["clip"])
        with torch.no_grad():
            after = self.kl(pl_module, feat, matcher_logits)
        kl = kl.detach()
        return {"bridge/kl": float(kl), "bridge/transferred": float(kl - after), "bridge/coef": coef}


class DreamWeaning(GoalCallback):
    """Acting uses ``w * pi_g(.|s,g) + (1 - w) * pi_actor(.|s)`` with ``w = max(w_min, 1 - t / T)``,
    ``t`` environment steps and ``T = anneal_env_steps``. Goals come from the model's state model
    and are replaced when matched or after ``model.goals.steps`` steps (the same rule measures goal
    success in runs without this callback, so both arms of a comparison are measured alike).
    Validation acts with the weight of the current step. Logs ``weaning/weight``.
    """

    def __init__(self, anneal_env_steps: int = 100_000, w_min: float = 0.0) -> None:
        if anneal_env_steps < 1:
            raise ValueError(f"DreamWeaning anneal_env_steps must be >= 1, got {anneal_env_steps}")
        if not 0.0 <= w_min <= 1.0:
            raise ValueError(f"DreamWeaning w_min must be in [0, 1], got {w_min}")
        self.anneal_env_steps, self.w_min = anneal_env_steps, w_min

    def weight(self, env_steps: int) -> float:
        return max(self.w_min, 1.0 - env_steps / self.anneal_env_steps)

    def _apply(self, trainer, pl_module) -> float:
        weight = self.weight(env_steps_of(trainer))
        pl_module.goals.acting = replace(pl_module.goals.acting, mix_weight=weight)
        return weight

    def on_fit_start(self, trainer, pl_module) -> None:
        self._apply(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._apply(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _log(pl_module, {"weaning/weight": self._apply(trainer, pl_module)})
