"""DreamerV3 maths against hand-computed values: symlog, two-hot, lambda-returns, KL free bits,
return scale, unimix and straight-through sampling, is_first resets, terminal-step learning, and
actor-critic gradient routing."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dreamer.actor_critic import ActorCritic, lambda_returns, replay_returns
from dreamer.agent import Dreamer
from dreamer.distributions import (
    TwoHot,
    categorical_kl,
    log_softmax,
    sample_index,
    sample_one_hot,
    softmax,
    symexp,
    symlog,
    unimix_logits,
)
from dreamer.rssm import RSSM
from dreamer.world_model import WorldModel

BIN_STEP = 40 / 254  # spacing of TwoHot's 255 bins in symlog space


def test_symlog_symexp_round_trip():
    x = torch.tensor([-1e6, -123.4, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 7.0, 1e6],
                     dtype=torch.float64)
    torch.testing.assert_close(symexp(symlog(x)), x, rtol=1e-12, atol=0)
    torch.testing.assert_close(symlog(symexp(x[2:-2])), x[2:-2], rtol=1e-12, atol=0)
    assert symlog(torch.tensor(0.0)) == 0 and symexp(torch.tensor(0.0)) == 0
    e_minus_1 = torch.tensor([math.e - 1, 1 - math.e], dtype=torch.float64)
    assert symlog(e_minus_1).tolist() == pytest.approx([1.0, -1.0], abs=1e-15)
    assert symlog(torch.tensor(1e6, dtype=torch.float64)).item() == pytest.approx(math.log(1e6 + 1))


def test_twohot_encode_splits_between_neighbouring_bins():
    twohot = TwoHot()
    lo, hi = math.expm1(2 * BIN_STEP), math.expm1(3 * BIN_STEP)  # bins 129 and 130
    target = twohot.encode(torch.tensor([0.5]))[0]
    assert target.nonzero().flatten().tolist() == [129, 130]
    w_hi = (0.5 - lo) / (hi - lo)
    assert target[130].item() == pytest.approx(w_hi, abs=1e-5)
    assert target[129].item() == pytest.approx(1 - w_hi, abs=1e-5)
    assert target.sum().item() == pytest.approx(1.0, abs=1e-6)

    on_bins = twohot.encode(twohot.bins[[0, 100, 140, 254]])
    for row, index in zip(on_bins, [0, 100, 140, 254]):
        assert row[index] == 1 and row.sum() == 1

    clamped = twohot.encode(torch.tensor([1e12, -1e12]))
    assert clamped[0, -1] == 1 and clamped[0].sum() == 1
    assert clamped[1, 0] == 1 and clamped[1].sum() == 1


def test_twohot_mean_decodes_its_own_encoding():
    twohot = TwoHot()
    y = torch.tensor([-1000.0, -3.7, 0.0, 0.5, 10.0, 2500.0])
    decoded = twohot.mean(torch.log(twohot.encode(y) + 1e-30))
    torch.testing.assert_close(decoded, y, rtol=1e-5, atol=1e-4)


def test_twohot_loss_is_minimised_at_the_target():
    twohot = TwoHot()
    y = torch.tensor([-1000.0, -3.7, 0.0, 0.5, 10.0, 2500.0])
    logits = torch.zeros(len(y), 255, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.3)
    for _ in range(300):
        loss = twohot.loss(logits, y).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(twohot.mean(logits).detach(), y, rtol=1e-2, atol=1e-2)
    w = twohot.encode(y)
    target_entropy = -(w * torch.log(w.clamp(min=1e-30))).sum()
    assert loss.item() == pytest.approx(target_entropy.item(), abs=0.05)


def test_twohot_mean_of_uniform_logits_is_zero():
    assert abs(TwoHot().mean(torch.zeros(255)).item()) < 1e-3


def test_lambda_returns_hand_computed():
    reward = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    cont = torch.tensor([[1.0], [0.5], [1.0]], dtype=torch.float64)
    value = torch.tensor([[0.5], [1.0], [-2.0], [4.0]], dtype=torch.float64)

    r2 = 3.0 + 0.9 * 1.0 * (0.2 * 4.0 + 0.8 * 4.0)
    r1 = 2.0 + 0.9 * 0.5 * (0.2 * -2.0 + 0.8 * r2)
    r0 = 1.0 + 0.9 * 1.0 * (0.2 * 1.0 + 0.8 * r1)
    assert [r0, r1, r2] == pytest.approx([4.20112, 4.196, 6.6])
    out = lambda_returns(reward, cont, value, gamma=0.9, lam=0.8)
    assert out.shape == (3, 1)
    assert out[:, 0].tolist() == pytest.approx([4.20112, 4.196, 6.6], abs=1e-12)

    td = lambda_returns(reward, cont, value, gamma=0.9, lam=0.0)
    assert td[:, 0].tolist() == pytest.approx(
        [1.0 + 0.9 * 1.0 * 1.0, 2.0 + 0.9 * 0.5 * -2.0, 3.0 + 0.9 * 1.0 * 4.0], abs=1e-12
    )

    mc = lambda_returns(reward, torch.ones_like(cont), value, gamma=0.9, lam=1.0)
    assert mc[:, 0].tolist() == pytest.approx(
        [
            1.0 + 0.9 * 2.0 + 0.81 * 3.0 + 0.729 * 4.0,
            2.0 + 0.9 * 3.0 + 0.81 * 4.0,
            3.0 + 0.9 * 4.0,
        ],
        abs=1e-12,
    )


def test_replay_returns_hand_computed():
    # steps 0..4 of one lane: a terminal step 2 (its reward 3, then a new episode at step 3)
    reward = torch.tensor([[0.0, 1.0, 3.0, 0.0, 2.0]])
    is_last = torch.tensor([[False, False, True, False, False]])
    is_terminal = is_last.clone()
    boot = torch.tensor([[10.0, 20.0, 30.0, 40.0, 50.0]])
    g, lam = 0.9, 0.8
    out = replay_returns(reward, is_last, is_terminal, boot, g, lam)
    r3 = 2.0 + g * ((1 - lam) * 50.0 + lam * 50.0)  # R_4 = boot_4
    r2 = 0.0 + g * ((1 - lam) * 40.0 + lam * r3)  # not trained on (step 2 is an episode's last)
    r1 = 3.0  # step 2 is terminal: nothing after it counts
    r0 = 1.0 + g * ((1 - lam) * 20.0 + lam * r1)
    torch.testing.assert_close(out, torch.tensor([[r0, r1, r2, r3]]))
    # a timeout (last, not terminal) bootstraps from the imagined return there instead
    timeout = replay_returns(reward, is_last, torch.zeros_like(is_last), boot, g, lam)
    assert float(timeout[0, 1]) == pytest.approx(3.0 + g * 30.0)


def test_repval_trains_the_critic_on_replayed_returns_and_reaches_the_world_model():
    torch.manual_seed(0)
    model = Dreamer(size="tiny")
    batch = {
        "obs": torch.randint(0, 256, (2, 6, 64, 64, 3), dtype=torch.uint8),
        "action": torch.randint(0, 15, (2, 6)),
        "reward": torch.rand(2, 6),
        "is_first": torch.zeros(2, 6, dtype=torch.bool),
        "is_last": torch.zeros(2, 6, dtype=torch.bool),
        "is_terminal": torch.zeros(2, 6, dtype=torch.bool),
    }
    loss, metrics = model.loss(batch)
    assert "loss/repval" in metrics and float(metrics["loss/repval"]) > 0
    no_replay = {k: v for k, v in batch.items() if k != "is_last"}
    torch.manual_seed(1)
    off = Dreamer(size="tiny", actor_critic={"repval": 0.0})
    off.load_state_dict(model.state_dict())
    torch.manual_seed(2)
    _, m_on = model.loss(batch)
    torch.manual_seed(2)
    _, m_off = off.loss(batch)
    assert "loss/repval" not in m_off and "loss/repval" not in model.loss(no_replay)[1]
    assert float(m_on["loss/critic"]) > float(m_off["loss/critic"])  # 0.3 x repval added
    # repval's gradient reaches the world model's representation (DreamerV3's repval_grad)
    torch.nn.init.normal_(model.actor_critic.critic[-1].weight, std=0.1)  # not zero any more
    torch.manual_seed(3)
    wm_loss, _, post = model.world_model.loss(batch)
    feat = model.world_model.rssm.features(post)
    returns = torch.zeros(2, 5)
    model.actor_critic.critic_loss(feat[:, :-1], returns).mean().backward()
    assert model.world_model.encoder.net[0].weight.grad.abs().sum() > 0


def test_categorical_kl_two_classes():
    p = torch.tensor([0.9, 0.1]).log()
    q = torch.tensor([0.1, 0.9]).log()
    assert categorical_kl(p, q).item() == pytest.approx(0.8 * math.log(9), rel=1e-6)
    r = torch.tensor([0.5, 0.5]).log()
    s = torch.tensor([0.8, 0.2]).log()
    expected = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert categorical_kl(r, s).item() == pytest.approx(expected, rel=1e-6)
    assert categorical_kl(p, p).item() == 0


def _kl_only_world_model(scale_dyn, scale_rep):
    """WorldModel whose RSSM returns fixed 2x2 latents: step 0 KL 0.446 (< 1), step 1 KL 3.516."""
    wm = WorldModel(
        num_actions=3, deter=8, hidden=8, stoch=2, classes=2, depth=2, units=8,
        scale_image=0.0, scale_reward=0.0, scale_continue=0.0,
        scale_dyn=scale_dyn, scale_rep=scale_rep,
    )
    post_lp = torch.tensor([[[[0.5, 0.5]] * 2, [[0.9, 0.1]] * 2]]).log().requires_grad_()
    prior_lp = torch.tensor([[[[0.8, 0.2]] * 2, [[0.1, 0.9]] * 2]]).log().requires_grad_()
    stoch = F.one_hot(torch.zeros(1, 2, 2, dtype=torch.long), 2).float()
    post = {"deter": torch.zeros(1, 2, 8), "stoch": stoch, "logits": post_lp}
    prior = {"deter": torch.zeros(1, 2, 8), "stoch": stoch, "logits": prior_lp}
    wm.rssm.observe = lambda embed, action, is_first, state=None, prev_action=None: (post, prior)
    batch = {
        "obs": torch.zeros(1, 2, 64, 64, 3, dtype=torch.uint8),
        "action": torch.zeros(1, 2, dtype=torch.long),
        "is_first": torch.tensor([[True, False]]),
        "reward": torch.zeros(1, 2),
        "is_terminal": torch.zeros(1, 2, dtype=torch.bool),
    }
    return wm, batch, post_lp, prior_lp


def _grad(t):
    return torch.zeros_like(t) if t.grad is None else t.grad


def test_world_model_kl_free_bits_and_stop_gradients():
    below = 2 * (0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2))
    above = 2 * (0.9 * math.log(0.9 / 0.1) + 0.1 * math.log(0.1 / 0.9))
    assert below < 1 < above

    wm, batch, post_lp, prior_lp = _kl_only_world_model(scale_dyn=1.0, scale_rep=0.0)
    total, metrics, _ = wm.loss(batch)
    assert metrics["loss/kl_dyn"].item() == pytest.approx((below + above) / 2, rel=1e-5)
    assert metrics["loss/kl_rep"].item() == pytest.approx((below + above) / 2, rel=1e-5)
    assert total.item() == pytest.approx((1.0 + above) / 2, rel=1e-5)
    total.backward()
    assert (_grad(post_lp) == 0).all()
    assert (_grad(prior_lp)[0, 0] == 0).all()
    torch.testing.assert_close(prior_lp.grad[0, 1], torch.tensor([[-0.45, -0.05]] * 2))

    wm, batch, post_lp, prior_lp = _kl_only_world_model(scale_dyn=0.0, scale_rep=1.0)
    total, _, _ = wm.loss(batch)
    assert total.item() == pytest.approx((1.0 + above) / 2, rel=1e-5)
    total.backward()
    assert (_grad(prior_lp) == 0).all()
    assert (_grad(post_lp)[0, 0] == 0).all()
    expected = [0.9 * (math.log(9) + 1) / 2, 0.1 * (1 - math.log(9)) / 2]
    torch.testing.assert_close(post_lp.grad[0, 1], torch.tensor([expected] * 2))


def test_return_scale_percentiles_ema_and_floor():
    ac = ActorCritic(feat_dim=4, num_actions=3, units=8, layers=1)
    ac.update_return_scale(torch.arange(101.0))
    assert ac.ret_lo.item() == pytest.approx(5.0) and ac.ret_hi.item() == pytest.approx(95.0)
    assert ac.return_scale.item() == pytest.approx(90.0)

    ac.update_return_scale(torch.arange(101.0).reshape(101, 1) * 2 + 10)
    assert ac.ret_lo.item() == pytest.approx(0.99 * 5 + 0.01 * 20, abs=1e-4)
    assert ac.ret_hi.item() == pytest.approx(0.99 * 95 + 0.01 * 200, abs=1e-4)
    assert ac.return_scale.item() == pytest.approx(96.05 - 5.15, abs=1e-4)

    narrow = ActorCritic(feat_dim=4, num_actions=3, units=8, layers=1)
    narrow.update_return_scale(torch.linspace(0.0, 0.5, 101))
    assert narrow.ret_hi.item() - narrow.ret_lo.item() == pytest.approx(0.45, abs=1e-5)
    assert narrow.return_scale.item() == 1.0


def test_unimix_probabilities():
    raw = [2.0, 0.0, -1.0, 0.5]
    z = sum(math.exp(v) for v in raw)
    expected = torch.tensor([0.99 * math.exp(v) / z + 0.01 / 4 for v in raw])
    probs = unimix_logits(torch.tensor([raw]), 0.01).exp()[0]
    torch.testing.assert_close(probs, expected)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)

    peaked = unimix_logits(torch.tensor([[100.0, -100.0, -100.0, -100.0]]), 0.01)
    assert torch.isfinite(peaked).all()
    torch.testing.assert_close(peaked.exp()[0], torch.tensor([0.9925, 0.0025, 0.0025, 0.0025]))
    torch.testing.assert_close(unimix_logits(torch.tensor([raw]), 0.0).exp()[0],
                               torch.tensor([math.exp(v) / z for v in raw]))


def test_sample_one_hot_is_straight_through():
    torch.manual_seed(0)
    logits = torch.tensor([0.7, 0.2, 0.1]).log().expand(20000, 3).clone()
    sample = sample_one_hot(logits)
    assert ((sample == 0) | ((sample - 1).abs() <= 2.4e-7)).all()
    assert ((sample > 0.5).sum(-1) == 1).all()
    frequencies = (sample > 0.5).float().mean(0)
    torch.testing.assert_close(frequencies, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)

    logits = torch.zeros(5, 3, requires_grad=True)
    (sample_one_hot(logits) * torch.tensor([1.0, 0.0, 0.0])).sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[2 / 9, -1 / 9, -1 / 9]] * 5))


def test_sample_index_draws_each_class_at_its_probability_and_never_an_impossible_one():
    torch.manual_seed(0)
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0]]).expand(3, 50000, 2, 4)
    index = sample_index(probs * 7.0)  # unnormalised weights draw alike
    assert index.shape == (3, 50000, 2) and index.dtype == torch.long
    counts = torch.stack([torch.bincount(index[..., j].flatten(), minlength=4) for j in range(2)]).float()
    frequencies = counts / counts.sum(-1, keepdim=True)
    assert counts[0, 1] == 0 and (counts[1, :3] == 0).all()
    # 150,000 draws: a standard error of at most 0.0013 per class
    torch.testing.assert_close(frequencies[0], torch.tensor([0.5, 0.0, 0.3, 0.2]), atol=0.005, rtol=0)


def test_sample_one_hot_forward_is_bit_exact():
    torch.manual_seed(0)
    sample = sample_one_hot(torch.randn(1000, 8) * 3)
    assert ((sample == 0) | (sample == 1)).all()


def _observe(rssm, embed, action, is_first, **kwargs):
    torch.manual_seed(0)
    with torch.no_grad():
        return rssm.observe(embed, action, is_first, **kwargs)


def test_observe_resets_at_is_first():
    torch.manual_seed(1)
    rssm = RSSM(embed_dim=16, num_actions=3, deter=16, hidden=16, stoch=4, classes=4)
    batch, length, reset = 2, 6, 3
    embed_a = torch.randn(batch, length, 16)
    embed_b = embed_a.clone()
    embed_b[:, :reset] = torch.randn(batch, reset, 16)
    action_a = torch.randint(0, 3, (batch, length))
    action_b = action_a.clone()
    action_b[:, :reset] = (action_a[:, :reset] + 1) % 3
    is_first = torch.zeros(batch, length, dtype=torch.bool)
    is_first[:, reset] = True

    post_a, prior_a = _observe(rssm, embed_a, action_a, is_first)
    post_b, prior_b = _observe(rssm, embed_b, action_b, is_first)
    for key in ("deter", "stoch", "logits"):
        assert torch.equal(post_a[key][:, reset:], post_b[key][:, reset:]), key
    for key in ("deter", "logits"):
        assert torch.equal(prior_a[key][:, reset:], prior_b[key][:, reset:]), key
    assert not torch.allclose(post_a["deter"][:, 1:reset], post_b["deter"][:, 1:reset])

    no_reset = torch.zeros_like(is_first)
    carry_a, _ = _observe(rssm, embed_a, action_a, no_reset)
    carry_b, _ = _observe(rssm, embed_b, action_b, no_reset)
    assert not torch.allclose(carry_a["deter"][:, reset], carry_b["deter"][:, reset])


def test_observe_without_state_forces_is_first_at_step_0():
    torch.manual_seed(2)
    rssm = RSSM(embed_dim=16, num_actions=3, deter=16, hidden=16, stoch=4, classes=4)
    embed = torch.randn(2, 4, 16)
    action = torch.randint(0, 3, (2, 4))
    state = {
        "deter": torch.randn(2, 16),
        "stoch": F.one_hot(torch.randint(0, 4, (2, 4)), 4).float(),
        "logits": torch.randn(2, 4, 4).log_softmax(-1),
    }
    prev_action = torch.tensor([1, 2])
    no_first = torch.zeros(2, 4, dtype=torch.bool)
    first = no_first.clone()
    first[:, 0] = True

    fresh, _ = _observe(rssm, embed, action, no_first)
    assert not no_first.any()
    reset, _ = _observe(rssm, embed, action, first, state=state, prev_action=prev_action)
    carried, _ = _observe(rssm, embed, action, no_first, state=state, prev_action=prev_action)
    for key in ("deter", "stoch", "logits"):
        assert torch.equal(fresh[key], reset[key]), key
    assert not torch.allclose(carried["deter"][:, 0], fresh["deter"][:, 0])


def test_act_resets_state_at_is_first():
    torch.manual_seed(3)
    agent = Dreamer(size="tiny")

    def frames():
        return torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)

    state = None
    for _ in range(3):
        _, state = agent.act(frames(), torch.zeros(3, dtype=torch.bool), state)
    obs = frames()

    def act(is_first, state):
        torch.manual_seed(123)
        action, (post, *_) = agent.act(obs, torch.tensor(is_first), state)
        return action, post

    fresh_action, fresh = act([False] * 3, None)
    reset_action, reset = act([True] * 3, state)
    mixed_action, mixed = act([True, False, True], state)
    _, kept = act([False] * 3, state)

    assert torch.equal(reset["deter"], fresh["deter"])
    assert torch.equal(reset["stoch"], fresh["stoch"])
    assert torch.equal(reset_action, fresh_action)
    assert torch.equal(mixed["deter"][[0, 2]], fresh["deter"][[0, 2]])
    assert torch.equal(mixed_action[[0, 2]], fresh_action[[0, 2]])
    assert torch.equal(mixed["deter"][1], kept["deter"][1])
    assert not torch.allclose(kept["deter"], fresh["deter"])


def test_world_model_learns_terminal_step_reward_and_continue():
    torch.manual_seed(0)
    wm = Dreamer(size="tiny").world_model
    batch_size, length = 4, 12
    batch = {
        "obs": torch.randint(0, 256, (batch_size, length, 64, 64, 3), dtype=torch.uint8),
        "action": torch.randint(0, 15, (batch_size, length)),
        "reward": torch.zeros(batch_size, length),
        "is_first": torch.zeros(batch_size, length, dtype=torch.bool),
        "is_terminal": torch.zeros(batch_size, length, dtype=torch.bool),
    }
    batch["reward"][:, -1] = 10.0
    batch["is_terminal"][:, -1] = True
    batch["is_first"][:, 0] = True

    opt = torch.optim.Adam(wm.parameters(), lr=2e-3)
    for _ in range(200):
        loss, _, _ = wm.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        _, _, post = wm.loss(batch)
        feat = wm.rssm.features(post)
        reward, cont = wm.reward(feat), wm.continue_prob(feat)
    assert (reward[:, -1] > 8).all(), reward[:, -1]
    assert (reward[:, :-1].abs() < 1).all(), reward[:, :-1]
    assert (cont[:, -1] < 0.2).all(), cont[:, -1]
    assert (cont[:, :-1] > 0.8).all(), cont[:, :-1]


def _actor_critic_grads(ac, feat, action, reward, cont):
    ac = copy.deepcopy(ac)
    total, _ = ac.loss(feat, action, reward, cont)
    total.backward()
    return ac, {name: p.grad for name, p in ac.named_parameters()}


def test_actor_critic_loss_routes_gradients():
    torch.manual_seed(4)
    horizon, n, feat_dim = 4, 5, 6
    ac = ActorCritic(feat_dim, num_actions=3, units=8, layers=1, horizon=horizon)
    torch.nn.init.normal_(ac.critic[-1].weight, std=0.3)
    feat = torch.randn(horizon + 1, n, feat_dim)
    action = torch.randint(0, 3, (horizon, n))
    reward = torch.randn(horizon, n)
    cont = torch.cat([torch.ones(1, n), torch.rand(horizon, n) * 0.5 + 0.5])

    base, grads = _actor_critic_grads(ac, feat, action, reward, cont)
    actor = [k for k in grads if k.startswith("actor.")]
    critic = [k for k in grads if k.startswith("critic.")]
    assert actor and critic
    assert all(grads[k] is not None and grads[k].abs().sum() > 0 for k in actor + critic)
    assert all(not p.requires_grad and p.grad is None for p in base.slow_critic.parameters())

    _, other_actions = _actor_critic_grads(ac, feat, (action + 1) % 3, reward, cont)
    assert any(not torch.equal(grads[k], other_actions[k]) for k in actor)
    assert all(torch.equal(grads[k], other_actions[k]) for k in critic)

    moved_slow = copy.deepcopy(ac)
    torch.nn.init.normal_(moved_slow.slow_critic[-1].weight, std=0.3)
    _, other_slow = _actor_critic_grads(moved_slow, feat, action, reward, cont)
    assert any(not torch.equal(grads[k], other_slow[k]) for k in critic)
    assert all(torch.equal(grads[k], other_slow[k]) for k in actor)


def test_update_slow_critic_moves_by_rate():
    ac = ActorCritic(feat_dim=4, num_actions=3, units=8, layers=1)
    with torch.no_grad():
        ac.critic[-1].bias.fill_(1.0)
        ac.critic[-1].weight.fill_(2.0)
        ac.slow_critic[-1].weight.fill_(-1.0)
    assert (ac.slow_critic[-1].bias == 0).all()
    ac.update_slow_critic()
    torch.testing.assert_close(ac.slow_critic[-1].bias, torch.full((255,), 0.02))
    torch.testing.assert_close(ac.slow_critic[-1].weight, torch.full((255, 8), -1.0 + 0.02 * 3.0))
    ac.update_slow_critic()
    torch.testing.assert_close(ac.slow_critic[-1].bias, torch.full((255,), 0.02 + 0.02 * 0.98))
    assert (ac.critic[-1].bias == 1.0).all()


@pytest.mark.parametrize("shape", [(7,), (5, 4), (3, 6, 8), (2, 3, 15), (4, 16), (2, 255)])
def test_short_axis_softmax_matches_torch_values_and_gradients(shape):
    """The helpers take a transposed route for fewer than 16 classes; values and gradients must
    be torch's own."""
    torch.manual_seed(0)
    x = (3 * torch.randn(shape)).requires_grad_()
    weight = torch.randn(shape)
    for ours, theirs in ((softmax, torch.softmax), (log_softmax, torch.log_softmax)):
        got, want = ours(x), theirs(x, -1)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        (g_ours,) = torch.autograd.grad((ours(x) * weight).sum(), x)
        (g_theirs,) = torch.autograd.grad((theirs(x, -1) * weight).sum(), x)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)
