"""A real Procgen curve and the throughput of a whole fit on the GPU, in one device call: the real
``cli.py fit`` (collector, replay, CUDA-graphed update, checkpoints, run directory) on coinrun
(easy, 200 levels) until a deadline, then ``cli.py validate`` of its last checkpoint on training
and unseen levels. ``benchmarks/gpu_learn.sh`` runs it on the device (its carry brings procgen).

Prints: env steps, updates, env steps/s and updates/s over the whole fit (start-up and graph
capture included) and in its last minute, the share of wall time in the update, the training
return per 10k env steps, and validation's return +- SE beside the random policy and the best
constant action (measured here with ``benchmarks/policy_baselines.py``) and PPO's 250k-step point (published, labelled). No
threshold: an early curve and a throughput figure. Writes under ``--out``: ``episodes.csv`` (every
training episode), ``summary.json``, ``fit.log``, ``validate.log``; the picture is drawn elsewhere
from the CSV (``--plot``).

    python benchmarks/gpu_learn.py --device cuda --seconds 230    # what gpu_learn.sh runs
    python benchmarks/gpu_learn.py --device cpu --dry-run         # a few CPU updates, same path
    python benchmarks/gpu_learn.py --plot <out>/episodes.csv      # the curve as a PNG, here

Arguments after ``--`` go to the fit (``-- --model.world_model.downsample pool``); a knob that
cannot run in a CUDA graph is refused by ``cli.py`` in one line (``--model.optimizer.kind laprop``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.collector import mean_se  # noqa: E402

GAME, MODE, LEVELS = "coinrun", "easy", 200
# Size and envs for the most env steps per second: the update is most of the wall time at one
# update per 16 env steps (train ratio 64, batch 16 x 64, the recipe), and a CUDA-graphed update is
# bound by its kernels' sequence rather than their width below 12M (0.063 s at 12M on an H200,
# benchmarks/results/gpu/); 64 envs act in one batch for every 4 updates.
GPU_RUN = {
    "--model.size": "1M",
    "--model.cuda_graph": "true",
    "--trainer.accelerator": "gpu",
    "--trainer.precision": "32-true",
    "--data.num_envs": "64",
    "--data.test_num_envs": "64",
    "--data.batch_size": "16",
    "--data.seq_len": "64",
    "--data.train_ratio": "64",
    "--data.learning_starts": "4096",
    # on disk: a checkpoint of a RAM replay would carry every frame (1.2 GB per 100k steps) into
    # the save at the end and validate's load
    "--data.replay_storage": "memmap",
    "--data.replay_capacity": "500000",
    "--data.val_episodes": "128",
    "--model.max_env_steps": "5000000",  # not reached: --trainer.max_time stops the fit
}
# The CPU dry run: the same commands at a size and budget a test affords.
DRY_RUN = {
    "--model.size": "tiny",
    "--model.cuda_graph": "false",
    "--trainer.accelerator": "cpu",
    "--trainer.precision": "32-true",
    "--data.num_envs": "4",
    "--data.test_num_envs": "2",
    "--data.batch_size": "2",
    "--data.seq_len": "16",
    "--data.train_ratio": "2",  # one update per 16 env steps, as on the GPU
    "--data.learning_starts": "128",
    "--data.replay_storage": "memmap",
    "--data.replay_capacity": "4096",
    "--data.val_episodes": "2",
    "--model.max_env_steps": "5000000",  # not reached: --trainer.max_time stops it, as on the GPU
}
DRY_RUN_FIT_S = 15

# Figures to compare with (coinrun, easy, 200 training levels):
# the uniformly random policy and the best constant action (action 8), 256 episodes per split with
# benchmarks/policy_baselines.py (benchmarks/results/policy_baselines/coinrun-easy-200.txt): mean, SE
RANDOM = {"train_levels": (2.85, 0.28), "unseen_levels": (2.58, 0.27)}
BEST_CONSTANT = {"train_levels": (7.42, 0.27), "unseen_levels": (6.95, 0.29)}
# PPO on training levels after 250k env steps (openai/train-procgen, 3 seeds; ../shared/LEARNING_ANCHORS.md)
PPO_250K_TRAIN = 5.98
RESERVE_S = 75  # after fit: validate (start-up and two splits) and this summary
STARTUP_S = 30  # fit's own start-up before Lightning's timer runs (imports, CUDA, envs), and its checkpoint
CURVE_BIN = 10_000  # env steps per point of the return curve


def fit_command(run_dir: Path, settings: dict[str, str], seconds: int | None, extra: list[str] = ()) -> list[str]:
    command = [sys.executable, str(ROOT / "cli.py"), "fit", "--data.game", GAME, "--data.distribution_mode", MODE,
               "--data.num_levels", str(LEVELS),
               "--trainer.default_root_dir", str(run_dir),
               "--trainer.logger", "pytorch_lightning.loggers.CSVLogger",
               "--trainer.logger.save_dir", str(run_dir / "csv"), "--trainer.logger.name", "fit",
               "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "10",  # validate follows
               "--checkpoint.every_env_steps", "1000000", "--dream_pictures.enabled", "false",
               "--progress_bar.refresh_rate", "200"]
    for key, value in settings.items():
        command += [key, value]
    if seconds is not None:
        command += ["--trainer.max_time", f"00:00:{seconds // 60:02d}:{seconds % 60:02d}"]  # DD:HH:MM:SS
    return command + list(extra)


def validate_command(run_dir: Path, settings: dict[str, str], extra: list[str] = ()) -> list[str]:
    keep = ("--model.size", "--trainer.accelerator", "--trainer.precision", "--data.num_envs",
            "--data.test_num_envs", "--data.val_episodes", "--data.learning_starts")
    command = [sys.executable, str(ROOT / "cli.py"), "validate", "--data.game", GAME, "--data.distribution_mode",
               MODE, "--data.num_levels", str(LEVELS), "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
               "--trainer.default_root_dir", str(run_dir.with_name(run_dir.name + "-validate")),
               "--trainer.logger", "pytorch_lightning.loggers.CSVLogger",
               "--trainer.logger.save_dir", str(run_dir / "csv"), "--trainer.logger.name", "validate",
               "--dream_pictures.enabled", "false"]
    for key in keep:
        command += [key, settings[key]]
    return command + list(extra)  # the model's knobs, as the fit's


def run(command: list[str], log: Path, timeout: float) -> tuple[int, float]:
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, timeout=max(timeout, 1)).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - start


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def last_metrics(csv_dir: Path, name: str) -> list[dict[str, float]]:
    """The rows of the newest CSVLogger ``metrics.csv`` under ``csv_dir/name``, as floats."""
    versions = sorted((csv_dir / name).glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    rows = read_csv(versions[-1]) if versions else []
    return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in rows]


def return_curve(episodes: list[dict[str, str]]) -> list[tuple[int, int, float, float]]:
    """(bin start, episodes, mean return, SE) per ``CURVE_BIN`` env steps of episode ends."""
    bins: dict[int, list[float]] = {}
    for e in episodes:
        bins.setdefault(int(float(e["env_steps"])) // CURVE_BIN * CURVE_BIN, []).append(float(e["return"]))
    return [(start, len(v), *mean_se(v)) for start, v in sorted(bins.items())]


def summarise(run_dir: Path, fit_wall: float) -> dict:
    rows = last_metrics(run_dir / "csv", "fit")
    counters = [r for r in rows if "counters/updates" in r]
    perf = [r for r in rows if "perf/updates_per_s" in r]
    final = counters[-1] if counters else {}
    env_steps, updates = int(final.get("counters/env_steps", 0)), int(final.get("counters/updates", 0))
    summary = {
        "env_steps": env_steps, "updates": updates, "fit_wall_s": round(fit_wall, 1),
        "env_steps_per_s_whole_fit": round(env_steps / fit_wall, 1) if fit_wall else None,
        "updates_per_s_whole_fit": round(updates / fit_wall, 2) if fit_wall else None,
    }
    if perf:  # the steady rate: the windows (5 s or more each) of the last minute of logs
        recent = [r for r in perf if r["step"] >= perf[-1]["step"] - max(1, 60 * perf[-1]["perf/env_steps_per_s"])]
        summary["env_steps_per_s_last_minute"] = round(sum(r["perf/env_steps_per_s"] for r in recent) / len(recent), 1)
        summary["updates_per_s_last_minute"] = round(sum(r["perf/updates_per_s"] for r in recent) / len(recent), 2)
        shares = [r["perf/update_share"] for r in recent if "perf/update_share" in r]
        if shares:
            summary["update_share_of_wall_time"] = round(sum(shares) / len(shares), 3)
    episodes = read_csv(run_dir / "episodes_rank0.csv")
    summary["episodes"] = len(episodes)
    summary["return_curve"] = [dict(zip(("from_env_steps", "episodes", "return", "se"), point))
                               for point in return_curve(episodes)]
    validation = {}
    for row in last_metrics(run_dir / "csv", "validate"):
        for split in ("train_levels", "unseen_levels"):
            if f"val/{split}/return" in row:
                validation[split] = {"return": row[f"val/{split}/return"], "se": row.get(f"val/{split}/return_se"),
                                     "episodes": row.get(f"val/{split}/episodes")}
    summary["validation"] = validation
    return summary


def report(summary: dict, gpu_line: str) -> str:
    lines = [f"coinrun, {MODE}, {LEVELS} training levels; GPU command: {gpu_line}",
             f"env steps {summary['env_steps']}, updates {summary['updates']}, fit {summary['fit_wall_s']} s",
             f"whole fit (start-up and capture included): {summary['env_steps_per_s_whole_fit']} env steps/s, "
             f"{summary['updates_per_s_whole_fit']} updates/s",
             f"last minute: {summary.get('env_steps_per_s_last_minute')} env steps/s, "
             f"{summary.get('updates_per_s_last_minute')} updates/s, share of its wall time in the update "
             f"{summary.get('update_share_of_wall_time')}",
             f"training return per {CURVE_BIN // 1000}k env steps (episodes ending there; acting as it trains):"]
    for p in summary["return_curve"]:
        lines.append(f"  {p['from_env_steps']:>9,}+  {p['episodes']:>5} episodes  {p['return']:6.2f} +- {p['se']:.2f}")
    lines.append("validation (sampled actions):")
    for split in ("train_levels", "unseen_levels"):
        v = summary["validation"].get(split)
        (r_mean, r_se), (c_mean, c_se) = RANDOM[split], BEST_CONSTANT[split]
        if v is None:
            lines.append(f"  {split}: missing (validate did not finish; see validate.log)")
            continue
        se = f"{v['se']:.2f}" if v.get("se") is not None else "?"
        lines.append(f"  {split}: {v['return']:.2f} +- {se} ({int(v['episodes'] or 0)} episodes); random "
                     f"{r_mean:.2f} +- {r_se:.2f}, best constant action {c_mean:.2f} +- {c_se:.2f} "
                     "(benchmarks/policy_baselines.py)")
    lines.append(f"  PPO on training levels at 250k env steps (published, openai/train-procgen): {PPO_250K_TRAIN}")
    return "\n".join(lines)


def plot(episodes_csv: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = return_curve(read_csv(episodes_csv))
    x = [(p[0] + CURVE_BIN / 2) / 1000 for p in curve]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.errorbar(x, [p[2] for p in curve], yerr=[p[3] for p in curve], marker="o", label="DreamerV3 (this trainer)")
    ax.axhline(RANDOM["train_levels"][0], color="grey", ls="--", label="random")
    ax.axhline(BEST_CONSTANT["train_levels"][0], color="grey", ls=":", label="best constant action")
    ax.scatter([250], [PPO_250K_TRAIN], color="black", marker="x", label="PPO 250k (published)")
    ax.set_xlabel("env steps (k)")
    ax.set_ylabel("training return")
    ax.set_title(f"{GAME}, {MODE}, {LEVELS} levels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="the CPU settings (a few updates), for tests")
    parser.add_argument("--seconds", type=float, default=230, help="fit and validate together, from now")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_learn")))
    parser.add_argument("--workdir", type=Path, default=None, help="where the run directory goes (default: a temp dir)")
    parser.add_argument("--plot", type=Path, default=None, help="draw the curve of this episodes.csv and exit")
    parser.add_argument("extra", nargs="*", help="after --: more cli.py fit arguments")
    args = parser.parse_args(argv)
    if args.plot:
        png = args.plot.with_suffix(".png")
        plot(args.plot, png)
        print(png)
        return 0
    if args.device == "cpu" and not args.dry_run:
        print("error: --device cpu runs only with --dry-run (the GPU settings take hours on a CPU)", file=sys.stderr)
        return 2
    deadline = time.perf_counter() + args.seconds
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_learn-{os.getpid()}"
    run_dir = workdir / "runs" / f"{GAME}-gpu-learn"
    if run_dir.exists():
        print(f"error: {run_dir} exists; give another --workdir", file=sys.stderr)
        return 2
    gpu_line = shlex.join(["python", "cli.py", *fit_command(Path("<run>"), GPU_RUN, None, args.extra)[2:]])
    print(f"GPU command: {gpu_line}", flush=True)
    settings = DRY_RUN if args.dry_run else GPU_RUN
    fit_seconds = DRY_RUN_FIT_S if args.dry_run else int(args.seconds - RESERVE_S - STARTUP_S)
    if not args.dry_run and fit_seconds < 30:
        print(f"error: --seconds {args.seconds:g} leaves {fit_seconds} s to train; allowed: "
              f"{RESERVE_S + STARTUP_S + 30} or more", file=sys.stderr)
        return 2
    command = fit_command(run_dir, settings, fit_seconds, args.extra)
    print(f"running: {shlex.join(command[1:])}", flush=True)
    rc, fit_wall = run(command, args.out / "fit.log", deadline - time.perf_counter() - 45)  # validate's least
    print(f"fit: exit {rc} after {fit_wall:.0f} s", flush=True)
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        rc_val, val_wall = run(validate_command(run_dir, settings, args.extra), args.out / "validate.log",
                               deadline - time.perf_counter())
        print(f"validate: exit {rc_val} after {val_wall:.0f} s", flush=True)
    else:
        rc_val = None
        print("validate: skipped, fit wrote no checkpoint (see fit.log)")
    if (run_dir / "episodes_rank0.csv").is_file():
        shutil.copy(run_dir / "episodes_rank0.csv", args.out / "episodes.csv")
    summary = summarise(run_dir, fit_wall)
    summary.update({"fit_exit": rc, "validate_exit": rc_val, "settings": settings, "gpu_command": gpu_line})
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(report(summary, gpu_line))
    return 0 if rc == 0 and rc_val == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
