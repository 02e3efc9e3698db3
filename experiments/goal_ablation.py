"""Plain DreamerV3 against DreamerV3 with dreams, same game, seeds and budget; prints one table
of means with standard errors over the seeds.

    python experiments/goal_ablation.py --config configs/learn_bigfish.yaml --seeds 0 1 2 --max-env-steps 40000

Each arm and seed trains with ``cli.py fit`` in ``runs/ablation/<arm>-seed<seed>`` (the dreams arm
adds ``configs/dreams.yaml``, the optional search arm ``experiments/configs/dreams_search.yaml``), then
validates on training and unseen levels, and keeps its measurements in ``ablation.json`` there.
Running the script again reuses finished arms and resumes interrupted ones from their last
checkpoint, so seeds can be added over several sittings.
``--results DIR`` also keeps each finished arm's measurements in ``DIR/<arm>-seed<seed>.json`` and
reuses them from there: a small directory that can be committed, so an ablation too long for one
machine's lifetime accumulates across machines (``benchmarks/results/`` holds ours). Both arms
measure goal success the same way (``model.goals.track``,
goals from the same state model). For the dreams (and search) arm it also measures the goal matcher:
- in dreams, on held-out real goals and on the hard sets (real goals k steps ahead that the
  goal-blind actor's dreams miss; ``GoalEvaluation.evaluate_hard``) against the actor and a
  uniformly random policy;
- in the real game, on hard goals (``model.goals.strategy hard``): one validation with the actor
  acting while goals are tracked, one with the matcher acting alone (w = 1).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from callbacks.dreams import DreamWeaning  # noqa: E402
from callbacks.goal_metrics import GoalEvaluation  # noqa: E402
from cli import fail, main  # noqa: E402
from datamodules.replay import replay_batch  # noqa: E402

ARM_CONFIGS = {"plain": [], "dreams": ["configs/dreams.yaml"], "search": ["experiments/configs/dreams_search.yaml"]}

ROWS = [
    ("goal step success", "goal/step_success"),
    ("goal episode success", "goal/episode_success"),
    ("goal matches / episode", "goal/matches_per_episode"),
    ("goal steps to reach", "goal/steps_to_reach"),
    ("goal-game alignment", "goal/alignment"),
    ("return", "return"),
    ("level completion", "level_complete"),
]


@torch.no_grad()
def replayed_posteriors(model, replay, batch_size: int, seq_len: int) -> tuple[dict, dict]:
    """A replayed batch (on the model's device) and the world model's posteriors (B, T, ...) of it."""
    batch = replay_batch(replay.sample(batch_size, seq_len))
    batch = {k: v.to(model.device) for k, v in batch.items()}
    _, _, post = model.world_model.loss(batch)
    return batch, post


@torch.no_grad()
def mean_over_replay(model, replay, batch_size: int, seq_len: int, batches: int, measure) -> dict[str, float]:
    """Means over ``batches`` replayed batches of the metrics ``measure(post, batch)`` returns."""
    totals: dict[str, list[float]] = {}
    for _ in range(batches):
        batch, post = replayed_posteriors(model, replay, batch_size, seq_len)
        for key, value in measure(post, batch).items():
            totals.setdefault(key, []).append(value)
    return {k: sum(v) / len(v) for k, v in totals.items()}


def held_out_dream_success(cli, batches: int = 8) -> dict[str, float]:
    """Matcher vs actor (and a random policy on the hard sets) on real held-out goals, in dreams
    from replayed posterior states."""
    gen = next((c for c in cli.trainer.callbacks if isinstance(c, GoalEvaluation)), None)
    if gen is None:
        return {}
    model, dm = cli.model, cli.datamodule
    return mean_over_replay(model, dm.replay, dm.hparams.batch_size, dm.hparams.seq_len, batches,
                            lambda post, batch: {**gen.evaluate(model, post, batch["is_first"]),
                                                 **gen.evaluate_hard(model, post, batch["is_first"], batch["action"])})


def read_record(path: Path, setting: dict) -> dict:
    """The record at ``path``, refused in one line if it is unreadable or was taken with another
    setting (naming what differs)."""
    try:
        saved = json.loads(path.read_text())
        saved["setting"]["arm"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        fail(f"{path} is not a measurement record of this script ({type(err).__name__}: {err}); "
             "move it away")
    if saved["setting"] != setting:
        differ = ", ".join(k for k in setting if saved["setting"].get(k) != setting[k])
        fail(f"{path} holds this arm and seed run with another {differ} ({saved['setting']}); "
             "move it away or run elsewhere")
    return saved


def code_version() -> str:
    """The checked-out commit, with ``+changes`` when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return f"{commit}+changes" if commit and git("status", "--porcelain", "--untracked-files=no") else commit
    except (OSError, subprocess.SubprocessError):
        return ""


STARTED_AT = code_version()  # the code this process runs, whatever is committed while it trains


def provenance() -> dict[str, str]:
    """When, where and from which commit (the one this process started from) a measurement was taken."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    cpu = f"{names[0]} x{len(names)}" if names else platform.processor()
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": STARTED_AT or "unknown", "cpu": cpu,
            "torch": torch.__version__}


def run_arm(arm: str, config: list[str], seed: int, steps: int, extra: list[str],
            results: Path | None = None) -> dict[str, float]:
    """Train and measure one arm and seed in ``runs/ablation/<arm>-seed<seed>``, or take its
    measurements from there or from ``results``: a finished arm is not trained again, and an
    interrupted one resumes from its last checkpoint, so the seeds of a long ablation can be run a
    few at a time."""
    root = Path("runs") / "ablation" / f"{arm}-seed{seed}"
    record = root / "ablation.json"
    setting = {"arm": arm, "config": config, "seed": seed, "max_env_steps": steps, "extra": extra}
    kept = results / f"{arm}-seed{seed}.json" if results is not None else None
    if kept is not None and kept.is_file():
        saved = read_record(kept, setting)
        print(f"{kept}: finished earlier ({saved.get('measured', {}).get('date', 'date unknown')}), "
              "its measurements reused")
        return saved["metrics"]
    resume = []
    if record.is_file():
        saved = read_record(record, setting)
        if "metrics" in saved:
            print(f"{root}: finished earlier, its measurements reused")
            if kept is not None:
                keep(kept, json.dumps(saved, indent=1))
            return saved["metrics"]
        if not (root / "checkpoints" / "last.ckpt").is_file():
            fail(f"{root} holds an unfinished run with no checkpoint to resume; "
                 "remove that directory to start this arm and seed again")
        print(f"{root}: unfinished, resuming from its last checkpoint")
        resume = ["--ckpt_path", "last"]
    elif root.exists():
        fail(f"{root} exists but was not started by this script; move it away")
    args = ["fit"]
    for c in config + ARM_CONFIGS[arm]:
        args += ["--config", str(ROOT / c) if not Path(c).is_absolute() else c]
    args += ["--seed_everything", str(seed), "--data.seed", str(seed),
             "--model.max_env_steps", str(steps),
             # every arm measures goal success alike: the plain arm is a GoalDreamer without dream callbacks
             "--model", "dreamer.goals.GoalDreamer", "--model.goals.track", "true",
             "--trainer.default_root_dir", str(root),
             "--trainer.logger.init_args.run_name", f"ablation-{arm}-seed{seed}", *extra, *resume]
    if not resume:
        root.mkdir(parents=True)
        record.write_text(json.dumps({"setting": setting}))
    cli = main(args)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    cli.model.to(cli.trainer.strategy.root_device)  # Lightning's teardown left it on the CPU
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    metrics.update(held_out_dream_success(cli))
    if arm != "plain":
        metrics.update(real_hard_goal_pursuit(cli))
    finished = json.dumps({"setting": setting, "measured": provenance(), "metrics": metrics}, indent=1)
    record.write_text(finished)
    if kept is not None:
        keep(kept, finished)
    return metrics


def keep(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def real_hard_goal_pursuit(cli) -> dict[str, float]:
    """Goal success in the real game on hard goals: the goal-blind actor acting (goals tracked)
    against the matcher acting alone (w = 1), one validation each."""
    model, trainer = cli.model, cli.trainer
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, DreamWeaning)]
    model.goal_model.hp.strategy = "hard"
    out, tracking = {}, model.goals.acting
    for who, weight in (("actor", None), ("matcher", 1.0)):
        model.goals.acting = replace(tracking, mix_weight=weight)
        try:
            trainer.validate(model, datamodule=cli.datamodule)
        finally:
            model.goals.acting = tracking
        model.to(trainer.strategy.root_device)
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/") and "/goal/" in key:
                out[key.replace("/goal/", f"/hard_{who}/")] = float(value)
    return out


def mean_se(values: list[float]) -> str:
    """``mean +- standard error`` of the finite values (the error only with two or more)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.3f}"
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))
    return f"{m:.3f}+-{se:.3f}"


