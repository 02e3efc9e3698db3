"""The sanity tasks keep the Procgen env's interface and the rules their docstrings state: checked by
playing them with hand-written policies (the paying action, the shortest path) and a random one."""

import subprocess
import sys

import numpy as np
import pytest

from clirun import ROOT
from datamodules.games import EPISODE_KEY
from datamodules.procgen import ProcgenConfig, make_env_pair, normalized_score, vector_env
from datamodules.sanity import BACKGROUND, MOVES, PALETTE, SANITY_TASKS, STRIPE_ROWS

TASKS = list(SANITY_TASKS)


def play(env, policy, episodes):
    """Returns, lengths, terminated flags and level seeds of the first ``episodes`` episodes to end."""
    obs, info = env.reset()
    out = []
    while len(out) < episodes:
        obs, reward, terminated, truncated, info = env.step(policy(env, obs))
        assert reward.dtype == np.float32 and obs.dtype == np.uint8 and obs.shape == (env.num_envs, 64, 64, 3)
        for i in np.flatnonzero(terminated | truncated):
            ep = info[EPISODE_KEY]
            out.append((ep["r"][i], ep["l"][i], bool(terminated[i]), ep["level_seed"][i]))
    return out[:episodes]


def paying(env, obs):
    return env.paying_action()


def shortest_path(env, obs):
    """Toward the target along the diagonal first (Chebyshev distance), as a planner would."""
    step = np.sign(env.target - env.agent)  # (N, 2) as (dx, dy)
    return np.array([next(a for a, m in enumerate(MOVES) if tuple(m) == tuple(s)) for s in step])


@pytest.mark.parametrize("task", ["sanity-colour", "sanity-sprite", "sanity-delay"])
def test_the_paying_action_scores_the_optimal_return_in_64_steps_and_random_play_its_stated_return(task):
    env = vector_env(task, 8, num_levels=50, seed=3)
    cls = SANITY_TASKS[task]
    for r, length, terminated, _ in play(env, paying, 16):
        assert (r, length, terminated) == (cls.OPTIMAL_RETURN, 64, False)  # a timeout is a truncation
    rng = np.random.default_rng(0)
    returns = [r for r, *_ in play(vector_env(task, 64, num_levels=50, seed=4),
                                   lambda env, obs: rng.integers(0, 15, env.num_envs), 2048)]
    assert abs(np.mean(returns) - cls.RANDOM_RETURN) < 3 * np.std(returns) / np.sqrt(len(returns))


def test_colour_frames_show_the_paying_action_and_a_stripe_only_after_a_reward():
    env = vector_env("sanity-colour", 2, num_levels=5, seed=0)
    obs, _ = env.reset()
    for t in range(10):
        cue = env.paying_action()
        assert (obs[:, 40, 40] == PALETTE[cue]).all()
        actions = np.array([cue[0], (cue[1] + 1) % 15])  # lane 0 is paid, lane 1 is not
        obs, reward, *_ = env.step(actions)
        assert reward.tolist() == [1.0, 0.0]
        assert (obs[0, :STRIPE_ROWS] == 255).all() and not (obs[1, :STRIPE_ROWS] == 255).all()


def test_the_sprite_cue_is_a_2x2_dot_on_a_grey_frame():
    env = vector_env("sanity-sprite", 4, num_levels=5, seed=0)
    obs, _ = env.reset()
    assert (obs != BACKGROUND).any(-1).sum(axis=(1, 2)).tolist() == [4] * 4  # no stripe before a reward
    assert (obs[:, 40:42, 40:42] == PALETTE[env.paying_action()][:, None, None]).all()


def test_delay_pays_the_colour_shown_three_steps_before():
    env = vector_env("sanity-delay", 1, num_levels=5, seed=0)
    obs, _ = env.reset()
    shown = []
    for t in range(12):
        shown.append(next(a for a in range(15) if (obs[0, 40, 40] == PALETTE[a]).all()))
        action = shown[t - 3] if t >= 3 else 0
        obs, reward, *_ = env.step(np.array([action]))
        assert reward[0] == (1.0 if t >= 3 else 0.0)


