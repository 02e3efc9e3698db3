"""The GPU learning call (benchmarks/gpu_learn.sh) on the CPU: a few updates through the same fit,
validate and summary, and the GPU command line it would run, so the call cannot rot between the
days a GPU is lent."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_learn_dry_run_trains_validates_and_prints_the_gpu_command(tmp_path):
    env = {**os.environ, "GPU_LEARN_DEVICE": "cpu", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "TMPDIR": str(tmp_path)}
    # the newest reference's encoder and decoder (issue 36's knobs) go through to the fit
    knobs = ["--model.world_model.downsample", "pool", "--model.world_model.upsample", "nearest"]
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_learn.sh"), *knobs], capture_output=True,
                          text=True, env=env, timeout=600)
    out = done.stdout
    assert done.returncode == 0 and "status 0" in out, out[-4000:] + done.stderr[-2000:]
    gpu = next(line for line in out.splitlines() if line.startswith("GPU command: "))
    args = shlex.split(gpu.removeprefix("GPU command: "))
    option = dict(zip(args[3::2], args[4::2]))  # python cli.py fit --key value ...
    assert args[:3] == ["python", "cli.py", "fit"]
    assert option["--model.cuda_graph"] == "true" and option["--trainer.accelerator"] == "gpu"
    assert option["--data.train_ratio"] == "64" and option["--model.size"] == "1M"
    assert (option["--data.batch_size"], option["--data.seq_len"]) == ("16", "64")
    assert option["--data.game"] == "coinrun" and option["--data.num_levels"] == "200"
    assert option["--trainer.logger"].endswith("CSVLogger")
    assert (option["--model.world_model.downsample"], option["--model.world_model.upsample"]) == ("pool", "nearest")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"fit.log", "gpu_learn.txt", "summary.json", "validate.log"} <= files <= \
        {"episodes.csv", "fit.log", "gpu_learn.txt", "summary.json", "validate.log"}, files
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # stopped by --trainer.max_time, as on the GPU: 128 random env steps, then one update per 16
    updates, env_steps = summary["updates"], summary["env_steps"]
    assert updates >= 1 and abs(env_steps - (128 + 16 * updates)) <= 16, (updates, env_steps)
    assert summary["fit_exit"] == 0 and summary["validate_exit"] == 0
    for split in ("train_levels", "unseen_levels"):
        v = summary["validation"][split]
        assert v["episodes"] == 2 and 0 <= v["return"] <= 10 and v["se"] >= 0
    assert f"env steps {env_steps}, updates {updates}" in out and "random " in out and "PPO on training levels" in out
    # the run the fit wrote took the knobs
    config = yaml.safe_load(next(tmp_path.glob("gpu_learn-*/runs/coinrun-gpu-learn/config.yaml")).read_text())
    wm = config["model"]["init_args"]["world_model"]
    assert (wm["downsample"], wm["upsample"]) == ("pool", "nearest")


def test_a_knob_that_cannot_run_in_a_cuda_graph_is_refused_in_one_line(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_learn import GPU_RUN, fit_command

    command = fit_command(tmp_path / "run", GPU_RUN, 60, ["--model.optimizer.kind", "laprop"])
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip() and line != "Seed set to 0"]  # Lightning's
    assert len(lines) == 1 and lines[0].startswith("error: model.cuda_graph") and "laprop" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_the_return_curve_bins_episodes_by_10k_env_steps_with_their_standard_error(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_learn import plot, return_curve

    episodes = [{"env_steps": s, "return": r} for s, r in
                ((500, 0.0), (9_999, 10.0), (10_000, 10.0), (19_000, 10.0), (25_000, 0.0))]
    curve = return_curve(episodes)
    assert [c[:3] for c in curve] == [(0, 2, 5.0), (10_000, 2, 10.0), (20_000, 1, 0.0)]
    assert curve[0][3] == 5.0 and curve[1][3] == 0.0  # sd 7.07 / sqrt 2; no spread
    csv_path = tmp_path / "episodes.csv"
    csv_path.write_text("env_steps,return\n" + "".join(f"{e['env_steps']},{e['return']}\n" for e in episodes))
    plot(csv_path, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_the_summary_reads_counters_rates_share_and_validation_from_the_csv_logs(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_learn import summarise

    fit = tmp_path / "csv" / "fit" / "version_0"
    fit.mkdir(parents=True)
    # perf windows at env steps 1,000 (early, outside the last minute) and 9,000 / 10,000; counters at the end
    fit.joinpath("metrics.csv").write_text(
        "counters/env_steps,counters/updates,perf/env_steps_per_s,perf/update_share,perf/updates_per_s,step\n"
        ",,10,0.2,1,1000\n,,100,0.8,6,9000\n,,120,0.6,8,10000\n10400,400,,,,10400\n")
    validate = tmp_path / "csv" / "validate" / "version_0"
    validate.mkdir(parents=True)
    validate.joinpath("metrics.csv").write_text(
        "step,val/train_levels/episodes,val/train_levels/return,val/train_levels/return_se,"
        "val/unseen_levels/episodes,val/unseen_levels/return,val/unseen_levels/return_se\n"
        "10400,128,6.5,0.4,128,5.0,0.45\n")
    (tmp_path / "episodes_rank0.csv").write_text("env_steps,return\n5000,10\n9000,0\n")
    summary = summarise(tmp_path, fit_wall=200.0)
    assert (summary["env_steps"], summary["updates"]) == (10400, 400)
    assert (summary["env_steps_per_s_whole_fit"], summary["updates_per_s_whole_fit"]) == (52.0, 2.0)
    # the last minute at 120 env steps/s reaches back 7,200 steps: the windows at 9,000 and 10,000
    assert summary["env_steps_per_s_last_minute"] == 110.0 and summary["updates_per_s_last_minute"] == 7.0
    assert summary["update_share_of_wall_time"] == 0.7
    assert summary["return_curve"] == [{"from_env_steps": 0, "episodes": 2, "return": 5.0, "se": 5.0}]
    assert summary["validation"]["unseen_levels"] == {"return": 5.0, "se": 0.45, "episodes": 128.0}


def test_the_update_clock_sums_the_time_inside_updates_and_starts_again_at_each_take():
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from callbacks.training import UpdateClock

    clock = UpdateClock()
    for _ in range(2):
        clock.start(torch.device("cpu"))
        time.sleep(0.05)
        clock.stop()
        time.sleep(0.05)  # outside the update: not counted
    inside = clock.take()
    assert 0.1 <= inside < 0.15, inside
    assert clock.take() == 0.0
