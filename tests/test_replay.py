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


# --------------------------------------------------------------------------- replay context
LATENTS = {"deter": 5, "stoch": 3}


def test_stored_latents_come_back_with_the_steps_they_were_stored_for():
    replay = SequenceReplay(2 * 40, 2, obs_shape=OBS, seed=0, latents=LATENTS)
    write(replay, 30)
    batch = replay.sample(6, 8)
    assert not batch["has_latent"].any()  # nothing stored yet
    step = batch["step"]
    deter = (batch["lane"][:, None, None] * 100 + step[..., None] + np.arange(5) / 10).astype(np.float32)
    stoch = (step[..., None] + np.arange(3)) % 7
    assert replay.store_latents(batch["lane"], step, deter, stoch) == step.size
    again = replay.sample(64, 8)
    lane, step = again["lane"][:, None], again["step"]
    stored = np.isin(step + 1000 * lane, batch["step"] + 1000 * batch["lane"][:, None])
    np.testing.assert_array_equal(again["has_latent"], stored)
    expect = (lane[..., None] * 100 + step[..., None] + np.arange(5) / 10).astype(np.float16)
    np.testing.assert_array_equal(again["deter"][stored], expect[stored])
    np.testing.assert_array_equal(again["stoch"][stored], ((step[..., None] + np.arange(3)) % 7)[stored])
    # the sample's step index is the writer's step counter, its reward here
    np.testing.assert_array_equal(again["step"], again["reward"].astype(np.int64))


def test_overwritten_slots_lose_their_latents_and_late_writes_are_skipped():
    replay = SequenceReplay(1 * 10, 1, obs_shape=OBS, seed=0, latents=LATENTS)
    write(replay, 10)
    batch = replay.sample(1, 10)  # the whole lane, steps 0..9
    write(replay, 4)  # overwrites steps 0..3
    written = replay.store_latents(batch["lane"], batch["step"], np.zeros((1, 10, 5)), np.zeros((1, 10, 3)))
    assert written == 6  # steps 4..9 only
    now = replay.sample(1, 10)  # steps 4..13
    np.testing.assert_array_equal(now["has_latent"][0], [True] * 6 + [False] * 4)
    write(replay, 2)  # steps 14, 15 reuse the slots of 4, 5: their latents are gone
    np.testing.assert_array_equal(replay.sample(1, 10)["has_latent"][0], [True] * 4 + [False] * 6)


def test_latents_survive_a_ram_round_trip_and_an_old_state_loads_without_them():
    a = SequenceReplay(2 * 20, 2, obs_shape=OBS, seed=3, latents=LATENTS)
    write(a, 12)
    batch = a.sample(4, 5)
    a.store_latents(batch["lane"], batch["step"], np.ones((4, 5, 5)), np.ones((4, 5, 3)))
    b = SequenceReplay(2 * 20, 2, obs_shape=OBS, seed=9, latents=LATENTS)
    b.load_state_dict(a.state_dict())
    x, y = a.sample(8, 5), b.sample(8, 5)
    for key in x:
        np.testing.assert_array_equal(x[key], y[key])
    plain = SequenceReplay(2 * 20, 2, obs_shape=OBS, seed=3)
    write(plain, 12)
    c = SequenceReplay(2 * 20, 2, obs_shape=OBS, seed=9, latents=LATENTS)
    c.load_state_dict(plain.state_dict())  # a checkpoint from before replay context
    assert not c.sample(8, 5)["has_latent"].any()
    d = SequenceReplay(2 * 20, 2, obs_shape=OBS, seed=9)
    d.load_state_dict(a.state_dict())  # and back: the latents are dropped
    assert "has_latent" not in d.sample(8, 5)


def test_memmap_keeps_latents_and_refuses_other_latent_sizes(tmp_path):
    a = SequenceReplay(2 * 20, 2, obs_shape=OBS, storage="memmap", directory=tmp_path, seed=0, latents=LATENTS)
    write(a, 10)
    batch = a.sample(2, 4)
    a.store_latents(batch["lane"], batch["step"], np.full((2, 4, 5), 0.5), np.full((2, 4, 3), 2))
    state = a.state_dict()
    del a
    b = SequenceReplay(2 * 20, 2, obs_shape=OBS, storage="memmap", directory=tmp_path, seed=0, latents=LATENTS)
    b.load_state_dict(state)
    assert b.sample(64, 4)["has_latent"].any()
    with pytest.raises(ValueError, match="holds a replay of shape"):
        SequenceReplay(2 * 20, 2, obs_shape=OBS, storage="memmap", directory=tmp_path,
                       latents={"deter": 6, "stoch": 3})
