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


def test_acting_latents_store_the_posterior_each_step_was_acted_from():
    """With acting_latents, every written step holds the acting policy's posterior for its frame
    (the extra end-of-episode step holds none); without, no step holds one."""
    from datamodules.collector import Collector
    from datamodules.procgen import vector_env
    from datamodules.replay import SequenceReplay
    from dreamer.agent import Dreamer

    torch.manual_seed(0)
    agent = Dreamer(size="tiny").eval()
    for acting in (True, False):
        env = vector_env("sanity-grid", 2, num_levels=5, seed=0)
        replay = SequenceReplay(512, 2, latents=agent.latent_sizes)
        collector = Collector(env, replay, acting_latents=acting)
        acted_from = {}  # (lane, step index in the lane) -> the posterior the policy acted from there
        for _ in range(40):
            before = replay.count.copy()
            collector.collect(lambda: agent, 1)
            for lane in range(2):  # the acted step comes first, an episode's end step after it
                acted_from[(lane, int(before[lane]))] = collector.rollout.state.post["deter"][lane].numpy()
        sample = replay.sample(4, 8)
        written = sample["has_latent"]
        if not acting:
            assert not written.any()
            continue
        assert written.any() and (written | sample["is_last"]).all() and not (written & sample["is_last"]).any()
        for b, t in zip(*np.nonzero(written)):
            np.testing.assert_allclose(sample["deter"][b, t], acted_from[(int(sample["lane"][b]), int(sample["step"][b, t]))],
                                       rtol=1e-2, atol=1e-3)  # stored in float16
