"""What a Dreamer can be built with: the size presets, the supported precisions, and the checks
that refuse bad arguments (one line saying what is allowed) before anything is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, NamedTuple

from dreamer.nets import BLOCK_INITS, DOWNSAMPLES, NORMS, UPSAMPLES

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


def cuda_graph_problem(device_type: str, world_size: int, compile: bool, optimizer: str = "adam") -> str | None:
    """Why ``model.cuda_graph`` cannot run this fit, or None if it can."""
    if optimizer != "adam":
        return (f"model.cuda_graph captures Adam's steps; model.optimizer.kind {optimizer} has not been "
                "run in a CUDA graph yet: leave model.cuda_graph false, or use model.optimizer.kind adam")
    if device_type != "cuda":
        return f"model.cuda_graph replays updates on a CUDA GPU; this run is on {device_type}: use trainer.accelerator gpu, or leave model.cuda_graph false"
    if world_size != 1:
        return f"model.cuda_graph runs on one GPU; this run has {world_size} processes: use trainer.devices 1, or leave model.cuda_graph false"
    if compile:
        return "model.cuda_graph and model.compile are alternatives; pick one (on GPUs cuda_graph was faster: README, GPU check)"
    return None


class Range(NamedTuple):
    """What a knob allows: a numeric range, or choices."""

    low: float = 0.0
    high: float = float("inf")
    low_ok: bool = True  # whether ``low`` itself is allowed
    integer: bool = False
    choices: tuple = ()


def knob(default: Any, *limits: Any, **named: Any) -> Any:
    """A dataclass field with its default and what is allowed (``Range``'s arguments)."""
    return field(default=default, metadata={"range": Range(*limits, **named)})


# Every DreamerV3 knob, grouped by the module it configures; each module's optimiser settings sit
# with it. The CLI reads these as config sections (``model.world_model.lr``), merged key by key
# across config files and flags.
@dataclass(frozen=True)
class WorldModelKnobs:
    """``model.world_model``: the world model's loss, latents and optimiser; how the encoder
    downsamples (``stride``, or the newest reference's ``pool``), how the decoder upsamples
    (``transposed``, or the reference's ``nearest``), and the block GRU's initial scale (fan-in of
    a ``block``, or as the reference of the ``whole`` input)."""

    lr: float = knob(1e-4, 0, 1, False)
    eps: float = knob(1e-8, 0, 1, False)
    clip: float = knob(1000.0, 0, float("inf"), False)
    free_bits: float = knob(1.0, 0, 100)
    scale_dyn: float = knob(1.0, 0, 100)
    scale_rep: float = knob(0.1, 0, 100)
    scale_image: float = knob(1.0, 0, 100)
    scale_reward: float = knob(1.0, 0, 100)
    scale_continue: float = knob(1.0, 0, 100)
    unimix: float = knob(0.01, 0, 1)
    downsample: str = knob("stride", choices=DOWNSAMPLES)
    upsample: str = knob("transposed", choices=UPSAMPLES)
    block_init: str = knob("block", choices=BLOCK_INITS)


@dataclass(frozen=True)
class ActorCriticKnobs:
    """``model.actor_critic``: imagination, returns, the slow critic and the optimisers."""

    horizon: int = knob(15, 1, 1000, integer=True)
    gamma: float = knob(1 - 1 / 333, 0, 1, False)
    lam: float = knob(0.95, 0, 1)
    entropy: float = knob(3e-4, 0, 1)
    repval: float = knob(0.3, 0, 100)
    unimix: float = knob(0.01, 0, 1)
    slow_rate: float = knob(0.02, 0, 1, False)
    slow_reg: float = knob(1.0, 0, 100)
    retnorm_decay: float = knob(0.99, 0, 1)
    actor_lr: float = knob(3e-5, 0, 1, False)
    critic_lr: float = knob(3e-5, 0, 1, False)
    eps: float = knob(1e-5, 0, 1, False)
    clip: float = knob(100.0, 0, float("inf"), False)


OPTIMIZERS = ("adam", "laprop")


@dataclass(frozen=True)
class OptimizerKnobs:
    """``model.optimizer``: what the world model, actor and critic are trained with. ``adam``, the
    first DreamerV3's: Adam with each module's ``lr`` and ``eps``, gradients clipped to each
    module's norm ``clip``. ``laprop``, the newest reference's (``dreamer/optim.py``): LaProp with
    each module's ``lr`` and ``eps``, adaptive gradient clipping ``agc`` per tensor instead of the
    norm clip, the learning rates ramped up linearly over the first ``warmup`` updates; the
    reference sets lr 4e-5 and eps 1e-20 for all three modules."""

    kind: str = knob("adam", choices=OPTIMIZERS)
    agc: float = knob(0.3, 0, 100)
    warmup: int = knob(1000, 0, 10**9, integer=True)


KNOBS = {"world_model": WorldModelKnobs, "actor_critic": ActorCriticKnobs, "optimizer": OptimizerKnobs}
OPTIMISER_KNOBS = ("lr", "eps", "clip", "actor_lr", "critic_lr")


def as_dict(given: Any) -> dict[str, Any]:
    """A group's knobs as given (a knobs dataclass, a mapping, the CLI's namespace, or None) as a dict."""
    if is_dataclass(given):
        return asdict(given)
    return given.as_dict() if hasattr(given, "as_dict") else dict(given or {})


def module_args(group: str, given: Any, knobs: dict[str, type] = KNOBS) -> dict[str, Any]:
    """Every knob of ``group`` (of ``knobs``): the given ones, the defaults for the rest."""
    return asdict(knobs[group](**as_dict(given)))


def without_optimiser(args: dict[str, Any]) -> dict[str, Any]:
    """A module's knobs less its optimiser's: what its constructor takes."""
    return {k: v for k, v in args.items() if k not in OPTIMISER_KNOBS}


def _range_problem(name: str, value: Any, low: float, high: float, low_ok: bool, integer: bool = False) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        return f"model.{name} must be {'an integer' if integer else 'a number'}, got {value!r}"
    if not (low <= value if low_ok else low < value) or not value <= high or value != value:
        interval = f"{'[' if low_ok else '('}{low:g}, {high:g}]"
        return f"model.{name} must lie in {interval}, got {value!r}"
    return None


def argument_problem(args: Any, knobs: dict[str, type] = KNOBS) -> str | None:
    """What is wrong with Dreamer's arguments, a mapping of them (the first problem, with what is
    allowed), or None; ``knobs`` the groups of knobs the agent takes. The CLI asks before it
    builds anything."""
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
    if problem := _range_problem("max_env_steps", args["max_env_steps"], 1, float("inf"), True, True):
        return problem
    for group, group_knobs in knobs.items():
        given, allowed = args.get(group), {f.name: f for f in fields(group_knobs)}
        if given is not None and not is_dataclass(given) and not isinstance(given, dict) and not hasattr(given, "as_dict"):
            return f"model.{group} must be a mapping of its knobs ({', '.join(allowed)}), got {given!r}"
        given = as_dict(given)
        if unknown := sorted(set(given) - set(allowed)):
            return f"unknown model.{group} {unknown}; allowed: {', '.join(allowed)}"
        for key, value in given.items():
            limits, default = allowed[key].metadata["range"], allowed[key].default
            if limits.choices:
                if type(value) is not type(default) or value not in limits.choices:
                    return f"unknown model.{group}.{key} {value!r}; allowed: {', '.join(map(str, limits.choices))}"
            elif problem := _range_problem(f"{group}.{key}", value, *limits[:4]):
                return problem
    if args["norm"] not in NORMS:
        return f"unknown model.norm {args['norm']!r}; allowed: {', '.join(NORMS)}"
    return None
