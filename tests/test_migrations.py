"""Checkpoints written before the goal framework became an extension restore and resume today.

``tests/fixtures/pre_goal_split_runs.tar.xz`` holds two runs written by commit fc70edc, when one
Dreamer class carried the goal model, the goal matcher and its optimiser in every run (made by
``tests/fixtures/make_pre_goal_split_runs.sh``): ``starpilot-tiny-seed0``, ``configs/learn_starpilot.yaml``
shrunk to 272 env steps (plain DreamerV3, its RAM replay inside the checkpoint), and
``coinrun-tiny-seed0``, ``configs/smoke.yaml`` with ``configs/dreams.yaml`` (the dream callbacks, a
memmap replay beside the checkpoint), 272 env steps; both of a tiny model made smaller (``SMALLER``)
to keep the file small.
"""

import shutil
import tarfile

import pytest
import torch
from clirun import ROOT, SMOKE, cli

from dreamer.agent import Dreamer
from dreamer.checkpoints import read_checkpoint, restore_agent
from dreamer.goals import GoalDreamer
from dreamer.migrations import GOAL_PREFIXES, agent_class_path, upgrade

FIXTURE = ROOT / "tests" / "fixtures" / "pre_goal_split_runs.tar.xz"
PLAIN, DREAMS = "starpilot-tiny-seed0", "coinrun-tiny-seed0"
SMALLER = "{deter: 16, hidden: 16, depth: 2, units: 16}"


@pytest.fixture(scope="module")
def old_runs(tmp_path_factory):
    where = tmp_path_factory.mktemp("old")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(where, filter="data")
    return where


def last(root, name):
    return root / "runs" / name / "checkpoints" / "last.ckpt"


def test_old_checkpoints_restore_into_the_class_that_fits_them(old_runs):
    plain, dreams = read_checkpoint(last(old_runs, PLAIN)), read_checkpoint(last(old_runs, DREAMS))
    # both were written with the goal tensors and four optimiser states
    for ckpt in (plain, dreams):
        assert any(k.startswith(GOAL_PREFIXES) for k in ckpt["state_dict"]) and len(ckpt["optimizer_states"]) == 4
    assert agent_class_path(plain) == "dreamer.agent.Dreamer"
    assert agent_class_path(dreams) == "dreamer.goals.agent.GoalDreamer"
    agent = restore_agent(read_checkpoint(last(old_runs, PLAIN)))
    assert type(agent) is Dreamer and not any(k.startswith(GOAL_PREFIXES) for k in agent.state_dict())
    assert torch.equal(agent.world_model.encoder.state_dict()[next(iter(agent.world_model.encoder.state_dict()))],
                       plain["state_dict"][f"world_model.encoder.{next(iter(agent.world_model.encoder.state_dict()))}"])
    goal_agent = restore_agent(read_checkpoint(last(old_runs, DREAMS)))
    assert type(goal_agent) is GoalDreamer
    assert torch.equal(goal_agent.goal_model.bank_start, dreams["state_dict"]["goal_model.bank_start"])


def test_the_upgrade_drops_the_goal_part_only_for_a_plain_dreamer(old_runs):
    ckpt = read_checkpoint(last(old_runs, PLAIN))
    before = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(GOAL_PREFIXES)}
    upgrade(Dreamer(size="tiny", overrides=ckpt["hyper_parameters"]["overrides"]), ckpt)
    assert ckpt["state_dict"].keys() == before.keys() and len(ckpt["optimizer_states"]) == 3
    ckpt = read_checkpoint(last(old_runs, DREAMS))
    keys = set(ckpt["state_dict"])
    upgrade(GoalDreamer(size="tiny", overrides=ckpt["hyper_parameters"]["overrides"]), ckpt)
    assert set(ckpt["state_dict"]) == keys and len(ckpt["optimizer_states"]) == 4


def test_an_old_plain_run_resumes_with_its_replay_and_drops_the_goal_part(old_runs, tmp_path):
    shutil.copytree(old_runs / "runs" / PLAIN, tmp_path / "runs" / PLAIN)
    before = read_checkpoint(last(tmp_path, PLAIN))
    out = cli(tmp_path, "fit", "--config", str(ROOT / "configs" / "learn_starpilot.yaml"), "--model.size", "tiny",
              "--model.overrides", SMALLER, "--model.max_env_steps", "336", "--data.num_envs", "4", "--data.test_num_envs", "2",
              "--data.learning_starts", "256", "--data.replay_capacity", "2048", "--data.batch_size", "4",
              "--data.seq_len", "16", "--data.val_episodes", "2", "--checkpoint.every_env_steps", "256",
              "--dream_pictures.enabled", "false", "--trainer.logger", "false", "--ckpt_path", "last")
    assert "done: 336 env steps" in out.stdout
    after = read_checkpoint(last(tmp_path, PLAIN))
    assert after["dreamer"]["agent_class"] == "dreamer.agent.Dreamer"
    assert not any(k.startswith(GOAL_PREFIXES) for k in after["state_dict"]) and len(after["optimizer_states"]) == 3
    assert after["dreamer"]["updates"] > before["dreamer"]["updates"]
    replay_before, replay_after = before["ReplayDataModule"]["replay"], after["ReplayDataModule"]["replay"]
    assert int(replay_after["size"].sum()) == int(replay_before["size"].sum()) + 336 - 272  # went on from the saved one
    assert after["ReplayDataModule"]["episodes"] >= before["ReplayDataModule"]["episodes"]


def test_an_old_dreams_run_resumes_as_a_goal_dreamer_with_its_memmap_replay(old_runs, tmp_path):
    shutil.copytree(old_runs / "runs" / DREAMS, tmp_path / "runs" / DREAMS)
    before = read_checkpoint(last(tmp_path, DREAMS))
    out = cli(tmp_path, "fit", "--config", SMOKE, "--config", str(ROOT / "configs" / "dreams.yaml"),
              "--model.overrides", SMALLER, "--model.max_env_steps", "336", "--model.goals.rollouts", "2",
              "--data.replay_storage", "memmap",
              "--data.replay_capacity", "1024", "--data.val_episodes", "2", "--dream_pictures.enabled", "false", "--trainer.logger", "false",
              "--ckpt_path", "last")
    assert "done: 336 env steps" in out.stdout
    after = read_checkpoint(last(tmp_path, DREAMS))
    assert after["dreamer"]["agent_class"] == "dreamer.goals.agent.GoalDreamer"
    assert len(after["optimizer_states"]) == 4 and after["dreamer"]["updates"] > before["dreamer"]["updates"]
    # the goal model went on following training from its saved statistics
    assert not torch.equal(after["state_dict"]["goal_model.mean"], before["state_dict"]["goal_model.mean"])
    assert any(k.startswith("DreamGeneration") for k in after["callbacks"])
    # the same run resumed with the plain config is refused in one line, before anything is built
    plain = cli(tmp_path, "fit", "--config", SMOKE, "--model.overrides", SMALLER, "--model.max_env_steps", "512", "--data.replay_storage", "memmap",
                "--data.replay_capacity", "1024", "--trainer.logger", "false", "--ckpt_path", "last", check=False)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines()[-1].startswith(
        "error: checkpoint runs/coinrun-tiny-seed0/checkpoints/last.ckpt does not match this run; model class: "
        "checkpoint GoalDreamer")