def test_grid_shortest_paths_score_one_less_the_step_costs_and_end_the_episode():
    env = vector_env("sanity-grid", 8, num_levels=100, seed=1)
    env.reset()
    distance = np.abs(env.target - env.agent).max(1)  # (N,) moves needed, diagonals included
    ended = {}
    for t in range(1, 8):
        _, reward, terminated, truncated, info = env.step(shortest_path(env, None))
        for i in np.flatnonzero(terminated | truncated):
            ended.setdefault(i, (info[EPISODE_KEY]["r"][i], t, bool(terminated[i])))
    for i, d in enumerate(distance):
        assert ended[i][1:] == (d, True) and ended[i][0] == pytest.approx(1 - 0.01 * (d - 1))
    stay = play(vector_env("sanity-grid", 4, num_levels=10, seed=2), lambda env, obs: np.full(env.num_envs, 4), 4)
    assert all((length, terminated) == (32, False) and r == pytest.approx(-0.32) for r, length, terminated, _ in stay)


def test_grid_frames_draw_the_agent_and_the_target_where_they_are():
    env = vector_env("sanity-grid", 3, num_levels=10, seed=5)
    obs, _ = env.reset()
    for i in range(3):
        (ax, ay), (tx, ty) = env.agent[i], env.target[i]
        assert (obs[i, ay * 8 + 3, ax * 8 + 3] == (40, 80, 255)).all()
        assert (obs[i, ty * 8 + 3, tx * 8 + 3] == (0, 220, 0)).all()


@pytest.mark.parametrize("task", TASKS)
def test_training_and_unseen_levels_split_by_seed_and_a_level_seed_fixes_the_level(task):
    train, unseen = make_env_pair(ProcgenConfig(task, num_envs=16, num_levels=10, seed=0))
    seeds = [s for *_, s in play(train, lambda env, obs: np.zeros(env.num_envs, np.int64), 64)]
    assert set(seeds) <= set(range(10)) and len(set(seeds)) > 5
    unseen_seeds = [s for *_, s in play(unseen, lambda env, obs: np.zeros(env.num_envs, np.int64), 32)]
    assert min(unseen_seeds) >= 10
    a, b = vector_env(task, 1, num_levels=1, start_level=7, seed=0), vector_env(task, 1, num_levels=1, start_level=7, seed=9)
    assert (a.reset()[0] == b.reset()[0]).all()
    c = vector_env(task, 1, num_levels=1, start_level=8, seed=0)
    assert not (a.reset()[0] == c.reset()[0]).all()


def test_bad_sanity_arguments_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match="allowed: easy"):
        vector_env("sanity-colour", 1, "hard")
    with pytest.raises(ValueError, match="takes no procgen options"):
        vector_env("sanity-grid", 1, use_backgrounds=False)
    with pytest.raises(ValueError, match="sanity-colour, sanity-sprite"):
        vector_env("sanity-color", 1)
    env = vector_env("sanity-colour", 2)
    with pytest.raises(ValueError, match=r"actions must lie in \[0, 14\]"):
        env.step(np.array([0, 15]))
    env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.step(np.array([0, 1]))


def test_normalised_scores_run_from_random_to_optimal():
    for task, cls in SANITY_TASKS.items():
        assert normalized_score(task, "easy", cls.RANDOM_RETURN) == pytest.approx(0)
        assert normalized_score(task, "easy", cls.OPTIMAL_RETURN) == pytest.approx(1)


def test_the_datamodule_collects_and_serves_a_sanity_task_without_procgen():
    """In a fresh interpreter where ``import procgen`` fails: collection, replay and a batch."""
    code = """
import sys
sys.modules['procgen'] = None  # any import of procgen now raises ImportError
from datamodules.replay_datamodule import ReplayDataModule
dm = ReplayDataModule(game='sanity-colour', num_envs=4, num_levels=20, batch_size=2, seq_len=8,
                      learning_starts=64, replay_capacity=4096)
dm.setup('fit')
batch = dm.next_batch()
print(tuple(batch['obs'].shape), float(batch['reward'].sum()) >= 0, dm.evaluate(dm.random_policy, 'unseen_levels', 4)['episodes'])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "4.0"


def test_procgens_env_refuses_a_sanity_task_instead_of_aborting():
    from datamodules.procgen import ProcgenVectorEnv

    with pytest.raises(ValueError, match="sanity task, not a procgen game"):
        ProcgenVectorEnv("sanity-colour", 1)
