"""Which goal space makes reaching a goal mean controlling something? Compares goal spaces on one
trained checkpoint's world model, actor and replay, everything else fixed.

    python experiments/goal_spaces.py runs/<name>/checkpoints/last.ckpt [--spaces deter stoch inverse]
        [--updates 150] [--space-steps 300] [--seeds 0 1]

For each space and seed: a fresh goal model and goal matcher. A learned space first trains on
``--space-steps`` replayed batches (the goal statistics follow in every space); then ``--updates``
``DreamGeneration`` phases train the matcher as in a run with the dream callbacks (hindsight
imitation plus RL in imagination); then the hard goal sets (real goals k steps ahead on replayed
trajectories that the goal-blind actor's own dreams miss, ``GoalEvaluation.evaluate_hard``) are
measured on ``--eval-batches`` replayed batches. Printed per space, means with standard errors
over the seeds: success within k dreamed steps of the matcher, the actor and a uniformly random
policy, the lift (matcher - actor), the fraction of open pairs that are hard (kept) and, with
``--dream-plan P``, the matcher (or the mixture at ``--dream-plan-weight``) choosing each action in
P dreams of ``--dream-plan-horizon`` steps (planned; judged in the evaluation dream, drawn apart from
the planning ones).

With ``--real-episodes N`` the trained matcher also pursues hard goals in the real game
(``--real-strategy hard``: replayed goals the actor's own dreams do not reach; ``control``: of
those, only the ones that the replayed actions, imagined from the current state, do reach), on the
run's training levels and on unseen levels, N episodes each: once the goal-blind actor acts while
the goals are tracked, once the matcher acts alone (w = 1; with ``--real-greedy`` taking its most
likely action, not a sample; with ``--real-plan P`` choosing each action in P dreams of
``--real-plan-horizon`` steps, ``GoalPursuit.planned``), each goal pursued for at most
``--real-goal-steps`` steps (default: the run's ``model.goals.steps``; the hard sets in dreams give
k steps for a goal k steps ahead).
Printed: goal step success, episode success, matches per episode, steps to reach and the game return
(mean episode return while pursuing the goals), for both.
Needs a checkpoint with its replay (in RAM, or memory-mapped with the files in place).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from callbacks.dreams import DreamGeneration  # noqa: E402
from callbacks.goal_metrics import GoalEvaluation  # noqa: E402
from datamodules.games import NUM_ACTIONS  # noqa: E402
from datamodules.replay_datamodule import ReplayDataModule  # noqa: E402
from dreamer.checkpoints import CheckpointError, read_checkpoint  # noqa: E402
from dreamer.goals import GoalDreamer  # noqa: E402
from dreamer.goals.hard import ACTOR_TRIES  # noqa: E402
from dreamer.goals.matcher import GoalMatcher  # noqa: E402
from dreamer.goals.model import MATCHER_REWARDS, GoalStateModel  # noqa: E402
from dreamer.goals.pursuit import Acting  # noqa: E402
from dreamer.goals.space import SPACES, make_goal_space  # noqa: E402
from dreamer.migrations import GOAL_PREFIXES  # noqa: E402
from experiments.goal_ablation import mean_over_replay, mean_se, replayed_posteriors  # noqa: E402
from experiments.world_model_probe import load  # noqa: E402

COLUMNS = ("matcher", "actor", "random", "replay", "lift", "kept", "planned")
SETS = ("hard", "control")
REAL = ("step_success", "episode_success", "matches_per_episode", "steps_to_reach", "return")
REAL_STRATEGIES = ("hard", "control")  # the goals pursued in the real game (GoalStateModel strategies)


def as_goal_agent(model):
    """``model`` as a GoalDreamer: a plain Dreamer's weights in one, its goal modules fresh."""
    if isinstance(model, GoalDreamer):
        return model
    agent = GoalDreamer(**dict(model.hparams)).eval()
    missing, unexpected = agent.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(key.startswith(GOAL_PREFIXES) for key in missing), (missing, unexpected)
    return agent


def fresh_goals(model, kind: str, space_dim: int, space_lr: float, reward: str = "similarity",
                strategy: str = "hard", actor_tries: int = ACTOR_TRIES) -> None:
    """Give ``model`` a new goal model in space ``kind`` proposing goals by ``strategy``, and a new
    matcher for its goals; the goal model keeps the checkpoint's threshold, rollouts and offset."""
    rssm, old, matcher = model.world_model.rssm, model.goal_model.hp, model.goal_matcher.hp
    space = make_goal_space(kind, rssm.deter, rssm.stoch * rssm.classes, NUM_ACTIONS, space_dim, matcher.units,
                            space_lr, steps=old.offset)
    model.goal_model = GoalStateModel(rssm.deter, strategy, old.threshold, old.rollouts, old.horizon, old.offset,
                                      gamma=old.gamma, space=space, actor_tries=actor_tries)
    model.goal_matcher = GoalMatcher(rssm.feat_dim, space.dim, NUM_ACTIONS, matcher.units, matcher.layers, matcher.lr,
                                     reward=reward)
    optimizers = model.configure_optimizers()  # with the new matcher's
    model.optimizers = lambda: optimizers  # what the Trainer answers a module that it fits


