"""ProcgenVectorEnv against raw procgen, its episode semantics and its input checks."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from datamodules.procgen import (
    GAMES, MODES, TIMEOUTS, ProcgenConfig, ProcgenVectorEnv, TransformObservations, make_env_pair,
    raw_procgen_env, unseen_levels,
)


def raw_env(env: ProcgenVectorEnv):
    return raw_procgen_env(
        num=env.num_envs, env_name=env.game, distribution_mode=env.distribution_mode,
        num_levels=env.num_levels, start_level=env.start_level, rand_seed=env.rand_seed,
    )


def test_same_seed_and_actions_give_procgens_frames_and_rewards():
    env = ProcgenVectorEnv("coinrun", 4, num_levels=50, seed=3)
    raw = raw_env(env)
    obs, info = env.reset()
    _, raw_obs, raw_first = raw.observe()
    np.testing.assert_array_equal(obs, raw_obs["rgb"])
    assert raw_first.all()
    rng = np.random.default_rng(0)
    done_seen = 0
    for _ in range(600):
        actions = rng.integers(0, 15, 4)
        obs, rew, term, trunc, info = env.step(actions)
        raw.act(actions.astype(np.int32))
        raw_rew, raw_obs, raw_first = raw.observe()
        np.testing.assert_array_equal(obs, raw_obs["rgb"])
        np.testing.assert_array_equal(rew, raw_rew)
        np.testing.assert_array_equal(term | trunc, raw_first)
        np.testing.assert_array_equal(info["level_seed"], [d["level_seed"] for d in raw.get_info()])
        assert obs.dtype == np.uint8 and rew.dtype == np.float32 and obs in env.observation_space
        done_seen += raw_first.sum()
    assert done_seen > 0


def test_autoreset_is_same_step_and_reports_finished_episodes():
    env = ProcgenVectorEnv("coinrun", 8, num_levels=20, seed=1)
    assert env.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    obs, info = env.reset()
    seeds = info["level_seed"].copy()
    returns, lengths = np.zeros(8), np.zeros(8, int)
    rng = np.random.default_rng(1)
    finished = 0
    for _ in range(1500):
        obs, rew, term, trunc, info = env.step(rng.integers(0, 15, 8))
        returns += rew
        lengths += 1
        done = term | trunc
        assert not (term & trunc).any()
        if done.any():
            ep = info["procgen_episode"]
            np.testing.assert_array_equal(info["_procgen_episode"], done)
            np.testing.assert_allclose(ep["r"][done], returns[done])
            np.testing.assert_array_equal(ep["l"][done], lengths[done])
            np.testing.assert_array_equal(ep["level_seed"][done], seeds[done])
            # coinrun: the only reward is +10 for reaching the coin, which completes the level
            np.testing.assert_array_equal(ep["level_complete"][done], returns[done] > 0)
            assert term[done & (returns > 0)].all()
            finished += done.sum()
            returns[done], lengths[done] = 0, 0
        else:
            assert "procgen_episode" not in info
        seeds = info["level_seed"].copy()
    assert finished >= 8


def test_timeout_is_truncation_not_termination():
    # maze with action 0 (move down-left into walls) never reaches the cheese: every episode times out
    env = ProcgenVectorEnv("maze", 2, num_levels=10, seed=0)
    env.reset()
    for t in range(1, TIMEOUTS["maze"] + 1):
        _, _, term, trunc, info = env.step(np.zeros(2, np.int64))
        if t < TIMEOUTS["maze"]:
            assert not (term | trunc).any()
    assert trunc.all() and not term.any()
    np.testing.assert_array_equal(info["procgen_episode"]["l"], [500, 500])
    assert not info["procgen_episode"]["level_complete"].any()


def test_reset_with_seed_reproduces_and_reset_starts_new_episodes():
    a = ProcgenVectorEnv("starpilot", 3, seed=5)
    b = ProcgenVectorEnv("starpilot", 3, seed=6)
    oa, _ = a.reset(seed=11)
    ob, _ = b.reset(seed=11)
    np.testing.assert_array_equal(oa, ob)
    for _ in range(20):
        acts = np.array([1, 2, 3])
        np.testing.assert_array_equal(a.step(acts)[0], b.step(acts)[0])
    o1, _ = a.reset(seed=11)
    np.testing.assert_array_equal(o1, oa)


def test_every_valid_game_and_mode_constructs_and_steps():
    for game in GAMES:
        for mode in MODES[game]:
            levels = 0 if mode == "exploration" else 5
            env = ProcgenVectorEnv(game, 2, mode, num_levels=levels, seed=0)
            obs, _ = env.reset()
            obs, *_ = env.step(np.array([0, 14]))
            assert obs.shape == (2, 64, 64, 3), (game, mode)
            env.close()
    assert sum(len(m) for m in MODES.values()) == 16 * 2 + 4 + 6 + 8


BAD_ARGS = [
    (dict(game="pong", num_envs=1), "unknown game"),
    (dict(game="CoinRun", num_envs=1), "unknown game"),
    (dict(game="coinrun", num_envs=1, distribution_mode="memory"), "allowed for coinrun: easy, hard, exploration"),
    (dict(game="bigfish", num_envs=1, distribution_mode="extreme"), "not available for bigfish"),
    (dict(game="coinrun", num_envs=1, distribution_mode="medium"), "not available"),
    (dict(game="coinrun", num_envs=0), "num_envs"),
    (dict(game="coinrun", num_envs=2.5), "num_envs"),
    (dict(game="coinrun", num_envs=1, num_levels=-1), "num_levels"),
    (dict(game="coinrun", num_envs=1, start_level=-5), "start_level"),
    (dict(game="coinrun", num_envs=1, start_level=2**31 - 10, num_levels=100), "2**31"),
    (dict(game="coinrun", num_envs=1, seed=-1), "seed"),
    (dict(game="coinrun", num_envs=1, distribution_mode="exploration", num_levels=200), "exploration"),
    (dict(game="coinrun", num_envs=1, use_backgrounds="no"), "true or false"),
    (dict(game="coinrun", num_envs=1, num_threads=True), "num_threads"),
    (dict(game="coinrun", num_envs=1, render_human=True), "unknown procgen option"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ARGS)
def test_bad_arguments_raise_value_error_in_python(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        ProcgenVectorEnv(**kwargs)


def test_bad_actions_raise_value_error():
    env = ProcgenVectorEnv("coinrun", 2, num_levels=1)
    env.reset()
    for actions in ([0, 15], [-1, 0], [0, 1, 2], [0.5, 1.0], [[0, 1]]):
        with pytest.raises(ValueError, match="actions"):
            env.step(np.array(actions))


def test_raw_procgen_really_aborts_on_a_bad_mode():
    """Why the checks exist: procgen kills the process (not an exception) on a mode its game lacks."""
    code = (
        "import procgen\n"
        "procgen.ProcgenGym3Env(num=1, env_name='bigfish', distribution_mode='memory')\n"
        "print('survived')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "survived" not in out.stdout


def test_env_pair_tests_on_levels_outside_the_training_set():
    cfg = ProcgenConfig(game="coinrun", num_envs=4, num_levels=20, start_level=100, seed=2)
    train, test = make_env_pair(cfg)
    assert (test.start_level, test.num_levels) == unseen_levels(cfg) == (120, 2**31 - 120)
    train_seeds, test_seeds = set(), set()
    rng = np.random.default_rng(0)
    for env, seeds in ((train, train_seeds), (test, test_seeds)):
        _, info = env.reset()
        seeds.update(info["level_seed"].tolist())
        for _ in range(800):
            info = env.step(rng.integers(0, 15, 4))[-1]
            seeds.update(info["level_seed"].tolist())
    assert train_seeds <= set(range(100, 120)) and len(train_seeds) > 4
    assert min(test_seeds) >= 120 and len(test_seeds) > 4
    with pytest.raises(ValueError, match="no unseen levels"):
        make_env_pair(ProcgenConfig(num_levels=0))


def test_exploration_runs_are_tested_on_hard_modes_ordinary_levels():
    cfg = ProcgenConfig(game="maze", num_envs=2, distribution_mode="exploration", num_levels=0)
    train, test = make_env_pair(cfg)
    assert (train.distribution_mode, test.distribution_mode) == ("exploration", "hard")
    assert (test.start_level, test.num_levels) == (0, 0)
    train_seeds, test_seeds = set(), set()
    for env, seeds in ((train, train_seeds), (test, test_seeds)):
        for _ in range(3):
            _, info = env.reset()
            seeds.update(info["level_seed"].tolist())
    assert len(train_seeds) == 1 and len(test_seeds) > 1


def test_gymnasium_episode_statistics_and_an_observation_transform_wrap_the_env():
    from gymnasium.wrappers.vector import RecordEpisodeStatistics

    gray = gym.spaces.Box(0, 255, (4, 64, 64, 1), np.uint8)
    env = RecordEpisodeStatistics(TransformObservations(
        ProcgenVectorEnv("coinrun", 4, num_levels=5, seed=0),
        lambda o: o.mean(-1, keepdims=True).astype(np.uint8), gray,
    ))
    obs, _ = env.reset()
    assert obs.shape == (4, 64, 64, 1) and env.observation_space == gray
    assert env.single_observation_space == gym.spaces.Box(0, 255, (64, 64, 1), np.uint8)
    rng, ended = np.random.default_rng(0), 0
    for _ in range(3000):
        obs, reward, terminated, truncated, info = env.step(rng.integers(0, 15, 4))
        assert obs.shape == (4, 64, 64, 1)
        if "episode" in info:
            ours, theirs = info["procgen_episode"], info["episode"]
            np.testing.assert_array_equal(info["_episode"], info["_procgen_episode"])
            np.testing.assert_allclose(theirs["r"], ours["r"])
            np.testing.assert_array_equal(theirs["l"], ours["l"])
            ended += int(info["_episode"].sum())
    assert ended >= 4
    env.close()


@pytest.mark.parametrize("game", ["starpilot", "sanity-grid"])
def test_a_state_from_get_state_replays_the_same_frames_and_rewards_in_another_env(game):
    """What the dream-against-game diagnostic relies on: a copied state plays on exactly as the
    original, episode ends and the next level included, whatever the other env's own seed."""
    from datamodules.procgen import vector_env

    env = vector_env(game, 3, num_levels=20, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    for _ in range(40):
        env.step(rng.integers(0, 15, 3))
    state, actions = env.get_state(), rng.integers(0, 15, (120, 3))
    other = vector_env(game, 3, num_levels=20, seed=7)
    other.reset()
    np.testing.assert_array_equal(other.set_state(state), env.render())
    ended = 0
    for a in actions:
        obs, reward, term, trunc, _ = env.step(a)
        obs2, reward2, term2, trunc2, _ = other.step(a)
        np.testing.assert_array_equal(obs, obs2)
        np.testing.assert_array_equal(reward, reward2)
        np.testing.assert_array_equal(term | trunc, term2 | trunc2)
        ended += int((term | trunc).sum())
    assert ended > 0
    with pytest.raises(ValueError, match="one per"):
        other.set_state(state[:2])
