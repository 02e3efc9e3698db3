"""SequenceReplay invariants: contiguity, boundaries, wrap-around, memmap == RAM, state round trips."""

import numpy as np
import pytest

from datamodules.replay import SequenceReplay

OBS = (4, 4, 3)


def write(replay: SequenceReplay, steps: int, lanes=None, episode_len: int = 7, start=None):
    """Write ``steps`` steps to ``lanes``; step k of lane l has reward k and frame pixel (l, k % 256).

    Returns the per-lane step counter after writing.
    """
    lanes = np.arange(replay.num_lanes) if lanes is None else np.asarray(lanes)
    k = np.array(replay.count[lanes]) if start is None else np.asarray(start)
    for _ in range(steps):
        frames = np.zeros((len(lanes), *OBS), np.uint8)
        frames[:, 0, 0, 0] = lanes
        frames[:, 0, 0, 1] = k % 256
        is_first = k % episode_len == 0
        is_last = k % episode_len == episode_len - 1
        replay.add(frames, k % 15, k.astype(np.float32), is_first, is_last, is_last, lanes=lanes)
        k = k + 1
    return k


def check_sequences(batch, episode_len=7):
    step = batch["reward"].astype(np.int64)  # (B, T) the writer's step counter
    lane = batch["frames"][:, :, 0, 0, 0]
    assert (np.diff(step, axis=1) == 1).all(), "a sequence skipped or repeated a step"
    assert (lane == lane[:, :1]).all(), "a sequence mixed lanes"
    np.testing.assert_array_equal(batch["frames"][:, :, 0, 0, 1], step % 256)
    np.testing.assert_array_equal(batch["action"], step % 15)
    np.testing.assert_array_equal(batch["is_first"], step % episode_len == 0)
    np.testing.assert_array_equal(batch["is_last"], step % episode_len == episode_len - 1)
    np.testing.assert_array_equal(batch["is_terminal"], batch["is_last"])
    return step, lane


def test_sequences_are_contiguous_and_carry_episode_boundaries():
    r = SequenceReplay(1000, 4, OBS, seed=0)
    write(r, 100)
    b = r.sample(256, 20)
    assert b["frames"].shape == (256, 20, *OBS) and b["frames"].dtype == np.uint8
    step, lane = check_sequences(b)
    assert b["is_first"][:, 1:].any(), "sequences should cross episode boundaries"
    assert step.max() < 100


def test_never_samples_unwritten_slots():
    r = SequenceReplay(400, 2, OBS, seed=1)
    write(r, 30, lanes=[0])
    assert not r.can_sample(31) and r.can_sample(30)
    with pytest.raises(ValueError, match="longest lane holds 30"):
        r.sample(1, 31)
    step, lane = check_sequences(r.sample(500, 10))
    assert (lane == 0).all() and step.max() < 30 and step.min() == 0


def test_wrap_around_keeps_only_the_newest_steps_and_never_crosses_the_head():
    r = SequenceReplay(2 * 50, 2, OBS, seed=2)
    write(r, 173)
    assert len(r) == 100
    step, _ = check_sequences(r.sample(2000, 12))
    assert step.min() == 173 - 50 and step.max() == 172
    # physical wrap: some sequences start before slot 49 and continue at slot 0
    assert ((step[:, 0] % 50) > (step[:, -1] % 50)).any()


def test_sampling_is_uniform_over_valid_starts():
    r = SequenceReplay(3 * 100, 3, OBS, seed=3)
    write(r, 100, lanes=[0])
    write(r, 40, lanes=[1])
    write(r, 5, lanes=[2])  # too short for T = 10: never sampled
    b = r.sample(60_000, 10)
    step, lane = check_sequences(b)
    starts = np.bincount(lane[:, 0] * 100 + step[:, 0], minlength=300)
    valid = np.r_[np.ones(91), np.zeros(9), np.ones(31), np.zeros(69), np.zeros(100)].astype(bool)
    assert (starts[~valid] == 0).all()
    expected = 60_000 / valid.sum()
    # each count is Binomial(60000, 1/122): sd ~ 22; 6 sd bounds
    assert np.abs(starts[valid] - expected).max() < 6 * np.sqrt(expected)


