"""ReplayDataModule: train-ratio accounting, what it writes to replay, acting, Lightning, state."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from datamodules.replay_datamodule import ReplayDataModule


def small_dm(**kw):
    args = dict(game="coinrun", num_envs=4, num_levels=10, batch_size=2, seq_len=8,
                train_ratio=4.0, learning_starts=64, replay_capacity=4 * 2000)
    args.update(kw)
    dm = ReplayDataModule(**args)
    dm.setup("fit")
    return dm


def test_train_ratio_accounting_over_many_batches():
    dm = small_dm(num_envs=4, batch_size=2, seq_len=8, train_ratio=4.0, learning_starts=64)
    per_batch = 2 * 8 / 4.0  # env steps per batch
    for k in range(300):
        dm.next_batch()
        needed = 64 + int(np.ceil(k * per_batch))
        assert needed <= dm.env_steps < needed + dm.hparams.num_envs, (k, dm.env_steps)
    assert dm.train_ratio.served == 300
    # replayed steps / env steps after prefill converges to the ratio
    replayed = 300 * 2 * 8
    assert replayed / (dm.env_steps - 64) == pytest.approx(4.0, rel=0.02)


def test_fractional_ratio_collects_several_vector_steps_per_batch():
    dm = small_dm(num_envs=4, batch_size=2, seq_len=8, train_ratio=0.5, learning_starts=0)
    dm.next_batch()
    dm.next_batch()
    assert dm.env_steps == 32  # 16 / 0.5 env steps per batch; first batch needs only seq_len steps


def lane_steps(dm, lane):
    """Every stored step of ``lane`` in time order (the ring has not wrapped in these tests)."""
    r = dm.replay
    n = int(r.count[lane])
    d = {k: v[lane, :n] for k, v in r.data.items()}
    return d


def test_replay_holds_terminal_steps_and_episode_returns():
    dm = small_dm(num_envs=4, learning_starts=10**9)
    dm.collector.collect(dm.policy, 1900)
    episodes = dm.collector.pop_episodes()
    assert len(episodes) >= 6 and dm.collector.episodes == len(episodes)
    stored_returns = []
    for lane in range(4):
        d = lane_steps(dm, lane)
        first = (d["flags"] & 1) > 0
        last = (d["flags"] & 2) > 0
        terminal = (d["flags"] & 4) > 0
        assert first[0]
        ends = np.flatnonzero(last)
        for e in ends:
            # the extra terminal step repeats the episode's last frame, has no action, and the
            # next episode's first frame follows it
            np.testing.assert_array_equal(d["frames"][e], d["frames"][e - 1])
            assert d["action"][e] == 0 and not first[e]
            if e + 1 < len(first):
                assert first[e + 1] and d["reward"][e + 1] == 0
        starts = np.flatnonzero(first)
        for s, e in zip(starts, ends):
            stored_returns.append(d["reward"][s : e + 1].sum())
            # coinrun: +10 only on completing the level, which terminates the episode; dying also
            # terminates it (reward 0); only the 1000-step timeout leaves it non-terminal
            if d["reward"][e] > 0:
                assert terminal[e]
            assert terminal[e] or e - s == 1000
            assert (d["reward"][s:e] == 0).all()
        assert first.sum() == len(ends) + 1  # every episode but the running one has ended
    assert sorted(stored_returns) == sorted(e["return"] for e in episodes)
    assert {e["level_complete"] for e in episodes} <= {0.0, 1.0}
    assert all(0 <= e["level_seed"] < 10 for e in episodes)


class ConstantActor(pl.LightningModule):
    """Acts with a fixed action and records what the DataModule gave it."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.calls = []
        self.batches = []
        self.automatic_optimization = False

    def act(self, obs, is_first, state, reward=None):
        assert obs.dtype == torch.uint8 and obs.shape[1:] == (64, 64, 3)
        assert state is None or state == len(self.calls) - 1
        self.calls.append(is_first.clone())
        return torch.full((len(obs),), 3), len(self.calls) - 1

    def training_step(self, batch, batch_idx):
        self.batches.append({k: (v.shape, v.dtype) for k, v in batch.items()})
        self.optimizers().step()  # manual optimisation: global_step counts optimiser steps

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_acts_with_the_attached_module_after_learning_starts_under_lightning(tmp_path):
    dm = ReplayDataModule(game="coinrun", num_envs=4, num_levels=10, batch_size=3, seq_len=8,
                          train_ratio=8.0, learning_starts=40, replay_capacity=4 * 500)
    model = ConstantActor()
    trainer = pl.Trainer(max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert len(model.batches) == 20
    assert model.batches[0]["obs"] == (torch.Size([3, 8, 64, 64, 3]), torch.uint8)
    assert model.batches[0]["action"] == (torch.Size([3, 8]), torch.int64)
    assert dm.train_ratio.served == 21  # Lightning fetches one batch ahead of the step it runs
    # a checkpoint counts the 20 batches trained on: a resume serves the fetched 21st again
    assert dm.state_dict()["batches_served"] == 20
    # random before learning_starts (40 env steps = 10 vector steps), the module after
    r = dm.replay
    acting_steps = (r.data["flags"][:, : int(r.count.min())] & 2) == 0
    actions = r.data["action"][:, : int(r.count.min())]
    assert (actions[:, :10][acting_steps[:, :10]] != 3).any()
    assert (actions[:, 11:][acting_steps[:, 11:]] == 3).all()
    assert len(model.calls) == dm.env_steps // 4 - 10


def test_state_round_trip_restores_counters_and_replay():
    a = small_dm(learning_starts=32)
    for _ in range(40):
        a.next_batch()
    state = a.state_dict()
    b = small_dm(learning_starts=32, seed=123)
    b.load_state_dict(state)
    assert (b.env_steps, b.collector.episodes, b.train_ratio.served) == (a.env_steps, a.collector.episodes, a.train_ratio.served)
    assert list(b.collector.recent_episodes) == list(a.collector.recent_episodes)
    x, y = a.replay.sample(8, 8), b.replay.sample(8, 8)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    # collection resumes from fresh episodes: the next written step of every lane is a first step
    counts = b.replay.count.copy()
    b.collector.collect(b.policy, 1)
    np.testing.assert_array_equal(b.replay.data["flags"][np.arange(4), counts % b.replay.lane_capacity] & 1, 1)


def test_memmap_storage_lives_in_the_replay_dir_per_rank(tmp_path):
    dm = small_dm(replay_storage="memmap", replay_dir=str(tmp_path / "rp"))
    dm.next_batch()
    assert (tmp_path / "rp" / "rank0" / "frames.bin").exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch_size"),
    (dict(train_ratio=0), "train_ratio"),
    (dict(learning_starts=-1), "learning_starts"),
    (dict(replay_storage="s3"), "replay_storage"),
    (dict(replay_capacity=16, num_envs=4, seq_len=8), "fewer than seq_len"),
    (dict(num_envs=0), "data.num_envs must be an integer >= 1, got 0"),
    (dict(val_episodes=0), "data.val_episodes must be an integer >= 1"),
    (dict(test_num_envs=0), "data.test_num_envs must be an integer >= 1"),
    (dict(game="pong"), "unknown game 'pong'"),
    (dict(replay_storage="memmap", replay_dir="/proc/replay"), "lies in /proc"),
])
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReplayDataModule(**kwargs)


def test_a_resume_with_another_replay_layout_is_refused_before_any_file_is_opened():
    saved = {"replay": {"storage": "ram", "num_lanes": 4, "lane_capacity": 2048}}
    hp = dict(replay_storage="ram", num_envs=4, replay_capacity=8192)
    assert ReplayDataModule.resume_problem(saved, hp) is None
    assert "resume with --data.replay_storage ram" in ReplayDataModule.resume_problem(
        saved, {**hp, "replay_storage": "memmap"})
    assert "resume with --data.num_envs 4 --data.replay_capacity 8192" in ReplayDataModule.resume_problem(
        saved, {**hp, "num_envs": 8})
    assert ReplayDataModule.resume_problem({"world_size": 2, "rank_state": "x"}, hp) is None
