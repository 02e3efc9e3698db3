"""The actor-critic's learning signal points the right way: on fixed imagined features where only
action 3 is rewarded, the policy's probability of action 3 grows from 1/15 towards 1."""

import torch

from dreamer.actor_critic import ActorCritic


def test_actor_moves_toward_the_rewarded_action():
    torch.manual_seed(0)
    feat_dim, starts, horizon = 16, 256, 15
    ac = ActorCritic(feat_dim, units=64, layers=1, horizon=horizon)
    opt = torch.optim.Adam(ac.parameters(), 2e-4, eps=1e-5)
    feat = torch.randn(horizon + 1, starts, feat_dim)
    cont = torch.ones(horizon + 1, starts)
    p3 = lambda: ac.policy_logits(feat[:-1]).exp()[..., 3].mean().item()  # noqa: E731
    before = p3()
    for _ in range(300):
        with torch.no_grad():
            action = ac.sample(feat[:-1])  # (H, N)
        reward = (action == 3).float()  # received on arriving after action 3
        loss, metrics = ac.loss(feat, action, reward, cont)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ac.update_slow_critic()
    assert before < 0.1 and p3() > 0.3
    assert metrics["actor/return_scale"] > 1.0
