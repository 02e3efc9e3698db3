"""How fast the whole trainer learns the sanity tasks (``datamodules/sanity.py``): per task, model
size and seed, the updates needed to reach half the optimal return and to bring the policy's
entropy below 0.5 ln 15, and a table of them over seeds.

Each run is the real ``cli.py fit --config configs/sanity.yaml`` (collector, replay, DataModule,
update, validation, dream pictures, MLflow) in ``<workdir>/<task>-<size>-seed<seed>``; a run cut
short resumes from its last checkpoint on the next call, a finished one is read from its record
``<out>/<task>-<size>-seed<seed>.json``. Extra arguments after ``--`` go to every ``cli.py fit``
(``-- --model.world_model.lr 3e-4``); runs with other extra arguments need another ``--out``.

    python benchmarks/sanity_learning.py --tasks sanity-colour --sizes tiny 1M --seeds 0 1 2

Return: the mean of the latest 16 finished training episodes (acting as it trains, sampled
actions), at the update count when the 16th of them ended. Entropy: the actor's mean entropy on
its imagined states, as logged every 10 updates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.collector import mean_se  # noqa: E402
from datamodules.sanity import SANITY_TASKS  # noqa: E402

CONFIG = ROOT / "configs" / "sanity.yaml"
TARGETS = {"sanity-colour": 2000, "sanity-sprite": 5000, "sanity-grid": 5000, "sanity-delay": 5000}
WINDOW = 16  # episodes in the moving mean of the return
ENTROPY_TARGET = 0.5 * math.log(15)


def run_name(task: str, size: str, seed: int) -> str:
    return f"{task}-{size}-seed{seed}"


def updates_at(env_steps: np.ndarray, data: dict) -> np.ndarray:
    """Updates trained once ``env_steps`` were taken (``TrainRatio``: one batch per
    ``batch_size * seq_len / train_ratio`` env steps after ``learning_starts``)."""
    per_update = data["batch_size"] * data["seq_len"] / data["train_ratio"]
    return np.maximum(0, np.floor((env_steps - data["learning_starts"]) / per_update)).astype(int)


def first_reach(x: np.ndarray, y: np.ndarray, reached) -> int | None:
    """The first ``x`` where ``reached(y)`` holds, or None."""
    hits = np.flatnonzero(reached(y))
    return int(x[hits[0]]) if len(hits) else None


def return_curve(episodes_csv: Path, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """(updates, moving mean of the latest ``WINDOW`` returns) at each episode's end from the ``WINDOW``-th."""
    rows = np.loadtxt(episodes_csv, delimiter=",", skiprows=1, ndmin=2)
    steps, returns = rows[:, 0], rows[:, 1]
    if len(returns) < WINDOW:
        return np.zeros(0, int), np.zeros(0)
    mean = np.convolve(returns, np.ones(WINDOW) / WINDOW, mode="valid")
    return updates_at(steps[WINDOW - 1:], data), mean


def entropy_curve(workdir: Path, run_dir: Path, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """(updates, actor entropy) from the run's MLflow record."""
    from mlflow.tracking import MlflowClient

    info = json.loads((run_dir / "mlflow_run.json").read_text())
    uri = info["tracking_uri"]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{workdir / uri[len('sqlite:///'):]}"
    history = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(info["run_id"], "actor/entropy"))
    steps = np.array([s for s, _ in history], float)
    return updates_at(steps, data), np.array([v for _, v in history])


def train(task: str, size: str, seed: int, updates: int, workdir: Path, extra: list[str], data: dict) -> Path:
    """Run (or resume) ``cli.py fit`` for one task, size and seed; returns its run directory."""
    name = run_name(task, size, seed)
    run_dir = workdir / name
    env_steps = data["learning_starts"] + int(math.ceil(updates * data["batch_size"] * data["seq_len"] / data["train_ratio"]))
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(CONFIG), "--data.game", task,
           "--model.size", size, "--data.seed", str(seed), "--seed_everything", str(seed),
           "--model.max_env_steps", str(env_steps), "--trainer.default_root_dir", str(run_dir), *extra]
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        cmd += ["--ckpt_path", "last"]
    elif run_dir.exists():
        cmd += ["--start_over", "true"]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    with open(workdir / f"{name}.log", "a") as log:
        rc = subprocess.call(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"{name}: cli.py fit exited with {rc}; see {workdir / (name + '.log')}")
    return run_dir