def compare_space(model, replay, kind: str, seed: int, args) -> dict[str, float]:
    """Train a fresh goal space (if learned) and matcher on ``model``; the hard-set metrics."""
    torch.manual_seed(seed)
    fresh_goals(model, kind, args.space_dim, args.space_lr, args.matcher_reward, args.real_strategy,
                args.actor_tries)
    gm, out = model.goal_model, {}
    generation = DreamGeneration(every_n_updates=1, rl_real_fraction=args.rl_real_fraction,
                                 plan_distill=args.plan_distill, plan_distill_goals=args.plan_distill_goals)
    evaluation = GoalEvaluation(hard_offsets=tuple(args.offsets), hard_plan=args.dream_plan,
                                hard_plan_horizon=args.dream_plan_horizon, hard_plan_weight=args.dream_plan_weight)
    for step in range(args.space_steps + args.updates):
        batch, post = replayed_posteriors(model, replay, args.batch_size, args.seq_len)
        learned = gm.observe(post, batch["is_first"], batch["action"], seed=step)
        out.update({k: float(v) for k, v in learned.items()})
        if step >= args.space_steps:
            phase = generation.generate(model, post, batch["is_first"])
            if "goal_matcher/plan_agreement" in phase:
                out["goal_matcher/plan_agreement"] = phase["goal_matcher/plan_agreement"]
    out.update(mean_over_replay(model, replay, args.batch_size, args.seq_len, args.eval_batches,
                                lambda post, batch: evaluation.evaluate_hard(model, post, batch["is_first"],
                                                                             batch["action"])))
    if args.real_episodes:
        out.update(real_game_pursuit(model, args.data, args.real_episodes, args.real_greedy, args.real_goal_steps,
                                     args.real_plan, args.real_plan_horizon, args.real_weight))
    return out


def real_game_pursuit(model, data: ReplayDataModule, episodes: int, greedy: bool = False,
                      goal_steps: int | None = None, plan: int = 0, plan_horizon: int = 8,
                      weight: float = 1.0) -> dict[str, float]:
    """Goal success on hard goals in the real game and the game return (``return``), per split:
    ``real/{split}/{actor,matcher}_{metric}``;
    the second policy is the mixture with the matcher at ``weight`` (1: the matcher alone); with
    ``greedy`` it takes its most likely actions, with ``plan`` > 0 it chooses them in that many
    dreams of ``plan_horizon`` steps; each goal is pursued for at most ``goal_steps`` steps
    (default the run's ``model.goals.steps``)."""
    out, before = {}, model.goals.acting
    for who, mix_weight in (("actor", None), ("matcher", weight)):
        model.goals.acting = Acting(goal_steps or before.goal_steps, track=True, mix_weight=mix_weight, greedy=greedy,
                                    plan=plan, plan_horizon=plan_horizon)
        try:
            for split in ("train_levels", "unseen_levels"):
                with model.goals.measuring(split) as summary:
                    game = data.evaluate(model, split, episodes)
                out.update({f"real/{split}/{who}_{k.split('/')[-1]}": v for k, v in summary.items()})
                out[f"real/{split}/{who}_return"] = game["return"]
        finally:
            model.goals.acting = before
    return out


