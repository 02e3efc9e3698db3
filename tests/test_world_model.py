"""World-model alignment and learnability: actions and rewards meet the states they belong to,
blocks of the recurrent core talk to each other, a rare reward is learned, and the quality
measures (ROC AUC, dream skill) agree with hand-computed values."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dreamer.agent import Dreamer
from dreamer.distributions import TwoHot
from dreamer.nets import MLP, BlockGRU
from dreamer.quality import SkillByHorizon, dream_returns, dream_windows, roc_auc, spread_ratio


def _observe(wm, obs, action, is_first, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        post, _ = wm.rssm.observe(wm.encoder(obs), action, is_first)
    return post


def test_action_at_t_changes_states_from_t_plus_1_never_t():
    torch.manual_seed(0)
    wm = Dreamer(size="tiny").world_model
    length, t = 8, 3
    obs = torch.randint(0, 256, (2, length, 64, 64, 3), dtype=torch.uint8)
    action = torch.randint(0, 15, (2, length))
    changed = action.clone()
    changed[:, t] = (action[:, t] + 7) % 15
    is_first = torch.zeros(2, length, dtype=torch.bool)
    a = _observe(wm, obs, action, is_first)
    b = _observe(wm, obs, changed, is_first)
    for key in ("deter", "stoch", "logits"):
        assert torch.equal(a[key][:, : t + 1], b[key][:, : t + 1]), key  # steps 0..t untouched
    for step in range(t + 1, length):  # action[t] leads to step t + 1, and its effect persists
        assert not torch.allclose(a["deter"][:, step], b["deter"][:, step]), step

    # imagination with a fixed action sequence: the same rule
    start = {k: v[:, -1] for k, v in a.items()}

    def dream(actions):
        torch.manual_seed(1)
        state, deters = start, []
        with torch.no_grad():
            for step in range(actions.shape[1]):
                state = wm.rssm.img_step(state, F.one_hot(actions[:, step], 15).float())
                deters.append(state["deter"])
        return torch.stack(deters, 1)  # (N, H) states after actions 0..H-1

    plan = torch.randint(0, 15, (2, 5))
    other = plan.clone()
    other[:, 2] = (plan[:, 2] + 3) % 15
    da, db = dream(plan), dream(other)
    assert torch.equal(da[:, :2], db[:, :2])  # states reached before action 2 was taken
    assert not torch.allclose(da[:, 2:], db[:, 2:])


def test_reward_stored_with_step_t_is_the_reward_heads_target_at_t():
    torch.manual_seed(0)
    wm = Dreamer(size="tiny").world_model
    torch.nn.init.normal_(wm.reward_head[-1].weight, std=0.5)  # a head that is not constant
    length = 6
    batch = {
        "obs": torch.randint(0, 256, (3, length, 64, 64, 3), dtype=torch.uint8),
        "action": torch.randint(0, 15, (3, length)),
        "reward": torch.zeros(3, length),
        "is_first": torch.zeros(3, length, dtype=torch.bool),
        "is_terminal": torch.zeros(3, length, dtype=torch.bool),
    }
    batch["reward"][:, 2] = 5.0  # received on arriving at step 2
    torch.manual_seed(7)
    with torch.no_grad():
        _, metrics, post = wm.loss(batch)
    logits = wm.reward_head(wm.rssm.features(post))  # (3, T, 255), from the state of each step
    twohot = TwoHot()
    aligned = twohot.loss(logits, batch["reward"]).mean()
    shifted = twohot.loss(logits, torch.roll(batch["reward"], 1, 1)).mean()
    assert float(metrics["loss/reward"]) == pytest.approx(float(aligned), rel=1e-5)
    assert float(aligned) != pytest.approx(float(shifted), rel=1e-3)


def test_block_gru_blocks_see_each_others_state():
    torch.manual_seed(0)
    core = BlockGRU(deter=16, stoch=6, num_actions=3, hidden=8, blocks=4)
    deter = torch.randn(1, 16, requires_grad=True)
    stoch, action = torch.randn(1, 6), F.one_hot(torch.tensor([1]), 3).float()
    jac = torch.autograd.functional.jacobian(lambda d: core(d, stoch, action), deter)[0, :, 0]  # (16, 16)
    per = 4
    for i in range(4):
        for j in range(4):
            block = jac[i * per : (i + 1) * per, j * per : (j + 1) * per]
            assert block.abs().max() > 1e-4, (i, j)  # block i's next state depends on block j's state


@pytest.mark.parametrize("blocks, dynlayers", [(4, 1), (1, 1), (4, 2), (4, 0)])
def test_block_gru_matches_its_definition_block_by_block(blocks, dynlayers):
    """The core computes each block's layer on [its own deter slice, the three shared projections]
    without building that input; here it is built explicitly, block by block, as in the docstring."""
    torch.manual_seed(1)
    core = BlockGRU(deter=16, stoch=6, num_actions=3, hidden=8, blocks=blocks, dynlayers=dynlayers)
    deter, stoch = torch.randn(5, 16), torch.randn(5, 6)
    action = F.one_hot(torch.tensor([0, 1, 2, 1, 0]), 3).float()
    shared = torch.cat([core.deter_in(deter), core.stoch_in(stoch), core.action_in(action)], -1)  # (5, 24)
    own = deter.reshape(5, blocks, -1)
    first = (list(core.hidden_layers) or [core.gates])[0]
    x = torch.cat([torch.cat([own[:, b], shared], -1) @ first.weight[b] for b in range(blocks)], -1) + first.bias
    for layer in list(core.hidden_layers)[1:]:
        x = layer(x)
    if dynlayers:
        x = core.gates(x)
    reset, cand, update = x.reshape(5, blocks, -1).chunk(3, -1)
    cand = torch.tanh(torch.sigmoid(reset) * cand)
    update = torch.sigmoid(update - 1)
    expected = (update * cand + (1 - update) * own).reshape(5, 16)
    torch.testing.assert_close(core(deter, stoch, action), expected, rtol=1e-5, atol=1e-6)


def test_reward_head_learns_a_rare_separable_event():
    """A 1% event marked by one feature direction: the reward head (one hidden layer, zero output,
    the CPU configs' learning rate) must rank events mostly above the rest within 300 updates and
    predict a clearly larger reward for them within 1500. (Seeds 0-2 on 1 and 2 threads give AUC
    0.87-0.97 at 300 updates and 0.97-0.995 at 1500, event mean 0.30-0.34.)"""
    torch.manual_seed(0)
    dim = 64
    head = MLP(dim, 64, 1, 255, outscale=0.0)
    twohot = TwoHot()
    opt = torch.optim.Adam(head.parameters(), lr=3e-4)

    def sample(n):
        feat = torch.randn(n, dim)
        event = feat[:, 0] > 2.326  # 1% of a standard normal
        return feat, event.float()

    def evaluate():
        feat, reward = sample(20000)
        with torch.no_grad():
            pred = twohot.mean(head(feat))
        event = reward > 0
        assert 100 < int(event.sum()) < 300
        return roc_auc(pred.numpy(), event.numpy()), float(pred[event].mean()), float(pred[~event].mean())

    for step in range(1, 1501):
        feat, reward = sample(512)
        loss = twohot.loss(head(feat), reward).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 300:
            assert evaluate()[0] > 0.85
    auc, on_events, elsewhere = evaluate()
    assert auc > 0.95
    assert on_events > 0.2 and on_events > 10 * abs(elsewhere), (on_events, elsewhere)


def test_roc_auc_hand_computed():
    # positives 0.9, 0.4; negatives 0.5, 0.1, 0.4: pairs won 1 + 1 + 1, 0 + 1 + 0.5 (tie) -> 4.5 / 6
    assert roc_auc(np.array([0.9, 0.4, 0.5, 0.1, 0.4]), np.array([1, 1, 0, 0, 0])) == pytest.approx(0.75)
    assert roc_auc(np.array([1.0, 2.0]), np.array([0, 1])) == 1.0
    assert roc_auc(np.array([1.0, 2.0]), np.array([1, 0])) == 0.0
    assert np.isnan(roc_auc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_dream_skill_against_hand_computed_errors():
    rng = np.random.default_rng(0)
    k, h = 3, 4
    real = rng.random((k, h, 64, 64, 3)).astype(np.float32)
    last = rng.random((k, 64, 64, 3)).astype(np.float32)
    valid = np.ones((k, h), bool)
    valid[0, 2:] = False  # lane 0 starts a new episode at its third dreamed step

    perfect = SkillByHorizon(h)
    perfect.add(real, real.copy(), last, valid)
    copying = SkillByHorizon(h)
    copying.add(real, np.repeat(last[:, None], h, 1), last, valid)
    for step in range(1, h + 1):
        assert perfect.result((step,))[f"skill_h{step}"] == 1.0
        assert perfect.result((step,))[f"skill_changed_h{step}"] == 1.0
        assert copying.result((step,))[f"skill_h{step}"] == 0.0
        assert copying.result((step,))[f"skill_changed_h{step}"] == pytest.approx(0.0)

    # one pixel: real goes 0 -> 1 -> 1 (changes at h1 only); the model predicts 0.5, then 1
    real1 = np.zeros((1, 2, 64, 64, 3), np.float32)
    real1[0, :, 0, 0, 0] = 1.0
    pred1 = real1.copy()
    pred1[0, 0, 0, 0, 0] = 0.5
    one = SkillByHorizon(2)
    one.add(real1, pred1, np.zeros((1, 64, 64, 3), np.float32), np.ones((1, 2), bool))
    r = one.result((1, 2))
    pixels = 64 * 64 * 3
    assert r["mse_h1"] == pytest.approx(0.25 / pixels) and r["copy_mse_h1"] == pytest.approx(1 / pixels)
    assert r["skill_h1"] == pytest.approx(0.75)
    assert r["skill_changed_h1"] == pytest.approx(0.75)  # the only changed pixel (its 3 channels)
    assert r["skill_h2"] == pytest.approx(1.0)
    assert np.isnan(r["skill_changed_h2"])  # nothing changed from h1 to h2


def test_dream_quality_skips_windows_that_dream_across_a_reset():
    is_first = np.zeros((1, 40), bool)
    is_first[0, [0, 20]] = True
    windows = dream_windows(is_first, context=4, horizon=3, stride=1)
    assert all(not is_first[0, s + 4] for _, s in windows)
    assert (0, 16) not in set(map(tuple, windows)) and (0, 15) in set(map(tuple, windows))


def test_replay_context_starts_from_the_stored_state():
    torch.manual_seed(0)
    wm = Dreamer(size="tiny").world_model
    length = 5
    full = {
        "obs": torch.randint(0, 256, (2, length + 1, 64, 64, 3), dtype=torch.uint8),
        "action": torch.randint(0, 15, (2, length + 1)),
        "reward": torch.zeros(2, length + 1),
        "is_first": torch.zeros(2, length + 1, dtype=torch.bool),
        "is_terminal": torch.zeros(2, length + 1, dtype=torch.bool),
    }
    with torch.no_grad():
        _, _, post = wm.loss(full)
        rest = {k: v[:, 1:] for k, v in full.items()}
        context = {"deter": post["deter"][:, 0], "stoch": post["stoch"][:, 0].argmax(-1),
                   "valid": torch.tensor([True, False]), "action": full["action"][:, 0]}
        _, _, carried = wm.loss({**rest, "context": context})
        _, _, fresh = wm.loss(rest)
    # lane 0 continues from the stored state: its first deter is the full sequence's second one
    torch.testing.assert_close(carried["deter"][0, 0], post["deter"][0, 1])
    # lane 1 had no stored latent: it starts fresh, as a sequence without context does
    torch.testing.assert_close(carried["deter"][1, 0], fresh["deter"][1, 0])
    assert not torch.allclose(carried["deter"][0, 0], fresh["deter"][0, 0])


def test_dream_returns_branch_each_start_on_each_first_action_and_ignore_actions_only_when_the_dynamics_do():
    torch.manual_seed(0)
    wm = Dreamer(size="tiny").world_model.eval()
    rssm = wm.rssm
    with torch.no_grad():  # a reward head that is not zero (it starts zero-initialised)
        wm.reward_head[-1].weight.normal_(0, 0.02)
    start = {"deter": torch.randn(3, rssm.deter),
             "stoch": F.one_hot(torch.randint(0, rssm.classes, (3, rssm.stoch)), rssm.classes).float()}
    first, later = torch.tensor([0, 4, 7, 14]), torch.randint(0, 15, (3, 5))
    returns = dream_returns(wm, start, first, later)  # (3, 4)
    for k in range(3):  # each branch alone gives the same return: the batch layout is right
        for a in range(4):
            alone = dream_returns(wm, {key: v[k:k + 1] for key, v in start.items()}, first[a:a + 1], later[k:k + 1])
            torch.testing.assert_close(returns[k, a], alone[0, 0], rtol=1e-4, atol=1e-5)
    assert returns.std(1).min() > 1e-6  # a fresh model's action projection moves deter
    with torch.no_grad():
        for p in rssm.dynamics.action_in.parameters():
            p.zero_()  # the action's projection is constant: every action gives the same future
    returns = dream_returns(wm, start, first, later)
    assert returns.std(1).max() == pytest.approx(0.0, abs=1e-6)


def test_spread_ratio_and_action_correlation_by_hand():
    game = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0], [5.0, 5.0, 5.0]])  # the last state: actions do not matter
    twice = spread_ratio(2 * game, game)
    assert twice["spread_ratio"] == pytest.approx(2.0) and twice["action_corr"] == pytest.approx(1.0)
    assert twice["states_where_actions_matter"] == pytest.approx(2 / 3)
    assert spread_ratio(-game, game)["action_corr"] == pytest.approx(-1.0)
    blind = spread_ratio(np.ones_like(game), game)
    assert blind["spread_ratio"] == 0.0 and blind["action_corr"] == 0.0
    # spreads 0.4714 and 0.8165 (population SD) over 3 states: mean 0.4293
    half = spread_ratio(np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]), game)
    assert half["spread_game"] == pytest.approx((np.sqrt(2) / 3 + np.sqrt(2 / 3)) / 3)
    assert half["action_corr"] == pytest.approx(0.5)  # 1 on the first state, 0 where the dream is blind


def test_observe_with_the_embedding_projected_once_equals_stepping_one_frame_at_a_time():
    torch.manual_seed(0)
    wm = Dreamer(size="tiny").world_model
    obs = torch.randint(0, 256, (3, 6, 64, 64, 3), dtype=torch.uint8)
    action = torch.randint(0, 15, (3, 6))
    is_first = torch.zeros(3, 6, dtype=torch.bool)
    is_first[1, 3] = True
    post = _observe(wm, obs, action, is_first)
    rssm, embed = wm.rssm, wm.encoder(obs)
    torch.manual_seed(0)  # the same draws, one frame at a time through the whole posterior layer
    state, prev = rssm.initial(3, "cpu"), torch.zeros(3, 15)
    first = is_first.clone()
    first[:, 0] = True
    with torch.no_grad():
        for t in range(6):
            state = rssm.obs_step(state, prev, embed[:, t], first[:, t])
            reference = torch.cat([state["deter"], embed[:, t]], -1)
            torch.testing.assert_close(rssm.post_net(reference).reshape(3, rssm.stoch, rssm.classes).softmax(-1),
                                       state["logits"].exp().sub(rssm.unimix / rssm.classes).div(1 - rssm.unimix))
            torch.testing.assert_close(post["deter"][:, t], state["deter"])
            assert torch.equal(post["stoch"][:, t], state["stoch"])
            prev = F.one_hot(action[:, t], 15).float()


def test_cnn_channel_multipliers_are_a_setting_and_checked():
    model = Dreamer(size="tiny", overrides={"depth": 24, "cnn_mults": [1, 2, 4, 8]})
    convs = [m for m in model.world_model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [24, 48, 96, 192]
    assert model.world_model.encoder.embed_dim == 192 * 4 * 4
    deconvs = [m for m in model.world_model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in deconvs] == [96, 48, 24, 3]
    for bad in ([], [1, 2, 0, 4], [1] * 7, 4, ["2"]):
        with pytest.raises(ValueError, match="cnn_mults must be a list of 1 to 6 positive integers"):
            Dreamer(size="tiny", overrides={"cnn_mults": bad})


def test_encoder_and_decoder_follow_the_frame_shape():
    from dreamer.nets import Decoder, Encoder

    enc, dec = Encoder(4, (2, 3, 4), obs_shape=(32, 48, 1)), Decoder(100, 4, (2, 3, 4), obs_shape=(32, 48, 1))
    frames = torch.randint(0, 256, (2, 5, 32, 48, 1), dtype=torch.uint8)
    assert enc(frames).shape == (2, 5, enc.embed_dim) and enc.embed_dim == 16 * 4 * 6  # 3 stages: /8
    assert dec(torch.randn(2, 5, 100)).shape == (2, 5, 32, 48, 1)
    default = Encoder(4)
    assert default.embed_dim == 16 * 4 * 4 and Decoder(100, 4)(torch.randn(3, 100)).shape == (3, 64, 64, 3)


@pytest.mark.parametrize("downsample, upsample", [("pool", "nearest"), ("pool", "transposed"), ("stride", "nearest")])
def test_the_references_resolution_steps_keep_the_shapes_and_change_the_layers(downsample, upsample):
    from dreamer.nets import Decoder, Encoder

    enc, dec = Encoder(4, (2, 3, 4), obs_shape=(32, 48, 1), downsample=downsample), \
        Decoder(100, 4, (2, 3, 4), obs_shape=(32, 48, 1), upsample=upsample)
    frames = torch.randint(0, 256, (2, 5, 32, 48, 1), dtype=torch.uint8)
    assert enc(frames).shape == (2, 5, 16 * 4 * 6) and dec(torch.randn(2, 5, 100)).shape == (2, 5, 32, 48, 1)
    kernels = {m.kernel_size for m in enc.modules() if isinstance(m, torch.nn.Conv2d)}
    assert kernels == ({(5, 5)} if downsample == "pool" else {(4, 4)})
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in enc.modules()) == (downsample == "pool")
    assert any(isinstance(m, torch.nn.Upsample) for m in dec.modules()) == (upsample == "nearest")
    with pytest.raises(ValueError, match="allowed: stride, pool"):
        Encoder(4, downsample="avg")


@pytest.mark.parametrize("downsample", ["stride", "pool"])
def test_both_encoders_see_a_single_pixel_dot_at_every_phase_of_their_grid(downsample):
    """What sanity-sprite asks of the encoder: a 1-pixel dot moves the embedding wherever it sits
    relative to the stride-2 / pooling grid (at initialisation, within 4x of each other)."""
    from dreamer.nets import Encoder

    torch.manual_seed(0)
    enc = Encoder(4, downsample=downsample)
    blank = torch.full((1, 64, 64, 3), 96, dtype=torch.uint8)
    dots = blank.repeat(4, 1, 1, 1)
    for i, (r, c) in enumerate([(30, 30), (30, 31), (31, 30), (31, 31)]):
        dots[i, r, c] = 255
    with torch.no_grad():
        seen = (enc(dots) - enc(blank)).abs().sum(-1)  # (4,) how much each dot moves the embedding
    assert seen.min() > 0.25 * seen.max() > 0


def test_block_gru_weights_scale_with_the_whole_input_as_the_reference():
    from dreamer.nets import BlockGRU

    torch.manual_seed(0)
    block = BlockGRU(deter=512, stoch=128, num_actions=15, hidden=64, blocks=8)
    torch.manual_seed(0)
    whole = BlockGRU(deter=512, stoch=128, num_actions=15, hidden=64, blocks=8, block_fan_in="whole")
    ratio = float(block.gates.weight.detach().std() / whole.gates.weight.detach().std())
    assert ratio == pytest.approx(8 ** 0.5, rel=0.02)  # fan-in of all inputs: 8 blocks' worth
    torch.testing.assert_close(block.action_in[0].weight, whole.action_in[0].weight)  # plain Linears alike


def test_a_dreamer_with_the_references_image_layers_and_init_trains_and_records_them():
    torch.manual_seed(0)
    knobs = {"downsample": "pool", "upsample": "nearest", "block_init": "whole"}
    agent = Dreamer(size="tiny", world_model=knobs)
    assert {k: agent.hparams.world_model[k] for k in knobs} == knobs
    batch = {"obs": torch.randint(0, 256, (2, 6, 64, 64, 3), dtype=torch.uint8),
             "action": torch.randint(0, 15, (2, 6)), "reward": torch.zeros(2, 6),
             "is_first": torch.zeros(2, 6, dtype=torch.bool), "is_terminal": torch.zeros(2, 6, dtype=torch.bool)}
    loss, _ = agent.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and agent.world_model.encoder.net[0].weight.grad is not None
    plain = Dreamer(size="tiny")
    assert plain.world_model.encoder.net[0].weight.shape[-1] == 4 and agent.world_model.encoder.net[0].weight.shape[-1] == 5


def test_a_checkpoint_of_other_image_layers_names_the_knob_to_give():
    """validate and resume build the model from the command's knobs: a checkpoint written with the
    reference's image layers, restored into the default ones, is refused naming both values (not as
    "an earlier version of this code")."""
    from dreamer.checkpoints import load_agent_state

    torch.manual_seed(0)
    pooled = Dreamer(size="tiny", world_model={"downsample": "pool", "upsample": "nearest"})
    checkpoint = {"hyper_parameters": dict(pooled.hparams), "state_dict": pooled.state_dict()}
    with pytest.raises(ValueError) as refused:
        load_agent_state(Dreamer(size="tiny"), checkpoint)
    assert "model.world_model.downsample: checkpoint 'pool', this run 'stride'" in str(refused.value)
    assert "model.world_model.upsample: checkpoint 'nearest', this run 'transposed'" in str(refused.value)
    load_agent_state(Dreamer(size="tiny", world_model={"downsample": "pool", "upsample": "nearest"}), checkpoint)
    old = {"hyper_parameters": {"size": "tiny", "overrides": None}, "state_dict": Dreamer(size="tiny").state_dict()}
    load_agent_state(Dreamer(size="tiny"), old)  # written before the knobs: the stride and transposed layers
