"""Every upgrade of a checkpoint written by an earlier version of this code, in one place.

- ``grouped``: arguments from before they were grouped by module (flat names, ``*_args``);
- ``agent_class_path``: which class a checkpoint restores into. Until the goal framework became an
  extension (``dreamer.goals.GoalDreamer``) one Dreamer class carried the goal model, the goal
  matcher and its optimiser in every run; such a checkpoint goes to ``GoalDreamer`` when its run
  used goals, else to ``Dreamer``;
- ``upgrade``: the state of such an older checkpoint in the shape of today's agent. A plain
  ``Dreamer`` drops the goal tensors and the matcher's optimiser state; a ``GoalDreamer`` gets the
  goal bank's replayed actions as unknown (written before the bank kept them) and, from before the
  matcher had a critic, the matcher's policy as its actor with a fresh critic and optimiser state.

Nothing here imports the goal framework: it reads checkpoints and the agent it is given.
"""

from __future__ import annotations

from typing import Any

PLAIN = "dreamer.agent.Dreamer"
GOALS = "dreamer.goals.agent.GoalDreamer"
GOAL_PREFIXES = ("goal_matcher.", "goal_model.")  # the goal framework's weights and buffers
GOAL_CALLBACKS = ("DreamGeneration", "BridgeDistillation", "DreamWeaning")

# Dreamer's arguments before they were grouped by module: old checkpoints restore through these
FLAT_ARGUMENTS = {
    **{k: ("world_model", k) for k in ("free_bits", "scale_dyn", "scale_rep")},
    "world_model_lr": ("world_model", "lr"), "world_model_eps": ("world_model", "eps"),
    "world_model_clip": ("world_model", "clip"), "actor_critic_eps": ("actor_critic", "eps"),
    "actor_critic_clip": ("actor_critic", "clip"),
    **{k: ("actor_critic", k) for k in ("horizon", "gamma", "lam", "entropy", "repval", "actor_lr", "critic_lr")},
    **{f"goal_{k}": ("goals", k) for k in ("strategy", "threshold", "rollouts", "offset", "steps")},
    "matcher_lr": ("goals", "matcher_lr"), "track_goals": ("goals", "track"),
}


def grouped(hparams: dict[str, Any]) -> dict[str, Any]:
    """Arguments of an older Dreamer (flat names, ``world_model_args``, ``actor_critic_args``) in
    today's groups; today's arguments unchanged."""
    out = {k: v for k, v in hparams.items()
           if k not in FLAT_ARGUMENTS and k not in ("world_model_args", "actor_critic_args")}
    for old, new in (("world_model_args", "world_model"), ("actor_critic_args", "actor_critic")):
        if hparams.get(old):
            out[new] = {**(out.get(new) or {}), **hparams[old]}
    for key, (group, name) in FLAT_ARGUMENTS.items():
        if key in hparams:
            out[group] = {**(out.get(group) or {}), name: hparams[key]}
    return out


def agent_class_path(checkpoint: dict[str, Any]) -> str:
    """The import path of the class ``checkpoint`` restores into: the one it records (written since
    the goal framework became an extension), else ``GoalDreamer`` where the older run used goals
    (a dream callback's state, or goal tracking) and ``Dreamer`` where it did not."""
    recorded = (checkpoint.get("dreamer") or {}).get("agent_class")
    if recorded:
        return recorded
    state = checkpoint.get("state_dict") or {}
    if not any(key.startswith(GOAL_PREFIXES) for key in state):
        return PLAIN
    callbacks = " ".join(map(str, checkpoint.get("callbacks") or {}))
    tracked = (grouped(checkpoint.get("hyper_parameters") or {}).get("goals") or {}).get("track", False)
    return GOALS if tracked or any(name in callbacks for name in GOAL_CALLBACKS) else PLAIN


def upgrade(agent, checkpoint: dict[str, Any]) -> None:
    """In place: ``checkpoint``'s weights and optimiser states in the shape ``agent`` has today."""
    state = checkpoint.get("state_dict", {})
    optimizers = checkpoint.get("optimizer_states")
    if not hasattr(agent, "goal_model"):  # a plain Dreamer: the goal framework's part stays behind
        for key in [k for k in state if k.startswith(GOAL_PREFIXES)]:
            del state[key]
        if optimizers and len(optimizers) > len(agent.OPTIMIZERS):
            del optimizers[len(agent.OPTIMIZERS):]
        return
    bank_path = agent.goal_model.bank_path
    if "goal_model.bank_goal" in state and "goal_model.bank_path" not in state:
        state["goal_model.bank_path"] = bank_path.new_full(bank_path.shape, -1)
    old = [k for k in state if k.startswith("goal_matcher.policy.")]
    if not old:
        return
    for key in old:  # the matcher's policy became its actor; its critic starts fresh
        state[key.replace("goal_matcher.policy.", "goal_matcher.ac.actor.")] = state.pop(key)
    state.update({k: v for k, v in agent.state_dict().items() if k.startswith("goal_matcher.") and k not in state})
    if optimizers and len(optimizers) == len(agent.OPTIMIZERS):
        optimizers[agent.OPTIMIZERS.index("goal_matcher")] = agent.goal_matcher.configure_optimizers().state_dict()