def table(results: dict[str, list[dict[str, float]]], offsets: list[int], strategy: str = "hard",
          matcher: str = "matcher (w = 1) acting") -> str:
    lines = [f"{'space':9s} {'set':7s} {'k':>3s} " + " ".join(f"{c:>15s}" for c in COLUMNS) + f" {'inverse acc':>15s}"]
    for kind, runs in results.items():
        acc = mean_se([r["goal_space/inverse_accuracy"] for r in runs if "goal_space/inverse_accuracy" in r])
        for name in SETS:
            for k in offsets:
                key = f"goal_{name}/k{k}_"
                cells = [mean_se([r[key + c] for r in runs if key + c in r]) for c in COLUMNS]
                lines.append(f"{kind:9s} {name:7s} {k:3d} " + " ".join(f"{c:>15s}" for c in cells) + f" {acc:>15s}")
    for split in ("train_levels", "unseen_levels"):
        if not any(f"real/{split}/actor_step_success" in r for runs in results.values() for r in runs):
            continue
        lines.append(f"\n{strategy} goals in the real game, {split.replace('_', ' ')}: actor acting / {matcher}")
        lines.append(f"{'space':8s} " + " ".join(f"{m:>33s}" for m in REAL))
        for kind, runs in results.items():
            cells = [" / ".join(mean_se([r[f"real/{split}/{who}_{m}"] for r in runs if f"real/{split}/{who}_{m}" in r])
                                for who in ("actor", "matcher")) for m in REAL]
            lines.append(f"{kind:8s} " + " ".join(f"{c:>33s}" for c in cells))
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--spaces", nargs="+", default=list(SPACES), choices=SPACES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--updates", type=int, default=150, help="DreamGeneration phases per space")
    parser.add_argument("--space-steps", type=int, default=300, help="replayed batches a learned space trains on first")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--space-dim", type=int, default=32, help="size of the learned inverse space")
    parser.add_argument("--space-lr", type=float, default=3e-4, help="Adam learning rate of the learned space")
    parser.add_argument("--real-episodes", type=int, default=0,
                        help="episodes per split of real-game pursuit of hard goals (0: none)")
    parser.add_argument("--real-strategy", default="hard", choices=REAL_STRATEGIES,
                        help="the goals pursued in the real game (GoalStateModel strategy)")
    parser.add_argument("--real-greedy", action="store_true",
                        help="in the real game the matcher takes its most likely action instead of a sample")
    parser.add_argument("--real-goal-steps", type=int, default=None,
                        help="steps a real-game goal is pursued before it is dropped (default: the run's model.goals.steps)")
    parser.add_argument("--real-plan", type=int, default=0,
                        help="in the real game the matcher chooses each action in this many dreams (0: it acts alone)")
    parser.add_argument("--real-plan-horizon", type=int, default=8, help="steps of each of those dreams")
    parser.add_argument("--real-weight", type=float, default=1.0,
                        help="the matcher's weight w in the acting mixture w * matcher + (1 - w) * actor, in (0, 1]")
    parser.add_argument("--dream-plan", type=int, default=0,
                        help="also measure the hard sets in dreams with the matcher choosing each action in this many "
                             "dreams (column planned; 0: not measured)")
    parser.add_argument("--dream-plan-horizon", type=int, default=8, help="steps of each of those planning dreams")
    parser.add_argument("--dream-plan-weight", type=float, default=1.0,
                        help="the matcher's weight in the mixture that chooses in those dreams, in (0, 1] "
                             "(near 0: the actor's own actions chosen in dreams, a control)")
    parser.add_argument("--actor-tries", type=int, default=ACTOR_TRIES,
                        help="imagined actor rollouts that must all miss a hard goal, in dreams and in the real "
                             "game (model.goals.actor_tries; dreamer/goals/hard.py)")
    parser.add_argument("--matcher-reward", default="similarity", choices=MATCHER_REWARDS,
                        help="the goal reward of the matcher's RL (GoalMatcher.reward)")
    parser.add_argument("--plan-distill", type=int, default=0,
                        help="DreamGeneration.plan_distill: the matcher also learns the first actions it takes when "
                             "choosing in this many dreams (0: off)")
    parser.add_argument("--plan-distill-goals", type=int, default=64,
                        help="DreamGeneration.plan_distill_goals: goals per matcher update for that")
    parser.add_argument("--offsets", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rl-real-fraction", type=float, default=0.0,
                        help="DreamGeneration.rl_real_fraction: share of the matcher's RL goals that are real hard pairs")
    args = parser.parse_args(argv)
    for name in ("updates", "eval_batches", "batch_size", "space_dim", "actor_tries", "real_plan_horizon",
                 "dream_plan_horizon", "plan_distill_goals"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.rl_real_fraction <= 1:
        parser.error(f"--rl-real-fraction must lie in [0, 1], got {args.rl_real_fraction}")
    for name in ("real_weight", "dream_plan_weight"):
        if not 0 < getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must lie in (0, 1], got {getattr(args, name)}")
    if not 0 < args.space_lr <= 1:
        parser.error(f"--space-lr must lie in (0, 1], got {args.space_lr}")
    if args.real_goal_steps is not None and args.real_goal_steps < 1:
        parser.error(f"--real-goal-steps must be >= 1, got {args.real_goal_steps}")
    for name in ("space_steps", "real_episodes", "real_plan", "dream_plan", "plan_distill"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if min(args.offsets) < 1 or max(args.offsets) >= args.seq_len:
        parser.error(f"--offsets must lie in [1, --seq-len - 1] = [1, {args.seq_len - 1}], got {args.offsets}")
    return args


def run(argv: list[str] | None = None) -> str:
    args = parse(argv)
    try:
        ckpt = read_checkpoint(args.checkpoint)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    model, replay = load(args.checkpoint, ckpt)
    model = as_goal_agent(model)
    if args.real_episodes:  # the run's own levels and envs
        hp = ckpt.get("datamodule_hyper_parameters", {})
        args.data = ReplayDataModule(**{k: v for k, v in hp.items() if not k.startswith("_")})
        args.data.setup("validate")
    results: dict[str, list[dict[str, float]]] = {}
    for kind in args.spaces:
        for seed in args.seeds:
            start = time.perf_counter()
            results.setdefault(kind, []).append(compare_space(model, replay, kind, seed, args))
            agreement = results[kind][-1].get("goal_matcher/plan_agreement")
            print(f"{kind} seed {seed}: {time.perf_counter() - start:.0f} s"
                  + ("" if agreement is None else f", last phase's plan agreement {agreement:.3f}"),
                  file=sys.stderr, flush=True)
    matcher = f"matcher (w = {args.real_weight:g})" + (
        f" choosing in {args.real_plan} dreams of {args.real_plan_horizon} steps" if args.real_plan else " acting")
    return table(results, args.offsets, args.real_strategy, matcher)


if __name__ == "__main__":
    print(run())