DREAM_ROWS = [("matcher success on held-out goals", "goal_matcher/dream_success"),
              ("actor success on the same goals", "goal_matcher/actor_dream_success")] + [
    (f"hard k={k}: {who}", f"goal_hard/k{k}_{who}")
    for k in GoalEvaluation().hard_offsets for who in ("matcher", "actor", "random", "lift", "kept")]


def table(results: dict[str, list[dict[str, float]]]) -> str:
    arms = list(results)
    lines = [f"{'metric':<48}" + "".join(f"{a:>16}" for a in arms)]

    def row(label: str, key: str) -> None:
        cells = [mean_se([r.get(key, float("nan")) for r in results[a]]) for a in arms]
        lines.append(f"{label:<48}" + "".join(f"{c:>16}" for c in cells))

    for split in ("train_levels", "unseen_levels"):
        where = split.split("_")[0]
        for label, key in ROWS:
            row(f"{label} ({where})", f"val/{split}/{key}")
        for who in ("actor", "matcher"):
            for label, key in ROWS[:4]:
                row(f"hard, {who} acts: {label[5:]} ({where})", f"val/{split}/hard_{who}/{key[5:]}")
    for label, key in DREAM_ROWS:
        row(f"{label} (dreams)", key)
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=None,
                        help="base config(s) shared by both arms (default: configs/learn_bigfish.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-env-steps", type=int, default=40_000)
    parser.add_argument("--arms", nargs="+", default=["plain", "dreams"], choices=list(ARM_CONFIGS),
                        help="plain: DreamerV3; dreams: + configs/dreams.yaml; search: + experiments/configs/dreams_search.yaml "
                             "(the matcher also learns from its own search); default: plain dreams")
    parser.add_argument("--results", type=Path, default=None,
                        help="also keep finished arms' measurements in DIR/<arm>-seed<seed>.json and "
                             "reuse them from there (a directory to commit; default: runs/ablation only)")
    args, extra = parser.parse_known_args(argv)
    if args.max_env_steps < 1:
        fail(f"--max-env-steps {args.max_env_steps}: must be >= 1")
    if args.results is not None and args.results.exists() and not args.results.is_dir():
        fail(f"--results {args.results} is a file; give a directory (created if missing)")
    args.config = args.config or ["configs/learn_bigfish.yaml"]
    return args, extra


def run(argv: list[str] | None = None) -> str:
    args, extra = parse(argv)
    results = {arm: [run_arm(arm, args.config, s, args.max_env_steps, extra, args.results) for s in args.seeds]
               for arm in args.arms}
    text = table(results)
    print(f"\nablation: {', '.join(args.config)}, seeds {args.seeds}, {args.max_env_steps} env steps each\n{text}")
    return text


if __name__ == "__main__":
    run()
