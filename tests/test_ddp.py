"""Two CPU processes (gloo) under Lightning's DDP, with the dream callbacks on."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clirun import ROOT, SMOKE, SMOKE_CKPT, cli, load

DDP = ["--config", SMOKE, "--config", str(ROOT / "configs" / "dreams.yaml"),
       "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]


def dump_args(directory: Path) -> list[str]:
    return ["--trainer.callbacks+=ddp_probe.RankDump", "--trainer.callbacks.directory", str(directory)]


def ranks(directory: Path) -> tuple[dict, dict]:
    return tuple(torch.load(directory / f"rank{r}.pt", weights_only=False) for r in (0, 1))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ddp")
    out = cli(cwd, "fit", *DDP, "--model.max_env_steps", "640", *dump_args(cwd / "dump"),
              timeout=600, extra_path=[ROOT / "tests"])
    return cwd, out


def test_every_parameter_is_identical_on_both_ranks(ddp_run):
    cwd, out = ddp_run
    r0, r1 = ranks(cwd / "dump")
    assert r0["world_size"] == 2 and r0["updates"] == r1["updates"] > 20
    for name, value in r0["state_dict"].items():
        if name.startswith("goal_model.bank"):
            continue  # each rank's own replayed goal pairs
        assert torch.equal(value, r1["state_dict"][name]), name
    # the matcher and the actor were trained (in the callbacks too), not left at their start
    ckpt = load(cwd / SMOKE_CKPT)
    assert len(ckpt["optimizer_states"]) == 4 and ckpt["optimizer_states"][3]["state"]


def test_env_step_counters_add_up_over_ranks(ddp_run):
    cwd, out = ddp_run
    r0, r1 = ranks(cwd / "dump")
    assert r0["env_steps"] + r1["env_steps"] == r0["total_env_steps"] == 640
    # learning_starts (256) counts both ranks' steps: each acts at random for 128, then one update
    # per 2 of its steps (batch 4 x 16, train ratio 32) up to 320: about 96 updates (32 if each waited for 256)
    assert 90 <= r0["updates"] <= 97, r0["updates"]
    assert "done: 640 env steps" in out.stdout
    ckpt = load(cwd / SMOKE_CKPT)
    state = ckpt["ReplayDataModule"]
    assert state["world_size"] == 2
    for r in (0, 1):  # every rank's replay is saved beside the checkpoint
        saved = torch.load(cwd / "runs" / "coinrun-tiny-seed0" / "replay" / f"rank{r}" / state["rank_state"],
                           weights_only=True)
        assert saved["env_steps"] == 320
        assert torch.equal(saved["replay"]["count"], [r0, r1][r]["replay_count"])
    # rank 0 held the run's lock (the other rank never took it, or it would have been refused)
    assert (cwd / "runs" / ".coinrun-tiny-seed0.lock").read_text().startswith("process ")
    rng = ckpt["dreamer"]["rng_per_rank"]  # each rank its own stream
    assert len(rng) == 2 and not torch.equal(rng[0]["cpu"], rng[1]["cpu"])


def test_validation_plays_both_level_sets_split_over_ranks(ddp_run):
    _, out = ddp_run
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if line.startswith(("train_levels", "unseen_levels"))}
    assert set(rows) == {"train_levels", "unseen_levels"}
    # val_episodes 4 over 2 ranks: 2 each, rounded up to one episode per env (4 test envs per
    # rank), summed over ranks
    assert float(rows["unseen_levels"][4]) == float(rows["train_levels"][4]) == 8.0


def test_world_model_probe_reads_rank_0s_replay_of_a_ddp_checkpoint(ddp_run):
    cwd, _ = ddp_run
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "world_model_probe.py"), str(SMOKE_CKPT),
                          "--batches", "2"], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines()[1:] if line and line[0] in " -0123456789"]
    assert sum(int(r[1]) for r in rows if len(r) == 3) == 2 * 16 * 32


def test_resume_needs_the_same_number_of_ranks(ddp_run):
    cwd, _ = ddp_run
    out = cli(cwd, "fit", "--config", SMOKE, "--config", str(ROOT / "configs" / "dreams.yaml"),
              "--model.max_env_steps", "768", "--ckpt_path", "last", check=False)
    assert out.returncode != 0
    assert "written by 2 rank(s)" in out.stderr and "--trainer.devices 2" in out.stderr
    # validation needs no replay, so one process may evaluate a 2-rank checkpoint
    out = cli(cwd, "validate", "--config", SMOKE, "--config", str(ROOT / "configs" / "dreams.yaml"),
              "--ckpt_path", str(cwd / SMOKE_CKPT))
    assert any(line.startswith("unseen_levels") for line in out.stdout.splitlines())
    out = cli(cwd, "fit", *DDP, "--model.max_env_steps", "768", "--ckpt_path", "last",
              "--trainer.limit_val_batches", "0",  # validation is tested on the first run
              *dump_args(cwd / "dump2"), timeout=600, extra_path=[ROOT / "tests"])
    r0, r1 = ranks(cwd / "dump2")
    assert r0["env_steps"] == r1["env_steps"] == 384 and r0["total_env_steps"] == 768
    old = ranks(cwd / "dump")
    assert r0["updates"] > old[0]["updates"]
    for name, value in r0["state_dict"].items():
        if not name.startswith("goal_model.bank"):
            assert torch.equal(value, r1["state_dict"][name]), name
