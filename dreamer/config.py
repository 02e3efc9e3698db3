"""What a Dreamer can be built with: the size presets, the supported precisions, and the checks
that refuse bad arguments (one line saying what is allowed) before anything is built."""

from __future__ import annotations

from typing import Any

from dreamer.goals import STRATEGIES
from dreamer.nets import NORMS

# deter / hidden / stoch (categoricals) / classes / cnn depth / mlp units / actor, critic and goal
# matcher layers / gru blocks. 1M and up are DreamerV3's presets (32 latents throughout); tiny is for
# tests. 1M is the CPU configs' preset: it ties with small on benchmarks/world_model_quality.py by
# quality per CPU-minute and is cheaper to act and imagine with.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(deter=64, hidden=64, stoch=32, classes=4, depth=4, units=64, layers=1, gru_blocks=1),
    "1M": dict(deter=512, hidden=64, stoch=32, classes=4, depth=4, units=64, layers=3, gru_blocks=8),
    "small": dict(deter=512, hidden=128, stoch=32, classes=8, depth=8, units=128, layers=3, gru_blocks=8),
    "12M": dict(deter=2048, hidden=256, stoch=32, classes=16, depth=16, units=256, layers=3, gru_blocks=8),
    "25M": dict(deter=3072, hidden=384, stoch=32, classes=24, depth=24, units=384, layers=3, gru_blocks=8),
    "50M": dict(deter=4096, hidden=512, stoch=32, classes=32, depth=32, units=512, layers=3, gru_blocks=8),
    "100M": dict(deter=6144, hidden=768, stoch=32, classes=48, depth=48, units=768, layers=3, gru_blocks=8),
    "200M": dict(deter=8192, hidden=1024, stoch=32, classes=64, depth=64, units=1024, layers=3, gru_blocks=8),
}
# CNN channels per stage are depth x these (DreamerV3's); an override (``cnn_mults``) can match
# another implementation exactly, e.g. SheepRL's (1, 2, 4, 8)
CNN_MULTS = (2, 3, 4, 4)


PRECISIONS = ("32-true", "bf16-mixed")


def precision_problem(precision: str | int | None) -> str | None:
    """Why a Lightning ``trainer.precision`` cannot train a Dreamer, or None if it can."""
    aliases = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "64": "64-true"}
    if precision is None or aliases.get(str(precision), str(precision)) in PRECISIONS:
        return None
    return (f"trainer.precision {precision!r} is not supported; allowed: {', '.join(PRECISIONS)}. "
            "16-mixed's gradient scaler does not cover the updates the dream callbacks make, and "
            "half-precision weights (bf16-true, 16-true) merge the two-hot bins, which reach 4.9e8")


# (lowest, highest, whether the lowest is allowed) for each numeric argument of Dreamer
RANGES: dict[str, tuple[float, float, bool]] = {
    "horizon": (1, 1000, True), "gamma": (0, 1, False), "lam": (0, 1, True), "entropy": (0, 1, True),
    "free_bits": (0, 100, True), "scale_dyn": (0, 100, True), "scale_rep": (0, 100, True),
    "world_model_lr": (0, 1, False), "actor_lr": (0, 1, False), "critic_lr": (0, 1, False),
    "matcher_lr": (0, 1, False), "world_model_eps": (0, 1, False), "actor_critic_eps": (0, 1, False),
    "world_model_clip": (0, float("inf"), False), "actor_critic_clip": (0, float("inf"), False),
    "max_env_steps": (1, float("inf"), True), "goal_threshold": (0, 1, False),
    "goal_rollouts": (1, 4096, True), "goal_offset": (1, 10_000, True), "goal_steps": (1, 1_000_000, True),
    "repval": (0, 100, True),
}
INTEGER_ARGUMENTS = ("horizon", "max_env_steps", "goal_rollouts", "goal_offset", "goal_steps")


# DreamerV3 knobs without a Dreamer argument of their own, grouped by the module they configure
# (``model.world_model_args``, ``model.actor_critic_args``), with their ranges as in RANGES
MODULE_KNOBS: dict[str, dict[str, tuple[float, float, bool]]] = {
    "world_model_args": {"unimix": (0, 1, True), "scale_image": (0, 100, True),
                         "scale_reward": (0, 100, True), "scale_continue": (0, 100, True)},
    "actor_critic_args": {"unimix": (0, 1, True), "slow_rate": (0, 1, False), "slow_reg": (0, 100, True),
                          "retnorm_decay": (0, 1, True)},
}


def _range_problem(name: str, value: Any, low: float, high: float, low_ok: bool, integer: bool = False) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        return f"model.{name} must be {'an integer' if integer else 'a number'}, got {value!r}"
    if not (low <= value if low_ok else low < value) or not value <= high or value != value:
        interval = f"{'[' if low_ok else '('}{low:g}, {high:g}]"
        return f"model.{name} must lie in {interval}, got {value!r}"
    return None


def argument_problem(args: Any) -> str | None:
    """What is wrong with Dreamer's arguments, a mapping of them (the first problem, with what is
    allowed), or None. The CLI asks before it builds anything."""
    size, overrides = args["size"], args["overrides"] or {}
    if size not in SIZES:
        return f"unknown model size {size!r}; allowed: {', '.join(SIZES)}"
    unknown = set(overrides) - set(SIZES[size]) - {"cnn_mults"}
    if unknown:
        return f"unknown size overrides {sorted(unknown)}; allowed: {', '.join(SIZES[size])}, cnn_mults"
    for key, value in overrides.items():
        if key == "cnn_mults":
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 6 or \
                    any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in value):
                return (f"model.overrides.cnn_mults must be a list of 1 to 6 positive integers "
                        f"(channels per 64x64 -> 4x4 conv stage, in units of depth), got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"model.overrides.{key} must be a positive integer, got {value!r}"
    for name, (low, high, low_ok) in RANGES.items():
        if problem := _range_problem(name, args[name], low, high, low_ok, name in INTEGER_ARGUMENTS):
            return problem
    for group, knobs in MODULE_KNOBS.items():
        given = args.get(group) or {}
        if unknown := sorted(set(given) - set(knobs)):
            return f"unknown model.{group} {unknown}; allowed: {', '.join(knobs)}"
        for key, value in given.items():
            if problem := _range_problem(f"{group}.{key}", value, *knobs[key]):
                return problem
    if args["goal_strategy"] not in STRATEGIES:
        return f"unknown model.goal_strategy {args['goal_strategy']!r}; allowed: {', '.join(STRATEGIES)}"
    if args["norm"] not in NORMS:
        return f"unknown model.norm {args['norm']!r}; allowed: {', '.join(NORMS)}"
    return None
