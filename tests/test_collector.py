"""Rollout, the one env loop: what it hands the policy and what it reports, against procgen itself."""

import numpy as np
import torch

from datamodules.collector import Rollout, TrainRatio
from datamodules.procgen import ProcgenVectorEnv


class CountingPolicy:
    """Acts at random (seeded) and checks it gets back the state it returned last."""

    def __init__(self) -> None:
        self.calls, self.seen = 0, []
        self.rng = torch.Generator().manual_seed(0)

    def act(self, obs, is_first, state, reward=None):
        assert state == (None if self.calls == 0 else self.calls - 1)
        self.seen.append((obs.numpy().copy(), is_first.numpy().copy(), reward.numpy().copy()))
        actions = torch.randint(0, 15, (len(obs),), generator=self.rng)
        self.calls += 1
        return actions, self.calls - 1


def test_rollout_hands_the_policy_procgens_frames_firsts_and_arrival_rewards():
    env, twin = (ProcgenVectorEnv("coinrun", 3, "easy", num_levels=5, seed=11) for _ in range(2))
    rollout, policy = Rollout(env), CountingPolicy()
    obs, _ = twin.reset()
    first, arrival = np.ones(3, bool), np.zeros(3, np.float32)
    ends = rewarded = 0
    for t in range(3000):
        actions = rollout.act(policy)
        seen_obs, seen_first, seen_reward = policy.seen[-1]
        np.testing.assert_array_equal(seen_obs, obs)
        np.testing.assert_array_equal(seen_first, first)
        np.testing.assert_array_equal(seen_reward, arrival)
        step = rollout.step()
        obs, reward, terminated, truncated, _ = twin.step(actions)
        np.testing.assert_array_equal(step.reward, reward)
        np.testing.assert_array_equal(step.terminated, terminated)
        np.testing.assert_array_equal(step.obs, seen_obs)
        first = terminated | truncated
        arrival = np.where(first, 0.0, reward).astype(np.float32)  # an episode's first frame gets 0
        ends += int(first.sum())
        rewarded += int((reward != 0).sum())
        if ends >= 4 and rewarded:
            break
    assert ends >= 4 and rewarded, "the check needs episode ends and a reward"
    rollout.reset()  # fresh episodes: the policy starts from no state
    policy.calls = 0
    rollout.act(policy)
    assert policy.seen[-1][1].all() and not policy.seen[-1][2].any()
    env.close(), twin.close()


def test_train_ratio_serves_batch_k_after_its_env_steps_and_checkpoints_the_trained_count():
    ratio = TrainRatio(ratio=4.0, batch_size=2, seq_len=8, learning_starts=64)
    assert [ratio.env_steps_needed(k) for k in (0, 1, 2, 3)] == [64, 68, 72, 76]  # 16 replayed / 4
    ratio.served = 5
    assert ratio.env_steps_needed() == 84 and ratio.state_dict() == {"batches_served": 5}
    for _ in range(4):
        ratio.count_trained()  # Lightning fetched 5, trained on 4
    assert ratio.state_dict() == {"batches_served": 4}
    resumed = TrainRatio(4.0, 2, 8, 64)
    resumed.load_state_dict(ratio.state_dict())
    assert resumed.served == 4 and resumed.env_steps_needed() == 80