def test_memmap_equals_ram(tmp_path):
    ram = SequenceReplay(300, 3, OBS, seed=4)
    disk = SequenceReplay(300, 3, OBS, storage="memmap", directory=tmp_path / "replay", seed=4,
                          release_every_bytes=1000)
    for r in (ram, disk):
        write(r, 250)
        write(r, 17, lanes=[2, 0])
    for _ in range(3):
        a, b = ram.sample(64, 16), disk.sample(64, 16)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_bytes_per_step_close_to_one_frame():
    r = SequenceReplay(1600, 16, (64, 64, 3))
    assert r.bytes_per_step <= 1.02 * 64 * 64 * 3


def test_ram_state_round_trip():
    a = SequenceReplay(600, 3, OBS, seed=5)
    write(a, 260)
    state = a.state_dict()
    b = SequenceReplay(600, 3, OBS, seed=99)
    b.load_state_dict(state)
    for _ in range(2):
        x, y = a.sample(32, 8), b.sample(32, 8)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_ram_state_holds_only_written_slots_and_resumes_writing_identically():
    a = SequenceReplay(3000, 3, OBS, seed=5)
    write(a, 40, lanes=[0, 1])
    write(a, 25, lanes=[2])
    state = a.state_dict()
    assert state["data"]["frames"].shape == (3, 40, *OBS) and state["data"]["reward"].shape == (3, 40)
    b = SequenceReplay(3000, 3, OBS, seed=99)
    write(b, 900)  # stale steps that the restored state must not keep
    b.load_state_dict(state)
    for k in a.data:
        np.testing.assert_array_equal(a.data[k], b.data[k])
    for replay in (a, b):
        write(replay, 1200)  # wraps every lane (1000 slots each)
    for _ in range(2):
        x, y = a.sample(32, 8), b.sample(32, 8)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for k in a.data:
        np.testing.assert_array_equal(a.data[k], b.data[k])


def test_memmap_resume_after_a_crash_drops_steps_written_after_the_checkpoint(tmp_path):
    d = tmp_path / "replay"
    a = SequenceReplay(2 * 60, 2, OBS, storage="memmap", directory=d, seed=6)
    write(a, 100)
    state = a.state_dict()  # the checkpoint: 100 steps per lane, newest 60 kept
    write(a, 25)  # written after it, then the process "dies" without another checkpoint
    del a
    b = SequenceReplay(2 * 60, 2, OBS, storage="memmap", directory=d, seed=0)
    b.load_state_dict(state)
    # valid: steps 65..99 (the 35 the later writes did not overwrite)
    assert len(b) == 2 * 35
    step, _ = check_sequences(b.sample(3000, 5))
    assert step.min() == 65 and step.max() == 99
    # writing continues at step 100, contiguous with the checkpointed steps
    write(b, 10, start=[100, 100])
    step, _ = check_sequences(b.sample(3000, 20))
    assert step.max() == 109 and step.min() == 65 and len(b) == 2 * 45


def test_memmap_refuses_files_of_another_shape_or_older_than_the_checkpoint(tmp_path):
    d = tmp_path / "replay"
    a = SequenceReplay(100, 2, OBS, storage="memmap", directory=d)
    write(a, 10)
    with pytest.raises(ValueError, match="holds a replay of shape"):
        SequenceReplay(200, 2, OBS, storage="memmap", directory=d)
    state = a.state_dict()
    other = SequenceReplay(100, 2, OBS, storage="memmap", directory=tmp_path / "other")
    with pytest.raises(ValueError, match="fewer steps"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="storage"):
        SequenceReplay(100, 2, OBS).load_state_dict(state)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="'ram' or 'memmap'"):
        SequenceReplay(100, 2, OBS, storage="disk")
    with pytest.raises(ValueError, match="at least the number of lanes"):
        SequenceReplay(1, 2, OBS)
    with pytest.raises(ValueError, match="needs a directory"):
        SequenceReplay(100, 2, OBS, storage="memmap")
    r = SequenceReplay(100, 2, OBS)
    with pytest.raises(ValueError, match="must not repeat"):
        write(r, 1, lanes=[0, 0])