def measure(task: str, size: str, seed: int, updates: int, workdir: Path, extra: list[str], data: dict) -> dict:
    """Train one run to ``updates`` and read off when it reached each target."""
    run_dir = train(task, size, seed, updates, workdir, extra, data)
    env = SANITY_TASKS[task]
    half = env.OPTIMAL_RETURN / 2
    x, ret = return_curve(run_dir / "episodes_rank0.csv", data)
    xe, ent = entropy_curve(workdir, run_dir, data)
    return {
        "task": task, "size": size, "seed": seed, "updates": updates, "extra": extra,
        "optimal": env.OPTIMAL_RETURN, "random": env.RANDOM_RETURN,
        "updates_to_half_optimal": first_reach(x, ret, lambda r: r >= half),
        "updates_to_low_entropy": first_reach(xe, ent, lambda e: e < ENTROPY_TARGET),
        "final_return": float(ret[-1]) if len(ret) else None,
        "return_curve": [[int(a), round(float(b), 4)] for a, b in zip(x, ret)],
        "entropy_curve": [[int(a), round(float(b), 4)] for a, b in zip(xe, ent)],
    }


def summary(reached: list[int | None], budget: int) -> str:
    """'mean +- SE (n of m seeds)' over the seeds that reached, and which did not."""
    hit = [r for r in reached if r is not None]
    text = f"{len(hit)} of {len(reached)} seeds"
    if hit:
        mean, se = mean_se(hit)
        text = f"{mean:7.0f} +- {se:5.0f}  ({text}; {', '.join(map(str, hit))})"
    if len(hit) < len(reached):
        text += f"; {len(reached) - len(hit)} never within {budget}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TARGETS), choices=list(SANITY_TASKS))
    parser.add_argument("--sizes", nargs="+", default=["tiny"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--updates", type=int, default=None,
                        help="updates per run (default: the task's target, 2,000 or 5,000)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "sanity_learning",
                        help="where the runs live (MLflow store, run directories, logs)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sanity",
                        help="where each run's record (JSON) is written")
    args, extra = parser.parse_known_args()
    if extra and extra[0] == "--":
        extra = extra[1:]
    if any(not a.startswith("--") for a in extra[:1]):
        parser.error(f"unknown arguments {extra}; pass cli.py arguments after --")
    data = yaml.safe_load(CONFIG.read_text())["data"]
    for flag, value in zip(extra, extra[1:]):  # what the update rate depends on, as the runs get it
        key = flag.removeprefix("--data.")
        if flag.startswith("--data.") and key in ("batch_size", "seq_len", "train_ratio", "learning_starts", "num_envs"):
            data[key] = yaml.safe_load(value)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    records = []
    for task in args.tasks:
        budget = args.updates or TARGETS[task]
        for size in args.sizes:
            for seed in args.seeds:
                path = args.out / f"{run_name(task, size, seed)}.json"
                record = json.loads(path.read_text()) if path.exists() else None
                if record is None or record["updates"] < budget or record["extra"] != extra:
                    record = measure(task, size, seed, budget, args.workdir, extra, data)
                    path.write_text(json.dumps(record, indent=1) + "\n")
                records.append(record)
    print(f"\nupdates to half the optimal return / to entropy < 0.5 ln 15 = {ENTROPY_TARGET:.2f} "
          f"(batch {data['batch_size']} x {data['seq_len']}, train ratio {data['train_ratio']}, "
          f"{data['num_envs']} envs){' with ' + ' '.join(extra) if extra else ''}")
    for task in args.tasks:
        target = TARGETS[task]
        for size in args.sizes:
            rows = [r for r in records if r["task"] == task and r["size"] == size]
            budget = rows[0]["updates"]
            finals = ", ".join(f"{r['final_return']:.1f}" for r in rows if r["final_return"] is not None)
            print(f"{task:14s} {size:5s} target {target}: return {summary([r['updates_to_half_optimal'] for r in rows], budget)}")
            print(f"{'':26s}entropy {summary([r['updates_to_low_entropy'] for r in rows], budget)}")
            print(f"{'':26s}final return (last {WINDOW} episodes) {finals}; random "
                  f"{rows[0]['random']:.2f}, optimal {rows[0]['optimal']:.2f}")


if __name__ == "__main__":
    main()
